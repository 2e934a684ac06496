# -*- test-case-name: tests.test_admin -*-
"""
What rrlb counts about the traffic it serves, and how it is read.

Per request the proxy's site calls L{Metrics.record} once, when the response
ends (or when the client went away before it did). That call only bumps
plain ints in dicts and, when an access log is on, appends one small tuple
to it: no Prometheus objects, no label lookups and no string formatting on
the request path. Everything is turned into Prometheus metrics by
L{RrlbCollector} at scrape time and into the C{/status} document by
L{Metrics.status}, both reading the pool's nodes as they are now.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Callable, Iterator, Optional

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from rrlb import __version__
from rrlb._twisted import client_gone, raw_headers
from rrlb.parser import CLIENT_ERROR_REASONS
from rrlb.pool import DOWN, DRAINING, UP, Pools

# Upper bounds (seconds) of the upstream latency histogram's buckets: the
# time from sending a request to a node until its response head arrived.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Methods counted under their own name; any other is "other", which keeps the
# label set small whatever clients send.
METHOD_CLASSES = {
    m: m.decode("ascii")
    for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE")
}
_STATUS_CLASSES = ("1xx", "1xx", "2xx", "3xx", "4xx", "5xx")

# The status logged and counted for a request whose client went away before
# any response head was sent to it (nginx's "client closed request").
CLIENT_CLOSED = 499

# The label value of requests rrlb answered itself without choosing a node
# (503 with no node in rotation, 405 for CONNECT, 400 for a bad target).
NO_NODE = "none"

# The error responses rrlb makes itself, always exported (zero until seen).
PROXY_ERRORS = (502, 503, 504)


def status_class(code: int) -> str:
    """
    C{"2xx"} for 200 and so on; codes outside 100-599 count as C{"5xx"}.
    """
    cls = code // 100
    return _STATUS_CLASSES[cls] if 0 <= cls < 6 else "5xx"


class Metrics:
    """
    The counters, and the read side over them and the pool.

    @ivar requests: C{((pool, node key), method class, status)} -> requests,
        where status is the code the client got (or L{CLIENT_CLOSED}); the
        node key is L{NO_NODE} for responses rrlb made without a node, and
        so is the pool when no route matched.
    @ivar latency: C{(pool, node key)} -> bucket counts (one per L{LATENCY_BUCKETS}
        bound, then +Inf, not cumulative) followed by the sum of seconds.
    @ivar proxy_errors: status code -> responses rrlb made itself with it.
    @ivar access_log: where L{record} hands each request's fields, if on.
    """

    def __init__(
        self,
        pools: Pools,
        clock: Any,
        stats: Any = None,
        checkers: Callable[[], list[Any]] = lambda: [],
        queues: Callable[[], list[Any]] = lambda: [],
        budget: Any = None,
        connections: Callable[[], int] = lambda: 0,
        upstream_connections: Callable[[], int] = lambda: 0,
        clients: Callable[[], list[dict[str, Any]]] = lambda: [],
    ) -> None:
        self.clients = clients
        self.pools = pools
        self.clock = clock
        self.stats = stats
        self.checkers = checkers
        # Configurations applied, by source (set by the control side).
        self.config_changes: Callable[[], dict[str, int]] = lambda: {}
        self.queues = queues
        self.budget = budget
        self.connections = connections
        self.upstream_connections = upstream_connections
        self.started = clock.seconds()
        self.requests: dict[tuple[tuple[str, str], str, int], int] = {}
        self.latency: dict[tuple[str, str], list[float]] = {}
        self.proxy_errors: dict[int, int] = dict.fromkeys(PROXY_ERRORS, 0)
        self.client_errors: dict[str, int] = dict.fromkeys(CLIENT_ERROR_REASONS, 0)
        self.access_log: Any = None
        # The TLS certificates served, as rrlb.acme.certificate_status
        # describes them, and the ACME orders by result (None: ACME is
        # off); the control side sets both.
        self.certificates: Callable[[], list[dict[str, Any]]] = lambda: []
        self.acme_orders: Callable[[], Optional[dict[str, int]]] = lambda: None
        # The rate limits' state (rrlb.limits.LimitStores), once a filter
        # made one.
        self.limits: Any = None

    # -- the request path ----------------------------------------------------

    def record(self, request: Any) -> None:
        """
        Count one request whose response ended (C{Site.log}) or whose client
        went away first, and hand its fields to the access log.

        A client that left before any response head was sent to it is
        counted and logged as L{CLIENT_CLOSED}; one that left (or was cut
        off) mid-body is counted with the status it was sent.
        """
        code = request.code
        if client_gone(request) and not request.startedWriting:
            code = CLIENT_CLOSED
        exchange = request.exchange
        upstream_status = upstream_time = None
        reason = request.client_error
        if reason is not None:
            self.client_errors[reason] = self.client_errors.get(reason, 0) + 1
        if exchange is None:
            key = (request.pool_name or NO_NODE, NO_NODE)
            url = None
            if code in self.proxy_errors:
                self.proxy_errors[code] += 1
        else:
            node = exchange.node
            key = node.label
            url = node.spec.url
            upstream_status = exchange.upstream_status
            upstream_time = exchange.upstream_time
            if upstream_time is not None:
                buckets = self.latency.get(key)
                if buckets is None:
                    buckets = self.latency[key] = [0.0] * (len(LATENCY_BUCKETS) + 2)
                buckets[bisect_left(LATENCY_BUCKETS, upstream_time)] += 1
                buckets[-1] += upstream_time
            elif code in self.proxy_errors:
                # No response head came from a node: rrlb made this one.
                self.proxy_errors[code] += 1
        method = request.method
        counter = (key, METHOD_CLASSES.get(method, "other"), code)
        requests = self.requests
        requests[counter] = requests.get(counter, 0) + 1
        access_log = self.access_log
        if access_log is not None:
            headers = raw_headers(request.requestHeaders)
            referer = headers.get(b"Referer")
            agent = headers.get(b"User-Agent")
            entry: Any = (
                self.clock.seconds(),
                request.real_client or getattr(request.client, "host", None),
                method,
                request.uri,
                request.clientproto,
                code,
                request.sentLength,
                referer[0] if referer else None,
                agent[0] if agent else None,
                url,
                upstream_status,
                upstream_time,
            )
            if code == 101 and exchange is not None and exchange.tunnel is not None:
                # A WebSocket tunnel: its bytes each way and how long it was open.
                entry += (exchange.tunnel.summary(),)
            notes = request.log_notes
            client_cert = getattr(request.channel, "client_cert", None)
            if client_cert is not None:
                # The subject of the client's certificate (tls.client_auth),
                # last on the line.
                notes = {**(notes or {}), "client_cert_subject": client_cert.subject}
            if notes is not None:
                # Fields filters added (request_id, trace_id, ...).
                entry += (notes,) if len(entry) == 13 else (None, notes)
            access_log.append(entry)

    # -- the read side -------------------------------------------------------

    def uptime(self) -> float:
        return max(0.0, self.clock.seconds() - self.started)

    def node_status(self, index: int, node: Any) -> dict[str, Any]:
        """
        One node as C{/status} shows it.
        """
        return {
            "id": index,
            "pool": node.pool_name,
            "name": node_name(node),
            "url": node.url,
            "state": node.state,
            "healthy": node.healthy,
            "drained": node.drained,
            "in_rotation": node.in_rotation,
            "weight": node.weight,
            "consecutive_successes": node.successes,
            "consecutive_failures": node.failures,
            "last_check": node.last_check,
            "last_latency": node.last_latency,
            "last_error": node.last_error,
            "in_flight": node.in_flight,
            "max_connections": node.limit,
            "requests": node.requests,
            "errors": node.errors,
        }

    def status(self) -> dict[str, Any]:
        """
        The C{/status} document: every node, and the process.
        """
        pools = []
        nodes = []
        for pool in self.pools:
            in_pool = [self.node_status(i, n) for i, n in enumerate(pool.nodes)]
            nodes.extend(in_pool)
            pools.append(
                {
                    "name": pool.name,
                    "balance": pool.balance,
                    "hash_key": pool.hash_key if pool.balance == "hash" else None,
                    "sticky_cookie": pool.sticky.name if pool.sticky is not None else None,
                    "slow_start": pool.slow_start.seconds if pool.slow_start is not None else 0,
                    "nodes": in_pool,
                }
            )
        states = {UP: 0, DOWN: 0, DRAINING: 0}
        for node in nodes:
            states[node["state"]] += 1
        return {
            "process": {
                "version": __version__,
                "time": self.clock.seconds(),
                "started": self.started,
                "uptime": self.uptime(),
                "connections": self.connections(),
                "upstream_connections": self.upstream_connections(),
                "requests": sum(self.requests.values()),
                "retries": self.retries(),
                "retries_refused": self.retries_refused(),
                "queue_length": self.queue_length(),
                "queue_timeouts": self.queue_timeouts(),
                "tunnels_open": self.tunnels_open(),
                "nodes": states,
            },
            "pools": pools,
            "nodes": nodes,
            "clients": self.clients(),
            "certificates": self.certificates(),
        }

    def retries(self) -> int:
        return int(getattr(self.stats, "retries", 0))

    def retries_refused(self) -> int:
        return int(getattr(self.budget, "refused", 0))

    def tunnels_open(self) -> int:
        return int(getattr(self.stats, "tunnels_open", 0))

    def filter_errors(self) -> dict[str, int]:
        """
        Failures of filters, by label (the C{use:} string or the kind).
        """
        return dict(getattr(self.stats, "filter_errors", {}))

    def tunnel_bytes(self) -> dict[str, int]:
        """
        Bytes copied through WebSocket tunnels, by direction.
        """
        stats = self.stats
        return {
            "to_node": int(getattr(stats, "tunnel_bytes_to_node", 0)),
            "to_client": int(getattr(stats, "tunnel_bytes_to_client", 0)),
        }

    def queue_length(self) -> int:
        return sum(len(queue) for queue in self.queues())

    def queue_timeouts(self) -> int:
        return sum(int(getattr(queue, "timeouts", 0)) for queue in self.queues())

    def rate_limits(self) -> tuple[dict[tuple[str, str], int], int, int]:
        """
        Requests refused by a limit by C{(route, filter)}, the keys in the
        local tables, and the store errors.
        """
        limits = self.limits
        if limits is None:
            return {}, 0, 0
        return dict(limits.rate_limited), limits.keys(), limits.store_errors()

    def health_results(self) -> dict[tuple[tuple[str, str], bool], int]:
        results: dict[tuple[tuple[str, str], bool], int] = {}
        for checker in self.checkers():
            results.update(getattr(checker, "results", {}))
        return results


def node_name(node: Any) -> str:
    """
    A node's stable name for the admin API: C{host:port} and its base path,
    e.g. C{10.0.0.1:8080} or C{10.0.0.1:8080/app}.
    """
    host = f"[{node.host}]" if ":" in node.host else node.host
    return f"{host}:{node.port}{node.base_path.decode('ascii')}"


class RrlbCollector:
    """
    A C{prometheus_client} collector that builds every C{rrlb_} metric from
    L{Metrics} when scraped.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        nodes = list(m.pools.nodes)

        requests = CounterMetricFamily(
            "rrlb_requests",
            "Requests answered, by pool (none: no route matched), node (none: answered"
            " by rrlb without a node), method class and status class (499: the client"
            " left first).",
            labels=["pool", "node", "method", "status"],
        )
        by_class: dict[tuple[str, str, str, str], int] = {}
        for ((pool, key), method, code), count in m.requests.items():
            label = (pool, key, method, status_class(code))
            by_class[label] = by_class.get(label, 0) + count
        for label, count in sorted(by_class.items()):
            requests.add_metric(list(label), count)
        yield requests

        latency = HistogramMetricFamily(
            "rrlb_upstream_latency_seconds",
            "Time from sending a request to a node until its response head arrived.",
            labels=["pool", "node"],
        )
        for (pool, key), counts in sorted(m.latency.items()):
            cumulative = 0.0
            buckets = []
            bounds: tuple[float, ...] = LATENCY_BUCKETS + (float("inf"),)
            for bound, in_bucket in zip(bounds, counts):
                cumulative += in_bucket
                buckets.append((_bound(bound), cumulative))
            latency.add_metric([pool, key], buckets, sum_value=counts[-1])
        yield latency

        in_flight = GaugeMetricFamily(
            "rrlb_in_flight_requests",
            "Requests being served by a node now.",
            labels=["pool", "node"],
        )
        healthy = GaugeMetricFamily(
            "rrlb_node_healthy",
            "1 if the node's health checks say it is up, else 0.",
            labels=["pool", "node"],
        )
        in_rotation = GaugeMetricFamily(
            "rrlb_node_in_rotation",
            "1 if the node gets new requests now (healthy and not drained), else 0.",
            labels=["pool", "node"],
        )
        state = GaugeMetricFamily(
            "rrlb_node_state",
            "The node's state as the status page shows it: 1 for the current one.",
            labels=["pool", "node", "state"],
        )
        node_in_flight = GaugeMetricFamily(
            "rrlb_node_in_flight",
            "Requests in flight to the node now (at most its max_connections, if set).",
            labels=["pool", "node"],
        )
        errors = CounterMetricFamily(
            "rrlb_node_errors",
            "Requests a node failed (refused, reset, bad response, timed out).",
            labels=["pool", "node"],
        )
        for node in nodes:
            labels = [node.pool_name, node.key]
            in_flight.add_metric(labels, node.in_flight)
            node_in_flight.add_metric(labels, node.in_flight)
            healthy.add_metric(labels, 1 if node.healthy else 0)
            in_rotation.add_metric(labels, 1 if node.in_rotation else 0)
            current = node.state
            for name in (UP, DOWN, DRAINING):
                state.add_metric(labels + [name], 1 if name == current else 0)
            errors.add_metric(labels, node.errors)
        yield in_flight
        yield node_in_flight
        yield healthy
        yield in_rotation
        yield state
        yield errors

        checks = CounterMetricFamily(
            "rrlb_health_checks",
            "Active health checks, by node and result (pass or fail).",
            labels=["pool", "node", "result"],
        )
        for ((pool, key), ok), count in sorted(m.health_results().items()):
            checks.add_metric([pool, key, "pass" if ok else "fail"], count)
        yield checks

        yield CounterMetricFamily(
            "rrlb_retries",
            "Requests retried on another node after the first failed to connect.",
            value=m.retries(),
        )
        yield CounterMetricFamily(
            "rrlb_retries_refused",
            "Retries not made because the retry budget was spent (the client got 502).",
            value=m.retries_refused(),
        )
        changes = CounterMetricFamily(
            "rrlb_config_changes",
            "Configurations applied, by source: sighup (a reload from the file) or api"
            " (the admin API's PUT /config and node changes).",
            labels=["source"],
        )
        for source, count in m.config_changes().items():
            changes.add_metric([source], count)
        yield changes
        yield GaugeMetricFamily(
            "rrlb_queue_length",
            "Requests waiting now because every node in rotation is full.",
            value=m.queue_length(),
        )
        yield GaugeMetricFamily(
            "rrlb_tunnels_open",
            "WebSocket (Upgrade) tunnels open now.",
            value=m.tunnels_open(),
        )
        tunnel_bytes = CounterMetricFamily(
            "rrlb_tunnel_bytes",
            "Bytes copied through WebSocket tunnels, by direction (to_node: from"
            " clients to nodes; to_client: from nodes to clients).",
            labels=["direction"],
        )
        for direction, count in m.tunnel_bytes().items():
            tunnel_bytes.add_metric([direction], count)
        yield tunnel_bytes
        yield CounterMetricFamily(
            "rrlb_queue_timeouts",
            "Requests that waited the whole queue timeout and got 503.",
            value=m.queue_timeouts(),
        )
        proxy_errors = CounterMetricFamily(
            "rrlb_proxy_errors",
            "Error responses rrlb made itself: 502 (node failed), 503 (no node"
            " in rotation), 504 (node too slow).",
            labels=["code"],
        )
        for code, count in sorted(m.proxy_errors.items()):
            proxy_errors.add_metric([str(code)], count)
        yield proxy_errors
        client_errors = CounterMetricFamily(
            "rrlb_client_errors",
            "Requests rrlb refused itself, by reason: a limit (header_too_large,"
            " too_many_headers, uri_too_long, body_too_large), a timeout (header_timeout,"
            " body_timeout) or a malformed request (bad_request, bad_framing,"
            " unknown_coding, bad_version).",
            labels=["reason"],
        )
        for reason, count in sorted(m.client_errors.items()):
            client_errors.add_metric([reason], count)
        yield client_errors
        filter_errors = CounterMetricFamily(
            "rrlb_filter_errors",
            "Filters that raised, returned something else than None, an Answer or a"
            " Deferred, or whose Deferred failed (the client got 500), by filter: its"
            " use: string or its kind.",
            labels=["filter"],
        )
        for name, count in sorted(m.filter_errors().items()):
            filter_errors.add_metric([name], count)
        yield filter_errors

        refused, keys, store_errors = m.rate_limits()
        limited = CounterMetricFamily(
            "rrlb_rate_limited",
            "Requests answered 429 by a rate_limit or limit_in_flight filter, by route"
            " (its name or index; empty for top-level filters) and filter.",
            labels=["route", "filter"],
        )
        for (route, kind), count in sorted(refused.items()):
            limited.add_metric([route, kind], count)
        yield limited
        yield GaugeMetricFamily(
            "rrlb_rate_limit_keys", "Keys held in the local rate-limit tables.", value=keys
        )
        yield CounterMetricFamily(
            "rrlb_rate_limit_store_errors",
            "Rate-limit decisions a store could not make (unreachable, no answer within"
            " 50 ms, or a wrong answer).",
            value=store_errors,
        )
        yield GaugeMetricFamily(
            "rrlb_client_connections", "Client connections open now.", value=m.connections()
        )
        yield GaugeMetricFamily(
            "rrlb_upstream_connections",
            "Connections to nodes open now (busy and idle).",
            value=m.upstream_connections(),
        )
        yield GaugeMetricFamily(
            "rrlb_start_time_seconds", "When rrlb started, in Unix time.", value=m.started
        )
        yield GaugeMetricFamily("rrlb_uptime_seconds", "Seconds since start.", value=m.uptime())
        expiry = GaugeMetricFamily(
            "rrlb_tls_certificate_expiry_seconds",
            "When each name's TLS certificate expires (its notAfter), in Unix time.",
            labels=["name"],
        )
        seen: set[str] = set()
        for cert in m.certificates():
            for name in cert["names"]:
                if name not in seen:
                    seen.add(name)
                    expiry.add_metric([name], cert["not_after"])
        yield expiry
        orders = m.acme_orders()
        if orders is not None:
            acme = CounterMetricFamily(
                "rrlb_acme_orders",
                "Certificate orders to the ACME CA, by result.",
                labels=["result"],
            )
            for result in ("ok", "error"):
                acme.add_metric([result], orders.get(result, 0))
            yield acme
        info = GaugeMetricFamily("rrlb_info", "rrlb's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def exposition(metrics: Metrics) -> bytes:
    """
    Every C{rrlb_} metric in the Prometheus text format; a registry of our
    own, so no default process or platform metrics join in.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RrlbCollector(metrics))
    return generate_latest(registry)
