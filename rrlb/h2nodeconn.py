# -*- test-case-name: tests.test_h2upstream,tests.test_grpc -*-
"""
One HTTP/2 connection to a node (L{H2NodeConnection}), carrying the
requests on it (L{rrlb.h2nodestream.NodeStream}): the HTTP/2 side of rrlb's
client to nodes, as L{rrlb.nodeconn} is its HTTP/1.1 side.
L{rrlb.h2upstream.H2UpstreamPool} makes, shares and closes these
connections.

A stream is its exchange's upstream, with the callbacks an
L{rrlb.nodeconn.UpstreamProtocol} makes (C{response_head},
C{response_body}, C{response_done}, C{upstream_lost}, C{connect_failed}),
plus C{response_trailers(headers)}.

 - A node's GOAWAY lets the streams it processes finish, and takes the
   connection out of use; the streams it did not process (numbered above
   its last stream ID, or refused with C{REFUSED_STREAM}) fail with
   L{Unprocessed}, which the exchange retries whatever the method (RFC 9113
   8.7).
 - Flow control both ways, per stream: the request body goes out as the
   node's windows allow, and a body the windows hold back pauses its client
   (L{rrlb.body}); the response's stream window is reopened only as the
   client takes the bytes, so a slow client pauses its own stream, not the
   connection (the connection's window is reopened as bytes arrive). What
   rrlb holds per stream is bounded by L{STREAM_WINDOW}.
 - Anything a node sends that is not HTTP/2 (garbage, oversized frames or
   header blocks, CONTINUATION floods, window overflows, PING floods) ends
   its connection and fails its streams, never the daemon.
"""

from __future__ import annotations

from typing import Any, Optional

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    PingReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    SettingsAcknowledged,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rrlb.h2fields import FieldEncoder
from rrlb.h2nodestream import (
    STREAM_WINDOW,
    NodeStream,
    NotHTTP2,
    StreamFailed,
    Unprocessed,
    response_fields,
    trailer_fields,
)

log = Logger()

# What a node may send on the whole connection ahead of the clients reading
# it (rrlb.h2nodestream.STREAM_WINDOW bounds each stream).
CONNECTION_WINDOW = 1 << 24
# Streams assumed open at once before the node's SETTINGS say.
DEFAULT_STREAMS = 100
# A response head (and trailers) at most, decoded (SETTINGS_MAX_HEADER_LIST_SIZE).
MAX_HEADER_LIST = 65536
# PING and SETTINGS frames a node may send in FLOOD_PERIOD seconds: each
# costs rrlb an answer written to it, read or not.
MAX_CONTROL_FRAMES = 1000
FLOOD_PERIOD = 10.0


class _Flood(Exception):
    """
    The node sent more control frames than rrlb answers.
    """


class _NodeH2Connection(H2Connection):
    """
    h2's client connection, but a GOAWAY does not close it: h2 would refuse
    every frame after one (and drop what it had to send), while the node
    still answers the streams up to the last one it names (RFC 9113 6.8).
    rrlb opens no new stream on it (L{H2NodeConnection.going_away}).
    """

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        event = ConnectionTerminated()
        try:
            event.error_code = ErrorCodes(frame.error_code)
        except ValueError:
            event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


@implementer(IPushProducer)
class H2NodeConnection(Protocol):
    """
    One HTTP/2 connection to a node, carrying many streams.

    @ivar pool: its L{rrlb.h2upstream.H2UpstreamPool} (C{reactor}, C{idle},
        C{forget}, C{broken}, C{connection_lost}, C{acquire_again}).
    @ivar waiting: exchanges (or probes) waiting for the connection to open.
    @ivar going_away: no new stream goes on it (its GOAWAY came, or the node
        left the configuration); it closes when its last stream ends.
    """

    transport: Any

    def __init__(self, pool: Any, key: str, tls: bool = False) -> None:
        self.pool = pool
        self.key = key
        self.tls = tls
        self.conn = _NodeH2Connection(
            H2Configuration(
                client_side=True,
                header_encoding=None,
                # What rrlb sends was checked already (rrlb.parser for the
                # client's fields, lower-cased by the exchange): h2 would
                # check and copy every field again. What the node sends is
                # checked (CR, LF, NUL, pseudo-fields, connection fields).
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                normalize_inbound_headers=False,
            )
        )
        # rrlb's own HPACK encoder (rrlb.h2fields), as on client connections:
        # hpack's cost more than the rest of a request's head.
        self.conn.encoder = FieldEncoder()  # type: ignore[assignment]
        self.streams: dict[int, NodeStream] = {}
        self.waiting: list[Any] = []
        self.open = False
        self.closed = False
        self.going_away = False
        self.max_streams = DEFAULT_STREAMS
        self.write_paused = False
        self.conn_unacked = 0
        self.checked_alpn = not tls
        self.idle_call: Any = None
        self.connector: Any = None
        # A handshake waiter (the tcp health check on an h2 pool).
        self.settled: Optional[defer.Deferred[None]] = None
        self._got_settings = False
        self._got_ack = False
        self._control_frames = 0
        self._control_since = 0.0

    # -- capacity --------------------------------------------------------------

    def has_room(self) -> bool:
        if self.closed or self.going_away:
            return False
        return len(self.streams) + len(self.waiting) < self.max_streams

    def take(self, exchange: Any) -> None:
        """
        Give C{exchange} a stream now, or when the connection is open.
        """
        if self.open:
            self._give(exchange, True)
        else:
            self.waiting.append(exchange)

    def _give(self, exchange: Any, reused: bool) -> None:
        idle_call, self.idle_call = self.idle_call, None
        if idle_call is not None and idle_call.active():
            idle_call.cancel()
        stream = NodeStream(self, self.conn.get_next_available_stream_id())
        self.streams[stream.stream_id] = stream
        exchange.connected(stream, reused)

    # -- the connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        conn = self.conn
        # Made whole, not updated: h2 sends a Settings' acknowledged values,
        # and updates count only once the node acknowledges them.
        conn.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            },
        )
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        # Frames go out as they are made (a request's HEADERS, its DATA,
        # window updates): Nagle's algorithm would hold each small write
        # back for the node's delayed ACK, 40 ms a round.
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        self.transport.registerProducer(self, True)
        self.flush()

    def _opened(self) -> None:
        """
        The node's first SETTINGS came (its stream limit among them): the
        requests that waited get their streams, as many as it allows; the
        others go back to the pool for another connection.
        """
        self.open = True
        waiting, self.waiting = self.waiting, []
        for exchange in waiting:
            if self.closed:
                exchange.connect_failed(Failure(StreamFailed("the connection closed")))
            elif len(self.streams) < self.max_streams:
                self._give(exchange, False)
            else:
                self.pool.acquire_again(self.key, exchange)

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.checked_alpn:
            self.checked_alpn = True
            chosen = getattr(self.transport, "negotiatedProtocol", None)
            if chosen != b"h2":
                self._broken(f"the node did not agree to h2 by ALPN ({chosen!r})")
                return
        try:
            events = self.conn.receive_data(data)
        except Exception as e:
            # Garbage, a header block too large, a CONTINUATION flood, a
            # window overflow: whatever it is, it ends this connection only.
            self._broken(f"HTTP/2 protocol error: {type(e).__name__}: {e}"[:300])
            return
        try:
            for event in events:
                self._event(event)
        except _Flood:
            self._broken("a flood of PING or SETTINGS frames")
            return
        except Exception:
            log.failure("handling HTTP/2 events from node {node}", node=self.key)
            self._broken("internal error")
            return
        # h2 checks a frame's length only once the whole frame is in: a node
        # announcing a 16 MiB frame would have it buffered. Its header says.
        pending = getattr(self.conn.incoming_buffer, "_data", b"")
        if len(pending) >= 9 and (
            int.from_bytes(pending[:3], "big") > self.conn.max_inbound_frame_size
        ):
            self._broken("a frame larger than SETTINGS_MAX_FRAME_SIZE")
            return
        self.flush()

    def _event(self, event: Any) -> None:
        kind = type(event)
        if kind is DataReceived:
            self._data(event)
        elif kind is ResponseReceived:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self._response(stream, event.headers, event.stream_ended is not None)
        elif kind is TrailersReceived:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self._trailers(stream, event.headers)
        elif kind is StreamEnded:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self._ended(stream)
        elif kind is StreamReset:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                if event.error_code == ErrorCodes.REFUSED_STREAM and not stream.got_response:
                    why: Exception = Unprocessed("the node refused the stream")
                else:
                    why = StreamFailed(f"the node reset the stream ({_code_name(event)})")
                self.fail_stream(stream, why, reset=False)
        elif kind is WindowUpdated:
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None and stream.pending:
                    stream.send_pending()
            else:
                self._send_all()
        elif kind is PingReceived:
            self._control()
        elif kind is RemoteSettingsChanged:
            self._control()
            changed = event.changed_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS)
            if changed is not None:
                self.max_streams = max(1, min(changed.new_value, 1000))
            if not self._got_settings:
                self._got_settings = True
                self._check_settled()
                self._opened()
        elif kind is SettingsAcknowledged:
            self._got_ack = True
            self._check_settled()
        elif kind is ConnectionTerminated:
            self._goaway(event)
        elif kind is InformationalResponseReceived:
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.exchange is not None:
                for name, value in event.headers:
                    if name == b":status" and value == b"100":
                        interim = getattr(stream.exchange, "interim_continue", None)
                        if interim is not None:
                            interim()

    def _control(self) -> None:
        """
        Count a PING or SETTINGS from the node: past L{MAX_CONTROL_FRAMES}
        in L{FLOOD_PERIOD}, it is flooding rrlb with answers to write.
        """
        now = self.pool.reactor.seconds()
        if now - self._control_since > FLOOD_PERIOD:
            self._control_since = now
            self._control_frames = 0
        self._control_frames += 1
        if self._control_frames > MAX_CONTROL_FRAMES:
            raise _Flood()

    def _check_settled(self) -> None:
        settled = self.settled
        if settled is not None and self._got_settings and self._got_ack:
            self.settled = None
            settled.callback(None)

    # -- responses ----------------------------------------------------------------

    def _response(self, stream: NodeStream, headers: Any, ended: bool) -> None:
        exchange = stream.exchange
        if exchange is None:
            return
        code, out = response_fields(headers)
        if not 200 <= code <= 599:
            self.fail_stream(stream, NotHTTP2("bad response head"), got_response=True)
            return
        stream.got_response = True
        exchange.active = True
        has_body = not (stream.head_request or code in (204, 304) or ended)
        exchange.response_head(code, b"", out, has_body)
        if ended and stream.exchange is exchange:
            self._ended(stream)

    def _data(self, event: Any) -> None:
        length = event.flow_controlled_length
        self.conn_unacked += length
        if self.conn_unacked >= CONNECTION_WINDOW // 2:
            self.conn.increment_flow_control_window(self.conn_unacked)
            self.conn_unacked = 0
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.exchange is None:
            return
        stream.unacked += length
        exchange = stream.exchange
        exchange.active = True
        if event.data and not stream.head_request:
            exchange.response_body(event.data)
        if not stream.paused and stream.unacked >= STREAM_WINDOW // 4:
            self.ack(stream)

    def ack(self, stream: NodeStream) -> None:
        """
        Reopen C{stream}'s window by what its client took.
        """
        unacked, stream.unacked = stream.unacked, 0
        if unacked and stream.stream_id in self.streams:
            try:
                self.conn.increment_flow_control_window(unacked, stream.stream_id)
            except H2Error:
                pass  # the stream closed meanwhile
            self.flush()

    def _trailers(self, stream: NodeStream, headers: Any) -> None:
        exchange = stream.exchange
        if exchange is None:
            return
        trailers = getattr(exchange, "response_trailers", None)
        if trailers is not None:
            trailers(trailer_fields(headers))

    def _ended(self, stream: NodeStream) -> None:
        """
        The node's response is complete.
        """
        exchange = stream.exchange
        stream.exchange = None
        self.streams.pop(stream.stream_id, None)
        if not stream.local_closed:
            # It answered before taking the whole body (RFC 9113 8.1: it may):
            # the rest is not wanted.
            stream.local_closed = True
            stream.stop_body()
            self._reset(stream.stream_id, ErrorCodes.NO_ERROR)
        self._stream_gone()
        if exchange is not None:
            exchange.response_done()

    # -- request bodies (each stream sends its own: NodeStream.send_pending) ---------

    def _send_all(self) -> None:
        for stream in list(self.streams.values()):
            if stream.pending or stream.end_pending:
                stream.send_pending()

    # IPushProducer, for the transport: while the node reads slowly, no body
    # bytes go out (they wait, and their clients are paused).
    def pauseProducing(self) -> None:
        self.write_paused = True

    def resumeProducing(self) -> None:
        self.write_paused = False
        self._send_all()
        self.flush()

    def stopProducing(self) -> None:
        self.write_paused = True

    # -- ends ---------------------------------------------------------------------------

    def _reset(self, stream_id: int, code: int) -> None:
        try:
            self.conn.reset_stream(stream_id, error_code=code)
        except H2Error:
            pass

    def cancel(self, stream: NodeStream) -> None:
        """
        Reset C{stream} (its client left, or it timed out).
        """
        stream.stop_body()
        if self.streams.pop(stream.stream_id, None) is not None:
            if not self.closed:
                self._reset(stream.stream_id, ErrorCodes.CANCEL)
                self.flush()
            self._stream_gone()

    def fail_stream(
        self,
        stream: NodeStream,
        why: Exception,
        reset: bool = True,
        got_response: Optional[bool] = None,
    ) -> None:
        exchange = stream.exchange
        stream.exchange = None
        stream.stop_body()
        if self.streams.pop(stream.stream_id, None) is not None:
            if reset and not self.closed:
                self._reset(stream.stream_id, ErrorCodes.CANCEL)
                self.flush()
            self._stream_gone()
        if exchange is not None:
            exchange.upstream_lost(
                Failure(why), stream.got_response if got_response is None else got_response
            )

    def _stream_gone(self) -> None:
        if self.streams or self.closed:
            return
        if self.going_away:
            self.close()
        else:
            self.pool.idle(self)

    def _goaway(self, event: Any) -> None:
        """
        The node's GOAWAY: its streams up to the last one it names finish,
        the others never will (they are sent again elsewhere).
        """
        self.going_away = True
        self.pool.forget(self)
        last = event.last_stream_id
        for stream_id in sorted(self.streams):
            if stream_id > last:
                self.fail_stream(
                    self.streams[stream_id],
                    Unprocessed("the node said GOAWAY before processing it"),
                    reset=False,
                )
        if event.error_code != ErrorCodes.NO_ERROR:
            why = f"the node said GOAWAY ({_code_name(event)})"
            for stream in list(self.streams.values()):
                self.fail_stream(stream, StreamFailed(why), reset=False)
        if not self.streams:
            self.close()

    def _broken(self, why: str) -> None:
        """
        The node broke HTTP/2: drop the connection and fail its streams.
        """
        self.pool.broken(self, why)
        try:
            self.conn.close_connection(error_code=ErrorCodes.PROTOCOL_ERROR)
            self.flush()
        except Exception:
            pass
        self._fail_all(NotHTTP2(why))
        self.closed = True
        self.transport.abortConnection()

    def _fail_all(self, why: Exception) -> None:
        for stream in list(self.streams.values()):
            self.fail_stream(stream, why, reset=False)
        waiting, self.waiting = self.waiting, []
        for exchange in waiting:
            exchange.connect_failed(Failure(why))
        settled, self.settled = self.settled, None
        if settled is not None:
            settled.errback(Failure(why))

    def close(self) -> None:
        """
        Say GOAWAY and close (no stream is open).
        """
        if self.closed:
            return
        self.closed = True
        try:
            self.conn.close_connection()
            self.transport.write(self.conn.data_to_send())
        except Exception:
            pass
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        call, self.idle_call = self.idle_call, None
        if call is not None and call.active():
            call.cancel()
        self.pool.connection_lost(self)
        why = StreamFailed(f"the connection to the node closed ({reason.getErrorMessage()})")
        for stream in list(self.streams.values()):
            self.fail_stream(stream, why, reset=False)
        self._fail_all(why)


def _code_name(event: Any) -> str:
    code = event.error_code
    return getattr(code, "name", str(code))
