"""
Streamed request bodies (issue 12) over real loopback sockets: the request
head reaches the node before the body is complete, the body follows as it
arrives with backpressure both ways, the first 64 KiB are kept for a retry
and no more, and Expect: 100-continue, --max-body-size,
--client-body-timeout and the queue keep working on a body in motion.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Optional

from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest

from rrlb.body import CONTINUE, KEEP, NODE_FULL, WAITING, StreamedBody
from tests.support import (
    LOOPBACK,
    BackendConnection,
    BodySink,
    BulkProducer,
    Harness,
    RecordedRequest,
    Swallow,
    WireCase,
    chunked_body,
    clock_on,
    decode_chunked,
    reactor,
    reactor_turns,
    reads,
    response,
    rrlb_end,
    stuck,
    values,
    wait_for,
)


class StreamConnection(Protocol):
    """
    A node connection that keeps every byte as it arrives, so a test can
    see a request head before its body is complete; C{node.on_data} is
    called after each read.
    """

    def __init__(self, node: StreamNode) -> None:
        self.node = node
        self.data = bytearray()
        self.closed = False
        self.last_head: Optional[bytes] = None
        self.first = b""

    def connectionMade(self) -> None:
        self.node.connections.append(self)
        if self.node.paused:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.node.on_data is not None:
            self.node.on_data(self)

    def connectionLost(self, reason: Failure) -> None:
        self.closed = True

    @property
    def head(self) -> Optional[bytes]:
        end = self.data.find(b"\r\n\r\n")
        return None if end < 0 else bytes(self.data[: end + 4])

    @property
    def body(self) -> bytes:
        end = self.data.find(b"\r\n\r\n")
        return b"" if end < 0 else bytes(self.data[end + 4 :])

    def header(self, name: bytes) -> list[bytes]:
        head = self.head or self.last_head or b""
        lines = head.split(b"\r\n")[1:]
        pairs = []
        for line in lines:
            key, _, value = line.partition(b":")
            pairs.append((key, value.strip()))
        return values(pairs, name)


class StreamNode(Factory):
    """
    A node made of L{StreamConnection}s; with C{paused}, new connections
    read nothing until the test resumes them.
    """

    noisy = False

    def __init__(self) -> None:
        self.connections: list[StreamConnection] = []
        self.on_data: Optional[Callable[[StreamConnection], None]] = None
        self.paused = False
        self.port: Any = None

    def buildProtocol(self, addr: Any) -> StreamConnection:
        return StreamConnection(self)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port.getHost().port}"

    async def stop(self) -> None:
        await self.port.stopListening()
        for connection in self.connections:
            if not connection.closed:
                connection.transport.abortConnection()
        await wait_for(lambda: all(c.closed for c in self.connections), "node connections")


def answer_when_complete(length: int) -> Callable[[StreamConnection], None]:
    """
    An C{on_data} that hashes the body as it comes (dropping the bytes) and
    answers with its sha256 once C{length} body bytes (Content-Length
    framing) are in. The head stays in C{conn.last_head}, the first body
    bytes in C{conn.first}.
    """
    state: dict[StreamConnection, Any] = {}

    def on_data(conn: StreamConnection) -> None:
        if conn not in state:
            end = conn.data.find(b"\r\n\r\n")
            if end < 0:
                return
            conn.last_head = bytes(conn.data[: end + 4])
            del conn.data[: end + 4]
            state[conn] = [hashlib.sha256(), 0]
            conn.first = b""
        hasher, count = state[conn]
        take = bytes(conn.data[: length - count])
        del conn.data[: len(take)]
        hasher.update(take)
        if len(conn.first) < 4096:
            conn.first += take[:4096]
        state[conn][1] = count = count + len(take)
        if count >= length:
            del state[conn]
            conn.transport.write(response(body=hasher.hexdigest().encode()))

    return on_data


def upload_head(length: int, target: bytes = b"/upload", *extra: bytes) -> bytes:
    lines = [b"POST " + target + b" HTTP/1.1", b"Host: client.example"]
    lines += [b"Content-Length: %d" % length, *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class StreamedBodyTests(WireCase):
    """
    The body passes through as it arrives.
    """

    async def stream_node(self) -> StreamNode:
        node = StreamNode()
        node.port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(node)
        self.addCleanup(node.stop)
        return node

    async def test_head_before_body(self) -> None:
        """
        The node gets the request head and the first body bytes while the
        client has not sent the rest; the rest follows, sha256 intact, and
        rrlb never buffers the body in a content file.
        """
        node = await self.stream_node()
        body = os.urandom(1 << 20)
        node.on_data = answer_when_complete(len(body))
        service, port = await self.balancer([node.url])
        client = await self.client(port)
        client.send(upload_head(len(body)) + body[:1000])
        await wait_for(lambda: node.connections and len(node.connections[0].first) >= 1000)
        conn = node.connections[0]
        self.assertEqual(conn.header(b"content-length"), [b"%d" % len(body)])
        self.assertEqual(conn.first, body[:1000])
        request = self.channels[0].requests[0]
        self.assertIsNone(request.content)
        client.send(body[1000:])
        result = await client.response()
        assert result is not None
        self.assertEqual(result.body, hashlib.sha256(body).hexdigest().encode())

    async def test_chunked_body_streams_chunked(self) -> None:
        """
        A chunked body whose end is not in yet goes to the node chunked,
        piece by piece; one that came whole with its head goes with its
        Content-Length.
        """
        node = await self.stream_node()
        service, port = await self.balancer([node.url])
        client = await self.client(port)
        client.send(
            b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        await wait_for(lambda: node.connections and b"hello" in node.connections[0].body)
        conn = node.connections[0]
        self.assertEqual(conn.header(b"transfer-encoding"), [b"chunked"])
        self.assertEqual(conn.header(b"content-length"), [])
        client.send(b"6\r\n world\r\n0\r\n\r\n")
        await wait_for(lambda: decode_chunked(conn.body, 0) is not None, "the whole body")
        decoded = decode_chunked(conn.body, 0)
        assert decoded is not None
        self.assertEqual(decoded[0], b"hello world")
        conn.data.clear()
        conn.transport.write(response())
        result = await client.response()
        assert result is not None
        self.assertEqual(result.code, 200)
        # Whole in one packet: the node gets a Content-Length.
        client.send(
            b"PUT /d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked_body(b"abc", b"def")
        )
        await wait_for(lambda: conn.head is not None and conn.body == b"abcdef")
        self.assertEqual(conn.header(b"content-length"), [b"6"])
        self.assertEqual(conn.header(b"transfer-encoding"), [])

    async def test_slow_node_holds_the_client_back(self) -> None:
        """
        A node that stops reading stops rrlb reading from the client: the
        client's writes back up, rrlb holds no more than a few read buffers
        of the body, and everything arrives intact once the node reads.
        """
        node = await self.stream_node()
        node.paused = True
        total = 32 << 20
        service, port = await self.balancer([node.url])
        client = await self.client(port)
        block = os.urandom(1 << 16)
        expected = hashlib.sha256()
        for _ in range(total // len(block)):
            expected.update(block)
        node.on_data = answer_when_complete(total)
        client.send(upload_head(total))
        producer = BulkProducer(client.transport, block, total)
        producer.start()
        await wait_for(lambda: node.connections and producer.pauses, "the client to be held back")
        (upstream,) = service.traffic.upstream._connections
        rrlb_client = rrlb_end(service, client.transport)
        # Held for good: the node reads nothing, rrlb's writes to it are
        # stuck, rrlb reads nothing from the client, whose writes are stuck.
        await wait_for(
            lambda: stuck(upstream.transport)
            and not reads(rrlb_client)
            and stuck(client.transport)
            and producer.paused,
            "every buffer on the way to fill",
        )
        sent = producer.sent
        await reactor_turns()
        self.assertEqual(producer.sent, sent, "the client could still write")
        self.assertLess(sent, total // 2)
        # What rrlb keeps in user space for the upload: the upstream
        # connection's write buffer and the client's unread nothing.
        buffered = len(upstream.transport.dataBuffer) + upstream.transport._tempDataLen
        self.assertLess(buffered, 1 << 20)
        node.connections[0].transport.resumeProducing()
        result = await client.response()
        assert result is not None
        self.assertEqual(result.body, expected.hexdigest().encode())

    async def test_expect_continue_after_node_connection(self) -> None:
        """
        With Expect: 100-continue the node is asked too, and a node that
        refuses the body at once has its final answer passed on instead of
        a 100 Continue: the client never sends the body.
        """
        node = await self.stream_node()

        def refuse(conn: StreamConnection) -> None:
            if conn.head is not None:
                conn.transport.write(response(b"413 Content Too Large", b"no"))

        node.on_data = refuse
        service, port = await self.balancer([node.url])
        client = await self.client(port)
        client.send(upload_head(1 << 20, b"/e", b"Expect: 100-continue"))
        result = await client.response()
        assert result is not None
        self.assertEqual(result.code, 413)
        self.assertEqual(result.body, b"no")
        self.assertNotIn(b"100 Continue", bytes(client.data))
        self.assertEqual(node.connections[0].header(b"expect"), [b"100-continue"])
        self.assertEqual(service.pool.nodes[0].in_flight, 0)


class ExpectContinueQueueTests(WireCase):
    """
    100 Continue waits for a node connection, also while queued.
    """

    async def test_no_continue_while_queued(self) -> None:
        """
        A request with Expect: 100-continue waiting in the queue gets no
        100 until a node slot frees and its connection is ready; then its
        body goes through.
        """
        node = StreamNode()
        node.port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(node)
        self.addCleanup(node.stop)
        service, port = await self.balancer([node.url], "--max-conns-per-node", "1")
        first = await self.client(port)
        first.send(b"GET /busy HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for(lambda: node.connections and node.connections[0].head)
        second = await self.client(port)
        second.send(upload_head(5, b"/e", b"Expect: 100-continue"))
        await wait_for(lambda: len(service.traffic.proxy.queue) == 1, "the upload to queue")
        # What would send the 100: a node connection for the request. There
        # is none while the first holds the only slot; a round trip through
        # the reactor shows nothing more is coming.
        await reactor_turns()
        self.assertEqual(len(node.connections), 1)
        self.assertEqual(bytes(second.data), b"")
        node.on_data = answer_when_complete(5)
        node.connections[0].data.clear()
        node.connections[0].transport.write(response())
        await wait_for(lambda: b"100 Continue" in second.data, "100 Continue")
        second.send(b"hello")
        result = await second.response()
        assert result is not None
        self.assertEqual(result.interim, [100])
        self.assertEqual(result.body, hashlib.sha256(b"hello").hexdigest().encode())


class StreamedRetryTests(WireCase):
    """
    The first 64 KiB are kept for a retry; a longer body is never re-sent.
    """

    async def test_small_body_retried(self) -> None:
        """
        A PUT whose body fits in the kept 64 KiB is retried on the next node
        after the first resets, and that node gets the whole body.
        """

        def reset(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.abortConnection()

        bad = await self.backend(reset)
        good = await self.backend(
            lambda request, conn: response(body=hashlib.sha256(request.body).hexdigest().encode())
        )
        service, port = await self.balancer([bad.url, good.url], "--max-idle-per-node", "0")
        body = os.urandom(KEEP)
        client = await self.client(port)
        client.send(upload_head(len(body)).replace(b"POST", b"PUT") + body[:100])
        # The rest comes once the first node has the start of the body.
        await wait_for(lambda: bad.connections, "the first node's connection")
        client.send(body[100:])
        result = await client.response()
        assert result is not None
        self.assertEqual(result.code, 200)
        self.assertEqual(result.body, hashlib.sha256(body).hexdigest().encode())
        self.assertEqual(len(bad.requests), 1)

    async def test_large_body_not_retried(self) -> None:
        """
        A PUT whose body is longer than 64 KiB is not sent again once the
        first node took it: the client gets 502, the next node nothing.
        """

        def reset(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.abortConnection()

        bad = await self.backend(reset)
        good = await self.backend()
        service, port = await self.balancer([bad.url, good.url], "--max-idle-per-node", "0")
        body = os.urandom(KEEP + 1)
        result = await self.exchange(port, upload_head(len(body)).replace(b"POST", b"PUT") + body)
        self.assertPlainTextError(result, 502)
        self.assertEqual(len(bad.requests), 1)
        self.assertEqual(good.requests, [])


class StreamedLimitTests(WireCase):
    """
    --max-body-size and --client-body-timeout on a body in motion.
    """

    async def stream_node(self) -> StreamNode:
        node = StreamNode()
        node.port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(node)
        self.addCleanup(node.stop)
        return node

    async def test_chunked_body_over_limit_mid_stream(self) -> None:
        """
        A chunked body that passes --max-body-size after part of it went to
        the node: the client gets 413, the node's request is cut off.
        """
        node = await self.stream_node()
        service, port = await self.balancer([node.url], "--max-body-size", "1000")
        client = await self.client(port)
        client.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        client.send(b"258\r\n" + b"a" * 600 + b"\r\n")
        await wait_for(lambda: node.connections and b"a" * 600 in node.connections[0].body)
        client.send(b"258\r\n" + b"b" * 600 + b"\r\n")
        result = await client.response()
        self.assertPlainTextError(result, 413)
        await wait_for(lambda: node.connections[0].closed, "the node's connection to close")
        self.assertEqual(service.pool.nodes[0].in_flight, 0)

    async def test_body_timeout_mid_stream(self) -> None:
        """
        A client that stops sending its body for --client-body-timeout gets
        408 (no response had started) and the node's request is cut off.
        """
        node = await self.stream_node()
        service, port = await self.balancer([node.url], "--client-body-timeout", "0.3")
        client = await self.client(port)
        client.send(upload_head(100) + b"x" * 10)
        result = await client.response()
        self.assertPlainTextError(result, 408)
        await wait_for(lambda: node.connections[0].closed, "the node's connection to close")
        self.assertEqual(service.pool.nodes[0].in_flight, 0)

    async def test_body_timeout_after_response_started(self) -> None:
        """
        A body that stalls after the node's response has started: no 408
        can be sent, so the client's connection is closed (and the node's).
        """
        node = await self.stream_node()

        def early(conn: StreamConnection) -> None:
            if conn.head is not None and not conn.closed and b"early" not in conn.data:
                conn.data += b"early"
                conn.transport.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
                )

        node.on_data = early
        service, port = await self.balancer([node.url], "--client-body-timeout", "0.3")
        client = await self.client(port)
        client.send(upload_head(100) + b"x" * 10)
        await wait_for(lambda: client.closed, "rrlb to close the client connection")
        self.assertIn(b"hello", bytes(client.data))
        self.assertNotIn(b"408", bytes(client.data))
        await wait_for(lambda: node.connections[0].closed, "the node's connection to close")
        self.assertEqual(service.pool.nodes[0].in_flight, 0)

    async def test_slow_client_is_not_a_node_timeout(self) -> None:
        """
        A client that sends its body slowly, within --client-body-timeout
        between bytes but over --timeout in all, is not a node failure.
        """
        node = await self.stream_node()
        node.on_data = answer_when_complete(6)
        service, port = await self.balancer([node.url], "--timeout", "0.2")
        clock = clock_on(service)
        client = await self.client(port)
        client.send(upload_head(6))
        await wait_for(lambda: node.connections and node.connections[0].last_head, "the head")
        step = service.traffic.upstream.granularity
        for piece in (b"ab", b"cd", b"ef"):
            # Past --timeout since the last byte, in the upstream sweep's steps.
            clock.pump([step] * round(0.25 / step))
            client.send(piece)
        result = await client.response()
        assert result is not None
        self.assertEqual(result.code, 200)
        self.assertEqual(result.body, hashlib.sha256(b"abcdef").hexdigest().encode())
        self.assertEqual(service.pool.nodes[0].errors, 0)

    async def test_queued_body_waits_unread(self) -> None:
        """
        A request waiting in the queue for a full node keeps its body
        unread (the client is held back) and sends it whole once it gets
        the slot.
        """
        node = await self.stream_node()
        service, port = await self.balancer([node.url], "--max-conns-per-node", "1")
        first = await self.client(port)
        first.send(b"GET /busy HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for(lambda: node.connections and node.connections[0].head)
        total = 32 << 20
        block = os.urandom(1 << 16)
        expected = hashlib.sha256()
        for _ in range(total // len(block)):
            expected.update(block)
        second = await self.client(port)
        second.send(upload_head(total))
        producer = BulkProducer(second.transport, block, total)
        producer.start()
        await wait_for(lambda: len(service.traffic.proxy.queue) == 1, "the upload to queue")
        await wait_for(lambda: producer.pauses, "the queued client to be held back")
        rrlb_second = rrlb_end(service, second.transport)
        # Held for good: rrlb reads nothing from it, and its writes are stuck.
        await wait_for(
            lambda: not reads(rrlb_second) and stuck(second.transport) and producer.paused,
            "the queued client's buffers to fill",
        )
        sent = producer.sent
        await reactor_turns()
        self.assertEqual(producer.sent, sent, "the queued client could still write")
        self.assertLess(sent, total // 2)
        node.on_data = answer_when_complete(total)
        node.connections[0].data.clear()
        node.connections[0].transport.write(response())
        self.assertEqual((await first.response()).code, 200)  # type: ignore[union-attr]
        result = await second.response()
        assert result is not None
        self.assertEqual(result.body, expected.hexdigest().encode())


class Source:
    """
    A stand-in for the client side of a body: records holds and 100s.
    """

    def __init__(self) -> None:
        self.holds = 0
        self.continues = 0

    def hold(self, flag: int) -> None:
        self.holds |= flag

    def release(self, flag: int) -> None:
        self.holds &= ~flag

    def send_continue(self) -> None:
        self.continues += 1


class StreamedBodyUnitTests(unittest.TestCase):
    """
    L{StreamedBody} on its own: what it keeps, when it holds the client
    back, and when it can be sent again.
    """

    def test_waits_for_a_consumer(self) -> None:
        """
        Bytes with no consumer are kept and hold the client back; a consumer
        gets them at once, then the rest as it comes, and the hold goes.
        """
        source = Source()
        body = StreamedBody(source, 10)
        body.feed(b"abc")
        self.assertEqual(source.holds, WAITING)
        sink = BodySink()
        body.attach(sink)
        self.assertEqual((sink.data, source.holds), (b"abc", 0))
        body.feed(b"defghij")
        body.finish()
        self.assertEqual((sink.data, sink.ended), (b"abcdefghij", True))

    def test_short_body_replayable(self) -> None:
        """
        A body within KEEP can be given whole to a second consumer.
        """
        body = StreamedBody(Source(), KEEP)
        first = BodySink()
        body.attach(first)
        body.feed(b"x" * KEEP)
        body.detach(first)
        self.assertTrue(body.replayable)
        second = BodySink()
        body.attach(second)
        body.finish()
        self.assertEqual((second.data, second.ended), (b"x" * KEEP, True))

    def test_long_body_spent(self) -> None:
        """
        Once a byte past KEEP went to a consumer the body cannot be sent
        again, and rrlb keeps no more than KEEP of it.
        """
        body = StreamedBody(Source(), KEEP + 10)
        body.attach(BodySink())
        body.feed(b"y" * (KEEP + 1))
        self.assertFalse(body.replayable)
        self.assertEqual(len(body.buffered()), KEEP)

    def test_node_backpressure(self) -> None:
        """
        The consumer's connection pausing the body holds the client back
        until it resumes (or the consumer goes).
        """
        source = Source()
        body = StreamedBody(source, 100)
        sink = BodySink()
        body.attach(sink)
        body.pauseProducing()
        self.assertEqual((source.holds, body.node_full), (NODE_FULL, True))
        body.resumeProducing()
        self.assertEqual(source.holds, 0)
        body.pauseProducing()
        body.detach(sink)
        self.assertEqual(source.holds, 0)

    def test_expect_continue(self) -> None:
        """
        With Expect: 100-continue the 100 goes out when a consumer is
        attached, and only if no body byte came first.
        """
        source = Source()
        body = StreamedBody(source, 5, expect_continue=True)
        self.assertEqual(source.holds, CONTINUE)
        body.attach(BodySink())
        self.assertEqual((source.continues, source.holds), (1, 0))
        eager = Source()
        body = StreamedBody(eager, 5, expect_continue=True)
        body.feed(b"12")
        body.attach(BodySink())
        self.assertEqual(eager.continues, 0)


    def test_empty_piece_never_framed(self) -> None:
        """
        Whoever feeds an empty piece to a body going out chunked, the node
        connection writes nothing for it: a chunk of size 0 would end the
        body there (issue 17). The body ends with one last chunk.
        """
        from twisted.internet.testing import MemoryReactor, StringTransport

        from rrlb.nodeconn import UpstreamProtocol
        from rrlb.upstream import UpstreamPool

        protocol = UpstreamProtocol(UpstreamPool(MemoryReactor()), "k")
        protocol.transport = transport = StringTransport()
        body = StreamedBody(Source(), None)
        body.chunked = True
        body.feed(b"")
        protocol.send(None, b"HEAD\r\n\r\n", body, False)
        for piece in (b"", b"ab", b"", b"", b"c", b""):
            body.feed(piece)
        protocol.body_data(b"")
        body.finish()
        self.assertEqual(transport.value(), b"HEAD\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n")


class ChannelHoldTests(unittest.TestCase):
    """
    The channel's side of a held body, on a L{Clock}.
    """

    def test_no_body_timeout_while_held(self) -> None:
        """
        While rrlb holds the client back (here: no consumer yet) it reads
        nothing and the body timeout does not run; once released the
        timeout runs again from then.
        """
        swallow = Swallow()
        swallow.attach = False
        harness = Harness(swallow, body_timeout=10)
        channel, transport = harness.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        self.assertEqual(transport.producerState, "paused")
        harness.clock.advance(60)
        self.assertEqual(transport.value(), b"")
        request = channel.requests[0]
        request.body.attach(BodySink())
        self.assertEqual(transport.producerState, "producing")
        harness.clock.advance(9)
        self.assertEqual(transport.value(), b"")
        harness.clock.advance(2)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))
