"""
HTTP/2 held to bounded memory and bounded descriptors (issue 17), over real
loopback TLS, with rrlb as a daemon process so that its RSS and its open
descriptors can be read from C{/proc}:

  - a client that advertises the largest windows and stops reading its
    socket makes rrlb hold a bounded amount for it: its node connections are
    paused, and everybody else is still served;
  - request bodies sent to a node that does not read are read from the
    client only as far as the node takes them;
  - streams beyond what C{--max-connections} allows in descriptors are
    refused with C{REFUSED_STREAM}, so three connections of 100 slow streams
    each do not take a process limited to 300 descriptors to C{EMFILE}.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import ssl
import sys
import termios
from typing import Any, Callable, Optional

import h2.config
import h2.connection
import h2.errors
import h2.events
from h2.settings import SettingCodes
from twisted.internet import defer, threads
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import http
from twisted.web.resource import Resource

from rrlb.clients import ClientLimits, ClientSite
from rrlb.http1 import EDGE_OFF
from tests.support import (
    LOOPBACK,
    WAIT_TIMEOUT,
    BackendConnection,
    Daemon,
    H2Client,
    HTTP2Case,
    RecordedRequest,
    https_get,
    peer_window,
    reactor,
    response,
    start_daemon,
    wait_for_value,
    wait_until,
)

# The figures: each stream GETs 300 MB, and rrlb may grow by less
# than 32 MB for the whole client.
BIG = 300_000_000
RSS_GROWTH = 32 << 20
# What a node may have sent before the test calls the growth unbounded:
# well past every socket buffer between it and rrlb.
UNBOUNDED = 400 << 20
# The most time a transfer may take to stall.
STALL_TIMEOUT = 30.0
CHUNK = b"x" * 65536
LARGEST_WINDOW = 2**31 - 1


def rss(pid: int) -> int:
    """
    The resident set size of process C{pid}, in bytes.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def descriptors(pid: int) -> int:
    """
    The open file descriptors of process C{pid}.
    """
    return len(os.listdir(f"/proc/{pid}/fd"))


class NodeConnection(Protocol):
    """
    One connection to a L{Node}: C{/big} is answered with L{BIG} bytes
    streamed with backpressure, C{/sink} is never answered and its body
    never read, anything else gets C{ok}.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.buffer = b""
        self.remaining = 0
        self.paused = False
        self.closed = False

    def connectionMade(self) -> None:
        self.node.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer and not self.remaining:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            if path.startswith(b"/big"):
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
                self.remaining = BIG
                self.node.streaming.append(self)
                self.transport.registerProducer(self, True)
                self.resumeProducing()
            elif path.startswith(b"/sink"):
                self.node.sinks.append(self)
                self.transport.pauseProducing()
                return
            else:
                self.transport.write(response(body=b"ok"))

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.remaining > 0:
            piece = CHUNK if self.remaining >= len(CHUNK) else CHUNK[: self.remaining]
            self.remaining -= len(piece)
            self.node.sent += len(piece)
            self.transport.write(piece)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.remaining = 0

    def connectionLost(self, reason: Failure) -> None:
        self.closed = True


class Node(Factory):
    """
    A node on 127.0.0.1 port 0 (see L{NodeConnection}).
    """

    noisy = False

    def __init__(self) -> None:
        self.connections: list[NodeConnection] = []
        self.streaming: list[NodeConnection] = []
        self.sinks: list[NodeConnection] = []
        self.sent = 0
        self.port: Any = None

    def buildProtocol(self, addr: Any) -> NodeConnection:
        return NodeConnection(self)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port.getHost().port}"

    async def stop(self) -> None:
        await defer.maybeDeferred(self.port.stopListening)
        for connection in self.connections:
            if not connection.closed:
                connection.transport.abortConnection()


def stuck_client(port: int, streams: int) -> ssl.SSLSocket:
    """
    Open an HTTP/2 connection over TLS with a 4 KiB receive buffer that
    advertises the largest windows and frames (stream and connection),
    start C{streams} GETs of C{/big}, and return its socket, never read.
    """
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(WAIT_TIMEOUT)
    raw.connect((LOOPBACK, port))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    tls = context.wrap_socket(raw, server_hostname="a.test")
    if tls.selected_alpn_protocol() != "h2":
        raise AssertionError(f"ALPN chose {tls.selected_alpn_protocol()!r}, not h2")
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    conn.update_settings(
        {SettingCodes.INITIAL_WINDOW_SIZE: LARGEST_WINDOW, SettingCodes.MAX_FRAME_SIZE: 2**24 - 1}
    )
    conn.increment_flow_control_window(LARGEST_WINDOW - 65535)
    for _ in range(streams):
        conn.send_headers(
            conn.get_next_available_stream_id(),
            [(b":method", b"GET"), (b":path", b"/big"), (b":scheme", b"https"),
             (b":authority", b"a.test")],
            end_stream=True,
        )  # fmt: skip
    tls.sendall(conn.data_to_send())
    return tls


async def settle(
    stalled: Callable[[], Any], moved: Callable[[], int], pid: int, limit: int
) -> tuple[int, int]:
    """
    Sample rrlb's RSS until the awaitable C{stalled()} says the transfer
    can move nothing more (rrlb stopped taking it), or C{moved()} (the bytes
    it moved) passes C{limit} (then it is not bounded). Fails after
    L{STALL_TIMEOUT}. Returns the highest RSS seen and C{moved()} at the end.
    """
    highest = rss(pid)

    async def done() -> bool:
        nonlocal highest
        highest = max(highest, rss(pid))
        return moved() > limit or await stalled()

    await wait_for_value(done, "the transfer to stall", STALL_TIMEOUT)
    return max(highest, rss(pid)), moved()


def unread_bytes(transport: Any) -> int:
    """
    What the kernel received on C{transport}'s socket that was not read.
    """
    count = fcntl.ioctl(transport.getHandle().fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(count, sys.byteorder)


def nodes_stuck(node: Node) -> Callable[[], Any]:
    """
    Whether every connection of C{node} streaming an answer is stuck:
    Twisted paused it (its write buffer is full) and rrlb's socket
    advertises a zero window (rrlb stopped reading it); or it is closed.
    """

    async def stuck() -> bool:
        return all(
            c.closed or (c.paused and peer_window(c.transport) == 0) for c in node.streaming
        )

    return stuck


class BoundsCase(HTTP2Case):
    timeout = 120

    async def node(self) -> Node:
        node = Node()
        node.port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(node)
        self.addCleanup(node.stop)
        return node

    async def daemon(self, nodes: str, *args: str, wrapper: tuple[str, ...] = ()) -> Daemon:
        """
        rrlb as a process, serving TLS with --http2 on a port of its own
        choosing (read from its log).
        """
        # The daemon runs from the repository root: absolute paths.
        cert, key = map(os.path.abspath, self.write_pair("site", self.certs.site_a))
        daemon = await start_daemon(
            self,
            "--listen",
            "ssl:0:interface=127.0.0.1",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--http2",
            "--nodes",
            nodes,
            "--health-interval",
            "3600",
            *args,
            listen_fds=False,
            wrapper=wrapper,
        )
        await daemon.wait_for_message("READY=1")
        found = re.search(rb"\(TLS\) starting on (\d+)", daemon.output)
        assert found is not None, daemon.output
        daemon.port = int(found.group(1))
        return daemon

    async def get(self, port: int, path: bytes = b"/small") -> tuple[int, bytes]:
        client = await self.h2_connect(port)
        _, answer = client.request(b"GET", path)
        await answer.done
        client.transport.loseConnection()
        return answer.status, bytes(answer.body)


class SlowReaderTests(BoundsCase):
    """
    A client that does not read its socket, whatever windows it advertises.
    """

    async def test_client_that_does_not_read(self) -> None:
        """
        A client advertising 2^31-1 windows opens 10 streams of 300 MB each
        and stops reading (SO_RCVBUF 4096): rrlb grows by less than 32 MB,
        the node stops sending (its connections are paused), rrlb keeps
        serving other clients, and when the client goes its node
        connections are closed.
        """
        node = await self.node()
        daemon = await self.daemon(node.url)
        pid = daemon.transport.pid
        # The first HTTP/2 connection loads what every later one shares.
        self.assertEqual(await self.get(daemon.port), (200, b"ok"))
        before = rss(pid)
        stuck = await threads.deferToThread(stuck_client, daemon.port, 10)
        self.addCleanup(stuck.close)
        await wait_until(lambda: len(node.streaming) == 10, WAIT_TIMEOUT, "10 streams at the node")
        highest, sent = await settle(nodes_stuck(node), lambda: node.sent, pid, UNBOUNDED)
        self.assertLess(sent, UNBOUNDED, "rrlb read on from the node")
        self.assertLess(highest - before, RSS_GROWTH, f"RSS {before} -> {highest}")
        # Everybody else is served meanwhile, over HTTP/2 and HTTP/1.1.
        self.assertEqual(await self.get(daemon.port), (200, b"ok"))

        code, body, _ = await https_get(
            self, f"https://127.0.0.1:{daemon.port}/small", self.certs.ca
        )
        self.assertEqual((code, body), (200, b"ok"))
        highest, sent = await settle(nodes_stuck(node), lambda: node.sent, pid, UNBOUNDED)
        self.assertLess(highest - before, RSS_GROWTH, f"RSS {before} -> {highest}")
        stuck.close()
        await wait_until(
            lambda: all(c.closed for c in node.streaming),
            WAIT_TIMEOUT,
            "rrlb to close the stuck client's node connections",
        )


class UploadBoundsTests(BoundsCase):
    """
    Request bodies to a node that does not read.
    """

    async def test_bodies_to_a_node_that_does_not_read(self) -> None:
        """
        Ten 100 MB uploads on one connection to a node that never reads:
        rrlb reads from the client only what the node's connection takes
        (the client's windows stay closed), and grows by less than 32 MB.
        """
        node = await self.node()
        daemon = await self.daemon(node.url)
        pid = daemon.transport.pid
        self.assertEqual(await self.get(daemon.port), (200, b"ok"))
        before = rss(pid)
        client = await self.h2_connect(daemon.port, Uploader())
        size = 100 << 20
        started = [
            client.request(
                b"POST", b"/sink", None, ((b"content-length", b"%d" % size),), end=False
            )
            for _ in range(10)
        ]
        for _, answer in started:
            # The node never answers: the connection's end ends them.
            answer.done.addErrback(lambda failure: None)
        client.upload({stream: size for stream, _ in started})
        await wait_until(lambda: len(node.sinks) == 10, WAIT_TIMEOUT, "10 requests at the node")

        def unread() -> list[int]:
            return [unread_bytes(c.transport) for c in node.sinks]

        async def stuck() -> bool:
            # Nothing moved, to the node or from the client, while a PING
            # went to rrlb and back.
            before = unread()
            return await client.stalled() and unread() == before

        highest, total = await settle(stuck, lambda: client.sent, pid, UNBOUNDED)
        client.stopped = True
        self.assertLess(total, UNBOUNDED)
        self.assertLess(highest - before, RSS_GROWTH, f"RSS {before} -> {highest}")
        self.assertEqual(await self.get(daemon.port), (200, b"ok"))


class Uploader(H2Client):
    """
    An HTTP/2 client that sends its request bodies as far as the windows
    allow, and sends on each time rrlb opens them, as a client does.
    """

    def __init__(self) -> None:
        super().__init__()
        # What each upload has left to send.
        self.left: dict[int, int] = {}
        self.sent = 0
        self.stopped = False

    def upload(self, sizes: dict[int, int]) -> None:
        """
        Send C{sizes[stream]} bytes on each stream, in turns.
        """
        self.left.update(sizes)
        self.fill()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        # Windows open only on what rrlb sends (WINDOW_UPDATE, SETTINGS).
        self.fill()

    def fill(self) -> None:
        moved = True
        while moved and not self.stopped:
            moved = False
            for stream, left in self.left.items():
                if self.responses[stream].done.called:
                    continue
                piece = min(self.conn.local_flow_control_window(stream), left, 16384)
                if piece > 0:
                    self.conn.send_data(stream, b"u" * piece)
                    self.left[stream] -= piece
                    self.sent += piece
                    moved = True
        self.flush()

    async def stalled(self) -> bool:
        """
        Whether rrlb read all that was sent (a PING comes back after it)
        and opened no window meanwhile: nothing more moves until it does.
        """
        sent = self.sent
        await self.ping()
        return self.sent == sent


class DescriptorTests(BoundsCase):
    """
    HTTP/2 streams count against --max-connections: the cap holds in file
    descriptors.
    """

    async def test_no_emfile_under_prlimit(self) -> None:
        """
        Under prlimit --nofile=300:300, three HTTP/2 connections of 100
        streams each to a node that holds its answers: every stream either
        reaches the node or is refused with REFUSED_STREAM (none gets a 5xx),
        rrlb stays under its descriptor limit and never logs EMFILE, and the
        streams it took are answered once the node answers.
        """
        prlimit = shutil.which("prlimit")
        if prlimit is None:
            raise self.skipTest("prlimit (util-linux) is not installed")
        held: list[BackendConnection] = []

        def hold(request: RecordedRequest, conn: BackendConnection) -> Optional[bytes]:
            if request.target == b"/small":
                return response(body=b"ok")
            held.append(conn)
            return None

        node = await self.backend(hold)
        daemon = await self.daemon(node.url, wrapper=(prlimit, "--nofile=300:300"))
        pid = daemon.transport.pid
        clients: list[H2Client] = [await self.h2_connect(daemon.port) for _ in range(3)]
        answers = [
            client.request(b"GET", b"/slow/%d/%d" % (c, i))[1]
            for c, client in enumerate(clients)
            for i in range(100)
        ]

        def refused() -> list[Any]:
            return [a for a in answers if a.reset == h2.errors.ErrorCodes.REFUSED_STREAM]

        def answered() -> list[Any]:
            return [a for a in answers if a.done.called and a.reset is None]

        await wait_until(
            lambda: len(held) + len(refused()) + len(answered()) == 300,
            30.0,
            "every stream at the node, refused or answered",
        )
        fds = descriptors(pid)
        self.assertEqual([a.status for a in answered()], [])
        self.assertGreater(len(held), 50)
        self.assertLess(fds, 300)
        self.assertNotIn(b"Too many open files", daemon.output)
        self.assertNotIn(b"EMFILE", daemon.output)
        for conn in held:
            conn.transport.write(response(body=b"late"))
        taken = [a for a in answers if a.reset is None]
        done = await defer.gatherResults([a.done for a in taken])
        self.assertEqual({(a.status, bytes(a.body)) for a in done}, {(200, b"late")})
        # The places are free again: a refused stream sent again is served.
        self.assertEqual(await self.get(daemon.port), (200, b"ok"))
        self.assertNotIn(b"Too many open files", daemon.output)


# -- the same rules at Twisted's seams: task.Clock and StringTransport -------------


class Producer:
    """
    A response producer (what a node connection is to a stream).
    """

    def __init__(self) -> None:
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class Answering(http.Request):
    """
    A request that registers a L{Producer} and writes what the test says.
    """

    body = None
    exchange = None

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # rrlb's streams leave the body to rrlb.body (content is None).
        self.method, self.uri, self.clientproto = command, path, version
        self.process()

    def process(self) -> None:
        self.producer_ = Producer()
        self.registerProducer(self.producer_, True)
        self.channel.conn.requests.append(self)

    def write_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.channel.write_trailers(self, headers)


class StubChannel:
    """
    What L{H2ServerConnection} and its streams ask of their L{ALPNChannel}.
    """

    def __init__(self, site: ClientSite, clock: Clock, transport: StringTransport) -> None:
        self.site = site
        self.clock = clock
        self.transport = transport
        self.peer = IPv4Address("TCP", "127.0.0.1", 1)
        self.local = IPv4Address("TCP", "127.0.0.1", 2)
        self.forwarded = (b"https", b"127.0.0.1")
        self.edge = EDGE_OFF
        self.client_cert = None
        self.deadline: Optional[float] = None
        self._state = 0


class StreamBufferTests(unittest.TestCase):
    """
    What one HTTP/2 connection holds for its client, the places its streams
    take under --max-connections, and how its responses end, driven by hand.
    """

    def connect(
        self, max_connections: int = 1000, large: bool = True
    ) -> tuple[Any, Any, StringTransport, Clock]:
        """
        A connection and an h2 client for it; with C{large}, the client
        advertises the largest windows.
        """
        from rrlb.http2 import H2ServerConnection

        clock = Clock()
        site = ClientSite(Resource(), clock, ClientLimits(max_connections=max_connections))
        site.requestFactory = Answering
        transport = StringTransport()
        channel = StubChannel(site, clock, transport)
        site.channels.add(channel)  # type: ignore[arg-type]
        conn = H2ServerConnection(channel)  # type: ignore[arg-type]
        conn.requests = []  # type: ignore[attr-defined]
        client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        client.initiate_connection()
        if large:
            client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: LARGEST_WINDOW})
            client.increment_flow_control_window(LARGEST_WINDOW - 65535)
        conn.dataReceived(client.data_to_send())
        client.receive_data(transport.value())
        transport.clear()
        self.addCleanup(conn.connectionLost, Failure(ConnectionDone()))
        return conn, client, transport, clock

    def streams(self, conn: Any, client: Any, count: int) -> list[int]:
        ids = []
        for _ in range(count):
            stream = client.get_next_available_stream_id()
            client.send_headers(
                stream,
                [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"),
                 (b":authority", b"a")],
                end_stream=True,
            )  # fmt: skip
            ids.append(stream)
        conn.dataReceived(client.data_to_send())
        return ids

    def received(self, client: Any, transport: StringTransport, clock: Clock) -> list[Any]:
        """
        The events of what the connection sent the client so far.
        """
        clock.advance(0)
        events = client.receive_data(transport.value())
        transport.clear()
        return events  # type: ignore[no-any-return]

    def test_stream_buffer(self) -> None:
        """
        A stream's node is paused once the client's window is used up and
        bytes wait, and for STREAM_FULL past STREAM_BUFFER queued; both are
        lifted once the client's window takes the queue.
        """
        from rrlb.h2buffers import STREAM_BUFFER, STREAM_FULL, WINDOW

        conn, client, transport, clock = self.connect(large=False)
        (stream,) = self.streams(conn, client, 1)
        (request,) = conn.requests
        request.write(b"a" * 65535)
        clock.advance(0)  # the turn ends: what the stream held back goes out
        self.assertFalse(request.producer_.paused)
        request.write(b"a")
        clock.advance(0)
        self.assertTrue(request.producer_.paused)
        self.assertEqual(request.channel.paused_for, WINDOW)
        request.write(b"a" * STREAM_BUFFER)
        self.assertEqual(request.channel.paused_for, WINDOW | STREAM_FULL)
        self.assertEqual(conn.queued, STREAM_BUFFER + 1)
        client.increment_flow_control_window(LARGEST_WINDOW - 65535)
        client.increment_flow_control_window(LARGEST_WINDOW - 65535, stream)
        conn.dataReceived(client.data_to_send())
        self.assertFalse(request.producer_.paused)
        self.assertEqual(conn.queued, 0)
        events = self.received(client, transport, clock)
        got = sum(len(e.data) for e in events if isinstance(e, h2.events.DataReceived))
        self.assertEqual(got, 65535 + 1 + STREAM_BUFFER)

    def test_connection_buffer(self) -> None:
        """
        Past CONNECTION_BUFFER queued on all streams, every stream's node is
        paused, those that queued nothing too, until half of it went out.
        """
        from rrlb.h2buffers import CONNECTION_BUFFER, STREAM_BUFFER

        conn, client, transport, clock = self.connect(large=False)
        count = CONNECTION_BUFFER // STREAM_BUFFER + 2
        ids = self.streams(conn, client, count)
        requests = conn.requests
        for request in requests[:-1]:
            request.write(b"b" * STREAM_BUFFER)
        clock.advance(0)
        self.assertGreater(conn.queued, CONNECTION_BUFFER)
        self.assertTrue(all(r.producer_.paused for r in requests))
        client.increment_flow_control_window(LARGEST_WINDOW - 65535)
        for stream in ids:
            client.increment_flow_control_window(LARGEST_WINDOW - 65535, stream)
        conn.dataReceived(client.data_to_send())
        self.assertFalse(requests[-1].producer_.paused)
        self.assertLessEqual(conn.queued, CONNECTION_BUFFER // 2)

    def test_socket_full(self) -> None:
        """
        The transport's pause (the client's socket does not drain) pauses
        every stream's node, and a stream that starts meanwhile, and what
        they write waits; its resume sends it and resumes them.
        """
        conn, client, transport, clock = self.connect()
        self.streams(conn, client, 2)
        conn.pauseProducing()
        self.streams(conn, client, 1)
        self.assertEqual([r.producer_.paused for r in conn.requests], [True] * 3)
        conn.requests[0].write(b"held")
        clock.advance(0)
        self.assertEqual(conn.queued, 4)
        conn.resumeProducing()
        self.assertEqual([r.producer_.paused for r in conn.requests], [False] * 3)
        self.assertEqual(conn.queued, 0)
        events = self.received(client, transport, clock)
        self.assertIn(b"held", [e.data for e in events if isinstance(e, h2.events.DataReceived)])

    def test_reset_stream_unqueued(self) -> None:
        """
        A stream reset with bytes still queued takes them off the
        connection's count.
        """
        from rrlb.h2buffers import STREAM_BUFFER

        conn, client, transport, clock = self.connect(large=False)
        (stream,) = self.streams(conn, client, 1)
        conn.requests[0].write(b"c" * (65535 + STREAM_BUFFER))
        clock.advance(0)
        self.assertEqual(conn.queued, STREAM_BUFFER)
        client.reset_stream(stream)
        conn.dataReceived(client.data_to_send())
        self.assertEqual(conn.queued, 0)

    def test_streams_take_places(self) -> None:
        """
        Each stream beyond a connection's first takes a place under
        --max-connections; with none left a new stream is refused with
        REFUSED_STREAM, and a place is given back when a stream ends.
        """
        conn, client, transport, clock = self.connect(max_connections=3)
        site = conn.channel.site
        ids = self.streams(conn, client, 4)
        self.assertEqual(len(conn.requests), 3)
        self.assertEqual(site.streams, 2)
        self.assertTrue(site.paused)
        events = self.received(client, transport, clock)
        resets = [e for e in events if isinstance(e, h2.events.StreamReset)]
        self.assertEqual(
            [(e.stream_id, e.error_code) for e in resets],
            [(ids[3], h2.errors.ErrorCodes.REFUSED_STREAM)],
        )
        request = conn.requests[1]
        request.unregisterProducer()
        request.finish()
        self.assertEqual(site.streams, 1)
        self.assertFalse(site.paused)
        (again,) = self.streams(conn, client, 1)
        self.assertEqual(len(conn.requests), 4)
        self.assertEqual(site.streams, 2)
        conn.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(site.streams, 0)

    def test_stream_limit_refuses(self) -> None:
        """
        A stream beyond MAX_STREAMS open at once is refused with
        REFUSED_STREAM, not a GOAWAY: the connection and its other streams
        carry on, and a stream opened once one ended is served.
        """
        from rrlb.http2 import MAX_STREAMS

        conn, client, transport, clock = self.connect()
        # The client obeys the limit it was told; a rude one does not.
        client.remote_settings.max_concurrent_streams = 2**31 - 1
        client.remote_settings.acknowledge()
        ids = self.streams(conn, client, MAX_STREAMS + 1)
        self.assertEqual(len(conn.streams), MAX_STREAMS)
        events = self.received(client, transport, clock)
        resets = [e for e in events if isinstance(e, h2.events.StreamReset)]
        self.assertEqual(
            [(e.stream_id, e.error_code) for e in resets],
            [(ids[-1], h2.errors.ErrorCodes.REFUSED_STREAM)],
        )
        self.assertFalse([e for e in events if isinstance(e, h2.events.ConnectionTerminated)])
        request = conn.requests[0]
        request.unregisterProducer()
        request.finish()
        self.streams(conn, client, 1)
        self.assertEqual(len(conn.streams), MAX_STREAMS)

    def test_priority_frames_for_other_streams(self) -> None:
        """
        PRIORITY frames naming 1,500 streams that are not open (and open
        streams depending on them) raise nothing and keep nothing; the
        connection serves its streams as before.
        """
        from hyperframe.frame import PriorityFrame

        conn, client, transport, clock = self.connect()
        (stream,) = self.streams(conn, client, 1)
        frames = [
            PriorityFrame(2 * i + 101, depends_on=0, stream_weight=15).serialize()
            for i in range(1500)
        ]
        frames += [
            PriorityFrame(stream, depends_on=2 * i + 3001, stream_weight=15).serialize()
            for i in range(1500)
        ]
        conn.dataReceived(b"".join(frames))
        self.assertEqual(list(conn.streams), [stream])
        request = conn.requests[0]
        request.unregisterProducer()
        request.write(b"ok")
        request.finish()
        events = self.received(client, transport, clock)
        self.assertIn(stream, [e.stream_id for e in events if isinstance(e, h2.events.StreamEnded)])


class ResponseEndTests(unittest.TestCase):
    """
    How a response ends on its stream: trailers, and a response with no
    body in one HEADERS frame.
    """

    connect = StreamBufferTests.connect
    streams = StreamBufferTests.streams
    received = StreamBufferTests.received

    def answer(self, write: Callable[[Any], None]) -> list[Any]:
        conn, client, transport, clock = self.connect()
        self.streams(conn, client, 1)
        request = conn.requests[0]
        request.unregisterProducer()
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/grpc"])
        write(request)
        request.finish()
        return self.received(client, transport, clock)

    def test_trailers(self) -> None:
        """
        write_trailers before finish ends the stream with a HEADERS frame
        carrying them, after the body.
        """

        def write(request: Any) -> None:
            request.write(b"message")
            request.write_trailers([(b"grpc-status", b"0"), (b"grpc-message", b"")])

        events = self.answer(write)
        kinds = [e.__class__ for e in events if e.__class__ is not h2.events.SettingsAcknowledged]
        self.assertEqual(
            kinds,
            [h2.events.ResponseReceived, h2.events.DataReceived, h2.events.TrailersReceived,
             h2.events.StreamEnded],
        )  # fmt: skip
        (trailers,) = [e for e in events if isinstance(e, h2.events.TrailersReceived)]
        self.assertEqual(trailers.headers, [(b"grpc-status", b"0"), (b"grpc-message", b"")])

    def test_trailers_only(self) -> None:
        """
        Trailers with no body: the head, then a HEADERS frame with them and
        END_STREAM, and no DATA frame.
        """
        events = self.answer(lambda request: request.write_trailers([(b"grpc-status", b"14")]))
        self.assertFalse([e for e in events if isinstance(e, h2.events.DataReceived)])
        (trailers,) = [e for e in events if isinstance(e, h2.events.TrailersReceived)]
        self.assertEqual(trailers.headers, [(b"grpc-status", b"14")])

    def test_no_body_one_headers_frame(self) -> None:
        """
        A response finished with no body written goes out as one HEADERS
        frame with END_STREAM (gRPC's trailers-only form), no DATA frame.
        """
        events = self.answer(lambda request: None)
        (head,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        self.assertIsNotNone(head.stream_ended)
        self.assertIn((b"content-type", b"application/grpc"), head.headers)
        self.assertFalse([e for e in events if isinstance(e, h2.events.DataReceived)])

    def test_last_write_carries_the_end(self) -> None:
        """
        A body written in the same turn as the end goes out as HEADERS and
        one DATA frame with END_STREAM: no empty DATA frame after it.
        """
        events = self.answer(lambda request: request.write(b"body"))
        (data,) = [e for e in events if isinstance(e, h2.events.DataReceived)]
        self.assertEqual(data.data, b"body")
        self.assertIsNotNone(data.stream_ended)
