"""
The pure arithmetic of rate limits (rrlb.ratelimit): the YAML forms, keys,
the token bucket on a task.Clock, and the bounded key tables.
"""

from __future__ import annotations

import resource
from typing import Optional

from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from rrlb.ratelimit import (
    Bucket,
    InFlightSpec,
    InFlightTable,
    KeySpec,
    KeyTable,
    Rate,
    RateLimitSpec,
    RateTable,
    parse_in_flight,
    parse_rate_limit,
    request_key,
)
from rrlb.values import ConfigError


class _Peer:
    def __init__(self, host: str) -> None:
        self.host = host


class _Request:
    def __init__(self, headers: dict[bytes, list[bytes]], peer: str = "10.0.0.1") -> None:
        self.requestHeaders = Headers(headers)
        self.client = _Peer(peer)
        self.real_client: Optional[bytes] = None


class ParseTests(unittest.TestCase):
    """
    The YAML forms of rate_limit and limit_in_flight.
    """

    def test_full_form(self) -> None:
        """
        Every key of rate_limit is read as the issue writes it.
        """
        spec = parse_rate_limit(
            "routes[0].filters[0].rate_limit",
            {
                "rate": "100/s",
                "burst": 200,
                "key": "header:x-api-key",
                "store": "redis://127.0.0.1:6379/0",
                "max_keys": 5,
                "on_store_error": "deny",
            },
        )
        self.assertEqual(
            spec,
            RateLimitSpec(
                Rate(100, 1),
                200,
                KeySpec("header", b"X-Api-Key"),
                "redis://127.0.0.1:6379/0",
                5,
                "deny",
            ),
        )

    def test_defaults(self) -> None:
        """
        burst defaults to the per-second figure rounded up, at least 1; key
        to source, store to local, max_keys to 100,000, on_store_error to
        allow.
        """
        self.assertEqual(parse_rate_limit("x", {"rate": "100/s"}).burst, 100)
        self.assertEqual(parse_rate_limit("x", {"rate": "90/m"}).burst, 2)
        self.assertEqual(parse_rate_limit("x", {"rate": "1/m"}).burst, 1)
        spec = parse_rate_limit("x", {"rate": "5/s"})
        self.assertEqual(
            (spec.key, spec.store, spec.max_keys, spec.on_store_error),
            (KeySpec("source"), "local", 100_000, "allow"),
        )

    def test_bad_values(self) -> None:
        """
        Each bad value is one ConfigError naming the filter and the key.
        """
        for value, words in [
            ({"rate": "100/h"}, "x.rate"),
            ({"rate": "0/s"}, "x.rate"),
            ({"rate": 100}, "x.rate"),
            ({}, "needs a rate"),
            ({"rate": "1/s", "burst": 0}, "x.burst"),
            ({"rate": "1/s", "burst": True}, "x.burst"),
            ({"rate": "1/s", "key": "ip"}, "x.key"),
            ({"rate": "1/s", "key": "header:"}, "x.key"),
            ({"rate": "1/s", "key": "header:a b"}, "x.key"),
            ({"rate": "1/s", "store": "memcached://x"}, "x.store"),
            ({"rate": "1/s", "on_store_error": "maybe"}, "x.on_store_error"),
            ({"rate": "1/s", "max_keys": -1}, "x.max_keys"),
            ({"rate": "1/s", "speed": 1}, "unknown key 'speed'"),
        ]:
            e = self.assertRaises(ConfigError, parse_rate_limit, "x", value)
            self.assertIn(words, str(e))
        self.assertRaises(ConfigError, parse_rate_limit, "x", "100/s")

    def test_in_flight(self) -> None:
        """
        limit_in_flight takes max and the same key kinds.
        """
        self.assertEqual(
            parse_in_flight("f", {"max": 10, "key": "cookie:sid"}),
            InFlightSpec(10, KeySpec("cookie", b"sid")),
        )
        self.assertIn("f needs max", str(self.assertRaises(ConfigError, parse_in_flight, "f", {})))
        self.assertRaises(ConfigError, parse_in_flight, "f", {"max": 0})


class KeyTests(unittest.TestCase):
    """
    A request's key of each kind.
    """

    def test_source(self) -> None:
        """
        source is the client's address as the filter request has it (the
        real one behind trusted proxies).
        """
        request = _Request({})
        self.assertEqual(request_key(KeySpec("source"), request, "192.0.2.7"), "192.0.2.7")

    def test_header_and_cookie(self) -> None:
        """
        header:NAME is the header's first value and cookie:NAME the cookie's;
        a request without it has no key.
        """
        request = _Request({b"X-Key": [b"a", b"b"], b"Cookie": [b"x=1; sid=abc ;y=2"]})
        self.assertEqual(request_key(KeySpec("header", b"X-Key"), request), b"a")
        self.assertEqual(request_key(KeySpec("cookie", b"sid"), request), b"abc")
        self.assertIsNone(request_key(KeySpec("header", b"X-Other"), request))
        self.assertIsNone(request_key(KeySpec("cookie", b"none"), request))
        self.assertIsNone(request_key(KeySpec("cookie", b"sid"), _Request({})))

    def test_route(self) -> None:
        """
        route is one key for every request.
        """
        self.assertEqual(request_key(KeySpec("route"), _Request({})), b"")

    def test_hostile_values_bounded(self) -> None:
        """
        A huge or binary key is kept as a short digest, distinct per value.
        """
        big = b"\xff" * 30000
        one = request_key(KeySpec("header", b"X-Key"), _Request({b"X-Key": [big]}))
        two = request_key(KeySpec("header", b"X-Key"), _Request({b"X-Key": [big + b"!"]}))
        assert one is not None and two is not None
        self.assertLessEqual(len(one), 18)
        self.assertNotEqual(one, two)


class BucketTests(unittest.TestCase):
    """
    Exact token-bucket arithmetic on a task.Clock.
    """

    def test_burst_then_one_per_token(self) -> None:
        """
        burst requests at once, then one more each time a token is due.
        """
        clock = Clock()
        clock.advance(1000)
        table = RateTable(RateLimitSpec(Rate(10, 1), 5))
        self.assertEqual([table.take(b"k", clock.seconds()) for _ in range(6)], [0] * 5 + [1])
        for _ in range(20):
            # 0.1 s is exactly one token, however the float sums up.
            clock.advance(0.05)
            self.assertEqual(table.take(b"k", clock.seconds()), 1)
            clock.advance(0.05)
            self.assertEqual(table.take(b"k", clock.seconds()), 0)
            self.assertEqual(table.take(b"k", clock.seconds()), 1)

    def test_refills_to_burst_only(self) -> None:
        """
        A long quiet time gives back burst tokens, never more.
        """
        clock = Clock()
        table = RateTable(RateLimitSpec(Rate(2, 1), 3))
        clock.advance(3600)
        results = [table.take(b"k", clock.seconds()) for _ in range(4)]
        self.assertEqual(results, [0, 0, 0, 1])

    def test_per_minute_and_retry_after(self) -> None:
        """
        Retry-After is the whole seconds until a token is free, rounded up,
        at least 1.
        """
        clock = Clock()
        table = RateTable(RateLimitSpec(Rate(1, 60), 1))
        self.assertEqual(table.take(b"k", clock.seconds()), 0)
        self.assertEqual(table.take(b"k", clock.seconds()), 60)
        clock.advance(59.5)
        self.assertEqual(table.take(b"k", clock.seconds()), 1)
        clock.advance(0.5)
        self.assertEqual(table.take(b"k", clock.seconds()), 0)

    def test_uneven_rate_exact(self) -> None:
        """
        3/s: the third of a second is exact, not rounded into a lost token.
        """
        bucket = Bucket(Rate(3, 1), 1)
        now = bucket.now(0)
        full_at, wait = bucket.take(now, now)
        self.assertEqual(wait, 0)
        # 1/3 s later (in the bucket's units, exactly): the next token.
        later = now + bucket.second // 3
        self.assertEqual(bucket.take(full_at, later - 1)[1], 1)
        self.assertEqual(bucket.take(full_at, later)[1], 0)

    def test_keys_apart(self) -> None:
        """
        Each key has its own bucket.
        """
        table = RateTable(RateLimitSpec(Rate(1, 1), 1))
        self.assertEqual(table.take(b"a", 0), 0)
        self.assertEqual(table.take(b"b", 0), 0)
        self.assertEqual(table.take(b"a", 0), 1)


class KeyTableTests(unittest.TestCase):
    """
    The bounded key table.
    """

    def test_least_recently_used_dropped(self) -> None:
        """
        Past max_keys, the key used longest ago goes.
        """
        table = KeyTable(2)
        table.put(b"a", 1)
        table.put(b"b", 2)
        self.assertEqual(table.get(b"a", 0), 1)
        table.put(b"c", 3)
        self.assertEqual(sorted(table.entries), [b"a", b"c"])
        self.assertEqual(table.dropped, 1)

    def test_flood_bounded(self) -> None:
        """
        1,000,000 distinct keys leave max_keys in the table, and the
        process's memory grows by a bounded amount (ru_maxrss, printed).
        """
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        table = RateTable(RateLimitSpec(Rate(1, 1), 1, max_keys=100_000))
        for i in range(1_000_000):
            table.take(b"%d.%d.%d.%d" % (10, i >> 16, (i >> 8) & 255, i & 255), 0)
        self.assertEqual(len(table.keys), 100_000)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"key flood: max RSS {before // 1024} MiB -> {after // 1024} MiB")
        # 100,000 short keys with their ints and links: well under 64 MiB.
        self.assertLess(after - before, 64 * 1024)


class InFlightTableTests(unittest.TestCase):
    """
    In-flight counts by key.
    """

    def test_max_then_release(self) -> None:
        """
        max requests of a key at once; a release makes room; a key with
        none in flight is forgotten.
        """
        table = InFlightTable(InFlightSpec(2))
        self.assertEqual([table.acquire(b"k") for _ in range(3)], [True, True, False])
        self.assertTrue(table.acquire(b"other"))
        table.release(b"k")
        self.assertTrue(table.acquire(b"k"))
        table.release(b"k")
        table.release(b"k")
        table.release(b"other")
        self.assertEqual(len(table), 0)
