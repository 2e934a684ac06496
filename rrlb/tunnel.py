# -*- test-case-name: tests.test_websocket,tests.test_slow_peers -*-
"""
Upgrade tunnels (WebSocket): after a node answered C{101 Switching
Protocols} to a client's C{Upgrade: websocket}, bytes are copied both ways
between the client's connection and the node's until either side closes,
with backpressure in both directions, and closed after C{--tunnel-timeout}
seconds with no byte either way.

The tunnel stays a request in flight on its node (the drain at shutdown
waits for it, C{/status} shows it) and gets one access-log line when it
ends, written by the request as for any other (status 101, the bytes each
way, how long it was open).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from rrlb.body import NODE_FULL


@implementer(IPushProducer)
class _Reader:
    """
    Pauses and resumes reading from the node when the client's write
    buffer fills and drains.
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


@implementer(IPushProducer)
class _ClientReader:
    """
    Holds the client back (L{rrlb.channel.ProxyChannel.hold}) while the
    node's write buffer is full: through the channel, which counts it with
    its own reasons not to read, so that none resumes what another paused.
    """

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.node_full = False

    def pauseProducing(self) -> None:
        self.node_full = True
        self.channel.hold(NODE_FULL)

    def resumeProducing(self) -> None:
        self.node_full = False
        self.channel.release(NODE_FULL)

    def stopProducing(self) -> None:
        pass


class Tunnel:
    """
    One open tunnel between a client connection (its channel) and a node
    connection (an L{rrlb.upstream.UpstreamProtocol} in tunnel mode).

    @ivar to_node: bytes copied from the client to the node.
    @ivar to_client: bytes copied from the node to the client.
    """

    def __init__(
        self, exchange: Any, channel: Any, upstream: Any, clock: Any, timeout: float, stats: Any
    ) -> None:
        self.exchange = exchange
        self.channel = channel
        self.upstream = upstream
        self.clock = clock
        self.timeout = timeout
        self.stats = stats
        self.opened = self.last = clock.seconds()
        self.to_node = 0
        self.to_client = 0
        self.closed = False
        self._client = channel.transport
        self._node = upstream.transport
        # Node -> client: a full client buffer pauses the channel, which
        # pauses its request producer: reading from the node.
        channel.registerProducer(_Reader(self._node), True)
        # Client -> node: a full node buffer pauses reading from the client.
        self._client_reader = _ClientReader(channel)
        self._node.registerProducer(self._client_reader, True)
        self._timer = clock.callLater(timeout, self._check_idle)
        stats.tunnels_open += 1

    def summary(self) -> tuple[int, int, float]:
        """
        Bytes to the node, bytes to the client, and seconds open (for the
        access log).
        """
        return (self.to_node, self.to_client, self.clock.seconds() - self.opened)

    def from_client(self, data: bytes) -> None:
        if self.closed:
            return
        self.to_node += len(data)
        self.stats.tunnel_bytes_to_node += len(data)
        self.last = self.clock.seconds()
        self._node.write(data)

    def from_node(self, data: bytes) -> None:
        if self.closed:
            return
        self.to_client += len(data)
        self.stats.tunnel_bytes_to_client += len(data)
        self.last = self.clock.seconds()
        self.exchange.request.sentLength += len(data)
        self._client.write(data)

    def _check_idle(self) -> None:
        self._timer = None
        if self.closed:
            return
        idle_until = self.last + self.timeout
        now = self.clock.seconds()
        if now < idle_until:
            self._timer = self.clock.callLater(idle_until - now, self._check_idle)
            return
        # No byte either way for the whole timeout: close both sides.
        self.close()

    def close(self) -> None:
        """
        End the tunnel (one side closed, or it was idle too long): close
        both sides once what is buffered for them has gone out, but not for
        ever: a node that is not reading is dropped at once, and a client
        that takes nothing is cut off after the site's close timeout.
        """
        if self.closed:
            return
        self.closed = True
        self.stats.tunnels_open -= 1
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._client_reader.node_full:
            # The node is not reading: what is left for it would keep its
            # connection open for as long as it reads nothing.
            self._node.abortConnection()
        else:
            self._node.loseConnection()
        # Through the channel: a client that takes nothing of what is left
        # for it is cut off after the site's close timeout.
        self.channel.loseConnection()
