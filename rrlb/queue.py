# -*- test-case-name: tests.test_queue -*-
"""
Overload control beside the pool, pure logic with time from an injected
clock: the one FIFO queue of requests waiting for a node with room
(HAProxy's C{maxconn} and C{timeout queue}), and the retry budget that
keeps retries from multiplying the load on a failing cluster (Envoy's
C{retry_budget}).

Neither knows HTTP: the proxy hands the queue two callables per request and
asks the budget before it retries.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from rrlb.pool import Node, Pool

DEFAULT_QUEUE_TIMEOUT = 5.0
DEFAULT_RETRY_BUDGET = 20.0
# Envoy's min_retry_concurrency: retries allowed whatever the percentage, so
# a quiet balancer can still retry.
RETRY_FLOOR = 3


class Waiter:
    """
    One request in the queue.

    @ivar deliver: called with the node it may use; it must count the
        request in that node's C{in_flight} before it returns.
    @ivar expire: called when it waited for the whole queue timeout.
    """

    __slots__ = ("deliver", "expire", "call")

    def __init__(self, deliver: Callable[[Node], None], expire: Callable[[], None]) -> None:
        self.deliver = deliver
        self.expire = expire
        self.call: Optional[IDelayedCall] = None


class RequestQueue:
    """
    The requests waiting because every node in rotation is full, first in
    first out. Whenever a node may have room (a request ended, a node came
    into rotation, a reload raised a limit) L{dispatch} hands the head of
    the queue to the pool's next node with room.

    @ivar timeout: seconds a request waits at most (0: none waits); a
        change applies to requests queued after it.
    @ivar timeouts: requests that waited for the whole timeout.
    """

    log = Logger()

    def __init__(
        self, pool: Pool, clock: IReactorTime, timeout: float = DEFAULT_QUEUE_TIMEOUT
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.timeout = timeout
        self.timeouts = 0
        # An OrderedDict rather than a deque: a waiter whose client leaves is
        # removed from the middle at once, in O(1).
        self.waiting: OrderedDict[Waiter, None] = OrderedDict()
        pool.add_listener(self._node_changed)

    def __len__(self) -> int:
        return len(self.waiting)

    def wait(self, deliver: Callable[[Node], None], expire: Callable[[], None]) -> Optional[Waiter]:
        """
        Queue a request that found every node full.

        @return: its L{Waiter}, for L{leave}; L{None} if the timeout is 0 and
            C{expire} has been called already.
        """
        waiter = Waiter(deliver, expire)
        if self.timeout <= 0:
            self.timeouts += 1
            expire()
            return None
        waiter.call = self.clock.callLater(self.timeout, self._expired, waiter)
        self.waiting[waiter] = None
        return waiter

    def leave(self, waiter: Optional[Waiter]) -> None:
        """
        Take C{waiter} out of the queue (its client went away); nothing is
        called. A waiter no longer queued is ignored.
        """
        if waiter is None or self.waiting.pop(waiter, False) is False:
            return
        call = waiter.call
        waiter.call = None
        if call is not None and call.active():
            call.cancel()

    def dispatch(self) -> None:
        """
        Hand queued requests, oldest first, to nodes with room until the
        queue is empty or every node is full again.
        """
        waiting = self.waiting
        pool = self.pool
        while waiting:
            node = pool.pick()
            if node is None:
                return
            waiter, _ = waiting.popitem(last=False)
            call = waiter.call
            waiter.call = None
            if call is not None and call.active():
                call.cancel()
            try:
                waiter.deliver(node)
            except Exception:
                # One request's failure must not strand the rest of the queue.
                self.log.failure("starting a queued request on {node}", node=node.url)

    def _expired(self, waiter: Waiter) -> None:
        waiter.call = None
        if self.waiting.pop(waiter, False) is False:
            return
        self.timeouts += 1
        waiter.expire()

    def _node_changed(self, node: Node) -> None:
        # A node that came into rotation has room for the queue.
        if self.waiting and node.in_rotation:
            self.dispatch()


class RetryBudget:
    """
    How many retries may be in flight at once: C{percent} of the requests in
    flight, but never fewer than L{RETRY_FLOOR}. A request counts as one
    retry in flight from its first retry until it ends, however many nodes
    it goes on to try.

    @ivar active: requests being retried now.
    @ivar refused: retries the budget refused.
    """

    def __init__(self, percent: float = DEFAULT_RETRY_BUDGET, floor: int = RETRY_FLOOR) -> None:
        self.percent = percent
        self.floor = floor
        self.active = 0
        self.refused = 0

    def limit(self, in_flight: int) -> int:
        """
        The retries allowed in flight with C{in_flight} requests in flight.
        """
        return max(self.floor, int(in_flight * self.percent / 100))

    def try_start(self, in_flight: int) -> bool:
        """
        Take a place for one more request being retried, if the budget has
        one; count a refusal if not.
        """
        if self.active >= self.limit(in_flight):
            self.refused += 1
            return False
        self.active += 1
        return True

    def ended(self) -> None:
        """
        A request that took a place (L{try_start}) ended.
        """
        self.active -= 1
