# -*- test-case-name: tests.test_drain -*-
"""
The drain at shutdown: once the listeners have stopped accepting, let the
client connections that are in the middle of a request finish it, close the
idle keep-alive ones, and give up on the rest after a deadline.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

# How often the drain looks at the open connections again: often enough to
# close a keep-alive connection promptly once its last response is out.
DRAIN_POLL = 0.05


class _Channel(Protocol):
    transport: Any

    def close_when_idle(self) -> None: ...


class _Site(Protocol):
    channels: set[Any]
    on_channel_lost: Any


class Drain:
    """
    One drain of a site's client connections.

    Every L{DRAIN_POLL} seconds each open connection is asked to close when
    idle (idle ones close at once; busy ones finish their response with
    C{Connection: close} and then close). It ends as soon as the last
    connection is gone, or at the deadline, when the remaining connections
    are aborted.

    @ivar cut: the number of connections aborted at the deadline.
    """

    def __init__(self, clock: IReactorTime, site: _Site, timeout: float) -> None:
        self.clock = clock
        self.site = site
        self.timeout = timeout
        self.cut = 0
        self.started = 0.0
        self._deadline = 0.0
        self._call: Optional[IDelayedCall] = None
        self._done: Optional[defer.Deferred[int]] = None

    def start(self) -> defer.Deferred[int]:
        """
        Start draining.

        @return: a Deferred that fires with the number of connections cut
            (0 when every request finished in time).
        """
        self.started = self.clock.seconds()
        self._deadline = self.started + self.timeout
        done: defer.Deferred[int] = defer.Deferred()
        self._done = done
        self.site.on_channel_lost = self._lost
        self._tick()
        return done

    @property
    def elapsed(self) -> float:
        return self.clock.seconds() - self.started

    def _tick(self) -> None:
        self._call = None
        if self._done is None or self._done.called:
            return
        channels = self.site.channels
        if self.cut:
            # The aborted connections had a reactor turn to go; done anyway.
            self._finish()
            return
        if self.clock.seconds() >= self._deadline:
            self.cut = len(channels)
            for channel in list(channels):
                channel.transport.abortConnection()
        else:
            for channel in list(channels):
                channel.close_when_idle()
        if not channels:
            self._finish()
            return
        self._call = self.clock.callLater(DRAIN_POLL, self._tick)

    def _lost(self) -> None:
        # Called from a connection's connectionLost: finish on the next turn
        # of the reactor rather than stop services from inside it.
        if self.site.channels or self._done is None or self._done.called:
            return
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self.clock.callLater(0, self._tick)

    def _finish(self) -> None:
        self.site.on_channel_lost = None
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        done, self._done = self._done, None
        if done is not None and not done.called:
            done.callback(self.cut)

    def cancel(self) -> None:
        """
        Stop waiting now (nothing is closed).
        """
        self._finish()
