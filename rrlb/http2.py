# -*- test-case-name: tests.test_http2 -*-
"""
HTTP/2 for clients (C{--http2}): TLS listeners offer C{h2} and C{http/1.1}
by ALPN, and a client that picks C{h2} is served by Twisted's own HTTP/2
connection (L{twisted.web._http2}), each stream a request proxied to a node
over the same pooled HTTP/1.1 connections as any other.

Imported only when C{--http2} is on: nothing of HTTP/2 (nor the C{h2}
package) is loaded otherwise.

 - L{ALPNChannel}: the site's channel when HTTP/2 is on. It is an ordinary
   L{ProxyChannel} unless the TLS handshake chose C{h2}; then it hands the
   connection to a L{ProxyH2Connection} and stays the site's record of the
   connection (timeouts, the connection cap, the drain).
 - L{ProxyH2Stream}: one stream, and what the proxy needs of a channel
   (addresses, the forwarded scheme and client, the edge). Its request body
   streams to the node (L{rrlb.body}); HTTP/2 flow control is the
   backpressure both ways: a held body leaves the client's window closed,
   a client that reads slowly pauses its stream's producer (the node).
 - Connection-specific headers are translated as RFC 9113 section 8.2.2
   says: none goes to an HTTP/2 client, C{:authority} becomes C{Host}, and
   cookie fields split by HTTP/2 are joined again (section 8.2.3).
 - What rrlb holds for the client is bounded whatever windows it advertises
   (L{rrlb.h2buffers}).
 - Descriptors: a stream may hold a node connection of its own, so each
   stream beyond a connection's first takes a place under
   C{--max-connections} (L{ClientSite.stream_opened}); with none left a new
   stream is refused with C{REFUSED_STREAM}. At most L{MAX_STREAMS} are
   open on a connection (C{SETTINGS_MAX_CONCURRENT_STREAMS}).
 - Each request meets the rules of an HTTP/1.1 one, checked by the same
   L{rrlb.parser.validate_request}. One that fails is malformed (RFC 9113
   8.1.1): rrlb answers it on its stream with the status HTTP/1.1 gets
   (400, 405, 414, 431, 501) and contacts no node; the connection and its
   other streams carry on. What the C{h2} library refuses itself (an
   uppercase or empty name, CR, LF or NUL, a connection-specific field,
   a missing pseudo-header) is a connection error: it sends GOAWAY.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings
from priority import BadWeightError, DuplicateStreamError, PriorityLoop
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from rrlb._twisted import H2Connection, H2Stream, set_raw_headers
from rrlb.body import CONTINUE, StreamedBody
from rrlb.channel import _CLOSED, MAX_LOGGED_TARGET, ProxyChannel
from rrlb.clients import real_client
from rrlb.h2buffers import BoundedConnection, BoundedStream
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

# Offered by ALPN on TLS listeners, in order of preference.
ALPN_PROTOCOLS = [b"h2", b"http/1.1"]

# The most bytes of a refused request's method written to the access log
# (as rrlb.channel.request_line_of keeps of an HTTP/1.1 one).
MAX_LOGGED_METHOD = 32

# Streams a client may have open at once on one connection
# (SETTINGS_MAX_CONCURRENT_STREAMS; nginx's http2_max_concurrent_streams is
# 128, HAProxy's 100).
MAX_STREAMS = 100


class ProxyH2Stream(BoundedStream, H2Stream):
    """
    One HTTP/2 stream: a request, and the channel the proxy sees for it.
    """

    def __init__(
        self,
        streamID: int,
        connection: ProxyH2Connection,
        headers: Any,
        requestFactory: Any,
        site: Any,
        factory: Any,
    ) -> None:
        channel = connection.channel
        # What ProxyRequest and ProxyExchange ask of a channel, once per stream.
        self.peer = channel.peer
        self.local = channel.local
        self.forwarded = channel.forwarded
        self.edge = channel.edge
        self.client_cert = channel.client_cert
        self.limits = site.limits
        self.clock = channel.clock
        self._holds = 0
        self._unacked = 0
        self._body_timer: Any = None
        # The request's head once validated, or why it was refused.
        self.head: Any = None
        self.refused: Optional[BadRequest] = None
        # The stream is the transport of its request (H2Stream has None):
        # writing, closing and the addresses go through it, never to the
        # whole connection.
        self.transport = self  # type: ignore[assignment]
        super().__init__(streamID, connection, headers, requestFactory, site, factory)

    def _convertHeaders(self, headers: Any) -> None:
        """
        Take the request's head from its HTTP/2 fields, through the same
        L{validate_request} as an HTTP/1.1 head: C{:authority} is its
        C{Host}, split cookie fields are one again (RFC 9113 8.2.3, 8.3.1).
        A request that fails is kept in C{refused} and answered in L{start}
        (RFC 9113 8.1.1: a malformed request is a stream error, and the
        server may answer it before closing the stream).
        """
        method = path = authority = None
        # The fields as HTTP/1.1 lines (name: value), for validate_request.
        lines: list[bytes] = []
        cookies: list[bytes] = []
        try:
            for name, value in headers:
                if name[:1] == b":":
                    # Pseudo-header fields come first (h2 checks that).
                    if name == b":method":
                        method = value
                    elif name == b":path":
                        path = value
                    elif name == b":authority":
                        authority = value
                        lines.append(b"host: " + value)
                    continue
                if b":" in name:
                    # Read as a line, the name would end at its colon (RFC
                    # 9113 8.2.1 forbids it; h2 checks that too).
                    raise BadRequest(400, BAD_REQUEST, "malformed header field name")
                if name == b"cookie":
                    cookies.append(value)
                    continue
                if name == b"host" and authority is not None:
                    if value != authority:
                        raise BadRequest(400, BAD_REQUEST, "Host and :authority differ")
                    continue
                lines.append(name + b": " + value)
            if cookies:
                lines.append(b"cookie: " + b"; ".join(cookies))
            self.command = method = method or b""
            self.path = path = path or b""
            limits = self.limits
            head = validate_request(
                method,
                path,
                HTTP_2,
                lines,
                b"\r\n".join([method + b" " + path + b" " + HTTP_2, *lines]),
                limits.max_headers,
                limits.max_header_size,
            )
        except BadRequest as e:
            self.refused = e
            return
        raw = head.headers
        self.head = head
        request = self._request
        set_raw_headers(request.requestHeaders, raw)
        request.content = None
        if self.edge == EDGE_TRUSTED:
            xff = raw.get(b"X-Forwarded-For")
            if xff:
                request.real_client = real_client(
                    self.forwarded[1], xff, self.limits.trusted_proxies
                ).decode("latin-1")

    def start(self, has_body: bool) -> None:
        """
        The request head is in: forward it now, its body (if any) following
        as it arrives; or answer it if it was refused.
        """
        request = self._request
        refused = self.refused
        if refused is not None:
            self._refuse(refused)
            return
        if has_body:
            head = self.head
            length = head.length if CONTENT_LENGTH in head.headers else None
            maximum = self.limits.max_body_size
            if maximum and length is not None and length > maximum:
                self._refuse(BadRequest(413, BODY_TOO_LARGE, "the body is too large"))
                return
            request.body = StreamedBody(self, length, head.expect_continue)
            self._body_timer = self.clock.callLater(self.limits.body_timeout, self._body_late)
        request.requestReceived(self.command, self.path, b"HTTP/2")

    def _refuse(self, error: BadRequest) -> None:
        """
        Answer the request with C{error} on its stream, count it in
        C{rrlb_client_errors_total} and log it, as the HTTP/1.1 channel does.
        """
        request = self._request
        request.client_error = error.reason
        request.method = (self.command or b"")[:MAX_LOGGED_METHOD]
        request.uri = (self.path or b"")[:MAX_LOGGED_TARGET]
        request.clientproto = b"HTTP/2"
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
        self._conn._send100Continue(self.streamID)

    def _open_window(self) -> None:
        unacked = self._unacked
        if unacked and self._conn._streamIsActive(self.streamID):
            self._unacked = 0
            self._conn.openStreamWindow(self.streamID, unacked)

    def receiveDataChunk(self, data: bytes, flowControlledLength: int) -> None:
        request = self._request
        body = request.body
        self._unacked += flowControlledLength
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
            self._body_too_large()
            return
        timer = self._body_timer
        if timer is not None and timer.active():
            timer.reset(self.limits.body_timeout)
        body.feed(data)
        if not self._holds & ~CONTINUE:
            # Reopen the window only as far as the node took the bytes: while
            # the body is held the client's window stays closed.
            self._open_window()

    def _body_too_large(self) -> None:
        self._body_failed(413, BODY_TOO_LARGE, "the body is too large")

    def _body_late(self) -> None:
        """
        --client-body-timeout passed with no body byte: unless rrlb itself
        holds the client back (then it is not the client's fault), the
        request is cut off, with 408 if no response started.
        """
        self._body_timer = None
        body = self._request.body
        if body is None or body.complete:
            return
        if self._holds:
            self._body_timer = self.clock.callLater(self.limits.body_timeout, self._body_late)
            return
        self._body_failed(408, BODY_TIMEOUT, "the request body took too long")

    def _body_failed(self, code: int, reason: str, text: str) -> None:
        request = self._request
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

    def requestComplete(self) -> None:
        self._stop_body_timer()
        body = self._request.body
        if body is not None and not body.complete:
            body.finish()

    def connectionLost(self, reason: Any) -> None:
        self._stop_body_timer()
        super().connectionLost(reason)

    def requestDone(self, request: Any) -> None:
        # The response is complete: what is left of the body is not wanted.
        self._stop_body_timer()
        super().requestDone(request)

    # -- what the proxy calls on a channel -----------------------------------

    def loseConnection(self) -> None:
        # rrlb closes a request's channel only to cut a response short:
        # for one stream of many, that is a reset of the stream.
        self.abortConnection()

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        self._conn.writeHeaders(
            version,
            code,
            reason,
            [
                (name, value)
                for name, values in headers.getAllRawHeaders()
                if name.lower() not in H2_CONNECTION_SPECIFIC
                for value in values
            ],
            self.streamID,
        )


class ProxyH2Connection(BoundedConnection, H2Connection):
    """
    An HTTP/2 connection of a client, driven by its L{ALPNChannel}.
    """

    transport: Any
    requestFactory: Any
    site: Any

    def __init__(self, reactor: Any, channel: ALPNChannel) -> None:
        super().__init__(reactor)
        self.channel = channel
        self.going_away = False
        # Streams beyond the first holding a place under --max-connections.
        self._extra_streams = 0
        # As h2 sets them itself, with rrlb's stream limit said out loud.
        self.conn.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                SettingCodes.MAX_HEADER_LIST_SIZE: self.conn.DEFAULT_MAX_HEADER_LIST_SIZE,
            },
        )

    def dataReceived(self, data: bytes) -> None:
        conn = self.conn
        if conn.state_machine.state is ConnectionState.CLOSED:
            return  # after GOAWAY: h2 would keep every byte in its frame buffer
        super().dataReceived(data)
        if conn.state_machine.state is ConnectionState.CLOSED:
            # A protocol error (or the client's GOAWAY): Twisted loses the
            # transport, but TLS closes only once no producer is registered,
            # so the connection stayed open, reading, until the idle timeout.
            self.close()

    def _requestReceived(self, event: Any) -> None:
        self.channel.deadline = None
        if self.going_away:
            # Draining: the GOAWAY told the client no new stream is served;
            # one sent meanwhile is refused (the client may retry it).
            self._refuse(event.stream_id)
            return
        if self.streams:
            # This stream may hold a node connection beside the others': it
            # takes a place under --max-connections, or waits for the
            # client to retry it.
            if not self.channel.site.stream_opened():
                self._refuse(event.stream_id)
                return
            self._extra_streams += 1
        stream = ProxyH2Stream(
            event.stream_id, self, event.headers, self.requestFactory, self.site, self.factory
        )
        self.streams[event.stream_id] = stream
        # The rest as H2Connection._requestReceived does it, with rrlb's stream.
        self._streamCleanupCallbacks[event.stream_id] = Deferred()
        self._outboundStreamQueues[event.stream_id] = self.send_queue(stream)
        try:
            self.priority.insert_stream(event.stream_id)
        except DuplicateStreamError:
            pass
        else:
            self.priority.block(event.stream_id)
        stream.start(has_body=event.stream_ended is None)

    def _handlePriorityUpdate(self, event: Any) -> None:
        # RFC 9113 5.3.2 deprecates this priority scheme. Twisted's handler
        # adds a tree entry for every idle or closed stream a PRIORITY frame
        # names, up to the priority library's 1,000 per connection, and then
        # raises out of dataReceived. rrlb's tree holds open streams only:
        # a frame for another stream is ignored, and a parent that is not
        # open is the root.
        streams = self.streams
        if event.stream_id not in streams:
            return
        depends_on = event.depends_on if event.depends_on in streams else None
        try:
            self.priority.reprioritize(
                stream_id=event.stream_id,
                depends_on=depends_on,
                weight=event.weight,
                exclusive=event.exclusive,
            )
        except (PriorityLoop, BadWeightError):
            pass  # h2 refuses these first; never a traceback for a frame

    def _refuse(self, stream_id: int) -> None:
        """
        Refuse a new stream with REFUSED_STREAM: nothing of it was processed,
        so the client may send it again (RFC 9113 8.7).
        """
        self.conn.reset_stream(stream_id, error_code=ErrorCodes.REFUSED_STREAM)
        self._tryToWriteControlData()

    def _requestDataReceived(self, event: Any) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            # A stream rrlb refused or already finished.
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        stream.receiveDataChunk(event.data, event.flow_controlled_length)

    def _requestEnded(self, event: Any) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.requestComplete()

    def _requestAborted(self, event: Any) -> None:
        if event.stream_id in self.streams:
            super()._requestAborted(event)

    def _requestDone(self, streamID: int) -> None:
        queue = self._outboundStreamQueues[streamID]
        super()._requestDone(streamID)
        self.queue_dropped(queue)
        # Keep one place for each open stream beyond the first.
        site = self.channel.site
        while self._extra_streams > max(0, len(self.streams) - 1):
            self._extra_streams -= 1
            site.stream_closed()
        if not self.streams:
            channel = self.channel
            if self.going_away:
                self.close()
            elif channel._state != _CLOSED:
                channel.deadline = channel.clock.seconds() + channel.site.limits.keepalive_timeout

    def go_away(self) -> None:
        """
        For a drain: serve no new stream (each is refused with
        REFUSED_STREAM, which a client may retry elsewhere), and say GOAWAY
        and close once the open ones are done. The GOAWAY waits for them:
        some clients (the h2 library's among them) take any GOAWAY as the
        end of the connection, responses in flight included.
        """
        self.going_away = True
        if not self.streams:
            self.close()

    def close(self) -> None:
        """
        Say GOAWAY and close the connection. TLS closes for good only once
        the client answers close_notify: one that does not is cut off after
        the site's close_timeout, as an HTTP/1.1 connection is.
        """
        channel = self.channel
        channel._state = _CLOSED
        channel.deadline = channel.clock.seconds() + channel.site.close_timeout
        try:
            self.conn.close_connection()
            self._tryToWriteControlData()
        except Exception:
            pass  # the connection is already closed
        transport = self.transport
        # TLS closes only once no producer is registered on it.
        if (
            getattr(transport, "producer", None) is not None
            or getattr(transport, "_producer", None) is not None
        ):
            transport.unregisterProducer()
        transport.loseConnection()


class ALPNChannel(ProxyChannel):
    """
    A client connection on a site with HTTP/2 on: HTTP/1.1 as
    L{ProxyChannel} serves it, unless the TLS handshake chose C{h2}.

    The choice is made on the first bytes from the client (the handshake is
    over by then); from then on reads go straight to the chosen protocol.
    """

    h2: Optional[ProxyH2Connection] = None

    # Where reads go once the first one chose: the HTTP/2 connection's or
    # ProxyChannel's dataReceived.
    reader: Optional[Callable[[bytes], None]] = None

    def dataReceived(self, data: bytes) -> None:
        reader = self.reader
        if reader is None:
            if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
                reader = self._start_h2().dataReceived
            else:
                reader = super().dataReceived
            self.reader = reader
        reader(data)

    def _start_h2(self) -> ProxyH2Connection:
        transport = self.transport
        # The HTTP/1.1 channel registered itself as the transport's producer;
        # the HTTP/2 connection takes its place.
        transport.unregisterProducer()
        h2 = self.h2 = ProxyH2Connection(self.clock, self)
        h2.requestFactory = self.requestFactory
        h2.site = self.site
        h2.factory = self.factory
        h2.makeConnection(transport)
        transport.registerProducer(h2, True)
        self.deadline = self.clock.seconds() + self.site.limits.keepalive_timeout
        return h2

    def connectionLost(self, reason: Failure = Failure(ConnectionLost())) -> None:
        h2 = self.h2
        if h2 is not None:
            h2.connectionLost(reason)
        super().connectionLost(reason)

    def timed_out(self) -> None:
        h2 = self.h2
        if h2 is None:
            super().timed_out()
        elif self._state == _CLOSED:
            self.transport.abortConnection()
        elif not h2.streams:
            h2.close()

    def close_when_idle(self) -> None:
        h2 = self.h2
        if h2 is None:
            super().close_when_idle()
        else:
            h2.go_away()
