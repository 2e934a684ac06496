"""
Tests for L{rrlb.failures}: a connection to a node that fails because rrlb
is out of a local resource (EMFILE and its kind) is rrlb's problem, not the
node's. Over real sockets, with the descriptor limit of a real rrlb process
(or of this one) lowered until no descriptor is free: requests get 503,
probes mark nothing, nodes stay in rotation, one log line per burst, and
traffic flows again as soon as descriptors are free.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import resource
from typing import Any, Callable

from twisted.internet import error, task, tcp
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import ResponseNeverReceived

from rrlb.failures import BURST_GAP, LocalErrors, local_errno
from tests.support import (
    LOOPBACK,
    LogCapture,
    RawClient,
    closed_port_url,
    raw_connect,
    reactor,
    reactor_turns,
    split_response,
    start_backend,
    start_balancer,
    start_daemon,
    wait_until,
)

LOCAL_LINE = "This is rrlb's own limit"


def descriptors(pid: int) -> set[int]:
    """
    The descriptors process C{pid} has open.
    """
    directory = f"/proc/{pid}/fd"
    used = set()
    for name in os.listdir(directory):
        try:
            # Listing our own descriptors takes one for a moment: skip it.
            os.readlink(os.path.join(directory, name))
        except OSError:
            continue
        used.add(int(name))
    return used


def connected_ports(pid: int) -> list[int]:
    """
    The remote loopback ports of the TCP sockets process C{pid} holds (one
    entry per descriptor, in any state: one the peer closed stays until the
    process closes it too).
    """
    inodes = set()
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        try:
            target = os.readlink(os.path.join(directory, name))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                port = int(fields[2].rsplit(":", 1)[1], 16)
                if fields[9] in inodes and port:
                    ports.append(port)
    return ports


def _lower_limit(testcase: unittest.TestCase, pid: int) -> tuple[int, Callable[[], None]]:
    """
    Lower the soft C{RLIMIT_NOFILE} of process C{pid} to one above its
    highest open descriptor (a limit bounds descriptor numbers): then it can
    open only as many as it has holes below that. Returns the holes and
    what puts the limit back (also done at cleanup).
    """
    if not os.path.isdir(f"/proc/{pid}/fd") or not hasattr(resource, "prlimit"):
        raise unittest.SkipTest("needs Linux's /proc and prlimit")
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)

    def restore() -> None:
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        except ProcessLookupError:
            pass

    testcase.addCleanup(restore)
    used = descriptors(pid)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (max(used) + 1, limits[1]))
    return max(used) + 1 - len(used), restore


async def exhaust_daemon(testcase: unittest.TestCase, daemon: Any) -> Callable[[], None]:
    """
    Leave a real rrlb process no free descriptor: its limit just above its
    highest one, and the holes below filled with client connections it
    accepts (they idle; give it a long C{--client-header-timeout}).
    """
    pid = daemon.transport.pid
    holes, restore = _lower_limit(testcase, pid)
    for _ in range(holes):
        await raw_connect(testcase, daemon.port)
    limit = resource.prlimit(pid, resource.RLIMIT_NOFILE)[0]
    await wait_until(lambda: len(descriptors(pid)) >= limit, what="every descriptor used")
    return restore


def exhaust_here(testcase: unittest.TestCase) -> Callable[[], None]:
    """
    Leave this process no free descriptor (holes filled with /dev/null);
    returns what gives them back.
    """
    holes, restore_limit = _lower_limit(testcase, os.getpid())
    fillers = []
    for _ in range(holes):
        fillers.append(os.open(os.devnull, os.O_RDONLY))

    def restore() -> None:
        while fillers:
            os.close(fillers.pop())
        restore_limit()

    testcase.addCleanup(restore)
    return restore


def connections_to(port: int) -> int:
    """
    Connections this process has open to loopback port C{port}.
    """
    transports = set(reactor.getReaders()) | set(reactor.getWriters())
    return sum(1 for t in transports if isinstance(t, tcp.Client) and t.getPeer().port == port)


def one_response(data: bytes) -> tuple[bytes, dict[bytes, bytes], bytes, bytes]:
    """
    The first complete response (with Content-Length) in C{data}: status
    line, headers, body, and the bytes after it; status line C{b""} while
    it is incomplete.
    """
    status, headers, rest = split_response(data)
    named = {name.lower(): value for name, value in headers}
    length = int(named.get(b"content-length", b"-1"))
    if b"\r\n\r\n" not in data or length < 0 or len(rest) < length:
        return b"", {}, b"", data
    return status, named, rest[:length], rest[length:]


class Exchange:
    """
    Keep-alive GETs on one raw connection.
    """

    def __init__(self, client: RawClient, host: str) -> None:
        self.client = client
        self.host = host.encode()
        self.used = 0

    async def get(self, path: str) -> tuple[bytes, dict[bytes, bytes], bytes]:
        self.client.send(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), self.host))

        def complete(data: bytes) -> bool:
            return bool(one_response(data[self.used :])[0])

        data = await self.client.wait_for(complete)
        status, headers, body, rest = one_response(data[self.used :])
        self.used = len(data) - len(rest)
        return status, headers, body


class LocalErrnoTests(unittest.TestCase):
    """
    Which failures are local resource errors.
    """

    def test_connect_errors(self) -> None:
        """
        A failed C{socket()} (Twisted's L{error.ConnectBindError}) or
        C{connect()} with a local errno is one, also inside an agent's
        L{ResponseNeverReceived}; a refused or timed-out connection is not.
        """
        emfile = Failure(error.ConnectBindError(errno.EMFILE, "Too many open files"))
        self.assertEqual(local_errno(emfile), errno.EMFILE)
        for code in (errno.ENFILE, errno.ENOBUFS, errno.EADDRNOTAVAIL):
            failure = Failure(error.getConnectError((code, os.strerror(code))))
            self.assertEqual(local_errno(failure), code)
        self.assertEqual(local_errno(Failure(OSError(errno.ENOBUFS, "x"))), errno.ENOBUFS)
        self.assertEqual(local_errno(Failure(ResponseNeverReceived([emfile]))), errno.EMFILE)
        refused = error.getConnectError((errno.ECONNREFUSED, "refused"))
        for other in (refused, error.TimeoutError(), error.ConnectionLost(), ValueError()):
            self.assertIsNone(local_errno(Failure(other)))
        self.assertIsNone(local_errno(Failure(ResponseNeverReceived([Failure(refused)]))))
        self.assertIsNone(local_errno(Failure(error.DNSLookupError("no results"))))


class LocalErrorsTests(unittest.TestCase):
    """
    L{LocalErrors} logs a burst once, and says when it is over.
    """

    def test_once_per_burst(self) -> None:
        """
        Many errors close together are one line; once none has come for
        L{BURST_GAP}, one more line counts them; the next error starts a
        new burst.
        """
        logs = LogCapture.install(self)
        clock = task.Clock()
        errors = LocalErrors(clock)
        for _ in range(50):
            errors.failed(errno.EMFILE, "a request to http://127.0.0.1:1")
            clock.advance(0.1)
        (line,) = [m for m in logs.messages() if LOCAL_LINE in m]
        self.assertIn("EMFILE (Too many open files)", line)
        self.assertIn("a request to http://127.0.0.1:1", line)
        self.assertIn("LimitNOFILE=", line)
        clock.advance(BURST_GAP - 0.2)
        self.assertEqual([m for m in logs.messages() if "stopped" in m], [])
        clock.advance(0.2)
        (over,) = [m for m in logs.messages() if "stopped" in m]
        self.assertIn("50 connections", over)
        errors.failed(errno.EADDRNOTAVAIL, "a health check of http://127.0.0.1:1")
        self.assertEqual(len([m for m in logs.messages() if LOCAL_LINE in m]), 2)
        self.assertEqual(errors.count, 51)

    def test_stop_cancels(self) -> None:
        """
        Stopping the service leaves no timer behind.
        """
        clock = task.Clock()
        errors = LocalErrors(clock)
        errors.startService()
        errors.failed(errno.EMFILE, "x")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        errors.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


class OutOfDescriptorsTests(unittest.TestCase):
    """
    rrlb out of file descriptors, over real sockets.
    """

    async def test_daemon_requests(self) -> None:
        """
        A real rrlb process that can open no descriptor answers requests
        on an open connection with 503 and one log line, leaves the node
        healthy and in rotation with no error counted (as its C{/status}
        says meanwhile), and serves again as soon as it can open one, with
        no probe in between.
        """
        backend = await start_backend(self, "a")
        admin_port = int((await closed_port_url()).rsplit(":", 1)[1])
        daemon = await start_daemon(
            self,
            "--client-header-timeout",
            "60",
            "--nodes",
            backend.url,
            "--health-path",
            "/health",
            "--health-interval",
            "3600",
            "--fall",
            "1",
            "--max-idle-per-node",
            "0",
            "--admin",
            f"tcp:{admin_port}:interface={LOOPBACK}",
        )
        await daemon.wait_for_message("READY=1")
        admin = Exchange(await raw_connect(self, admin_port), f"{LOOPBACK}:{admin_port}")

        async def status() -> dict[str, Any]:
            line, _, body = await admin.get("/status")
            self.assertIn(b" 200 ", line)
            document: dict[str, Any] = json.loads(body)
            return document

        # The start-up probe has passed; no other comes during the test.
        for _ in range(100):
            if (await status())["nodes"][0]["last_check"] is not None:
                break
        client = Exchange(await raw_connect(self, daemon.port), "rrlb.test")
        self.assertEqual((await client.get("/"))[2], b"a")
        # The probe's and the request's connections to the node are closed
        # (--max-idle-per-node 0), on both sides: rrlb is idle.
        await wait_until(lambda: not backend.open_connections, what="node connections closed")
        for _ in range(100):
            if (await status())["process"]["upstream_connections"] == 0:
                break
        restore = await exhaust_daemon(self, daemon)
        for _ in range(3):
            line, headers, body = await client.get("/")
            self.assertTrue(line.startswith(b"HTTP/1.1 503 "), line)
            self.assertEqual(headers[b"retry-after"], b"1")
            self.assertIn(b"try again", body)
        await daemon.wait_for_output(LOCAL_LINE)
        (node,) = (await status())["nodes"]
        self.assertEqual(
            (node["healthy"], node["in_rotation"], node["consecutive_failures"], node["errors"]),
            (True, True, 0, 0),
        )
        self.assertEqual(daemon.output.count(LOCAL_LINE.encode()), 1, daemon.output)
        self.assertIn(b"EMFILE", daemon.output)
        restore()
        self.assertEqual((await client.get("/"))[2], b"a")
        self.assertEqual(backend.probes, 1)

    async def test_daemon_gives_idle_connections_back(self) -> None:
        """
        Out of descriptors, rrlb closes its idle node connections: the
        request that failed gets 503, the next one is served with a
        descriptor one of them gave back.
        """
        a = await start_backend(self, "a")
        b = await start_backend(self, "b")
        daemon = await start_daemon(
            self,
            "--client-header-timeout",
            "60",
            "--nodes",
            f"{a.url},{b.url}",
            "--health-path",
            "/health",
            "--health-interval",
            "3600",
        )
        await daemon.wait_for_message("READY=1")
        client = Exchange(await raw_connect(self, daemon.port), "rrlb.test")
        self.assertEqual((await client.get("/"))[2], b"a")
        # Only the connection to a is open now (pooled, idle); the probe
        # connections are gone, on rrlb's side too: a node closes its end
        # first, and a descriptor rrlb let go of after exhaust_daemon counted
        # would leave it a free one.
        await wait_until(lambda: a.probes and b.probes, what="both probes")
        nodes = (a.port_number, b.port_number)
        await wait_until(
            lambda: [
                p for p in connected_ports(daemon.transport.pid) if p in nodes
            ]
            == [a.port_number],
            what="rrlb's probe connections closed",
        )
        await exhaust_daemon(self, daemon)
        line, _, _ = await client.get("/")
        self.assertTrue(line.startswith(b"HTTP/1.1 503 "), line)
        self.assertEqual((await client.get("/"))[2], b"a")

    async def test_probe(self) -> None:
        """
        A health probe that cannot open a connection marks nothing: the
        node stays healthy with no failure counted, even with C{--fall 1},
        and the probe after it passes.
        """
        await self.probe_out_of_descriptors(LOOPBACK)

    async def test_probe_by_name(self) -> None:
        """
        The same for a node named by a host name, whose lookup is what
        fails first: as a failed lookup, or (when C{getaddrinfo} raises
        C{EMFILE} itself) a lookup Twisted never finishes, until the
        probe's timeout.
        """
        await self.probe_out_of_descriptors("localhost", "--health-timeout", "0.5")
        # Twisted's GAIResolver catches only socket.gaierror: its Deferred
        # fails unhandled, logged once collected. Wait for the lookup's
        # thread and collect it here, or it is logged in whichever test runs
        # when the collector gets to it.
        threads = reactor.getThreadPool()
        await wait_until(lambda: not threads.working, what="the lookup's thread")
        await reactor_turns()  # its result comes back through the reactor
        gc.collect()
        self.flushLoggedErrors(OSError)

    async def probe_out_of_descriptors(self, host: str, *args: str) -> None:
        logs = LogCapture.install(self)
        backend = await start_backend(self, "a")
        balancer = await start_balancer(
            self,
            [f"http://{host}:{backend.port_number}"],
            "--health-interval",
            "3600",
            "--fall",
            "1",
            *args,
        )
        checker = balancer.service.checker
        assert checker is not None
        (node,) = balancer.service.pool.nodes
        await wait_until(lambda: node.last_check is not None, what="the start-up probe")
        # Its connection gone too, both ends: no descriptor is freed while
        # none is free.
        await wait_until(
            lambda: not backend.open_connections and not connections_to(backend.port_number),
            what="the probe's connection",
        )
        results = dict(checker.results)
        restore = exhaust_here(self)
        try:
            # Bounded by the health timeout.
            await checker.probe(node)
        finally:
            restore()
        self.assertEqual((node.healthy, node.failures, node.last_error), (True, 0, None))
        self.assertEqual(checker.results, results)
        self.assertEqual(len([m for m in logs.messages() if LOCAL_LINE in m]), 1)
        await checker.probe(node)
        self.assertEqual(backend.probes, 2)
        self.assertTrue(node.healthy)
