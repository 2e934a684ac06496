# -*- test-case-name: tests.test_workers -*-
"""
The main process's counts of C{--workers}: what each worker counted
(L{Counters}, gathered over the wire), added up by pool and node, and read
by the admin endpoint (L{WorkersMetrics}, L{MainAdminSite}) and the status
page's charts (L{WorkersHistory}) as a single process's are.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from rrlb.admin import AdminResource, AdminSite
from rrlb.history import History
from rrlb.metrics import PROXY_ERRORS, Metrics
from rrlb.parser import CLIENT_ERROR_REASONS
from rrlb.pool import Node, Pool, Pools
from rrlb.runtime import Control

log = Logger()

Label = tuple[str, str]


class CounterSource(Protocol):
    """
    Where the workers' counts come from (L{rrlb.workers.supervisor.WorkerSupervisor}).
    """

    def gather(self, clients: bool = True) -> defer.Deferred[Counters]:
        """
        Every worker's counters, added up (with their client connections if
        C{clients}).
        """

    def describe(self) -> list[dict[str, Any]]:
        """
        The workers as C{/status} shows them.
        """

    def limit_keys(self) -> int:
        """
        The keys of the instance's local rate-limit tables.
        """


@dataclasses.dataclass
class Counters:
    """
    What a worker counted, in a form that adds up. Nodes are keyed by
    C{(pool, node key)} as L{Metrics} keys them. Gauges (open connections,
    queue lengths, requests in flight, the client list) are left out of the
    counts kept for workers that died.

    @ivar queues: pool -> C{[queue length, queue timeouts]}.
    @ivar nodes: C{(pool, node key)} -> C{[in flight, requests, errors]}.
    """

    requests: dict[tuple[Label, str, int], int] = dataclasses.field(default_factory=dict)
    latency: dict[Label, list[float]] = dataclasses.field(default_factory=dict)
    proxy_errors: dict[int, int] = dataclasses.field(default_factory=dict)
    client_errors: dict[str, int] = dataclasses.field(default_factory=dict)
    retries: int = 0
    retries_refused: int = 0
    queues: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    connections: int = 0
    upstream_connections: int = 0
    nodes: dict[Label, list[int]] = dataclasses.field(default_factory=dict)
    clients: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # WebSocket tunnels: open now (a gauge), bytes to nodes and to clients.
    tunnels_open: int = 0
    tunnel_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    filter_errors: dict[str, int] = dataclasses.field(default_factory=dict)
    # Rate limits: 429s by (route, filter), and the store errors.
    rate_limited: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    store_errors: int = 0

    @classmethod
    def of(
        cls,
        metrics: Metrics,
        pools: Pools,
        queues: Mapping[str, Any],
        clients: Optional[list[dict[str, Any]]] = None,
    ) -> Counters:
        """
        The counters of a worker's L{Metrics}, its pools and their queues
        (pool name -> L{rrlb.queue.RequestQueue}).
        """
        rate_limited, _, store_errors = metrics.rate_limits()
        return cls(
            requests=dict(metrics.requests),
            latency={k: list(v) for k, v in metrics.latency.items()},
            proxy_errors=dict(metrics.proxy_errors),
            client_errors=dict(metrics.client_errors),
            retries=metrics.retries(),
            retries_refused=metrics.retries_refused(),
            queues={name: [len(q), int(q.timeouts)] for name, q in queues.items()},
            connections=metrics.connections(),
            upstream_connections=metrics.upstream_connections(),
            nodes={n.label: [n.in_flight, n.requests, n.errors] for n in pools.nodes},
            clients=list(clients or ()),
            tunnels_open=metrics.tunnels_open(),
            tunnel_bytes=metrics.tunnel_bytes(),
            filter_errors=metrics.filter_errors(),
            rate_limited=rate_limited,
            store_errors=store_errors,
        )

    def to_json(self) -> dict[str, Any]:
        # JSON has no tuple keys: the keyed counts travel as rows.
        return {
            "requests": [[p, k, m, c, n] for ((p, k), m, c), n in self.requests.items()],
            "latency": [[p, k, b] for (p, k), b in self.latency.items()],
            "proxy_errors": [[code, n] for code, n in self.proxy_errors.items()],
            "client_errors": self.client_errors,
            "retries": self.retries,
            "retries_refused": self.retries_refused,
            "queues": self.queues,
            "connections": self.connections,
            "upstream_connections": self.upstream_connections,
            "nodes": [[p, k, *counts] for (p, k), counts in self.nodes.items()],
            "clients": self.clients,
            "tunnels_open": self.tunnels_open,
            "tunnel_bytes": self.tunnel_bytes,
            "filter_errors": self.filter_errors,
            "rate_limited": [[r, f, n] for (r, f), n in self.rate_limited.items()],
            "store_errors": self.store_errors,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Counters:
        return cls(
            requests={((p, k), m, int(c)): int(n) for p, k, m, c, n in value["requests"]},
            latency={(p, k): [float(x) for x in b] for p, k, b in value["latency"]},
            proxy_errors={int(c): int(n) for c, n in value["proxy_errors"]},
            client_errors={str(r): int(n) for r, n in value["client_errors"].items()},
            retries=int(value["retries"]),
            retries_refused=int(value["retries_refused"]),
            queues={str(p): [int(x) for x in q] for p, q in value["queues"].items()},
            connections=int(value["connections"]),
            upstream_connections=int(value["upstream_connections"]),
            nodes={(p, k): [int(x) for x in counts] for p, k, *counts in value["nodes"]},
            clients=list(value["clients"]),
            tunnels_open=int(value.get("tunnels_open", 0)),
            tunnel_bytes={str(d): int(n) for d, n in value.get("tunnel_bytes", {}).items()},
            filter_errors={str(f): int(n) for f, n in value.get("filter_errors", {}).items()},
            rate_limited={(str(r), str(f)): int(n) for r, f, n in value.get("rate_limited", [])},
            store_errors=int(value.get("store_errors", 0)),
        )

    def add(self, other: Counters, gauges: bool = True) -> None:
        for key, count in other.requests.items():
            self.requests[key] = self.requests.get(key, 0) + count
        for label, buckets in other.latency.items():
            mine = self.latency.get(label)
            if mine is None:
                self.latency[label] = list(buckets)
            else:
                self.latency[label] = [a + b for a, b in zip(mine, buckets)]
        for code, count in other.proxy_errors.items():
            self.proxy_errors[code] = self.proxy_errors.get(code, 0) + count
        for reason, count in other.client_errors.items():
            self.client_errors[reason] = self.client_errors.get(reason, 0) + count
        self.retries += other.retries
        self.retries_refused += other.retries_refused
        for pool, (length, timeouts) in other.queues.items():
            queue = self.queues.setdefault(pool, [0, 0])
            queue[1] += timeouts
            if gauges:
                queue[0] += length
        for label, (in_flight, requests, errors) in other.nodes.items():
            counts = self.nodes.setdefault(label, [0, 0, 0])
            counts[1] += requests
            counts[2] += errors
            if gauges:
                counts[0] += in_flight
        for label, count in other.rate_limited.items():
            self.rate_limited[label] = self.rate_limited.get(label, 0) + count
        self.store_errors += other.store_errors
        for direction, count in other.tunnel_bytes.items():
            self.tunnel_bytes[direction] = self.tunnel_bytes.get(direction, 0) + count
        for name, count in other.filter_errors.items():
            self.filter_errors[name] = self.filter_errors.get(name, 0) + count
        if gauges:
            self.connections += other.connections
            self.upstream_connections += other.upstream_connections
            self.clients.extend(other.clients)
            self.tunnels_open += other.tunnels_open


class _NodeTotals:
    """
    A node of the main process's pools with the workers' counts.
    """

    def __init__(self, node: Node, counts: Sequence[int]) -> None:
        self.node = node
        self.in_flight, self.requests, self.errors = counts

    def __getattr__(self, name: str) -> Any:
        return getattr(self.node, name)


class _PoolTotals:
    """
    A pool of the main process whose nodes carry the workers' counts.
    """

    def __init__(self, pool: Pool, view: PoolsTotals) -> None:
        self.pool = pool
        self.view = view

    @property
    def nodes(self) -> list[_NodeTotals]:
        return [self.view.wrap(n) for n in self.pool.nodes]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


class PoolsTotals:
    """
    The main process's L{Pools} as L{Metrics} and L{History} read them:
    the health and drain state of its own nodes, with the requests, errors
    and requests in flight the workers counted (the main process's nodes
    serve nothing).
    """

    def __init__(self, pools: Pools) -> None:
        self.pools = pools
        self.totals = Counters()

    def wrap(self, node: Any) -> _NodeTotals:
        node = getattr(node, "node", node)
        return _NodeTotals(node, self.totals.nodes.get(node.label, (0, 0, 0)))

    def __iter__(self) -> Iterator[_PoolTotals]:
        return iter([_PoolTotals(pool, self) for pool in self.pools])

    def __len__(self) -> int:
        return len(self.pools)

    def get(self, name: str) -> Optional[_PoolTotals]:
        pool = self.pools.get(name)
        return None if pool is None else _PoolTotals(pool, self)

    @property
    def nodes(self) -> list[_NodeTotals]:
        return [self.wrap(n) for n in self.pools.nodes]


class WorkersMetrics(Metrics):
    """
    The main process's metrics: its pools' health and its checkers'
    results, with every worker's counts added up (L{load}, after
    L{WorkerSupervisor.gather}).
    """

    def __init__(
        self,
        pools: Pools,
        clock: Any,
        checkers: Callable[[], list[Any]],
        supervisor: CounterSource,
    ) -> None:
        self.supervisor = supervisor
        self.view = PoolsTotals(pools)
        super().__init__(
            self.view,  # type: ignore[arg-type]
            clock,
            checkers=checkers,
            connections=lambda: self.totals.connections,
            upstream_connections=lambda: self.totals.upstream_connections,
            clients=lambda: self.totals.clients,
        )

    @property
    def totals(self) -> Counters:
        return self.view.totals

    def refresh(self, clients: bool = True) -> defer.Deferred[None]:
        """
        Fresh counts from the workers (and their client lists if
        C{clients}), then L{load}ed.
        """
        return self.supervisor.gather(clients).addCallback(self.load)

    def load(self, totals: Counters) -> None:
        self.view.totals = totals
        self.requests = totals.requests
        self.latency = totals.latency
        self.proxy_errors = dict.fromkeys(PROXY_ERRORS, 0)
        self.proxy_errors.update(totals.proxy_errors)
        self.client_errors = dict.fromkeys(CLIENT_ERROR_REASONS, 0)
        self.client_errors.update(totals.client_errors)

    def retries(self) -> int:
        return self.totals.retries

    def retries_refused(self) -> int:
        return self.totals.retries_refused

    def queue_length(self) -> int:
        return sum(length for length, _ in self.totals.queues.values())

    def tunnels_open(self) -> int:
        return self.totals.tunnels_open

    def tunnel_bytes(self) -> dict[str, int]:
        return {"to_node": 0, "to_client": 0, **self.totals.tunnel_bytes}

    def filter_errors(self) -> dict[str, int]:
        return dict(self.totals.filter_errors)

    def queue_timeouts(self) -> int:
        return sum(timeouts for _, timeouts in self.totals.queues.values())

    def rate_limits(self) -> tuple[dict[tuple[str, str], int], int, int]:
        # The keys are held here, in the main process's tables.
        totals = self.totals
        keys = self.supervisor.limit_keys()
        return dict(totals.rate_limited), keys, totals.store_errors

    def node_status(self, index: int, node: Any) -> dict[str, Any]:
        return super().node_status(index, self.view.wrap(node))

    def status(self) -> dict[str, Any]:
        document = super().status()
        document["workers"] = self.supervisor.describe()
        return document


class WorkersHistory(History):
    """
    The status page's charts in the main process: each sample first gathers
    the workers' counts (without their client lists), so the charts show
    what every worker served. A sample that waits for a slow worker delays
    the next one rather than overlapping it.
    """

    metrics: WorkersMetrics

    def __init__(self, pools: Pools, metrics: Metrics, clock: IReactorTime) -> None:
        # The pools are read through the metrics, with the workers' counts.
        assert isinstance(metrics, WorkersMetrics)
        super().__init__(metrics.view, metrics, clock)  # type: ignore[arg-type]

    def sample(self) -> defer.Deferred[None]:  # type: ignore[override]
        d = self.metrics.refresh(clients=False)
        d.addCallback(lambda _: History.sample(self))
        d.addErrback(lambda f: self.log.failure("sampling the workers' counts", f))
        return d


class MainAdminResource(AdminResource):
    """
    The admin tree of the main process: every answer waits for fresh counts
    from the workers first. The drain API acts on the main process's pools,
    whose listener sends the change to every worker.
    """

    def __init__(
        self,
        pools: Pools,
        metrics: WorkersMetrics,
        history: Optional[History] = None,
        control: Optional[Control] = None,
    ) -> None:
        super().__init__(pools, metrics, history, control)
        self.workers_metrics = metrics

    def render(self, request: Any) -> Any:
        if request.postpath == [b"status.css"]:
            return super().render(request)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(_: None) -> None:
            if gone:
                return
            body = AdminResource.render(self, request)
            if body is server.NOT_DONE_YET:
                return  # a change, answered once every worker runs it
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()

        def failed(reason: Failure) -> None:
            log.failure("admin request", reason)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        self.workers_metrics.refresh().addCallback(answer).addErrback(failed)
        return server.NOT_DONE_YET


class MainAdminSite(AdminSite):
    def __init__(
        self,
        pools: Pools,
        metrics: WorkersMetrics,
        history: Optional[History] = None,
        control: Optional[Control] = None,
        **kw: Any,
    ) -> None:
        resource = MainAdminResource(pools, metrics, history, control)
        super().__init__(pools, metrics, history, resource, **kw)
