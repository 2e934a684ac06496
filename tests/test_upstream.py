"""
Behaviour the speed work on the upstream side could break: connection reuse,
stale pooled connections, the idle cap, backpressure from a slow reader, and
clients that leave. Real loopback sockets, raw backends and clients from
L{tests.support}.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from typing import Any

from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from rrlb.config import parse_node
from rrlb.nodeconn import UpstreamProtocol
from rrlb.pool import Node
from rrlb.tap import Options
from rrlb.upstream import UpstreamPool
from tests.support import (
    LOOPBACK,
    BackendConnection,
    BulkProducer,
    RecordedRequest,
    WireCase,
    WireClient,
    client_buffered,
    clock_on,
    get,
    post,
    reactor,
    reactor_turns,
    read_then_pause,
    reads,
    response,
    rrlb_end,
    stuck,
    wait_for,
)

MB = 1024 * 1024
# What rrlb may hold in user space for one slow client while its node is
# paused: Twisted's 64 KiB high-water mark plus a few reads in flight.
BUFFER_BOUND = 1 * MB


class ConnectionReuseTests(WireCase):
    """
    Keep-alive connections to nodes are reused, and replaced when stale.
    """

    async def test_one_connection_for_many_requests(self) -> None:
        """
        Many requests, from one keep-alive client connection and from many
        short ones, reach the node over a single connection.
        """
        backend = await self.backend()
        service, port = await self.balancer([backend.url])
        client = await self.client(port)
        for i in range(20):
            client.send(get(b"/keep/%d" % i))
            result = await client.response()
            assert result is not None
            self.assertEqual(result.code, 200)
        for i in range(20):
            result = await self.exchange(port, get(b"/new/%d" % i))
            assert result is not None
            self.assertEqual(result.code, 200)
        self.assertEqual(len(backend.requests), 40)
        self.assertEqual(len(backend.connections), 1)
        self.assertEqual(service.traffic.upstream.new_connections, 1)

    async def test_reuse_after_streamed_request_body(self) -> None:
        """
        A connection that carried a large request body (streamed from the
        spool file) is reused for the next request.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> bytes:
            return response(body=hashlib.sha256(request.body).hexdigest().encode())

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url])
        body = os.urandom(MB)
        result = await self.exchange(port, post(b"/big", body))
        assert result is not None
        self.assertEqual(result.body, hashlib.sha256(body).hexdigest().encode())
        result = await self.exchange(port, get(b"/after"))
        assert result is not None
        self.assertEqual(result.code, 200)
        self.assertEqual(len(backend.connections), 1)

    async def test_node_closes_idle_connection(self) -> None:
        """
        A pooled connection the node closes between requests is dropped
        from the pool and replaced; the client sees no error.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> bytes:
            # Close after answering, without saying so (a keep-alive timeout).
            reactor.callLater(0, conn.transport.loseConnection)
            return response()

        backend = await self.backend(handler)
        service, port = await self.balancer([backend.url])
        key = service.pool.nodes[0].key
        result = await self.exchange(port, get(b"/one"))
        assert result is not None
        self.assertEqual(result.code, 200)
        await wait_for(lambda: service.traffic.upstream.idle_count(key) == 0, "the pool to drop it")
        result = await self.exchange(port, post(b"/two", b"data"))
        assert result is not None
        self.assertEqual(result.code, 200)
        self.assertEqual(len(backend.connections), 2)
        self.assertTrue(service.pool.nodes[0].healthy)
        self.assertEqual(service.pool.nodes[0].failures, 0)

    async def test_closed_idle_connection_not_used(self) -> None:
        """
        A node that closes a keep-alive connection right after answering:
        the next request, a POST, goes out once on a fresh connection (the
        closed one is never written to), with no error and no failed check.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> Any:
            conn.transport.write(response(body=request.target))
            conn.transport.loseConnection()
            return None

        backend = await self.backend(handler)
        service, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/first"))
        first = await client.response()
        client.send(post(b"/second", b"payload"))
        second = await client.response()
        assert first is not None and second is not None
        self.assertEqual((second.code, second.body), (200, b"/second"))
        self.assertEqual(len(backend.connections), 2)
        targets = [r.target for c in backend.connections for r in c.requests]
        self.assertEqual(targets, [b"/first", b"/second"])
        node = service.pool.nodes[0]
        self.assertEqual((node.failures, node.errors, node.healthy), (0, 0, True))

    async def test_reused_connection_dropped_after_request(self) -> None:
        """
        A node that takes a request on a pooled connection and drops it with
        no answer (a keep-alive close racing the request): a GET is sent
        again on a fresh connection and answered; a POST is not sent again
        (the node may have acted on it) and gets 502, and the node is not
        counted as failing for it.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> Any:
            if len(conn.requests) > 1:
                conn.transport.abortConnection()
                return None
            return response(body=request.target)

        backend = await self.backend(handler)
        service, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/first"))
        await client.response()
        client.send(get(b"/again"))
        again = await client.response()
        assert again is not None
        self.assertEqual((again.code, again.body), (200, b"/again"))
        client.send(post(b"/charge", b"payload"))
        charged = await client.response()
        assert charged is not None
        self.assertEqual(charged.code, 502)
        targets = [r.target for c in backend.connections for r in c.requests]
        self.assertEqual(targets.count(b"/charge"), 1)
        self.assertEqual(targets.count(b"/again"), 2)
        node = service.pool.nodes[0]
        self.assertEqual((node.failures, node.healthy), (0, True))

    async def test_idle_cap(self) -> None:
        """
        With --max-idle-per-node 2, five concurrent requests open five
        connections, and only two stay open once they are answered.
        """
        held: list[BackendConnection] = []

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            held.append(conn)
            if len(held) == 5:
                for c in held:
                    c.transport.write(response())

        backend = await self.backend(handler)
        service, port = await self.balancer([backend.url], "--max-idle-per-node", "2")
        clients = [await self.client(port) for _ in range(5)]
        for client in clients:
            client.send(get(b"/"))
        for client in clients:
            result = await client.response()
            assert result is not None
            self.assertEqual(result.code, 200)
        key = service.pool.nodes[0].key
        await wait_for(lambda: len(backend.open_connections) == 2, "three connections to close")
        self.assertEqual(service.traffic.upstream.idle_count(key), 2)
        self.assertEqual(service.traffic.upstream.connection_count, 2)

    async def test_no_idle_connections(self) -> None:
        """
        With --max-idle-per-node 0 no connection is kept: every request
        gets a new one, closed after its response.
        """
        backend = await self.backend()
        service, port = await self.balancer([backend.url], "--max-idle-per-node", "0")
        for _ in range(3):
            result = await self.exchange(port, get(b"/"))
            assert result is not None
            self.assertEqual(result.code, 200)
        self.assertEqual(len(backend.connections), 3)
        await wait_for(lambda: not backend.open_connections, "every connection to close")
        self.assertEqual(service.traffic.upstream.connection_count, 0)


class IdleCapSettingTests(unittest.TestCase):
    """
    The idle cap's option, YAML key and default.
    """

    def options(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(["--nodes", "http://127.0.0.1:1", *argv])
        return options

    def yaml(self, text: str) -> str:
        fd, path = tempfile.mkstemp(suffix=".yaml")
        self.addCleanup(os.remove, path)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path

    def test_default(self) -> None:
        """
        Without the option the cap is 32.
        """
        self.assertEqual(self.options().config.max_idle_per_node, 32)

    def test_option(self) -> None:
        """
        --max-idle-per-node sets it.
        """
        self.assertEqual(self.options("--max-idle-per-node", "7").config.max_idle_per_node, 7)

    def test_yaml_and_override(self) -> None:
        """
        YAML C{max_idle_per_node} sets it, and the command line wins.
        """
        path = self.yaml("max_idle_per_node: 5\n")
        self.assertEqual(self.options("--config", path).config.max_idle_per_node, 5)
        both = self.options("--config", path, "--max-idle-per-node", "9")
        self.assertEqual(both.config.max_idle_per_node, 9)

    def test_bad_value(self) -> None:
        """
        A negative or non-numeric cap is refused with a message naming it.
        """
        from twisted.python import usage

        for bad in ("-1", "many"):
            e = self.assertRaises(usage.UsageError, self.options, "--max-idle-per-node", bad)
            self.assertIn("max-idle-per-node", str(e))


class BackpressureTests(WireCase):
    """
    A slow reader slows the node down instead of filling rrlb's memory.
    """

    async def test_slow_reader_pauses_upstream(self) -> None:
        """
        A client that stops reading a 64 MB response: rrlb stops reading
        from the node (the backend's writes get blocked and stay blocked),
        rrlb holds less than BUFFER_BOUND bytes for it; once the client
        reads again the whole body arrives intact, and the connection to the
        node is reused afterwards.
        """
        total = 64 * MB
        block = os.urandom(64 * 1024)
        expected = hashlib.sha256()
        for _ in range(total // len(block)):
            expected.update(block)
        producers: list[BulkProducer] = []

        def handler(request: RecordedRequest, conn: BackendConnection) -> Any:
            if request.target != b"/big":
                return response(body=b"next")
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
            producer = BulkProducer(conn.transport, block, total)
            producers.append(producer)
            producer.start()
            return None

        backend = await self.backend(handler)
        service, port = await self.balancer([backend.url], "--timeout", "5")
        client = await self.client(port)
        got = {"head": b"", "bytes": 0}
        digest = hashlib.sha256()

        def on_data(c: WireClient) -> None:
            data = bytes(c.data)
            c.data.clear()
            if not got["head"]:
                end = data.find(b"\r\n\r\n")
                got["head"], data = data[: end + 4], data[end + 4 :]
                c.transport.pauseProducing()  # stop reading: a slow reader
            got["bytes"] += len(data)  # type: ignore[operator]
            digest.update(data)

        client.on_data = on_data
        client.send(get(b"/big"))
        await wait_for(lambda: producers and producers[0].paused, "the backend to be paused")
        producer = producers[0]
        (node,) = backend.connections
        rrlb_node = rrlb_end(service, node.transport)
        rrlb_client = rrlb_end(service, client.transport)
        # The backend must stay blocked, not just pause once: the client
        # reads nothing, rrlb's writes to it are stuck, rrlb reads nothing
        # from the node, whose writes are stuck.
        await wait_for(
            lambda: stuck(rrlb_client)
            and not reads(rrlb_node)
            and stuck(node.transport)
            and producer.paused,
            "every buffer on the way to fill",
        )
        sent = producer.sent
        self.assertLess(producer.sent, total)
        await reactor_turns()
        self.assertTrue(producer.paused)
        self.assertEqual(producer.sent, sent)
        # rrlb is not reading from the node...
        upstream = [p for p in service.traffic.upstream._connections]
        self.assertEqual(len(upstream), 1)
        self.assertNotIn(upstream[0].transport, reactor.getReaders())
        # ...and holds little for the client.
        self.assertLess(client_buffered(self.channels[0]), BUFFER_BOUND)

        client.transport.resumeProducing()
        await wait_for(lambda: got["bytes"] == total, "the whole body")
        self.assertIn(b"Content-Length: %d" % total, got["head"])
        self.assertEqual(digest.hexdigest(), expected.hexdigest())
        self.assertGreater(producer.pauses, 0)

        # The same node connection serves the next request (it must not be
        # left paused by the backpressure above).
        client.on_data = None
        client.data.clear()
        client._parsed = 0
        client.send(get(b"/next"))
        result = await client.response()
        assert result is not None
        self.assertEqual((result.code, result.body), (200, b"next"))
        self.assertEqual(len(backend.connections), 1)

    async def test_backpressure_on_last_chunk(self) -> None:
        """
        A response whose last bytes arrive while the client's socket is full
        (so the node connection is paused as it completes): the connection
        goes back to the pool reading, and the next request on it works.
        """
        body = os.urandom(512 * 1024)

        def handler(request: RecordedRequest, conn: BackendConnection) -> bytes:
            return response(body=body if request.target == b"/big" else b"next")

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url], "--timeout", "3")
        client = await self.client(port)
        await wait_for(lambda: self.channels, "rrlb to accept the client")
        # Any unsent byte now counts as a full client socket: every body
        # write, the last one included, pauses the node connection.
        getattr(self.channels[0], "_channel", self.channels[0]).transport.bufferSize = 1
        client.send(get(b"/big"))
        result = await client.response()
        assert result is not None
        self.assertEqual(result.body, body)
        client.send(get(b"/next"))
        started = reactor.seconds()
        result = await client.response()
        assert result is not None
        self.assertEqual((result.code, result.body), (200, b"next"))
        self.assertLess(reactor.seconds() - started, 1)
        self.assertEqual(len(backend.connections), 1)

    async def test_slow_reader_longer_than_timeout(self) -> None:
        """
        A client that stops reading for longer than --timeout is not cut
        off for it: the node is not idle, rrlb paused it.
        """
        total = 8 * MB
        block = b"z" * 65536
        producers: list[BulkProducer] = []

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
            producer = BulkProducer(conn.transport, block, total)
            producers.append(producer)
            producer.start()

        backend = await self.backend(handler)
        service, port = await self.balancer([backend.url], "--timeout", "0.3")
        clock = clock_on(service)
        client = await self.client(port)
        count = read_then_pause(client)
        client.send(get(b"/"))
        # The client has stopped reading (on its first bytes): resumed
        # before that, it would stop for good on them.
        await wait_for(lambda: count["n"], "the client's first bytes")
        await wait_for(lambda: producers and producers[0].paused, "the backend to be paused")
        (node,) = backend.connections
        rrlb_node = rrlb_end(service, node.transport)
        await wait_for(lambda: not reads(rrlb_node), "rrlb to pause the node")
        # Over three times --timeout, in the response timeout sweep's steps.
        step = service.traffic.upstream.granularity
        clock.pump([step] * round(1.0 / step))
        client.transport.resumeProducing()
        await wait_for(lambda: client.closed or producers[0].stopped, "the end of the body")
        await wait_for(
            lambda: client.closed or count["n"] >= total, "the body to arrive", timeout=5
        )
        self.assertFalse(client.closed)
        self.assertGreaterEqual(count["n"], total)

    async def test_timeout_closes_paused_client(self) -> None:
        """
        When the response timeout ends an exchange mid-body while the client
        connection is paused by backpressure, the client's connection is
        still closed once it has read what was sent (not left hanging with
        half a response).
        """
        producers: list[BulkProducer] = []

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 * MB))
            producer = BulkProducer(conn.transport, b"t" * 65536, 64 * MB)
            producers.append(producer)
            producer.start()

        backend = await self.backend(handler)
        service, port = await self.balancer([backend.url])
        client = await self.client(port)
        received = read_then_pause(client)
        client.send(get(b"/"))
        await wait_for(lambda: producers and producers[0].paused, "the backend to be paused")
        # Mid-body and held back by the client: it has the start of the
        # response (and reads no more), and rrlb reads no more from the node.
        # (The node's producer pauses on its own first writes: not enough.)
        (node,) = backend.connections
        rrlb_node = rrlb_end(service, node.transport)
        await wait_for(
            lambda: received["n"] and not reads(rrlb_node), "rrlb to hold the node back"
        )
        (upstream,) = service.traffic.upstream._connections
        # What the timeout sweep does to an exchange that made no progress.
        upstream.exchange.timed_out()
        client.transport.resumeProducing()
        await wait_for(lambda: client.closed, "rrlb to close the client connection")
        self.assertLess(received["n"], 64 * MB)
        await wait_for(lambda: backend.connections[0].closed, "the node connection to close")

    async def test_client_leaves_while_paused(self) -> None:
        """
        A slow reader that disconnects mid-body releases the upstream
        connection: the node sees it closed and nothing stays in flight.
        """
        producers: list[BulkProducer] = []

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 * MB))
            producer = BulkProducer(conn.transport, b"y" * 65536, 64 * MB)
            producers.append(producer)
            producer.start()

        backend = await self.backend(handler)
        service, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.on_data = lambda c: c.transport.pauseProducing()
        client.send(get(b"/"))
        await wait_for(lambda: producers and producers[0].paused, "the backend to be paused")
        client.transport.abortConnection()
        await wait_for(lambda: backend.connections[0].closed, "the node connection to close")
        upstream = service.traffic.upstream
        await wait_for(lambda: upstream.connection_count == 0, "no upstream connection")
        node = service.pool.nodes[0]
        self.assertEqual(node.in_flight, 0)
        self.assertEqual(service.traffic.upstream.idle_count(node.key), 0)


class _Exchange:
    """
    The exchange side of L{UpstreamProtocol}, recording what it is told.
    """

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.protocol: Any = None
        self.deadline = None
        self.active = False

    def connected(self, protocol: Any, reused: bool) -> None:
        self.protocol = protocol
        self.events.append(("connected", reused))

    def connect_failed(self, reason: Failure) -> None:
        self.events.append(("connect_failed", reason))

    def response_head(self, code: int, reason: bytes, headers: Any, has_body: bool) -> None:
        self.events.append(("head", code))

    def response_body(self, data: bytes) -> None:
        # What the proxy does when the client's socket is full.
        self.protocol.pause_reading()
        self.events.append(("body", data))

    def response_done(self) -> None:
        self.events.append(("done",))

    def upstream_lost(self, reason: Failure, got_response: bool) -> None:
        self.events.append(("lost", got_response))

    def timed_out(self) -> None:
        self.events.append(("timed_out",))


def make_node(url: str = "http://127.0.0.1:8080") -> Node:
    return Node(parse_node(url))


class UpstreamUnitTests(unittest.TestCase):
    """
    L{UpstreamPool} and L{UpstreamProtocol} against Twisted's test doubles.
    """

    def test_connect_timeout_used(self) -> None:
        """
        New connections are made with the pool's connect timeout.
        """
        memory = MemoryReactor()
        pool = UpstreamPool(memory, connect_timeout=1.5)
        pool.acquire(make_node(), _Exchange())
        host, port, _, timeout, _ = memory.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 8080, 1.5))

    def test_connect_timeout_option(self) -> None:
        """
        --connect-timeout reaches the upstream pool; the default is 5.
        """
        from rrlb.tap import makeService

        for argv, expected in (([], 5.0), (["--connect-timeout", "0.25"], 0.25)):
            options = Options()
            options.parseOptions(["--nodes", "http://127.0.0.1:1", *argv])
            self.assertEqual(makeService(options).traffic.upstream.connect_timeout, expected)

    def test_released_connection_is_reading(self) -> None:
        """
        A connection whose response completes while backpressure has paused
        it goes back to the pool reading again, so the next request on it
        gets its response.
        """
        memory = MemoryReactor()
        pool = UpstreamPool(memory)
        node = make_node()
        first = _Exchange()
        pool.acquire(node, first)
        factory = memory.tcpClients[0][2]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.send(first, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None, False)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody")
        self.assertEqual(first.events[-1], ("done",))
        self.assertEqual(pool.idle_count(node.key), 1)
        self.assertEqual(transport.producerState, "producing")

    def test_close_waits_for_connections(self) -> None:
        """
        L{UpstreamPool.close} aborts every connection and fires once all
        are gone.
        """
        memory = MemoryReactor()
        pool = UpstreamPool(memory)
        exchange = _Exchange()
        pool.acquire(make_node(), exchange)
        protocol: UpstreamProtocol = memory.tcpClients[0][2].buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        d = pool.close()
        self.assertNoResult(d)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionError()))
        self.successResultOf(d)


class ConnectTimeoutTests(WireCase):
    """
    --connect-timeout over a real socket that never completes a handshake.
    """

    def hanging_url(self) -> str:
        """
        A loopback port whose accept queue is full, so new connections hang
        (the kernel drops their SYNs) instead of being refused.
        """
        listener = socket.socket()
        listener.bind((LOOPBACK, 0))
        listener.listen(0)
        self.addCleanup(listener.close)
        port = listener.getsockname()[1]
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex((LOOPBACK, port))
            self.addCleanup(filler.close)
        probe = socket.socket()
        probe.settimeout(0.2)
        self.addCleanup(probe.close)
        try:
            probe.connect((LOOPBACK, port))
        except (socket.timeout, BlockingIOError):
            return f"http://{LOOPBACK}:{port}"
        except OSError:
            pass
        raise unittest.SkipTest("this kernel does not leave connections to a full queue hanging")

    async def test_connect_timeout_then_retry(self) -> None:
        """
        A node that does not accept within --connect-timeout counts as a
        connect failure: a GET moves on to the next node in time.
        """
        hanging = self.hanging_url()
        backend = await self.backend(lambda request, conn: response(body=b"live"))
        service, port = await self.balancer([hanging, backend.url], "--connect-timeout", "0.3")
        started = reactor.seconds()
        result = await self.exchange(port, get(b"/"))
        elapsed = reactor.seconds() - started
        assert result is not None
        self.assertEqual((result.code, result.body), (200, b"live"))
        self.assertGreaterEqual(elapsed, 0.25)
        self.assertLess(elapsed, 3)
        self.assertEqual(service.pool.nodes[0].failures, 1)

    async def test_connect_timeout_post(self) -> None:
        """
        A POST to a node that does not accept in time gets a plain-text 502.
        """
        hanging = self.hanging_url()
        backend = await self.backend()
        _, port = await self.balancer([hanging, backend.url], "--connect-timeout", "0.3")
        result = await self.exchange(port, post(b"/p", b"x"))
        self.assertPlainTextError(result, 502)
        self.assertEqual(backend.requests, [])
