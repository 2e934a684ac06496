# -*- test-case-name: tests.test_http2_bounds -*-
"""
What an HTTP/2 connection holds for its client: bounded, whatever windows
the client advertises (docs/security.md, "Bounded buffering").

HTTP/2 flow control bounds what a client I{allows} rrlb to send, not what
its socket takes: a client that advertises 2^31-1 windows and stops
reading must not make rrlb read whole responses from the nodes into
memory. A stream's response DATA goes to the connection at once while the
client's window and socket take it, and waits in the stream's queue
otherwise. A stream's producer (its node connection) is paused for any of
these reasons, each lifted on its own (it runs when none is left):

 - L{WINDOW}: the client's window for the stream is used up;
 - L{STREAM_FULL}: more than L{STREAM_BUFFER} is queued on the stream;
 - L{CONNECTION_FULL}: more than L{CONNECTION_BUFFER} is queued on all the
   connection's streams together, or the client's socket does not drain
   (the transport's pause reaches each stream's producer, as it reaches the
   request's producer over HTTP/1.1).

Resuming waits until half of a threshold went out, so a fast client does
not pause and resume its nodes on every frame.

L{Paused} is the stream's side (L{rrlb.h2stream.H2Stream}), L{Sender} the
connection's (L{rrlb.http2.H2ServerConnection}): what goes out at once,
what waits, and the pauses.
"""

from __future__ import annotations

from typing import Any

from h2.exceptions import H2Error

# Response bytes queued for the client on one stream past which its node
# connection is paused. One read from the node (nodeconn.READ_SIZE) may come
# on top, so a stream holds less than 400 KiB.
STREAM_BUFFER = 128 * 1024
# The same for all the streams of a connection together: past it, every
# stream's node connection is paused.
CONNECTION_BUFFER = 1024 * 1024

# Why a stream's producer is paused (flags).
WINDOW = 1  # the client's flow-control window for the stream is used up
STREAM_FULL = 2  # more than STREAM_BUFFER queued on the stream
CONNECTION_FULL = 4  # more than CONNECTION_BUFFER queued, or the socket does not drain


class Paused:
    """
    A response producer paused for any of several reasons.

    @ivar producer: the producer (the exchange, which passes the pause on
        to the node's connection), or L{None}.
    @ivar paused_for: the reasons (L{WINDOW}, L{STREAM_FULL},
        L{CONNECTION_FULL}) it is paused for now.
    """

    producer: Any = None
    paused_for = 0

    def pause_node(self, why: int) -> None:
        """
        Pause the producer for reason C{why}, if it is not paused already
        for another.
        """
        paused = self.paused_for
        self.paused_for = paused | why
        if not paused and self.producer is not None:
            self.producer.pauseProducing()

    def resume_node(self, why: int) -> None:
        """
        Lift reason C{why}; the producer resumes once no reason is left.
        """
        paused = self.paused_for
        if paused & why:
            self.paused_for = paused = paused & ~why
            if not paused and self.producer is not None:
                self.producer.resumeProducing()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        if self.paused_for:
            # Say, the client's socket is already full.
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self.producer = None


class Sender:
    """
    The sending half of an HTTP/2 server connection: DATA to C{h2} while
    the client's window and socket take it, the rest queued on its stream,
    and every stream's producer paused while the connection holds too much
    or the client's socket does not drain.

    @ivar conn: the C{h2} connection.
    @ivar streams: the open streams, by id.
    @ivar queued: response bytes queued on all the streams.
    @ivar held: every stream's producer is paused for L{CONNECTION_FULL}; a
        stream that starts meanwhile starts paused.
    """

    conn: Any
    streams: dict[int, Any]
    queued = 0
    held = False
    _socket_full = False
    _unread = 0
    _lasts: list[Any]

    def _want_flush(self) -> None:
        raise NotImplementedError

    def send_data(self, stream: Any, data: bytes, end: bool = False) -> bool:
        """
        Send what the client's window and socket take of C{data} now (with
        END_STREAM after it if C{end}), and queue the rest on C{stream}.
        Returns whether the end went out.
        """
        if self._socket_full:
            stream.enqueue(data)
            return False
        conn = self.conn
        stream_id = stream.stream_id
        size = len(data)
        pos = 0
        try:
            window = conn.local_flow_control_window(stream_id)
            frame = conn.max_outbound_frame_size
            if size <= window and size <= frame:
                conn.send_data(stream_id, data, end_stream=end)
                pos = size
            else:
                while window > 0 and pos < size:
                    n = min(window, frame, size - pos)
                    pos += n
                    window -= n
                    conn.send_data(stream_id, data[pos - n : pos], end_stream=end and pos == size)
                if pos < size:
                    stream.enqueue(data[pos:] if pos else data)
        except H2Error:
            return end  # the stream or the connection is closed meanwhile
        self._want_flush()
        return end and pos == size

    def hold_last(self, stream: Any) -> None:
        """
        C{stream} holds back a write until the end of this turn.
        """
        self._lasts.append(stream)
        self._want_flush()

    def _window_opened(self, stream_id: int) -> None:
        """
        The client's window grew (for the connection, if C{stream_id} is
        0): send what the streams queued.
        """
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None and stream.queue:
                self._send_queue(stream)
        else:
            for stream in list(self.streams.values()):
                if stream.queue:
                    self._send_queue(stream)

    def _send_queue(self, stream: Any) -> None:
        """
        Send what the client's window takes of C{stream}'s queue; its end
        follows once the queue is out.
        """
        if self._socket_full or stream.closed:
            return
        conn = self.conn
        stream_id = stream.stream_id
        queue = stream.queue
        sent = 0
        try:
            window = conn.local_flow_control_window(stream_id)
            frame = conn.max_outbound_frame_size
            while queue and window > 0:
                data = queue[0]
                n = min(window, frame, len(data))
                if n < len(data):
                    queue[0] = data[n:]
                    data = data[:n]
                else:
                    queue.popleft()
                conn.send_data(stream_id, data)
                window -= n
                sent += n
        except H2Error:
            return
        if sent:
            self.queued -= sent
            stream.dequeued(sent)
            if self.held:
                self.release_nodes()
            self._want_flush()
        if not queue and stream.ending:
            stream.end()

    def queued_more(self, size: int) -> None:
        """
        A stream queued C{size} more bytes.
        """
        queued = self.queued = self.queued + size
        if queued > CONNECTION_BUFFER and not self.held:
            self.hold_nodes()

    # -- the client's socket (IPushProducer) -------------------------------------

    def pauseProducing(self) -> None:
        self._socket_full = True
        if not self.held:
            self.hold_nodes()

    def resumeProducing(self) -> None:
        self._socket_full = False
        self._unread = 0
        for stream in list(self.streams.values()):
            if stream.queue:
                self._send_queue(stream)
        if self.held:
            self.release_nodes()

    def stopProducing(self) -> None:
        pass

    def hold_nodes(self) -> None:
        """
        Pause every stream's producer.
        """
        self.held = True
        for stream in list(self.streams.values()):
            stream.pause_node(CONNECTION_FULL)

    def release_nodes(self) -> None:
        """
        Resume them, unless the socket is still full or more than half of
        L{CONNECTION_BUFFER} is still queued.
        """
        if self._socket_full or self.queued > CONNECTION_BUFFER // 2:
            return
        self.held = False
        for stream in list(self.streams.values()):
            stream.resume_node(CONNECTION_FULL)

