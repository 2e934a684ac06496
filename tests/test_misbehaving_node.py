"""
Nodes that misbehave in ways an exact proxy must not paper over: answering
before reading a streamed body, cutting a close-delimited body with a reset,
a transfer coding rrlb cannot undo, a nonsense status code, bytes nobody
asked for on an idle pooled connection, and a POST a node took and dropped.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from rrlb.nodeconn import UpstreamProtocol
from rrlb.upstream import UpstreamPool, _ConnectFactory
from tests.support import (
    LOOPBACK,
    BackendConnection,
    RecordedRequest,
    WireCase,
    get,
    post,
    reactor,
    response,
    wait_for,
)

MB = 1024 * 1024


class EarlyAnswer(Protocol):
    """
    Answers 413 as soon as a request head arrives, without reading the body;
    optionally stops reading altogether.
    """

    def __init__(self, factory: EarlyAnswerFactory) -> None:
        self.factory = factory
        self.buffer = b""
        self.answered = False
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.factory.connections.append(self)

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if not self.answered and b"\r\n\r\n" in self.buffer:
            self.answered = True
            self.transport.write(b"HTTP/1.1 413 Too Big\r\nContent-Length: 3\r\n\r\nbig")
            if self.factory.stop_reading:
                self.transport.pauseProducing()  # type: ignore[attr-defined]


class EarlyAnswerFactory(Factory):
    def __init__(self, stop_reading: bool = False) -> None:
        self.connections: list[EarlyAnswer] = []
        self.stop_reading = stop_reading

    def buildProtocol(self, addr: Any) -> EarlyAnswer:
        return EarlyAnswer(self)


class MisbehavingNodeTests(WireCase):
    """
    Over real loopback sockets.
    """

    async def early_node(self, stop_reading: bool = False) -> str:
        factory = EarlyAnswerFactory(stop_reading)
        port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(factory)

        async def stop() -> None:
            await port.stopListening()
            for connection in factory.connections:
                connection.transport.abortConnection()  # type: ignore[attr-defined]
            await defer.gatherResults([c.lost for c in factory.connections])

        self.addCleanup(stop)
        return f"http://{LOOPBACK}:{port.getHost().port}"

    async def test_early_answer_to_streamed_body(self) -> None:
        """
        A node that answers 413 before reading a 2 MB body (streamed from a
        temporary file): the client gets the 413, and nothing fails inside
        the reactor afterwards (the body sender is stopped before the request
        closes its file).
        """
        url = await self.early_node()
        service, port = await self.balancer([url])
        result = await self.exchange(port, post(b"/up", os.urandom(2 * MB)))
        assert result is not None
        self.assertEqual(result.code, 413)
        # Anything failing would fail as the client's connection and the
        # node's end: wait until both have.
        await wait_for(lambda: not service.traffic.site.channels, "the client's connection to end")
        await wait_for(
            lambda: service.traffic.upstream.connection_count == 0, "the node's connection to end"
        )
        errors = self.flushLoggedErrors()
        self.assertEqual(errors, [], [e.getTraceback() for e in errors])

    async def test_early_answer_node_stops_reading(self) -> None:
        """
        A node that answers early and then reads nothing: its connection is
        closed, not left open with half a body queued for it.
        """
        url = await self.early_node(stop_reading=True)
        service, port = await self.balancer([url])
        result = await self.exchange(port, post(b"/up", os.urandom(8 * MB)))
        assert result is not None
        self.assertEqual(result.code, 413)
        await wait_for(
            lambda: service.traffic.upstream.connection_count == 0,
            "the node's connection to close",
            timeout=2.0,
        )

    async def test_close_delimited_body_cut_by_reset(self) -> None:
        """
        A body with no length that ends in a reset, not a clean close, is
        not passed on as complete: the client's connection is closed without
        the final chunk.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(b"HTTP/1.0 200 OK\r\n\r\npartial")
            reactor.callLater(0.1, conn.transport.abortConnection)

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/"))
        result = await client.response()
        self.assertIsNone(result)
        self.assertNotIn(b"0\r\n\r\n", bytes(client.data))

    async def test_unknown_transfer_coding(self) -> None:
        """
        A transfer coding other than chunked (gzip) cannot be undone by rrlb,
        and dropping the header would corrupt the body: 502.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nGZDATA")

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url])
        result = await self.exchange(port, get(b"/"))
        self.assertPlainTextError(result, 502)

    async def test_nonsense_status_code(self) -> None:
        """
        Status codes that int() would take but HTTP does not (-10, +20,
        1_0, 099, 600) give 502.
        """
        for code in (b"-10", b"+20", b"1_0", b"099", b"600"):
            line = b"HTTP/1.1 " + code + b" Weird\r\nContent-Length: 2\r\n\r\nok"

            def handler(
                request: RecordedRequest, conn: BackendConnection, line: bytes = line
            ) -> bytes:
                return line

            backend = await self.backend(handler)
            _, port = await self.balancer([backend.url])
            result = await self.exchange(port, get(b"/"))
            self.assertPlainTextError(result, 502)

    async def test_post_dropped_after_delay_not_resent(self) -> None:
        """
        A node that takes a POST on a pooled connection and closes it a
        second later without answering: the POST reaches it once.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> Any:
            if len(conn.requests) > 1:
                reactor.callLater(1.0, conn.transport.loseConnection)
                return None
            return response(body=request.target)

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/first"))
        await client.response()
        client.send(post(b"/charge", b"payload"))
        result = await client.response()
        assert result is not None
        self.assertEqual(result.code, 502)
        targets = [r.target for c in backend.connections for r in c.requests]
        self.assertEqual(targets.count(b"/charge"), 1)


class Node:
    key = "k"
    scheme = "http"
    host = "127.0.0.1"
    port = 1


class Exchange:
    active = False

    def __init__(self) -> None:
        self.got: list[tuple[UpstreamProtocol, bool]] = []

    def connected(self, protocol: UpstreamProtocol, reused: bool) -> None:
        self.got.append((protocol, reused))


class UnsolicitedBytesTests(unittest.TestCase):
    """
    An idle pooled connection that receives bytes nobody asked for.
    """

    def test_not_handed_out_again(self) -> None:
        """
        It is closed and taken out of the pool at once, so the next request
        gets a new connection instead of a closing one.
        """
        reactor = MemoryReactorClock()
        pool = UpstreamPool(reactor)
        protocol = UpstreamProtocol(pool, "k")
        protocol.factory = _ConnectFactory(pool, "k", None)  # type: ignore[attr-defined]
        transport = StringTransport()
        protocol.makeConnection(transport)
        pool.release(protocol)
        protocol.dataReceived(b"junk")
        self.assertEqual(pool.idle_count("k"), 0)
        exchange = Exchange()
        pool.acquire(Node(), exchange)
        self.assertEqual(exchange.got, [])
        self.assertEqual(len(reactor.tcpClients), 1)


# Every control byte a response head may not hold: all but HTAB (CR and LF
# only as line ends, tested with the parser's other line rules).
CONTROLS = [b for b in range(0x20) if b not in (0x09, 0x0A, 0x0D)] + [0x7F]


class BadResponseHeadTests(WireCase):
    """
    Response heads that must not reach a client (issue 17, section 7): rrlb
    answers 502 instead, as HAProxy does, and counts a failure of the node
    and a 502 of its own.
    """

    async def head_node(self, *args: str) -> tuple[Any, int]:
        """
        rrlb over a node that answers C{/HEX} with a head holding the byte
        0xHEX in a header value, C{/reason/HEX} with it in the reason phrase,
        and C{/raw} with the request's C{X-Head} (C{|} for CRLF) and C{ok}.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> bytes:
            target = request.target
            if target in (b"/raw", b"/chunked"):
                (head,) = request.header(b"x-head")
                body = b"2\r\nok\r\n0\r\n\r\n" if target == b"/chunked" else b"ok"
                return head.replace(b"|", b"\r\n") + b"\r\n\r\n" + body
            byte = bytes([int(target.rsplit(b"/", 1)[1], 16)])
            if target.startswith(b"/reason/"):
                return response(status=b"200 O" + byte + b"K")
            return response(headers=(b"X-Value: a" + byte + b"b",))

        backend = await self.backend(handler)
        return await self.balancer([backend.url], *args)

    async def test_control_bytes(self) -> None:
        """
        NUL, ESC, VT, DEL and every other control byte but HTAB in a header
        value, and ESC in the reason phrase, get 502; HTAB and obs-text
        (0x80-0xFF) pass.
        """
        _, port = await self.head_node("--fall", "1000")
        for byte in CONTROLS:
            result = await self.exchange(port, get(b"/%x" % byte))
            self.assertPlainTextError(result, 502)
            assert result is not None
            self.assertIn(b"control byte", result.body)
        for byte in (0x1B, 0x7F):
            result = await self.exchange(port, get(b"/reason/%x" % byte))
            self.assertPlainTextError(result, 502)
        for byte in (0x09, 0x80, 0xFF):
            result = await self.exchange(port, get(b"/%x" % byte))
            assert result is not None
            self.assertEqual(result.code, 200)
            self.assertEqual(result.header(b"x-value"), [b"a" + bytes([byte]) + b"b"])

    async def test_two_content_lengths(self) -> None:
        """
        Two Content-Length lines, equal or not, and a list of lengths get
        502: rrlb does not fold equal ones (RFC 9112 6.3 allows either; a
        client must never see two).
        """
        _, port = await self.head_node("--fall", "1000")
        for lengths in (
            b"Content-Length: 2|Content-Length: 2",
            b"Content-Length: 2|Content-Length: 3",
            b"Content-Length: 2, 2",
            b"Content-Length: 2|content-length: 2",
        ):
            head = b"HTTP/1.1 200 OK|" + lengths
            result = await self.exchange(port, get(b"/raw", b"x", b"X-Head: " + head))
            self.assertPlainTextError(result, 502)
            assert result is not None
            self.assertIn(b"Content-Length", result.body)
        result = await self.exchange(
            port, get(b"/raw", b"x", b"X-Head: HTTP/1.1 200 OK|Content-Length: 2")
        )
        assert result is not None
        self.assertEqual((result.code, result.body), (200, b"ok"))

    async def test_too_many_headers(self) -> None:
        """
        More header lines than --max-headers gets 502; exactly that many
        pass.
        """
        _, port = await self.head_node("--fall", "1000", "--max-headers", "10")
        for count, code in ((10, 200), (11, 502)):
            lines = [b"Content-Length: 2"] + [b"X-H%d: v" % i for i in range(count - 1)]
            head = b"|".join([b"HTTP/1.1 200 OK", *lines])
            result = await self.exchange(port, get(b"/raw", b"x", b"X-Head: " + head))
            assert result is not None
            self.assertEqual(result.code, code)

    async def test_version_and_codings(self) -> None:
        """
        A status line whose version is not HTTP/1.<digit>, and a body under
        transfer codings besides one chunked (gzip, or chunked twice), get
        502: the first could be read as another version downstream, the
        second would reach the client still encoded, without a word of it.
        """
        _, port = await self.head_node("--fall", "1000")
        for head in (
            b"HTTP/1.1x 200 OK|Content-Length: 2",
            b"HTTP/1.10 200 OK|Content-Length: 2",
            b"HTTP/1.1 200 OK|Transfer-Encoding: gzip, chunked",
            b"HTTP/1.1 200 OK|Transfer-Encoding: gzip|Transfer-Encoding: chunked",
            b"HTTP/1.1 200 OK|Transfer-Encoding: chunked, chunked",
        ):
            result = await self.exchange(port, get(b"/raw", b"x", b"X-Head: " + head))
            self.assertPlainTextError(result, 502)
        head = b"HTTP/1.1 200 OK|Transfer-Encoding: Chunked"
        result = await self.exchange(port, get(b"/chunked", b"x", b"X-Head: " + head))
        assert result is not None
        self.assertEqual((result.code, result.body), (200, b"ok"))

    async def test_bad_body_before_any_byte_sent(self) -> None:
        """
        A head that passes, then a body that fails at once (a chunk size
        line that is not hex): nothing reached the client yet, so it gets a
        502 and the node a failure, not a connection closed with no answer.
        """
        service, port = await self.head_node("--fall", "1000")
        head = b"HTTP/1.1 200 OK|Transfer-Encoding: chunked||zz"
        result = await self.exchange(port, get(b"/raw", b"x", b"X-Head: " + head))
        self.assertPlainTextError(result, 502)
        assert result is not None
        self.assertIn(b"chunk", result.body)
        self.assertEqual(service.pool.nodes[0].failures, 1)

    async def test_node_failure_and_proxy_error_counted(self) -> None:
        """
        Each such answer counts as a failed request of the node (passive
        health: with --fall 2, two of them take it out of rotation) and in
        rrlb_proxy_errors_total{code="502"}.
        """
        service, port = await self.head_node(
            "--fall", "2", "--admin", "tcp:0:interface=127.0.0.1"
        )
        result = await self.exchange(port, get(b"/1b"))
        self.assertPlainTextError(result, 502)
        node = service.pool.nodes[0]
        self.assertEqual(node.failures, 1)
        self.assertIn("bad response", node.last_error)
        self.assertTrue(node.healthy)
        result = await self.exchange(port, get(b"/7f"))
        self.assertPlainTextError(result, 502)
        self.assertFalse(node.healthy)
        self.assertEqual(service.metrics.proxy_errors[502], 2)
        result = await self.exchange(port, get(b"/41"))
        assert result is not None
        self.assertEqual(result.code, 503)
