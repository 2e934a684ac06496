"""
The framing rules over real loopback sockets: each malformed or ambiguous
request gets its status with C{Connection: close}, no node ever sees it,
and a normal request on a new connection still works.
"""

from __future__ import annotations

from typing import Any

from twisted.trial import unittest

from tests.support import (
    Backend,
    Balancer,
    raw_connect,
    raw_request,
    split_response,
    start_backend,
    start_balancer,
)

GOOD = b"GET /ok HTTP/1.1\r\nHost: good\r\nConnection: close\r\n\r\n"

# name -> (request bytes, expected status)
CASES: dict[str, tuple[bytes, int]] = {
    "both_lengths": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        400,
    ),
    "differing_lengths": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        400,
    ),
    "length_not_digits": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\nabcd", 400),
    "last_coding_not_chunked": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        400,
    ),
    "unknown_coding": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: foo\r\n\r\n", 501),
    "coding_in_http10": (
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
        400,
    ),
    "bad_chunk_size": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4x\r\nabcd\r\n0\r\n\r\n",
        400,
    ),
    "bad_chunk_extension": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4;a="b\r\nabcd\r\n0\r\n\r\n',
        400,
    ),
    "obs_fold": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  2\r\n\r\n", 400),
    "space_before_colon": (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    "nul_in_value": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    "cr_in_value": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400),
    "lf_in_value": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\nb\r\n\r\n", 400),
    "space_in_target": (b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "control_in_target": (b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "high_byte_in_target": (b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "no_host": (b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n", 400),
    "two_hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "bare_lf": (b"GET / HTTP/1.1\nHost: x\n\n", 400),
    "http2_version": (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    "relative_target": (b"GET abc HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "asterisk_not_options": (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "connect": (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 405),
    "bad_host_port": (b"GET / HTTP/1.1\r\nHost: x:abc\r\n\r\n", 400),
    "unclosed_ip_literal": (b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", 400),
    "tls_on_plain_port": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
}


class FramingTests(unittest.TestCase):
    """
    One test per framing rule (RFC 9112 sections 2.2, 3, 5, 6, 7, 11).
    """

    backend: Backend
    balancer: Balancer

    async def start(self) -> None:
        self.backend = await start_backend(self, "a")
        self.balancer = await start_balancer(self, [self.backend.url])

    async def assert_refused(self, data: bytes, code: int) -> bytes:
        """
        C{data} gets C{code} with Connection: close and a short plain-text
        body, the connection is closed, no node saw a request, and a normal
        request on a new connection succeeds.
        """
        if not hasattr(self, "balancer"):
            await self.start()
        received = await raw_request(self, self.balancer.port, data)
        status, headers, body = split_response(received)
        # The answer is in the request's HTTP/1.x version when it was readable.
        self.assertRegex(status, rb"^HTTP/1\.[01] %d " % code, received)
        self.assertIn((b"Connection", b"close"), headers)
        self.assertIn((b"Content-Type", b"text/plain; charset=utf-8"), headers)
        self.assertTrue(body.startswith(b"%d " % code), body)
        self.assertEqual(self.backend.requests, [])
        good = await raw_request(self, self.balancer.port, GOOD)
        self.assertTrue(good.startswith(b"HTTP/1.1 200 "), good)
        self.assertEqual([r.uri for r in self.backend.requests], [b"/ok"])
        return received


def _case(name: str, data: bytes, code: int) -> Any:
    async def test(self: FramingTests) -> None:
        await self.assert_refused(data, code)

    test.__name__ = f"test_{name}"
    test.__doc__ = f"{name.replace('_', ' ')}: {code}, and no node sees it."
    return test


for _name, (_data, _code) in CASES.items():
    setattr(FramingTests, f"test_{_name}", _case(_name, _data, _code))


class ExactFramingTests(unittest.TestCase):
    """
    What a node receives always has exactly one framing.
    """

    async def test_chunked_becomes_length(self) -> None:
        """
        A chunked request body reaches the node with a Content-Length and no
        Transfer-Encoding, and the bytes after it are the next request, not
        part of the body.
        """
        backend = await start_backend(self, "a")
        balancer = await start_balancer(self, [backend.url])
        client = await raw_connect(self, balancer.port)
        client.send(
            b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
            b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        received = await client.closed
        self.assertEqual(received.count(b"HTTP/1.1 200 "), 2, received)
        first, second = backend.requests
        self.assertEqual(first.body, b"hello world")
        self.assertEqual(first.header(b"content-length"), b"11")
        self.assertIsNone(first.header(b"transfer-encoding"))
        self.assertEqual(second.uri, b"/next")

    async def test_leading_empty_lines(self) -> None:
        """
        Empty lines before a request line are ignored (RFC 9112 2.2).
        """
        backend = await start_backend(self, "a")
        balancer = await start_balancer(self, [backend.url])
        received = await raw_request(self, balancer.port, b"\r\n\r\n" + GOOD)
        self.assertTrue(received.startswith(b"HTTP/1.1 200 "), received)

    async def test_repeated_equal_lengths(self) -> None:
        """
        Repeated identical Content-Length values are one length, sent once.
        """
        backend = await start_backend(self, "a")
        balancer = await start_balancer(self, [backend.url])
        received = await raw_request(
            self,
            balancer.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n"
            b"Connection: close\r\n\r\nabc",
        )
        self.assertTrue(received.startswith(b"HTTP/1.1 200 "), received)
        (request,) = backend.requests
        self.assertEqual(request.body, b"abc")
        self.assertEqual(request.header(b"content-length"), b"3")


class Trailing:
    """
    A resource whose response is C{body} (in pieces) and C{trailers}, as a
    gRPC answer from a node ends (ProxyRequest.write_trailers).
    """

    isLeaf = True

    def __init__(
        self, body: list[bytes], trailers: list[tuple[bytes, bytes]], length: bool
    ) -> None:
        self.body = body
        self.trailers = trailers
        self.length = length

    def render(self, request: Any) -> Any:
        from twisted.web.server import NOT_DONE_YET

        request.setResponseCode(200)
        if self.length:
            size = sum(len(piece) for piece in self.body)
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % size])
        for piece in self.body:
            request.write(piece)
        request.write_trailers(self.trailers)
        request.finish()
        return NOT_DONE_YET


class TrailerTests(unittest.TestCase):
    """
    Response trailers over HTTP/1.1: the chunked body's trailer section, or
    nothing when the body is not chunked.
    """

    def answer(self, resource: Trailing, request: bytes) -> bytes:
        from tests.support import Harness

        harness = Harness(resource)
        channel, transport = harness.connect()
        channel.dataReceived(request)
        return transport.value()  # type: ignore[no-any-return]

    def test_chunked_trailer_section(self) -> None:
        """
        A chunked response ends with the last chunk, the trailers and the
        empty line, once.
        """
        got = self.answer(
            Trailing([b"abc"], [(b"grpc-status", b"0"), (b"grpc-message", b"ok")], False),
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        self.assertIn(b"Transfer-Encoding: chunked\r\n", got)
        self.assertTrue(
            got.endswith(b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\n\r\n"), got
        )

    def test_trailers_only(self) -> None:
        """
        Trailers with no body: the head goes out chunked, then the trailer
        section alone.
        """
        got = self.answer(
            Trailing([], [(b"grpc-status", b"14")], False), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        self.assertTrue(got.endswith(b"\r\n\r\n0\r\ngrpc-status: 14\r\n\r\n"), got)

    def test_dropped_without_chunking(self) -> None:
        """
        With a Content-Length (or to an HTTP/1.0 client) the trailers are
        dropped and the body is exactly as long as it says.
        """
        got = self.answer(
            Trailing([b"abc"], [(b"grpc-status", b"0")], True), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        self.assertTrue(got.endswith(b"\r\n\r\nabc"), got)
        http10 = b"GET / HTTP/1.0\r\nHost: a\r\n\r\n"
        got = self.answer(Trailing([b"abc"], [(b"grpc-status", b"0")], False), http10)
        self.assertTrue(got.endswith(b"\r\n\r\nabc"), got)
