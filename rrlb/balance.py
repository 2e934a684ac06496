# -*- test-case-name: tests.test_balance -*-
"""
Balancing policies beside the rotation: least connections, power of two
random choices, consistent hashing with bounded loads, the sticky cookie
and slow start. Pure logic: no I/O and no reactor; time comes from an
injected clock and randomness from an injected L{random.Random}, so every
policy is tested without sockets.

Smooth weighted round robin, the default, stays in L{rrlb.pool.Pool}
itself (a precomputed schedule, the cheapest pick there is); the pool hands
a pick to a L{Policy} here only when one is configured.

A policy sees the pool's nodes in rotation (C{live}, in configured order)
and the request (anything with the attributes the key functions read:
C{requestHeaders}, C{uri}, C{real_client}, C{channel}); it skips nodes at
their C{max_connections} limit and returns L{None} when every node is full.
"""

from __future__ import annotations

import math
import random
from bisect import bisect
from hashlib import blake2b
from typing import Any, Callable, Optional, Protocol, Sequence, TypeVar

from rrlb._twisted import raw_headers
from rrlb.http1 import canonical

ROUNDROBIN = "roundrobin"
LEASTCONN = "leastconn"
P2C = "p2c"
HASH = "hash"
POLICIES = (ROUNDROBIN, LEASTCONN, P2C, HASH)

# Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam):
# no node takes more than this factor of the mean load.
HASH_LOAD_FACTOR = 1.25
# Points per unit of weight on the hash ring, and at most per node: enough
# for an even spread over a few dozen nodes, cheap to rebuild.
HASH_POINTS = 160
HASH_POINTS_MAX = 4096

# p2c: the decay time of a node's response-time average (Finagle's peak
# EWMA uses 10 s); a node not chosen for a while is tried again.
EWMA_DECAY = 10.0

# p2c: the cost of a node with requests in flight but no response time yet.
P2C_PENALTY = 1e6

# Slow start ramps a node's effective weight from this fraction of its weight.
SLOW_START_FLOOR = 0.1

# Length of the opaque node id in sticky cookies (hex characters).
STICKY_ID_LENGTH = 12


class Balanced(Protocol):
    """
    What the policies read and keep of a node; L{rrlb.pool.Node} provides
    it (the pool sits above this module, so it is named only here).
    """

    key: str
    index: int
    weight: int
    limit: int
    in_flight: int
    up_since: Optional[float]
    ewma: float
    ewma_at: float
    sticky_id: bytes


N = TypeVar("N", bound=Balanced)


def hash64(data: bytes) -> int:
    """
    A stable 64-bit hash (the same in every process and on every run, so
    workers and restarts agree on where a key goes).
    """
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


def sticky_id(key: str) -> str:
    """
    The opaque id of a node in a sticky cookie: a short hash of its key,
    never its URL.
    """
    return blake2b(key.encode("utf-8"), digest_size=STICKY_ID_LENGTH // 2).hexdigest()


def has_room(node: N) -> bool:
    limit = node.limit
    return not limit or node.in_flight < limit


# -- request keys --------------------------------------------------------------


def cookie_value(request: Any, name: bytes) -> Optional[bytes]:
    """
    The value of cookie C{name} in the request's C{Cookie} headers, or
    L{None}.
    """
    values = raw_headers(request.requestHeaders).get(b"Cookie")
    if not values:
        return None
    prefix = name + b"="
    for value in values:
        if value.find(prefix) < 0:
            continue
        for part in value.split(b";"):
            part = part.strip()
            if part.startswith(prefix):
                return part[len(prefix) :]
    return None


def source_key(request: Any) -> Optional[bytes]:
    """
    The client's address: the one behind trusted proxies if known, else
    the peer's.
    """
    real = request.real_client
    if real is not None:
        return real.encode("latin-1")
    ip = request.channel.forwarded[1]
    return ip or None


def uri_key(request: Any) -> Optional[bytes]:
    """
    The request target up to the query (HAProxy's C{balance uri}).
    """
    uri = request.uri
    cut = uri.find(b"?")
    return uri if cut < 0 else uri[:cut]


def key_function(hash_key: str) -> Callable[[Any], Optional[bytes]]:
    """
    The function that reads a request's hash key for C{hash_key}: C{source},
    C{uri}, C{header:NAME} or C{cookie:NAME} (checked by L{rrlb.config}).
    """
    if hash_key == "source":
        return source_key
    if hash_key == "uri":
        return uri_key
    kind, _, name = hash_key.partition(":")
    if kind == "header":
        key = canonical(name.encode("ascii"))

        def header_key(request: Any) -> Optional[bytes]:
            values = raw_headers(request.requestHeaders).get(key)
            return values[0] if values else None

        return header_key
    if kind == "cookie":
        cookie = name.encode("ascii")

        def cookie_key(request: Any) -> Optional[bytes]:
            return cookie_value(request, cookie)

        return cookie_key
    raise ValueError(f"unknown hash key {hash_key!r}")


# -- slow start ----------------------------------------------------------------


class SlowStart:
    """
    Effective weights of nodes that came back: from L{SLOW_START_FLOOR} of
    their weight to all of it over C{seconds} (nginx's C{slow_start}).
    """

    def __init__(self, seconds: float, clock: Any) -> None:
        self.seconds = seconds
        self.clock = clock

    def weight(self, node: N, now: float) -> float:
        since = node.up_since
        if since is None:
            return float(node.weight)
        ramp = (now - since) / self.seconds
        if ramp >= 1.0:
            node.up_since = None
            return float(node.weight)
        return node.weight * max(SLOW_START_FLOOR, ramp)


def plain_weight(node: N, now: float) -> float:
    return float(node.weight)


# -- policies ------------------------------------------------------------------


class Policy:
    """
    What a pool asks for a pick when it does not use its own schedule.

    @ivar weight: C{weight(node, now)}, the node's effective weight (its
        weight, or less while it slow-starts).
    """

    name = ""
    needs_clock = False

    def __init__(self) -> None:
        self.weight: Callable[[Balanced, float], float] = plain_weight
        self.clock: Any = None

    def rebuild(self, live: Sequence[N]) -> None:
        """
        The set of nodes in rotation changed.
        """

    def pick(self, live: Sequence[N], request: Any) -> Optional[N]:
        raise NotImplementedError

    def now(self) -> float:
        return self.clock.seconds() if self.clock is not None else 0.0


class RoundRobin(Policy):
    """
    Smooth weighted round robin computed pick by pick (nginx's own loop), for
    while nodes slow-start and their weights change with time; the pool's
    precomputed schedule serves otherwise.
    """

    name = ROUNDROBIN

    def __init__(self) -> None:
        super().__init__()
        self._current: dict[int, float] = {}

    def rebuild(self, live: Sequence[N]) -> None:
        self._current = {}

    def pick(self, live: Sequence[N], request: Any) -> Optional[N]:
        now = self.now()
        current = self._current
        total = 0.0
        best: Optional[N] = None
        best_value = 0.0
        for node in live:
            if not has_room(node):
                continue
            weight = self.weight(node, now)
            total += weight
            value = current.get(id(node), 0.0) + weight
            current[id(node)] = value
            if best is None or value > best_value:
                best, best_value = node, value
        if best is not None:
            current[id(best)] = best_value - total
        return best


class LeastConn(Policy):
    """
    The node with the fewest requests in flight relative to its (effective)
    weight; among equals, the next after the last one picked, in configured
    order (round robin among ties).
    """

    name = LEASTCONN

    def __init__(self) -> None:
        super().__init__()
        self._last = -1

    def pick(self, live: Sequence[N], request: Any) -> Optional[N]:
        now = self.now()
        weight = self.weight
        last = self._last
        best: Optional[N] = None
        best_score = math.inf
        # Among ties, the first after the last pick wins over one before it.
        best_after = False
        for node in live:
            if not has_room(node):
                continue
            score = node.in_flight / weight(node, now)
            after = node.index > last
            if score < best_score or (score == best_score and after and not best_after):
                best, best_score, best_after = node, score, after
        if best is not None:
            self._last = best.index
        return best


class PowerOfTwo(Policy):
    """
    Power of two random choices over in-flight requests times the node's
    peak-EWMA response time, divided by its weight (Finagle's and Envoy's
    least-request shape): a node that slows down gets less traffic before
    any health check fails.
    """

    name = P2C
    needs_clock = True

    def __init__(self, rng: Optional[random.Random] = None) -> None:
        super().__init__()
        self.rng = rng if rng is not None else random.Random()

    def cost(self, node: N, now: float) -> float:
        """
        The node's load: (in flight + 1) x its decayed response time. A
        node with no response time yet costs nothing while idle (so it gets
        tried) but a penalty once it has requests in flight (so a new node
        is not flooded before its first answer), as in Finagle.
        """
        ewma = node.ewma
        if not ewma:
            return P2C_PENALTY + node.in_flight if node.in_flight else 0.0
        age = now - node.ewma_at
        if age > 0:
            ewma *= math.exp(-age / EWMA_DECAY)
        return (node.in_flight + 1) * ewma / self.weight(node, now)

    def pick(self, live: Sequence[N], request: Any) -> Optional[N]:
        candidates = live
        for node in live:
            if not has_room(node):
                candidates = [n for n in live if has_room(n)]
                break
        count = len(candidates)
        if count < 2:
            return candidates[0] if count else None
        rand = self.rng.random
        i = int(rand() * count)
        j = int(rand() * (count - 1))
        if j >= i:
            j += 1
        a, b = candidates[i], candidates[j]
        now = self.now()
        cost_a, cost_b = self.cost(a, now), self.cost(b, now)
        if cost_b < cost_a or (cost_b == cost_a and b.in_flight < a.in_flight):
            return b
        return a


def observe(node: N, seconds: float, now: float) -> None:
    """
    Fold one response time into the node's peak EWMA: a slower response
    takes effect at once, faster ones pull the average down over
    L{EWMA_DECAY} seconds.
    """
    ewma = node.ewma
    if seconds >= ewma:
        node.ewma = seconds
    else:
        age = now - node.ewma_at
        w = math.exp(-age / EWMA_DECAY) if age > 0 else 1.0
        # At least a small step per sample even with no time between them.
        w = min(w, 0.9)
        node.ewma = ewma * w + seconds * (1.0 - w)
    node.ewma_at = now


class ConsistentHash(Policy):
    """
    Consistent hashing with bounded loads on a request key: each node owns
    points on a ring (in proportion to its weight), a key goes to the owner
    of the first point after its hash, and a node already at
    L{HASH_LOAD_FACTOR} times its share of the requests in flight passes
    the key on to the next point's owner. When a node leaves only the keys
    it owned move. A request without the key takes round robin.
    """

    name = HASH

    def __init__(self, key: Callable[[Any], Optional[bytes]], factor: float = HASH_LOAD_FACTOR):
        super().__init__()
        self.key = key
        self.factor = factor
        self._points: dict[str, list[int]] = {}
        self._hashes: list[int] = []
        self._owners: list[Any] = []  # the ring's nodes (N of each pick)
        self._next = 0

    def _node_points(self, node: N) -> list[int]:
        count = min(HASH_POINTS * node.weight, HASH_POINTS_MAX)
        cached = self._points.get(node.key)
        if cached is None or len(cached) != count:
            base = node.key.encode("utf-8")
            cached = [hash64(b"%s#%d" % (base, i)) for i in range(count)]
            self._points[node.key] = cached
        return cached

    def rebuild(self, live: Sequence[N]) -> None:
        ring = sorted((h, node.index, node) for node in live for h in self._node_points(node))
        self._hashes = [h for h, _, _ in ring]
        self._owners = [node for _, _, node in ring]
        keys = {n.key for n in live}
        for key in list(self._points):
            if key not in keys:
                del self._points[key]

    def pick(self, live: Sequence[N], request: Any) -> Optional[N]:
        if not live:
            return None
        key = self.key(request) if request is not None else None
        if key is None:
            return self._round_robin(live)
        return self.lookup(live, key)

    def lookup(self, live: Sequence[N], key: bytes) -> Optional[N]:
        """
        The node for C{key} now, given the requests in flight.
        """
        hashes = self._hashes
        size = len(hashes)
        if not size:
            return None
        now = self.now()
        weight = self.weight
        total_weight = 0.0
        in_flight = 1  # this request
        for node in live:
            total_weight += weight(node, now)
            in_flight += node.in_flight
        bound = self.factor * in_flight / total_weight
        owners = self._owners
        start = bisect(hashes, hash64(key))
        seen: set[int] = set()
        for step in range(size):
            node = owners[(start + step) % size]
            if node.index in seen:
                continue
            if has_room(node) and node.in_flight + 1 <= math.ceil(bound * weight(node, now)):
                return node
            seen.add(node.index)
            if len(seen) == len(live):
                break
        return None

    def _round_robin(self, live: Sequence[N]) -> Optional[N]:
        count = len(live)
        for step in range(count):
            node = live[(self._next + step) % count]
            if has_room(node):
                self._next = (self._next + step + 1) % count
                return node
        return None


def make_policy(
    balance: str,
    hash_key: str = "source",
    rng: Optional[random.Random] = None,
) -> Optional[Policy]:
    """
    The policy object for a pool's C{balance} setting; L{None} for round
    robin, which the pool does itself.
    """
    if balance == ROUNDROBIN:
        return None
    if balance == LEASTCONN:
        return LeastConn()
    if balance == P2C:
        return PowerOfTwo(rng)
    if balance == HASH:
        return ConsistentHash(key_function(hash_key))
    raise ValueError(f"unknown balance {balance!r}")


class Sticky:
    """
    The sticky cookie of a pool (HAProxy's C{cookie NAME insert}): a request
    that names a node in rotation with room goes to it; any other gets the
    policy's pick and the response sets the cookie to that node's id.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.name_bytes = name.encode("ascii")

    def value(self, request: Any) -> Optional[bytes]:
        return cookie_value(request, self.name_bytes)

    def header(self, node: N) -> bytes:
        """
        The C{Set-Cookie} value that sends later requests to C{node}.
        """
        return b"%s=%s; Path=/; HttpOnly" % (self.name_bytes, node.sticky_id)
