"""
Tests for L{rrlb.queue}: the FIFO queue of requests waiting for a node with
room, and the retry budget. Pure logic: a real L{Pool}, time from
L{task.Clock}, no sockets.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import task
from twisted.trial import unittest

from rrlb.config import NodeSpec, parse_node
from rrlb.pool import Node, Pool
from rrlb.queue import RETRY_FLOOR, RequestQueue, RetryBudget, Waiter


def full_pool(*names: str, limit: int = 1) -> Pool:
    """
    A pool of nodes with C{limit} each, every one full.
    """
    pool = Pool(
        NodeSpec(**{**parse_node(f"http://{n}").__dict__, "max_connections": limit}) for n in names
    )
    for node in pool.nodes:
        node.in_flight = limit
    return pool


class Recorder:
    """
    Stands in for the proxy: records which request went to which node (and
    counts it in flight, as the proxy's start does) and which timed out.
    """

    def __init__(self, queue: RequestQueue) -> None:
        self.queue = queue
        self.delivered: list[tuple[str, str]] = []
        self.expired: list[str] = []

    def wait(self, name: str) -> Optional[Waiter]:
        def deliver(node: Node) -> None:
            node.in_flight += 1
            self.delivered.append((name, node.host))

        return self.queue.wait(deliver, lambda: self.expired.append(name))


def free(queue: RequestQueue, node: Node) -> None:
    """
    One request on C{node} ends, as the proxy's end of an exchange does.
    """
    node.in_flight -= 1
    if queue.waiting:
        queue.dispatch()


class QueueTests(unittest.TestCase):
    """
    L{RequestQueue}: FIFO order, the timeout, leaving, and what wakes it.
    """

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.pool = full_pool("a", "b")
        self.queue = RequestQueue(self.pool, self.clock, timeout=5.0)
        self.requests = Recorder(self.queue)

    def test_fifo(self) -> None:
        """
        Queued requests go out first in, first out, each to the node that
        freed a slot.
        """
        a, b = self.pool.nodes
        for name in ("1", "2", "3"):
            self.requests.wait(name)
        self.assertEqual(len(self.queue), 3)
        free(self.queue, b)
        free(self.queue, a)
        free(self.queue, b)
        self.assertEqual(self.requests.delivered, [("1", "b"), ("2", "a"), ("3", "b")])
        self.assertEqual(len(self.queue), 0)
        self.assertEqual([n.in_flight for n in self.pool.nodes], [1, 1])

    def test_one_slot_one_request(self) -> None:
        """
        One freed slot takes exactly one queued request; the rest wait.
        """
        a, _ = self.pool.nodes
        self.requests.wait("1")
        self.requests.wait("2")
        free(self.queue, a)
        self.assertEqual(self.requests.delivered, [("1", "a")])
        self.assertEqual(len(self.queue), 1)

    def test_timeout(self) -> None:
        """
        A request still queued when the timeout passes is expired (the proxy
        answers 503) and counted; one delivered in time is not.
        """
        a, _ = self.pool.nodes
        self.requests.wait("1")
        self.clock.advance(1)
        self.requests.wait("2")
        self.clock.advance(3.5)
        free(self.queue, a)
        self.clock.advance(0.5)
        self.assertEqual(self.requests.delivered, [("1", "a")])
        self.assertEqual(self.requests.expired, [])
        self.clock.advance(0.99)
        self.assertEqual(self.requests.expired, [])
        self.clock.advance(0.01)
        self.assertEqual(self.requests.expired, ["2"])
        self.assertEqual(self.queue.timeouts, 1)
        self.assertEqual(len(self.queue), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_zero_timeout(self) -> None:
        """
        With a timeout of 0 nothing waits: the request is expired at once.
        """
        self.queue.timeout = 0
        self.assertIsNone(self.requests.wait("1"))
        self.assertEqual(self.requests.expired, ["1"])
        self.assertEqual(self.queue.timeouts, 1)
        self.assertEqual(len(self.queue), 0)

    def test_leave(self) -> None:
        """
        A request whose client leaves is out of the queue at once: its timer
        is cancelled, it is never delivered or expired, and the one behind
        it moves up.
        """
        a, _ = self.pool.nodes
        first = self.requests.wait("1")
        self.requests.wait("2")
        self.queue.leave(first)
        self.assertEqual(len(self.queue), 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        free(self.queue, a)
        self.clock.advance(10)
        self.assertEqual(self.requests.delivered, [("2", "a")])
        self.assertEqual(self.requests.expired, [])
        self.assertEqual(self.queue.timeouts, 0)

    def test_leave_twice_or_after_delivery(self) -> None:
        """
        Leaving after delivery, or twice, changes nothing.
        """
        a, _ = self.pool.nodes
        waiter = self.requests.wait("1")
        free(self.queue, a)
        self.queue.leave(waiter)
        self.queue.leave(waiter)
        self.queue.leave(None)
        self.assertEqual(self.requests.delivered, [("1", "a")])

    def test_node_comes_into_rotation(self) -> None:
        """
        A node added to the rotation takes queued requests at once.
        """
        pool = Pool([parse_node("http://a"), parse_node("http://b")], fall=1, rise=1)
        a, b = pool.nodes
        pool.max_conns_per_node = 1
        pool.update([a.spec, b.spec])
        a.in_flight = 1
        pool.mark(b, False, "down")
        queue = RequestQueue(pool, self.clock)
        requests = Recorder(queue)
        requests.wait("1")
        requests.wait("2")
        pool.mark(b, True, "up")
        self.assertEqual(requests.delivered, [("1", "b")])
        self.assertEqual(len(queue), 1)

    def test_dispatch_survives_a_failing_delivery(self) -> None:
        """
        A delivery that raises is logged and the next queued request still
        gets its node.
        """
        a, b = self.pool.nodes

        def broken(node: Node) -> None:
            raise RuntimeError("boom")

        self.queue.wait(broken, lambda: None)
        self.requests.wait("2")
        a.in_flight = b.in_flight = 0
        self.queue.dispatch()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        # The broken one was handed a and never took its slot; the rotation
        # goes on with b.
        self.assertEqual(self.requests.delivered, [("2", "b")])
        self.assertEqual(len(self.queue), 0)


class RetryBudgetTests(unittest.TestCase):
    """
    L{RetryBudget}: a percentage of the requests in flight, with a floor.
    """

    def test_floor(self) -> None:
        """
        With few requests in flight, three retries may be in flight at once,
        not a fourth; one ending makes room again.
        """
        budget = RetryBudget(percent=20)
        self.assertEqual(RETRY_FLOOR, 3)
        self.assertEqual([budget.try_start(4) for _ in range(4)], [True, True, True, False])
        self.assertEqual((budget.active, budget.refused), (3, 1))
        budget.ended()
        self.assertTrue(budget.try_start(4))

    def test_percent(self) -> None:
        """
        Past the floor, retries in flight are at most the percentage of the
        requests in flight: 20% of 100 is 20.
        """
        budget = RetryBudget(percent=20)
        self.assertEqual(budget.limit(100), 20)
        self.assertEqual(budget.limit(14), 3)
        allowed = sum(budget.try_start(100) for _ in range(30))
        self.assertEqual(allowed, 20)
        self.assertEqual(budget.refused, 10)

    def test_zero_percent_keeps_floor(self) -> None:
        """
        A budget of 0% still allows the floor; 100% allows one retry per
        request in flight.
        """
        self.assertEqual(RetryBudget(percent=0).limit(1000), 3)
        self.assertEqual(RetryBudget(percent=100).limit(50), 50)

    def test_percent_changes(self) -> None:
        """
        A reload's new percentage applies to the next retry.
        """
        budget = RetryBudget(percent=20)
        for _ in range(10):
            budget.try_start(50)
        self.assertEqual(budget.active, 10)
        self.assertFalse(budget.try_start(50))
        budget.percent = 50
        self.assertTrue(budget.try_start(50))
