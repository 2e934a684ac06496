"""
Tests for L{rrlb.pool}: the rotation (strict cycle, fairness when nodes
leave and rejoin, smooth weighted round robin), rise/fall health state, and
changing the node set while running. No I/O: time comes from L{task.Clock}.
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

from twisted.internet import task
from twisted.trial import unittest

from rrlb.config import NodeSpec
from rrlb.pool import DOWN, DRAINING, UP, Node, Pool, smooth_weighted_order
from tests.support import LogCapture, bring_back, name, specs, take_out


def picks(pool: Pool, n: int) -> str:
    """
    The next C{n} picks, as a string of node names.
    """
    return "".join(name(pool.pick()) for _ in range(n))


class RotationTests(unittest.TestCase):
    """
    Equal weights: a strict cycle over the nodes in rotation.
    """

    def test_strict_cycle(self) -> None:
        """
        Requests go to the nodes in configured order, one step per pick,
        round and round.
        """
        pool = Pool(specs("a", "b", "c"))
        self.assertEqual(picks(pool, 9), "abcabcabc")

    def test_single_node(self) -> None:
        """
        With one node every pick is that node.
        """
        pool = Pool(specs("a"))
        self.assertEqual(picks(pool, 3), "aaa")

    def test_no_nodes(self) -> None:
        """
        An empty pool picks nothing.
        """
        self.assertIsNone(Pool([]).pick())

    def test_all_down(self) -> None:
        """
        When every node is out of rotation, C{pick} gives L{None}; when one
        comes back it is picked again.
        """
        pool = Pool(specs("a", "b"))
        a, b = pool.nodes
        take_out(pool, a)
        take_out(pool, b)
        self.assertIsNone(pool.pick())
        self.assertEqual(pool.in_rotation, [])
        bring_back(pool, b)
        self.assertEqual(picks(pool, 3), "bbb")

    def test_leave_skips_without_repeat(self) -> None:
        """
        When the node that is due next leaves, the cycle goes on with the one
        after it; the node that just served does not get a second turn.
        """
        pool = Pool(specs("a", "b", "c"))
        a, b, c = pool.nodes
        self.assertEqual(picks(pool, 1), "a")
        take_out(pool, b)
        self.assertEqual(picks(pool, 4), "caca")

    def test_last_served_leaves(self) -> None:
        """
        When the node that served last leaves, the next one in order follows.
        """
        pool = Pool(specs("a", "b", "c"))
        a, b, c = pool.nodes
        self.assertEqual(picks(pool, 2), "ab")
        take_out(pool, b)
        self.assertEqual(picks(pool, 4), "caca")

    def test_leave_at_wrap(self) -> None:
        """
        When the first node leaves just after the last node served, the
        cycle wraps to the second node.
        """
        pool = Pool(specs("a", "b", "c"))
        a, b, c = pool.nodes
        self.assertEqual(picks(pool, 3), "abc")
        take_out(pool, a)
        self.assertEqual(picks(pool, 4), "bcbc")

    def test_rejoin_takes_its_place(self) -> None:
        """
        A node that comes back gets its turn at its place in the order.
        """
        pool = Pool(specs("a", "b", "c"))
        a, b, c = pool.nodes
        take_out(pool, b)
        self.assertEqual(picks(pool, 3), "aca")
        bring_back(pool, b)
        self.assertEqual(picks(pool, 6), "bcabca")

    def test_rejoin_right_after_last(self) -> None:
        """
        A node that rejoins just after the one before it served is next.
        """
        pool = Pool(specs("a", "b", "c"))
        a, b, c = pool.nodes
        take_out(pool, c)
        self.assertEqual(picks(pool, 2), "ab")
        bring_back(pool, c)
        self.assertEqual(picks(pool, 4), "cabc")

    def test_random_churn_is_strict_cycle(self) -> None:
        """
        Under any sequence of nodes leaving and rejoining, every pick is the
        next node in configured cyclic order, among those in rotation now,
        after the node picked before. So no node ever gets two turns in a row
        while another is in rotation.
        """
        names = "abcdef"
        rng = random.Random(1234)
        pool = Pool(specs(*names), rise=1, fall=1)
        last: Optional[str] = None
        for step in range(3000):
            if rng.random() < 0.3:
                node = rng.choice(pool.nodes)
                pool.mark(node, not node.healthy, "churn")
                continue
            live = [n.host for n in pool.nodes if n.in_rotation]
            got = pool.pick()
            if not live:
                self.assertIsNone(got)
                continue
            if last is None:
                expected = live[0]
            else:
                after = [h for h in live if h > last]
                expected = after[0] if after else live[0]
            self.assertEqual(name(got), expected, f"step {step}, live {live}, last {last}")
            if len(live) > 1:
                self.assertNotEqual(name(got), last)
            last = name(got)


class WeightTests(unittest.TestCase):
    """
    Weights: smooth weighted round robin, as nginx does it.
    """

    def test_smooth_5_1_1(self) -> None:
        """
        Weights 5, 1, 1 give a a b a c a a (interleaved, not a a a a a b c),
        cycle after cycle.
        """
        pool = Pool(specs("a", "b", "c", weights=[5, 1, 1]))
        self.assertEqual(picks(pool, 14), "aabacaa" * 2)

    def test_order_function(self) -> None:
        """
        L{smooth_weighted_order} gives one full cycle.
        """
        nodes = [Node(s, i) for i, s in enumerate(specs("a", "b", "c", weights=[5, 1, 1]))]
        self.assertEqual("".join(n.host for n in smooth_weighted_order(nodes)), "aabacaa")

    def test_equal_weights_are_strict_cycle(self) -> None:
        """
        Equal weights, whatever their value, give exactly the strict cycle.
        """
        for weight in (1, 2, 7, 256):
            pool = Pool(specs("a", "b", "c", weights=[weight] * 3))
            self.assertEqual(picks(pool, 9), "abcabcabc", f"weight {weight}")

    def test_proportions(self) -> None:
        """
        Over whole cycles each node gets its weight's share, and a node with
        a larger weight never gets all its turns in one run.
        """
        pool = Pool(specs("a", "b", "c", "d", weights=[4, 3, 2, 1]))
        got = picks(pool, 100)
        self.assertEqual([got.count(x) for x in "abcd"], [40, 30, 20, 10])
        self.assertNotIn("aaa", got)

    def test_weighted_leave(self) -> None:
        """
        When a weighted node leaves, the others share the traffic by their
        weights; when it rejoins it gets its share again.
        """
        pool = Pool(specs("a", "b", "c", weights=[5, 1, 1]))
        a, b, c = pool.nodes
        take_out(pool, c)
        got = picks(pool, 60)
        self.assertEqual((got.count("a"), got.count("b"), got.count("c")), (50, 10, 0))
        bring_back(pool, c)
        got = picks(pool, 70)
        self.assertEqual((got.count("a"), got.count("b"), got.count("c")), (50, 10, 10))


class HealthStateTests(unittest.TestCase):
    """
    Rise and fall: consecutive checks move a node in and out of rotation.
    """

    def setUp(self) -> None:
        self.pool = Pool(specs("a", "b"), rise=2, fall=3)
        self.a, self.b = self.pool.nodes
        self.changes: list[tuple[str, bool]] = []
        self.pool.add_listener(lambda node: self.changes.append((node.host, node.in_rotation)))

    def test_start_healthy(self) -> None:
        """
        All nodes start healthy and in rotation, with no counts.
        """
        for node in self.pool.nodes:
            self.assertTrue(node.healthy)
            self.assertEqual(node.state, UP)
            self.assertEqual((node.successes, node.failures), (0, 0))

    def test_fall(self) -> None:
        """
        C{fall} failures in a row take a node out; fewer do not.
        """
        self.pool.mark(self.a, False, "refused")
        self.pool.mark(self.a, False, "refused")
        self.assertTrue(self.a.in_rotation)
        self.assertEqual(self.a.failures, 2)
        self.pool.mark(self.a, False, "refused")
        self.assertFalse(self.a.in_rotation)
        self.assertEqual(self.a.state, DOWN)
        self.assertEqual(self.a.last_error, "refused")
        self.assertEqual(self.changes, [("a", False)])
        self.assertEqual(picks(self.pool, 2), "bb")

    def test_success_resets_failures(self) -> None:
        """
        A success between failures starts the count again: failures must be
        in a row.
        """
        for ok in (False, False, True, False, False, True, False, False):
            self.pool.mark(self.a, ok, "x")
        self.assertTrue(self.a.healthy)
        self.assertEqual(self.changes, [])

    def test_rise(self) -> None:
        """
        A node that is out needs C{rise} successes in a row to come back; a
        failure in between starts the count again.
        """
        take_out(self.pool, self.a)
        self.pool.mark(self.a, True, "HTTP 200")
        self.assertFalse(self.a.healthy)
        self.pool.mark(self.a, False, "HTTP 500")
        self.pool.mark(self.a, True, "HTTP 200")
        self.assertFalse(self.a.healthy)
        self.pool.mark(self.a, True, "HTTP 200")
        self.assertTrue(self.a.healthy)
        self.assertIsNone(self.a.last_error)
        self.assertEqual(self.changes, [("a", False), ("a", True)])

    def test_more_failures_while_down(self) -> None:
        """
        Failures of a node that is already out change nothing but its count;
        successes of one that is in change nothing but theirs.
        """
        take_out(self.pool, self.a)
        self.pool.mark(self.a, False, "x")
        self.assertEqual(self.a.failures, 4)
        self.pool.mark(self.b, True, "x")
        self.pool.mark(self.b, True, "x")
        self.pool.mark(self.b, True, "x")
        self.assertEqual(self.b.successes, 3)
        self.assertEqual(self.changes, [("a", False)])

    def test_rise_fall_of_one(self) -> None:
        """
        With rise and fall of 1, every check can move a node.
        """
        pool = Pool(specs("a"), rise=1, fall=1)
        (a,) = pool.nodes
        pool.mark(a, False, "x")
        self.assertFalse(a.healthy)
        pool.mark(a, True, "x")
        self.assertTrue(a.healthy)

    def test_set_thresholds(self) -> None:
        """
        New thresholds apply to the next check.
        """
        self.pool.set_thresholds(rise=1, fall=1)
        self.pool.mark(self.a, False, "x")
        self.assertFalse(self.a.healthy)
        self.pool.mark(self.a, True, "x")
        self.assertTrue(self.a.healthy)

    def test_transitions_logged(self) -> None:
        """
        Each transition is logged once with the node, the reason and the
        count; checks that change nothing log nothing.
        """
        logs = LogCapture.install(self)
        for _ in range(5):
            self.pool.mark(self.a, False, "connection refused")
        for _ in range(4):
            self.pool.mark(self.a, True, "HTTP 204")
        down = [m for m in logs.messages() if "is down" in m]
        up = [m for m in logs.messages() if "is up" in m]
        self.assertEqual(len(down), 1)
        self.assertEqual(len(up), 1)
        self.assertIn("http://a", down[0])
        self.assertIn("connection refused", down[0])
        self.assertIn("3", down[0])
        self.assertIn("http://a", up[0])
        self.assertIn("HTTP 204", up[0])
        self.assertIn("2", up[0])

    def test_when_and_latency(self) -> None:
        """
        A check's time and latency are kept on the node.
        """
        clock = task.Clock()
        clock.advance(100)
        self.pool.mark(self.a, True, "x", when=clock.seconds(), latency=0.25)
        self.assertEqual((self.a.last_check, self.a.last_latency), (100, 0.25))

    def test_clock_driven_checks(self) -> None:
        """
        Checks arriving on a timer (as the health checker's do) take a node
        out after C{fall} intervals of failure and back after C{rise}
        intervals of success.
        """
        clock = task.Clock()
        outcomes = [False] * 3 + [True] * 2

        def check() -> None:
            self.pool.mark(self.a, outcomes.pop(0), "scripted", when=clock.seconds())

        loop = task.LoopingCall(check)
        loop.clock = clock
        loop.start(5, now=True)
        self.addCleanup(loop.stop)
        self.assertTrue(self.a.healthy)
        clock.advance(5)
        self.assertTrue(self.a.healthy)
        clock.advance(5)
        self.assertFalse(self.a.healthy)
        self.assertEqual(self.a.last_check, 10)
        clock.advance(5)
        self.assertFalse(self.a.healthy)
        clock.advance(5)
        self.assertTrue(self.a.healthy)
        self.assertEqual(self.a.last_check, 20)

    def test_drain(self) -> None:
        """
        A drained node leaves the rotation whatever its health, and comes
        back when enabled.
        """
        self.pool.set_drained(self.a, True)
        self.assertEqual(self.a.state, DRAINING)
        self.assertEqual(picks(self.pool, 3), "bbb")
        self.pool.set_drained(self.a, False)
        self.assertEqual(picks(self.pool, 2), "ab")


class MembershipTests(unittest.TestCase):
    """
    The node set changes while running: nodes that stay keep their state.
    """

    def test_add_node(self) -> None:
        """
        A new node starts healthy and takes its turn in configured order;
        the rotation carries on where it was.
        """
        pool = Pool(specs("a", "b", "c"))
        self.assertEqual(picks(pool, 2), "ab")
        added, removed = pool.update(specs("a", "b", "c", "d"))
        self.assertEqual([n.host for n in added], ["d"])
        self.assertEqual(removed, [])
        self.assertTrue(added[0].healthy)
        self.assertEqual(picks(pool, 6), "cdabcd")

    def test_remove_node(self) -> None:
        """
        A removed node leaves the rotation at once and is marked removed
        (its in-flight requests may finish); the others carry on in order.
        """
        pool = Pool(specs("a", "b", "c"))
        self.assertEqual(picks(pool, 1), "a")
        b = pool.nodes[1]
        added, removed = pool.update(specs("a", "c"))
        self.assertEqual((added, removed), ([], [b]))
        self.assertTrue(b.removed)
        self.assertFalse(b.in_rotation)
        self.assertEqual(b.state, DRAINING)
        self.assertIsNone(pool.get("http://b"))
        self.assertEqual(picks(pool, 4), "caca")

    def test_stayers_keep_state(self) -> None:
        """
        Nodes that stay are the same objects with the same health state and
        counters; a node that was down stays down.
        """
        pool = Pool(specs("a", "b", "c"), rise=2, fall=1)
        a, b, c = pool.nodes
        pool.mark(b, False, "refused")
        pool.mark(b, True, "HTTP 200")
        a.requests = 7
        pool.update(specs("c", "b", "a", "d"))
        self.assertIs(pool.get("http://a"), a)
        self.assertIs(pool.get("http://b"), b)
        self.assertEqual(a.requests, 7)
        self.assertFalse(b.healthy)
        self.assertEqual(b.successes, 1)
        pool.mark(b, True, "HTTP 200")
        self.assertTrue(b.healthy)

    def test_new_order(self) -> None:
        """
        After an update the cycle follows the new configured order.
        """
        pool = Pool(specs("a", "b", "c"))
        pool.update(specs("c", "b", "a"))
        self.assertEqual(picks(pool, 6), "cbacba")

    def test_weight_change(self) -> None:
        """
        A node that stays takes its new weight.
        """
        pool = Pool(specs("a", "b", "c"))
        pool.update(specs("a", "b", "c", weights=[5, 1, 1]))
        got = picks(pool, 70)
        self.assertEqual([got.count(x) for x in "abc"], [50, 10, 10])

    def test_remove_all_and_readd(self) -> None:
        """
        An empty node set picks nothing; a URL added back later is a fresh,
        healthy node.
        """
        pool = Pool(specs("a"), fall=1)
        (a,) = pool.nodes
        pool.mark(a, False, "x")
        pool.update([])
        self.assertIsNone(pool.pick())
        pool.update(specs("a"))
        (again,) = pool.nodes
        self.assertIsNot(again, a)
        self.assertTrue(again.healthy)
        self.assertEqual(picks(pool, 2), "aa")

    def test_update_keeps_down_node_out(self) -> None:
        """
        Adding a node does not put a node that is down back in rotation.
        """
        pool = Pool(specs("a", "b"), fall=1)
        pool.mark(pool.nodes[0], False, "x")
        pool.update(specs("a", "b", "c"))
        self.assertEqual(picks(pool, 4), "bcbc")

    def test_pick_other(self) -> None:
        """
        L{Pool.pick_other} skips nodes already tried, and gives L{None} when
        every node in rotation was tried.
        """
        pool = Pool(specs("a", "b", "c"))
        a, b, c = pool.nodes
        self.assertIs(pool.pick_other([a]), b)
        self.assertIs(pool.pick_other([a, b]), c)
        self.assertIsNone(pool.pick_other([a, b, c]))


def limited(*names: str, limits: Sequence[Optional[int]], default: int = 0) -> Pool:
    """
    A pool of nodes named by one letter with their own C{max_connections}
    (L{None}: the pool's C{default}).
    """
    return Pool(
        [
            NodeSpec(**{**spec.__dict__, "max_connections": limit})
            for spec, limit in zip(specs(*names), limits)
        ],
        max_conns_per_node=default,
    )


class LimitTests(unittest.TestCase):
    """
    Per-node connection limits: the rotation skips a full node.
    """

    def test_skips_full_node(self) -> None:
        """
        A node with as many requests in flight as its limit is skipped; the
        next node with room takes its turn, and the cycle goes on from there.
        """
        pool = limited("a", "b", "c", limits=[1, 1, 1])
        a, b, c = pool.nodes
        a.in_flight = 1
        self.assertEqual(picks(pool, 1), "b")
        b.in_flight = 1
        self.assertEqual(picks(pool, 1), "c")
        a.in_flight = 0
        self.assertEqual(picks(pool, 3), "aca")

    def test_all_full(self) -> None:
        """
        When every node in rotation is full, C{pick} gives L{None} but the
        pool is still L{Pool.serving}; when no node is in rotation it is not.
        """
        pool = limited("a", "b", limits=[2, 1])
        a, b = pool.nodes
        a.in_flight, b.in_flight = 2, 1
        self.assertIsNone(pool.pick())
        self.assertTrue(pool.serving)
        b.in_flight = 0
        self.assertEqual(picks(pool, 1), "b")
        take_out(pool, a)
        take_out(pool, b)
        self.assertFalse(pool.serving)

    def test_default_and_own_limit(self) -> None:
        """
        C{max_conns_per_node} is the limit of nodes without their own;
        a node's own C{max_connections} wins, and 0 there means no limit.
        """
        pool = limited("a", "b", "c", limits=[None, 5, 0], default=2)
        self.assertEqual([n.limit for n in pool.nodes], [2, 5, 0])
        a, b, c = pool.nodes
        c.in_flight = 1000
        self.assertEqual(picks(pool, 3), "abc")

    def test_no_limit_by_default(self) -> None:
        """
        Without limits, in-flight counts never keep a node from its turn.
        """
        pool = Pool(specs("a", "b"))
        for node in pool.nodes:
            node.in_flight = 10**6
        self.assertEqual(picks(pool, 4), "abab")

    def test_limits_follow_update(self) -> None:
        """
        An update (a reload) applies a changed default limit to every node
        that keeps its state.
        """
        pool = Pool(specs("a", "b"))
        a, b = pool.nodes
        a.in_flight = 3
        pool.max_conns_per_node = 3
        pool.update(specs("a", "b"))
        self.assertEqual(pool.nodes, [a, b])
        self.assertEqual(picks(pool, 2), "bb")
        pool.max_conns_per_node = 0
        pool.update(specs("a", "b"))
        self.assertEqual(picks(pool, 2), "ab")

    def test_weighted_skip(self) -> None:
        """
        With weights, a full heavy node's turns go to the others.
        """
        pool = Pool(
            [
                NodeSpec(**{**spec.__dict__, "max_connections": 1})
                for spec in specs("a", "b", weights=[3, 1])
            ]
        )
        a, b = pool.nodes
        a.in_flight = 1
        self.assertEqual(picks(pool, 3), "bbb")

    def test_pick_other_skips_full(self) -> None:
        """
        A retry never goes to a full node: L{Pool.pick_other} gives the next
        untried node with room, or L{None}.
        """
        pool = limited("a", "b", "c", limits=[1, 1, 1])
        a, b, c = pool.nodes
        b.in_flight = 1
        self.assertIs(pool.pick_other([a]), c)
        c.in_flight = 1
        self.assertIsNone(pool.pick_other([a]))


class PoolLogTests(unittest.TestCase):
    """
    Health log lines say which pool a node is in, when it is a named one.
    """

    def test_named_pool_in_log_lines(self) -> None:
        """
        The default pool's lines are as before; a named pool's start with
        its name (one URL may be a node of several pools).
        """
        logs = LogCapture.install(self)
        default = Pool(specs("a"), rise=1, fall=1)
        api = Pool(specs("a"), rise=1, fall=1, name="api")
        for pool in (default, api):
            pool.mark(pool.nodes[0], False, "refused")
            pool.mark(pool.nodes[0], True)
            pool.set_drained(pool.nodes[0], True)
        messages = logs.messages()
        down = [m for m in messages if "is down" in m]
        self.assertEqual(len(down), 2)
        self.assertTrue(down[0].startswith("node http://a"), down[0])
        self.assertTrue(down[1].startswith("pool api: node http://a"), down[1])
        self.assertEqual(len([m for m in messages if m.startswith("pool api: ")]), 3)
