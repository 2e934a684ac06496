"""
HTTP/2 requests held to the HTTP/1.1 rules (issue 17), over real loopback
TLS with the C{h2} library as the client:

 - a request body is framed to the node exactly once: an empty DATA frame
   (at the end of the body or in its middle) or one carrying only padding
   adds nothing to what the node gets;
 - a request that L{rrlb.parser.validate_request} refuses for HTTP/1.1 is
   refused for HTTP/2 too, on its own stream, before any node is contacted,
   and counted in C{rrlb_client_errors_total}.

The node records every byte it gets on every connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from tests.test_http2 import H2Client, H2Response, HTTP2Case
from tests.test_wire import LOOPBACK, decode_chunked, reactor, response, wait_for


class RecordingConnection(Protocol):
    """
    One connection to a L{RecordingNode}: keeps every byte it got, and
    answers each complete request (Content-Length or chunked body) with
    the body it received. A head it cannot read as a request gets a 400
    and the connection closes.
    """

    def __init__(self, node: RecordingNode) -> None:
        self.node = node
        self.received = bytearray()
        self.closed = False
        self.probe = False
        self._buffer = b""

    def connectionMade(self) -> None:
        self.node.connections.append(self)

    def connectionLost(self, reason: Failure) -> None:
        self.closed = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._buffer += data
        while not self.closed and self._buffer:
            if not self._one():
                return

    def _one(self) -> bool:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = buffer[:end].split(b"\r\n")
        parts = lines[0].split(b" ")
        headers = [line.partition(b":") for line in lines[1:]]
        fields = {name.lower(): value.strip() for name, _, value in headers}
        pos = end + 4
        if len(parts) != 3:
            self.node.garbage.append(buffer[:pos])
            self.transport.write(response(b"400 Bad Request", b"not a request"))
            self.transport.loseConnection()
            self.closed = True
            return False
        if fields.get(b"transfer-encoding") == b"chunked":
            decoded = decode_chunked(buffer, pos)
            if decoded is None:
                return False
            body, stop, _ = decoded
        else:
            stop = pos + int(fields.get(b"content-length", b"0"))
            if len(buffer) < stop:
                return False
            body = buffer[pos:stop]
        if fields.get(b"user-agent", b"").startswith(b"rrlb-health"):
            self.probe = True
        else:
            self.node.requests.append((buffer[:pos], buffer[pos:stop], body))
        self._buffer = buffer[stop:]
        self.transport.write(response(body=body))
        return True


class RecordingNode(Factory):
    """
    A node on 127.0.0.1 port 0 that keeps every byte it is sent.

    @ivar requests: (head, framed body, decoded body) of each request
        (health probes aside).
    @ivar garbage: heads it could not read as a request.
    """

    noisy = False

    def __init__(self) -> None:
        self.connections: list[RecordingConnection] = []
        self.requests: list[tuple[bytes, bytes, bytes]] = []
        self.garbage: list[bytes] = []
        self.port: Any = None

    def buildProtocol(self, addr: Any) -> RecordingConnection:
        return RecordingConnection(self)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port.getHost().port}"

    @property
    def received(self) -> bytes:
        """
        Every byte of every connection but the health probes'.
        """
        return b"".join(bytes(c.received) for c in self.connections if not c.probe)

    async def stop(self) -> None:
        await self.port.stopListening()
        for connection in self.connections:
            if not connection.closed:
                connection.transport.abortConnection()
        await wait_for(lambda: all(c.closed for c in self.connections), "node connections")


class RequestsCase(HTTP2Case):
    async def recording_node(self) -> RecordingNode:
        node = RecordingNode()
        node.port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(node)
        self.addCleanup(node.stop)
        return node

    async def started(self, *args: str) -> tuple[RecordingNode, Any, H2Client]:
        node = await self.recording_node()
        balancer = await self.h2_balancer([node.url], *args)
        client = await self.h2_connect(balancer.port)
        return node, balancer, client


class BodyFramingTests(RequestsCase):
    """
    An empty piece of body is never framed: no DATA frame, empty or padding
    only, ends a chunked body early or adds a second end to it.
    """

    async def upload(
        self, pieces: list[tuple[bytes, int]], end_empty: bool
    ) -> tuple[RecordingNode, H2Response, H2Response]:
        """
        Send a POST with no content-length as DATA frames of C{pieces}
        (data, padding), ended by an empty DATA frame with END_STREAM if
        C{end_empty}, else by the last piece; then a GET on the same
        connection, which the node gets on the same pooled connection.
        """
        node, balancer, client = await self.started()
        stream, answer = client.request(b"POST", b"/up", b"abc", end=False)
        # The rest comes once the node has the start of the body: it then
        # streams to the node piece by piece.
        await wait_for(lambda: b"\r\n\r\n3\r\nabc\r\n" in node.received, "the first chunk")
        for i, (data, padding) in enumerate(pieces):
            last = not end_empty and i == len(pieces) - 1
            size = len(data) + (padding + 1 if padding else 0)
            await wait_for(
                lambda size=size: client.conn.local_flow_control_window(stream) >= size,
                "the flow control window",
            )
            client.conn.send_data(stream, data, end_stream=last, pad_length=padding or None)
            client.flush()
        if end_empty:
            client.send(stream, b"", end=True)
        await answer.done
        _, after = client.request(b"GET", b"/after")
        await after.done
        return node, answer, after

    def assertFramedOnce(self, node: RecordingNode, body: bytes, chunks: list[bytes]) -> None:
        self.assertEqual(node.garbage, [])
        self.assertEqual(len(node.requests), 2, node.requests)
        (head, framed, decoded), (next_head, next_framed, _) = node.requests
        self.assertIn(b"\r\ntransfer-encoding: chunked\r\n", head.lower())
        self.assertEqual(decoded, body)
        expected = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        self.assertEqual(framed, expected)
        self.assertTrue(next_head.startswith(b"GET /after HTTP/1.1\r\n"))
        # Every byte the node got belongs to one of the two requests.
        self.assertEqual(node.received, head + framed + next_head + next_framed)

    async def test_empty_data_frame_ends_the_body(self) -> None:
        """
        A body ended by an empty DATA frame with END_STREAM reaches the
        node with one last chunk, not two: the next request on the pooled
        connection starts right after it.
        """
        node, answer, after = await self.upload([(b"defg", 0)], end_empty=True)
        self.assertEqual((answer.status, bytes(answer.body)), (200, b"abcdefg"))
        self.assertEqual((after.status, bytes(after.body)), (200, b""))
        self.assertFramedOnce(node, b"abcdefg", [b"abc", b"defg"])

    async def test_empty_data_frame_mid_body(self) -> None:
        """
        An empty DATA frame in the middle of a body does not end it: the
        node gets the whole body.
        """
        node, answer, after = await self.upload(
            [(b"", 0), (b"defg", 0)], end_empty=False
        )
        self.assertEqual((answer.status, bytes(answer.body)), (200, b"abcdefg"))
        self.assertFramedOnce(node, b"abcdefg", [b"abc", b"defg"])

    async def test_padding_only_data_frame_mid_body(self) -> None:
        """
        A DATA frame carrying only padding in the middle of a body does not
        end it, and its padding still counts for flow control: rrlb opens
        the window again for it, so more padding than one window holds
        goes through.
        """
        padding = [(b"", 255)] * 300  # 76,800 bytes of flow control
        node, answer, after = await self.upload(
            [*padding, (b"defg", 10)], end_empty=False
        )
        self.assertEqual((answer.status, bytes(answer.body)), (200, b"abcdefg"))
        self.assertFramedOnce(node, b"abcdefg", [b"abc", b"defg"])
