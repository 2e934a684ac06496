# -*- test-case-name: tests.test_rate_limits -*-
"""
How the C{store: local} rate limits of C{--workers N} keep one count for
the whole instance: every decision is made by the main process, which holds
the only L{LocalLimits}, and asked for over the worker's channel.

The alternatives were worse for what the issue asks: giving each worker a
share of the rate fails a client on one keep-alive connection (it only
ever meets one worker), and shared memory would need locks across
processes that Python cannot take cheaply. A decision through the main
process is exact (the main process serializes them: no extra request gets
through, whatever the number of workers or connections) and costs one AMP
round trip over a Unix socket per request, measured in docs/scaling.md.

A decision the main process has not answered within L{LINK_TIMEOUT} is a
store error (the filter's C{on_store_error} decides); a slot granted after
that is given back at once. It is longer than Redis's 50 ms: the main
process is on the same machine and serves no traffic, so a slow answer
means a machine under load (where 50 ms were measured to pass now and
then, letting a request through that the count would have refused), not
a store that is away.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure

from rrlb.ratelimit import InFlightSpec, Key, LocalLimits, Rate, RateLimitSpec
from rrlb.redisstore import StoreError
from rrlb.workers.wire import AcquireSlot, ReleaseSlot, TakeToken

# How long a worker waits for the main process's decision.
LINK_TIMEOUT = 0.5


class LimitLink:
    """
    A worker's local counts, asked of the main process over C{channel}.

    @ivar errors: decisions not answered in time (store errors).
    """

    def __init__(self, channel: Any, clock: Any) -> None:
        self.channel = channel
        self.clock = clock
        self.errors = 0

    def keys(self) -> int:
        # The keys are the main process's.
        return 0

    def _ask(
        self, command: Any, late: Callable[[Any], None] = lambda answer: None, **kw: Any
    ) -> defer.Deferred[Any]:
        try:
            asked = self.channel.callRemote(command, **kw)
        except Exception:
            self.errors += 1
            return defer.fail(StoreError("the main process cannot be asked"))
        result: defer.Deferred[Any] = defer.Deferred()

        def timed_out() -> None:
            self.errors += 1
            result.errback(StoreError("the main process did not answer in time"))

        timer = self.clock.callLater(LINK_TIMEOUT, timed_out)

        def answered(answer: Any) -> None:
            if not timer.active():
                if not isinstance(answer, Failure):
                    late(answer)
                return
            timer.cancel()
            if isinstance(answer, Failure):
                self.errors += 1
                result.errback(StoreError("the main process could not decide"))
            else:
                result.callback(answer)

        asked.addBoth(answered)
        return result

    def take(
        self, limit: str, spec: RateLimitSpec, key: Key, seconds: float
    ) -> defer.Deferred[int]:
        rate = spec.rate
        return self._ask(
            TakeToken,
            limit=limit,
            key=_wire(key),
            count=rate.count,
            period=rate.period,
            burst=spec.burst,
            max_keys=spec.max_keys,
        ).addCallback(lambda answer: answer["retry_after"])

    def acquire(self, limit: str, spec: InFlightSpec, key: Key) -> defer.Deferred[bool]:
        def late(answer: Any) -> None:
            if answer["ok"]:
                self.release(limit, key)

        return self._ask(AcquireSlot, late, limit=limit, key=_wire(key), max=spec.max).addCallback(
            lambda answer: answer["ok"]
        )

    def release(self, limit: str, key: Key) -> None:
        if self.channel.transport is None:
            return
        self.channel.callRemote(ReleaseSlot, limit=limit, key=_wire(key))


def _wire(key: Key) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else key


class MainLimits:
    """
    The main process's side: the instance's L{LocalLimits}, deciding for
    every worker (a worker's slots are given back when it dies).
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.local = LocalLimits()
        self._specs: dict[tuple[int, int, int, int], RateLimitSpec] = {}
        self._flights: dict[int, InFlightSpec] = {}

    def take(
        self, limit: str, key: bytes, count: int, period: int, burst: int, max_keys: int
    ) -> int:
        shape = (count, period, burst, max_keys)
        spec = self._specs.get(shape)
        if spec is None:
            spec = self._specs[shape] = RateLimitSpec(Rate(count, period), burst, max_keys=max_keys)
        return self.local.take(limit, spec, key, self.clock.seconds())

    def acquire(self, limit: str, key: bytes, maximum: int, holder: Any) -> bool:
        spec = self._flights.get(maximum)
        if spec is None:
            spec = self._flights[maximum] = InFlightSpec(maximum)
        return self.local.acquire(limit, spec, key, holder)

    def release(self, limit: str, key: bytes, holder: Any) -> None:
        self.local.release(limit, key, holder)

    def forget(self, holder: Any) -> None:
        self.local.forget(holder)

    def keys(self) -> int:
        return self.local.keys()
