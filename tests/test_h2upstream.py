"""
The HTTP/2 client to nodes (L{rrlb.h2upstream}, issue 21) against real
peers on loopback: nodes made with the C{h2} library (L{H2Node}) and grpcio
servers. Streams share few connections, GOAWAY and REFUSED_STREAM turn into
retryable failures, flow control is per stream, and nothing a node sends
breaks more than its own connection.
"""

from __future__ import annotations

from typing import Any, Optional

import h2.errors
import h2.settings
from hyperframe.frame import (
    ContinuationFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    WindowUpdateFrame,
)
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.trial import unittest

from rrlb.config import parse_node
from rrlb.grpcwire import frame
from rrlb.h2upstream import (
    STREAM_WINDOW,
    H2NodeConnection,
    H2UpstreamPool,
    NotHTTP2,
    Unprocessed,
)
from rrlb.pool import Node
from tests.support import (
    H2Node,
    H2ServerConnection,
    grpc_node,
    reactor,
    start_h2_node,
    wait_for,
)


class Recorder:
    """
    An exchange as L{rrlb.h2upstream} drives it: sends one request when it
    gets its stream, and records what comes back.
    """

    def __init__(
        self,
        path: bytes = b"/",
        body: Any = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        method: bytes = b"GET",
    ) -> None:
        self.request = [
            (b":method", method),
            (b":scheme", b"http"),
            (b":authority", b"node.test"),
            (b":path", path),
            *headers,
        ]
        self.send_body = body
        self.active = False
        self.stream: Any = None
        self.code: Optional[int] = None
        self.headers: dict[bytes, list[bytes]] = {}
        self.body = bytearray()
        self.trailers: Optional[list[tuple[bytes, bytes]]] = None
        self.failure: Optional[Failure] = None
        self.done: defer.Deferred[Recorder] = defer.Deferred()

    def connected(self, stream: Any, reused: bool) -> None:
        self.stream = stream
        stream.send(self, self.request, self.send_body)

    def connect_failed(self, reason: Failure, shared: bool = False) -> None:
        self.failure = reason
        self.done.callback(self)

    def upstream_lost(self, reason: Failure, got_response: bool) -> None:
        self.failure = reason
        self.done.callback(self)

    def response_head(
        self, code: int, reason: bytes, headers: dict[bytes, list[bytes]], has_body: bool
    ) -> None:
        self.code = code
        self.headers = headers

    def response_body(self, data: bytes) -> None:
        self.body += data

    def response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.trailers = trailers

    def response_done(self) -> None:
        self.done.callback(self)


def goaway(last_stream_id: int) -> bytes:
    """
    A GOAWAY frame (NO_ERROR): written by hand, since h2 would close the
    node's side for good, and real servers (grpc's) go on answering.
    """
    frame = GoAwayFrame(0)
    frame.last_stream_id = last_stream_id
    return frame.serialize()


def node_of(url: str) -> Node:
    return Node(parse_node(url))


class H2UpstreamCase(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.pool = H2UpstreamPool(reactor, connect_timeout=5)
        self.addCleanup(self.pool.close)

    async def node(self, **kw: Any) -> tuple[H2Node, Node]:
        peer = await start_h2_node(self, H2Node(**kw))
        return peer, node_of(peer.url)

    def send(self, node: Node, recorder: Optional[Recorder] = None) -> Recorder:
        recorder = recorder or Recorder()
        self.pool.acquire(node, recorder)
        return recorder


class MultiplexTests(H2UpstreamCase):
    """
    Streams share connections until the node's stream limit.
    """

    async def test_one_connection_for_many_streams(self) -> None:
        """
        Twenty requests at once to one node go over one connection, each
        with its own answer.
        """
        peer, node = await self.node(name="a")
        recorders = [self.send(node, Recorder(b"/%d" % i)) for i in range(20)]
        await defer.gatherResults([r.done for r in recorders])
        self.assertEqual([bytes(r.body) for r in recorders], [b"a:/%d" % i for i in range(20)])
        self.assertEqual(len(peer.connections), 1)
        self.assertEqual(self.pool.new_connections, 1)

    async def test_new_connection_at_the_stream_limit(self) -> None:
        """
        A node allowing 2 streams at once, holding its answers: 5 requests
        open 3 connections, and every one is answered once it lets go.
        """
        held: list[tuple[H2ServerConnection, int]] = []
        peer, node = await self.node(
            handler=lambda conn, sid: held.append((conn, sid)),
            settings={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2},
        )
        first = self.send(node)
        await wait_for(lambda: held, "the first request")
        recorders = [first] + [self.send(node) for _ in range(4)]
        await wait_for(lambda: len(held) == 5, "five requests at the node")
        self.assertEqual(len(peer.connections), 3)
        for conn, sid in held:
            conn.respond(sid, b"ok")
        await defer.gatherResults([r.done for r in recorders])
        self.assertEqual({bytes(r.body) for r in recorders}, {b"ok"})


class GoawayTests(H2UpstreamCase):
    """
    A node's GOAWAY and REFUSED_STREAM (RFC 9113 8.7).
    """

    async def test_goaway_lets_open_streams_finish(self) -> None:
        """
        A GOAWAY naming stream 1 as the last: stream 1 is answered after
        it, streams 3 and 5 fail as L{Unprocessed}, and the next request
        takes a fresh connection.
        """
        held: list[tuple[H2ServerConnection, int]] = []
        peer, node = await self.node(handler=lambda conn, sid: held.append((conn, sid)))
        recorders = [self.send(node) for _ in range(3)]
        await wait_for(lambda: len(held) == 3, "three requests at the node")
        conn = held[0][0]
        conn.transport.write(goaway(1))
        await defer.gatherResults([r.done for r in recorders[1:]])
        for r in recorders[1:]:
            self.assertTrue(r.failure.check(Unprocessed))
        conn.respond(1, b"finished")
        await recorders[0].done
        self.assertEqual(bytes(recorders[0].body), b"finished")
        again = self.send(node)
        await wait_for(lambda: len(held) == 4, "the next request")
        held[3][0].respond(held[3][1], b"fresh")
        await again.done
        self.assertEqual(bytes(again.body), b"fresh")
        self.assertEqual(len(peer.connections), 2)

    async def test_refused_stream_is_unprocessed(self) -> None:
        """
        A stream the node resets with REFUSED_STREAM before answering fails
        as L{Unprocessed}; one reset otherwise does not.
        """

        def refuse(conn: H2ServerConnection, sid: int) -> None:
            code = (
                h2.errors.ErrorCodes.REFUSED_STREAM
                if conn.heads[sid][b":path"] == b"/refuse"
                else h2.errors.ErrorCodes.INTERNAL_ERROR
            )
            conn.conn.reset_stream(sid, code)
            conn.flush()

        _, node = await self.node(handler=refuse)
        refused = self.send(node, Recorder(b"/refuse"))
        other = self.send(node, Recorder(b"/other"))
        await defer.gatherResults([refused.done, other.done])
        self.assertTrue(refused.failure.check(Unprocessed))
        self.assertFalse(other.failure.check(Unprocessed))

    async def test_goaway_storm(self) -> None:
        """
        Fifty GOAWAYs in one read fail the streams above the lowest last
        stream id once each, and nothing else breaks.
        """
        held: list[tuple[H2ServerConnection, int]] = []
        _, node = await self.node(handler=lambda conn, sid: held.append((conn, sid)))
        recorders = [self.send(node) for _ in range(2)]
        await wait_for(lambda: len(held) == 2, "two requests at the node")
        conn = held[0][0]
        conn.transport.write(goaway(2**31 - 1) * 25 + goaway(1) * 25)
        await recorders[1].done
        self.assertTrue(recorders[1].failure.check(Unprocessed))
        conn.respond(1, b"done")
        await recorders[0].done
        self.assertEqual(bytes(recorders[0].body), b"done")


class FlowControlTests(H2UpstreamCase):
    """
    Windows per stream: a slow client pauses its own stream only.
    """

    async def test_paused_stream_does_not_block_others(self) -> None:
        """
        While one stream's client reads nothing, the node's 4 MiB answer on
        it stops at its window (what rrlb holds stays bounded), and another
        stream on the same connection is answered in full.
        """
        big = b"x" * (4 << 20)

        def answer(conn: H2ServerConnection, sid: int) -> None:
            conn.respond(sid, big if conn.heads[sid][b":path"] == b"/big" else b"small")

        peer, node = await self.node(handler=answer)
        slow = Recorder(b"/big")
        self.pool.acquire(node, slow)
        await wait_for(lambda: slow.stream is not None, "the stream")
        slow.stream.pause_reading()
        await wait_for(lambda: len(slow.body) >= STREAM_WINDOW // 2, "the first window")
        quick = self.send(node, Recorder(b"/small"))
        await quick.done
        self.assertEqual(bytes(quick.body), b"small")
        self.assertLessEqual(len(slow.body), STREAM_WINDOW)
        self.assertEqual(len(peer.connections), 1)
        slow.stream.resume_reading()
        await slow.done
        self.assertEqual(len(slow.body), len(big))

    async def test_large_request_body(self) -> None:
        """
        A 3 MiB request body goes out as the node's windows open.
        """
        _, node = await self.node(name="n")
        body = bytes(range(256)) * (3 * 4096)
        recorder = await self.send(node, Recorder(b"/up", body, method=b"POST")).done
        self.assertEqual(bytes(recorder.body), b"n:/up" + body)


class _Body:
    """
    A request body still coming, as L{rrlb.body.StreamedBody} is to its
    consumer: it is paused and resumed.
    """

    def __init__(self) -> None:
        self.consumer: Any = None
        self.paused = False

    def attach(self, consumer: Any) -> None:
        self.consumer = consumer
        consumer.registerProducer(self, True)

    def detach(self, consumer: Any) -> None:
        self.consumer = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False


class BodyBackpressureTests(H2UpstreamCase):
    """
    A node that reads a request body slowly holds back its client.
    """

    async def test_closed_window_pauses_client(self) -> None:
        """
        While the node's window is closed and more than a few frames wait,
        the body's client is paused; once the node reads, it is resumed
        and the whole body arrives.
        """
        peer, node = await self.node(name="n")
        peer.reading = False
        body = _Body()
        recorder = Recorder(b"/up", body, method=b"POST")
        self.pool.acquire(node, recorder)
        await wait_for(lambda: body.consumer is not None, "the stream")
        data = b"y" * 300000
        body.consumer.body_data(data)
        await wait_for(lambda: body.paused, "the client to be paused")
        conn = peer.connections[0]
        await wait_for(lambda: conn.bodies.get(1), "the first bytes at the node")
        self.assertLessEqual(len(conn.bodies[1]), 65535)
        conn.read_on()
        await wait_for(lambda: not body.paused, "the client to go on")
        body.consumer.body_end()
        await recorder.done
        self.assertEqual(bytes(recorder.body), b"n:/up" + data)


class AdversarialNodeTests(H2UpstreamCase):
    """
    What a node sends ends at most its own connection: its streams fail,
    other nodes' streams go on, and nothing raises out of the reactor.
    """

    async def misbehave(self, write: Any) -> tuple[Recorder, Recorder]:
        """
        Two requests, one to a node that answers with C{write(conn, sid)},
        one to a healthy node; both outcomes.
        """

        def bad(conn: H2ServerConnection, sid: int) -> None:
            conn.transport.write(write(conn, sid))

        _, bad_node = await self.node(handler=bad)
        _, good_node = await self.node(name="good")
        victim = self.send(bad_node)
        bystander = self.send(good_node)
        await defer.gatherResults([victim.done, bystander.done])
        self.assertEqual(bytes(bystander.body), b"good:/")
        self.assertIsNotNone(victim.failure)
        return victim, bystander

    async def test_garbage_frames(self) -> None:
        """
        Bytes that are no HTTP/2 frame fail the stream as L{NotHTTP2}.
        """
        victim, _ = await self.misbehave(lambda conn, sid: b"\xff" * 9 + b"garbage" * 100)
        self.assertTrue(victim.failure.check(NotHTTP2))

    async def test_endless_continuation(self) -> None:
        """
        A HEADERS frame followed by CONTINUATION frames that never end the
        header block fails the stream; rrlb keeps none of it past h2's
        backlog limit.
        """

        def flood(conn: H2ServerConnection, sid: int) -> bytes:
            headers = HeadersFrame(sid)
            headers.data = conn.conn.encoder.encode([(b":status", b"200")])
            frames = [headers.serialize()]
            for _ in range(200):
                continuation = ContinuationFrame(sid)
                continuation.data = b"\x00" * 1000
                frames.append(continuation.serialize())
            return b"".join(frames)

        victim, _ = await self.misbehave(flood)
        self.assertTrue(victim.failure.check(NotHTTP2))

    async def test_huge_header_block(self) -> None:
        """
        A response head larger than rrlb's SETTINGS_MAX_HEADER_LIST_SIZE
        fails the stream.
        """

        def huge(conn: H2ServerConnection, sid: int) -> bytes:
            conn.respond(sid, b"", headers=[(b"x-big-%d" % i, b"v" * 1000) for i in range(100)])
            return b""

        victim, _ = await self.misbehave(huge)
        self.assertIsNotNone(victim.failure)

    async def test_window_overflow(self) -> None:
        """
        WINDOW_UPDATE frames that push the connection's window past 2^31-1
        are a flow-control error: the stream fails.
        """

        def overflow(conn: H2ServerConnection, sid: int) -> bytes:
            update = WindowUpdateFrame(0)
            update.window_increment = 0x7FFFFFFF
            return update.serialize() * 2

        await self.misbehave(overflow)

    async def test_ping_flood(self) -> None:
        """
        More PING frames than rrlb answers in a period end the connection
        (each would cost an answer written to a node that may not read).
        """

        def flood(conn: H2ServerConnection, sid: int) -> bytes:
            ping = PingFrame(0)
            ping.opaque_data = b"12345678"
            return ping.serialize() * 1200

        victim, _ = await self.misbehave(flood)
        self.assertTrue(victim.failure.check(NotHTTP2))
        self.assertIn("flood", victim.failure.getErrorMessage())

    async def test_trailers_with_cr_lf(self) -> None:
        """
        Trailers whose value holds CR LF never reach the exchange: the
        stream fails instead.
        """

        def smuggle(conn: H2ServerConnection, sid: int) -> bytes:
            conn.conn.config.validate_outbound_headers = False
            conn.conn.config.normalize_outbound_headers = False
            conn.respond(sid, b"body", trailers=[(b"grpc-status", b"0\r\nx-evil: 1")])
            return b""

        victim, _ = await self.misbehave(smuggle)
        self.assertIsNone(victim.trailers)


class GrpcNodeTests(H2UpstreamCase):
    """
    A grpcio server as the node, straight from the client.
    """

    async def test_unary_with_trailers(self) -> None:
        """
        A unary call gets the answer as one gRPC message and the status in
        trailers, with the node's trailing metadata.
        """
        peer = grpc_node(self, "g")
        recorder = Recorder(
            b"/test.Echo/Unary",
            frame(b"hi"),
            ((b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"x-echo", b"m")),
            method=b"POST",
        )
        await self.send(node_of(peer.url), recorder).done
        self.assertEqual(recorder.code, 200)
        self.assertEqual(bytes(recorder.body), frame(b"g:hi"))
        trailers = dict(recorder.trailers or [])
        self.assertEqual(trailers[b"grpc-status"], b"0")
        self.assertEqual(trailers[b"x-trailer"], b"m")


class ALPNTests(unittest.TestCase):
    """
    Over https, h2 only when the node agrees to it by ALPN.
    """

    def test_no_h2_by_alpn(self) -> None:
        """
        A TLS connection on which the node chose another protocol (or none)
        by ALPN fails its waiting requests as L{NotHTTP2} on the first bytes,
        which are never read as HTTP/2.
        """
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        pool = H2UpstreamPool(Clock())
        connection = H2NodeConnection(pool, "https://node", tls=True)
        recorder = Recorder()
        connection.take(recorder)
        transport = StringTransport()
        transport.negotiatedProtocol = b"http/1.1"  # type: ignore[attr-defined]
        connection.makeConnection(transport)
        connection.dataReceived(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.assertTrue(recorder.failure.check(NotHTTP2))
        self.assertIn("did not agree to h2", recorder.failure.getErrorMessage())
        self.assertTrue(connection.closed)
