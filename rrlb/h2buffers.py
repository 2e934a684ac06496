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
"""

from __future__ import annotations

from typing import Any

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
