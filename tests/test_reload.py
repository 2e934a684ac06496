"""
Tests for live reload: L{rrlb.service.ControlService.reload} re-reads the
C{--config} file and applies it to a running balancer over real loopback
sockets, without failing a request; a bad file is kept out; C{SIGHUP}
triggers it.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Sequence

from twisted.internet import defer
from twisted.trial import unittest

from rrlb.service import ControlService
from rrlb.settings import restart_only
from rrlb.tap import Options, compose
from tests.support import (
    LOOPBACK,
    Balancer,
    HTTPClient,
    LogCapture,
    http_request,
    reactor,
    start_backends,
    start_balancer,
    start_daemon,
    wait_until,
)


def write_config(path: str, nodes: Sequence[str], extra: str = "") -> None:
    with open(path, "w") as f:
        f.write("nodes:\n")
        for url in nodes:
            f.write(f"  - {url}\n")
        f.write(extra)


class ReloadTests(unittest.TestCase):
    """
    A reload changes nodes, health settings and timeouts of the running
    balancer; what stays keeps its state.
    """

    async def start(
        self, nodes: Sequence[str], *args: str, extra: str = ""
    ) -> tuple[str, Balancer, ControlService]:
        path = self.mktemp()
        write_config(path, nodes, extra)
        balancer = await start_balancer(self, (), "--config", path, *args)
        return path, balancer, balancer.service

    async def test_nodes_added_and_removed(self) -> None:
        """
        After a reload from [a, b] to [b, c], requests go to b and c only;
        b is the same node, with its counters and its pooled connections.
        """
        a, b, c = await start_backends(self, "a", "b", "c")
        path, balancer, service = await self.start([a.url, b.url])
        client = HTTPClient()
        self.addCleanup(client.close)
        seen = {(await client.request("GET", balancer.url + "/")).body for _ in range(4)}
        self.assertEqual(seen, {b"a", b"b"})
        node_b = service.pool.get(b.url)
        assert node_b is not None
        requests_b = node_b.requests
        idle_b = service.traffic.upstream.idle_count(b.url)
        self.assertGreater(idle_b, 0)

        write_config(path, [b.url, c.url])
        self.assertTrue(service.reload())

        self.assertEqual([n.key for n in service.pool.nodes], [b.url, c.url])
        self.assertIs(service.pool.get(b.url), node_b)
        self.assertEqual(node_b.requests, requests_b)
        self.assertEqual(service.traffic.upstream.idle_count(b.url), idle_b)
        self.assertEqual(service.traffic.upstream.idle_count(a.url), 0)
        seen = {(await client.request("GET", balancer.url + "/")).body for _ in range(4)}
        self.assertEqual(seen, {b"b", b"c"})
        self.assertEqual([n.key for n in service.checker.pool.nodes], [b.url, c.url])

    async def test_removed_node_finishes_in_flight(self) -> None:
        """
        A node removed while it serves a request takes no new requests, and
        the one in flight completes; its connections are closed afterwards.
        """
        a, b = await start_backends(self, "a", "b")
        a.delay = 0.5
        path, balancer, service = await self.start([a.url])
        client = HTTPClient()
        self.addCleanup(client.close)
        slow = defer.Deferred.fromCoroutine(client.request("GET", balancer.url + "/slow"))
        await wait_until(lambda: a.requests, what="the request at a")

        write_config(path, [b.url])
        self.assertTrue(service.reload())
        self.assertEqual([n.url for n in service.traffic.retired], [a.url])
        fast = await http_request(self, "GET", balancer.url + "/fast")
        self.assertEqual(fast.body, b"b")

        reply = await slow
        self.assertEqual((reply.code, reply.body), (200, b"a"))
        self.assertEqual([r.uri for r in a.requests], [b"/slow"])
        await wait_until(lambda: not service.traffic.retired, what="a to be forgotten")
        self.assertEqual(service.traffic.upstream.idle_count(a.url), 0)

    async def test_reload_under_load(self) -> None:
        """
        Reloads that add and remove nodes while clients keep requests in
        flight over keep-alive connections fail no request.
        """
        backends = await start_backends(self, "a", "b", "c")
        for backend in backends:
            backend.delay = 0.01
        a, b, c = (x.url for x in backends)
        path, balancer, service = await self.start([a, b])
        sets = [[b, c], [a, c], [c], [a, b, c], [a, b]]
        replies: list[Any] = []
        done = False

        async def worker() -> None:
            client = HTTPClient()
            try:
                for _ in range(60):
                    if done:
                        break
                    reply = await client.request("GET", balancer.url + "/load")
                    replies.append((reply.code, reply.body))
            finally:
                await client.close()

        workers = [defer.Deferred.fromCoroutine(worker()) for _ in range(6)]
        for i in range(10):
            # Each reload comes with requests in flight and answers since the last.
            await wait_until(
                lambda want=len(replies) + 3: len(replies) >= want,
                what="answers since the last reload",
            )
            write_config(path, sets[i % len(sets)], f"timeout: {10 + i}\n")
            self.assertTrue(service.reload())
        done = True
        await defer.gatherResults(workers)

        self.assertGreater(len(replies), 20)
        failed = [r for r in replies if r[0] != 200]
        self.assertEqual(failed, [])
        self.assertEqual({body for _, body in replies}, {b"a", b"b", b"c"})
        self.assertEqual(service.traffic.upstream.timeout, 19.0)

    async def test_health_and_timeouts(self) -> None:
        """
        Health settings, timeouts and the header-count limit on node
        responses (max_headers) take effect on reload; a node that was down
        stays down (its health state is kept, not reset).
        """
        a, b = await start_backends(self, "a", "b")
        b.healthy = False
        path, balancer, service = await self.start(
            [a.url, b.url], extra="health: {interval: 0.05, fall: 1, rise: 5}\n"
        )
        node_b = service.pool.get(b.url)
        assert node_b is not None
        await wait_until(lambda: not node_b.healthy, what="b down")

        write_config(
            path,
            [a.url, b.url],
            "health: {interval: 0.2, timeout: 0.5, fall: 2, rise: 3}\n"
            "timeout: 4\nconnect_timeout: 1.5\nmax_idle_per_node: 3\nmax_headers: 50\n",
        )
        self.assertTrue(service.reload())
        self.assertFalse(node_b.healthy)
        self.assertIs(service.pool.get(b.url), node_b)
        health = service.checker.health
        self.assertEqual((health.interval, health.timeout), (0.2, 0.5))
        self.assertEqual((service.pool.rise, service.pool.fall), (3, 2))
        self.assertEqual(service.traffic.upstream.timeout, 4.0)
        self.assertEqual(service.traffic.upstream.connect_timeout, 1.5)
        self.assertEqual(service.traffic.upstream.max_idle_per_node, 3)
        self.assertEqual(service.traffic.upstream.max_headers, 50)
        self.assertEqual(service.config.timeout, 4.0)
        reply = await http_request(self, "GET", balancer.url + "/")
        self.assertEqual(reply.body, b"a")

    async def test_command_line_still_wins(self) -> None:
        """
        A reload re-applies the command-line flags over the file, as at
        start-up.
        """
        (a,) = await start_backends(self, "a")
        path, balancer, service = await self.start([a.url], "--timeout", "7")
        write_config(path, [a.url], "timeout: 3\nconnect_timeout: 2\n")
        self.assertTrue(service.reload())
        self.assertEqual(service.config.timeout, 7.0)
        self.assertEqual(service.config.connect_timeout, 2.0)

    async def test_listen_change_needs_restart(self) -> None:
        """
        Changed listen endpoints are reported as needing a restart; the
        rest of the file is applied and the old listeners keep serving.
        """
        a, b = await start_backends(self, "a", "b")
        path = self.mktemp()
        listen = f"listen: [tcp:0:interface={LOOPBACK}]\nhealth: {{path: /health}}\n"
        write_config(path, [a.url], listen)
        options = Options()
        options.parseOptions(["--config", path, "--drain-timeout", "2"])
        balancer = await start_balancer(self, config=options.config)
        service = balancer.service
        service.load_config = options.load
        logs = LogCapture.install(self)
        write_config(path, [b.url], "listen: [tcp:0:interface=127.0.0.2]\n")
        self.assertTrue(service.reload())
        warnings = [m for m in logs.messages() if "restart" in m]
        self.assertEqual(len(warnings), 1, logs.messages())
        self.assertIn("127.0.0.2", warnings[0])
        self.assertEqual(service.config.listen, (f"tcp:0:interface={LOOPBACK}",))
        reply = await http_request(self, "GET", balancer.url + "/")
        self.assertEqual(reply.body, b"b")


class BadReloadTests(unittest.TestCase):
    """
    A file that fails validation is rejected with one log line and the
    running configuration stays.
    """

    async def check_rejected(self, content: str, expected: str) -> None:
        a, b = await start_backends(self, "a", "b")
        path = self.mktemp()
        write_config(path, [a.url])
        balancer = await start_balancer(self, (), "--config", path)
        service = balancer.service
        before = service.config
        logs = LogCapture.install(self)
        with open(path, "w") as f:
            f.write(content.replace("B_URL", b.url))
        self.assertFalse(service.reload())
        messages = logs.messages()
        self.assertEqual(len(messages), 1, messages)
        self.assertTrue(messages[0].startswith("reload rejected: "), messages[0])
        self.assertIn(expected, messages[0])
        self.assertTrue(messages[0].endswith("; keeping the running configuration"))
        self.assertNotIn("Traceback", messages[0])
        self.assertIs(service.config, before)
        self.assertEqual([n.key for n in service.pool.nodes], [a.url])
        reply = await http_request(self, "GET", balancer.url + "/")
        self.assertEqual(reply.body, b"a")

    async def test_invalid_yaml(self) -> None:
        """
        Unparsable YAML is rejected.
        """
        await self.check_rejected("nodes: [B_URL\n", "invalid YAML")

    async def test_unknown_setting(self) -> None:
        """
        An unknown key is rejected, naming it.
        """
        await self.check_rejected("nodes: [B_URL]\nbogus: 1\n", "bogus")

    async def test_bad_node(self) -> None:
        """
        A bad node URL is rejected, naming it; no node of the file is taken.
        """
        await self.check_rejected("nodes: [B_URL, 'ftp://x']\n", "ftp://x")

    async def test_bad_value(self) -> None:
        """
        A bad timeout is rejected, naming the setting.
        """
        await self.check_rejected("nodes: [B_URL]\ntimeout: -1\n", "timeout")

    async def test_no_nodes(self) -> None:
        """
        A file without nodes is rejected.
        """
        await self.check_rejected("timeout: 3\n", "no nodes")

    async def test_missing_file(self) -> None:
        """
        A file that went away is rejected.
        """
        a, b = await start_backends(self, "a", "b")
        path = self.mktemp()
        write_config(path, [a.url])
        balancer = await start_balancer(self, (), "--config", path)
        os.remove(path)
        logs = LogCapture.install(self)
        self.assertFalse(balancer.service.reload())
        self.assertEqual(len(logs.messages()), 1)
        self.assertIn("cannot read", logs.messages()[0])

    async def test_good_after_bad(self) -> None:
        """
        After a rejected file, a corrected one is applied.
        """
        a, b = await start_backends(self, "a", "b")
        path = self.mktemp()
        write_config(path, [a.url])
        balancer = await start_balancer(self, (), "--config", path)
        write_config(path, ["ftp://x"])
        self.assertFalse(balancer.service.reload())
        write_config(path, [b.url])
        self.assertTrue(balancer.service.reload())
        reply = await http_request(self, "GET", balancer.url + "/")
        self.assertEqual(reply.body, b"b")


class SignalTests(unittest.TestCase):
    """
    C{SIGHUP} reloads a running balancer built by L{rrlb.tap.makeService}.
    """

    async def test_sighup(self) -> None:
        """
        A real SIGHUP to this process reloads the file; stopping puts the
        previous handler back.
        """
        previous = signal.getsignal(signal.SIGHUP)
        a, b = await start_backends(self, "a", "b")
        path = self.mktemp()
        write_config(path, [a.url])
        balancer = await start_balancer(self, (), "--config", path)
        service = balancer.service
        # Never send the signal unless rrlb's handler is the one installed:
        # the default action would end the test run.
        self.assertEqual(signal.getsignal(signal.SIGHUP), service.signals.sighup)
        write_config(path, [b.url])
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_until(lambda: [n.key for n in service.pool.nodes] == [b.url], what="the reload")
        reply = await http_request(self, "GET", balancer.url + "/")
        self.assertEqual(reply.body, b"b")
        await balancer.stop()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)

    async def test_restart_only_settings(self) -> None:
        """
        A SIGHUP whose file changes the settings a reload does not apply
        (those declared with C{reload=False}) logs each as needing a
        restart and keeps its running value; the rest of the file (the
        nodes) is applied.
        """
        a, b = await start_backends(self, "a", "b")
        # Each setting: its line in the new file, and the log's old -> new.
        changed = {
            "listen": (
                "listen: [tcp:0:interface=127.0.0.2]\n",
                f"tcp:0:interface={LOOPBACK} -> tcp:0:interface=127.0.0.2",
            ),
            "admin": (
                f"admin: tcp:0:interface={LOOPBACK}\n",
                f"None -> tcp:0:interface={LOOPBACK}",
            ),
            "http2": ("http2: true\n", "False -> True"),
            "workers": ("workers: 2\n", "1 -> 2"),
            "log_format": ("log_format: json\n", "text -> json"),
        }
        # Every restart-only setting of the table is covered here.
        self.assertEqual(sorted(changed), sorted(row.name for row in restart_only()))
        path = self.mktemp()
        write_config(path, [a.url], f"listen: [tcp:0:interface={LOOPBACK}]\n")
        options = Options()
        options.parseOptions(["--config", path, "--drain-timeout", "2"])
        balancer = await start_balancer(self, config=options.config)
        service = balancer.service
        service.load_config = options.load
        running = service.config
        logs = LogCapture.install(self)
        write_config(path, [b.url], "".join(line for line, _ in changed.values()))
        service.signals.sighup(signal.SIGHUP, None)
        await wait_until(lambda: [n.key for n in service.pool.nodes] == [b.url], what="the reload")
        warnings = [m for m in logs.messages() if "restart" in m]
        self.assertEqual(
            sorted(warnings),
            sorted(
                f"reload: {name} changed ({values}); restart rrlb to apply it"
                for name, (_, values) in changed.items()
            ),
        )
        for name in changed:
            self.assertEqual(getattr(service.config, name), getattr(running, name))
        reply = await http_request(self, "GET", balancer.url + "/")
        self.assertEqual(reply.body, b"b")

    async def test_not_installed_by_default(self) -> None:
        """
        A service tree built directly (as in tests) leaves SIGHUP alone.
        """
        previous = signal.getsignal(signal.SIGHUP)
        (a,) = await start_backends(self, "a")
        options = Options()
        options.parseOptions(
            ["--nodes", a.url, "--listen", f"tcp:0:interface={LOOPBACK}", "--drain-timeout", "1"]
        )
        service = compose(options.config, reactor, options.load)
        service.startService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)
        await service.stopService()

    async def test_reload_while_stopping(self) -> None:
        """
        A reload that arrives during the drain is ignored.
        """
        (a,) = await start_backends(self, "a")
        a.delay = 0.3
        path = self.mktemp()
        write_config(path, [a.url])
        balancer = await start_balancer(self, (), "--config", path)
        request = defer.Deferred.fromCoroutine(
            HTTPClient(persistent=False).request("GET", balancer.url + "/")
        )
        await wait_until(lambda: a.requests, what="the request at a")
        stopped = balancer.service.stopService()
        write_config(path, ["http://127.0.0.1:1"])
        self.assertFalse(balancer.service.reload())
        self.assertEqual((await request).body, b"a")
        await stopped

    async def test_process_sighup(self) -> None:
        """
        SIGHUP to a real rrlb process reloads its file: RELOADING=1, then
        READY=1, and the new node serves.
        """

        a, b = await start_backends(self, "a", "b")
        path = os.path.abspath(self.mktemp())
        write_config(path, [a.url], "health: {path: /health}\n")
        daemon = await start_daemon(self, "--config", path)
        await daemon.wait_for_message("READY=1")
        self.assertEqual((await http_request(self, "GET", daemon.url + "/")).body, b"a")
        write_config(path, [b.url], "health: {path: /health}\n")
        daemon.signal("HUP")
        await wait_until(
            lambda: daemon.messages.count(b"READY=1") == 2, what="READY=1 after the reload"
        )
        self.assertEqual((await http_request(self, "GET", daemon.url + "/")).body, b"b")
        states = [m for m in daemon.messages if not m.startswith((b"STATUS=", b"WATCHDOG="))]
        self.assertEqual(states, [b"READY=1", b"RELOADING=1", b"READY=1"])
        self.assertIn(b"configuration reloaded", daemon.output)
