# -*- test-case-name: tests.test_limits,tests.test_framing,tests.test_slow_peers -*-
"""
The client side of a connection: L{ProxyChannel} reads requests with the
strict one-pass parser of L{rrlb.parser} instead of L{HTTPChannel}'s line
by line parsing, and enforces the client limits (head size and count, body
size, header, body and keep-alive timeouts). L{rrlb.clients.ClientSite}
(below this module) keeps the open channels, times them out in one sweep,
and stops accepting at C{--max-connections}.

Everything else of L{HTTPChannel} stays: L{twisted.web.http.Request}
objects, response writing, and the backpressure between the transport and
the request in progress. What is the connection's rather than its
requests' (addresses, reading or not, lingering, the drain) is in
L{rrlb.connection.ClientConnection}, below this module.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

from rrlb._twisted import set_raw_headers
from rrlb.body import CONTINUE, StreamedBody

# ClientSite is imported from here by rrlb.proxy.
from rrlb.clients import ClientLimits, real_client
from rrlb.clients import ClientSite as ClientSite
from rrlb.connection import (
    _AHEAD,
    _BODY,
    _BUSY,
    _CLOSED,
    _HEAD,
    _HELD,
    _IDLE,
    _SENDING,
    _TUNNEL,
    ClientConnection,
)
from rrlb.http1 import EDGE_TRUSTED, error_response
from rrlb.parser import (
    BAD_FRAMING,
    BAD_REQUEST,
    BODY_TIMEOUT,
    BODY_TOO_LARGE,
    HEAD_BYTES,
    HEADER_TIMEOUT,
    HEADER_TOO_LARGE,
    MAX_REQUEST_LINE,
    URI_TOO_LONG,
    BadChunk,
    BadRequest,
    BodyTooLarge,
    ChunkedDecoder,
    RequestHead,
    parse_request_head,
)

# The most bytes of a refused request's target written to the access log.
MAX_LOGGED_TARGET = 2048
# Bytes of pipelined requests read ahead while one is in progress, before
# the client is held back (twisted.web's _optimisticEagerReadSize): past
# them, what the client sends waits in the kernel, as with nginx and HAProxy.
READ_AHEAD = 0x4000


# Empty lines before a request line (RFC 9112 2.2).
_EMPTY_LINES = re.compile(rb"[\r\n]*")


def request_line_of(head: bytes) -> tuple[Optional[bytes], Optional[bytes], bytes]:
    """
    Method, target and version of the request line at the start of a head
    that was refused, as far as they can be read (L{None} if not), for the
    access log.
    """
    line = head[: head.find(b"\r\n")] if b"\r\n" in head[: MAX_REQUEST_LINE + 2] else b""
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return None, None, b"HTTP/1.1"
    method, target, version = parts
    return method[:32], target[:MAX_LOGGED_TARGET], version[:16]


def _skip_empty_lines(buffer: bytes, pos: int) -> int:
    """
    Where the request line starts in C{buffer} after any empty lines at
    C{pos}, which RFC 9112 2.2 says to ignore.
    """
    match = _EMPTY_LINES.match(buffer, pos)
    return match.end() if match is not None else pos


class ProxyChannel(ClientConnection):
    """
    An HTTP/1.1 connection from a client.

    It works out once per connection what every request on it forwards
    (the scheme and the client address, and whether the client's
    X-Forwarded-* headers are trusted), parses each request head in one
    pass, decodes the body itself, and writes a response head as one joined
    string rather than a sequence of some fifty small ones, which Twisted
    checks piece by piece.

    @ivar deadline: when the sweep of L{ClientSite} times this connection
        out (its idle, head, body or linger time runs out), or L{None}.
    """

    # Where the client's bytes go once the connection is a tunnel (set by
    # the proxy along with start_tunnel).
    tunnel_reader: Optional[Callable[[bytes], None]] = None

    def __init__(self) -> None:
        super().__init__()
        # What was read and not parsed yet: self._unread[self._offset:], then
        # the reads in self._more (those that came while a request was in
        # progress, kept as they came rather than copied onto the rest).
        self._unread = b""
        self._offset = 0
        self._more: list[bytes] = []
        self._more_size = 0
        self._scanned = 0
        self._left = 0
        self._decoder: Optional[ChunkedDecoder] = None
        self._holds = 0
        self._starting = False
        self._again = False

    # -- reading requests -----------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _BODY:
            self._body_received(data, 0)
        elif state == _BUSY:
            # Pipelined requests: kept for when this one is done. Past
            # READ_AHEAD bytes the client is not read, whatever the state
            # of the writes (a client that does not read its responses
            # while it sends would otherwise fill rrlb's memory).
            self._more.append(data)
            self._more_size += len(data)
            if self._more_size + len(self._unread) - self._offset > READ_AHEAD:
                self._stop_reading(_AHEAD)
        elif state == _TUNNEL:
            self.tunnel_reader(data)  # type: ignore[misc]
        elif state != _CLOSED:
            if self._next_waits:
                # Read after reading stopped (TLS hands on the rest of a
                # record): kept with the requests read ahead.
                self._more.append(data)
                self._more_size += len(data)
                return
            buffer = self._unread
            # A head that came in pieces (at most max_header_size) is joined.
            self._head_received(buffer + data if buffer else data, 0)

    def _head_received(self, buffer: bytes, pos: int) -> None:
        """
        Read the request head at C{buffer[pos:]}: start its request, or keep
        what came of it until the rest comes.
        """
        if self._state == _IDLE and buffer[pos : pos + 1] in (b"\r", b"\n"):
            # Empty lines before a request line are ignored (RFC 9112 2.2).
            pos = _skip_empty_lines(buffer, pos)
            if pos == len(buffer):
                self._unread = b""
                self._offset = 0
                return
        limits = self.site.limits
        # A head arriving in pieces is searched only where its end could be
        # that was not searched before.
        scanned = self._scanned
        end = buffer.find(b"\r\n\r\n", pos + scanned)
        if end < 0 or end - pos > limits.max_header_size:
            if end < 0 and len(buffer) - pos <= limits.max_header_size:
                if pos:
                    buffer = buffer[pos:]  # the head so far, nothing before it
                self._unread = buffer
                self._offset = 0
                if len(buffer) > MAX_REQUEST_LINE + 1 and (
                    buffer.find(b"\r\n", 0, MAX_REQUEST_LINE + 2) < 0
                ):
                    self._refuse(BadRequest(414, URI_TOO_LONG, "the request line is too long"))
                elif buffer.find(b"\n\n", max(0, scanned - 1)) >= 0:
                    self._refuse(BadRequest(400, BAD_REQUEST, "bare LF in the request head"))
                elif buffer[scanned:].translate(None, HEAD_BYTES):
                    # Control bytes (a TLS handshake on a plain port, say):
                    # no need to wait for the end of a head that cannot be.
                    self._refuse(BadRequest(400, BAD_REQUEST, "control bytes in the request head"))
                else:
                    self._scanned = max(0, len(buffer) - 3)
                    if self._state == _IDLE:
                        # The head is coming in pieces: it has header_timeout
                        # from its first byte (slowloris).
                        self._state = _HEAD
                        self.deadline = self.clock.seconds() + limits.header_timeout
                return
            self._unread = buffer
            self._offset = pos
            if buffer.find(b"\r\n", pos, pos + MAX_REQUEST_LINE + 2) < 0:
                self._refuse(BadRequest(414, URI_TOO_LONG, "the request line is too long"))
            else:
                self._refuse(BadRequest(431, HEADER_TOO_LARGE, "the request head is too large"))
            return
        self._scanned = 0
        try:
            head = parse_request_head(buffer[pos:end], limits.max_headers)
        except BadRequest as e:
            self._unread = buffer
            self._offset = pos
            self._refuse(e)
            return
        self._start(head, buffer, end + 4, limits)

    def _start(self, head: RequestHead, buffer: bytes, pos: int, limits: ClientLimits) -> None:
        """
        Start the request of C{head}; what follows it is C{buffer[pos:]}
        (then L{_more}, if the head came from the read-ahead).
        """
        request: Any = self.requestFactory(self, len(self.requests))
        self.requests.append(request)
        set_raw_headers(request.requestHeaders, head.headers)
        request.method = head.method
        request.uri = head.target
        request.clientproto = head.version
        if self.edge == EDGE_TRUSTED:
            xff = head.headers.get(b"X-Forwarded-For")
            if xff:
                request.real_client = self.client_address = real_client(
                    self.forwarded[1], xff, limits.trusted_proxies
                ).decode("ascii")
        self.persistent = head.persistent
        if not head.persistent and head.version == b"HTTP/1.1":
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        length = head.length
        if length == 0:
            self._state = _BUSY
            self.deadline = None
            self.in_request = True
            # Whatever follows stays where it is, read ahead: no copy.
            self._unread = buffer
            self._offset = pos
            if len(buffer) - pos + self._more_size > READ_AHEAD:
                self._stop_reading(_AHEAD)
            request.content = None
            request.requestReceived(head.method, head.target, head.version)
            return
        maximum = limits.max_body_size
        if maximum and length is not None and length > maximum:
            # Refused before reading a byte of it (and before 100 Continue).
            self._refuse(BadRequest(413, BODY_TOO_LARGE, "the body is too large"), request)
            return
        # The body streams to the node as it arrives (rrlb.body): the
        # request is forwarded as soon as its head is in, and the channel
        # reads the body only as fast as the node takes it.
        request.content = None
        self._unread = b""
        self._offset = 0
        self._state = _BODY
        self.in_request = True
        self.deadline = self.clock.seconds() + limits.body_timeout
        body = request.body = StreamedBody(self, length, head.expect_continue)
        if length is None:
            self._decoder = ChunkedDecoder(body.feed, self._body_done, maximum)
        else:
            self._left = length
        # What came with the head is in the body before the request is
        # forwarded: a small body that came whole goes out with the head.
        if pos < len(buffer):
            self._body_received(buffer, pos)
        more = self._more
        while more and self._state == _BODY:
            data = more.pop(0)
            self._more_size -= len(data)
            self._body_received(data, 0)
        if self._state == _CLOSED:
            return
        request.requestReceived(head.method, head.target, head.version)

    def _body_received(self, data: bytes, pos: int) -> None:
        """
        Body bytes: C{data[pos:]}.
        """
        decoder = self._decoder
        if decoder is not None:
            try:
                decoder.feed(data, pos)
            except BadChunk as e:
                self._body_failed(BadRequest(400, BAD_FRAMING, str(e)))
                return
            except BodyTooLarge as e:
                self._body_failed(BadRequest(413, BODY_TOO_LARGE, str(e)))
                return
        else:
            left = self._left
            request = self.requests[-1]
            if len(data) - pos < left:
                self._left = left - len(data) + pos
                request.body.feed(data[pos:] if pos else data)
            else:
                self._left = 0
                end = pos + left
                request.body.feed(data[pos:end])
                self._body_done(data, end)
                return
        if self._state == _BODY and not self._holds:
            self.deadline = self.clock.seconds() + self.site.limits.body_timeout

    def _body_done(self, rest: bytes, pos: int = 0) -> None:
        """
        The body ended; C{rest[pos:]} is what the client sent after it.
        """
        self._decoder = None
        self._state = _BUSY
        self.deadline = None
        self._unread = rest
        self._offset = pos
        self._holds = 0
        # Nothing more of this request to read: take pipelined bytes (up to
        # READ_AHEAD) as after a request without a body.
        if len(rest) - pos + self._more_size > READ_AHEAD:
            self._stop_reading(_AHEAD)
        self._go_on_reading(_HELD)
        self.requests[-1].body.finish()

    def _body_failed(self, error: BadRequest) -> None:
        """
        The body broke a limit or its framing while it was streaming: the
        node's request is cancelled, and the client gets C{error} if no
        response has started yet, else the connection closes.
        """
        request = self.requests[-1]
        exchange = getattr(request, "exchange", None)
        if exchange is not None and not exchange.finished:
            exchange.client_gone()
        if request.startedWriting:
            self._state = _CLOSED
            self.deadline = None
            self._decoder = None
            request.client_error = error.reason
            self.transport.abortConnection()
            return
        self._refuse(error, request)

    # -- holding the client back (rrlb.body, rrlb.tunnel) -------------------------

    def hold(self, flag: int) -> None:
        """
        Hold the client back for the reason C{flag}: stop reading its body
        or its side of a tunnel (except while only waiting to send 100
        Continue, when it is not sending). The body timeout does not run
        while the client is held.
        """
        self._holds |= flag
        self._read_body()

    def release(self, flag: int) -> None:
        """
        The reason C{flag} to hold the client back is gone.
        """
        if self._holds & flag:
            self._holds &= ~flag
            self._read_body()

    def _read_body(self) -> None:
        state = self._state
        if state != _BODY and state != _TUNNEL:
            return
        holds = self._holds
        if holds & ~CONTINUE:
            self._stop_reading(_HELD)
        else:
            self._go_on_reading(_HELD)
        if state == _BODY:
            self.deadline = None if holds else self.clock.seconds() + self.site.limits.body_timeout

    def start_tunnel(self, head: bytes) -> bytes:
        """
        The node switched protocols: send the client C{head} (the 101),
        read from now on for the tunnel (L{rrlb.tunnel}), and return what
        the client already sent past its request.
        """
        self._state = _TUNNEL
        self.deadline = None
        self.persistent = False
        self.transport.write(head)
        buffered = b"".join([self._unread[self._offset :], *self._more])
        self._unread = b""
        self._offset = 0
        self._more = []
        self._more_size = 0
        self._go_on_reading(_AHEAD)
        return buffered

    def send_continue(self) -> None:
        """
        Tell a client that sent C{Expect: 100-continue} to send its body.
        """
        if self._state == _BODY:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def write_trailers(self, request: Any, headers: list[tuple[bytes, bytes]]) -> None:
        """
        The trailers of C{request}'s response (L{ProxyRequest.write_trailers}):
        the last chunk and the trailer section, if the body is chunked;
        nothing otherwise (RFC 9112 7.1.2: only chunked bodies carry them).
        """
        if not request.startedWriting:
            request.write(b"")
        if request.chunked:
            request.chunked = False  # finish() writes no last chunk of its own
            lines = [b"0\r\n"]
            for name, value in headers:
                lines += (name, b": ", value, b"\r\n")
            lines.append(b"\r\n")
            self.transport.write(b"".join(lines))

    def requestDone(self, request: Any) -> None:
        """
        The response to C{request} is complete: read the next request (the
        pipelined one already here, or wait with the keep-alive timeout), or
        close the connection.
        """
        if request is not self.requests[0]:
            raise TypeError
        del self.requests[0]
        self.served += 1
        if getattr(request, "client_error", None) is not None:
            self._linger()
            return
        if self._state == _BODY:
            # The response ended before the request body did (the node, or
            # rrlb, answered without reading it all): the rest of the body
            # is read and dropped for a while, then the connection closes.
            self._decoder = None
            self._holds = 0
            self._linger()
            return
        if not self.persistent or self._state == _CLOSED:
            self.loseConnection()
            return
        self.in_request = False
        self._state = _IDLE
        self.deadline = self.clock.seconds() + self.site.limits.keepalive_timeout
        if self.client_full:
            # The client has not taken this response yet: nothing more is
            # read from it, and the next request does not start (even one
            # already read), until it has, as with nginx. Else a client that
            # reads nothing could have every request it sent ahead answered
            # into rrlb's memory.
            self._stop_reading(_SENDING)
            self._next_waits = True
            return
        if not self._more and self._offset >= len(self._unread):
            # Nothing read ahead (the common case): wait for the next request.
            self._unread = b""
            self._offset = 0
            self._go_on_reading(_AHEAD)
            return
        self._next_requests()

    def _next_requests(self) -> None:
        """
        Start the pipelined requests already read, one after another, in a
        loop: a request answered at once (a 404, a 503) ends inside its own
        L{_start}, and recursing from there would run out of stack.
        """
        if self._starting:
            self._again = True
            return
        self._starting = True
        try:
            again = True
            while again:
                self._again = False
                self._next_request()
                again = self._again
        finally:
            self._starting = False
        if self._state != _BUSY or (
            len(self._unread) - self._offset + self._more_size <= READ_AHEAD
        ):
            self._go_on_reading(_AHEAD)

    def _next_request(self) -> None:
        """
        Start the next request read ahead, if there is one.

        Nothing is copied but the request's own head, and, when the buffer
        holds no complete head, the reads kept in L{_more} joined to what is
        left of it (less than a head): each byte read ahead is copied once
        more at most, so the cost per request is that of its own bytes,
        however much waits behind it.
        """
        buffer = self._unread
        pos = self._offset
        if buffer[pos : pos + 1] in (b"\r", b"\n"):
            pos = _skip_empty_lines(buffer, pos)
        more = self._more
        if more and buffer.find(b"\r\n\r\n", pos) < 0:
            if pos < len(buffer):
                more.insert(0, buffer[pos:])
            buffer = b"".join(more)
            pos = 0
            self._more = []
            self._more_size = 0
            if buffer[:1] in (b"\r", b"\n"):
                pos = _skip_empty_lines(buffer, 0)
        if pos >= len(buffer):
            self._unread = b""
            self._offset = 0
            return
        self._head_received(buffer, pos)

    # -- refusing ----------------------------------------------------------

    def _refuse(self, error: BadRequest, request: Any = None) -> None:
        """
        Answer a request rrlb will not serve with C{error}'s status and
        C{Connection: close}, count and log it, and close the connection
        once the answer is out.
        """
        offset = self._offset
        head = self._unread[offset : offset + MAX_REQUEST_LINE + 2]
        self._state = _CLOSED
        self.deadline = None
        self._decoder = None
        self._unread = b""
        self._offset = 0
        self._more = []
        self._more_size = 0
        self.persistent = False
        self._holds = 0
        # Read again, so that lingering drains what the client still sends.
        self._go_on_reading(_HELD)
        if request is None:
            request = self.requestFactory(self, len(self.requests))
            self.requests.append(request)
            # For the access log: what can be read of the request line.
            request.method, request.uri, version = request_line_of(head)
            request.clientproto = version if version in (b"HTTP/1.0", b"HTTP/1.1") else b"HTTP/1.1"
        request.content = None
        request.client_error = error.reason
        self.in_request = True
        error_response(
            request, error.code, error.text, ((b"Connection", b"close"),) + error.headers
        )

    def timed_out(self) -> None:
        """
        The deadline passed: what that means depends on what the connection
        was doing.
        """
        state = self._state
        if state == _HEAD:
            self._refuse(BadRequest(408, HEADER_TIMEOUT, "the request head took too long"))
        elif state == _BODY:
            self._body_failed(BadRequest(408, BODY_TIMEOUT, "the request body took too long"))
        elif state == _IDLE:
            self._state = _CLOSED
            self.loseConnection()
        elif state == _CLOSED:
            self.transport.abortConnection()
