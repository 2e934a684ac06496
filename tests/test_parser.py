"""
The strict request parser (L{rrlb.parser}) on its own: heads, framing and
chunked bodies, without sockets.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from twisted.trial import unittest

from rrlb.parser import (
    BAD_FRAMING,
    BAD_METHOD,
    BAD_REQUEST,
    BAD_VERSION,
    HEADER_TOO_LARGE,
    HTTP_2,
    MAX_REQUEST_LINE,
    TOO_MANY_HEADERS,
    UNKNOWN_CODING,
    URI_TOO_LONG,
    BadChunk,
    BadRequest,
    BodyTooLarge,
    ChunkedDecoder,
    RequestHead,
    parse_request_head,
    validate_request,
)


def parse(head: bytes, max_headers: int = 100) -> RequestHead:
    return parse_request_head(head, max_headers)


class RequestHeadTests(unittest.TestCase):
    """
    Well-formed heads parse into the shape Twisted's Headers keeps.
    """

    def test_simple_get(self) -> None:
        """
        Method, target, version and headers keyed by canonical name, values
        in order, repeated names kept.
        """
        head = parse(
            b"GET /a?b=1 HTTP/1.1\r\nhost: example.com\r\nx-thing:  one \r\n"
            b"X-Thing: two\r\nACCEPT:\t*/*\t"
        )
        self.assertEqual((head.method, head.target, head.version), (b"GET", b"/a?b=1", b"HTTP/1.1"))
        self.assertEqual(
            head.headers,
            {b"Host": [b"example.com"], b"X-Thing": [b"one", b"two"], b"Accept": [b"*/*"]},
        )
        self.assertEqual(head.length, 0)
        self.assertTrue(head.persistent)
        self.assertFalse(head.expect_continue)

    def test_any_method_token(self) -> None:
        """
        Methods are case-sensitive tokens, forwarded as they came.
        """
        self.assertEqual(parse(b"PROPFIND / HTTP/1.1\r\nHost: x").method, b"PROPFIND")
        self.assertEqual(parse(b"get / HTTP/1.1\r\nHost: x").method, b"get")

    def test_obs_text_and_tab_in_values(self) -> None:
        """
        Values may hold obs-text (bytes over 0x7F) and inner tabs.
        """
        head = parse(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: caf\xc3\xa9\ta b")
        self.assertEqual(head.headers[b"X-A"], [b"caf\xc3\xa9\ta b"])

    def test_empty_value(self) -> None:
        """
        An empty field value is allowed.
        """
        self.assertEqual(parse(b"GET / HTTP/1.1\r\nHost: x\r\nX-Empty:").headers[b"X-Empty"], [b""])

    def test_content_length(self) -> None:
        """
        Content-Length gives the body length; identical repeats collapse.
        """
        self.assertEqual(parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12").length, 12)
        head = parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\nContent-Length: 5")
        self.assertEqual(head.length, 5)
        self.assertEqual(head.headers[b"Content-Length"], [b"5"])

    def test_chunked(self) -> None:
        """
        A chunked body has no length up front.
        """
        head = parse(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked")
        self.assertIsNone(head.length)

    def test_connection_close(self) -> None:
        """
        Connection: close (among other tokens) ends persistence; HTTP/1.0
        is never persistent.
        """
        self.assertFalse(parse(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: x-a, Close").persistent)
        self.assertFalse(parse(b"GET / HTTP/1.0").persistent)
        self.assertTrue(parse(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: closed").persistent)

    def test_http10_without_host(self) -> None:
        """
        HTTP/1.0 requests need no Host.
        """
        self.assertEqual(parse(b"GET / HTTP/1.0").headers, {})

    def test_expect_continue(self) -> None:
        """
        Expect: 100-continue is noticed in HTTP/1.1 only.
        """
        self.assertTrue(
            parse(
                b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-Continue\r\nContent-Length: 1"
            ).expect_continue
        )
        self.assertFalse(
            parse(b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1").expect_continue
        )


class RefusedHeadTests(unittest.TestCase):
    """
    Every head that two implementations could read differently is refused
    with the status and reason the issue names.
    """

    def refused(
        self, head: bytes, code: int = 400, reason: Optional[str] = None, max_headers: int = 100
    ) -> BadRequest:
        e = self.assertRaises(BadRequest, parse_request_head, head, max_headers)
        self.assertEqual(e.code, code, e.text)
        if reason is not None:
            self.assertEqual(e.reason, reason)
        return e

    def test_both_lengths(self) -> None:
        """
        Content-Length and Transfer-Encoding together: 400.
        """
        self.refused(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked",
            reason=BAD_FRAMING,
        )

    def test_differing_lengths(self) -> None:
        """
        Content-Length values that differ, in one field or several: 400.
        """
        self.refused(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4")
        self.refused(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4")

    def test_length_not_digits(self) -> None:
        """
        A Content-Length that is not all digits: 400.
        """
        for value in (b"-1", b"+3", b"0x10", b"3 ", b"", b"1_000", b"\xd9\xa3"):
            self.refused(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + value + b"x")
        self.refused(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: ")

    def test_huge_length(self) -> None:
        """
        A Content-Length too long to be real is refused as too large.
        """
        self.refused(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 40, 413)

    def test_last_coding_not_chunked(self) -> None:
        """
        A known coding last, or chunked twice: 400.
        """
        self.refused(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip", reason=BAD_FRAMING)
        self.refused(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip")
        self.refused(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked")
        self.refused(
            b"POST / HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked"
        )

    def test_unknown_coding(self) -> None:
        """
        A coding rrlb does not know, or one it does not decode: 501.
        """
        self.refused(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: foo", 501, UNKNOWN_CODING)
        self.refused(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: foo, chunked", 501)
        self.refused(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked", 501)
        self.refused(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\x0b", 400)

    def test_coding_in_http10(self) -> None:
        """
        Transfer-Encoding in an HTTP/1.0 request: 400.
        """
        self.refused(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked", reason=BAD_FRAMING)

    def test_obs_fold(self) -> None:
        """
        A header line starting with a space or a tab: 400.
        """
        self.refused(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b")
        self.refused(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tb: c")
        self.refused(b"GET / HTTP/1.1\r\n Host: x")

    def test_space_before_colon(self) -> None:
        """
        Whitespace between a field name and its colon: 400.
        """
        self.refused(b"GET / HTTP/1.1\r\nHost : x")
        self.refused(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length\t: 0")

    def test_bad_bytes_in_values(self) -> None:
        """
        NUL, a bare CR or LF, or another control byte in a value: 400.
        """
        for bad in (b"\x00", b"\r", b"\n", b"\x01", b"\x7f", b"\x1b"):
            self.refused(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a" + bad + b"b")

    def test_bare_lf_line_end(self) -> None:
        """
        Lines ended by LF alone: 400.
        """
        self.refused(b"GET / HTTP/1.1\nHost: x")

    def test_bad_names(self) -> None:
        """
        A line without a colon, or a name that is not a token: 400.
        """
        self.refused(b"GET / HTTP/1.1\r\nHost: x\r\nNoColon")
        self.refused(b"GET / HTTP/1.1\r\nHost: x\r\nHost")
        self.refused(b"GET / HTTP/1.1\r\nHost: x\r\n: value")
        self.refused(b"GET / HTTP/1.1\r\nHost: x\r\nX(A): 1")
        self.refused(b"GET / HTTP/1.1\r\nHost: x\r\nX\xc3\xa9: 1")

    def test_bad_targets(self) -> None:
        """
        A target with spaces, control bytes or bytes over 0x7E: 400.
        """
        for target in (b"/a b", b"/a\tb", b"/a\x01", b"/caf\xc3\xa9", b"/a\x7f", b""):
            self.refused(b"GET " + target + b" HTTP/1.1\r\nHost: x")
        self.refused(b"GET  / HTTP/1.1\r\nHost: x")

    def test_absolute_form_authority(self) -> None:
        """
        The authority of an absolute-form target stands in for Host, so it
        is held to Host's grammar, and may not carry userinfo.
        """
        self.assertEqual(
            parse(b"GET http://a.example:80?x HTTP/1.1\r\nHost: x").target[:8], b"http://a"
        )
        for target in (b'http://a<b>{c}|d"x:1:2/p', b"http://u@x/p", b"http://x:abc/", b"http://"):
            self.refused(b"GET " + target + b" HTTP/1.1\r\nHost: x")

    def test_bad_request_lines(self) -> None:
        """
        A request line that is not three parts split by single spaces: 400;
        HTTP/2.0 or 0.9 in an HTTP/1 request line: 505.
        """
        self.refused(b"GET /\r\nHost: x")
        self.refused(b"GET / HTTP/1.1 \r\nHost: x")
        self.refused(b"GET / http/1.1\r\nHost: x", reason=BAD_REQUEST)
        self.refused(b"GET / HTTP/1.10\r\nHost: x")
        self.refused(b"G(T / HTTP/1.1\r\nHost: x")
        self.refused(b"GET / HTTP/2.0\r\nHost: x", 505, BAD_VERSION)
        self.refused(b"GET / HTTP/0.9", 505)

    def test_host_count(self) -> None:
        """
        HTTP/1.1 with no Host, or more than one: 400; a Host that is not an
        authority: 400.
        """
        self.refused(b"GET / HTTP/1.1\r\nX-A: 1")
        self.refused(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b")
        self.refused(b"GET / HTTP/1.0\r\nHost: a\r\nHost: a")
        self.refused(b"GET / HTTP/1.1\r\nHost: a b")
        self.refused(b"GET / HTTP/1.1\r\nHost: a/b")
        self.assertEqual(parse(b"GET / HTTP/1.1\r\nHost: [::1]:80").headers[b"Host"], [b"[::1]:80"])

    def test_request_line_too_long(self) -> None:
        """
        A request line over 8192 bytes: 414.
        """
        line = b"GET /" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1"
        self.refused(line + b"\r\nHost: x", 414, URI_TOO_LONG)

    def test_too_many_headers(self) -> None:
        """
        More header lines than allowed: 431.
        """
        head = b"GET / HTTP/1.1\r\nHost: x" + b"\r\nX-A: 1" * 4
        self.assertEqual(parse(head, max_headers=5).headers[b"X-A"], [b"1"] * 4)
        self.refused(head + b"\r\nX-B: 2", 431, TOO_MANY_HEADERS, max_headers=5)


class ValidateRequestTests(unittest.TestCase):
    """
    L{validate_request}, the rules HTTP/1.1 and HTTP/2 requests share, as
    the HTTP/2 side calls it: fields given one by one, the head spelt as
    HTTP/1.1 would.
    """

    def validate(
        self,
        method: bytes = b"GET",
        target: bytes = b"/",
        fields: tuple[tuple[bytes, bytes], ...] = ((b"host", b"x"),),
        max_headers: int = 100,
        max_header_size: int = 0,
    ) -> RequestHead:
        lines = [method + b" " + target + b" " + HTTP_2]
        lines += [name + b": " + value for name, value in fields]
        return validate_request(
            method,
            target,
            HTTP_2,
            lines[1:],
            b"\r\n".join(lines),
            max_headers,
            max_header_size,
        )

    def refused(self, code: int = 400, reason: str = BAD_REQUEST, **kw: Any) -> None:
        e = self.assertRaises(BadRequest, self.validate, **kw)
        self.assertEqual((e.code, e.reason), (code, reason), e.text)

    def test_valid(self) -> None:
        """
        Names are canonical, values trimmed, Expect: 100-continue noticed.
        """
        head = self.validate(
            fields=((b"host", b"x:8"), (b"expect", b"100-continue"), (b"x-a", b"1\t2"))
        )
        self.assertEqual(
            head.headers,
            {b"Host": [b"x:8"], b"Expect": [b"100-continue"], b"X-A": [b"1\t2"]},
        )
        self.assertTrue(head.expect_continue)
        self.assertEqual(self.validate(b"OPTIONS", b"*").target, b"*")

    def test_same_rules(self) -> None:
        """
        What HTTP/1.1 refuses is refused here: a method or name that is not
        a token, control bytes in the target or a value, a bad Host, * on
        a GET, CONNECT (405).
        """
        self.refused(method=b"G(E)T")
        self.refused(method=b"GET /admin")
        self.refused(target=b"/a HTTP/1.1")
        self.refused(target=b"/a\x1bb")
        self.refused(target=b"*")
        self.refused(fields=((b"host", b"x"), (b"x(y", b"1")))
        self.refused(fields=((b"host", b"x"), (b"x-a", b"v\x01")))
        self.refused(fields=((b"host", b"a b"),))
        self.refused(414, URI_TOO_LONG, target=b"/" + b"a" * MAX_REQUEST_LINE)
        self.refused(405, BAD_METHOD, method=b"CONNECT", target=b"")

    def test_line_breaks_in_values(self) -> None:
        """
        A CR or LF inside a value (which an HTTP/1.1 head could not hold
        there) is refused, CRLF included.
        """
        for value in (b"a\r\nX-Injected: 1", b"a\nb", b"a\rb"):
            self.refused(fields=((b"host", b"x"), (b"x-a", value)))

    def test_http2_only(self) -> None:
        """
        An HTTP/2 request needs Host (:authority), has an origin-form or *
        :path, and carries no framing or connection-specific field.
        """
        self.refused(fields=())
        self.refused(target=b"http://x/")
        self.refused(
            reason=BAD_FRAMING, fields=((b"host", b"x"), (b"transfer-encoding", b"chunked"))
        )
        for name in (b"connection", b"keep-alive", b"proxy-connection", b"upgrade"):
            self.refused(fields=((b"host", b"x"), (name, b"1")))

    def test_limits(self) -> None:
        """
        --max-headers and --max-header-size: 431.
        """
        fields = ((b"host", b"x"),) + ((b"x-a", b"1"),) * 4
        self.assertEqual(len(self.validate(fields=fields, max_headers=5).headers[b"X-A"]), 4)
        self.refused(431, TOO_MANY_HEADERS, fields=fields, max_headers=4)
        self.refused(431, HEADER_TOO_LARGE, fields=fields, max_header_size=40)


class ChunkedDecoderTests(unittest.TestCase):
    """
    The chunked body decoder, fed in every possible split.
    """

    def decode(self, body: bytes, max_size: int = 0, step: int = 0) -> tuple[bytes, bytes]:
        data: list[bytes] = []
        rest: list[bytes] = []
        decoder = ChunkedDecoder(data.append, rest.append, max_size)
        if step:
            for i in range(0, len(body), step):
                if decoder.done:
                    # What follows the body is the channel's, not the decoder's.
                    rest.append(body[i : i + step])
                else:
                    decoder.feed(body[i : i + step])
        else:
            decoder.feed(body)
        self.assertTrue(decoder.done)
        # Never an empty piece: sent on chunked, it would end the body.
        self.assertNotIn(b"", data)
        return b"".join(data), b"".join(rest)

    def test_body_and_rest(self) -> None:
        """
        The data of every chunk, and what follows the body, in any split.
        """
        body = b'5\r\nhello\r\n1A;name=value;q="a \\"b"\r\n' + b"x" * 26 + b"\r\n0\r\n\r\nNEXT"
        for step in (0, 1, 2, 3, 7):
            self.assertEqual(self.decode(body, step=step), (b"hello" + b"x" * 26, b"NEXT"))

    def test_trailers_dropped(self) -> None:
        """
        Trailer fields are read and dropped.
        """
        self.assertEqual(self.decode(b"1\r\na\r\n0\r\nX-T: 1\r\nY: 2\r\n\r\n"), (b"a", b""))

    def test_malformed(self) -> None:
        """
        Bad size lines, extensions and chunk ends raise L{BadChunk}.
        """
        for body in (
            b"g\r\n",
            b" 5\r\nhello\r\n",
            b"5 \r\nhello\r\n",
            b"-5\r\nhello\r\n",
            b"0x5\r\nhello\r\n",
            b"5;\r\nhello\r\n",
            b'5;a="b\r\nhello\r\n',
            b"5;a b\r\nhello\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloXX",
            b"5\r\nhello\n0\r\n\r\n",
            b"1" * 17 + b"\r\n",
            b"0\r\nbad trailer\r\n\r\n",
            b"0\r\nX-T: \x00\r\n\r\n",
            b"0\r\nX: a\nGET /smuggled HTTP/1.1\r\n\r\n",
            b"0\r\nX: a\rb\r\n\r\n",
            b"1" * 5000,
        ):
            decoder = ChunkedDecoder(lambda d: None, lambda r: None)
            self.assertRaises(BadChunk, decoder.feed, body)

    def test_max_size(self) -> None:
        """
        The body may not pass C{max_size}; it is refused as soon as a chunk
        size says it will.
        """
        self.assertEqual(self.decode(b"4\r\nabcd\r\n0\r\n\r\n", max_size=4)[0], b"abcd")
        decoder = ChunkedDecoder(lambda d: None, lambda r: None, 4)
        decoder.feed(b"3\r\nabc\r\n")
        self.assertRaises(BodyTooLarge, decoder.feed, b"2\r\n")

    def test_trailer_section_bounded(self) -> None:
        """
        An endless trailer section is refused.
        """
        decoder = ChunkedDecoder(lambda d: None, lambda r: None)
        decoder.feed(b"0\r\n")
        with self.assertRaises(BadChunk):
            for _ in range(1000):
                decoder.feed(b"X-T: 1234567890\r\n")

    def test_from_an_offset(self) -> None:
        """
        C{feed(data, start)} decodes from C{start}, in any split after it.
        """
        body = b"JUNK5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\nNEXT"
        for cut in range(4, len(body)):
            data: list[bytes] = []
            rest: list[bytes] = []
            decoder = ChunkedDecoder(data.append, rest.append)
            decoder.feed(body[:cut], 4)
            if decoder.done:
                rest.append(body[cut:])  # the channel's, not the decoder's
            else:
                decoder.feed(b"XX" + body[cut:], 2)
            self.assertEqual((b"".join(data), b"".join(rest)), (b"helloabc", b"NEXT"))

    def test_small_chunks_cost_linear_time(self) -> None:
        """
        A read of many one-byte chunks is walked, not sliced chunk by chunk:
        sixteen times the bytes cost about sixteen times the CPU, not two
        hundred and fifty-six.
        """

        def cost(size: int) -> float:
            data = b"1\r\na\r\n" * (size // 6)
            best = float("inf")
            for _ in range(3):
                decoder = ChunkedDecoder(lambda d: None, lambda r: None)
                started = time.process_time()
                decoder.feed(data)
                best = min(best, time.process_time() - started)
            return best

        small, large = cost(16 << 10), cost(256 << 10)
        self.assertLess(large, 64 * max(small, 0.001), (small, large))
