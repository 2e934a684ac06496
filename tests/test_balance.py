"""
Tests for L{rrlb.balance} through L{rrlb.pool.Pool.pick}: least connections,
power of two choices, consistent hashing with bounded loads, the sticky
cookie and slow start. No sockets: requests are small stand-ins with the
attributes the policies read, time is a L{task.Clock} and randomness a
seeded L{random.Random}.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import task
from twisted.trial import unittest

from rrlb.balance import (
    HASH_LOAD_FACTOR,
    cookie_value,
    hash64,
    key_function,
    make_policy,
    sticky_id,
)
from rrlb.pool import Node, Pool
from tests.support import FakeRequest, bring_back, name, specs, take_out


class NearTestCase(unittest.TestCase):
    def assertNear(self, value: float, expected: float, delta: float) -> None:
        self.assertTrue(abs(value - expected) <= delta, f"{value} not within {delta} of {expected}")


def pool_with(*names: str, weights: Any = None, clock: Any = None, **settings: Any) -> Pool:
    pool = Pool(specs(*names, weights=weights), clock=clock or task.Clock())
    pool.configure(**settings)
    return pool


class LeastConnTests(unittest.TestCase):
    """
    balance: leastconn.
    """

    def test_round_robin_among_ties(self) -> None:
        """
        With nothing in flight (every request ends before the next) the
        picks go round in configured order.
        """
        pool = pool_with("a", "b", "c", balance="leastconn")
        self.assertEqual("".join(name(pool.pick()) for _ in range(7)), "abcabca")

    def test_exact_sequence_with_load(self) -> None:
        """
        Requests that stay in flight: each pick goes to the node with the
        fewest, ties in turn; a node whose requests end gets the next ones.
        """
        pool = pool_with("a", "b", "c", balance="leastconn")
        seq = []
        for _ in range(6):
            node = pool.pick()
            assert node is not None
            node.in_flight += 1
            seq.append(name(node))
        self.assertEqual("".join(seq), "abcabc")
        a, b, c = pool.nodes
        a.in_flight = 0
        seq = []
        for _ in range(3):
            node = pool.pick()
            assert node is not None
            node.in_flight += 1
            seq.append(name(node))
        # a has 0 then 1 then 2 (b and c have 2): a, a, then the tie a/b/c
        # goes to the first after a.
        self.assertEqual("".join(seq), "aab")

    def test_relative_to_weight(self) -> None:
        """
        In flight counts relative to weight: a node of weight 2 takes two
        requests for every one a weight-1 node takes.
        """
        pool = pool_with("a", "b", weights=[2, 1], balance="leastconn")
        seq = []
        for _ in range(6):
            node = pool.pick()
            assert node is not None
            node.in_flight += 1
            seq.append(name(node))
        self.assertEqual(sorted(seq).count("a"), 4)
        self.assertEqual(seq[:3], ["a", "b", "a"])

    def test_skips_full_and_down(self) -> None:
        """
        A node at its limit or out of rotation is never picked.
        """
        pool = pool_with("a", "b", "c", balance="leastconn")
        a, b, c = pool.nodes
        a.limit = 1
        pool._limited = True
        a.in_flight = 1
        take_out(pool, b)
        self.assertEqual({name(pool.pick()) for _ in range(5)}, {"c"})
        c.limit = 1
        c.in_flight = 1
        self.assertIsNone(pool.pick())


class PowerOfTwoTests(unittest.TestCase):
    """
    balance: p2c.
    """

    def test_slow_node_loses_share(self) -> None:
        """
        A node that answers 50 times slower than the others gets less than
        its 1/N share within a few hundred picks, long before any health
        check would notice.
        """
        clock = task.Clock()
        pool = pool_with("a", "b", "c", clock=clock, balance="p2c", rng=random.Random(7))
        latency = {"a": 0.01, "b": 0.01, "c": 0.5}
        picks = []
        for _ in range(300):
            node = pool.pick()
            assert node is not None
            picks.append(name(node))
            clock.advance(0.01)
            pool.observe(node, latency[name(node)])
        last = picks[-200:]
        self.assertLess(last.count("c") / len(last), 1 / 3)
        self.assertLess(last.count("c"), 20)

    def test_in_flight_counts(self) -> None:
        """
        With equal response times, the node with more in flight loses.
        """
        pool = pool_with("a", "b", balance="p2c", rng=random.Random(1))
        a, b = pool.nodes
        for node in (a, b):
            pool.observe(node, 0.01)
        a.in_flight = 5
        self.assertEqual({name(pool.pick()) for _ in range(10)}, {"b"})

    def test_new_node_not_flooded(self) -> None:
        """
        A node with no response time yet gets one request, then waits for
        its answer while the nodes with known times take the rest.
        """
        pool = pool_with("a", "b", "c", balance="p2c", rng=random.Random(4))
        a, b, c = pool.nodes
        pool.observe(a, 0.01)
        pool.observe(b, 0.01)
        got = []
        for _ in range(30):
            node = pool.pick()
            assert node is not None
            node.in_flight += 1
            got.append(name(node))
        self.assertEqual(got.count("c"), 1)

    def test_deterministic_with_seed(self) -> None:
        """
        The same seed gives the same picks.
        """
        runs = []
        for _ in range(2):
            pool = pool_with("a", "b", "c", "d", balance="p2c", rng=random.Random(3))
            seq = []
            for _ in range(20):
                node = pool.pick()
                assert node is not None
                node.in_flight += 1
                seq.append(name(node))
            runs.append(seq)
        self.assertEqual(runs[0], runs[1])

    def test_one_node_and_none(self) -> None:
        """
        One node in rotation is always picked; none gives L{None}.
        """
        pool = pool_with("a", "b", balance="p2c", rng=random.Random(1))
        take_out(pool, pool.nodes[1])
        self.assertEqual(name(pool.pick()), "a")
        take_out(pool, pool.nodes[0])
        self.assertIsNone(pool.pick())


def hash_pool(count: int = 5, **settings: Any) -> Pool:
    names = [f"n{i}" for i in range(count)]
    return pool_with(*names, balance="hash", hash_key="header:X-Key", **settings)


def keyed(key: bytes) -> FakeRequest:
    return FakeRequest(headers={b"X-Key": [key]})


class HashTests(NearTestCase):
    """
    balance: hash (consistent hashing with bounded loads).
    """

    def test_stable(self) -> None:
        """
        The same key goes to the same node, pick after pick and in a new
        pool built from the same nodes.
        """
        keys = [b"user-%d" % i for i in range(200)]
        first = hash_pool()
        second = hash_pool()
        for key in keys:
            node = first.pick(keyed(key))
            self.assertEqual(name(node), name(first.pick(keyed(key))))
            self.assertEqual(name(node), name(second.pick(keyed(key))))

    def test_spread(self) -> None:
        """
        Many keys spread over every node.
        """
        pool = hash_pool()
        rng = random.Random(5)
        seen = {name(pool.pick(keyed(b"%x" % rng.getrandbits(64)))) for _ in range(1000)}
        self.assertEqual(len(seen), 5)

    def test_bounded_loads(self) -> None:
        """
        10,000 random keys held in flight at once: no node ends up with more
        than 1.25 times the mean.
        """
        pool = hash_pool()
        rng = random.Random(11)
        for _ in range(10_000):
            node = pool.pick(keyed(b"%x" % rng.getrandbits(64)))
            assert node is not None
            node.in_flight += 1
        loads = [n.in_flight for n in pool.nodes]
        self.assertEqual(sum(loads), 10_000)
        mean = 10_000 / len(loads)
        self.assertLessEqual(max(loads), HASH_LOAD_FACTOR * mean)

    def test_node_leaving_moves_only_its_keys(self) -> None:
        """
        When one of N nodes leaves, only the keys it had move (about 1/N of
        them), and the others stay where they were.
        """
        pool = hash_pool(count=5)
        rng = random.Random(2)
        keys = [b"%x" % rng.getrandbits(64) for _ in range(10_000)]
        before = {key: name(pool.pick(keyed(key))) for key in keys}
        take_out(pool, pool.nodes[2])
        after = {key: name(pool.pick(keyed(key))) for key in keys}
        moved = [k for k in keys if before[k] != after[k]]
        self.assertTrue(all(before[k] == "n2" for k in moved))
        self.assertEqual(len(moved), sum(1 for k in keys if before[k] == "n2"))
        self.assertNear(len(moved) / len(keys), 1 / 5, 0.07)
        # It comes back: its keys return to it.
        bring_back(pool, pool.nodes[2])
        self.assertEqual({key: name(pool.pick(keyed(key))) for key in keys}, before)

    def test_no_key_round_robin(self) -> None:
        """
        A request without the key goes round robin.
        """
        pool = hash_pool(count=3)
        self.assertEqual([name(pool.pick(FakeRequest())) for _ in range(3)], ["n0", "n1", "n2"])

    def test_key_kinds(self) -> None:
        """
        source (the client behind trusted proxies if known), uri (without the
        query), header:NAME and cookie:NAME read what they say.
        """
        request = FakeRequest(
            uri=b"/a/b?x=1",
            headers={b"X-Tenant": [b"t1"], b"Cookie": [b"a=1; session=s9; b=2"]},
            ip=b"10.0.0.9",
        )
        self.assertEqual(key_function("source")(request), b"10.0.0.9")
        request.real_client = "192.0.2.1"
        self.assertEqual(key_function("source")(request), b"192.0.2.1")
        self.assertEqual(key_function("uri")(request), b"/a/b")
        self.assertEqual(key_function("header:x-tenant")(request), b"t1")
        self.assertEqual(key_function("cookie:session")(request), b"s9")
        self.assertIsNone(key_function("cookie:none")(request))
        self.assertIsNone(key_function("header:X-None")(request))

    def test_hash_stable_value(self) -> None:
        """
        The hash is the same in every process (not Python's salted hash()).
        """
        self.assertEqual(hash64(b"abc"), 0xD8BB14D833D59559)

    def test_make_policy_unknown(self) -> None:
        """
        An unknown policy name is refused (config checks it first).
        """
        self.assertRaises(ValueError, make_policy, "random")
        self.assertIsNone(make_policy("roundrobin"))


class StickyTests(unittest.TestCase):
    """
    sticky: {cookie: NAME}.
    """

    def test_cookie_names_node(self) -> None:
        """
        A request whose cookie names a node in rotation goes to it whatever
        the policy would pick; the response does not set the cookie again.
        """
        pool = pool_with("a", "b", "c", sticky="lb")
        b = pool.nodes[1]
        request = FakeRequest(headers={b"Cookie": [b"x=1; lb=" + b.sticky_id]})
        self.assertEqual([name(pool.pick(request)) for _ in range(4)], ["b"] * 4)
        self.assertIsNone(pool.sticky_header(request, b))

    def test_first_request_gets_cookie(self) -> None:
        """
        A request without the cookie takes the policy's pick, and the
        response sets the cookie to that node's opaque id, HttpOnly, Path=/.
        """
        pool = pool_with("a", "b", sticky="lb")
        request = FakeRequest()
        node = pool.pick(request)
        assert node is not None
        header = pool.sticky_header(request, node)
        self.assertEqual(header, b"lb=" + node.sticky_id + b"; Path=/; HttpOnly")
        self.assertEqual(len(node.sticky_id), 12)
        int(node.sticky_id, 16)
        self.assertEqual(node.sticky_id, sticky_id("http://a").encode("ascii"))
        self.assertNotIn(node.url.encode(), header)

    def test_node_out_of_rotation(self) -> None:
        """
        A cookie naming a node out of rotation (down, drained or unknown)
        takes the policy's pick, and the cookie is set again.
        """
        pool = pool_with("a", "b", sticky="lb")
        a, b = pool.nodes
        request = FakeRequest(headers={b"Cookie": [b"lb=" + a.sticky_id]})
        pool.set_drained(a, True)
        self.assertEqual(name(pool.pick(request)), "b")
        self.assertEqual(
            pool.sticky_header(request, b), b"lb=" + b.sticky_id + b"; Path=/; HttpOnly"
        )
        stale = FakeRequest(headers={b"Cookie": [b"lb=0123456789ab"]})
        self.assertEqual(name(pool.pick(stale)), "b")

    def test_cookie_value(self) -> None:
        """
        Cookies are found among several headers and pairs.
        """
        request = FakeRequest(headers={b"Cookie": [b"a=1", b"lbx=2; lb=3"]})
        self.assertEqual(cookie_value(request, b"lb"), b"3")
        self.assertEqual(cookie_value(request, b"a"), b"1")
        self.assertIsNone(cookie_value(FakeRequest(), b"a"))


class SlowStartTests(NearTestCase):
    """
    slow_start: SECONDS.
    """

    def share(self, pool: Pool, node: Node, picks: int = 1000) -> float:
        got = sum(1 for _ in range(picks) if pool.pick() is node)
        return got / picks

    def test_ramp(self) -> None:
        """
        A node that comes back gets about 10% of its share at first, half
        way through the ramp about half, and all of it at the end.
        """
        clock = task.Clock()
        pool = pool_with("a", "b", clock=clock, slow_start=100)
        a, b = pool.nodes
        take_out(pool, b)
        bring_back(pool, b)
        # Weights 1 and 0.1: b gets 1/11 of the picks.
        self.assertNear(self.share(pool, b), 0.1 / 1.1, 0.02)
        clock.advance(50)
        self.assertNear(self.share(pool, b), 0.5 / 1.5, 0.02)
        clock.advance(50)
        self.assertNear(self.share(pool, b), 0.5, 0.01)
        self.assertIsNone(b.up_since)

    def test_enabled_and_added_ramp(self) -> None:
        """
        A node put back by the operator and one a reload adds ramp up too;
        the nodes present at start do not.
        """
        clock = task.Clock()
        pool = pool_with("a", "b", clock=clock, slow_start=10)
        self.assertEqual([n.up_since for n in pool.nodes], [None, None])
        pool.set_drained(pool.nodes[0], True)
        pool.set_drained(pool.nodes[0], False)
        self.assertEqual(pool.nodes[0].up_since, 0.0)
        pool.update(specs("a", "b", "c"))
        self.assertEqual(pool.nodes[2].up_since, 0.0)

    def test_with_leastconn(self) -> None:
        """
        Slow start also scales leastconn's weights.
        """
        clock = task.Clock()
        pool = pool_with("a", "b", clock=clock, slow_start=100, balance="leastconn")
        b = pool.nodes[1]
        take_out(pool, b)
        bring_back(pool, b)
        got = []
        for _ in range(22):
            node = pool.pick()
            assert node is not None
            node.in_flight += 1
            got.append(name(node))
        self.assertEqual(got.count("b"), 2)

    def test_reconfigure_keeps_policy_state(self) -> None:
        """
        Configuring the same policy again (a reload) keeps it; another one
        replaces it.
        """
        pool = pool_with("a", "b", balance="leastconn")
        policy = pool.policy
        pool.configure(balance="leastconn")
        self.assertIs(pool.policy, policy)
        pool.configure(balance="p2c")
        self.assertIsNot(pool.policy, policy)
        pool.configure()
        self.assertIsNone(pool.policy)
        self.assertEqual("".join(name(pool.pick()) for _ in range(4)), "abab")
