# -*- test-case-name: tests.test_http2,tests.test_h2c,tests.test_h2_protections -*-
"""
HTTP/2 for clients (C{--http2}): TLS listeners offer C{h2} and C{http/1.1}
by ALPN, C{tcp:} listeners take a client that opens with the HTTP/2 preface
for one (h2c with prior knowledge), and an HTTP/2 client is served by
L{H2ServerConnection}: rrlb's own connection on the C{h2} state machine.
Each stream (L{rrlb.h2stream.H2Stream}) is a request handed to the same
exchange as an HTTP/1.1 one, proxied to a node over the same pooled
connections.

Imported only when C{--http2} is on: nothing of HTTP/2 (nor the C{h2}
package) is loaded otherwise.

 - L{ALPNChannel}: the site's channel when HTTP/2 is on. It is an ordinary
   L{ProxyChannel} unless the client chose HTTP/2; then it hands the
   connection to an L{H2ServerConnection} and stays the site's record of
   the connection (timeouts, the connection cap, the drain).
 - Descriptors: a stream may hold a node connection of its own, so each
   stream beyond a connection's first takes a place under
   C{--max-connections} (L{ClientSite.stream_opened}); with none left a new
   stream is refused with C{REFUSED_STREAM}, as is one beyond
   L{MAX_STREAMS} (C{SETTINGS_MAX_CONCURRENT_STREAMS}) open at once.
 - The protections of docs/security.md: a client that resets more than
   L{MAX_RESETS} of its streams (rapid reset, CVE-2023-44487), or sends more
   than L{MAX_PINGS} PING or L{MAX_SETTINGS} SETTINGS frames, within
   L{FLOOD_WINDOW} seconds is told GOAWAY (C{ENHANCE_YOUR_CALM}) and cut
   off; so is one that makes rrlb write more than L{MAX_UNREAD} while it
   does not read. The header list is bounded by C{SETTINGS_MAX_HEADER_LIST_SIZE}
   (what HPACK may inflate to) and C{--max-header-size} (a 431 on the
   stream), and a header block by the C{h2} library's 64 CONTINUATION
   frames.
 - A request whose fields break HTTP/2's rules (an uppercase or empty name,
   a connection-specific field, a pseudo-header field missing, repeated or
   out of place) is malformed and answered 400 on its stream, as one that
   breaks HTTP/1.1's; a frame out of place is a connection error: rrlb
   sends GOAWAY and closes.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from rrlb.channel import _CLOSED, ProxyChannel
from rrlb.h2buffers import CONNECTION_FULL, Sender
from rrlb.h2fields import FieldEncoder
from rrlb.h2stream import H2Stream

# How an HTTP/2 client opens a connection (RFC 9113 3.4); on a cleartext
# listener it is how rrlb tells HTTP/2 with prior knowledge (h2c) from
# HTTP/1.1.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Offered by ALPN on TLS listeners, in order of preference.
ALPN_PROTOCOLS = [b"h2", b"http/1.1"]

# Streams a client may have open at once on one connection
# (SETTINGS_MAX_CONCURRENT_STREAMS; nginx's http2_max_concurrent_streams is
# 128, HAProxy's 100). One beyond them is refused with REFUSED_STREAM.
MAX_STREAMS = 100
# The open streams h2 itself allows: more than one read can open.
H2_STREAM_LIMIT = 1 << 20
# What HPACK may inflate one header list to (SETTINGS_MAX_HEADER_LIST_SIZE,
# h2's default); past it the connection ends. Smaller, --max-header-size
# answers 431 on the stream.
MAX_HEADER_LIST = 65536

# The floods a connection is cut off for (GOAWAY ENHANCE_YOUR_CALM): more
# than this many of a kind within FLOOD_WINDOW seconds. Resets count
# streams the client reset while rrlb served them (rapid reset: each costs
# a request to a node); nginx and Netty cut off at about twice the stream
# limit too.
FLOOD_WINDOW = 10.0
MAX_RESETS = 2 * MAX_STREAMS
MAX_PINGS = 100
MAX_SETTINGS = 100

# Bytes of frames rrlb may write while the client's socket does not drain
# (its DATA is queued on the streams, and bounded there).
MAX_UNREAD = 256 * 1024

_RESETS, _PINGS, _SETTINGS = range(3)
_FLOOD_LIMITS = (MAX_RESETS, MAX_PINGS, MAX_SETTINGS)


class _LocalSettings(Settings):
    """
    rrlb's settings as C{h2} sends them, but for the stream limit it
    enforces: a stream beyond L{MAX_STREAMS} must reach rrlb, to be refused
    with REFUSED_STREAM, rather than end the connection inside C{h2}. h2
    opens every stream of one read before rrlb sees the first, so its limit
    is what a read can hold (a HEADERS frame is at least 10 bytes); rrlb
    refuses the extra ones at once, and cuts off a client that keeps
    sending them (L{MAX_RESETS}).
    """

    @property
    def max_concurrent_streams(self) -> int:
        return H2_STREAM_LIMIT

    @max_concurrent_streams.setter
    def max_concurrent_streams(self, value: int) -> None:
        self[SettingCodes.MAX_CONCURRENT_STREAMS] = value


_CONFIG = H2Configuration(
    client_side=False,
    header_encoding=None,
    # Each request's fields are checked once, by rrlb.h2stream and
    # rrlb.parser.validate_request (a malformed one is answered on its
    # stream); h2's own pass over them cost more than that whole check.
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
    # rrlb's response headers come from its own parser (or its own
    # answers), checked once there, with names lower-cased and
    # connection-specific fields dropped by rrlb.h2fields.h2_fields.
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)


class H2ServerConnection(Sender):
    """
    A client's HTTP/2 connection, driven by its L{ALPNChannel}: bytes in to
    C{h2}'s events, each stream's request handed to the proxy, responses
    out; the transport's streaming producer.

    @ivar streams: the streams rrlb serves, by id.
    @ivar queued: response bytes queued on all the streams.
    @ivar held: every stream's producer is paused for L{CONNECTION_FULL}.
    @ivar going_away: a drain asked it to end: new streams are refused.
    """

    def __init__(self, channel: ALPNChannel) -> None:
        self.channel = channel
        self.transport = transport = channel.transport
        self.clock = channel.clock
        self.streams: dict[int, H2Stream] = {}
        self.queued = 0
        self.held = False
        self.going_away = False
        self._socket_full = False
        self._unread = 0
        self._reading = False
        self._flush_call: Any = None
        # Streams holding back a write until the end of the turn.
        self._lasts: list[H2Stream] = []
        # Streams beyond the first holding a place under --max-connections.
        self._extra_streams = 0
        self._floods = [0, 0, 0]
        self._flood_start = 0.0
        conn = self.conn = H2Connection(config=_CONFIG)
        conn.local_settings = _LocalSettings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            },
        )
        conn.encoder = FieldEncoder()  # type: ignore[assignment]  # what h2 uses of one
        conn.initiate_connection()
        transport.registerProducer(self, True)
        # Responses of many streams go out as they come, often a small
        # frame at a time: Nagle's algorithm would hold each behind the
        # client's delayed ACK (40 ms) while others are in flight.
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass  # not TCP (a UNIX socket), or already gone
        self._flush()

    # -- bytes in ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        conn = self.conn
        if conn.state_machine.state is ConnectionState.CLOSED:
            return  # after GOAWAY: h2 would keep every byte in its frame buffer
        self._reading = True
        try:
            try:
                events = conn.receive_data(data)
            except H2Error:
                # A protocol error: h2 queued its GOAWAY (close sends it).
                self.close(ErrorCodes.PROTOCOL_ERROR)
                return
            streams = self.streams
            event: Any
            for event in events:
                kind = event.__class__
                if kind is RequestReceived:
                    self._request(event)
                elif kind is DataReceived:
                    stream = streams.get(event.stream_id)
                    if stream is None:
                        # A stream rrlb refused or already finished.
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    else:
                        stream.data_received(event.data, event.flow_controlled_length)
                elif kind is StreamEnded:
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        stream.request_complete()
                elif kind is WindowUpdated:
                    self._window_opened(event.stream_id)
                elif kind is StreamReset:
                    self._reset_by_client(event.stream_id)
                elif kind is PingReceived:
                    self._flood(_PINGS)
                elif kind is RemoteSettingsChanged:
                    self._flood(_SETTINGS)
                    if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                        self._window_opened(0)
                elif kind is ConnectionTerminated:
                    # The client's GOAWAY: it takes nothing more.
                    self.close()
                if conn.state_machine.state is ConnectionState.CLOSED:
                    self.close()
                    return
        finally:
            self._reading = False
        self._flush()

    def _flood(self, kind: int) -> None:
        """
        Count one frame of a C{kind} a flood is made of; past its limit
        within L{FLOOD_WINDOW}, the connection ends.
        """
        now = self.clock.seconds()
        floods = self._floods
        if now - self._flood_start > FLOOD_WINDOW:
            self._flood_start = now
            floods[0] = floods[1] = floods[2] = 0
        floods[kind] += 1
        if floods[kind] > _FLOOD_LIMITS[kind]:
            self.close(ErrorCodes.ENHANCE_YOUR_CALM)

    def _request(self, event: Any) -> None:
        stream_id = event.stream_id
        channel = self.channel
        streams = self.streams
        if self.going_away or len(streams) >= MAX_STREAMS:
            # Draining (the GOAWAY told the client no new stream is served),
            # or too many open: refused, the client may send it again. Past
            # the limit it was told, it counts as a reset.
            self._refuse(stream_id)
            if not self.going_away:
                self._flood(_RESETS)
            return
        if streams:
            # This stream may hold a node connection beside the others': it
            # takes a place under --max-connections, or waits for the
            # client to retry it.
            if not channel.site.stream_opened():
                self._refuse(stream_id)
                return
            self._extra_streams += 1
        channel.deadline = None  # the streams' own timeouts run now
        stream = H2Stream(self, stream_id)
        if self.held:
            stream.paused_for |= CONNECTION_FULL
        streams[stream_id] = stream
        stream.start(event.headers, event.stream_ended is None)

    def _refuse(self, stream_id: int) -> None:
        """
        Refuse a new stream with REFUSED_STREAM: nothing of it was processed,
        so the client may send it again (RFC 9113 8.7).
        """
        self.conn.reset_stream(stream_id, error_code=ErrorCodes.REFUSED_STREAM)
        self._want_flush()

    def _reset_by_client(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        self._forget(stream)
        stream.lost(Failure(ConnectionLost("the client reset the stream")))
        self._flood(_RESETS)

    # -- bytes out -------------------------------------------------------------

    def _want_flush(self) -> None:
        if not self._reading and self._flush_call is None:
            # Once per turn of the reactor: what several streams sent meanwhile
            # goes out in one write (one TLS record).
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        lasts = self._lasts
        if lasts:
            self._lasts = []
            for stream in lasts:
                stream.send_last()
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)
            if self._socket_full:
                # What rrlb writes while the client does not read is bounded
                # (its DATA waits in the streams' queues): past MAX_UNREAD of
                # frames it answered with (RST_STREAM for frames on closed
                # streams, say) the client is cut off.
                unread = self._unread = self._unread + len(data)
                if unread > MAX_UNREAD:
                    self.channel._state = _CLOSED
                    self.transport.abortConnection()

    def send_headers(self, stream: H2Stream, fields: list[Any], end: bool) -> None:
        try:
            self.conn.send_headers(stream.stream_id, fields, end_stream=end)
        except H2Error:
            return  # the stream or the connection is closed meanwhile
        self._want_flush()

    def end_stream(self, stream: H2Stream) -> None:
        try:
            self.conn.end_stream(stream.stream_id)
        except H2Error:
            return
        self._want_flush()

    def acknowledge(self, stream: H2Stream, size: int) -> None:
        try:
            self.conn.acknowledge_received_data(size, stream.stream_id)
        except H2Error:
            return
        self._want_flush()

    def stream_done(self, stream: H2Stream) -> None:
        """
        C{stream}'s response ended: the stream is no longer rrlb's. If the
        client is still sending its body, the stream is reset with NO_ERROR
        (RFC 9113 8.1), so that it does not stay open at C{h2}.
        """
        stream.closed = True
        if self.streams.get(stream.stream_id) is stream:
            if stream.remote_open:
                try:
                    self.conn.reset_stream(stream.stream_id, ErrorCodes.NO_ERROR)
                except H2Error:
                    pass
            self._forget(stream)

    def reset(self, stream: H2Stream) -> None:
        """
        Cut C{stream}'s response short.
        """
        try:
            self.conn.reset_stream(stream.stream_id, ErrorCodes.INTERNAL_ERROR)
        except H2Error:
            pass
        self._want_flush()
        if self.streams.get(stream.stream_id) is stream:
            self._forget(stream)
        stream.lost(Failure(ConnectionLost("the stream was reset")))

    def _forget(self, stream: H2Stream) -> None:
        del self.streams[stream.stream_id]
        if stream.queued:
            self.queued -= stream.queued
            stream.queued = 0
            if self.held:
                self.release_nodes()
        # Keep one place for each open stream beyond the first.
        streams = self.streams
        site = self.channel.site
        while self._extra_streams > max(0, len(streams) - 1):
            self._extra_streams -= 1
            site.stream_closed()
        if not streams:
            channel = self.channel
            if self.going_away:
                self.close()
            elif channel._state != _CLOSED:
                channel.deadline = self.clock.seconds() + site.limits.keepalive_timeout

    # -- the end -----------------------------------------------------------------

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

    def close(self, error: int = ErrorCodes.NO_ERROR) -> None:
        """
        Say GOAWAY and close the connection. TLS closes for good only once
        the client answers close_notify: one that does not is cut off after
        the site's close_timeout, as an HTTP/1.1 connection is.
        """
        channel = self.channel
        if channel._state == _CLOSED and self.conn.state_machine.state is ConnectionState.CLOSED:
            return
        channel._state = _CLOSED
        channel.deadline = self.clock.seconds() + channel.site.close_timeout
        if self.conn.state_machine.state is not ConnectionState.CLOSED:
            # Else h2 queued its own GOAWAY (a protocol error), or the
            # client sent one.
            try:
                self.conn.close_connection(error_code=error)
            except H2Error:
                pass
        self._flush()
        transport = self.transport
        # TLS closes only once no producer is registered on it.
        transport.unregisterProducer()
        transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        streams = list(self.streams.values())
        self.streams.clear()
        site = self.channel.site
        while self._extra_streams:
            self._extra_streams -= 1
            site.stream_closed()
        for stream in streams:
            stream.lost(reason)


class ALPNChannel(ProxyChannel):
    """
    A client connection on a site with HTTP/2 on: HTTP/1.1 as
    L{ProxyChannel} serves it, unless the TLS handshake chose C{h2} or a
    cleartext connection opens with the HTTP/2 preface.

    The choice is made on the first bytes from the client (the handshake is
    over by then); from then on reads go straight to the chosen protocol.
    """

    h2: Optional[H2ServerConnection] = None
    # The first bytes of a cleartext connection while they may still be the
    # start of the HTTP/2 preface.
    _preface = b""

    # Where reads go once the first one chose: the HTTP/2 connection's or
    # ProxyChannel's dataReceived.
    reader: Optional[Callable[[bytes], None]] = None

    def dataReceived(self, data: bytes) -> None:
        reader = self.reader
        if reader is None:
            if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
                reader = self._start_h2().dataReceived
            elif self.forwarded[0] == b"http" and (self._preface or data[:1] == b"P"):
                # h2c with prior knowledge (RFC 9113 3.3): on a cleartext
                # listener, a client that opens with the HTTP/2 preface.
                data = self._preface + data
                if len(data) < len(PREFACE) and PREFACE.startswith(data):
                    self._preface = data  # the rest of it is still coming
                    return
                self._preface = b""
                if data.startswith(PREFACE):
                    reader = self._start_h2().dataReceived
                else:
                    reader = super().dataReceived
            else:
                reader = super().dataReceived
            self.reader = reader
        reader(data)

    def _start_h2(self) -> H2ServerConnection:
        # The HTTP/1.1 channel registered itself as the transport's producer;
        # the HTTP/2 connection takes its place.
        self.transport.unregisterProducer()
        h2 = self.h2 = H2ServerConnection(self)
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
