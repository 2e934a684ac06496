"""
Tests for L{rrlb.history} (the status page's per-node ring buffers, driven
by a L{task.Clock}) and the inline SVG charts drawn from them.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.trial import unittest

from rrlb.history import HISTORY_SAMPLES, History, quantile
from rrlb.metrics import LATENCY_BUCKETS, Metrics
from rrlb.pool import Pool, Pools
from rrlb.statuspage import chart, render_page
from tests.support import specs


def histogram(**at: float) -> list[float]:
    """
    Bucket counts (not cumulative) with C{at["b<i>"]} in bucket i, and the
    trailing sum.
    """
    counts = [0.0] * (len(LATENCY_BUCKETS) + 2)
    for name, count in at.items():
        counts[int(name[1:])] = count
    return counts


class QuantileTests(unittest.TestCase):
    """
    p99 from histogram bucket counts.
    """

    def test_interpolated(self) -> None:
        """
        All in the first bucket (up to 1 ms): p99 is 0.99 ms; one slow
        response among many does not move p99 out of the fast bucket, two
        in a hundred do.
        """
        self.assertAlmostEqual(quantile(histogram(b0=100)[:-1]) or 0, 0.00099)
        fast_and_one_slow = histogram(b0=99, b10=1)[:-1]
        self.assertLessEqual(quantile(fast_and_one_slow) or 0, LATENCY_BUCKETS[0])
        slow = quantile(histogram(b0=98, b10=2)[:-1]) or 0
        self.assertGreater(slow, LATENCY_BUCKETS[9])
        self.assertLessEqual(slow, LATENCY_BUCKETS[10])
        self.assertIsNone(quantile(histogram()[:-1]))


class HistoryTests(unittest.TestCase):
    """
    One sample per node per second, off the request path.
    """

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.pool = Pool(specs("a", "b"))
        self.pools = Pools([self.pool])
        self.metrics = Metrics(self.pools, self.clock)
        self.history = History(self.pools, self.metrics, self.clock)
        self.history.startService()
        self.addCleanup(self.history.stopService)

    def test_rate_and_p99(self) -> None:
        """
        Each second adds the requests of that second and the p99 of the
        responses of that second.
        """
        a, b = self.pool.nodes
        a.requests = 5
        self.metrics.latency[a.label] = histogram(b0=5)
        self.clock.advance(1)
        a.requests = 15
        self.metrics.latency[a.label] = histogram(b0=5, b8=10)
        self.clock.advance(1)
        hist = self.history.get(a.label)
        assert hist is not None
        # The first sample at start-up (now=True) has no rate yet.
        self.assertEqual(list(hist.rps), [0.0, 5.0, 10.0])
        self.assertIsNone(hist.p99[0])
        p99 = list(hist.p99)[1:]
        assert p99[0] is not None and p99[1] is not None
        self.assertLessEqual(p99[0], LATENCY_BUCKETS[0])
        self.assertGreater(p99[1], LATENCY_BUCKETS[7])
        b_hist = self.history.get(b.label)
        assert b_hist is not None
        self.assertEqual(list(b_hist.p99), [None, None, None])

    def test_ring_buffer(self) -> None:
        """
        Five minutes of samples are kept, no more.
        """
        a = self.pool.nodes[0]
        for _ in range(HISTORY_SAMPLES + 50):
            a.requests += 2
            self.clock.advance(1)
        hist = self.history.get(a.label)
        assert hist is not None
        self.assertEqual(len(hist.rps), HISTORY_SAMPLES)
        self.assertEqual(set(hist.rps), {2.0})

    def test_removed_node_forgotten(self) -> None:
        """
        A node no longer configured loses its history.
        """
        self.clock.advance(1)
        label = self.pool.nodes[1].label
        self.assertIsNotNone(self.history.get(label))
        self.pool.update(specs("a"))
        self.clock.advance(1)
        self.assertIsNone(self.history.get(label))

    def test_sample_error_keeps_timer(self) -> None:
        """
        A failing sample is logged and the timer keeps running.
        """
        self.history.pools = None  # type: ignore[assignment]
        self.clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        self.history.pools = self.pools
        self.clock.advance(1)
        self.assertTrue(self.history._loop.running)


class ChartTests(unittest.TestCase):
    """
    The SVG drawn from a series.
    """

    def test_line_and_gaps(self) -> None:
        """
        Values become one path, right-aligned on the five-minute axis; a
        None breaks the line; the latest and highest values are in words.
        """
        svg = chart([1.0, 2.0, None, 4.0], "rps", "req/s", "", 1.0)
        self.assertIn('data-samples="4"', svg)
        self.assertIn(f'd="M{HISTORY_SAMPLES - 4} ', svg)
        self.assertEqual(svg.count("M"), 2)
        self.assertIn("now 4.00", svg)
        self.assertIn("highest 4.00", svg)
        self.assertNotIn("<script", svg)

    def test_page_groups_by_pool(self) -> None:
        """
        The page has one section per pool, each node's row with its charts.
        """
        clock = task.Clock()
        one = Pool(specs("a"), name="one")
        two = Pool(specs("b", "c"), name="two")
        pools = Pools([one, two])
        metrics = Metrics(pools, clock)
        history = History(pools, metrics, clock)
        history.sample()
        page = render_page(metrics.status(), history)
        self.assertEqual(page.count('<section class="pool"'), 2)
        self.assertIn('data-pool="two"', page)
        self.assertEqual(page.count('<figure class="chart rps"'), 3)
        self.assertEqual(page.count('<figure class="chart p99"'), 3)
        self.assertIn('action="/nodes/two/1/drain"', page)
