"""
Tests for the settings that keep rrlb fast under load: the listen backlog
default and the delayed trimming of idle upstream connections over the cap.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial import unittest

from rrlb.listeners import DEFAULT_BACKLOG, with_default_backlog
from rrlb.nodeconn import UpstreamProtocol
from rrlb.upstream import IDLE_TRIM_DELAY, UpstreamPool
from tests.support import (
    BackendConnection,
    BulkProducer,
    RecordedRequest,
    WireCase,
    WireClient,
    get,
    reactor,
    wait_for,
)

MB = 1024 * 1024


class BacklogTests(unittest.TestCase):
    """
    TCP and TLS listeners get nginx's backlog unless they name one.
    """

    def test_added_to_tcp_and_ssl(self) -> None:
        """
        A tcp:, tcp6: or ssl: description without a backlog gets 511.
        """
        for description in ("tcp:8080", "tcp6:8080", "ssl:8443:privateKey=k.pem"):
            self.assertEqual(
                with_default_backlog(description),
                f"{description}:backlog={DEFAULT_BACKLOG}",
            )

    def test_kept_when_given(self) -> None:
        """
        A description that names a backlog keeps it.
        """
        self.assertEqual(with_default_backlog("tcp:80:backlog=7"), "tcp:80:backlog=7")

    def test_other_kinds_untouched(self) -> None:
        """
        Endpoint kinds without a backlog (systemd sockets, UNIX sockets
        handed over) are left as they are.
        """
        for description in ("systemd:domain=INET:index=0", "unix:/run/rrlb.sock"):
            self.assertEqual(with_default_backlog(description), description)


class FakeTransport:
    """
    Just enough of a transport for the pool's idle bookkeeping.
    """

    disconnecting = False

    def __init__(self) -> None:
        self.closed = False

    def loseConnection(self) -> None:
        self.closed = True


def connection(pool: UpstreamPool, key: str = "n") -> UpstreamProtocol:
    protocol = UpstreamProtocol(pool, key)
    protocol.transport = FakeTransport()
    protocol.connected = True
    return protocol


class IdleTrimTests(unittest.TestCase):
    """
    Idle connections beyond --max-idle-per-node are closed once they have
    stayed idle for IDLE_TRIM_DELAY, not at once, so bursts do not churn.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = UpstreamPool(self.clock, max_idle_per_node=2)

    def release(self, count: int) -> list[UpstreamProtocol]:
        protocols = [connection(self.pool) for _ in range(count)]
        for protocol in protocols:
            self.pool.release(protocol)
        return protocols

    def closed(self, protocols: list[UpstreamProtocol]) -> list[bool]:
        transports: list[Any] = [p.transport for p in protocols]
        return [t.closed for t in transports]

    def test_surplus_closed_after_delay(self) -> None:
        """
        Five connections released with a cap of two: all five stay idle at
        first; after the delay the three oldest are closed.
        """
        protocols = self.release(5)
        self.assertEqual(self.pool.idle_count("n"), 5)
        self.assertEqual(self.closed(protocols), [False] * 5)
        self.clock.advance(IDLE_TRIM_DELAY)
        self.assertEqual(self.pool.idle_count("n"), 2)
        self.assertEqual(self.closed(protocols), [True, True, True, False, False])

    def test_reused_connection_not_trimmed(self) -> None:
        """
        Connections taken from the pool and handed back after the trim was
        scheduled count as fresh: a trim closes only what stayed idle.
        """
        protocols = self.release(3)
        taken = []

        class Exchange:
            def connected(self, protocol: UpstreamProtocol, reused: bool) -> None:
                taken.append(protocol)

        class Node:
            key = "n"
            scheme = "http"

        for _ in range(3):
            self.pool.acquire(Node(), Exchange())
        self.clock.advance(IDLE_TRIM_DELAY / 2)
        for protocol in taken:
            self.pool.release(protocol)
        self.clock.advance(IDLE_TRIM_DELAY / 2)
        # The first trim found nothing that had stayed idle through it.
        self.assertEqual(self.closed(protocols), [False] * 3)
        self.assertEqual(self.pool.idle_count("n"), 3)
        self.clock.advance(IDLE_TRIM_DELAY)
        self.assertEqual(self.pool.idle_count("n"), 2)

    def test_under_cap_never_trimmed(self) -> None:
        """
        No trim is scheduled while a node's idle connections fit the cap.
        """
        protocols = self.release(2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10 * IDLE_TRIM_DELAY)
        self.assertEqual(self.closed(protocols), [False, False])

    def test_zero_cap_closes_at_once(self) -> None:
        """
        With a cap of 0 nothing is kept: a released connection is closed.
        """
        self.pool.max_idle_per_node = 0
        protocols = self.release(1)
        self.assertEqual(self.closed(protocols), [True])
        self.assertEqual(self.pool.idle_count("n"), 0)


class StalledClientTests(WireCase):
    """
    A client that reads nothing of a response for the send timeout is
    closed, so it cannot hold a node connection for ever.
    """

    async def test_stalled_client_closed(self) -> None:
        """
        With a send timeout of 0.5 s, a client that stops reading is cut off
        after it (not after the shorter --timeout, which measures the node),
        and its node connection is closed with nothing left in flight.
        """
        producers: list[BulkProducer] = []

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 * MB))
            producer = BulkProducer(conn.transport, b"s" * 65536, 64 * MB)
            producers.append(producer)
            producer.start()

        backend = await self.backend(handler)
        service, port = await self.balancer([backend.url], "--timeout", "0.2")
        service.traffic.upstream.send_timeout = 0.5
        client = await self.client(port)

        def on_data(c: WireClient) -> None:
            c.transport.pauseProducing()  # never reads again
            c.data.clear()

        client.on_data = on_data
        client.send(get(b"/"))
        await wait_for(lambda: producers and producers[0].paused, "the backend to be paused")
        started = reactor.seconds()
        await wait_for(lambda: not backend.open_connections, "the node connection to close")
        self.assertGreaterEqual(reactor.seconds() - started, 0.3)
        self.assertEqual(service.pool.nodes[0].in_flight, 0)
        client.on_data = lambda c: c.data.clear()
        client.transport.resumeProducing()
        await wait_for(lambda: client.closed, "the client to be closed")

    async def test_stalled_client_cut_off(self) -> None:
        """
        A client that never reads again is cut off after the send timeout
        and then the close timeout, not kept open for as long as it reads
        nothing with what rrlb had written for it still buffered.
        """
        producers: list[BulkProducer] = []

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 * MB))
            producer = BulkProducer(conn.transport, b"s" * 65536, 64 * MB)
            producers.append(producer)
            producer.start()

        backend = await self.backend(handler)
        service, port = await self.balancer([backend.url], "--timeout", "0.2")
        service.traffic.upstream.send_timeout = 0.5
        service.traffic.site.close_timeout = 0.5
        client = await self.client(port)

        def on_data(c: WireClient) -> None:
            c.transport.pauseProducing()  # never reads again
            c.data.clear()

        client.on_data = on_data
        client.send(get(b"/"))
        await wait_for(lambda: producers and producers[0].paused, "the backend to be paused")
        await wait_for(lambda: not service.traffic.site.channels, "rrlb to cut the client off")
        self.assertFalse(backend.open_connections)


class ConnectionCloseTests(WireCase):
    """
    A client's C{Connection: close} is honoured whatever other options the
    header names (Twisted's own check splits it on spaces only).
    """

    async def test_close_among_other_options(self) -> None:
        """
        C{Connection: close, X-Hop}: the response says C{Connection: close},
        the connection is closed after it, and X-Hop is not forwarded.
        """
        seen: list[RecordedRequest] = []

        def handler(request: RecordedRequest, conn: BackendConnection) -> bytes:
            seen.append(request)
            return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url])
        for value in (b"close, X-Hop", b"close,X-Hop", b"X-Hop, close"):
            client = await self.client(port)
            client.send(get(b"/", b"h", b"Connection: " + value, b"X-Hop: 1"))
            result = await client.response()
            assert result is not None
            self.assertEqual(result.code, 200)
            self.assertEqual(result.header(b"Connection"), [b"close"])
            await wait_for(lambda c=client: c.closed, "rrlb to close the connection")
        self.assertEqual([r.header(b"X-Hop") for r in seen], [[], [], []])
