"""
Peers that do not read (issue 17): whatever one side sends, what rrlb holds
for a client or a node that stops reading stays bounded, and rrlb's CPU
does not grow with what was sent.

Each test runs a real rrlb process (L{tests.daemon}) and reads its memory
(VmRSS) and CPU time from C{/proc}; the node is a raw Twisted protocol in
the test process, and the clients that do not read are plain sockets with a
4 KiB receive buffer, driven from a thread so that their blocking sends
never block the reactor. Every push is bounded in bytes and in time: it
ends when it has sent its total, when rrlb has taken nothing for
L{STALL_SECONDS} (rrlb stopped reading, the point of the test), or after
L{PUSH_SECONDS}.
"""

from __future__ import annotations

import os
import select
import socket
import time
from typing import Any, Callable, Optional

from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from rrlb.clients import LINGER_TIMEOUT
from tests.support import LOOPBACK, Daemon, peer_window, raw_request, start_daemon, wait_until

reactor: Any = _reactor

MB = 1 << 20
# What rrlb may grow by while a peer does not read (the bound).
RSS_BOUND = 16 * MB
# CPU seconds rrlb may spend while a peer pushes what it will not read: a
# bounded buffer costs next to nothing; on the unbounded one rrlb spent 11 s
# of CPU per 60 MB.
CPU_BOUND = 2.0
# A refused client is read (and what it sends dropped) for the lingering
# close: up to LINGER_TIMEOUT seconds of reading as fast as it sends.
LINGER_CPU = LINGER_TIMEOUT + CPU_BOUND
# What a pushing peer tries to send.
PUSH_TOTAL = 100 * MB
# A push ends when rrlb took nothing for this long...
STALL_SECONDS = 2.0
# ... or after this long in all.
PUSH_SECONDS = 20.0
RCVBUF = 4096
PIPELINED = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
# 64 KiB of whole pipelined requests.
PIPELINED_BLOCK = PIPELINED * (65536 // len(PIPELINED))
BLOCK = b"n" * 65536
UPGRADE = (
    b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)
PROXY_V1 = b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 80\r\n"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def usage(pid: int) -> tuple[int, float]:
    """
    The resident memory (bytes) and CPU time (seconds) of process C{pid}.
    """
    rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return rss, ticks / os.sysconf("SC_CLK_TCK")


# -- the node ---------------------------------------------------------------------------


@implementer(IPushProducer)
class Stream:
    """
    Writes C{total} bytes to a transport as fast as it takes them.
    """

    def __init__(self, node: NodeConnection, total: int) -> None:
        self.node = node
        self.transport = node.transport
        self.left = total
        self.paused = False
        self.done = False

    def start(self) -> None:
        self.node.factory.streams.append(self)
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.done and self.left > 0:
            piece = BLOCK[: self.left]
            self.left -= len(piece)
            self.node.factory.sent += len(piece)
            self.transport.write(piece)
        if self.left <= 0 and not self.done:
            self.done = True
            self.transport.unregisterProducer()
            self.node.response_done()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.done = True


class NodeConnection(Protocol):
    """
    One connection to the node. By path: C{/big} answers 20 MB, C{/flood}
    100 MB, C{/health} and C{/small} a few bytes, C{/sink} stops reading
    (and never answers), C{/ws-flood} switches protocols and sends 100 MB,
    C{/ws-sink} switches protocols and stops reading; anything else answers
    1 MB.
    """

    factory: NodeFactory

    def __init__(self) -> None:
        self.buffer = b""
        self.busy = False

    def dataReceived(self, data: bytes) -> None:
        if self.busy:
            return  # a tunnel's bytes
        self.buffer += data
        self.next_request()

    def next_request(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if self.busy or end < 0:
            return
        path = self.buffer.split(b" ", 2)[1]
        self.buffer = self.buffer[end + 4 :]
        self.busy = True
        self.factory.paths.append(path)
        sizes = {
            b"/big": 20 * MB,
            b"/flood": PUSH_TOTAL,
            b"/health": 2,
            b"/small": 2,
            b"/32k": 32 << 10,
        }
        if path == b"/sink":
            self.transport.pauseProducing()
        elif path in (b"/ws-flood", b"/ws-sink"):
            self.transport.write(SWITCH)
            if path == b"/ws-sink":
                self.transport.pauseProducing()
            else:
                Stream(self, PUSH_TOTAL).start()
        else:
            size = sizes.get(path, MB)
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            Stream(self, size).start()

    def response_done(self) -> None:
        self.busy = False
        self.next_request()

    def connectionLost(self, reason: Failure) -> None:
        self.factory.connections.discard(self)


class NodeFactory(Factory):
    protocol = NodeConnection
    noisy = False

    def __init__(self) -> None:
        self.sent = 0
        self.paths: list[bytes] = []
        self.streams: list[Stream] = []
        self.connections: set[NodeConnection] = set()
        self.port: Any = None

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        protocol: Any = super().buildProtocol(addr)
        self.connections.add(protocol)
        return protocol

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port.getHost().port}"


# -- the clients (in a thread) -----------------------------------------------------------


def small_client(port: int, first: bytes = b"") -> socket.socket:
    """
    A blocking socket with a 4 KiB receive buffer connected to rrlb, that
    has sent C{first}.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.settimeout(PUSH_SECONDS)
    sock.connect((LOOPBACK, port))
    if first:
        sock.sendall(first)
    return sock


def push(sock: socket.socket, block: bytes, total: int = PUSH_TOTAL) -> tuple[int, str]:
    """
    Send C{block} over and over until C{total} bytes went, rrlb takes
    nothing for L{STALL_SECONDS}, rrlb closes the connection, or
    L{PUSH_SECONDS} passed. (Runs in a thread.)

    @return: the bytes sent, and why it ended: C{"sent"}, C{"stalled"},
        C{"closed"} or C{"timed out"}.
    """
    sock.setblocking(False)
    view = memoryview(block)
    sent = offset = 0
    start = last = time.monotonic()
    while sent < total:
        now = time.monotonic()
        if now - last > STALL_SECONDS:
            return sent, "stalled"
        if now - start > PUSH_SECONDS:
            return sent, "timed out"
        try:
            n = sock.send(view[offset:])
        except BlockingIOError:
            select.select([], [sock], [], 0.05)
            continue
        except OSError:
            return sent, "closed"
        sent += n
        offset = (offset + n) % len(block)
        last = now
    return sent, "sent"


def read_head(sock: socket.socket) -> bytes:
    """
    Read up to the end of a response head. (Runs in a thread.)
    """
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(1)
        if not piece:
            break
        data += piece
    return data


class SlowPeerCase(unittest.TestCase):
    """
    A node in the test process, a real rrlb in front of it, and the means
    to measure rrlb.
    """

    timeout = 90

    # What another client sends first (a PROXY header on a haproxy: listener).
    prefix = b""

    async def start(self, *args: str) -> Daemon:
        node = self.node = NodeFactory()
        node.port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(node)

        async def stop_node() -> None:
            for connection in list(node.connections):
                connection.transport.abortConnection()
            await node.port.stopListening()

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop_node()))
        daemon = self.daemon = await start_daemon(
            self, "--nodes", node.url, "--health-path", "/health", *args
        )
        await daemon.wait_for_message("READY=1")
        # One request through it first, so what it allocates for any
        # request is not counted against the peer.
        await self.other_client()
        self.before = usage(daemon.transport.pid)
        return daemon

    async def other_client(self) -> None:
        """
        Another client gets its answer.
        """
        received = await raw_request(
            self,
            self.daemon.port,
            self.prefix + b"GET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        self.assertTrue(received.startswith(b"HTTP/1.1 200 "), received[:200])

    async def in_thread(self, f: Callable[..., Any], *args: Any) -> Any:
        return await threads.deferToThread(f, *args)

    def client(self, sock: socket.socket) -> socket.socket:
        self.addCleanup(sock.close)
        return sock

    async def node_stalled(self) -> int:
        """
        Wait until the node's latest stream is stuck: Twisted paused it (its
        write buffer is full) and rrlb's socket advertises a zero window
        (rrlb stopped reading from it); or until it sent all it had. Fails
        after L{PUSH_SECONDS}. Returns what the node sent.
        """

        def stalled() -> bool:
            if not self.node.streams:
                return False
            stream = self.node.streams[-1]
            return stream.done or (stream.paused and peer_window(stream.transport) == 0)

        await wait_until(stalled, PUSH_SECONDS, "the node's sends to be stuck or done")
        return self.node.sent

    async def assert_bounded(self, pushed: int, cpu: float = CPU_BOUND) -> None:
        """
        rrlb grew by less than L{RSS_BOUND} and spent less than L{CPU_BOUND}
        of CPU since L{start}, and still serves another client.
        """
        await self.other_client()
        rss, cpu = usage(self.daemon.transport.pid)
        grew, spent = rss - self.before[0], cpu - self.before[1]
        self.assertLess(
            grew, RSS_BOUND, f"rrlb grew by {grew / MB:.1f} MB after {pushed / MB:.1f} MB pushed"
        )
        self.assertLess(
            spent, cpu, f"rrlb spent {spent:.1f} s of CPU after {pushed / MB:.1f} MB pushed"
        )


class ClientNotReadingTests(SlowPeerCase):
    """
    A client that sends and does not read.
    """

    async def test_pipelining_client_that_does_not_read(self) -> None:
        """
        A client that asks for 20 MB, then pipelines requests for 1 MB
        responses in 64 KiB blocks without reading anything, is read only
        up to a fixed read-ahead: the rest waits in the kernel, rrlb's
        memory and CPU stay flat, and it goes on serving other clients.
        """
        daemon = await self.start()
        sock = self.client(
            await self.in_thread(small_client, daemon.port, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        )
        # rrlb's buffer to the client is full before the client pipelines.
        await self.node_stalled()
        pushed, why = await self.in_thread(push, sock, PIPELINED_BLOCK)
        self.assertEqual(why, "stalled")
        # rrlb asked the node for the first response only: the others wait
        # for the client to read it.
        self.assertEqual(self.node.paths.count(b"/"), 0)
        await self.assert_bounded(pushed)

    async def test_pipelining_client_of_small_responses(self) -> None:
        """
        A client that pipelines requests for responses of 32 KiB, each
        coming from the node in one read, and reads none of them, does not
        get every request it sent ahead answered into rrlb's memory: the
        next request starts only once the client took the response before.
        """
        daemon = await self.start()
        request = b"GET /32k HTTP/1.1\r\nHost: x\r\n\r\n"
        sock = self.client(await self.in_thread(small_client, daemon.port))
        pushed, why = await self.in_thread(push, sock, request * (65536 // len(request)))
        self.assertEqual(why, "stalled")
        await self.assert_bounded(pushed)

    async def test_response_to_client_that_does_not_read(self) -> None:
        """
        A client that asks for 100 MB and reads nothing holds the node
        back: rrlb reads from the node only what the client's connection
        takes.
        """
        daemon = await self.start()
        self.client(
            await self.in_thread(
                small_client, daemon.port, b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n"
            )
        )
        sent = await self.node_stalled()
        self.assertLess(sent, PUSH_TOTAL // 2)
        await self.assert_bounded(sent)

    async def test_client_after_a_proxy_header_that_does_not_read(self) -> None:
        """
        On a C{haproxy:} listener, the same client behind a PROXY header is
        read only up to the same read-ahead.
        """
        self.prefix = PROXY_V1
        daemon = await self.start("--listen", "haproxy:systemd:domain=INET:index=0")
        sock = self.client(
            await self.in_thread(
                small_client,
                daemon.port,
                PROXY_V1 + b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n",
            )
        )
        await self.node_stalled()
        pushed, why = await self.in_thread(push, sock, PIPELINED_BLOCK)
        self.assertEqual(why, "stalled")
        self.assertEqual(self.node.paths.count(b"/"), 0)
        await self.assert_bounded(pushed)

    async def test_bytes_before_a_proxy_header(self) -> None:
        """
        On a C{haproxy:} listener, a peer that sends a PROXY v2 signature
        announcing the longest header there is (64 KiB), then goes on
        sending, is buffered no further than that header and one request
        head: it gets its 431, what it sends is dropped for the lingering
        close, and then it is cut off.
        """
        self.prefix = PROXY_V1
        daemon = await self.start("--listen", "haproxy:systemd:domain=INET:index=0")
        v2_signature = b"\r\n\r\n\x00\r\nQUIT\n"
        sock = self.client(
            await self.in_thread(small_client, daemon.port, v2_signature + b"\x21\x11\xff\xff")
        )
        pushed, why = await self.in_thread(push, sock, BLOCK, 1 << 40)
        self.assertEqual(why, "closed")
        await self.assert_bounded(pushed, cpu=LINGER_CPU)

    async def test_refused_client_that_goes_on_sending(self) -> None:
        """
        A client whose request is refused (413) and that goes on sending its
        body without reading the answer is read and dropped only for the
        lingering close, then cut off.
        """
        daemon = await self.start("--max-body-size", "1k")
        sock = self.client(
            await self.in_thread(
                small_client,
                daemon.port,
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % PUSH_TOTAL,
            )
        )
        pushed, why = await self.in_thread(push, sock, BLOCK, 1 << 40)
        # rrlb closed the connection after its lingering time.
        self.assertEqual(why, "closed")
        self.assertNotIn(b"/", self.node.paths)
        await self.assert_bounded(pushed, cpu=LINGER_CPU)


class NodeNotReadingTests(SlowPeerCase):
    """
    A node that stops reading what rrlb sends it.
    """

    async def test_body_to_node_that_does_not_read(self) -> None:
        """
        A client uploading 100 MB to a node that reads none of it is held
        back: rrlb reads from it only what the node's connection takes.
        """
        daemon = await self.start()
        sock = self.client(
            await self.in_thread(
                small_client,
                daemon.port,
                b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % PUSH_TOTAL,
            )
        )
        pushed, why = await self.in_thread(push, sock, BLOCK)
        self.assertEqual(why, "stalled")
        self.assertIn(b"/sink", self.node.paths)
        await self.assert_bounded(pushed)


class TunnelNotReadingTests(SlowPeerCase):
    """
    A WebSocket tunnel with one side that does not read.
    """

    async def test_client_of_a_tunnel_that_does_not_read(self) -> None:
        """
        A node sending 100 MB into a tunnel whose client reads nothing is
        held back.
        """
        daemon = await self.start()
        self.client(await self.in_thread(small_client, daemon.port, UPGRADE % b"/ws-flood"))
        sent = await self.node_stalled()
        self.assertLess(sent, PUSH_TOTAL // 2)
        await self.assert_bounded(sent)

    async def test_node_of_a_tunnel_that_does_not_read(self) -> None:
        """
        A client sending 100 MB into a tunnel whose node reads nothing is
        held back.
        """
        daemon = await self.start()
        sock = self.client(await self.in_thread(small_client, daemon.port, UPGRADE % b"/ws-sink"))
        head = await self.in_thread(read_head, sock)
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        pushed, why = await self.in_thread(push, sock, BLOCK)
        self.assertEqual(why, "stalled")
        await self.assert_bounded(pushed)
