"""
Tests for the drain at shutdown: L{rrlb.drain.Drain} on a L{task.Clock},
L{rrlb.service.ControlService.stopService} over real loopback sockets, and a
real rrlb process stopped with SIGTERM and SIGINT.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, error, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest
from twisted.web.client import ResponseFailed

from rrlb.config import build_config
from rrlb.drain import DRAIN_POLL, Drain
from rrlb.tap import Options, compose
from tests.support import (
    LOOPBACK,
    HTTPClient,
    raw_connect,
    reactor,
    start_backend,
    start_balancer,
    start_daemon,
    wait_until,
)


class FakeTransport:
    def __init__(self, channel: FakeChannel) -> None:
        self.channel = channel
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class FakeChannel:
    """
    A client connection as L{Drain} sees it.
    """

    def __init__(self, site: FakeSite, busy: bool) -> None:
        self.site = site
        self.busy = busy
        self.asked = 0
        self.transport = FakeTransport(self)
        site.channels.add(self)

    def close_when_idle(self) -> None:
        self.asked += 1
        if not self.busy:
            self.lost()

    def lost(self) -> None:
        self.site.channels.discard(self)
        if self.site.on_channel_lost is not None:
            self.site.on_channel_lost()


class FakeSite:
    def __init__(self) -> None:
        self.channels: set[Any] = set()
        self.on_channel_lost: Any = None


class DrainTests(unittest.TestCase):
    """
    L{Drain} closes idle connections, waits for busy ones and gives up at
    its deadline.
    """

    def test_nothing_open(self) -> None:
        """
        With no connection open the drain is over at once.
        """
        clock = task.Clock()
        d = Drain(clock, FakeSite(), 30).start()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_idle_closed(self) -> None:
        """
        Idle connections are closed at once and the drain ends right after.
        """
        clock, site = task.Clock(), FakeSite()
        channels = [FakeChannel(site, busy=False) for _ in range(3)]
        d = Drain(clock, site, 30).start()
        self.assertEqual([c.asked for c in channels], [1, 1, 1])
        self.assertEqual(self.successResultOf(d), 0)
        self.assertIsNone(site.on_channel_lost)

    def test_waits_for_busy(self) -> None:
        """
        A busy connection is asked again every poll until it is gone; the
        drain ends on the next turn after it goes, not at the deadline.
        """
        clock, site = task.Clock(), FakeSite()
        busy = FakeChannel(site, busy=True)
        d = Drain(clock, site, 30).start()
        clock.pump([DRAIN_POLL] * 10)
        self.assertNoResult(d)
        self.assertEqual(busy.asked, 11)
        busy.lost()
        self.assertNoResult(d)
        clock.advance(0)
        self.assertEqual(self.successResultOf(d), 0)
        self.assertFalse(busy.transport.aborted)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_deadline(self) -> None:
        """
        At the deadline the connections still open are aborted and counted.
        """
        clock, site = task.Clock(), FakeSite()
        busy = [FakeChannel(site, busy=True) for _ in range(2)]
        d = Drain(clock, site, 1.0).start()
        clock.pump([DRAIN_POLL] * 19)
        self.assertNoResult(d)
        clock.pump([DRAIN_POLL] * 2)
        self.assertTrue(all(c.transport.aborted for c in busy))
        for c in busy:
            c.lost()
        clock.advance(0)
        self.assertEqual(self.successResultOf(d), 2)
        self.assertEqual(clock.getDelayedCalls(), [])


class RefusingCheck(Protocol):
    pass


async def refused(port: int) -> bool:
    """
    Whether a new connection to C{port} on loopback is refused.
    """
    endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, port, timeout=2)
    try:
        protocol = await endpoint.connect(Factory.forProtocol(RefusingCheck))
    except error.ConnectionRefusedError:
        return True
    protocol.transport.abortConnection()
    return False


async def wait_refused(port: int) -> None:
    deadline = reactor.seconds() + 5
    while not await refused(port):
        if reactor.seconds() > deadline:
            raise AssertionError(f"port {port} still accepts connections")
        d: defer.Deferred[None] = defer.Deferred()
        reactor.callLater(0.02, d.callback, None)
        await d


class BalancerDrainTests(unittest.TestCase):
    """
    Stopping the balancer stops accepting, lets in-flight requests finish
    and closes idle keep-alive connections.
    """

    async def test_in_flight_request_completes(self) -> None:
        """
        A request in flight when the balancer stops gets its whole response;
        new connections are refused meanwhile; the stop completes after it.
        """
        backend = await start_backend(self, "a")
        backend.delay = 0.5
        balancer = await start_balancer(self, [backend.url], "--health-path", "/health")
        client = HTTPClient()
        self.addCleanup(client.close)
        request = defer.Deferred.fromCoroutine(client.request("GET", balancer.url + "/slow"))
        await wait_until(lambda: backend.requests, what="the request at the backend")
        stopped = balancer.service.stopService()
        await wait_refused(balancer.port)
        self.assertNoResult(stopped)
        reply = await request
        self.assertEqual((reply.code, reply.body), (200, b"a"))
        await stopped
        self.assertFalse(balancer.service.running)

    async def test_busy_keep_alive_closed_after_response(self) -> None:
        """
        A keep-alive connection busy at the stop gets its response with
        C{Connection: close}, and is closed after it.
        """
        backend = await start_backend(self, "a")
        backend.delay = 0.3
        balancer = await start_balancer(self, [backend.url], "--health-path", "/health")
        client = await raw_connect(self, balancer.port)
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_until(lambda: backend.requests, what="the request at the backend")
        stopped = balancer.service.stopService()
        received = await client.closed
        await stopped
        head, _, body = received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), received)
        self.assertIn(b"\r\nConnection: close", head)
        # The backend streams its answer, so it comes chunked; all of it.
        self.assertEqual(body, b"1\r\na\r\n0\r\n\r\n")

    async def test_idle_keep_alive_closed_at_once(self) -> None:
        """
        An idle keep-alive connection is closed at once, so stopping does not
        wait for it.
        """
        backend = await start_backend(self, "a")
        balancer = await start_balancer(
            self, [backend.url], "--health-path", "/health", "--drain-timeout", "20"
        )
        client = await raw_connect(self, balancer.port)
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await client.wait_for(lambda data: data.endswith(b"\r\n\r\na"))
        started = reactor.seconds()
        await balancer.service.stopService()
        await client.closed
        self.assertLess(reactor.seconds() - started, 2.0)

    async def test_drain_timeout(self) -> None:
        """
        A request still in flight after C{--drain-timeout} is cut off and the
        stop completes.
        """
        backend = await start_backend(self, "a")
        backend.delay = 20
        balancer = await start_balancer(
            self, [backend.url], "--health-path", "/health", "--drain-timeout", "0.3"
        )
        client = HTTPClient()
        self.addCleanup(client.close)
        request = defer.Deferred.fromCoroutine(client.request("GET", balancer.url + "/"))
        await wait_until(lambda: backend.requests, what="the request at the backend")
        started = reactor.seconds()
        await balancer.service.stopService()
        self.assertLess(reactor.seconds() - started, 3.0)
        await self.assertFailure(request, ResponseFailed)

    async def test_drain_timeout_setting(self) -> None:
        """
        C{--drain-timeout} and the YAML C{drain_timeout} reach the running
        configuration, the command line winning; the default is 30 seconds.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("nodes: [http://127.0.0.1:1]\ndrain_timeout: 7\n")

        def parse(*args: str) -> float:
            options = Options()
            options.parseOptions(list(args))
            return float(options.config.drain_timeout)

        self.assertEqual(parse("--config", path), 7.0)
        self.assertEqual(parse("--config", path, "--drain-timeout", "2.5"), 2.5)
        self.assertEqual(parse("--nodes", "http://127.0.0.1:1"), 30.0)
        service = compose(
            build_config(path, {"listen": (f"tcp:0:interface={LOOPBACK}",)}), reactor
        )
        self.assertEqual(service.config.drain_timeout, 7.0)

    async def test_second_stop_waits(self) -> None:
        """
        Stopping again while a drain runs (SIGTERM, then SIGINT) waits for the
        same drain instead of starting another.
        """
        backend = await start_backend(self, "a")
        backend.delay = 0.3
        balancer = await start_balancer(self, [backend.url], "--health-path", "/health")
        client = HTTPClient()
        self.addCleanup(client.close)
        request = defer.Deferred.fromCoroutine(client.request("GET", balancer.url + "/"))
        await wait_until(lambda: backend.requests, what="the request at the backend")
        first = balancer.service.stopService()
        second = balancer.service.stopService()
        self.assertNoResult(second)
        reply = await request
        self.assertEqual(reply.code, 200)
        await first
        await second


class ProcessDrainTests(unittest.TestCase):
    """
    A real rrlb process drains on SIGTERM and SIGINT and exits 0.
    """

    async def test_sigterm_lets_slow_request_finish(self) -> None:
        """
        After SIGTERM rrlb refuses new connections, finishes the slow request
        in flight, and exits with code 0.
        """
        backend = await start_backend(self, "slow")
        backend.delay = 1.0
        daemon = await start_daemon(
            self, "--nodes", backend.url, "--health-path", "/health", "--drain-timeout", "10"
        )
        await daemon.wait_for_message("READY=1")
        client = HTTPClient()
        self.addCleanup(client.close)
        request = defer.Deferred.fromCoroutine(client.request("GET", daemon.url + "/slow"))
        await wait_until(lambda: backend.requests, what="the request at the backend")
        daemon.signal("TERM")
        await daemon.wait_for_message("STOPPING=1")
        await wait_refused(daemon.port)
        self.assertTrue(daemon.running)
        reply = await request
        self.assertEqual((reply.code, reply.body), (200, b"slow"))
        self.assertEqual(await daemon.exit_code(), 0)
        self.assertIn(b"drained", daemon.output)

    async def test_second_signal_during_drain(self) -> None:
        """
        A second SIGTERM, then a SIGINT, during the drain are logged and do not
        cut it short or log a traceback.
        """
        backend = await start_backend(self, "slow")
        backend.delay = 1.0
        daemon = await start_daemon(self, "--nodes", backend.url, "--health-path", "/health")
        await daemon.wait_for_message("READY=1")
        client = HTTPClient()
        self.addCleanup(client.close)
        request = defer.Deferred.fromCoroutine(client.request("GET", daemon.url + "/"))
        await wait_until(lambda: backend.requests, what="the request at the backend")
        daemon.signal("TERM")
        await daemon.wait_for_message("STOPPING=1")
        daemon.signal("TERM")
        await daemon.wait_for_output("received SIGTERM while draining")
        daemon.signal("INT")
        await daemon.wait_for_output("received SIGINT while draining")
        reply = await request
        self.assertEqual((reply.code, reply.body), (200, b"slow"))
        self.assertEqual(await daemon.exit_code(), 0)
        self.assertNotIn(b"Traceback", daemon.output)

    async def test_sigint_exits_zero(self) -> None:
        """
        SIGINT stops rrlb the same way, with exit code 0.
        """
        backend = await start_backend(self, "a")
        daemon = await start_daemon(self, "--nodes", backend.url, "--health-path", "/health")
        await daemon.wait_for_message("READY=1")
        daemon.signal("INT")
        self.assertEqual(await daemon.exit_code(), 0)
        self.assertIn(b"STOPPING=1", daemon.messages)
