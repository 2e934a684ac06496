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
through, whatever the number of workers or connections). It costs an AMP
round trip over a Unix socket, shared by every decision a worker needed in
one turn of its reactor (under load, many requests per message), measured
in docs/scaling.md.

A decision the main process has not answered within L{LINK_TIMEOUT} is a
store error (the filter's C{on_store_error} decides); a slot granted after
that is given back at once. It is longer than Redis's 50 ms: the main
process is on the same machine and serves no traffic, so a slow answer
means a machine under load (where 50 ms were measured to pass now and
then, letting a request through that the count would have refused), not
a store that is away.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from rrlb.ratelimit import InFlightSpec, Key, LocalLimits, Rate, RateLimitSpec
from rrlb.redisstore import StoreError
from rrlb.workers.wire import Decide, Release

# How long a worker waits for the main process's decisions.
LINK_TIMEOUT = 0.5

TAKE = "take"
ACQUIRE = "acquire"


def _wire(key: Key) -> str:
    # JSON carries strings: bytes (header and cookie values) as Latin-1,
    # which maps each byte to one character and back.
    return key if isinstance(key, str) else key.decode("latin-1")


class LimitLink:
    """
    A worker's local counts, asked of the main process over C{channel}.
    The decisions needed in one turn of the reactor go in one L{Decide}
    message, and the places given back in one L{Release}: under load one
    message carries many requests' decisions.

    @ivar errors: decisions not answered in time (store errors).
    """

    def __init__(self, channel: Any, clock: Any) -> None:
        self.channel = channel
        self.clock = clock
        self.errors = 0
        self._asked: list[tuple[list[Any], defer.Deferred[int]]] = []
        self._released: list[list[str]] = []
        self._flush_call: Any = None

    def keys(self) -> int:
        # The keys are the main process's.
        return 0

    def take(
        self, limit: str, spec: RateLimitSpec, key: Key, seconds: float
    ) -> defer.Deferred[int]:
        rate = spec.rate
        return self._ask(
            [TAKE, limit, _wire(key), rate.count, rate.period, spec.burst, spec.max_keys]
        )

    def acquire(self, limit: str, spec: InFlightSpec, key: Key) -> defer.Deferred[bool]:
        return self._ask([ACQUIRE, limit, _wire(key), spec.max]).addCallback(bool)

    def release(self, limit: str, key: Key) -> None:
        self._released.append([limit, _wire(key)])
        self._schedule()

    def _ask(self, decision: list[Any]) -> defer.Deferred[int]:
        d: defer.Deferred[int] = defer.Deferred()
        self._asked.append((decision, d))
        self._schedule()
        return d

    def _schedule(self) -> None:
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """
        Send what this turn asked for and gave back.
        """
        self._flush_call = None
        released, self._released = self._released, []
        asked, self._asked = self._asked, []
        channel = self.channel
        if released and channel.transport is not None:
            channel.callRemote(Release, releases=released)
        if not asked:
            return
        try:
            answer = channel.callRemote(Decide, decisions=[decision for decision, _ in asked])
        except Exception:
            answer = defer.fail(StoreError("the main process cannot be asked"))
        waiting = [d for _, d in asked]
        timer = self.clock.callLater(LINK_TIMEOUT, self._timed_out, waiting)

        def answered(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                self._timed_out(waiting, "could not decide")
                return
            answers = result["answers"]
            for (decision, d), value in zip(asked, answers):
                if not d.called:
                    d.callback(value)
                elif decision[0] == ACQUIRE and value:
                    # Granted after the request went on without it (the
                    # answer came late) or left (the chain cancelled its
                    # wait): give the place back.
                    self._released.append([decision[1], decision[2]])
            if self._released:
                self._schedule()

        answer.addBoth(answered)

    def _timed_out(self, waiting: list[defer.Deferred[int]], why: str = "did not answer") -> None:
        for d in waiting:
            if not d.called:
                # (A cancelled one, whose client left, is not an error.)
                self.errors += 1
                d.errback(StoreError(f"the main process {why} in time"))


class MainLimits:
    """
    The main process's side: the instance's L{LocalLimits}, deciding for
    every worker (a worker's places are given back when it dies).
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.local = LocalLimits()
        self._specs: dict[tuple[int, int, int, int], RateLimitSpec] = {}
        self._flights: dict[int, InFlightSpec] = {}

    def decide(self, decisions: list[Any], holder: Any) -> list[int]:
        """
        The answers to a worker's L{Decide}, in order.
        """
        now = self.clock.seconds()
        answers = []
        for decision in decisions:
            try:
                answers.append(self._one(decision, now, holder))
            except (TypeError, ValueError, IndexError):
                # Not what a worker sends: go on (it is rrlb's own worker).
                answers.append(0)
        return answers

    def _one(self, decision: list[Any], now: float, holder: Any) -> int:
        if decision[0] == TAKE:
            _, limit, key, count, period, burst, max_keys = decision
            shape = (count, period, burst, max_keys)
            spec = self._specs.get(shape)
            if spec is None:
                spec = self._specs[shape] = RateLimitSpec(
                    Rate(count, period), burst, max_keys=max_keys
                )
            return self.local.take(limit, spec, key, now)
        _, limit, key, maximum = decision
        flight = self._flights.get(maximum)
        if flight is None:
            flight = self._flights[maximum] = InFlightSpec(maximum)
        return int(self.local.acquire(limit, flight, key, holder))

    def release_all(self, releases: list[Any], holder: Any) -> None:
        for limit, key in releases:
            self.local.release(limit, key, holder)

    def forget(self, holder: Any) -> None:
        self.local.forget(holder)

    def keys(self) -> int:
        return self.local.keys()
