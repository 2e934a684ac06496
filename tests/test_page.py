"""
The status page in a real browser: rrlb runs with nodes in mixed states and
headless Chromium loads its admin page, as a person would.

Chromium runs as a child process (spawnProcess), so the reactor keeps
serving rrlb while the browser fetches the page. The test is skipped, with
a message saying so, only where no Chromium binary can be found (C{.ci/run}
installs Debian's C{chromium} when run as root); set C{RRLB_CHROMIUM} to
use another binary.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any, Optional

from twisted.internet import defer, error, protocol
from twisted.internet import reactor as _reactor
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.support import (
    ADMIN,
    HTTPClient,
    admin_url,
    start_backends,
    start_balancer,
    wait_until,
)

reactor: Any = _reactor

BROWSER_TIMEOUT = 60.0
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> Optional[str]:
    """
    The Chromium binary to use, or L{None}.
    """
    explicit = os.environ.get("RRLB_CHROMIUM")
    if explicit:
        return shutil.which(explicit) or (explicit if os.access(explicit, os.X_OK) else None)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = find_chromium()


class _Collect(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.done: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.done.callback(-1 if code is None else code)


async def run_browser(args: list[str], home: str) -> tuple[int, str, str]:
    """
    Run Chromium with C{args} (killed after L{BROWSER_TIMEOUT} seconds);
    return its exit code, stdout and stderr.
    """
    assert CHROMIUM is not None
    collect = _Collect()
    env = dict(os.environ, HOME=home)
    process = reactor.spawnProcess(collect, CHROMIUM, [CHROMIUM, *args], env=env)

    def kill() -> None:
        try:
            process.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    timer = reactor.callLater(BROWSER_TIMEOUT, kill)
    code = await collect.done
    if timer.active():
        timer.cancel()
    return (
        code,
        b"".join(collect.out).decode("utf-8", "replace"),
        b"".join(collect.err).decode("utf-8", "replace"),
    )


class StatusPageBrowserTests(unittest.TestCase):
    """
    What a person sees on the status page.
    """

    if CHROMIUM is None:
        skip = (
            "no Chromium found (looked for " + ", ".join(CANDIDATES) + "; set RRLB_CHROMIUM):"
            " install Debian's chromium package (.ci/run does, as root) to run this test"
        )

    def browser_args(self, profile: str, width: int = 1200) -> list[str]:
        return [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            f"--window-size={width},800",
        ]

    async def test_mixed_states(self) -> None:
        """
        With one node up, one down and one drained, the page shows a row per
        node with its state, a button to put the drained one back, refreshes
        itself (its script runs under the page's policy), and renders to a
        screenshot.
        """
        up, down, drained = await start_backends(self, "up", "down", "drained")
        down.healthy = False
        balancer = await start_balancer(
            self,
            [up.url, down.url, drained.url],
            "--health-path",
            "/health",
            "--admin",
            ADMIN,
        )
        pool = balancer.service.pool
        await wait_until(
            lambda: all(n.last_check is not None for n in pool.nodes),
            what="the first health checks",
        )
        for _ in range(pool.fall):
            pool.mark(pool.nodes[1], False, "HTTP 503")
        pool.set_drained(pool.nodes[2], True)
        self.assertEqual([n.state for n in pool.nodes], ["up", "down", "draining"])
        url = await admin_url(balancer) + "/"

        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        # Run the page's timers for five (virtual) seconds, so its refresh
        # has replaced the server-rendered rows by the time the DOM is dumped.
        code, dom, err = await run_browser(
            self.browser_args(os.path.join(work, "profile-dom"))
            + ["--virtual-time-budget=5000", "--dump-dom", url],
            work,
        )
        self.assertEqual(code, 0, err[-2000:])
        rows = re.findall(r'<tr class="node state-(\w+)" data-node-id="(\d+)"', dom)
        self.assertEqual(rows, [("up", "0"), ("down", "1"), ("draining", "2")], dom)
        self.assertIn(">UP</span>", dom)
        self.assertIn(">DOWN</span>", dom)
        self.assertIn(">DRAINING</span>", dom)
        for backend in (up, down, drained):
            self.assertIn(backend.url, dom)
        self.assertIn('action="/nodes/default/2/enable"', dom)
        self.assertIn("HTTP 503", dom)
        self.assertIn("1 up", dom)
        self.assertIn("1 down", dom)
        self.assertIn("1 draining", dom)
        live = re.search(r'<span id="live"[^>]*>([^<]*)</span>', dom)
        self.assertIsNotNone(live, dom)
        assert live is not None
        self.assertTrue(live.group(1).startswith("updated "), live.group(1))

        screenshot = os.path.join(work, "status.png")
        code, _, err = await run_browser(
            self.browser_args(os.path.join(work, "profile-shot"))
            + [f"--screenshot={screenshot}", url],
            work,
        )
        self.assertEqual(code, 0, err[-2000:])
        self.assertTrue(os.path.exists(screenshot), err[-2000:])
        with open(screenshot, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        self.assertGreater(os.path.getsize(screenshot), 10_000)

    async def test_fits_1280(self) -> None:
        """
        At 1,280 px the page needs no horizontal scroll, with long node
        URLs, a long error, limits and both charts in every row: the
        Drain buttons are in view.
        """
        up, down, drained = await start_backends(self, "up", "down", "drained")
        base = "/a/fairly/long/base/path/for/this/node"
        balancer = await start_balancer(
            self,
            [b.url + base for b in (up, down, drained)],
            "--admin",
            ADMIN,
            "--max-conns-per-node",
            "1000",
            "--health-interval",
            "3600",
        )
        pool = balancer.service.pool
        # The first probes, then none for the rest of the test.
        await wait_until(
            lambda: all(n.last_check is not None for n in pool.nodes),
            what="the first health checks",
        )
        error = (
            "TLS certificate check failed: unknown CA: unable to get local issuer"
            " certificate (issuer CN=Some Other Internal Certificate Authority)"
        )
        for node in pool.nodes[1:]:
            for _ in range(pool.fall):
                pool.mark(node, False, error)
        pool.set_drained(pool.nodes[2], True)
        history = balancer.service.history
        assert history is not None
        await wait_until(lambda: len(history.nodes) == 3, what="a history sample")
        url = await admin_url(balancer) + "/"
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        code, dom, err = await run_browser(
            self.browser_args(os.path.join(work, "profile"), width=1280)
            + ["--virtual-time-budget=3000", "--dump-dom", url],
            work,
        )
        self.assertEqual(code, 0, err[-2000:])
        self.assertEqual(len(re.findall(r'<figure class="chart', dom)), 6, dom)
        self.assertIn("Some Other Internal", dom)
        width = re.search(r'<html lang="en" data-width="(\d+)/(\d+)"', dom)
        assert width is not None, dom[:500]
        scroll, client = int(width.group(1)), int(width.group(2))
        self.assertGreater(client, 1200)
        self.assertLessEqual(scroll, client, "the page is wider than 1280 px")

    async def test_charts_render_and_move(self) -> None:
        """
        With two pools, the page groups nodes by pool and draws per node a
        requests-per-second and a p99 chart that the browser lays out (each
        line has a size); after more traffic and a few seconds the lines
        have moved, and the slowed-down node's p99 stands out.
        """
        fast, slow, other = await start_backends(self, "fast", "slow", "other")
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                f"pools:\n  api: {{nodes: [{fast.url}, {slow.url}]}}\n"
                f"  web: {{nodes: [{other.url}]}}\n"
                "routes: [{path_prefix: /api, pool: api}, {pool: web}]\n"
            )
        balancer = await start_balancer(self, (), "--config", path, "--admin", ADMIN)
        url = await admin_url(balancer) + "/"
        client = HTTPClient()
        self.addCleanup(client.close)

        async def traffic(count: int) -> None:
            for _ in range(count):
                await client.request("GET", balancer.url + "/api/x")
                await client.request("GET", balancer.url + "/x")

        history = balancer.service.history
        assert history is not None

        async def sampled() -> None:
            # The history samples once a second: wait for a sample of every
            # node taken after the traffic so far.
            taken = {label: len(node.rps) for label, node in history.nodes.items()}
            await wait_until(
                lambda: len(history.nodes) == 3
                and all(len(n.rps) > taken.get(label, 0) for label, n in history.nodes.items()),
                what="a history sample after the traffic",
            )

        await traffic(20)
        await sampled()
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)

        async def dump(name: str) -> str:
            code, dom, err = await run_browser(
                self.browser_args(os.path.join(work, name))
                + ["--virtual-time-budget=3000", "--dump-dom", url],
                work,
            )
            self.assertEqual(code, 0, err[-2000:])
            return dom

        def lines(dom: str) -> dict[tuple[str, str], str]:
            found = re.findall(
                r'<tr class="node[^"]*" data-node-id="(\d+)"[^>]*data-pool="(\w+)">(.*?)</tr>',
                dom,
                re.S,
            )
            return {(pool, node): row for node, pool, row in found}

        first = await dump("profile-1")
        sections = re.findall(r'<section class="pool" data-pool="(\w+)"', first)
        self.assertEqual(sections, ["api", "web"])
        rows = lines(first)
        self.assertEqual(set(rows), {("api", "0"), ("api", "1"), ("web", "0")})
        for row in rows.values():
            drawn = re.findall(r'<figure class="chart (rps|p99)"[^>]*data-drawn="(\d+)x(\d+)"', row)
            self.assertEqual([kind for kind, _, _ in drawn], ["rps", "p99"], row)
            # The rps line spans the samples so far: wider than nothing.
            self.assertGreater(int(drawn[0][1]), 0, row)

        slow.delay = 0.3
        await traffic(6)
        await sampled()
        second = await dump("profile-2")
        before, after = lines(first), lines(second)
        for key in before:
            path_before = re.search(r'class="line" d="([^"]*)"', before[key])
            path_after = re.search(r'class="line" d="([^"]*)"', after[key])
            assert path_before is not None and path_after is not None
            self.assertNotEqual(path_before.group(1), path_after.group(1), key)
        captions = re.findall(r"p99 <b>([^<]*)</b>", after[("api", "1")])
        self.assertEqual(len(captions), 1)
        self.assertTrue(captions[0].endswith(" ms"), captions)
        slow_p99 = float(captions[0].split()[0])
        self.assertGreater(slow_p99, 100.0)
