# -*- test-case-name: tests.test_pool -*-
"""
The node set, its health state and the rotation. No I/O and no reactor: the
proxy asks it for a node per request, the health checker (and the proxy, for
passive health) tell it what they saw.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from twisted.logger import Logger

from rrlb.balance import (
    Policy,
    RoundRobin,
    SlowStart,
    Sticky,
    has_room,
    make_policy,
    observe,
    plain_weight,
    sticky_id,
)
from rrlb.config import NodeSpec

UP = "up"
DOWN = "down"
DRAINING = "draining"


class Node:
    """
    One backend and what rrlb knows of it.

    @ivar healthy: whether health checks (active or passive) say it is up.
    @ivar drained: taken out of rotation by hand (admin API).
    @ivar removed: no longer configured; it finishes its in-flight requests.
    @ivar successes: consecutive successful checks.
    @ivar failures: consecutive failed checks.
    @ivar limit: requests in flight to it at most (0: no limit); set by the
        pool from its spec's C{max_connections} or the pool's default.
    """

    __slots__ = (
        "spec",
        "key",
        "index",
        "scheme",
        "host",
        "port",
        "base_path",
        "host_header",
        "weight",
        "send_proxy",
        "healthy",
        "drained",
        "removed",
        "successes",
        "failures",
        "last_check",
        "last_latency",
        "last_error",
        "in_flight",
        "requests",
        "errors",
        "limit",
        "pool_name",
        "label",
        "up_since",
        "ewma",
        "ewma_at",
        "sticky_id",
        "connect_timeout",
    )

    def __init__(self, spec: NodeSpec, index: int = 0, pool_name: str = "default") -> None:
        self.key = spec.key
        self.pool_name = pool_name
        # (pool, key): what metrics count it under, built once.
        self.label = (pool_name, spec.key)
        # When it came back into rotation, while it slow-starts.
        self.up_since: Optional[float] = None
        # Peak EWMA of response times (p2c) and when it was last updated.
        self.ewma = 0.0
        self.ewma_at = 0.0
        self.sticky_id = sticky_id(spec.key).encode("ascii")
        # The pool's connect timeout (None: the upstream client's default).
        self.connect_timeout: Optional[float] = None
        self.index = index
        self.healthy = True
        self.drained = False
        self.removed = False
        self.successes = 0
        self.failures = 0
        self.last_check: Optional[float] = None
        self.last_latency: Optional[float] = None
        self.last_error: Optional[str] = None
        self.in_flight = 0
        self.requests = 0
        self.errors = 0
        self.limit = 0
        self.set_spec(spec)

    def set_spec(self, spec: NodeSpec) -> None:
        """
        Take new settings (a reload) while keeping health state and counters.
        """
        self.spec = spec
        self.scheme = spec.scheme
        self.host = spec.host
        self.port = spec.port
        self.base_path = spec.base_path
        self.host_header = spec.hostport
        self.weight = spec.weight
        self.send_proxy = spec.send_proxy

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def state(self) -> str:
        """
        C{up}, C{down} or C{draining}, as an operator sees it.
        """
        if self.drained or self.removed:
            return DRAINING
        return UP if self.healthy else DOWN

    @property
    def in_rotation(self) -> bool:
        return self.healthy and not self.drained and not self.removed

    def __repr__(self) -> str:
        return f"<Node {self.url} {self.state}>"


def smooth_weighted_order(nodes: Sequence[Node]) -> list[Node]:
    """
    One full cycle of smooth weighted round robin, the algorithm nginx uses:
    weights 5, 1, 1 give a a b a c a a. Equal weights give the plain cycle.
    """
    total = sum(n.weight for n in nodes)
    current = [0] * len(nodes)
    order = []
    for _ in range(total):
        best = 0
        for i, node in enumerate(nodes):
            current[i] += node.weight
            if current[i] > current[best]:
                best = i
        current[best] -= total
        order.append(nodes[best])
    return order


class Pool:
    """
    The configured nodes in order, their health, and the rotation over the
    ones in rotation now.

    The rotation is a precomputed schedule (one weighted cycle), rebuilt only
    when the set of nodes in rotation changes, so L{pick} is a list index.
    On a rebuild the cycle resumes after the node picked last, in configured
    order, so no node gets two turns in a row because another left.

    A pool with another C{balance} policy, a sticky cookie or slow start
    (L{configure}) hands picks to L{rrlb.balance} instead.

    @ivar name: the pool's name (C{default} for C{--nodes}).
    @ivar rise: consecutive successful checks that bring a node back.
    @ivar fall: consecutive failed checks that take a node out.
    @ivar max_conns_per_node: the limit of nodes whose spec sets none (0: no
        limit); applied by L{update}.
    @ivar latency_aware: whether the policy wants response times
        (L{observe}).
    """

    log = Logger()

    def __init__(
        self,
        specs: Iterable[NodeSpec],
        rise: int = 2,
        fall: int = 3,
        max_conns_per_node: int = 0,
        name: str = "default",
        clock: Any = None,
    ) -> None:
        self.name = name
        # Log lines of a named pool say which (one URL may be in several).
        self._where = "" if name == "default" else f"pool {name}: "
        self.clock = clock
        self.rise = rise
        self.fall = fall
        self.max_conns_per_node = max_conns_per_node
        # Whether any node has a limit: without one, pick() never looks at
        # in-flight counts.
        self._limited = False
        self.nodes: list[Node] = []
        self._by_key: dict[str, Node] = {}
        self._by_sticky: dict[bytes, Node] = {}
        self._schedule: list[Node] = []
        self._live: list[Node] = []
        self._next = 0
        self._last: Optional[Node] = None
        self._listeners: list[Callable[[Node], None]] = []
        # Policies (see configure): none by default, and pick() then only
        # tests _custom.
        self.balance = "roundrobin"
        self.hash_key = "source"
        self.policy: Optional[Policy] = None
        self.sticky: Optional[Sticky] = None
        self.slow_start: Optional[SlowStart] = None
        self.latency_aware = False
        self._custom = False
        self._ramp = RoundRobin()
        self.update(specs)

    def configure(
        self,
        balance: str = "roundrobin",
        hash_key: str = "source",
        sticky: Optional[str] = None,
        slow_start: float = 0.0,
        rng: Optional[random.Random] = None,
    ) -> None:
        """
        Take the pool's balancing settings (at start-up and on reload). A
        policy whose settings did not change keeps its state.
        """
        if (
            balance != self.balance
            or hash_key != self.hash_key
            or (self.policy is None and balance != "roundrobin")
        ):
            self.policy = make_policy(balance, hash_key, rng)
        self.balance = balance
        self.hash_key = hash_key
        if sticky is None:
            self.sticky = None
        elif self.sticky is None or self.sticky.name != sticky:
            self.sticky = Sticky(sticky)
        if slow_start > 0 and self.clock is not None:
            if self.slow_start is None:
                self.slow_start = SlowStart(slow_start, self.clock)
            self.slow_start.seconds = slow_start
        else:
            self.slow_start = None
            for node in self.nodes:
                node.up_since = None
        weight = self.slow_start.weight if self.slow_start is not None else plain_weight
        for policy in (self.policy, self._ramp):
            if policy is not None:
                policy.weight = weight
                policy.clock = self.clock
        self.latency_aware = balance == "p2c"
        self._custom = (
            self.policy is not None or self.sticky is not None or self.slow_start is not None
        )
        self._rebuild()

    # -- the rotation -------------------------------------------------------

    def pick(self, request: Any = None) -> Optional[Node]:
        """
        The next node in rotation with room for one more request, or L{None}
        when no node is in rotation or every one is full (see L{serving}).

        @param request: what policies that look at the request read (see
            L{rrlb.balance}); round robin ignores it.
        """
        if self._custom:
            return self._pick_custom(request)
        # The default: the next entry of the schedule (kept inline, as this
        # runs once per request; _scheduled is the same for _pick_custom).
        schedule = self._schedule
        if not schedule:
            return None
        i = self._next
        if i >= len(schedule):
            i = 0
        node = schedule[i]
        if self._limited and node.limit and node.in_flight >= node.limit:
            return self._pick_with_room(i)
        self._next = i + 1
        self._last = node
        return node

    def _scheduled(self) -> Optional[Node]:
        schedule = self._schedule
        if not schedule:
            return None
        i = self._next
        if i >= len(schedule):
            i = 0
        node = schedule[i]
        if self._limited and node.limit and node.in_flight >= node.limit:
            return self._pick_with_room(i)
        self._next = i + 1
        self._last = node
        return node

    def _pick_custom(self, request: Any) -> Optional[Node]:
        sticky = self.sticky
        if sticky is not None and request is not None:
            value = sticky.value(request)
            if value is not None:
                node = self._by_sticky.get(value)
                if node is not None and node.in_rotation and has_room(node):
                    return node
        policy = self.policy
        if policy is not None:
            return policy.pick(self._live, request)
        if self.slow_start is not None and any(n.up_since is not None for n in self._live):
            return self._ramp.pick(self._live, request)
        return self._scheduled()

    def sticky_header(self, request: Any, node: Node) -> Optional[bytes]:
        """
        The C{Set-Cookie} value to send with C{node}'s response, or L{None}
        when the pool has no sticky cookie or the request's already names
        C{node}.
        """
        sticky = self.sticky
        if sticky is None or sticky.value(request) == node.sticky_id:
            return None
        return sticky.header(node)

    def observe(self, node: Node, seconds: float) -> None:
        """
        A response head came from C{node} after C{seconds} (for p2c).
        """
        observe(node, seconds, self.clock.seconds() if self.clock is not None else 0.0)

    def _pick_with_room(self, start: int) -> Optional[Node]:
        """
        The first node with room after position C{start} of the schedule,
        going round once (HAProxy's maxconn: a full server is skipped).
        """
        schedule = self._schedule
        size = len(schedule)
        for step in range(1, size):
            i = (start + step) % size
            node = schedule[i]
            if not node.limit or node.in_flight < node.limit:
                self._next = i + 1
                self._last = node
                return node
        return None

    @property
    def serving(self) -> bool:
        """
        Whether any node is in rotation (full or not): when L{pick} gives
        L{None} and this is true, a request waits for a slot.
        """
        return bool(self._schedule)

    def pick_other(self, tried: Sequence[Node]) -> Optional[Node]:
        """
        The next node in rotation that is not in C{tried} (for a retry), or
        L{None}.
        """
        if self._custom:
            others = [n for n in self._live if n not in tried]
            return (self.policy or self._ramp).pick(others, None)
        for _ in range(len(self._schedule)):
            node = self.pick()
            if node is None or node not in tried:
                return node
        return None

    def _rebuild(self) -> None:
        live = [n for n in self.nodes if n.in_rotation]
        self._live = live
        if self.policy is not None:
            self.policy.rebuild(live)
        self._ramp.rebuild(live)
        if len({n.weight for n in live}) > 1:
            schedule = smooth_weighted_order(live)
        else:
            schedule = live
        self._schedule = schedule
        self._next = 0
        last = self._last
        if last is None or not schedule:
            return
        # Resume after the last node picked, by configured position.
        for i, node in enumerate(schedule):
            if node.index > last.index:
                self._next = i
                return

    @property
    def in_rotation(self) -> list[Node]:
        return [n for n in self.nodes if n.in_rotation]

    # -- membership ---------------------------------------------------------

    def get(self, key: str) -> Optional[Node]:
        return self._by_key.get(key)

    def update(self, specs: Iterable[NodeSpec]) -> tuple[list[Node], list[Node]]:
        """
        Make the node set the given one. Nodes that stay keep their health
        state and counters; new nodes start healthy; removed nodes leave the
        rotation at once and are marked C{removed} so that their in-flight
        requests can finish.

        @return: the nodes added and the nodes removed.
        """
        old = self._by_key
        nodes = []
        added = []
        # Nodes a reload adds ramp up like ones that came back (not at start).
        ramp = self._ramping_now() if self.nodes else None
        for index, spec in enumerate(specs):
            node = old.get(spec.key)
            if node is None:
                node = Node(spec, index, self.name)
                node.up_since = ramp
                added.append(node)
            else:
                node.set_spec(spec)
                node.index = index
            nodes.append(node)
        keys = {n.key for n in nodes}
        removed = [n for n in self.nodes if n.key not in keys]
        for node in removed:
            node.removed = True
        default = self.max_conns_per_node
        for node in nodes:
            own = node.spec.max_connections
            node.limit = default if own is None else own
        self._limited = any(n.limit for n in nodes)
        self.nodes = nodes
        self._by_key = {n.key: n for n in nodes}
        self._by_sticky = {n.sticky_id: n for n in nodes}
        self._rebuild()
        return added, removed

    def set_thresholds(self, rise: int, fall: int) -> None:
        self.rise = rise
        self.fall = fall

    # -- health -------------------------------------------------------------

    def mark(
        self,
        node: Node,
        ok: bool,
        reason: str = "",
        when: Optional[float] = None,
        latency: Optional[float] = None,
    ) -> None:
        """
        Record the outcome of one check of C{node}: C{fall} failures in a row
        take it out of rotation, C{rise} successes in a row bring it back.
        """
        if when is not None:
            node.last_check = when
        if latency is not None:
            node.last_latency = latency
        if ok:
            node.successes += 1
            node.failures = 0
            node.last_error = None
            if not node.healthy and node.successes >= self.rise:
                node.healthy = True
                node.up_since = self._ramping_now()
                self.log.info(
                    "{where}node {node} is up: {successes} checks in a row passed ({reason})",
                    where=self._where,
                    pool=self.name,
                    node=node.url,
                    successes=node.successes,
                    reason=reason or "ok",
                )
                self._changed(node)
        else:
            node.failures += 1
            node.successes = 0
            node.last_error = reason
            if node.healthy and node.failures >= self.fall:
                node.healthy = False
                self.log.warn(
                    "{where}node {node} is down: {failures} checks in a row failed,"
                    " last: {reason}",
                    where=self._where,
                    pool=self.name,
                    node=node.url,
                    failures=node.failures,
                    reason=reason,
                )
                self._changed(node)

    def set_drained(self, node: Node, drained: bool) -> None:
        """
        Take a node out of rotation by hand, or put it back.
        """
        if node.drained != drained:
            node.drained = drained
            if not drained:
                node.up_since = self._ramping_now()
            self.log.info(
                "{where}node {node} {what} by the operator",
                where=self._where,
                pool=self.name,
                node=node.url,
                what="drained" if drained else "enabled",
            )
            self._changed(node)

    def _ramping_now(self) -> Optional[float]:
        """
        When a node entering the rotation now starts its slow start, or
        L{None} without slow start.
        """
        if self.slow_start is None:
            return None
        return float(self.clock.seconds())

    def add_listener(self, listener: Callable[[Node], None]) -> None:
        """
        Call C{listener(node)} whenever a node enters or leaves the rotation.
        """
        self._listeners.append(listener)

    def _changed(self, node: Node) -> None:
        self._rebuild()
        for listener in self._listeners:
            listener(node)


class Pools:
    """
    Every pool by name, in configured order: what the admin API, metrics
    and notifications read. A listener added here hears about every pool's
    nodes, including pools a reload adds.
    """

    def __init__(self, pools: Iterable[Pool] = ()) -> None:
        self.by_name: dict[str, Pool] = {}
        self._listeners: list[Callable[[Node], None]] = []
        self.set(pools)

    def set(self, pools: Iterable[Pool]) -> None:
        """
        Make these the pools, in this order.
        """
        pools = list(pools)
        for pool in pools:
            if pool.name not in self.by_name:
                for listener in self._listeners:
                    pool.add_listener(listener)
        self.by_name = {pool.name: pool for pool in pools}

    def __iter__(self) -> Iterator[Pool]:
        return iter(list(self.by_name.values()))

    def __len__(self) -> int:
        return len(self.by_name)

    def get(self, name: str) -> Optional[Pool]:
        return self.by_name.get(name)

    @property
    def nodes(self) -> list[Node]:
        """
        Every pool's nodes, pool after pool.
        """
        return [node for pool in self.by_name.values() for node in pool.nodes]

    def add_listener(self, listener: Callable[[Node], None]) -> None:
        """
        Call C{listener(node)} whenever a node of any pool enters or leaves
        the rotation.
        """
        self._listeners.append(listener)
        for pool in self.by_name.values():
            pool.add_listener(listener)
