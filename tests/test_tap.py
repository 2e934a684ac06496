"""
Tests for the twistd plugin: discovery of the dropin, the service tree
L{rrlb.tap.makeService} builds from options, C{--demo}, and what the real
command lines (C{python -m twisted rrlb}, C{twistd -n rrlb}) do with good and
bad settings, run as subprocesses.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceMaker
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.utils import getProcessOutputAndValue
from twisted.plugin import getPlugins
from twisted.python.failure import Failure
from twisted.trial import unittest

import twisted
from rrlb import tap
from rrlb.health import HealthChecker
from rrlb.pool import Pool
from rrlb.service import ControlService
from rrlb.traffic import Traffic
from tests.support import (
    LOOPBACK,
    HTTPClient,
    http_request,
    start_balancer,
    wait_until,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The checkout's rrlb and dropin, not whatever copy is installed.
ENV = {**os.environ, "PYTHONPATH": ROOT}
TWIST = ["-m", "twisted", "rrlb"]
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "rrlb"]
ISSUE_OPTIONS = (
    "--listen",
    "--nodes",
    "--config",
    "--health-path",
    "--health-interval",
    "--health-timeout",
    "--rise",
    "--fall",
    "--timeout",
    "--demo",
)

_reactor: Any = reactor


def run(*args: str) -> defer.Deferred[tuple[bytes, bytes, int]]:
    """
    Run this Python with C{args} from the checkout; its stdout, stderr and
    exit code. Never blocks the reactor.
    """
    return getProcessOutputAndValue(sys.executable, args, env=ENV, path=ROOT, reactor=_reactor)


async def free_port() -> int:
    port = await TCP4ServerEndpoint(_reactor, 0, interface=LOOPBACK).listen(protocol.Factory())
    number: int = port.getHost().port
    await port.stopListening()
    return number


class PluginTests(unittest.TestCase):
    """
    The dropin is found and builds the service tree.
    """

    def maker(self) -> Any:
        found = [p for p in getPlugins(IServiceMaker) if p.tapname == "rrlb"]
        self.assertEqual(len(found), 1)
        return found[0]

    def test_discovered(self) -> None:
        """
        Twisted's plugin system finds one C{rrlb} service maker whose options
        and service come from L{rrlb.tap}.
        """
        maker = self.maker()
        self.assertTrue(maker.description)
        self.assertIsInstance(maker.options(), tap.Options)

    def test_builds_tree(self) -> None:
        """
        The plugin's C{makeService} builds the whole tree from options: the
        pool with the nodes, the health checker with the health settings, a
        listener per C{--listen}, and the upstream timeout.
        """
        maker = self.maker()
        options = maker.options()
        options.parseOptions(
            [
                "--nodes",
                "http://127.0.0.1:9001,http://127.0.0.1:9002/app",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--health-path",
                "/hz",
                "--health-interval",
                "3",
                "--health-timeout",
                "1",
                "--rise",
                "4",
                "--fall",
                "5",
                "--timeout",
                "9",
            ]
        )
        service = maker.makeService(options)
        self.assertIsInstance(service, ControlService)
        self.assertIsInstance(service.traffic, Traffic)
        self.assertIn(service.traffic, list(service))
        self.assertFalse(service.running)
        self.assertIsInstance(service.pool, Pool)
        self.assertEqual(
            [n.url for n in service.pool.nodes],
            ["http://127.0.0.1:9001", "http://127.0.0.1:9002/app"],
        )
        self.assertEqual((service.pool.rise, service.pool.fall), (4, 5))
        self.assertIsInstance(service.checker, HealthChecker)
        self.assertIn(service.checker, list(service))
        self.assertEqual(
            (service.checker.health.path, service.checker.health.interval), ("/hz", 3.0)
        )
        self.assertEqual(service.checker.health.timeout, 1.0)
        self.assertEqual(len(service.traffic.listeners), 2)
        for listener in service.traffic.listeners:
            self.assertIsInstance(listener, StreamServerEndpointService)
            self.assertIn(listener, list(service.traffic))
            self.assertIs(listener.factory, service.traffic.site)
        self.assertEqual(service.traffic.upstream.timeout, 9.0)
        self.assertIs(service.traffic.site.resource, service.traffic.proxy)
        self.assertIs(service.traffic.proxy.pool, service.pool)

    def test_default_listener(self) -> None:
        """
        Without C{--listen} there is one listener, on tcp:8080.
        """
        options = tap.Options()
        options.parseOptions(["--nodes", "http://127.0.0.1:9001"])
        service = tap.makeService(options)
        self.assertEqual(service.config.listen, ("tcp:8080",))
        self.assertEqual(len(service.traffic.listeners), 1)

    async def test_serves(self) -> None:
        """
        The tree built from options serves requests once started, and stops
        cleanly.
        """
        balancer = await start_balancer(self, [], "--demo", "1")
        await wait_until(lambda: len(balancer.service.pool.nodes) == 1, what="demo node")
        reply = await http_request(self, "GET", balancer.url + "/ping")
        self.assertEqual((reply.code, reply.body), (200, b"demo-1: GET /ping\n"))
        await balancer.stop()
        self.assertFalse(balancer.service.running)


class DemoTests(unittest.TestCase):
    """
    C{--demo N} starts N backends in-process and balances over them.
    """

    async def test_demo_three(self) -> None:
        """
        C{--demo 3} gives three loopback nodes that answer with their own
        names, in rotation.
        """
        balancer = await start_balancer(self, [], "--demo", "3")
        pool = balancer.service.pool
        await wait_until(lambda: len(pool.nodes) == 3, what="three demo nodes")
        for node in pool.nodes:
            self.assertEqual(node.host, "127.0.0.1")
            self.assertTrue(node.in_rotation)
        client = HTTPClient()
        self.addCleanup(client.close)
        bodies = [(await client.request("GET", balancer.url + "/hello")).body for _ in range(6)]
        self.assertEqual(
            bodies,
            [f"demo-{i}: GET /hello\n".encode() for i in (1, 2, 3, 1, 2, 3)],
        )

    async def test_demo_with_nodes(self) -> None:
        """
        Demo backends are balanced over together with configured nodes.
        """
        balancer = await start_balancer(self, ["http://127.0.0.1:9"], "--demo", "2")
        pool = balancer.service.pool
        await wait_until(lambda: len(pool.nodes) == 3, what="two demo nodes and one more")
        self.assertEqual(pool.nodes[0].url, "http://127.0.0.1:9")

    async def test_demo_healthy(self) -> None:
        """
        Demo backends pass their health checks.
        """
        balancer = await start_balancer(
            self, [], "--demo", "2", "--health-interval", "0.05", "--fall", "1"
        )
        pool = balancer.service.pool
        await wait_until(lambda: len(pool.nodes) == 2, what="demo nodes")
        await wait_until(
            lambda: all(n.successes >= 3 for n in pool.nodes), what="demo health checks"
        )
        self.assertTrue(all(n.in_rotation for n in pool.nodes))


# twistd prints a usage error and then exits 1 only since Twisted 26; the
# Twisted that PyPy 3.9 gets (25.5) returns 0 after printing it. The line and
# the absence of a traceback are rrlb's; the exit code there is Twisted's.
TWISTD_EXITS_ON_USAGE_ERROR = twisted.version.major >= 26


class OverloadOptionsTests(unittest.TestCase):
    """
    Issue 11's options are in C{--help}.
    """

    def test_help(self) -> None:
        """
        The help text lists C{--max-conns-per-node}, C{--queue-timeout},
        C{--retries} and C{--retry-budget}.
        """
        text = str(tap.Options())
        for option in ("--max-conns-per-node", "--queue-timeout", "--retries", "--retry-budget"):
            self.assertIn(option, text)


class CommandLineTests(unittest.TestCase):
    """
    The real command lines, as subprocesses.
    """

    def assertOneClearLine(
        self, result: tuple[bytes, bytes, int], *needles: str, program: str = ""
    ) -> None:
        """
        The process failed, printed no traceback, and exactly one line of its
        output contains every one of C{needles}.
        """
        out, err, code = result
        text = (out + err).decode("utf-8", "replace")
        if TWISTD_EXITS_ON_USAGE_ERROR or "Usage:" not in text:
            self.assertNotEqual(code, 0, text)
        self.assertNotIn("Traceback", text)
        lines = [line for line in text.splitlines() if all(n in line for n in needles)]
        self.assertEqual(len(lines), 1, f"{program}: {text}")

    async def test_help(self) -> None:
        """
        C{python -m twisted rrlb --help} and C{twistd -n rrlb --help} list
        every option of the issue.
        """
        for args in (TWIST, TWISTD):
            out, err, code = await run(*args, "--help")
            text = out.decode()
            self.assertEqual(code, 0, err)
            for option in ISSUE_OPTIONS:
                self.assertIn(option, text)

    async def test_bad_node(self) -> None:
        """
        A node URL that is not http/https stops start-up with one line
        naming the option and the value.
        """
        for args in (TWIST, TWISTD):
            result = await run(*args, "--nodes", "ftp://x")
            self.assertOneClearLine(result, "--nodes", "'ftp://x'", program=args[-1])

    async def test_no_nodes(self) -> None:
        """
        No nodes at all stops start-up with one line.
        """
        self.assertOneClearLine(await run(*TWIST), "no nodes")

    async def test_bad_number(self) -> None:
        """
        A non-positive interval stops start-up with one line.
        """
        result = await run(*TWIST, "--nodes", "http://a", "--health-interval", "0")
        self.assertOneClearLine(result, "--health-interval", "'0'")

    async def test_bad_overload_setting(self) -> None:
        """
        A bad overload setting (issue 11) stops start-up with one line
        naming the option and the value, under both command lines.
        """
        for args in (TWIST, TWISTD):
            result = await run(*args, "--nodes", "http://a", "--retry-budget", "101")
            self.assertOneClearLine(result, "--retry-budget", "'101'", program=args[-1])
        result = await run(*TWIST, "--nodes", "http://a", "--max-conns-per-node", "-1")
        self.assertOneClearLine(result, "--max-conns-per-node", "'-1'")

    async def test_bad_yaml(self) -> None:
        """
        A YAML file that does not parse, or has an unknown key, stops
        start-up with one line naming the file and the problem.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("nodes: [http://a\nhealth: {\n")
        self.assertOneClearLine(await run(*TWIST, "--config", path), "invalid YAML", path)
        with open(path, "w") as f:
            f.write("nodes: [http://a]\nhelth: {path: /}\n")
        for args in (TWIST, TWISTD):
            result = await run(*args, "--config", path)
            self.assertOneClearLine(result, "'helth'", program=args[-1])

    async def test_http2_without_h2(self) -> None:
        """
        If the h2 package cannot be imported (a broken install: it is a
        dependency), --http2 and YAML http2: true stop start-up with one
        line naming the setting, not a traceback; without them rrlb starts.
        """
        block = (
            "import runpy, sys\n"
            "class NoH2:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'h2' or name.startswith('h2.'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, NoH2())\n"
        )
        twist = block + "sys.argv[0] = 'twist'\nrunpy.run_module('twisted', run_name='__main__')\n"
        twistd = block + "from twisted.scripts.twistd import run; run()\n"
        nodes = ("--nodes", "http://127.0.0.1:9", "--listen", "tcp:0:interface=127.0.0.1")
        for args in (["-c", twist, "rrlb"], ["-c", twistd, "-n", "--pidfile=", "rrlb"]):
            result = await run(*args, *nodes, "--http2")
            self.assertOneClearLine(
                result, "--http2: HTTP/2 support cannot be loaded", "'h2'", program=args[-1]
            )
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("nodes: [http://127.0.0.1:9]\nhttp2: true\n")
        result = await run("-c", twist, "rrlb", "--config", path)
        self.assertOneClearLine(result, "http2: HTTP/2 support cannot be loaded")
        # Without it, rrlb needs no h2: the service tree builds.
        build = (
            "from rrlb.tap import Options, makeService\n"
            "o = Options(); o.parseOptions(sys.argv[1:]); makeService(o); print('built')\n"
        )
        out, err, code = await run("-c", block + build, *nodes)
        self.assertEqual((code, out), (0, b"built\n"), err)

    async def test_missing_yaml(self) -> None:
        """
        A configuration file that cannot be read stops start-up with one line.
        """
        path = os.path.abspath(self.mktemp())
        self.assertOneClearLine(await run(*TWIST, "--config", path), path)

    async def test_bad_listen(self) -> None:
        """
        A bad endpoint description stops start-up with one line naming it.
        """
        for args in (TWIST, TWISTD):
            result = await run(*args, "--nodes", "http://a", "--listen", "tcpp:80")
            self.assertOneClearLine(result, "--listen", "'tcpp:80'", program=args[-1])

    async def test_port_in_use(self) -> None:
        """
        A listen port that is taken stops start-up with one line naming the
        endpoint, not a traceback.
        """
        taken = await TCP4ServerEndpoint(_reactor, 0, interface=LOOPBACK).listen(protocol.Factory())
        self.addCleanup(taken.stopListening)
        description = f"tcp:{taken.getHost().port}:interface={LOOPBACK}"
        for args in (TWIST, TWISTD):
            result = await run(*args, "--nodes", "http://a", "--listen", description)
            self.assertOneClearLine(result, "--listen", repr(description), program=args[-1])


class _Collect(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred[Any] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value)


class DaemonTests(unittest.TestCase):
    """
    The real daemon, started as a subprocess on a loopback port.
    """

    async def test_demo_daemon(self) -> None:
        """
        C{python -m twisted rrlb --demo 3} serves the three demo backends in
        rotation on its port, and exits cleanly on SIGTERM.
        """
        port = await free_port()
        proc = _Collect()
        transport: Any = _reactor.spawnProcess(
            proc,
            sys.executable,
            [sys.executable, *TWIST, "--demo", "3", "--listen", f"tcp:{port}:interface={LOOPBACK}"],
            env=ENV,
            path=ROOT,
        )

        def kill() -> defer.Deferred[Any]:
            if not proc.ended.called:
                transport.signalProcess("KILL")
            return proc.ended

        self.addCleanup(kill)
        client = HTTPClient(persistent=False)
        url = f"http://{LOOPBACK}:{port}/d"
        listening = (b"demo backends listening", b"ProxySite starting on %d" % port)
        try:
            await wait_until(
                lambda: proc.ended.called or all(line in proc.output for line in listening),
                what="rrlb and its demo backends to listen",
            )
        except AssertionError as e:
            self.fail(f"{e}: {proc.output.decode()}")
        if proc.ended.called:
            self.fail(f"rrlb did not answer: {proc.output.decode()}")
        bodies = [(await client.request("GET", url)).body for _ in range(6)]
        names = [b.split(b":")[0] for b in bodies]
        self.assertEqual(sorted(names[:3]), [b"demo-1", b"demo-2", b"demo-3"])
        self.assertEqual(names[3:], names[:3])
        transport.signalProcess(signal.SIGTERM)
        reason = await proc.ended
        output = proc.output.decode("utf-8", "replace")
        # A clean exit, or (as twist does by default) SIGTERM re-raised on
        # itself once the reactor stopped; never a crash.
        if not isinstance(reason, ProcessDone):
            self.assertIsInstance(reason, ProcessTerminated, output)
            self.assertEqual(reason.signal, signal.SIGTERM, output)
        self.assertNotIn(b"Traceback", proc.output)
