# -*- test-case-name: tests.test_reload,tests.test_drain,tests.test_routing,tests.test_tls -*-
"""
The traffic side: the listeners, the L{ProxySite} and L{RotatingProxy}
behind them, the L{UpstreamPool} to the nodes, TLS, the access log, and the
drain at shutdown.

A L{Traffic} serves the pools it is given, and applies a configuration with
the pool set to run (L{Traffic.apply}). A single process composes one with
its control side (L{rrlb.service.ControlService}), which shares the pools,
so the health checkers and the proxy read and mark the same nodes. Each
worker process of C{--workers} builds one the same way around the pools
the main process sends it (L{rrlb.workers.child}).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger

from rrlb.accesslog import AccessLog
from rrlb.acmetls import AcmeServing, AcmeState, ChallengeResource
from rrlb.chain import Built, Chains, build_routes, build_steps
from rrlb.clients import ClientLimits
from rrlb.config import Config, NodeSpec, PoolConfig, all_pools
from rrlb.drain import Drain
from rrlb.exchange import ProxyExchange
from rrlb.failures import LocalErrors
from rrlb.filters import FilterContext
from rrlb.listeners import Listener, with_default_backlog
from rrlb.metrics import Metrics
from rrlb.ocsp import Stapler
from rrlb.pool import Node, Pool, Pools
from rrlb.proxy import Destination, ProxySettings, ProxySite, RotatingProxy
from rrlb.tls import BalancerTLS, ServerTLS, listen_endpoint, read_client_auth, tls_on_tcp
from rrlb.upstream import UpstreamPool

# How often nodes removed by a reload are looked at until their last
# in-flight request has finished.
RETIRED_POLL = 1.0

log = Logger()

# The endpoint of the C{index}th C{--listen} description, and its TLS when
# rrlb serves that itself (re-read on reload).
Endpoints = Callable[[int, str], tuple[IStreamServerEndpoint, Optional[ServerTLS]]]


def unique_nodes(pool_configs: Sequence[PoolConfig]) -> tuple[NodeSpec, ...]:
    """
    Every pool's nodes, each URL once (pools that share one share its
    connections).
    """
    seen: dict[str, NodeSpec] = {}
    for pc in pool_configs:
        for spec in pc.nodes:
            seen.setdefault(spec.key, spec)
    return tuple(seen.values())


def update_pools(
    pools: Pools,
    config: Config,
    pool_configs: Sequence[PoolConfig],
    new_pool: Callable[[str], Pool],
    send_proxy_changed: Callable[[str], Any] = lambda key: None,
) -> list[Node]:
    """
    Make C{pools} those of C{pool_configs}, in that order. Pools that stay
    keep their nodes' state (as do nodes that stay in them); pools that go
    take their nodes out of rotation, and those nodes finish their requests.

    @param new_pool: makes a new, empty pool of a name.
    @param send_proxy_changed: called with the key of each node whose
        C{send_proxy} changed (its idle connections began with the old
        header, or none).
    @return: the nodes that left.
    """
    removed: list[Node] = []
    running = []
    for pc in pool_configs:
        pool = pools.get(pc.name)
        if pool is None:
            pool = new_pool(pc.name)
        pool.max_conns_per_node = config.max_conns_per_node
        pool.set_thresholds(pc.health.rise, pc.health.fall)
        pool.configure(pc.balance, pc.hash_key, pc.sticky, pc.slow_start)
        by_key = {n.key: n for n in pc.nodes}
        for node in pool.nodes:
            spec = by_key.get(node.key)
            if spec is not None and spec.send_proxy != node.send_proxy:
                send_proxy_changed(node.key)
        _, gone = pool.update(pc.nodes)
        removed.extend(gone)
        for node in pool.nodes:
            node.connect_timeout = pc.connect_timeout
        running.append(pool)
    names = {pc.name for pc in pool_configs}
    for name, pool in pools.by_name.items():
        if name not in names:
            _, gone = pool.update(())
            removed.extend(gone)
            log.info("pool {pool} removed", pool=name)
    pools.set(running)
    return removed


class Traffic(MultiService):
    """
    Serves the traffic: listens, proxies to the nodes of C{pools}, writes
    the access log, and drains at shutdown.

    @param pools: the pools to serve; L{apply} sets them, and whoever else
        holds them (the control side's checkers, a worker's channel) sets
        their nodes' health.
    @param pool_configs: the pools to start with (default: those of
        C{config}).
    @param new_pool: makes an empty pool of a name (default: a L{Pool}).
    @param endpoints: the endpoints of the listeners (default: bound here,
        from their description).
    @param count_requests: count every request, for a reader of the counts
        (default: when C{config} has an admin endpoint).
    @param local_errors: logs rrlb's own resource errors, shared with the
        health probes of this process (default: this side's own).
    @param filter_state: the filters' state to start with (a worker's link
        to the main process for the local rate limits); whatever in it has
        a C{stop()} is stopped with this side.
    """

    log = log

    def __init__(
        self,
        config: Config,
        reactor: Any,
        pools: Pools,
        pool_configs: Optional[Sequence[PoolConfig]] = None,
        new_pool: Optional[Callable[[str], Pool]] = None,
        endpoints: Optional[Endpoints] = None,
        count_requests: Optional[bool] = None,
        local_errors: Optional[LocalErrors] = None,
        filter_state: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.pools = pools
        self.new_pool = new_pool or (lambda name: Pool((), name=name, clock=reactor))
        self.count_requests = config.admin is not None if count_requests is None else count_requests
        if pool_configs is None:
            pool_configs = all_pools(config)
        self.drain: Optional[Drain] = None
        # Filters' state kept across reloads (FilterContext.shared), and the
        # filters of the running configuration.
        self.filter_state: dict[str, Any] = {} if filter_state is None else filter_state
        self._built: Optional[tuple[Config, Built]] = None
        # Nodes a reload removed that still have requests in flight.
        self.retired: list[Node] = []
        self._retired_call: Any = None
        # Node creators are built once per node here and on apply(), never
        # per request; traffic and health probes share them.
        self.tls = BalancerTLS(stapler=Stapler(reactor))
        self.tls.prepare(config, unique_nodes(pool_configs))()
        self.upstream = UpstreamPool(
            reactor,
            connect_timeout=config.connect_timeout,
            timeout=config.timeout,
            max_idle_per_node=config.max_idle_per_node,
            tls_creator=self.tls.nodes,
            max_headers=config.max_headers,
        )
        # The proxy starts with the first pool, still empty.
        first = pool_configs[0]
        pool = pools.get(first.name)
        if pool is None:
            pool = self.new_pool(first.name)
        pool.set_thresholds(first.health.rise, first.health.fall)
        pool.max_conns_per_node = config.max_conns_per_node
        if not len(pools):
            pools.set([pool])
        if local_errors is None:
            # rrlb's own resource errors, for requests (and probes, if any).
            local_errors = LocalErrors(reactor)
            local_errors.setServiceParent(self)
        self.local_errors = local_errors
        self.proxy = RotatingProxy(
            pool, self.upstream, reactor, ProxySettings.from_config(config), local_errors
        )
        self.proxy.budget.percent = config.retry_budget
        self.site = ProxySite(self.proxy, reactor=reactor, limits=ClientLimits.from_config(config))
        if config.http2:
            # Only now: with --http2 off nothing of rrlb.http2 is imported.
            from rrlb.http2 import ALPN_PROTOCOLS, ALPNChannel

            self.site.protocol = ALPNChannel
            self.site.alpn = ALPN_PROTOCOLS
        # Certificates from ACME (tls: acme:): its http-01 answers ahead of
        # the router, its certificates by SNI. Nothing of it without.
        self.acme: Optional[AcmeServing] = None
        if config.tls.acme.enabled:
            self.acme = AcmeServing(read_client_auth(config.tls))
            self.site.resource = ChallengeResource(self.acme, self.proxy)
        self.metrics = Metrics(
            pools,
            reactor,
            stats=self.proxy.stats,
            queues=lambda: [d.queue for d in self.proxy.destinations.values()],
            budget=self.proxy.budget,
            connections=lambda: getattr(self.site, "open_count", 0),
            upstream_connections=self._upstream_connections,
            clients=self.site.client_list,
        )
        self._apply_pools(config, pool_configs)
        endpoints = endpoints or self._own_endpoint
        self.listeners: list[Listener] = []
        for description in config.listen:
            endpoint, server = endpoints(len(self.listeners), description)
            if server is not None:
                # Its certificate is read again on reload, and stapled.
                self.tls.add_listener(server)
            listener = Listener(
                endpoint,
                self.site,
                setting=f"--listen: cannot listen on {description!r}",
                on_port=self.site.add_port,
            )
            listener.setServiceParent(self)
            self.listeners.append(listener)
        if self.acme is not None:
            for server in self.tls.listeners:
                server.set_hook(self.acme)
        self.access_log: Optional[AccessLog] = None
        self._apply_access_log(config)
        assert self.tls.stapler is not None
        self.tls.stapler.setServiceParent(self)

    def _own_endpoint(
        self, index: int, description: str
    ) -> tuple[IStreamServerEndpoint, Optional[ServerTLS]]:
        config = self.config
        return listen_endpoint(
            self.reactor,
            with_default_backlog(description),
            config.tls,
            tls_on_tcp(config.listen, config.tls),
        )

    def acme_update(self, state: AcmeState) -> defer.Deferred[None]:
        """
        Serve C{state}: the ACME certificate and the challenges pending.
        """
        if self.acme is not None:
            self.acme.update(state)
        return defer.succeed(None)

    @property
    def tls_policy(self) -> Any:
        """
        The nodes' TLS connection creators, for health probes to share.
        """
        return self.tls.nodes.policy

    def apply(
        self, config: Config, pool_configs: Sequence[PoolConfig], reload: bool = True
    ) -> defer.Deferred[None]:
        """
        Serve C{config} with the pools of C{pool_configs}. Nodes that stay
        keep their health state and pooled connections (unless their TLS
        settings changed).

        @param reload: a reload, which applies every setting and reads every
            TLS certificate, key and CA file again; otherwise only the pools'
            node sets changed (nodes found in DNS), and only the nodes' TLS
            files are read.
        @return: a Deferred that has fired (this process runs it now).
        @raise ConfigError: a TLS file cannot be used; nothing was changed.
        """
        nodes = unique_nodes(pool_configs)
        self._steps(config)  # a filter that cannot be built changes nothing
        if reload:
            changed = self.tls.prepare(config, nodes)()
            if self.acme is not None:
                # Read again with the listeners' files (it was checked).
                self.acme.set_client_auth(read_client_auth(config.tls))
        else:
            changed = self.tls.nodes.commit(self.tls.nodes.prepare(nodes))
        for key in changed:
            self._drop_node(key)
        if reload:
            self.upstream.connect_timeout = config.connect_timeout
            self.upstream.max_idle_per_node = config.max_idle_per_node
            self.upstream.max_headers = config.max_headers
            self.proxy.settings = ProxySettings.from_config(config)
            self.site.set_limits(ClientLimits.from_config(config))
            self.proxy.budget.percent = config.retry_budget
        self._apply_pools(config, pool_configs)
        if reload:
            self._apply_access_log(config)
        self.config = config
        return defer.succeed(None)

    def _apply_pools(self, config: Config, pool_configs: Sequence[PoolConfig]) -> None:
        """
        Make the pools and the routes those of C{pool_configs} and
        C{config.routes}.
        """
        removed = update_pools(
            self.pools, config, pool_configs, self.new_pool, self._drop_node
        )
        destinations: dict[str, Destination] = {}
        for pc in pool_configs:
            dest = self.proxy.destination(self.pools.by_name[pc.name], pc.node_host, pc.timeout)
            dest.queue.timeout = config.queue_timeout
            dest.exchange = self._h2_exchange() if pc.protocol == "h2" else ProxyExchange
            destinations[pc.name] = dest
        router, top = build_routes(config, self._steps(config), destinations)
        proxy = self.proxy
        chained = bool(top) or (router is not None and any(r.chained for r in router.routes))
        chains = Chains(proxy, top, proxy.stats.filter_errors, router) if chained else None
        proxy.set_routes(router, destinations[pool_configs[0].name], destinations)
        proxy.chains = chains
        proxy.all_chained = chains if top else None

        # Upstream settings that differ by pool: idle connections per node
        # (the largest of its pools'), and the response timeout sweep runs
        # often enough for the shortest timeout.
        caps: dict[str, int] = {}
        for pc in pool_configs:
            for spec in pc.nodes:
                caps[spec.key] = max(caps.get(spec.key, 0), pc.max_idle_per_node)
        self.upstream.idle_caps = {
            key: cap for key, cap in caps.items() if cap != config.max_idle_per_node
        }
        self.upstream.timeout = min(pc.timeout for pc in pool_configs)
        in_use = {n.key for n in self.pools.nodes}
        for node in removed:
            if node.key not in in_use:
                self._drop_node(node.key)
        self._retire(removed)
        # New nodes or higher limits may have room for queued requests.
        for dest in destinations.values():
            dest.queue.dispatch()

    def _h2_exchange(self) -> Any:
        """
        The exchange of C{protocol: h2} pools, with the HTTP/2 client to
        nodes made the first time (nothing of it is loaded before).
        """
        from rrlb.h2exchange import H2Exchange
        from rrlb.h2upstream import H2UpstreamPool

        if self.proxy.h2 is None:
            self.proxy.h2 = H2UpstreamPool(
                self.reactor, self.config.connect_timeout, tls_creator=self.tls.nodes
            )
        return H2Exchange

    def _upstream_connections(self) -> int:
        """
        Connections open to nodes: HTTP/1.1 ones, and HTTP/2 ones if any.
        """
        h2 = self.proxy.h2
        return self.upstream.connection_count + (h2.connection_count if h2 is not None else 0)

    def _drop_node(self, key: str) -> None:
        self.upstream.drop_node(key)
        if self.proxy.h2 is not None:
            self.proxy.h2.drop_node(key)

    def _close_upstream(self) -> defer.Deferred[Any]:
        closing = [self.upstream.close()]
        if self.proxy.h2 is not None:
            closing.append(self.proxy.h2.close())
        return defer.DeferredList(closing)

    def _steps(self, config: Config) -> Built:
        """
        The filters of C{config}, built once per configuration (a change of
        nodes alone keeps them and their state).

        @raise ConfigError: one cannot be built in this process.
        """
        if self._built is None or self._built[0] is not config:
            metrics = getattr(self, "metrics", None)

            def context(where: str, route: Any) -> FilterContext:
                return FilterContext(self.reactor, where, route, metrics, self.filter_state)

            self._built = (config, build_steps(config, context))
        return self._built[1]

    def _apply_access_log(self, config: Config) -> None:
        """
        Start, switch or stop the access log. A running one is reopened,
        so a reload also follows a log file that logrotate moved away.
        """
        access_log = self.access_log
        if config.access_log is None:
            if access_log is not None:
                self.access_log = self.metrics.access_log = None
                access_log.disownServiceParent()
        elif access_log is None:
            access_log = AccessLog(config.access_log, config.access_log_format, self.reactor)
            self.access_log = self.metrics.access_log = access_log
            access_log.setServiceParent(self)
        else:
            access_log.reopen(config.access_log, config.access_log_format)
        # Requests are counted only when something reads the counts.
        observed = self.access_log is not None or self.count_requests
        self.site.access_log = self.metrics.record if observed else None

    def _retire(self, removed: list[Node]) -> None:
        """
        Keep track of removed nodes until their in-flight requests are done,
        then close the connections those requests gave back to the pool.
        """
        for node in removed:
            if node.in_flight > 0:
                self.log.info(
                    "node {node} removed; {count} requests in flight will finish",
                    node=node.url,
                    count=node.in_flight,
                )
                self.retired.append(node)
            else:
                self.log.info("node {node} removed", node=node.url)
        if self.retired and self._retired_call is None:
            self._retired_call = self.reactor.callLater(RETIRED_POLL, self._sweep_retired)

    def _sweep_retired(self) -> None:
        self._retired_call = None
        remaining = []
        for node in self.retired:
            if node.in_flight > 0:
                remaining.append(node)
            elif not any(pool.get(node.key) is not None for pool in self.pools):
                self._drop_node(node.key)
                self.log.info("node {node} removed; its last request finished", node=node.url)
        self.retired = remaining
        if remaining:
            self._retired_call = self.reactor.callLater(RETIRED_POLL, self._sweep_retired)

    # -- start and stop -------------------------------------------------------

    def in_flight(self) -> int:
        """
        Requests being forwarded now, including those of removed nodes.
        """
        return sum(n.in_flight for n in self.pools.nodes) + sum(n.in_flight for n in self.retired)

    def ready(self) -> list[defer.Deferred[Any]]:
        """
        What fires once this side serves: every listener bound.
        """
        return [d for listener in self.listeners for d in listener.listening()]

    def stopping_status(self) -> str:
        """
        What systemd shows while this side drains.
        """
        return (
            f"stopping: draining {len(self.site.channels)} connections"
            f" for up to {self.config.drain_timeout:g}s"
        )

    def stopService(self) -> defer.Deferred[None]:
        """
        Stop accepting, let in-flight requests finish (up to the drain
        timeout), then stop the access log and close the upstream
        connections.
        """
        timeout = self.config.drain_timeout
        stops = [defer.maybeDeferred(listener.stopService) for listener in self.listeners]
        self.site.close_parked()
        d: defer.Deferred[Any] = defer.DeferredList(stops, consumeErrors=True)
        d.addCallback(lambda _: self._drain(timeout))
        d.addBoth(lambda _: super(Traffic, self).stopService())
        d.addBoth(lambda _: self._close_upstream())
        d.addBoth(lambda _: self._stop_filter_state())
        d.addBoth(self._stopped)
        return d

    def _stop_filter_state(self) -> defer.Deferred[Any]:
        # The filters' own connections (a rate limit's Redis store).
        stops = [
            defer.maybeDeferred(state.stop)
            for state in self.filter_state.values()
            if callable(getattr(state, "stop", None))
        ]
        return defer.DeferredList(stops, consumeErrors=True)

    def _drain(self, timeout: float) -> defer.Deferred[Any]:
        self.drain = drain = Drain(self.reactor, self.site, timeout)
        busy = bool(self.site.channels)
        if busy:
            self.log.info(
                "stopped accepting; waiting up to {timeout}s for {connections} open"
                " connections ({requests} requests in flight)",
                timeout=timeout,
                connections=len(self.site.channels),
                requests=self.in_flight(),
            )

        def drained(cut: int) -> None:
            self.drain = None
            if cut:
                self.log.warn(
                    "drain timeout: closed {cut} connections still busy after {timeout}s",
                    cut=cut,
                    timeout=timeout,
                )
            elif busy:
                self.log.info(
                    "drained: every connection finished in {elapsed:.2f}s",
                    elapsed=drain.elapsed,
                )

        return drain.start().addCallback(drained)

    def _stopped(self, result: Any) -> None:
        if self._retired_call is not None and self._retired_call.active():
            self._retired_call.cancel()
        self._retired_call = None
        self.retired = []
