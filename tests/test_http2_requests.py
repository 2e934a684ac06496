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

from typing import Any, Optional

import h2.config
import h2.connection
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from rrlb.parser import (
    BAD_FRAMING,
    BAD_METHOD,
    BAD_REQUEST,
    HEADER_TOO_LARGE,
    TOO_MANY_HEADERS,
)
from tests.support import (
    LOOPBACK,
    H2Client,
    H2Response,
    HTTP2Case,
    decode_chunked,
    reactor,
    response,
    wait_for,
)


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


class RawH2Client(H2Client):
    """
    An h2 client that sends header blocks as they are given, unchecked.
    """

    def __init__(self) -> None:
        super().__init__()
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            split_outbound_cookies=False,
        )
        self.conn = h2.connection.H2Connection(config=config)

    def send_block(
        self, block: list[tuple[bytes, bytes]], body: Optional[bytes] = None
    ) -> H2Response:
        """
        Send the header block C{block} as a new stream (ended with it, or
        after C{body}); returns its (future) response.
        """
        stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream, block, end_stream=body is None)
        if body is not None:
            self.conn.send_data(stream, body, end_stream=True)
        self.responses[stream] = answer = H2Response()
        self.flush()
        return answer


def request_block(
    method: bytes = b"GET",
    path: Optional[bytes] = b"/x",
    authority: bytes = b"h2.example",
    fields: tuple[tuple[bytes, bytes], ...] = (),
) -> list[tuple[bytes, bytes]]:
    """
    A request header block: its pseudo-header fields (with no C{:path}
    and no C{:scheme} if C{path} is None, as for CONNECT), then C{fields}.
    """
    block = [(b":method", method), (b":authority", authority)]
    if path is not None:
        block[1:1] = [(b":scheme", b"https"), (b":path", path)]
    return block + list(fields)


class RequestsCase(HTTP2Case):
    async def recording_node(self) -> RecordingNode:
        node = RecordingNode()
        node.port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(node)
        self.addCleanup(node.stop)
        return node

    async def started(self, *args: str) -> tuple[RecordingNode, Any, RawH2Client]:
        node = await self.recording_node()
        balancer = await self.h2_balancer([node.url], *args)
        client = await self.raw_connect(balancer.port)
        return node, balancer, client

    async def raw_connect(self, port: int) -> RawH2Client:
        client: RawH2Client = await self.h2_connect(port, RawH2Client())
        return client


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
        node, answer, after = await self.upload([(b"", 0), (b"defg", 0)], end_empty=False)
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
        node, answer, after = await self.upload([*padding, (b"defg", 10)], end_empty=False)
        self.assertEqual((answer.status, bytes(answer.body)), (200, b"abcdefg"))
        self.assertFramedOnce(node, b"abcdefg", [b"abc", b"defg"])


class RequestRulesTests(RequestsCase):
    """
    Each HTTP/2 request of issue 17's table (and the two that raised
    tracebacks) is refused on its own stream with the status HTTP/1.1
    gets for the same request, no node is contacted, it is counted in
    rrlb_client_errors_total, and the connection serves the next request.
    A traceback in the log would fail the test (trial's logged errors).
    """

    async def assertRefused(
        self,
        block: list[tuple[bytes, bytes]],
        code: int = 400,
        reason: str = BAD_REQUEST,
        *args: str,
    ) -> H2Response:
        # With the admin endpoint on, requests are counted.
        node, balancer, client = await self.started("--admin", "tcp:0:interface=127.0.0.1", *args)
        counts = balancer.service.metrics.client_errors
        before = counts.get(reason, 0)
        answer = client.send_block(block)
        await answer.done
        self.assertEqual(answer.status, code, bytes(answer.body))
        self.assertEqual(node.requests, [], "a refused request reached the node")
        self.assertEqual(counts.get(reason, 0), before + 1)
        # A stream error: the connection carries on, and the next request
        # is the first the node gets.
        after = client.send_block(request_block(path=b"/next"))
        await after.done
        self.assertEqual(after.status, 200)
        self.assertEqual([head.split(b" ")[1] for head, _, _ in node.requests], [b"/next"])
        return answer

    async def test_path_with_a_version(self) -> None:
        """
        :path "/a HTTP/1.1" (it would give the node a request line of four
        words): 400.
        """
        await self.assertRefused(request_block(path=b"/a HTTP/1.1"))

    async def test_method_with_a_space(self) -> None:
        """
        :method "GET /admin": 400.
        """
        await self.assertRefused(request_block(method=b"GET /admin"))

    async def test_method_not_a_token(self) -> None:
        """
        :method "G(E)T": 400.
        """
        await self.assertRefused(request_block(method=b"G(E)T"))

    async def test_control_bytes_in_path(self) -> None:
        """
        A :path with ESC, VT or DEL in it: 400.
        """
        for byte in (b"\x1b", b"\x0b", b"\x7f"):
            await self.assertRefused(request_block(path=b"/a" + byte + b"b"))

    async def test_asterisk_path_on_get(self) -> None:
        """
        :path "*" is for OPTIONS only: 400 on a GET.
        """
        await self.assertRefused(request_block(path=b"*"))

    async def test_absolute_path(self) -> None:
        """
        An HTTP/2 :path is origin-form or "*" (RFC 9113 8.3.1): an
        absolute URI in it (an authority other than :authority) is 400.
        """
        await self.assertRefused(request_block(path=b"http://evil.example/x"))

    async def test_authority_not_a_host(self) -> None:
        """
        :authority "a b\\x01\\x7f;,@evil" (it would reach the node as Host
        and X-Forwarded-Host): 400; so is an :authority with a space only.
        """
        await self.assertRefused(request_block(authority=b"a b\x01\x7f;,@evil"))
        await self.assertRefused(request_block(authority=b"a b"))

    async def test_control_bytes_in_value(self) -> None:
        """
        A header value "v\\x01\\x1b[2J": 400.
        """
        await self.assertRefused(request_block(fields=((b"x-a", b"v\x01\x1b[2J"),)))

    async def test_too_many_headers(self) -> None:
        """
        1,500 header fields (20 KB) are over --max-headers: 431, as for
        HTTP/1.1.
        """
        fields = tuple((b"x-h%d" % i, b"%d" % i) for i in range(1500))
        await self.assertRefused(request_block(fields=fields), 431, TOO_MANY_HEADERS)

    async def test_head_too_large(self) -> None:
        """
        A few header fields larger together than --max-header-size: 431.
        """
        fields = tuple((b"x-big%d" % i, b"v" * 3000) for i in range(4))
        await self.assertRefused(
            request_block(fields=fields),
            431,
            HEADER_TOO_LARGE,
            "--max-header-size",
            "10000",
        )

    async def test_name_not_a_token(self) -> None:
        """
        A header name that is not a token ("x(y"): 400, where it raised a
        traceback before.
        """
        await self.assertRefused(request_block(fields=((b"x(y", b"1"),)))

    async def test_connect_without_path(self) -> None:
        """
        :method CONNECT with no :path (an HTTP/2 CONNECT, RFC 9113 8.5),
        which raised a traceback before: refused as HTTP/1.1 refuses
        CONNECT, 405 with Allow.
        """
        answer = await self.assertRefused(request_block(b"CONNECT", None), 405, BAD_METHOD)
        self.assertIn(b"allow", dict(answer.headers))


class FieldRulesTests(RequestsCase):
    """
    HTTP/2's own rules for a request's fields (RFC 9113 8.2, 8.3), checked
    by rrlb rather than h2: a request that breaks one is malformed and
    answered 400 on its stream; the connection carries on.
    """

    assertRefused = RequestRulesTests.assertRefused

    async def test_uppercase_name(self) -> None:
        """
        A field name with an uppercase letter: 400.
        """
        await self.assertRefused(request_block(fields=((b"X-Upper", b"1"),)))

    async def test_connection_specific(self) -> None:
        """
        Transfer-Encoding (counted as bad_framing), Connection, Upgrade and
        a TE other than "trailers": 400 each (TE: trailers is allowed).
        """
        for field, reason in (
            ((b"transfer-encoding", b"chunked"), BAD_FRAMING),
            ((b"connection", b"close"), BAD_REQUEST),
            ((b"upgrade", b"websocket"), BAD_REQUEST),
            ((b"te", b"gzip"), BAD_REQUEST),
        ):
            await self.assertRefused(request_block(fields=(field,)), 400, reason)

    async def test_pseudo_header_rules(self) -> None:
        """
        A missing :scheme, a repeated :path, an unknown or a response
        pseudo-header field, and one after a regular field: 400 each.
        """
        blocks = [
            [(b":method", b"GET"), (b":path", b"/"), (b":authority", b"h2.example")],
            request_block(fields=((b":path", b"/again"),)),
            request_block() + [(b":protocol", b"websocket")],
            request_block() + [(b":status", b"200")],
            [(b":method", b"GET"), (b":scheme", b"https"), (b"x-a", b"1"), (b":path", b"/")],
        ]
        for block in blocks:
            await self.assertRefused(block)


class AcceptedRequestTests(RequestsCase):
    """
    What the rules let through reaches the node as it should.
    """

    async def test_valid_requests(self) -> None:
        """
        A request with obs-text and an inner tab in a value, cookies in
        several fields, TE: trailers (gRPC's) and a Host the same as
        :authority reaches the node
        with one Host and one Cookie; OPTIONS * reaches it too.
        """
        node, balancer, client = await self.started()
        block = request_block(
            b"POST",
            b"/p?q=1",
            fields=(
                (b"host", b"h2.example"),
                (b"x-text", b"caf\xc3\xa9\tok"),
                (b"cookie", b"a=1"),
                (b"cookie", b"b=2"),
                (b"te", b"trailers"),
            ),
        )
        answer = client.send_block(block, b"body")
        await answer.done
        self.assertEqual((answer.status, bytes(answer.body)), (200, b"body"))
        head = node.requests[0][0]
        self.assertTrue(head.startswith(b"POST /p?q=1 HTTP/1.1\r\nHost: h2.example\r\n"), head)
        self.assertEqual(head.count(b"\r\nHost: "), 1)
        self.assertIn(b"\r\nX-Text: caf\xc3\xa9\tok\r\n", head)
        self.assertIn(b"\r\nCookie: a=1; b=2\r\n", head)
        options = client.send_block(request_block(b"OPTIONS", b"*"))
        await options.done
        self.assertEqual(options.status, 200)
        self.assertTrue(node.requests[1][0].startswith(b"OPTIONS * HTTP/1.1\r\n"))
