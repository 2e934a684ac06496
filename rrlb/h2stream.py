# -*- test-case-name: tests.test_http2,tests.test_http2_requests,tests.test_http2_bounds -*-
"""
One HTTP/2 stream of a client (L{H2Stream}): its request, and the channel
that request writes its response to. L{rrlb.http2.H2ServerConnection}
makes one per stream and feeds it the stream's events.

 - Each request meets the rules of an HTTP/1.1 one, checked by the same
   L{rrlb.parser.validate_request}. One that fails is malformed (RFC 9113
   8.1.1): rrlb answers it on its stream with the status HTTP/1.1 gets
   (400, 405, 414, 431, 501) and contacts no node. C{:authority} is its
   C{Host}, and cookie fields split by HTTP/2 are joined again (8.2.3).
 - Its body streams to the node (L{rrlb.body}); HTTP/2 flow control is the
   backpressure: a held body leaves the client's window closed.
 - The response head waits for the first byte of the body, or for the end:
   a response with no body is one HEADERS frame with END_STREAM (gRPC's
   trailers-only answer). Trailers (L{write_trailers}) end the stream with
   a HEADERS frame. No connection-specific header goes to the client (RFC
   9113 8.2.2).
 - What it holds for the client is bounded (L{rrlb.h2buffers}).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional

from rrlb._twisted import client_gone, raw_headers, set_raw_headers
from rrlb.body import CONTINUE, StreamedBody
from rrlb.channel import MAX_LOGGED_TARGET
from rrlb.clients import real_client
from rrlb.h2buffers import STREAM_BUFFER, STREAM_FULL, WINDOW, Paused
from rrlb.h2fields import h2_fields
from rrlb.http1 import EDGE_TRUSTED, H2_CONNECTION_SPECIFIC, error_response
from rrlb.parser import (
    BAD_REQUEST,
    BODY_TIMEOUT,
    BODY_TOO_LARGE,
    CONTENT_LENGTH,
    HTTP_2,
    BadRequest,
    validate_request,
)

# The most bytes of a refused request's method written to the access log
# (as rrlb.channel.request_line_of keeps of an HTTP/1.1 one).
MAX_LOGGED_METHOD = 32

class H2Stream(Paused):
    """
    One HTTP/2 stream: a request, and what the proxy needs of a channel
    (addresses, the forwarded scheme and client, the edge, writing the
    response).

    @ivar queue: response DATA waiting for the client's window or socket.
    @ivar queued: its size in bytes.
    """

    def __init__(self, connection: Any, stream_id: int) -> None:
        self.conn = connection
        self.stream_id = stream_id
        channel = connection.channel
        self.peer = channel.peer
        self.local = channel.local
        self.forwarded = channel.forwarded
        self.edge = channel.edge
        self.client_cert = channel.client_cert
        self.site = self.factory = site = channel.site
        self.limits = site.limits
        self.clock = channel.clock
        # The request's transport: writing, closing and the addresses go
        # through the stream, never to the whole connection.
        self.transport = self
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.command = self.path = b""
        self.head: Any = None
        self._holds = 0
        self._unacked = 0
        self._body_timer: Any = None
        # The response head and trailers not sent yet; whether the response
        # ended (its end waits behind the queue) and the stream is over.
        self._head: Optional[list[tuple[bytes, bytes]]] = None
        self._trailers: Optional[list[tuple[bytes, bytes]]] = None
        self._last: Optional[bytes] = None
        self.ending = False
        self.closed = False
        # The client may still send on the stream (a body).
        self.remote_open = False
        self.request: Any = site.requestFactory(self, False)

    # -- the request -----------------------------------------------------------

    def start(self, fields: Any, has_body: bool) -> None:
        """
        The request head is in: forward it now, its body (if any) following
        as it arrives; or answer it if it breaks the rules.
        """
        request = self.request
        self.remote_open = has_body
        try:
            head = self.head = self._validate(fields)
        except BadRequest as e:
            self._refuse(e)
            return
        raw = head.headers
        set_raw_headers(request.requestHeaders, raw)
        request.content = None
        if self.edge == EDGE_TRUSTED:
            xff = raw.get(b"X-Forwarded-For")
            if xff:
                request.real_client = real_client(
                    self.forwarded[1], xff, self.limits.trusted_proxies
                ).decode("latin-1")
        if has_body:
            length = head.length if CONTENT_LENGTH in raw else None
            maximum = self.limits.max_body_size
            if maximum and length is not None and length > maximum:
                self._refuse(BadRequest(413, BODY_TOO_LARGE, "the body is too large"))
                return
            request.body = StreamedBody(self, length, head.expect_continue)
            self._body_timer = self.clock.callLater(self.limits.body_timeout, self._body_late)
        request.requestReceived(self.command, self.path, b"HTTP/2")

    def _validate(self, fields: Any) -> Any:
        """
        The request's head from its HTTP/2 fields, through the same
        L{validate_request} as an HTTP/1.1 head.

        @raise BadRequest: it breaks the rules.
        """
        method = path = authority = scheme = None
        # The fields as HTTP/1.1 lines (name: value), for validate_request.
        lines: list[bytes] = []
        cookies: list[bytes] = []
        regular = False
        for name, value in fields:
            if name[:1] == b":":
                # The pseudo-header fields: each once, before the others,
                # and only a request's (RFC 9113 8.3).
                if regular:
                    raise BadRequest(400, BAD_REQUEST, "a pseudo-header field after the others")
                if name == b":method" and method is None:
                    method = value
                elif name == b":path" and path is None:
                    path = value
                elif name == b":scheme" and scheme is None:
                    scheme = value
                elif name == b":authority" and authority is None:
                    authority = value
                    lines.append(b"host: " + value)
                else:
                    raise BadRequest(400, BAD_REQUEST, "a bad or repeated pseudo-header field")
                continue
            regular = True
            if b":" in name or not name or name.lower() != name:
                # Read as a line, the name would end at its colon; and HTTP/2
                # names are lower case (RFC 9113 8.2.1, 8.2.2).
                raise BadRequest(400, BAD_REQUEST, "malformed header field name")
            if name == b"cookie":
                cookies.append(value)
                continue
            if name == b"host" and authority is not None:
                if value != authority:
                    raise BadRequest(400, BAD_REQUEST, "Host and :authority differ")
                continue
            if name == b"te" and value != b"trailers":
                # The other connection-specific fields are validate_request's.
                raise BadRequest(400, BAD_REQUEST, "TE other than trailers (RFC 9113 8.2.2)")
            lines.append(name + b": " + value)
        if method != b"CONNECT" and (method is None or path is None or scheme is None):
            raise BadRequest(400, BAD_REQUEST, "a required pseudo-header field is missing")
        if cookies:
            lines.append(b"cookie: " + b"; ".join(cookies))
        self.command = method = method or b""
        self.path = path = path or b""
        limits = self.limits
        return validate_request(
            method,
            path,
            HTTP_2,
            lines,
            b"\r\n".join([method + b" " + path + b" " + HTTP_2, *lines]),
            limits.max_headers,
            limits.max_header_size,
        )

    def _refuse(self, error: BadRequest) -> None:
        """
        Answer the request with C{error} on its stream, count it in
        C{rrlb_client_errors_total} and log it, as the HTTP/1.1 channel does.
        """
        request = self.request
        request.client_error = error.reason
        request.method = self.command[:MAX_LOGGED_METHOD]
        request.uri = self.path[:MAX_LOGGED_TARGET]
        request.clientproto = b"HTTP/2"
        request.content = None
        error_response(request, error.code, error.text, error.headers)

    # -- the body's source (rrlb.body) -----------------------------------------

    def hold(self, flag: int) -> None:
        self._holds |= flag

    def release(self, flag: int) -> None:
        if self._holds & flag:
            self._holds &= ~flag
            if not self._holds & ~CONTINUE:
                self._open_window()

    def send_continue(self) -> None:
        if not self.closed and self._head is None and not self.ending:
            self.conn.send_headers(self, [(b":status", b"100")], False)

    def _open_window(self) -> None:
        unacked = self._unacked
        if unacked and not self.closed:
            self._unacked = 0
            self.conn.acknowledge(self, unacked)

    def data_received(self, data: bytes, flow_controlled: int) -> None:
        request = self.request
        body = request.body
        self._unacked += flow_controlled
        if body is None or body.complete or request.finished:
            # A body nobody forwards (the response is out already): let it
            # come, and drop it.
            self._open_window()
            return
        if not data:
            # A DATA frame with no data (empty, or only padding) is no piece
            # of the body: fed on, it would be framed as a last chunk (issue
            # 17). Its padding counts for the window all the same.
            if not self._holds & ~CONTINUE:
                self._open_window()
            return
        maximum = self.limits.max_body_size
        if maximum and body.received + len(data) > maximum:
            self._body_failed(413, BODY_TOO_LARGE, "the body is too large")
            return
        timer = self._body_timer
        if timer is not None and timer.active():
            timer.reset(self.limits.body_timeout)
        body.feed(data)
        if not self._holds & ~CONTINUE:
            # Reopen the window only as far as the node took the bytes: while
            # the body is held the client's window stays closed.
            self._open_window()

    def _body_late(self) -> None:
        """
        --client-body-timeout passed with no body byte: unless rrlb itself
        holds the client back (then it is not the client's fault), the
        request is cut off, with 408 if no response started.
        """
        self._body_timer = None
        body = self.request.body
        if body is None or body.complete:
            return
        if self._holds:
            self._body_timer = self.clock.callLater(self.limits.body_timeout, self._body_late)
            return
        self._body_failed(408, BODY_TIMEOUT, "the request body took too long")

    def _body_failed(self, code: int, reason: str, text: str) -> None:
        request = self.request
        self._stop_body_timer()
        exchange = request.exchange
        if exchange is not None and not exchange.finished:
            exchange.client_gone()
        request.body.complete = True
        if request.startedWriting:
            self.abortConnection()
            return
        request.client_error = reason
        error_response(request, code, text)

    def _stop_body_timer(self) -> None:
        timer, self._body_timer = self._body_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def request_complete(self) -> None:
        """
        The client ended its side of the stream.
        """
        self.remote_open = False
        self._stop_body_timer()
        body = self.request.body
        if body is not None and not body.complete:
            body.finish()

    # -- the response: what ProxyRequest calls on its channel -------------------

    def getPeer(self) -> Any:
        return self.peer

    def getHost(self) -> Any:
        return self.local

    def isSecure(self) -> bool:
        return self.forwarded[0] == b"https"

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        fields = h2_fields(raw_headers(headers))
        fields.insert(0, (b":status", code))
        self._head = fields

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        head = self._head
        if head is not None:
            self._head = None
            self.conn.send_headers(self, head, False)
        if not data:
            return
        if self.queue:
            self.enqueue(data)
            return
        # The latest write waits for the end of the reactor's turn (or of
        # the response, if that comes first: it then carries END_STREAM, one
        # frame fewer for the common response that comes in one read).
        last = self._last
        self._last = data
        if last is None:
            self.conn.hold_last(self)
        else:
            self.conn.send_data(self, last)
            if self.queue:
                self._last = None
                self.enqueue(data)

    def send_last(self) -> None:
        """
        Send the write held back by L{write}, if any.
        """
        last = self._last
        if last is not None and not self.closed:
            self._last = None
            self.conn.send_data(self, last)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def write_trailers(self, request: Any, headers: list[tuple[bytes, bytes]]) -> None:
        """
        End the response with C{headers} as trailers, when it ends.
        """
        trailers = [(name.lower(), value) for name, value in headers]
        self._trailers = [f for f in trailers if f[0] not in H2_CONNECTION_SPECIFIC]

    def requestDone(self, request: Any) -> None:
        """
        The response is complete: end the stream once its queue is out.
        """
        self._stop_body_timer()
        if self.closed:
            return
        self.ending = True
        if not self.queue:
            self.end()

    def end(self) -> None:
        """
        Send the end of the stream: the head with END_STREAM if no body went
        out, else the trailers, else an empty DATA frame with END_STREAM.
        """
        conn = self.conn
        head, self._head = self._head, None
        trailers, self._trailers = self._trailers, None
        if head is not None:
            if trailers is None:
                conn.send_headers(self, head, True)
                conn.stream_done(self)
                return
            conn.send_headers(self, head, False)
        last, self._last = self._last, None
        if last is not None:
            if trailers is None:
                if conn.send_data(self, last, True):
                    conn.stream_done(self)
                # Else the rest waits in the queue, and the end after it.
                return
            conn.send_data(self, last)
            if self.queue:
                self._trailers = trailers
                return
        if trailers is not None:
            conn.send_headers(self, trailers, True)
        else:
            conn.end_stream(self)
        conn.stream_done(self)

    def enqueue(self, data: bytes) -> None:
        """
        Keep C{data} until the client's window or socket takes it.
        """
        self.queue.append(data)
        size = self.queued = self.queued + len(data)
        self.conn.queued_more(len(data))
        if size > STREAM_BUFFER:
            self.pause_node(STREAM_FULL)
        self.pause_node(WINDOW)

    def dequeued(self, size: int) -> None:
        """
        C{size} bytes of the queue went out.
        """
        queued = self.queued = self.queued - size
        if self.paused_for & STREAM_FULL and queued <= STREAM_BUFFER // 2:
            self.resume_node(STREAM_FULL)
        if not queued:
            self.resume_node(WINDOW)

    def loseConnection(self) -> None:
        # rrlb closes a request's channel only to cut a response short:
        # for one stream of many, that is a reset of the stream.
        self.abortConnection()

    def abortConnection(self) -> None:
        if not self.closed:
            self.conn.reset(self)

    # -- the stream going away -----------------------------------------------------

    def lost(self, reason: Any) -> None:
        """
        The stream is over before its response ended (reset by either side,
        or the connection is gone): the request is told so.
        """
        self._stop_body_timer()
        self.closed = True
        self.queue.clear()
        request = self.request
        if not request.finished and not client_gone(request):
            request.connectionLost(reason)
