# -*- test-case-name: tests.test_h2upstream,tests.test_grpc -*-
"""
One request on an HTTP/2 connection to a node (L{NodeStream}): its state,
its request body going out as the node's windows allow, and the fields of
its response read into what an exchange takes. L{rrlb.h2nodeconn} holds the
connection that carries these streams and feeds them its events.

A stream fails with L{Unprocessed} (safe to send again, whatever the
method), L{StreamFailed}, or L{NotHTTP2}.
"""

from __future__ import annotations

from typing import Any

from h2.exceptions import H2Error

from rrlb._twisted import HeaderNameError, canonical_name, name_cache
from rrlb.http1 import H2_CONNECTION_SPECIFIC

# What a node may send on one stream ahead of the client reading it (bytes
# rrlb holds per stream are bounded by it).
STREAM_WINDOW = 1 << 20
# Body bytes held for a stream whose window is closed before its client is
# paused.
BODY_HIGH_WATER = 65536


class Unprocessed(Exception):
    """
    The node did not process the stream: it refused it (C{REFUSED_STREAM})
    or its GOAWAY said it never will. Safe to send again, whatever the method.
    """


class StreamFailed(Exception):
    """
    The node reset the stream, or the connection carrying it failed.
    """


class NotHTTP2(Exception):
    """
    The node broke HTTP/2 (a protocol error), or did not agree to it.
    """


class NodeStream:
    """
    One request to a node on an L{H2NodeConnection}: the upstream its
    exchange holds, and the consumer of its request body (L{rrlb.body}).
    """

    __slots__ = (
        "conn",
        "stream_id",
        "exchange",
        "head_request",
        "got_response",
        "paused",
        "unacked",
        "pending",
        "pending_size",
        "end_pending",
        "local_closed",
        "body",
        "producer",
        "producer_paused",
        "trailers",
    )

    def __init__(self, conn: Any, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.exchange: Any = None
        self.head_request = False
        self.got_response = False
        self.paused = False
        self.unacked = 0
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.end_pending = False
        self.local_closed = False
        self.body: Any = None
        self.producer: Any = None
        self.producer_paused = False

    @property
    def transport(self) -> Any:
        return self.conn.transport

    def send(
        self,
        exchange: Any,
        headers: list[tuple[bytes, bytes]],
        body: Any = None,
        head_request: bool = False,
    ) -> None:
        """
        Send the request: C{headers} (pseudo-headers first), then C{body}:
        L{None}, C{bytes}, or an L{rrlb.body.StreamedBody} still coming.
        """
        self.exchange = exchange
        self.head_request = head_request
        conn = self.conn
        try:
            conn.conn.send_headers(self.stream_id, headers, end_stream=body is None)
        except H2Error as e:
            conn.fail_stream(self, Unprocessed(f"cannot open a stream: {e}"))
            return
        if body is None:
            self.local_closed = True
        elif isinstance(body, bytes):
            if body:
                self.pending.append(body)
                self.pending_size = len(body)
            self.end_pending = True
            self.send_pending()
        else:
            self.body = body
            body.attach(self)
        conn.flush()

    # -- the request body's consumer (rrlb.body) --------------------------------

    def body_data(self, data: bytes) -> None:
        if not data or self.local_closed:
            return
        exchange = self.exchange
        if exchange is not None:
            exchange.active = True
        self.pending.append(data)
        self.pending_size += len(data)
        self.send_pending()
        self.conn.flush()

    def body_end(self) -> None:
        self.body = None
        self.end_pending = True
        self.send_pending()
        self.conn.flush()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        self.producer_paused = False
        self.check_producer()

    def unregisterProducer(self) -> None:
        self.producer = None

    def check_producer(self) -> None:
        """
        Pause the body's client while more than L{BODY_HIGH_WATER} bytes
        wait for the node's window, and resume it once they went out.
        """
        producer = self.producer
        if producer is None:
            return
        if self.pending_size > BODY_HIGH_WATER:
            if not self.producer_paused:
                self.producer_paused = True
                producer.pauseProducing()
        elif self.producer_paused:
            self.producer_paused = False
            producer.resumeProducing()

    def stop_body(self) -> None:
        """
        Take no more of the request body.
        """
        body = self.body
        self.body = None
        self.producer = None
        self.pending = []
        self.pending_size = 0
        if body is not None:
            body.detach(self)

    # -- what the exchange calls -------------------------------------------------

    def pause_reading(self) -> None:
        """
        The client is slow: stop reopening this stream's window.
        """
        self.paused = True

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            if self.unacked:
                self.conn.ack(self)

    def abort(self) -> None:
        """
        The exchange gave up on the request: reset the stream.
        """
        self.exchange = None
        self.conn.cancel(self)

    def send_pending(self) -> None:
        """
        Send what the windows allow of the pending body, then its end.
        """
        if self.conn.write_paused or self.local_closed:
            return
        conn = self.conn.conn
        stream_id = self.stream_id
        pending = self.pending
        frame_size = conn.max_outbound_frame_size
        try:
            while pending:
                window = min(conn.local_flow_control_window(stream_id), frame_size)
                if window <= 0:
                    break
                data = pending[0]
                if len(data) <= window:
                    pending.pop(0)
                else:
                    pending[0] = data[window:]
                    data = data[:window]
                self.pending_size -= len(data)
                conn.send_data(stream_id, data)
            if not pending and self.end_pending:
                self.local_closed = True
                conn.end_stream(stream_id)
        except H2Error:
            # The stream closed under it (the node reset it): its reset event
            # tells the exchange.
            self.pending = []
            self.pending_size = 0
            return
        self.check_producer()


def response_fields(headers: Any) -> tuple[int, dict[bytes, list[bytes]]]:
    """
    A node's response head as HTTP/2 fields -> its status (0 when missing
    or bad) and its headers by canonical name, without the pseudo-fields and
    the connection-specific ones.
    """
    code = 0
    out: dict[bytes, list[bytes]] = {}
    names = name_cache()
    try:
        for name, value in headers:
            if name[:1] == b":":
                if name == b":status" and len(value) == 3 and value.isdigit():
                    code = int(value)
                continue
            if name in H2_CONNECTION_SPECIFIC:
                continue
            key = names.get(name)
            if key is None:
                key = canonical_name(name)
            values = out.get(key)
            if values is None:
                out[key] = [value]
            else:
                values.append(value)
    except HeaderNameError:
        code = 0
    return code, out


def trailer_fields(headers: Any) -> list[tuple[bytes, bytes]]:
    """
    A node's trailers without pseudo-fields and connection-specific ones.
    """
    return [
        (name, value)
        for name, value in headers
        if name[:1] != b":" and name not in H2_CONNECTION_SPECIFIC
    ]
