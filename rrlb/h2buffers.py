# -*- test-case-name: tests.test_http2_bounds -*-
"""
What an HTTP/2 connection holds for its client: bounded, whatever windows
the client advertises (docs/security.md, "Bounded buffering").

HTTP/2 flow control bounds what a client I{allows} rrlb to send, not what
its socket takes. Twisted's L{H2Connection} stops its send loop when the
transport pauses it, but goes on queueing each stream's DATA up to the
client's window and never pauses the streams' producers: a client that
advertises 2^31-1 windows and stops reading made rrlb read whole responses
from the nodes into memory. The pieces here, mixed into L{rrlb.http2}'s
stream and connection:

 - L{SendQueue}: one stream's DATA waiting for the connection's send loop
   (Twisted's C{_outboundStreamQueues} holds one per stream), counting its
   bytes and the connection's.
 - L{BoundedStream}: why the stream's producer (its node connection) is
   paused: the client's window for the stream is used up, more than
   L{STREAM_BUFFER} is queued on it, or the connection is full. Each reason
   is lifted on its own; the producer runs when none is left.
 - L{BoundedConnection}: every stream's producer is paused while more than
   L{CONNECTION_BUFFER} is queued on the connection, and while the client's
   socket does not drain (the transport's pause reaches each stream's
   producer, as it reaches the request's producer over HTTP/1.1).

Resuming waits until half of a threshold went out, so a fast client does
not pause and resume its nodes on every frame.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rrlb._twisted import H2Connection, H2Stream
else:
    # Mixins: rrlb.http2 puts Twisted's classes after them. This module
    # imports nothing of HTTP/2 itself.
    H2Connection = H2Stream = object

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


class SendQueue(deque[Any]):
    """
    One stream's DATA waiting for the connection's send loop, and its size.
    Twisted's loop appends, pops from the left and puts back what did not
    fit in a frame; the end-of-stream marker it queues is not bytes and
    counts nothing.
    """

    __slots__ = ("size", "stream", "connection")

    def __init__(self, stream: BoundedStream, connection: BoundedConnection) -> None:
        deque.__init__(self)
        self.size = 0
        self.stream = stream
        self.connection = connection

    def append(self, data: Any) -> None:
        deque.append(self, data)
        if data.__class__ is bytes:
            self._grew(len(data))

    def appendleft(self, data: Any) -> None:
        deque.appendleft(self, data)
        if data.__class__ is bytes:
            self._grew(len(data))

    def popleft(self) -> Any:
        data = deque.popleft(self)
        if data.__class__ is bytes:
            size = self.size = self.size - len(data)
            connection = self.connection
            connection.queued -= len(data)
            stream = self.stream
            if stream.paused_for & STREAM_FULL and size <= STREAM_BUFFER // 2:
                stream.resume_node(STREAM_FULL)
            if connection.held:
                connection.release_nodes()
        return data

    def _grew(self, n: int) -> None:
        size = self.size = self.size + n
        connection = self.connection
        connection.queued += n
        if size > STREAM_BUFFER:
            self.stream.pause_node(STREAM_FULL)
        if connection.queued > CONNECTION_BUFFER and not connection.held:
            connection.hold_nodes()


class BoundedStream(H2Stream):
    """
    An L{H2Stream} whose producer is paused for any of several reasons.

    @ivar paused_for: the reasons (L{WINDOW}, L{STREAM_FULL},
        L{CONNECTION_FULL}) its producer is paused for now.
    """

    paused_for = 0

    def pause_node(self, why: int) -> None:
        """
        Pause the response's producer for reason C{why}, if it is not
        paused already for another.
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
        super().registerProducer(producer, streaming)
        registered = self.producer
        if self.paused_for and registered is not None:
            # Say, the client's socket is already full.
            registered.pauseProducing()

    def flowControlBlocked(self) -> None:
        self.pause_node(WINDOW)

    def windowUpdated(self) -> None:
        if self.paused_for & WINDOW and self._conn.remainingOutboundWindow(self.streamID) > 0:
            self.resume_node(WINDOW)


class BoundedConnection(H2Connection):
    """
    An L{H2Connection} that pauses every stream's producer while it holds
    too much for its client or the client's socket does not drain.

    @ivar queued: response bytes queued for the client on all its streams.
    @ivar held: every stream's producer is paused for L{CONNECTION_FULL}; a
        stream that starts meanwhile starts paused.
    """

    queued = 0
    held = False
    _socket_full = False

    def send_queue(self, stream: BoundedStream) -> SendQueue:
        """
        A new stream's queue (for C{_outboundStreamQueues}); the stream
        starts paused if the connection is held.
        """
        if self.held:
            stream.paused_for |= CONNECTION_FULL
        return SendQueue(stream, self)

    def queue_dropped(self, queue: SendQueue) -> None:
        """
        A stream ended (or was reset) with C{queue} still holding bytes.
        """
        if queue.size:
            self.queued -= queue.size
            if self.held:
                self.release_nodes()

    def pauseProducing(self) -> None:
        # Besides the send loop (Twisted's pause stops it), every stream's
        # node; Twisted's own pause must not run twice, or the loop's
        # resumption is lost.
        if self._consumerBlocked is None:
            super().pauseProducing()
        self._socket_full = True
        if not self.held:
            self.hold_nodes()

    def resumeProducing(self) -> None:
        self._socket_full = False
        # This runs the send loop, which may pause again at once.
        super().resumeProducing()
        if self.held:
            self.release_nodes()

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

    def remainingOutboundWindow(self, streamID: int) -> int:
        # Twisted's sums the queue on every write; SendQueue keeps the count.
        queue = self._outboundStreamQueues[streamID]
        return int(self.conn.local_flow_control_window(streamID)) - queue.size
