"""
The rate_limit and limit_in_flight filters (rrlb.limits), built from their
YAML entries through the filter registry: each key kind, 429 with
Retry-After, store errors, and the counts /metrics shows.
"""

from __future__ import annotations

import gc
import json
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from rrlb.filters import Answer, FilterContext, FilterRequest, build_filter, parse_filters
from rrlb.limits import LimitStores, stores_of
from rrlb.metrics import Metrics, exposition
from rrlb.pool import Pools
from rrlb.ratelimit import parse_in_flight, parse_rate_limit
from rrlb.redisstore import StoreError
from rrlb.values import ConfigError
from rrlb.workers.limitlink import LimitLink, MainLimits
from rrlb.workers.supervisor import MainChannel
from rrlb.workers.totals import Counters
from rrlb.workers.wire import QuietAMP
from tests.support import LOOPBACK, reactor, wait_for


class _Channel:
    edge = 0
    forwarded = (b"http", b"10.0.0.1")


class _Peer:
    def __init__(self, host: str) -> None:
        self.host = host


class _Raw:
    def __init__(self, peer: str = "10.0.0.1", headers: Optional[dict[bytes, list[bytes]]] = None):
        self.uri = b"/"
        self.method = b"GET"
        self.requestHeaders = Headers(headers or {})
        self.channel = _Channel()
        self.client = _Peer(peer)
        self.real_client: Optional[str] = None
        self.log_notes = None


def request(peer: str = "10.0.0.1", **headers: bytes) -> FilterRequest:
    raw = _Raw(peer, {name.replace("_", "-").encode(): [v] for name, v in headers.items()})
    return FilterRequest(raw)


def build(entry: dict[str, Any], context: FilterContext, where: str = "filters") -> Any:
    (spec,) = parse_filters(where, [entry])
    return build_filter(spec, context)


def statuses(filter: Any, make: Any, count: int) -> list[Any]:
    out = []
    for _ in range(count):
        result = filter.request(make())
        out.append(None if result is None else result.status)
    return out


class RateLimitTests(unittest.TestCase):
    """
    rate_limit on the local store, on a task.Clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.context = FilterContext(self.clock, where="routes[0].filters[0]", route=0)

    def test_burst_then_429(self) -> None:
        """
        burst requests go on; the next is answered 429 with Retry-After;
        a token later, one more goes on.
        """
        limit = build({"rate_limit": {"rate": "2/s", "burst": 3}}, self.context)
        self.assertEqual(statuses(limit, request, 4), [None, None, None, 429])
        answer = limit.request(request())
        self.assertIsInstance(answer, Answer)
        self.assertEqual(answer.headers, {"Retry-After": "1"})
        self.clock.advance(0.5)
        self.assertEqual(statuses(limit, request, 2), [None, 429])

    def test_source_key(self) -> None:
        """
        key: source counts each client apart; behind trusted proxies, the
        real client.
        """
        limit = build({"rate_limit": {"rate": "1/m", "burst": 1}}, self.context)
        self.assertEqual(statuses(limit, lambda: request("10.0.0.1"), 2), [None, 429])
        self.assertEqual(statuses(limit, lambda: request("10.0.0.2"), 1), [None])
        raw = _Raw("10.0.0.1")
        raw.real_client = "192.0.2.1"
        self.assertIsNone(limit.request(FilterRequest(raw)))

    def test_header_key(self) -> None:
        """
        key: header:NAME counts by the header's value; a request without it
        is not limited.
        """
        limit = build(
            {"rate_limit": {"rate": "1/m", "burst": 1, "key": "header:X-Api-Key"}}, self.context
        )
        self.assertEqual(statuses(limit, lambda: request(x_api_key=b"a"), 2), [None, 429])
        self.assertEqual(statuses(limit, lambda: request(x_api_key=b"b"), 1), [None])
        self.assertEqual(statuses(limit, request, 5), [None] * 5)

    def test_cookie_key(self) -> None:
        """
        key: cookie:NAME counts by the cookie's value.
        """
        limit = build(
            {"rate_limit": {"rate": "1/m", "burst": 1, "key": "cookie:sid"}}, self.context
        )
        self.assertEqual(statuses(limit, lambda: request(cookie=b"a=1; sid=x"), 2), [None, 429])
        self.assertEqual(statuses(limit, lambda: request(cookie=b"sid=y"), 1), [None])
        self.assertEqual(statuses(limit, lambda: request(cookie=b"a=1"), 3), [None] * 3)

    def test_route_key(self) -> None:
        """
        key: route is one bucket for every client.
        """
        limit = build({"rate_limit": {"rate": "1/m", "burst": 2, "key": "route"}}, self.context)
        self.assertEqual(
            [limit.request(request(f"10.0.0.{i}")) is None for i in range(3)], [True, True, False]
        )

    def test_counted(self) -> None:
        """
        Each 429 is counted by route and filter; /metrics shows the count,
        the keys held and the store errors.
        """
        metrics = Metrics(Pools(), self.clock)
        context = FilterContext(self.clock, where="filters[0]", route="api", metrics=metrics)
        limit = build({"rate_limit": {"rate": "1/m", "burst": 1}}, context)
        statuses(limit, request, 3)
        text = exposition(metrics).decode()
        self.assertIn('rrlb_rate_limited_total{filter="rate_limit",route="api"} 2.0', text)
        self.assertIn("rrlb_rate_limit_keys 1.0", text)
        self.assertIn("rrlb_rate_limit_store_errors_total 0.0", text)

    def test_metrics_without_limits(self) -> None:
        """
        Without any limit the three metrics are still there, at zero.
        """
        text = exposition(Metrics(Pools(), self.clock)).decode()
        self.assertIn("rrlb_rate_limit_keys 0.0", text)
        self.assertIn("rrlb_rate_limit_store_errors_total 0.0", text)
        self.assertIn("# TYPE rrlb_rate_limited_total counter", text)

    def test_shared_across_reload(self) -> None:
        """
        A filter built again (a reload) with the same settings keeps the
        counts of the one before.
        """
        limit = build({"rate_limit": {"rate": "1/m", "burst": 1}}, self.context)
        self.assertIsNone(limit.request(request()))
        again = build({"rate_limit": {"rate": "1/m", "burst": 1}}, self.context)
        self.assertEqual(again.request(request()).status, 429)

    def test_bad_entries(self) -> None:
        """
        Mistakes are one line naming the filter.
        """
        for entry, words in [
            ({"rate_limit": {"rate": "fast"}}, "filters[0].rate_limit.rate"),
            ({"rate_limit": {"rate": "1/s", "store": "redis://h:x/0"}}, "rate_limit.store"),
            ({"limit_in_flight": {"max": "ten"}}, "filters[0].limit_in_flight.max"),
        ]:
            e = self.assertRaises(ConfigError, parse_filters, "filters", [entry])
            self.assertIn(words, str(e))


class StoreLifetimeTests(unittest.TestCase):
    """
    Redis stores live as long as a filter uses them.
    """

    def test_unused_store_closed(self) -> None:
        """
        A store no filter uses any more (a reload changed the URL) is
        closed once its last filter is gone, its errors still counted; one
        still in use stays, and one taken up again meanwhile stays too.
        """
        clock = Clock()
        context = FilterContext(clock, where="filters[0]")
        stores = stores_of(context)
        self.addCleanup(stores.stop)
        one = {"rate_limit": {"rate": "1/s", "store": "redis://127.0.0.1:1/0"}}
        two = {"rate_limit": {"rate": "1/s", "store": "redis://127.0.0.1:2/0"}}
        first = build(one, context)
        old = stores.redis["redis://127.0.0.1:1/0"]
        old.errors = 3
        kept = build(two, context)
        del first
        gc.collect()
        clock.advance(0)
        self.assertEqual(sorted(stores.redis), ["redis://127.0.0.1:2/0"])
        self.assertFalse(old._running)
        self.assertEqual(stores.store_errors(), 3)
        # Gone and taken up again in the same turn (a reload): kept.
        again = build(two, context)
        del kept
        gc.collect()
        clock.advance(0)
        self.assertEqual(sorted(stores.redis), ["redis://127.0.0.1:2/0"])
        del again


class _Failing:
    """
    A local store that cannot decide (a worker whose main process did not
    answer in time).
    """

    def take(self, *args: Any) -> defer.Deferred[int]:
        return defer.fail(StoreError("no answer"))

    def acquire(self, *args: Any) -> defer.Deferred[bool]:
        return defer.fail(StoreError("no answer"))


class StoreErrorTests(unittest.TestCase):
    """
    on_store_error: allow lets the request through, deny answers 503.
    """

    def context(self) -> FilterContext:
        context = FilterContext(Clock(), where="filters[0]")
        context.shared["limits"] = LimitStores(context.reactor, _Failing())
        return context

    def test_allow(self) -> None:
        """
        allow (the default): the request goes on.
        """
        limit = build({"rate_limit": {"rate": "1/s"}}, self.context())
        result = limit.request(request())
        self.assertIsNone(self.successResultOf(result))

    def test_deny(self) -> None:
        """
        deny: 503.
        """
        limit = build({"rate_limit": {"rate": "1/s", "on_store_error": "deny"}}, self.context())
        self.assertEqual(self.successResultOf(limit.request(request())).status, 503)

    def test_in_flight_allows(self) -> None:
        """
        limit_in_flight lets a request through when the count cannot be had.
        """
        limit = build({"limit_in_flight": {"max": 1}}, self.context())
        self.assertIsNone(self.successResultOf(limit.request(request())))
        self.assertEqual(limit.held, {})


class _Asked:
    """
    A worker's link whose answers the test gives.
    """

    def __init__(self) -> None:
        self.asked: list[defer.Deferred[bool]] = []
        self.released: list[Any] = []

    def acquire(self, *args: Any) -> defer.Deferred[bool]:
        d: defer.Deferred[bool] = defer.Deferred()
        self.asked.append(d)
        return d

    def release(self, limit: str, key: Any) -> None:
        self.released.append(key)


class InFlightTests(unittest.TestCase):
    """
    limit_in_flight on the local store.
    """

    def test_asked_of_the_main_process(self) -> None:
        """
        With --workers the slot is asked for: granted, the request goes on
        and gives it back when it ends; refused, 429; granted after the
        request ended (its client left), it is given back at once.
        """
        context = FilterContext(Clock(), where="filters[0]")
        link = _Asked()
        context.shared["limits"] = LimitStores(context.reactor, link)
        limit = build({"limit_in_flight": {"max": 1}}, context)
        first, second, third = request(), request(), request()
        granted = limit.request(first)
        link.asked[0].callback(True)
        self.assertIsNone(self.successResultOf(granted))
        refused = limit.request(second)
        link.asked[1].callback(False)
        self.assertEqual(self.successResultOf(refused).status, 429)
        limit.done(second)
        self.assertEqual(link.released, [])
        limit.done(first)
        self.assertEqual(link.released, ["10.0.0.1"])
        late = limit.request(third)
        limit.done(third)
        link.asked[2].callback(True)
        self.successResultOf(late)
        self.assertEqual(link.released, ["10.0.0.1", "10.0.0.1"])
        self.assertEqual(limit.held, {})

    def test_max_then_done(self) -> None:
        """
        max requests of a key at once; the next gets 429 without
        Retry-After; one that ends makes room; another key has its own.
        """
        context = FilterContext(Clock(), where="filters[0]")
        limit = build({"limit_in_flight": {"max": 2}}, context)
        first, second, third = request(), request(), request()
        self.assertIsNone(limit.request(first))
        self.assertIsNone(limit.request(second))
        answer = limit.request(third)
        self.assertEqual((answer.status, answer.headers), (429, {}))
        self.assertIsNone(limit.request(request("10.0.0.9")))
        limit.done(third)
        self.assertEqual(limit.request(request()).status, 429)
        limit.done(first)
        self.assertIsNone(limit.request(request()))
        self.assertEqual(stores_of(context).local.flights["filters[0]"].counts["10.0.0.1"], 2)


class _Slot:
    def __init__(self, index: int) -> None:
        self.index = index


class _Supervisor:
    def __init__(self) -> None:
        self.limits = MainLimits(reactor)


async def linked(testcase: unittest.TestCase, main: Any) -> LimitLink:
    """
    A worker's link to C{main} (a protocol) over a loopback connection.
    """
    port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(
        Factory.forProtocol(lambda: main)
    )
    testcase.addCleanup(port.stopListening)
    worker = await TCP4ClientEndpoint(reactor, LOOPBACK, port.getHost().port).connect(
        Factory.forProtocol(QuietAMP)
    )

    def close() -> None:
        worker.transport.loseConnection()
        if main.transport is not None:
            main.transport.loseConnection()

    testcase.addCleanup(close)
    return LimitLink(worker, reactor)


class _Silent(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


class LimitLinkTests(unittest.TestCase):
    """
    With --workers, the store: local decisions are made by the main process
    over the worker's channel.
    """

    async def test_one_count_for_every_worker(self) -> None:
        """
        Two workers asking at once share one bucket: exactly burst
        requests go on.
        """
        supervisor = _Supervisor()
        links = [
            await linked(self, MainChannel(supervisor, _Slot(i)))
            for i in range(2)  # type: ignore[arg-type]
        ]
        spec = parse_rate_limit("x", {"rate": "1/m", "burst": 30})
        results = await defer.gatherResults(
            [link.take("filters[0]", spec, b"client", 0) for _ in range(25) for link in links]
        )
        self.assertEqual(results.count(0), 30)
        self.assertTrue(all(r == 0 or 1 <= r <= 60 for r in results))
        self.assertEqual(supervisor.limits.keys(), 1)

    async def test_one_message_per_turn(self) -> None:
        """
        The decisions of one reactor turn travel in one message; binary keys
        arrive as the same key each time.
        """
        supervisor = _Supervisor()
        decided: list[int] = []
        decide = supervisor.limits.decide

        def counting(decisions: list[Any], holder: Any) -> list[int]:
            decided.append(len(decisions))
            return decide(decisions, holder)

        supervisor.limits.decide = counting  # type: ignore[method-assign]
        link = await linked(self, MainChannel(supervisor, _Slot(0)))  # type: ignore[arg-type]
        spec = parse_rate_limit("x", {"rate": "1/m", "burst": 2})
        results = await defer.gatherResults(
            [link.take("f", spec, b"\xff\x00k", 0) for _ in range(3)]
        )
        self.assertEqual(results[:2], [0, 0])
        self.assertGreater(results[2], 0)
        self.assertEqual(decided, [3])

    async def test_slots_and_a_dead_worker(self) -> None:
        """
        In-flight slots are counted across workers; a released one makes
        room; a worker that dies gives back its slots.
        """
        supervisor = _Supervisor()
        one = await linked(self, MainChannel(supervisor, _Slot(0)))  # type: ignore[arg-type]
        two = await linked(self, MainChannel(supervisor, _Slot(1)))  # type: ignore[arg-type]
        spec = parse_in_flight("x", {"max": 2})
        self.assertTrue(await one.acquire("f", spec, b"k"))
        self.assertTrue(await two.acquire("f", spec, b"k"))
        self.assertFalse(await one.acquire("f", spec, b"k"))
        two.release("f", b"k")
        counts = supervisor.limits.local.flights["f"].counts
        await wait_for(lambda: counts["k"] == 1, "the release")
        self.assertTrue(await one.acquire("f", spec, b"k"))
        self.assertFalse(await two.acquire("f", spec, b"k"))
        supervisor.limits.forget(0)
        self.assertTrue(await two.acquire("f", spec, b"k"))

    async def test_cancelled_wait(self) -> None:
        """
        A request whose client left while its place was asked for (the
        chain cancels the wait) gives the place back when it is granted;
        a cancelled wait is not a store error.
        """
        supervisor = _Supervisor()
        link = await linked(self, MainChannel(supervisor, _Slot(0)))  # type: ignore[arg-type]
        spec = parse_in_flight("x", {"max": 1})
        asked = link.acquire("f", spec, "k")
        asked.cancel()
        self.failureResultOf(asked, defer.CancelledError)
        await wait_for(lambda: "f" in supervisor.limits.local.flights, "the decision")
        counts = supervisor.limits.local.flights["f"].counts
        await wait_for(lambda: not counts, "the place given back")
        self.assertTrue(await link.acquire("f", spec, "k"))
        self.assertEqual(link.errors, 0)

    async def test_main_too_slow(self) -> None:
        """
        A decision not answered within LINK_TIMEOUT is a store error,
        counted.
        """
        link = await linked(self, _Silent())
        spec = parse_rate_limit("x", {"rate": "1/s"})
        with self.assertRaises(StoreError):
            await link.take("f", spec, b"k", 0)
        self.assertEqual(link.errors, 1)
        stores = LimitStores(reactor, link)
        self.assertEqual(stores.store_errors(), 1)


class CountersTests(unittest.TestCase):
    """
    Each worker's 429s and store errors travel to the main process and add
    up.
    """

    def test_round_trip_and_add(self) -> None:
        """
        rate_limited and store_errors survive JSON and add up.
        """
        one = Counters(rate_limited={("api", "rate_limit"): 2}, store_errors=1)
        two = Counters.from_json(json.loads(json.dumps(one.to_json())))
        self.assertEqual(two, one)
        two.add(one, gauges=False)
        self.assertEqual((two.rate_limited, two.store_errors), ({("api", "rate_limit"): 4}, 2))
