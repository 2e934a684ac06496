"""
Bytes a node sends after its response never reach another client (issue 17,
section 5: the response-splitting class).

The node here answers client A's request, then sends C{LATE}, a complete
response nobody asked for, C{delay} seconds later. It answers another
request on the same connection only after those bytes went out, so a
request rrlb sends on that connection meets the late bytes first, as a real
one racing them would. Client B's answer must always be its own.

The doors closed: a connection that carried a HEAD, or whose 204 or 304
declared a body, or whose node answered Expect: 100-continue without a 100,
is closed after the response; a byte on an idle pooled connection closes it
(and the node is logged); before reuse, a connection is checked for
anything that arrived since its response ended, TLS records held by the TLS
layer included.

What stays open, as in nginx and HAProxy (docs/security.md): a node that
sends a complete, well-framed response and then unrequested bytes racing
the next request on that connection. So after a body complete at its
C{Content-Length}, client B comes right after the response only when the
late bytes come at once.
"""

from __future__ import annotations

import datetime
from typing import Any, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest

from rrlb.nodeconn import UpstreamProtocol
from rrlb.upstream import STRAY_LOG_INTERVAL, UpstreamPool, _ConnectFactory
from tests.support import LOOPBACK, WAIT, WireCase, get, reactor, wait_for

# A complete response of 62 bytes nobody asked for (the size).
LATE = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Late: not-wanted\r\n\r\nLATE"
assert len(LATE) == 62

# The delays of the late bytes: in the same write as the response (None),
# at once in a write of their own (0), and later.
DELAYS: tuple[Optional[float], ...] = (None, 0, 0.01, 0.1)
RIGHT_AFTER, AFTER_LATE = "right after the response", "after the late bytes"


def describe(delay: Optional[float], timing: str) -> str:
    when = "in the response's write" if delay is None else f"{delay}s after the response"
    return f"late bytes {when}, client B {timing}"


def own(target: bytes) -> bytes:
    """
    The node's answer to a request for C{target}: it names the target.
    """
    body = b"answer to " + target
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class LateConnection(Protocol):
    """
    One connection to a L{LateNode}.
    """

    def __init__(self, node: LateNode) -> None:
        self.node = node
        self.buffer = b""
        self.targets: list[bytes] = []
        self.late_due = False
        self.late_sent = False
        self.held: list[bytes] = []
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.closed = False
        self._call: Any = None

    def connectionMade(self) -> None:
        self.node.connections.append(self)

    def connectionLost(self, reason: Failure) -> None:
        # The late bytes are still "sent" (into a closed socket), on time.
        self.closed = True
        self.lost.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            target = head.split(b" ")[1]
            self.targets.append(target)
            if self.node.hold:
                continue
            if target == b"/a":
                self.late_due = True
                delay = self.node.delay
                if delay is None:
                    self.transport.write(self.node.answer + LATE)
                    self.late_written()
                else:
                    self.transport.write(self.node.answer)
                    self._call = reactor.callLater(delay, self.send_late)
            elif self.late_due and not self.late_sent:
                # Only once the late bytes went out.
                self.held.append(own(target))
            else:
                self.transport.write(own(target))

    def late_written(self) -> None:
        self.late_sent = True
        self.node.late_written.append(self)

    def send_late(self) -> None:
        self._call = None
        self.transport.write(LATE)
        self.late_written()
        for answer in self.held:
            self.transport.write(answer)
        self.held = []


class LateNode(Factory):
    """
    A raw node: C{answer} to a request for C{/a}, then L{LATE} after
    C{delay} seconds (L{None}: in the same write); to any other request its
    own answer (L{own}), but only after the late bytes due on that
    connection. With C{hold}, it only records requests: the test writes.
    """

    noisy = False
    hold = False

    def __init__(self, answer: bytes, delay: Optional[float]) -> None:
        self.answer = answer
        self.delay = delay
        self.connections: list[LateConnection] = []
        self.late_written: list[LateConnection] = []
        self.port: Any = None

    def buildProtocol(self, addr: Any) -> LateConnection:
        return LateConnection(self)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.port.getHost().port}"

    scheme = "http"

    async def stop(self) -> None:
        await defer.maybeDeferred(self.port.stopListening)
        for connection in self.connections:
            if connection._call is not None and connection._call.active():
                connection._call.cancel()
            if not connection.closed:
                connection.transport.abortConnection()
        await defer.gatherResults([c.lost for c in self.connections])


def self_signed() -> CertificateOptions:
    """
    TLS options for a node with a throw-away self-signed certificate (rrlb
    is told not to verify it).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(cert),
    )


class LateBytesTests(WireCase):
    """
    Over real loopback sockets: client A's request, the node's late bytes,
    then client B's request, in every order the doors must hold against.
    """

    async def late_node(self, answer: bytes, delay: Optional[float], tls: Any = None) -> LateNode:
        node = LateNode(answer, delay)
        factory: Any = node
        if tls is not None:
            # Twisted's TLS transport joins the writes of one reactor turn
            # into one record; this one makes a record of each write, so the
            # answer and the late bytes are two records in one segment.
            factory = TLSMemoryBIOFactory(tls, False, node)
            factory.protocol = TLSMemoryBIOProtocol
            node.scheme = "https"
        endpoint = TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK)
        node.port = await endpoint.listen(factory)
        self.addCleanup(node.stop)
        return node

    async def scenario(
        self, request: bytes, answer: bytes, code: int, delay: Optional[float], timing: str
    ) -> tuple[LateNode, list[dict[str, Any]]]:
        """
        Client A sends C{request} (answered with C{answer} and, C{delay}
        later, the late bytes); client B then asks for C{/b} at C{timing}.
        B must get the node's answer to C{/b}.
        """
        where = describe(delay, timing)
        node = await self.late_node(answer, delay)
        _, port = await self.balancer([node.url])
        events = self.capture_log()
        a = await self.client(port)
        a.send(request)
        first = await a.response(head_request=request.startswith(b"HEAD "))
        assert first is not None, where
        self.assertEqual(first.code, code, where)
        if timing == AFTER_LATE:
            # The event: the node wrote the late bytes, and the connection
            # that carried them is gone (rrlb closed it before or after).
            await wait_for(lambda: node.late_written, "the late bytes", WAIT)
            await wait_for(lambda: node.connections[0].closed, "A's node connection to close")
        b = await self.client(port)
        b.send(get(b"/b"))
        second = await b.response()
        assert second is not None, where
        self.assertNotIn(b"LATE", second.raw, where)
        self.assertEqual((second.code, second.body), (200, b"answer to /b"), where)
        return node, events

    async def assert_closed_after(self, request: bytes, answer: bytes, code: int) -> None:
        """
        For every delay and both times of client B, B gets its own answer,
        on a connection of its own: the one that carried A's response was
        not pooled.
        """
        for delay in DELAYS:
            for timing in (RIGHT_AFTER, AFTER_LATE):
                node, _ = await self.scenario(request, answer, code, delay, timing)
                where = describe(delay, timing)
                self.assertEqual(node.connections[0].targets, [b"/a"], where)
                self.assertEqual(node.connections[-1].targets, [b"/b"], where)

    async def test_head(self) -> None:
        """
        A node that sends bytes after its answer to HEAD (a body, or a
        whole response): the connection is closed after the head.
        """
        await self.assert_closed_after(
            b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 62\r\n\r\n",
            200,
        )

    async def test_204_declaring_a_body(self) -> None:
        """
        A 204 with a Content-Length other than 0: the connection is closed
        after it.
        """
        await self.assert_closed_after(
            get(b"/a"), b"HTTP/1.1 204 No Content\r\nContent-Length: 62\r\n\r\n", 204
        )

    async def test_304_declaring_a_body(self) -> None:
        """
        A 304 with Transfer-Encoding: the connection is closed after it.
        """
        await self.assert_closed_after(
            get(b"/a"),
            b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
            304,
        )

    async def test_body_complete_at_its_length(self) -> None:
        """
        After a body complete at its Content-Length, late bytes close the
        idle connection and the node is logged once; a client after them
        gets a new connection. (A client right after the response, with the
        late bytes still to come, is the window that remains.)
        """
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        for delay in DELAYS:
            timings = (RIGHT_AFTER, AFTER_LATE) if not delay else (AFTER_LATE,)
            for timing in timings:
                node, events = await self.scenario(get(b"/a"), answer, 200, delay, timing)
                where = describe(delay, timing)
                self.assertEqual(node.connections[-1].targets, [b"/b"], where)
                lines = [formatEvent(e) for e in events]
                said = [line for line in lines if "after its response" in line]
                self.assertEqual(len(said), 1, (where, lines))
                self.assertIn(node.url, said[0])

    async def test_expect_answered_without_continue(self) -> None:
        """
        A node that answers a request with C{Expect: 100-continue} at once,
        without a 100 Continue and without reading the body rrlb sent with
        the head (the client sent it without waiting), may read that body as
        its next request and answer it: the connection carries no other.
        """
        request = (
            b"POST /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 10\r\n\r\nxxxxxxxxxx"
        )
        answer = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"
        for delay in DELAYS:
            for timing in (RIGHT_AFTER, AFTER_LATE):
                node, _ = await self.scenario(request, answer, 401, delay, timing)
                where = describe(delay, timing)
                self.assertEqual(node.connections[-1].targets, [b"/b"], where)

    async def test_reuse_kept_for_bodiless_204_and_304(self) -> None:
        """
        A 204 without a length and a 304 with Content-Length: 0 declare no
        body: their connections are reused.
        """
        for answer in (
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 0\r\n\r\n",
        ):
            node = await self.late_node(answer, 3600)
            _, port = await self.balancer([node.url])
            a = await self.client(port)
            a.send(get(b"/a"))
            await a.response()
            # The node's second answer waits for its (never sent) late bytes;
            # the request reaching the same connection is what matters.
            b = await self.client(port)
            b.send(get(b"/b"))
            first = node.connections[0]
            await wait_for(lambda first=first: len(first.targets) == 2, "reuse")
            self.assertEqual(len(node.connections), 1)

    async def test_tls_record_held_by_the_tls_layer(self) -> None:
        """
        Over TLS the late bytes can be a record already read from the socket
        and held by the TLS layer while the response's last record is
        handled, and the request waiting in the queue takes the connection
        back at that moment: the check before reuse finds the record (a
        one-byte peek at the socket would not), so B gets a new connection.
        """
        node = await self.late_node(b"", 0, tls=self_signed())
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"nodes:\n  - url: {node.url}\n    tls: {{verify: false}}\n")
        service, port = await self.balancer(
            [], "--config", path, "--max-conns-per-node", "1", "--queue-timeout", "30"
        )
        # A's answer waits until B is queued behind it.
        node.hold = True
        a = await self.client(port)
        a.send(get(b"/a"))
        await wait_for(lambda: node.connections and node.connections[0].targets, "A's request")
        b = await self.client(port)
        b.send(get(b"/b"))
        await wait_for(lambda: service.traffic.proxy.queue.waiting, "B in the queue")
        first = node.connections[0]
        # The answer and the late bytes as two TLS records in one segment.
        first.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        first.send_late()
        node.hold = False
        answer_a = await a.response()
        assert answer_a is not None
        self.assertEqual(answer_a.body, b"ok")
        second = await b.response()
        assert second is not None
        self.assertNotIn(b"LATE", second.raw)
        self.assertEqual((second.code, second.body), (200, b"answer to /b"))
        self.assertEqual(node.connections[-1].targets, [b"/b"])


class StrayLogTests(unittest.TestCase):
    """
    The log line about a node's stray bytes, on a clock.
    """

    def test_once_a_minute_per_node(self) -> None:
        """
        Bytes on idle connections of one node are logged at most once per
        L{STRAY_LOG_INTERVAL} (time from the reactor); another node's are
        logged on their own.
        """
        clock = Clock()
        pool = UpstreamPool(clock)
        logged: list[str] = []
        pool.log = Logger(observer=lambda event: logged.append(formatEvent(event)))

        def idle(key: str) -> UpstreamProtocol:
            protocol = UpstreamProtocol(pool, key)
            protocol.factory = _ConnectFactory(pool, key, None)  # type: ignore[attr-defined]
            protocol.makeConnection(StringTransport())
            pool.release(protocol)
            return protocol

        idle("http://a").dataReceived(b"x")
        idle("http://a").dataReceived(b"y")
        idle("http://b").dataReceived(b"z")
        self.assertEqual(len(logged), 2, logged)
        clock.advance(STRAY_LOG_INTERVAL - 1)
        idle("http://a").dataReceived(b"x")
        self.assertEqual(len(logged), 2, logged)
        clock.advance(1)
        idle("http://a").dataReceived(b"x")
        self.assertEqual(len(logged), 3, logged)
        self.assertIn("http://a", logged[-1])
