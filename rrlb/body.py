# -*- test-case-name: tests.test_stream -*-
"""
Streamed request bodies: the bytes of a request body pass from the client
to the node as they arrive, instead of being collected before the request
is forwarded.

L{StreamedBody} sits between a I{source} (the client's connection: the
HTTP/1.1 channel, or an HTTP/2 stream) and a I{consumer} (the connection to
the node carrying the request). It keeps the first L{KEEP} bytes so that a
request whose body fits in them can be sent again to another node; past
that, a body is never re-sent once a byte of it went out.

Backpressure both ways, with no buffer of its own beyond one read:

  - while no consumer takes the bytes (the request waits in the queue, or
    for a connection to a node), the source is held: it stops reading;
  - while the consumer's connection has more than its write buffer queued
    (the node reads slowly), the body is its producer and holds the source
    the same way.

The source provides C{hold(flag)} and C{release(flag)}: it reads from its
client only while no flag is held. The consumer provides C{body_data(data)},
C{body_end()}, C{registerProducer(producer, streaming)} and
C{unregisterProducer()}.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

# Body bytes kept for a retry on another node (the 64 KiB).
KEEP = 65536

# Why a source is held (flags, so each reason is released on its own).
WAITING = 1  # no consumer yet
NODE_FULL = 2  # the node's connection has a full write buffer
CONTINUE = 4  # Expect: 100-continue, and the 100 has not been sent

# How long rrlb waits for the node's own answer to Expect: 100-continue (its
# 100, or a final answer refusing the body) before telling the client to go
# on itself, for nodes that ignore Expect (curl waits 1 s on its own side).
CONTINUE_WAIT = 0.5


@implementer(IPushProducer)
class StreamedBody:
    """
    One request body on its way through.

    @ivar length: the body's length when the client gave one (Content-Length),
        L{None} for a chunked body whose length is not known yet.
    @ivar received: bytes received from the client so far.
    @ivar complete: the whole body has been received.
    @ivar spent: a byte past the first L{KEEP} went to a node, so the body
        can no longer be sent again.
    @ivar node_full: the consumer's connection has a full write buffer.
    @ivar chunked: the node gets the body with chunked framing (its length
        was not known when the request head went out).
    """

    __slots__ = (
        "source",
        "length",
        "received",
        "complete",
        "spent",
        "chunked",
        "consumer",
        "node_full",
        "expect_continue",
        "_continue_call",
        "_kept",
        "_pending",
    )

    def __init__(self, source: Any, length: Optional[int], expect_continue: bool = False) -> None:
        self.source = source
        self.length = length
        self.received = 0
        self.complete = False
        self.spent = False
        self.chunked = False
        self.consumer: Any = None
        self.node_full = False
        self.expect_continue = expect_continue
        self._continue_call: Any = None
        self._kept = bytearray()
        self._pending: list[bytes] = []
        if expect_continue:
            source.hold(CONTINUE)

    @property
    def replayable(self) -> bool:
        """
        Whether the whole body can still be sent to another node.
        """
        return not self.spent

    def buffered(self) -> bytes:
        """
        The body received so far and not yet given to a consumer beyond the
        kept part (everything, for a body that fits in L{KEEP}).
        """
        return bytes(self._kept) + b"".join(self._pending)

    # -- from the source -----------------------------------------------------

    def feed(self, data: bytes) -> None:
        """
        Body bytes from the client.
        """
        before = self.received
        self.received = after = before + len(data)
        if before < KEEP:
            self._kept += data[: KEEP - before]
        consumer = self.consumer
        if consumer is not None:
            if after > KEEP:
                self.spent = True
            consumer.body_data(data)
            return
        if after > KEEP:
            self._pending.append(data[KEEP - before :] if before < KEEP else data)
        # Nobody takes the bytes now: read no more until somebody does.
        self.source.hold(WAITING)

    def finish(self) -> None:
        """
        The client sent the whole body.
        """
        self.complete = True
        consumer = self.consumer
        if consumer is not None:
            consumer.unregisterProducer()
            consumer.body_end()

    # -- the consumer's side ---------------------------------------------------

    def attach(self, consumer: Any) -> None:
        """
        Make C{consumer} the taker of the body: it gets what came so far at
        once, then the rest as it arrives.
        """
        self.consumer = consumer
        if self.expect_continue:
            clock = getattr(self.source, "clock", None)
            if self.received or clock is None:
                self.go_on()
            elif self._continue_call is None:
                # The node got Expect: 100-continue too: its 100 (go_on) or
                # its final answer (no_continue) decides; if neither comes
                # soon, rrlb tells the client to go on.
                self._continue_call = clock.callLater(CONTINUE_WAIT, self.go_on)
        data = self.buffered()
        if self._pending:
            self.spent = True
            self._pending = []
        if self.complete:
            if data:
                consumer.body_data(data)
            consumer.body_end()
            return
        consumer.registerProducer(self, True)
        if data:
            consumer.body_data(data)
        self.source.release(WAITING)

    def go_on(self) -> None:
        """
        Tell a client waiting on C{Expect: 100-continue} to send its body
        (the node said 100 Continue, or did not answer in L{CONTINUE_WAIT}).
        """
        self._cancel_continue()
        if self.expect_continue:
            self.expect_continue = False
            if not self.received:
                self.source.send_continue()
            self.source.release(CONTINUE)

    def no_continue(self) -> None:
        """
        The node gave its final answer before asking for the body: the client
        gets that answer instead of a 100 Continue, and sends no body.
        """
        self._cancel_continue()
        self.expect_continue = False

    def _cancel_continue(self) -> None:
        call, self._continue_call = self._continue_call, None
        if call is not None and call.active():
            call.cancel()

    def detach(self, consumer: Any) -> None:
        """
        C{consumer} takes no more of the body (its connection ended, or the
        node answered before taking it all).
        """
        if self.consumer is not consumer:
            return
        self.consumer = None
        # A retry asks its own node again.
        self._cancel_continue()
        if not self.complete:
            try:
                consumer.unregisterProducer()
            except Exception:
                pass  # the connection is already gone
        self.node_full = False
        self.source.release(NODE_FULL)

    # -- IPushProducer, for the consumer's connection ----------------------------

    def pauseProducing(self) -> None:
        self.node_full = True
        self.source.hold(NODE_FULL)

    def resumeProducing(self) -> None:
        self.node_full = False
        self.source.release(NODE_FULL)

    def stopProducing(self) -> None:
        # The node's connection closed: the exchange hears of it from the
        # connection itself.
        self.node_full = False
        self.source.release(NODE_FULL)
