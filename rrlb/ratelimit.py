# -*- test-case-name: tests.test_ratelimit -*-
"""
The arithmetic of rate limits, pure: no reactor, no I/O.

  - L{RateLimitSpec} and L{InFlightSpec}: the frozen values of a
    C{rate_limit} and a C{limit_in_flight} filter, read from YAML by
    L{parse_rate_limit} and L{parse_in_flight};
  - L{request_key}: a request's key of a given kind (C{source},
    C{header:NAME}, C{cookie:NAME}, C{route});
  - L{Bucket}: a token bucket per key as nginx's C{limit_req ... burst=N
    nodelay} behaves, kept in the GCRA form (one integer per key: the time
    its bucket is full again), in exact integer arithmetic;
  - L{LocalLimits}: the buckets and in-flight counts of one process, in
    key tables that drop the least recently used keys past C{max_keys}.

Times are the reactor's seconds, turned once into whole nanoseconds: a
C{task.Clock} advanced by 0.01 ten times is exactly 0.1 s here, so a test
sees the token it expects, not one lost to a float's rounding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import OrderedDict
from typing import Any, Mapping, Optional, Union

from rrlb._twisted import canonical_name, raw_headers
from rrlb.values import ConfigError

NS = 1_000_000_000

# Keys longer than this are kept as a digest: a client can send a 32 KiB
# header as its key, and max_keys of them must not cost gigabytes.
MAX_RAW_KEY = 64
# A digest's mark: a key the parser let through never has a NUL byte.
_DIGEST = b"\x00#"

DEFAULT_MAX_KEYS = 100_000
STORE_LOCAL = "local"
ON_STORE_ERROR = ("allow", "deny")

KIND_SOURCE = "source"
KIND_HEADER = "header"
KIND_COOKIE = "cookie"
KIND_ROUTE = "route"

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|m)\s*$")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_PERIODS = {"s": 1, "m": 60}


@dataclasses.dataclass(frozen=True)
class Rate:
    """
    C{count} requests per C{period} seconds (1 or 60).
    """

    count: int
    period: int

    def __str__(self) -> str:
        return f"{self.count}/{'s' if self.period == 1 else 'm'}"


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """
    What a limit counts by: C{kind} is C{source}, C{header}, C{cookie} or
    C{route}; C{name} the header's (canonical) or cookie's name.
    """

    kind: str
    name: bytes = b""

    def __str__(self) -> str:
        if self.kind in (KIND_HEADER, KIND_COOKIE):
            return f"{self.kind}:{self.name.decode('ascii')}"
        return self.kind


@dataclasses.dataclass(frozen=True)
class RateLimitSpec:
    """
    A C{rate_limit} filter: C{rate}, C{burst}, C{key}, C{store} (C{local}
    or a C{redis://} or C{rediss://} URL), C{max_keys}, C{on_store_error}.
    """

    rate: Rate
    burst: int
    key: KeySpec = KeySpec(KIND_SOURCE)
    store: str = STORE_LOCAL
    max_keys: int = DEFAULT_MAX_KEYS
    on_store_error: str = "allow"


@dataclasses.dataclass(frozen=True)
class InFlightSpec:
    """
    A C{limit_in_flight} filter: at most C{max} requests of one C{key} in
    flight at once.
    """

    max: int
    key: KeySpec = KeySpec(KIND_SOURCE)


Spec = Union[RateLimitSpec, InFlightSpec]
# A request's key: the client's address (a str, as the channel has it) or a
# header's or cookie's value (bytes).
Key = Union[str, bytes]


# -- reading the YAML ------------------------------------------------------------------


def parse_rate(where: str, value: Any) -> Rate:
    """
    C{100/s} or C{6000/m}: a whole number of requests of at least 1, per
    second or per minute.
    """
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ConfigError(
            f"{where}.rate must be a whole number of requests of at least 1 per second"
            f" or minute, such as 100/s or 600/m, not {value!r}"
        )
    return Rate(int(match.group(1)), _PERIODS[match.group(2)])


def default_burst(rate: Rate) -> int:
    """
    The rate's per-second figure, rounded up, at least 1.
    """
    return max(1, -(-rate.count // rate.period))


def parse_key(where: str, value: Any) -> KeySpec:
    """
    C{source}, C{header:NAME}, C{cookie:NAME} or C{route}.
    """
    if value in (KIND_SOURCE, KIND_ROUTE):
        return KeySpec(value)
    if isinstance(value, str) and ":" in value:
        kind, _, name = value.partition(":")
        name = name.strip()
        if kind in (KIND_HEADER, KIND_COOKIE) and _TOKEN.match(name):
            raw = name.encode("ascii")
            return KeySpec(kind, canonical_name(raw) if kind == KIND_HEADER else raw)
    raise ConfigError(
        f"{where}.key must be source, header:NAME, cookie:NAME or route, not {value!r}"
    )


def _whole(where: str, name: str, value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}.{name} must be a whole number of at least 1, not {value!r}")
    return value


def _mapping(where: str, value: Any, known: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping, not {value!r}")
    for name in value:
        if name not in known:
            raise ConfigError(f"{where} has an unknown key {name!r}")
    return value


def parse_store(where: str, value: Any) -> str:
    """
    C{local}, or a C{redis://HOST:PORT/DB} or C{rediss://} URL (checked
    fully by the store when it is made).
    """
    if value is None:
        return STORE_LOCAL
    if isinstance(value, str) and (
        value == STORE_LOCAL or value.startswith(("redis://", "rediss://"))
    ):
        return value
    raise ConfigError(
        f"{where}.store must be local or a redis://HOST:PORT/DB or rediss:// URL, not {value!r}"
    )


def parse_rate_limit(where: str, value: Any) -> RateLimitSpec:
    """
    A C{rate_limit} mapping: C{{rate: 100/s, burst: 200, key: source,
    store: local, max_keys: 100000, on_store_error: allow}}.
    """
    value = _mapping(where, value, ("rate", "burst", "key", "store", "max_keys", "on_store_error"))
    if "rate" not in value:
        raise ConfigError(f"{where} needs a rate, such as rate: 100/s")
    rate = parse_rate(where, value["rate"])
    on_error = value.get("on_store_error", "allow")
    if on_error not in ON_STORE_ERROR:
        raise ConfigError(f"{where}.on_store_error must be allow or deny, not {on_error!r}")
    return RateLimitSpec(
        rate=rate,
        burst=_whole(where, "burst", value.get("burst"), default_burst(rate)),
        key=parse_key(where, value.get("key", KIND_SOURCE)),
        store=parse_store(where, value.get("store")),
        max_keys=_whole(where, "max_keys", value.get("max_keys"), DEFAULT_MAX_KEYS),
        on_store_error=on_error,
    )


def parse_in_flight(where: str, value: Any) -> InFlightSpec:
    """
    A C{limit_in_flight} mapping: C{{max: 10, key: source}}.
    """
    value = _mapping(where, value, ("max", "key"))
    if "max" not in value:
        raise ConfigError(f"{where} needs max, such as max: 10")
    return InFlightSpec(
        max=_whole(where, "max", value["max"], 1),
        key=parse_key(where, value.get("key", KIND_SOURCE)),
    )


# -- keys ------------------------------------------------------------------------------


def bounded_key(key: bytes) -> bytes:
    """
    C{key} itself if short, else a 128-bit digest of it (marked so that no
    raw key can equal one).
    """
    if len(key) <= MAX_RAW_KEY:
        return key
    return _DIGEST + hashlib.blake2b(key, digest_size=16).digest()


def cookie_value(headers: list[bytes], name: bytes) -> Optional[bytes]:
    """
    The value of cookie C{name} in these C{Cookie} header values, if any.
    """
    for header in headers:
        for pair in header.split(b";"):
            cookie, sep, value = pair.partition(b"=")
            if sep and cookie.strip() == name:
                return value.strip()
    return None


def request_key(spec: KeySpec, request: Any, client: str = "") -> Optional[Key]:
    """
    C{request}'s key of kind C{spec} (bounded in size), or L{None} when it
    has none (no such header or cookie): such a request is not limited.
    C{request} is a proxy request; C{client} the real client's address
    (behind trusted proxies, the one they vouch for), the C{source} key.
    """
    kind = spec.kind
    if kind == KIND_SOURCE:
        return client
    if kind == KIND_ROUTE:
        return b""
    if kind == KIND_HEADER:
        values = raw_headers(request.requestHeaders).get(spec.name)
        if not values:
            return None
        return bounded_key(values[0])
    cookies = raw_headers(request.requestHeaders).get(b"Cookie")
    if not cookies:
        return None
    found = cookie_value(cookies, spec.name)
    return None if found is None else bounded_key(found)


# -- token buckets ---------------------------------------------------------------------


def nanoseconds(seconds: float) -> int:
    """
    The reactor's C{seconds} in whole nanoseconds (rounded, so that a
    float a hair under a whole nanosecond counts as it).
    """
    return int(seconds * NS + 0.5)


class Bucket:
    """
    The token bucket of one rate and burst, in the GCRA form: a key's state
    is one integer, the time its bucket is full again (its "theoretical
    arrival time"), in units of 1/C{rate.count} ns so that every step is
    exact.

    A request at C{now} takes a token when the bucket is at most C{burst -
    1} emission intervals from full; it then moves one interval further.
    That is a bucket of C{burst} tokens refilled at C{rate}.
    """

    def __init__(self, rate: Rate, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.scale = rate.count
        # One token's time (period / count seconds), times count: whole ns.
        self.interval = rate.period * NS
        self.tolerance = (burst - 1) * self.interval
        # One second, scaled.
        self.second = NS * rate.count

    def now(self, seconds: float) -> int:
        """
        C{seconds} in this bucket's units.
        """
        return nanoseconds(seconds) * self.scale

    def take(self, full_at: int, now: int) -> tuple[int, int]:
        """
        One request at C{now} (scaled) on a key whose bucket is full at
        C{full_at}: C{(new full_at, 0)} when it takes a token, else
        C{(full_at, wait)} with C{wait} the scaled time until a token is free.
        """
        if full_at < now:
            full_at = now
        ahead = full_at - now
        if ahead > self.tolerance:
            return full_at, ahead - self.tolerance
        return full_at + self.interval, 0

    def retry_after(self, wait: int) -> int:
        """
        C{Retry-After}: whole seconds until a token is free, at least 1.
        """
        return max(1, -(-wait // self.second))


class KeyTable:
    """
    Values by key, at most C{max_keys} of them: past the cap the least
    recently used key is dropped (for a bucket that is not yet full, the
    client gets a full one back the next time: the table errs towards
    letting requests through, never towards refusing them).
    """

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.max_keys = max_keys
        self.entries: OrderedDict[Key, int] = OrderedDict()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: Key, default: int) -> int:
        """
        The value of C{key} (now the most recently used), or C{default}.
        """
        entries = self.entries
        value = entries.get(key)
        if value is None:
            return default
        entries.move_to_end(key)
        return value

    def put(self, key: Key, value: int) -> None:
        """
        Set C{key} (the most recently used), dropping the least recently
        used key past C{max_keys}.
        """
        entries = self.entries
        if key in entries:
            entries[key] = value
            entries.move_to_end(key)
            return
        entries[key] = value
        if len(entries) > self.max_keys:
            entries.popitem(last=False)
            self.dropped += 1

    def pop(self, key: Key) -> None:
        self.entries.pop(key, None)


class RateTable:
    """
    The buckets of one C{rate_limit} filter in one process.
    """

    __slots__ = ("spec", "bucket", "keys", "_entries", "_scale", "_interval", "_tolerance")

    def __init__(self, spec: RateLimitSpec) -> None:
        self.spec = spec
        self.bucket = bucket = Bucket(spec.rate, spec.burst)
        self.keys = KeyTable(spec.max_keys)
        # What take() reads per request, one attribute each.
        self._entries = self.keys.entries
        self._scale = bucket.scale
        self._interval = bucket.interval
        self._tolerance = bucket.tolerance

    def take(self, key: Key, seconds: float) -> int:
        """
        One request of C{key} at C{seconds}: 0 if it may go on, else its
        C{Retry-After} in whole seconds.
        """
        # Bucket.take and KeyTable's get and put, inline: this runs per
        # request.
        now = int(seconds * NS + 0.5) * self._scale
        entries = self._entries
        full_at = entries.get(key)
        if full_at is None:
            # A new key: a full bucket (burst is at least 1).
            entries[key] = now + self._interval
            keys = self.keys
            if len(entries) > keys.max_keys:
                entries.popitem(last=False)
                keys.dropped += 1
            return 0
        entries.move_to_end(key)
        if full_at < now:
            full_at = now
        wait = full_at - now - self._tolerance
        if wait > 0:
            return self.bucket.retry_after(wait)
        entries[key] = full_at + self._interval
        return 0


class InFlightTable:
    """
    The requests in flight of one C{limit_in_flight} filter, by key; a key
    with none is forgotten, so the table holds at most as many keys as
    there are requests in flight.
    """

    def __init__(self, spec: InFlightSpec) -> None:
        self.spec = spec
        self.counts: dict[Key, int] = {}

    def __len__(self) -> int:
        return len(self.counts)

    def acquire(self, key: Key) -> bool:
        """
        One more request of C{key}, if it is under C{max}.
        """
        counts = self.counts
        n = counts.get(key, 0)
        if n >= self.spec.max:
            return False
        counts[key] = n + 1
        return True

    def release(self, key: Key) -> None:
        counts = self.counts
        n = counts.get(key, 0)
        if n <= 1:
            counts.pop(key, None)
        else:
            counts[key] = n - 1


class LocalLimits:
    """
    The counts of C{store: local} for a whole instance: every C{rate_limit}
    and C{limit_in_flight} table, by the filter's id. In one process the
    filters ask it directly; with C{--workers} it lives in the main process
    and the workers ask it over their channels, so one client has one count
    whichever worker serves it.

    In-flight counts remember who holds them (a worker's index), so a
    worker that dies gives its requests back (L{forget}).
    """

    def __init__(self) -> None:
        self.rates: dict[str, RateTable] = {}
        self.flights: dict[str, InFlightTable] = {}
        self.held: dict[Any, dict[tuple[str, Key], int]] = {}

    def rate_table(self, limit: str, spec: RateLimitSpec) -> RateTable:
        table = self.rates.get(limit)
        if table is None or table.spec != spec:
            table = self.rates[limit] = RateTable(spec)
        return table

    def take(self, limit: str, spec: RateLimitSpec, key: Key, seconds: float) -> int:
        """
        One request of C{key} on filter C{limit}: 0 or its C{Retry-After}.
        """
        table = self.rates.get(limit)
        if table is None or (table.spec is not spec and table.spec != spec):
            table = self.rate_table(limit, spec)
        return table.take(key, seconds)

    def acquire(self, limit: str, spec: InFlightSpec, key: Key, holder: Any = None) -> bool:
        """
        One more request of C{key} in flight on filter C{limit}, if there is
        room.
        """
        table = self.flights.get(limit)
        if table is None or table.spec != spec:
            table = self.flights[limit] = InFlightTable(spec)
        if not table.acquire(key):
            return False
        if holder is not None:
            held = self.held.setdefault(holder, {})
            held[(limit, key)] = held.get((limit, key), 0) + 1
        return True

    def release(self, limit: str, key: Key, holder: Any = None) -> None:
        table = self.flights.get(limit)
        if table is not None:
            table.release(key)
        if holder is not None:
            held = self.held.get(holder)
            if held is not None:
                n = held.get((limit, key), 0)
                if n <= 1:
                    held.pop((limit, key), None)
                else:
                    held[(limit, key)] = n - 1

    def forget(self, holder: Any) -> None:
        """
        C{holder} is gone: its requests in flight are no longer.
        """
        for (limit, key), n in self.held.pop(holder, {}).items():
            table = self.flights.get(limit)
            if table is not None:
                for _ in range(n):
                    table.release(key)

    def keep(self, limits: set[str]) -> None:
        """
        Only the tables of these filters are kept (after a reload).
        """
        for tables in (self.rates, self.flights):
            for limit in [name for name in tables if name not in limits]:
                del tables[limit]

    def keys(self) -> int:
        """
        The keys held, over every table: C{rrlb_rate_limit_keys}.
        """
        return sum(len(t.keys) for t in self.rates.values()) + sum(
            len(t) for t in self.flights.values()
        )
