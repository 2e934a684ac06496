"""
The HTTP/2 protections (issue 21) over real loopback sockets: a cap on
concurrent streams (the extra stream refused, the connection kept), rapid
reset (CVE-2023-44487), CONTINUATION floods, oversized header lists, and
SETTINGS and PING floods each end the connection with GOAWAY, and rrlb's
memory stays bounded while a flood lasts.
"""

from __future__ import annotations

import re
import struct
from typing import Any, Callable

import h2.config
import h2.connection
from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from rrlb.http2 import MAX_PINGS, MAX_RESETS, MAX_SETTINGS, MAX_STREAMS, MAX_UNREAD
from tests.support import (
    BackendConnection,
    HTTP2Case,
    RecordedRequest,
    connect_aborted_at_cleanup,
    response,
    start_balancer,
    start_daemon,
    wait_for,
)

# What rrlb may grow by while the floods last (each connection is cut off
# at its first flood; what h2 buffers of one header block is at most 64
# CONTINUATION frames, 1 MiB).
FLOOD_GROWTH = 32 << 20
FLOOD_ROUNDS = 5
FLOOD_CONNECTIONS = 10

GOAWAY, RST_STREAM, HEADERS = 0x7, 0x3, 0x1
END_STREAM, END_HEADERS = 0x1, 0x4


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """
    The complete frames in C{data}: (type, flags, stream id, payload).
    """
    frames = []
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        kind, flags = data[pos + 3], data[pos + 4]
        stream = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        if pos + 9 + length > len(data):
            break
        frames.append((kind, flags, stream, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return frames


class Raw(Protocol):
    """
    An HTTP/2 client that writes the frames a test makes and keeps every
    byte rrlb sends back.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.encoder = Encoder()
        self.next_stream = 1

    def connectionMade(self) -> None:
        client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        client.initiate_connection()
        self.transport.write(client.data_to_send())

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        return parse_frames(bytes(self.data))

    def goaway(self) -> Any:
        """
        The error code of the GOAWAY rrlb sent, or L{None}.
        """
        for kind, _, _, payload in self.frames():
            if kind == GOAWAY:
                return struct.unpack("!LL", payload[:8])[1]
        return None

    def resets(self) -> dict[int, int]:
        """
        The error code of each RST_STREAM rrlb sent, by stream.
        """
        return {
            stream: struct.unpack("!L", payload)[0]
            for kind, _, stream, payload in self.frames()
            if kind == RST_STREAM
        }

    def ended(self) -> set[int]:
        """
        The streams rrlb ended (a frame with END_STREAM).
        """
        return {
            stream
            for kind, flags, stream, _ in self.frames()
            if flags & END_STREAM and kind in (0, HEADERS)
        }

    def head(
        self,
        path: bytes = b"/",
        end_headers: bool = True,
        end_stream: bool = True,
        fields: tuple[tuple[bytes, bytes], ...] = (),
    ) -> tuple[int, bytes]:
        """
        A new stream's HEADERS frame for a GET of C{path}.
        """
        stream = self.next_stream
        self.next_stream += 2
        frame = HeadersFrame(stream)
        frame.data = self.encoder.encode(
            [(b":method", b"GET"), (b":path", path), (b":scheme", b"http"),
             (b":authority", b"h2.example"), *fields]
        )  # fmt: skip
        if end_stream:
            frame.flags.add("END_STREAM")
        if end_headers:
            frame.flags.add("END_HEADERS")
        return stream, frame.serialize()


class Writer:
    """
    A producer on a client's transport: paused while its write buffer is
    full.
    """

    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = False


def answer(request: RecordedRequest, conn: BackendConnection) -> bytes:
    return response(body=b"ok")


class ProtectionsTests(HTTP2Case):
    """
    Each protection over a real cleartext (h2c) connection.
    """

    async def setup(self, handler: Any = answer) -> tuple[Any, Any]:
        node = await self.backend(handler)
        balancer = await start_balancer(self, [node.url], "--http2")
        return node, balancer

    async def connect(self, port: int) -> Raw:
        return await connect_aborted_at_cleanup(self, port, Raw())

    async def assert_cut_off(self, client: Raw, balancer: Any, code: int) -> None:
        await wait_for(lambda: client.lost.called, "rrlb to close the connection")
        self.assertEqual(client.goaway(), code)
        await wait_for(lambda: not balancer.service.traffic.site.channels, "the channel gone")

    async def test_stream_cap_refuses_extra_streams(self) -> None:
        """
        A client that opens 300 streams in one write (ignoring the 100 it
        was told) gets REFUSED_STREAM on the 200 beyond the cap, and the
        first 100 answered, on a connection that stays open: h2 opens all
        of them before rrlb sees the first, and does not end the
        connection for it.
        """
        held: list[BackendConnection] = []
        node, balancer = await self.setup(lambda request, conn: held.append(conn))
        client = await self.connect(balancer.port)
        extra = MAX_RESETS
        heads = [client.head(b"/%d" % i) for i in range(MAX_STREAMS + extra)]
        client.transport.write(b"".join(frame for _, frame in heads))
        ids = [stream for stream, _ in heads]
        await wait_for(lambda: len(client.resets()) >= extra, "the refusals")
        self.assertEqual(client.resets(), {s: ErrorCodes.REFUSED_STREAM for s in ids[MAX_STREAMS:]})
        await wait_for(lambda: len(held) == MAX_STREAMS, "100 requests at the node")
        for conn in held:
            conn.transport.write(response(body=b"late"))
        await wait_for(lambda: client.ended() >= set(ids[:MAX_STREAMS]), "100 answers")
        self.assertIsNone(client.goaway())
        self.assertFalse(client.lost.called)

    async def test_answered_before_the_body_ends(self) -> None:
        """
        Streams answered (here refused, 400) while the client may still send
        a body are reset with NO_ERROR after the answer (RFC 9113 8.1), so
        none stays open: 300 of them, more than twice the stream limit, on
        one connection that carries on.
        """
        node, balancer = await self.setup()
        client = await self.connect(balancer.port)
        heads = [client.head(end_stream=False, fields=((b"X-Upper", b"1"),)) for _ in range(300)]
        client.transport.write(b"".join(frame for _, frame in heads))
        ids = [stream for stream, _ in heads]
        await wait_for(lambda: len(client.resets()) == 300, "300 resets")
        self.assertEqual(client.resets(), {s: ErrorCodes.NO_ERROR for s in ids})
        statuses = [payload for kind, _, _, payload in client.frames() if kind == HEADERS]
        self.assertEqual(len(statuses), 300)
        self.assertIsNone(client.goaway())
        self.assertFalse(client.lost.called)
        self.assertEqual(node.requests, [])

    async def test_rapid_reset(self) -> None:
        """
        A client that opens streams and resets each at once (CVE-2023-44487)
        is told GOAWAY ENHANCE_YOUR_CALM past MAX_RESETS, and the node saw
        no more requests than that.
        """
        node, balancer = await self.setup(lambda request, conn: None)
        client = await self.connect(balancer.port)
        for _ in range(10):
            batch = []
            for _ in range(100):
                stream, frame = client.head()
                batch += [frame, RstStreamFrame(stream, error_code=8).serialize()]
            if client.lost.called:
                break
            client.transport.write(b"".join(batch))
        await self.assert_cut_off(client, balancer, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertLessEqual(len(node.requests), MAX_RESETS + MAX_STREAMS)

    async def test_continuation_flood(self) -> None:
        """
        A HEADERS frame followed by CONTINUATION frames that never end the
        block is a connection error past h2's 64 frames: one GOAWAY
        (PROTOCOL_ERROR), and the connection closes without rrlb keeping
        what follows.
        """
        node, balancer = await self.setup()
        client = await self.connect(balancer.port)
        stream, frame = client.head(end_headers=False)
        client.transport.write(frame)
        flood = ContinuationFrame(stream)
        flood.data = b"\x00" * 16000
        piece = flood.serialize()
        for _ in range(200):
            if client.lost.called:
                break
            client.transport.write(piece)
        await wait_for(lambda: client.lost.called, "rrlb to close the connection")
        # One GOAWAY, h2's, with its error code.
        goaways = [f for f in client.frames() if f[0] == GOAWAY]
        self.assertEqual(len(goaways), 1)
        self.assertEqual(client.goaway(), ErrorCodes.PROTOCOL_ERROR)
        self.assertEqual(node.requests, [])

    async def test_header_list_too_large(self) -> None:
        """
        A header block that HPACK inflates past SETTINGS_MAX_HEADER_LIST_SIZE
        (a 70 KiB value) ends the connection with GOAWAY; no node sees it.
        """
        node, balancer = await self.setup()
        client = await self.connect(balancer.port)
        block = client.encoder.encode(
            [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
             (b":authority", b"h2.example"), (b"x-big", b"v" * 70000)],
            huffman=False,
        )  # fmt: skip
        # More than one frame's worth: HEADERS and CONTINUATION frames.
        first = HeadersFrame(1, data=block[:16000])
        first.flags.add("END_STREAM")
        pieces = [first.serialize()]
        rest = block[16000:]
        while rest:
            cont = ContinuationFrame(1, data=rest[:16000])
            rest = rest[16000:]
            if not rest:
                cont.flags.add("END_HEADERS")
            pieces.append(cont.serialize())
        client.transport.write(b"".join(pieces))
        await self.assert_cut_off(client, balancer, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertEqual(node.requests, [])

    async def test_settings_flood(self) -> None:
        """
        More than MAX_SETTINGS SETTINGS frames within the window: GOAWAY
        ENHANCE_YOUR_CALM.
        """
        node, balancer = await self.setup()
        client = await self.connect(balancer.port)
        frame = SettingsFrame(0, settings={4: 65535}).serialize()
        client.transport.write(frame * (MAX_SETTINGS + 50))
        await self.assert_cut_off(client, balancer, ErrorCodes.ENHANCE_YOUR_CALM)

    async def test_ping_flood(self) -> None:
        """
        More than MAX_PINGS PING frames within the window: GOAWAY
        ENHANCE_YOUR_CALM (the PINGs of the same read are answered: h2
        answers as it reads, rrlb counts after).
        """
        node, balancer = await self.setup()
        client = await self.connect(balancer.port)
        client.transport.write(PingFrame(0, opaque_data=b"12345678").serialize() * (MAX_PINGS + 50))
        await self.assert_cut_off(client, balancer, ErrorCodes.ENHANCE_YOUR_CALM)
        acks = [f for f in client.frames() if f[0] == 0x6 and f[1] & 0x1]
        self.assertLessEqual(len(acks), MAX_PINGS + 50)

    async def test_answers_to_a_client_that_does_not_read(self) -> None:
        """
        A client that does not read and sends empty DATA frames on a stream
        it reset (h2 answers each with RST_STREAM) is cut off once rrlb
        has written MAX_UNREAD bytes it did not take; before, they piled up
        in rrlb's transport.
        """
        node, balancer = await self.setup(lambda request, conn: None)
        client = await self.connect(balancer.port)
        client.transport.pauseProducing()
        stream, frame = client.head()
        client.transport.write(frame + RstStreamFrame(stream, error_code=8).serialize())
        empty = DataFrame(stream).serialize()
        batch = empty * 10000
        writer = Writer()
        client.transport.registerProducer(writer, True)
        channels = balancer.service.traffic.site.channels
        # Enough answers to fill the socket buffers and MAX_UNREAD several
        # times over; each batch once the client's own buffer drained.
        for _ in range(2000):
            if client.lost.called or not channels:
                break
            client.transport.write(batch)
            await wait_for(
                lambda: not writer.paused or client.lost.called or not channels,
                "the client's writes to drain",
            )
        await wait_for(lambda: not balancer.service.traffic.site.channels, "rrlb to cut it off")
        self.assertGreater(MAX_UNREAD, 0)


def rss(pid: int) -> int:
    """
    The resident set size of process C{pid}, in bytes.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def continuation_flood(client: Raw) -> bytes:
    stream, frame = client.head(end_headers=False)
    flood = ContinuationFrame(stream, data=b"\x00" * 16000).serialize()
    return frame + flood * 100


def rapid_reset(client: Raw) -> bytes:
    frames = []
    for _ in range(MAX_RESETS + 100):
        stream, frame = client.head()
        frames += [frame, RstStreamFrame(stream, error_code=8).serialize()]
    return b"".join(frames)


def ping_flood(client: Raw) -> bytes:
    return PingFrame(0, opaque_data=b"12345678").serialize() * (MAX_PINGS + 100)


def settings_flood(client: Raw) -> bytes:
    return SettingsFrame(0, settings={4: 65535}).serialize() * (MAX_SETTINGS + 100)


class FloodMemoryTests(HTTP2Case):
    """
    rrlb as a process under every flood at once, from many connections.
    """

    timeout = 120
    connect = ProtectionsTests.connect

    async def test_memory_bounded(self) -> None:
        """
        Rounds of 10 connections each of the CONTINUATION, rapid-reset,
        PING and SETTINGS floods: every connection is cut off, and rrlb's
        RSS grows by less than 32 MiB over the first round's.
        """
        node = await self.backend(lambda request, conn: None)
        daemon = await start_daemon(
            self, "--listen", "tcp:0:interface=127.0.0.1", "--http2", "--nodes", node.url,
            "--health-interval", "3600", listen_fds=False,
        )  # fmt: skip
        await daemon.wait_for_message("READY=1")
        found = re.search(rb"starting on (\d+)", daemon.output)
        assert found is not None, daemon.output
        port = int(found.group(1))
        pid = daemon.transport.pid
        floods: list[Callable[[Raw], bytes]] = [
            continuation_flood,
            rapid_reset,
            ping_flood,
            settings_flood,
        ]
        before = 0
        for round in range(FLOOD_ROUNDS):
            clients = []
            for flood in floods:
                for _ in range(FLOOD_CONNECTIONS):
                    client = await self.connect(port)
                    client.transport.write(flood(client))
                    clients.append(client)
            for client in clients:
                await client.lost
                self.assertIsNotNone(client.goaway())
            if not round:
                before = rss(pid)
        after = rss(pid)
        self.assertLess(after - before, FLOOD_GROWTH, f"RSS {before} -> {after}")
