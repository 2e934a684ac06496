# -*- test-case-name: tests.test_parser -*-
"""
A strict HTTP/1.1 request parser: the request head in one pass over the
buffered bytes, the framing of the body decided once (RFC 9112 section 6.3),
and a chunked body decoder. Pure: no Twisted I/O, no reactor; the channel
(L{rrlb.channel}) feeds it bytes and acts on what it returns or raises.

Strict means that anything two HTTP implementations could read differently
is refused rather than guessed at (RFC 9112 sections 2.2, 3, 5, 6, 7, 11):
bare CR or LF, obs-fold, whitespace before a field's colon, control bytes in
a field value or the target, two framings, conflicting lengths, unknown
transfer codings, a malformed chunk line, a missing or repeated C{Host}. So
no request can mean one thing to rrlb and another to a node.

The rules are in one function, L{validate_request}: the HTTP/1.1 parser
(L{parse_request_head}) splits a head and hands it over, and an HTTP/2
stream (L{rrlb.http2}) hands over its fields the same way, so a request
refused over one protocol is refused over the other.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

from rrlb._twisted import HeaderNameError, canonical_name, name_cache

# The request line alone may be at most this long (nginx's
# large_client_header_buffers and HAProxy's default buffer are about 8 KiB).
MAX_REQUEST_LINE = 8192
# A chunk size line (size and extensions) and the trailer section.
MAX_CHUNK_LINE = 4096
MAX_TRAILER_SIZE = 8192


class BadRequest(Exception):
    """
    The request cannot be served. C{code} is the status to answer with,
    C{reason} the label it is counted under in C{rrlb_client_errors_total},
    C{text} the words the client gets.
    """

    def __init__(
        self, code: int, reason: str, text: str, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        super().__init__(text)
        self.code = code
        self.reason = reason
        self.text = text
        self.headers = headers


# Reasons (metric labels) of the client errors rrlb answers itself.
HEADER_TOO_LARGE = "header_too_large"
TOO_MANY_HEADERS = "too_many_headers"
URI_TOO_LONG = "uri_too_long"
BODY_TOO_LARGE = "body_too_large"
HEADER_TIMEOUT = "header_timeout"
BODY_TIMEOUT = "body_timeout"
BAD_REQUEST = "bad_request"
BAD_FRAMING = "bad_framing"
UNKNOWN_CODING = "unknown_coding"
BAD_VERSION = "bad_version"
BAD_METHOD = "method_not_allowed"
CLIENT_ERROR_REASONS = (
    BAD_REQUEST,
    BAD_METHOD,
    BAD_FRAMING,
    UNKNOWN_CODING,
    BAD_VERSION,
    URI_TOO_LONG,
    HEADER_TOO_LARGE,
    TOO_MANY_HEADERS,
    BODY_TOO_LARGE,
    HEADER_TIMEOUT,
    BODY_TIMEOUT,
)


def _bad(text: str, reason: str = BAD_REQUEST) -> BadRequest:
    return BadRequest(400, reason, text)


def _byte_set(*ranges: tuple[int, int], extra: bytes = b"") -> bytes:
    return bytes(b for lo, hi in ranges for b in range(lo, hi + 1)) + extra


# Bytes allowed anywhere in a head: visible ASCII, SP, HTAB, CR, LF, and
# obs-text (0x80-0xFF, allowed in field values). Deleting them with
# bytes.translate leaves exactly the forbidden ones (NUL and other controls).
_HEAD_BYTES = _byte_set((0x20, 0x7E), (0x80, 0xFF), extra=b"\t\r\n")
HEAD_BYTES = _HEAD_BYTES
# tchar (RFC 9110 5.6.2): what a method or field name is made of.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# What a request target is made of: visible ASCII only (RFC 9112 3.2).
_TARGET_BYTES = _byte_set((0x21, 0x7E))
# A Host value (RFC 9110 7.2): uri-host (a reg-name, or an IP literal in
# brackets) and an optional port.
_HOST = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|[-A-Za-z0-9._~!$&'()*+,;=%]*)(?::[0-9]{0,5})?\Z"
)
_ABSOLUTE = (b"http://", b"https://")
_ALLOW = ((b"Allow", b"GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH, TRACE"),)

HTTP_2 = b"HTTP/2"
_VERSIONS = {b"HTTP/1.1": b"HTTP/1.1", b"HTTP/1.0": b"HTTP/1.0"}
_VERSION_RE = re.compile(rb"HTTP/[0-9]\.[0-9]\Z")
_KNOWN_METHODS = frozenset(
    {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT"}
)
# Transfer codings (RFC 9112 7): chunked is the only one rrlb decodes; the
# others are known, so a request using them is refused as unsupported (501)
# rather than malformed (400).
_KNOWN_CODINGS = frozenset({b"chunked", b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"})

# Fields that are about one connection, which HTTP/2 has no place for
# (RFC 9113 8.2.2; TE is allowed with the value "trailers" only).
_CONNECTION_SPECIFIC = (b"Connection", b"Keep-Alive", b"Proxy-Connection", b"Upgrade")

CONTENT_LENGTH = b"Content-Length"
TRANSFER_ENCODING = b"Transfer-Encoding"
HOST = b"Host"
CONNECTION = b"Connection"
EXPECT = b"Expect"


class RequestHead:
    """
    A parsed request head.

    @ivar headers: canonical name -> values in order, the shape L{Headers}
        keeps (see L{rrlb._twisted.set_raw_headers}).
    @ivar length: the body's length, or L{None} for a chunked body.
    @ivar persistent: whether the connection may carry another request.
    @ivar expect_continue: the client waits for C{100 Continue}.
    """

    __slots__ = (
        "method",
        "target",
        "version",
        "headers",
        "length",
        "persistent",
        "expect_continue",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: dict[bytes, list[bytes]],
        length: Optional[int],
        persistent: bool,
        expect_continue: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.length = length
        self.persistent = persistent
        self.expect_continue = expect_continue


def parse_request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    """
    Split an HTTP/1.1 request line into method, target and version; what
    they say is checked by L{validate_request}.

    @raise BadRequest: 414 for a line over L{MAX_REQUEST_LINE}, 505 for an
        HTTP version other than 1.0 and 1.1, 400 for anything malformed.
    """
    if len(line) > MAX_REQUEST_LINE:
        raise BadRequest(414, URI_TOO_LONG, "the request line is too long")
    parts = line.split(b" ")
    if len(parts) != 3:
        raise _bad("malformed request line")
    method, target, version = parts
    known = _VERSIONS.get(version)
    if known is None:
        if _VERSION_RE.match(version):
            raise BadRequest(505, BAD_VERSION, "only HTTP/1.0 and HTTP/1.1 are supported")
        raise _bad("malformed HTTP version")
    return method, target, known


def parse_request_head(head: bytes, max_headers: int, max_header_size: int = 0) -> RequestHead:
    """
    Parse an HTTP/1.1 request head: everything before the blank line that
    ends it, without that line's CRLF CRLF. The request line is split here;
    everything else is checked by L{validate_request}.

    @raise BadRequest: for a head rrlb will not forward.
    """
    # At most one line more than allowed: validate_request refuses that
    # many, and no more work goes into a head of many more.
    lines = head.split(b"\r\n", max_headers + 1)
    method, target, version = parse_request_line(lines[0])
    del lines[0]
    return validate_request(method, target, version, lines, head, max_headers, max_header_size)


def validate_request(
    method: bytes,
    target: bytes,
    version: bytes,
    lines: list[bytes],
    head: bytes,
    max_headers: int,
    max_header_size: int = 0,
) -> RequestHead:
    """
    The rules every request meets before rrlb forwards it, HTTP/1.1 and
    HTTP/2 alike: one set, so that no request can pass one way that is
    refused the other.

      - the limits on the number of fields and the size of the head;
      - no control byte anywhere but HTAB, and CR and LF only as the line
        ends (so none in a value);
      - the method a token, the target in a form the method allows
        (origin-form, absolute-form for HTTP/1, C{*} for OPTIONS) and no
        longer than L{MAX_REQUEST_LINE}; C{CONNECT} refused;
      - each field name a token;
      - C{Host} once, and an authority (L{_framing});
      - the fields that decide the framing (L{_framing}).

    @param version: C{HTTP/1.0}, C{HTTP/1.1} or C{HTTP/2} (L{HTTP_2}).
    @param lines: the header fields as HTTP/1.1 spells them, one
        C{name:value} line each (without its CRLF); the name ends at the
        first colon, the value is trimmed here.
    @param head: the head as HTTP/1.1 spells it: the request line, then
        C{lines}, each line ended by CRLF but the last. Its bytes are
        checked in one pass (cheaper than one per value), its length
        against C{max_header_size}.
    @param max_header_size: the most bytes C{head} may have (0: no limit).
    @raise BadRequest: the status and reason to refuse the request with.
    """
    count = len(lines)
    if count > max_headers:
        raise BadRequest(431, TOO_MANY_HEADERS, "too many header fields")
    if max_header_size and len(head) > max_header_size:
        raise BadRequest(431, HEADER_TOO_LARGE, "the request head is too large")
    if head.translate(None, _HEAD_BYTES):
        raise _bad("control bytes in the request head")
    # The lines are joined by CRLF: any other CR or LF makes one too many.
    if head.count(b"\r") != count or head.count(b"\n") != count:
        raise _bad("bare CR or LF in the request head")
    if method not in _KNOWN_METHODS and (not method or method.translate(None, _TCHAR)):
        raise _bad("malformed method")
    if method == b"CONNECT":
        # Whatever its target (an HTTP/2 CONNECT has no :path, RFC 9113 8.5).
        raise BadRequest(
            405, BAD_METHOD, "CONNECT is not supported: this is not a forward proxy", _ALLOW
        )
    if not target or target.translate(None, _TARGET_BYTES):
        raise _bad("malformed request target")
    if len(target) > MAX_REQUEST_LINE:
        # An HTTP/2 :path; an HTTP/1.1 request line was measured whole.
        raise BadRequest(414, URI_TOO_LONG, "the request target is too long")
    if target[:1] != b"/":
        # Not origin-form: absolute-form, or * for OPTIONS (RFC 9112 3.2;
        # an HTTP/2 :path is origin-form or *, RFC 9113 8.3.1).
        if target == b"*":
            if method != b"OPTIONS":
                raise _bad("* is a request target for OPTIONS only")
        elif version == HTTP_2 or not target[:8].lower().startswith(_ABSOLUTE):
            raise _bad("malformed request target")
        else:
            # Absolute-form: its authority stands in for Host (RFC 9112
            # 3.2.2), so it is held to the same grammar, without userinfo.
            rest = target.split(b"://", 1)[1]
            end = len(rest)
            for sep in (b"/", b"?"):
                i = rest.find(sep)
                if 0 <= i < end:
                    end = i
            authority = rest[:end]
            if not authority or _HOST.match(authority) is None:
                raise _bad("malformed authority in the request target")

    headers: dict[bytes, list[bytes]] = {}
    names = name_cache()
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise _bad("header line without a colon")
        key = names.get(name)
        if key is None:
            if line[:1] in (b" ", b"\t"):
                raise _bad("obs-fold (a header line starting with whitespace)")
            try:
                # Rejects names that are not tokens, such as "Host " with
                # whitespace before the colon.
                key = canonical_name(name)
            except HeaderNameError:
                raise _bad("malformed header field name") from None
        # Only HTAB is left of the controls; a value is SP/HTAB-trimmed.
        value = value.strip(b" \t")
        values = headers.get(key)
        if values is None:
            headers[key] = [value]
        else:
            values.append(value)
    return _framing(method, target, version, headers)


def _framing(
    method: bytes, target: bytes, version: bytes, headers: dict[bytes, list[bytes]]
) -> RequestHead:
    """
    Check the fields that decide how the message is delimited and where it
    goes (RFC 9112 3.2, 6.1, 6.3), and decide the body's length.
    """
    hosts = headers.get(HOST)
    if hosts is None:
        if version != b"HTTP/1.0":
            raise _bad("a request needs a Host header (or :authority)")
    elif len(hosts) != 1:
        raise _bad("more than one Host header")
    elif _HOST.match(hosts[0]) is None:
        raise _bad("malformed Host header")

    length: Optional[int] = 0
    codings = headers.get(TRANSFER_ENCODING)
    lengths = headers.get(CONTENT_LENGTH)
    if codings is not None:
        if lengths is not None:
            raise _bad("both Content-Length and Transfer-Encoding", BAD_FRAMING)
        if version != b"HTTP/1.1":
            # HTTP/2 frames its own body (RFC 9113 8.2.2).
            raise _bad("Transfer-Encoding in an HTTP/1.0 or HTTP/2 request", BAD_FRAMING)
        tokens = [t.strip(b" \t").lower() for value in codings for t in value.split(b",")]
        for token in tokens:
            if token not in _KNOWN_CODINGS:
                raise BadRequest(501, UNKNOWN_CODING, "unknown transfer coding")
        if tokens[-1] != b"chunked" or b"chunked" in tokens[:-1]:
            raise _bad("the last transfer coding must be chunked, once", BAD_FRAMING)
        if len(tokens) > 1:
            raise BadRequest(501, UNKNOWN_CODING, "only the chunked transfer coding is supported")
        length = None
    elif lengths is not None:
        value = lengths[0]
        if len(lengths) > 1 or b"," in value:
            found = {v.strip(b" \t") for item in lengths for v in item.split(b",")}
            if len(found) != 1:
                raise _bad("conflicting Content-Length values", BAD_FRAMING)
            value = found.pop()
            headers[CONTENT_LENGTH] = [value]
        if not value.isdigit() or not value.isascii():
            raise _bad("malformed Content-Length", BAD_FRAMING)
        if len(value) > 18:
            raise BadRequest(413, BODY_TOO_LARGE, "the body is too large")
        length = int(value)

    connection = headers.get(CONNECTION)
    if version == b"HTTP/1.1":
        persistent = True
        if connection is not None:
            persistent = not any(
                t.strip(b" \t").lower() == b"close" for v in connection for t in v.split(b",")
            )
    else:
        # Like twisted.web, HTTP/1.0 connections are not kept alive.
        persistent = False
    if version == HTTP_2:
        for name in _CONNECTION_SPECIFIC:
            if name in headers:
                # Malformed in HTTP/2 (RFC 9113 8.2.2); h2 refuses them too.
                raise _bad("a connection-specific header field in an HTTP/2 request")
    expect = headers.get(EXPECT)
    expect_continue = (
        expect is not None and version != b"HTTP/1.0" and expect[0].lower() == b"100-continue"
    )
    return RequestHead(method, target, version, headers, length, persistent, expect_continue)


# chunk-size [ chunk-ext ] (RFC 9112 7.1.1), without its CRLF.
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})"
    rb"(?:[ \t]*;[ \t]*[-!#$%&'*+.^_`|~0-9A-Za-z]+"
    rb"(?:[ \t]*=[ \t]*(?:[-!#$%&'*+.^_`|~0-9A-Za-z]+"
    rb'|"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"))?)*\Z'
)

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class BadChunk(ValueError):
    """
    A chunked body that does not follow RFC 9112 section 7.1.
    """


class BodyTooLarge(ValueError):
    """
    A chunked body grew past its limit.
    """


class ChunkedDecoder:
    """
    Decode a chunked body as it arrives: C{on_data} gets each piece of
    data, C{on_done} the bytes after the body's end (the next request's).

    @param max_size: the most body bytes allowed (0: no limit).
    """

    __slots__ = (
        "on_data",
        "on_done",
        "max_size",
        "size",
        "_state",
        "_buffer",
        "_remaining",
        "_trailer_size",
    )

    def __init__(
        self,
        on_data: Callable[[bytes], object],
        on_done: Callable[[bytes], object],
        max_size: int = 0,
    ) -> None:
        self.on_data = on_data
        self.on_done = on_done
        self.max_size = max_size
        self.size = 0
        self._state = _SIZE
        self._buffer = b""
        self._remaining = 0
        self._trailer_size = 0

    def feed(self, data: bytes, start: int = 0) -> None:
        """
        Decode C{data[start:]}. It is walked with an offset, never sliced
        chunk by chunk, so a read of many small chunks costs its length, not
        its length times the number of chunks.

        @raise BadChunk: the body is malformed.
        @raise BodyTooLarge: the body passed C{max_size}.
        """
        if self._buffer:
            data = self._buffer + data[start:]
            start = 0
            self._buffer = b""
        pos = start
        size_of_data = len(data)
        while pos < size_of_data:
            state = self._state
            if state == _DATA:
                remaining = self._remaining
                if size_of_data - pos < remaining:
                    self._remaining = remaining - (size_of_data - pos)
                    self.on_data(data[pos:] if pos else data)
                    return
                self.on_data(data[pos : pos + remaining])
                pos += remaining
                self._state = _DATA_END
            elif state == _SIZE:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    rest = data[pos:]
                    if len(rest) > MAX_CHUNK_LINE or b"\n" in rest or b"\r" in rest[:-1]:
                        raise BadChunk("malformed chunk size line")
                    self._buffer = rest
                    return
                match = _CHUNK_LINE.match(data, pos, end)
                if match is None:
                    raise BadChunk("malformed chunk size line")
                size = int(match.group(1), 16)
                pos = end + 2
                if size == 0:
                    self._state = _TRAILER
                    continue
                self.size += size
                if self.max_size and self.size > self.max_size:
                    raise BodyTooLarge("the body is too large")
                self._remaining = size
                self._state = _DATA
            elif state == _DATA_END:
                if size_of_data - pos < 2:
                    if data[pos:] != b"\r":
                        raise BadChunk("chunk data not followed by CRLF")
                    self._buffer = b"\r"
                    return
                if data[pos : pos + 2] != b"\r\n":
                    raise BadChunk("chunk data not followed by CRLF")
                pos += 2
                self._state = _SIZE
            elif state == _TRAILER:
                # Trailer fields are read and dropped: rrlb sends the body on
                # with a Content-Length, which has no place for them.
                end = data.find(b"\r\n", pos)
                if end < 0:
                    rest = data[pos:]
                    if len(rest) > MAX_TRAILER_SIZE or b"\n" in rest or b"\r" in rest[:-1]:
                        raise BadChunk("malformed trailer section")
                    self._buffer = rest
                    return
                line = data[pos:end]
                pos = end + 2
                self._trailer_size += len(line) + 2
                if self._trailer_size > MAX_TRAILER_SIZE:
                    raise BadChunk("trailer section too large")
                if not line:
                    self._state = _DONE
                    self.on_done(data[pos:])
                    return
                name, sep, _ = line.partition(b":")
                if (
                    not sep
                    or not name
                    or name.translate(None, _TCHAR)
                    or line.translate(None, _HEAD_BYTES)
                    or b"\r" in line
                    or b"\n" in line
                ):
                    raise BadChunk("malformed trailer field")
            else:
                return

    @property
    def done(self) -> bool:
        return self._state == _DONE
