# -*- test-case-name: tests.test_rate_limits -*-
"""
The C{rate_limit} and C{limit_in_flight} filters (issue 20), written
against the filter interface of L{rrlb.filters} and registered there as
kinds.

Where a limit is counted:
  - C{store: local} (the default, and always for C{limit_in_flight}): one
    count for the whole instance. In one process the filters ask
    L{rrlb.ratelimit.LocalLimits} directly, synchronously; with
    C{--workers} the workers ask the main process's over their channels
    (L{rrlb.workers.limitlink}), so a client has one count whichever
    worker serves it.
  - C{store: redis://...}: one count across every instance using that
    Redis (L{rrlb.redisstore}).

A request over a limit gets rrlb's own C{429} (with C{Retry-After} from a
rate limit) as an L{Answer}, through the same answer path as every other
filter answer; no node is contacted.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any, Optional, Union

from twisted.internet import defer
from twisted.python.failure import Failure

from rrlb.filters import Answer, FilterContext, FilterKind, FilterRequest
from rrlb.ratelimit import (
    KIND_SOURCE,
    STORE_LOCAL,
    InFlightSpec,
    Key,
    LocalLimits,
    RateLimitSpec,
    parse_in_flight,
    parse_rate_limit,
    request_key,
)
from rrlb.redisstore import RedisStore, StoreError, parse_redis_url, redis_key

# The key of this module's state in a FilterContext's shared dict.
SHARED = "limits"

# The bodies of rrlb's own answers, worded as rrlb.http1.error_response's.
TOO_MANY = "429 Too Many Requests: over the rate limit\n"
TOO_MANY_IN_FLIGHT = "429 Too Many Requests: too many requests in flight\n"
STORE_DOWN = "503 Service Unavailable: the rate-limit store cannot decide\n"


class LimitStores:
    """
    A process's rate-limit state, kept across reloads: the local counts
    (C{local}: a L{LocalLimits}, or with C{--workers} the link to the main
    process's), the Redis stores by URL, and what C{/metrics} shows.

    @ivar rate_limited: C{(route, filter)} -> requests refused with 429.
    """

    def __init__(self, reactor: Any, local: Any = None) -> None:
        self.reactor = reactor
        self.local: Any = LocalLimits() if local is None else local
        self.redis: dict[str, RedisStore] = {}
        # The filters using each store (weak references): one that none
        # uses any more (a reload changed or removed its URL) is closed once
        # the last of them is gone.
        self.users: dict[str, set[weakref.ref[Any]]] = {}
        self.rate_limited: dict[tuple[str, str], int] = {}
        # The errors of stores closed since (the metric never goes down).
        self.retired_errors = 0

    def redis_store(self, where: str, url: str, user: Any) -> RedisStore:
        """
        The (started) store of C{url} for filter C{user}, one per URL in the
        process.
        """
        store = self.redis.get(url)
        if store is None:
            store = self.redis[url] = RedisStore(parse_redis_url(where, url), self.reactor)
            self.users[url] = set()
        users = self.users[url]

        def gone(ref: weakref.ref[Any]) -> None:
            users.discard(ref)
            if not users:
                self.reactor.callLater(0, self._close_unused, url)

        users.add(weakref.ref(user, gone))
        store.start()
        return store

    def _close_unused(self, url: str) -> None:
        if self.users.get(url):
            return  # a new filter took it up meanwhile
        self.users.pop(url, None)
        store = self.redis.pop(url, None)
        if store is not None:
            self.retired_errors += store.errors
            store.stop()

    def store_errors(self) -> int:
        """
        C{rrlb_rate_limit_store_errors_total}: decisions a store could not
        make.
        """
        link_errors = getattr(self.local, "errors", 0)
        return link_errors + self.retired_errors + sum(s.errors for s in self.redis.values())

    def keys(self) -> int:
        """
        C{rrlb_rate_limit_keys}: keys in this process's local tables.
        """
        keys = getattr(self.local, "keys", None)
        return keys() if keys is not None else 0

    def stop(self) -> defer.Deferred[Any]:
        """
        Close every Redis connection.
        """
        stores = list(self.redis.values())
        return defer.gatherResults([s.stop() for s in stores], consumeErrors=True)


def stores_of(context: FilterContext) -> LimitStores:
    """
    The process's L{LimitStores} (made the first time, and shown by its
    metrics).
    """
    stores = context.shared.get(SHARED)
    if stores is None:
        stores = context.shared[SHARED] = LimitStores(context.reactor)
    metrics = context.metrics
    if metrics is not None and getattr(metrics, "limits", None) is not stores:
        metrics.limits = stores
    return stores


def _label(context: FilterContext) -> str:
    return "" if context.route is None else str(context.route)


class RateLimit:
    """
    A token bucket per key (L{rrlb.ratelimit.Bucket}); over it, 429 with
    C{Retry-After}.
    """

    def __init__(self, spec: RateLimitSpec, context: FilterContext) -> None:
        self.spec = spec
        self.key = spec.key
        # The common case, without a call: the client's address.
        self.by_source = spec.key.kind == KIND_SOURCE
        self.limit = context.where
        self.clock = context.reactor
        self.seconds = context.reactor.seconds
        self.stores = stores_of(context)
        self.counted = (_label(context), "rate_limit")
        self.deny = spec.on_store_error == "deny"
        self.redis: Optional[RedisStore] = None
        # In one process, the table itself: asked synchronously.
        local = self.stores.local
        self.table = (
            local.rate_table(self.limit, spec)
            if spec.store == STORE_LOCAL and isinstance(local, LocalLimits)
            else None
        )
        if spec.store != STORE_LOCAL:
            self.redis = self.stores.redis_store(context.where, spec.store, self)
            # One token's time and the burst tolerance, in microseconds.
            self.interval_us = spec.rate.period * 1_000_000 / spec.rate.count
            self.tolerance_us = (spec.burst - 1) * self.interval_us
            # The same filter of every instance shares its buckets.
            self.namespace = (
                hashlib.sha1(
                    f"{context.route}|{context.where}|{spec.rate}|{spec.burst}|{spec.key}".encode()
                )
                .hexdigest()[:12]
                .encode("ascii")
            )

    def request(self, request: FilterRequest) -> Union[None, Answer, defer.Deferred[Any]]:
        key: Optional[Key]
        if self.by_source:
            key = request.client
        else:
            key = request_key(self.key, request.raw, request.client)
            if key is None:
                return None
        table = self.table
        if table is not None:
            wait = table.take(key, self.seconds())
            if wait:
                return self.refuse(wait)
            return None
        redis = self.redis
        decided: defer.Deferred[int]
        if redis is None:
            decided = self.stores.local.take(self.limit, self.spec, key, self.seconds())
        else:
            decided = redis.take(
                redis_key(self.namespace, key), self.interval_us, self.tolerance_us
            )
        return decided.addCallbacks(self.decided, self.store_failed)

    def decided(self, retry_after: int) -> Optional[Answer]:
        return self.refuse(retry_after) if retry_after else None

    def refuse(self, retry_after: int) -> Answer:
        counts = self.stores.rate_limited
        counts[self.counted] = counts.get(self.counted, 0) + 1
        return Answer(429, TOO_MANY, {"Retry-After": str(retry_after)})

    def store_failed(self, reason: Failure) -> Optional[Answer]:
        reason.trap(StoreError)
        return Answer(503, STORE_DOWN) if self.deny else None


# A request whose in-flight slot is being asked for.
_ASKING: Any = object()


class LimitInFlight:
    """
    At most C{max} requests of one key in flight at once, counted for the
    whole instance; over it, 429 without C{Retry-After}. A request's slot
    is given back when it ends (C{done}).
    """

    def __init__(self, spec: InFlightSpec, context: FilterContext) -> None:
        self.spec = spec
        self.key = spec.key
        self.limit = context.where
        self.stores = stores_of(context)
        self.counted = (_label(context), "limit_in_flight")
        # FilterRequest -> the key its slot is held under.
        self.held: dict[FilterRequest, Key] = {}

    def request(self, request: FilterRequest) -> Union[None, Answer, defer.Deferred[Any]]:
        key = request_key(self.key, request.raw, request.client)
        if key is None:
            return None
        granted = self.stores.local.acquire(self.limit, self.spec, key)
        if granted is True:
            self.held[request] = key
            return None
        if granted is False:
            return self.refuse()
        self.held[request] = _ASKING

        def answered(ok: bool) -> Optional[Answer]:
            if self.held.get(request) is not _ASKING:
                # The request ended while the main process was asked.
                if ok:
                    self.stores.local.release(self.limit, key)
                return None
            if ok:
                self.held[request] = key
                return None
            del self.held[request]
            return self.refuse()

        def failed(reason: Failure) -> None:
            reason.trap(StoreError)
            # Not counted: the link gives a late grant back itself.
            self.held.pop(request, None)

        return granted.addCallbacks(answered, failed)

    def refuse(self) -> Answer:
        counts = self.stores.rate_limited
        counts[self.counted] = counts.get(self.counted, 0) + 1
        return Answer(429, TOO_MANY_IN_FLIGHT)

    def done(self, request: FilterRequest) -> None:
        key = self.held.pop(request, None)
        if key is not None and key is not _ASKING:
            self.stores.local.release(self.limit, key)


def parse_rate_limit_entry(where: str, value: Any) -> RateLimitSpec:
    """
    A C{rate_limit} entry, its Redis URL checked as well.
    """
    spec = parse_rate_limit(where, value)
    if spec.store != STORE_LOCAL:
        parse_redis_url(where, spec.store)
    return spec


RATE_LIMIT = FilterKind(parse_rate_limit_entry, RateLimit)
LIMIT_IN_FLIGHT = FilterKind(parse_in_flight, LimitInFlight)
