# -*- test-case-name: tests.test_history -*-
"""
The last five minutes of every node, for the status page's charts: once a
second a timer reads each node's request count and its latency histogram
(both kept by the request path anyway) and appends requests per second and
the p99 response time of that second to the node's ring buffers. Nothing
here runs per request.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from rrlb.metrics import LATENCY_BUCKETS, Metrics
from rrlb.pool import Pools

SAMPLE_INTERVAL = 1.0
HISTORY_SAMPLES = 300  # five minutes of one-second samples


def quantile(counts: Sequence[float], q: float = 0.99) -> Optional[float]:
    """
    The C{q} quantile (seconds) of a latency histogram's bucket counts
    (one per L{LATENCY_BUCKETS} bound, then +Inf; not cumulative),
    interpolated linearly inside its bucket; L{None} for no observations.
    """
    total = sum(counts)
    if total <= 0:
        return None
    target = q * total
    seen = 0.0
    for i, count in enumerate(counts):
        if count and seen + count >= target:
            lower = LATENCY_BUCKETS[i - 1] if i else 0.0
            upper = LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else lower * 2
            return lower + (upper - lower) * (target - seen) / count
        seen += count
    return LATENCY_BUCKETS[-1]


class NodeHistory:
    """
    One node's ring buffers: requests per second, and p99 seconds (L{None}
    for a second without responses).
    """

    __slots__ = ("rps", "p99", "requests", "buckets")

    def __init__(self, size: int = HISTORY_SAMPLES) -> None:
        self.rps: deque[float] = deque(maxlen=size)
        self.p99: deque[Optional[float]] = deque(maxlen=size)
        self.requests: Optional[int] = None
        self.buckets: Optional[list[float]] = None


class History(Service):
    """
    Samples every node of every pool each L{SAMPLE_INTERVAL} seconds.

    @ivar nodes: C{(pool, node key)} -> L{NodeHistory}.
    """

    log = Logger()

    def __init__(
        self,
        pools: Pools,
        metrics: Metrics,
        clock: IReactorTime,
        size: int = HISTORY_SAMPLES,
        interval: float = SAMPLE_INTERVAL,
    ) -> None:
        self.pools = pools
        self.metrics = metrics
        self.clock = clock
        self.size = size
        self.interval = interval
        self.nodes: dict[tuple[str, str], NodeHistory] = {}
        self._loop = LoopingCall(self.sample)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("the status history timer stopped", f)
        )

    def stopService(self) -> Any:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def get(self, label: tuple[str, str]) -> Optional[NodeHistory]:
        return self.nodes.get(label)

    def sample(self) -> None:
        """
        Append one sample per node; forget nodes no longer configured.
        """
        try:
            self._sample()
        except Exception:
            # The timer must never die (it stops for good on an exception).
            self.log.failure("sampling the status history")

    def _sample(self) -> None:
        latency = self.metrics.latency
        seen = set()
        for node in self.pools.nodes:
            label = node.label
            seen.add(label)
            history = self.nodes.get(label)
            if history is None:
                history = self.nodes[label] = NodeHistory(self.size)
            requests = node.requests
            previous = history.requests
            history.requests = requests
            history.rps.append(
                0.0 if previous is None else max(0, requests - previous) / self.interval
            )
            counts = latency.get(label)
            p99 = None
            if counts is not None:
                # Everything but the trailing sum of seconds.
                now = counts[:-1]
                before = history.buckets
                if before is None and previous is not None:
                    # Its first responses came this second.
                    before = [0.0] * len(now)
                history.buckets = now
                if before is not None:
                    p99 = quantile([a - b for a, b in zip(now, before)])
            history.p99.append(p99)
        for label in list(self.nodes):
            if label not in seen:
                del self.nodes[label]
