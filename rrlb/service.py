# -*- test-case-name: tests.test_reload,tests.test_drain,tests.test_tap -*-
"""
The balancer's service tree: L{BalancerService} owns the running
configuration and every piece built from it (pool, upstream connections,
proxy, listeners, health checker, admin, access log, systemd notifications),
applies a new configuration in one place (start-up, demo backends, SIGHUP),
and drains in-flight requests at shutdown.
"""

from __future__ import annotations

import dataclasses
import signal
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.client import Agent

from rrlb.accesslog import AccessLog
from rrlb.admin import AdminSite
from rrlb.channel import ClientLimits
from rrlb.config import Config, ConfigError, DnsNodes, NodeSpec, PoolConfig, all_pools, parse_node
from rrlb.demo import DemoBackends
from rrlb.discovery import DnsDiscovery, make_resolver
from rrlb.drain import Drain
from rrlb.failures import LocalErrors
from rrlb.health import HealthChecker, QuietConnectionPool
from rrlb.history import History
from rrlb.metrics import Metrics
from rrlb.notify import SystemdNotify
from rrlb.pool import Node, Pool, Pools
from rrlb.proxy import Destination, ProxySettings, ProxySite, RotatingProxy
from rrlb.proxyproto import ProbeEndpoints
from rrlb.routes import Route, Router
from rrlb.tls import BalancerTLS
from rrlb.upstream import UpstreamPool

if TYPE_CHECKING:
    from rrlb.tap import Options


# How often nodes removed by a reload are looked at until their last
# in-flight request has finished.
RETIRED_POLL = 1.0


class Listener(StreamServerEndpointService):
    """
    A listener whose failure to listen at start-up (port in use, no
    permission, no such directory) stops rrlb with one line naming the
    setting, rather than a traceback from the service machinery.
    """

    setting = "cannot listen"
    # Called with the listening port once there is one.
    on_port: Optional[Callable[[Any], Any]] = None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            # SystemExit prints its message and exits 1, under twistd and twist.
            raise SystemExit(f"{self.setting}: {e}") from None
        if self.on_port is not None and self._waitingForPort is not None:
            self._waitingForPort.addCallback(self.on_port)


# nginx's listen backlog. Twisted's default of 50 overflows when a few
# hundred clients connect at once, and each overflow costs a client a
# retransmitted SYN (a second or more of latency).
DEFAULT_BACKLOG = 511


def with_default_backlog(description: str) -> str:
    """
    A TCP or TLS listen description with C{backlog=511} unless it names one.
    """
    kind, _, rest = description.partition(":")
    kind = kind.strip().lower()
    if kind == "haproxy":
        # The PROXY protocol wrapper: the backlog belongs to what it wraps.
        return f"{kind}:{with_default_backlog(rest)}"
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


def _dns_entries(config: Config) -> tuple[DnsNodes, ...]:
    """
    Every DNS node entry, top-level and in pools, each name looked up once.
    """
    entries: dict[tuple[str, bool, int], DnsNodes] = {}
    for entry in config.dns_nodes + tuple(d for p in config.pools for d in p.dns_nodes):
        entries.setdefault((entry.name, entry.srv, entry.port), entry)
    return tuple(entries.values())


def _unique_nodes(pool_configs: tuple[PoolConfig, ...]) -> tuple[NodeSpec, ...]:
    """
    Every pool's nodes, each URL once (pools that share one share its
    connections).
    """
    seen: dict[str, NodeSpec] = {}
    for pc in pool_configs:
        for spec in pc.nodes:
            seen.setdefault(spec.key, spec)
    return tuple(seen.values())


class BalancerService(MultiService):
    """
    The whole balancer: owns the current L{Config} and applies a new one to
    the pool, the checker, the upstream connections and the proxy in one
    place (start-up, demo backends coming up, reload).

    @param environ: the process environment, for systemd's C{NOTIFY_SOCKET}
        and C{WATCHDOG_USEC} (none by default: no notifications).
    @param pid: this process's id, for C{WATCHDOG_PID}.
    @param handle_signals: reload on C{SIGHUP} while running (only for the
        real reactor in the real process; see L{makeService}).
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        options: Optional[Options] = None,
        environ: Optional[Mapping[str, str]] = None,
        pid: int = 0,
        handle_signals: bool = False,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.options = options
        self.config = config
        self.handle_signals = handle_signals
        self._previous_sighup: Any = None
        self._held_signals: dict[int, Any] = {}
        self.stopping = False
        self._stopping_d: Optional[defer.Deferred[Any]] = None
        self.drain: Optional[Drain] = None
        # Nodes a reload removed that still have requests in flight.
        self.retired: list[Node] = []
        self._retired_call: Any = None
        # Nodes named by DNS (top-level and in pools): looked up by the
        # discovery service, which calls nodes_found when what it found
        # changes. No resolver (nor a read of /etc/resolv.conf) unless some
        # entry needs one.
        self._resolvers = config.resolvers
        entries = _dns_entries(config)
        self.discovery = DnsDiscovery(
            reactor,
            make_resolver(reactor, config.resolvers) if entries else None,
            self.nodes_found,
            entries,
            config.dns_refresh,
        )
        self.discovery.setServiceParent(self)
        # Every pool by name; self.pool is the first (the default one when
        # there are top-level nodes) and self.checker its health checker.
        self.pools = Pools()
        self.checkers: dict[str, HealthChecker] = {}
        pool_configs = self.initial_pools(config)
        first = pool_configs[0]
        self.pool = self.new_pool(first.name)
        self.pool.set_thresholds(first.health.rise, first.health.fall)
        self.pool.max_conns_per_node = config.max_conns_per_node
        # Node creators are built once per node here and on apply(), never
        # per request; traffic and health probes share them.
        self.tls = BalancerTLS()
        self.tls.prepare(config, _unique_nodes(pool_configs))()
        self.upstream = UpstreamPool(
            reactor,
            connect_timeout=config.connect_timeout,
            timeout=config.timeout,
            max_idle_per_node=config.max_idle_per_node,
            tls_creator=self.tls.nodes,
            max_headers=config.max_headers,
        )
        # rrlb's own resource errors, for requests and probes alike.
        self.local_errors = LocalErrors(reactor)
        self.local_errors.setServiceParent(self)
        self.proxy = RotatingProxy(
            self.pool, self.upstream, reactor, self.proxy_settings(config), self.local_errors
        )
        self.proxy.budget.percent = config.retry_budget
        self.site = ProxySite(self.proxy, reactor=reactor, limits=self.client_limits(config))
        if config.http2:
            # Only now: with --http2 off nothing of rrlb.http2 is imported.
            from rrlb.http2 import ALPN_PROTOCOLS, ALPNChannel

            self.site.protocol = ALPNChannel
            self.site.alpn = ALPN_PROTOCOLS
        # Agent's own endpoints, plus the PROXY header for send_proxy nodes.
        self.health_agent = Agent.usingEndpointFactory(
            reactor,
            ProbeEndpoints(
                reactor, self.tls.nodes.policy, self._send_proxy_for, config.health.timeout
            ),
            pool=QuietConnectionPool(reactor, persistent=False),
        )
        self.metrics = self.make_metrics()
        self.demo_nodes: tuple[Any, ...] = ()
        if config.demo:
            DemoBackends(reactor, config.demo, self._demo_ready).setServiceParent(self)
        self.checker: Optional[HealthChecker] = None
        self._apply_pools(config, pool_configs)
        self.listeners: list[Listener] = []
        for description in config.listen:
            listener = Listener(self.listen_endpoint(len(self.listeners), description), self.site)
            listener.setting = f"--listen: cannot listen on {description!r}"
            listener.on_port = self.port_listening
            listener._raiseSynchronously = True
            listener.setServiceParent(self)
            self.listeners.append(listener)
        self.admin_listener: Optional[Listener] = None
        # The status page's charts, sampled once a second (only with --admin).
        self.history: Optional[History] = None
        if config.admin:
            self.history = self.make_history()
            self.history.setServiceParent(self)
            admin_site = self.admin_site(self.history)
            admin_site.configure(config)
            self.admin_listener = Listener(serverFromString(reactor, config.admin), admin_site)
            self.admin_listener.setting = f"--admin: cannot listen on {config.admin!r}"
            self.admin_listener._raiseSynchronously = True
            self.admin_listener.setServiceParent(self)
            kind = config.admin.split(":", 1)[0]
            if (
                kind in ("tcp", "tcp6", "ssl")
                and "interface=" not in config.admin
                and config.admin_token is None
            ):
                self.log.warn(
                    "the admin endpoint {admin} listens on every interface and has no"
                    " authentication: bind it to loopback ({kind}:PORT:interface=127.0.0.1)"
                    " or set admin_token_file",
                    admin=config.admin,
                    kind=kind,
                )
        self.access_log: Optional[AccessLog] = None
        self._apply_access_log(config)
        self.notify = SystemdNotify(reactor, self.pools, environ or {}, pid)
        self.notify.setServiceParent(self)

    # -- what a variant of the service changes (rrlb.workers) ---------------

    # Whether this process runs the health checkers (a worker does not: its
    # main process sends it the nodes' health).
    checks_health = True

    def initial_pools(self, config: Config) -> tuple[PoolConfig, ...]:
        """
        The pools to start with (no demo backends or DNS answers yet).
        """
        return all_pools(config)

    def new_pool(self, name: str) -> Pool:
        """
        A new, empty pool named C{name} (L{_apply_pools} configures it).
        """
        return Pool((), name=name, clock=self.reactor)

    def make_metrics(self) -> Metrics:
        return Metrics(
            self.pools,
            self.reactor,
            stats=self.proxy.stats,
            queues=lambda: [d.queue for d in self.proxy.destinations.values()],
            budget=self.proxy.budget,
            checkers=lambda: list(self.checkers.values()),
            connections=lambda: getattr(self.site, "open_count", 0),
            upstream_connections=lambda: self.upstream.connection_count,
            clients=self.site.client_list,
        )

    def make_history(self) -> History:
        return History(self.pools, self.metrics, self.reactor)

    def listen_endpoint(self, index: int, description: str) -> Any:
        """
        The endpoint of the C{index}th C{--listen} description.
        """
        return self.tls.listen_endpoint(
            self.reactor, with_default_backlog(description), self.config
        )

    def port_listening(self, port: Any) -> Any:
        """
        A listener got its port.
        """
        return self.site.add_port(port)

    def admin_site(self, history: Optional[History]) -> Any:
        return AdminSite(self.pools, self.metrics, history, reactor=self.reactor)

    def readiness(self) -> list[defer.Deferred[Any]]:
        """
        What has to happen before systemd is told C{READY=1}: every listener
        bound.
        """
        return list(self._listening())

    def applied_everywhere(self) -> defer.Deferred[Any]:
        """
        Fires once the configuration applied last runs in every process
        (here, at once), for C{READY=1} after a reload.
        """
        return defer.succeed(None)

    @staticmethod
    def client_limits(config: Config) -> ClientLimits:
        return ClientLimits.from_config(config)

    @staticmethod
    def proxy_settings(config: Config) -> ProxySettings:
        return ProxySettings.from_config(config)

    def _demo_ready(self, urls: list[str]) -> None:
        self.demo_nodes = tuple(parse_node(u, "--demo") for u in urls)
        self.apply(self.config)
        self.notify.send_status()

    def apply(self, config: Config) -> None:
        """
        Make C{config} the running configuration. Nodes that stay keep their
        health state and pooled connections (unless their TLS settings
        changed). Every TLS certificate, key and CA file is read again.

        @raise ConfigError: a TLS file cannot be used; nothing was changed.
        """
        entries = _dns_entries(config)
        resolver = None
        if entries and (config.resolvers != self._resolvers or self.discovery.resolver is None):
            resolver = make_resolver(self.reactor, config.resolvers)
        self.discovery.configure(entries, config.dns_refresh, resolver)
        self._resolvers = config.resolvers
        pool_configs = self._pool_configs(config)
        commit_tls = self.tls.prepare(config, _unique_nodes(pool_configs))
        for key in commit_tls():
            self.upstream.drop_node(key)
        self.upstream.connect_timeout = config.connect_timeout
        self.upstream.max_idle_per_node = config.max_idle_per_node
        self.upstream.max_headers = config.max_headers
        self.proxy.settings = self.proxy_settings(config)
        self.site.set_limits(self.client_limits(config))
        self.proxy.budget.percent = config.retry_budget
        self._apply_pools(config, pool_configs)
        self._apply_access_log(config)
        if config.admin != self.config.admin:
            self.log.warn("the admin endpoint changes only with a restart")
        if self.admin_listener is not None:
            # New admin_hosts and token (read again by the reload) from now on.
            self.admin_listener.factory.configure(config)
        if config.http2 != self.config.http2:
            self.log.warn("http2 changes only with a restart")
            config = dataclasses.replace(config, http2=self.config.http2)
        self.config = dataclasses.replace(config)

    def _apply_pools(self, config: Config, pool_configs: tuple[PoolConfig, ...]) -> None:
        """
        Make the pools, their checkers and the routes those of
        C{pool_configs} and C{config.routes}. Pools that stay keep their
        nodes' state (as do nodes that stay in them); pools that go take
        their nodes out of rotation, and those nodes finish their requests.
        """
        removed: list[Node] = []
        pools = []
        destinations: dict[str, Destination] = {}
        for pc in pool_configs:
            pool = self.pools.get(pc.name)
            if pool is None:
                pool = self.pool if not self.pools and pc.name == self.pool.name else None
            if pool is None:
                pool = self.new_pool(pc.name)
            pool.max_conns_per_node = config.max_conns_per_node
            pool.set_thresholds(pc.health.rise, pc.health.fall)
            pool.configure(pc.balance, pc.hash_key, pc.sticky, pc.slow_start)
            # A node whose send_proxy changed: its idle connections began
            # with the old header (or none).
            by_key = {n.key: n for n in pc.nodes}
            for node in pool.nodes:
                spec = by_key.get(node.key)
                if spec is not None and spec.send_proxy != node.send_proxy:
                    self.upstream.drop_node(node.key)
            _, gone = pool.update(pc.nodes)
            removed.extend(gone)
            for node in pool.nodes:
                node.connect_timeout = pc.connect_timeout
            pools.append(pool)
            dest = self.proxy.destination(pool, pc.node_host, pc.timeout)
            dest.queue.timeout = config.queue_timeout
            destinations[pc.name] = dest
        for name, pool in self.pools.by_name.items():
            if name not in destinations:
                _, gone = pool.update(())
                removed.extend(gone)
                self.log.info("pool {pool} removed", pool=name)
        self.pools.set(pools)
        self.pool = pools[0]

        # A worker process has no checkers (rrlb.workers).
        for pc in pool_configs if self.checks_health else ():
            checker = self.checkers.get(pc.name)
            pool = self.pools.by_name[pc.name]
            if checker is None or checker.pool is not pool:
                checker = HealthChecker(
                    pool, pc.health, self.reactor, self.health_agent, self.local_errors
                )
                self.checkers[pc.name] = checker
                checker.setServiceParent(self)
            else:
                checker.update(pc.health)
        for name in list(self.checkers):
            if name not in destinations:
                self.checkers.pop(name).disownServiceParent()
        self.checker = self.checkers.get(pools[0].name)

        router: Optional[Router[Destination]] = None
        if config.routes:
            router = Router(
                [
                    Route(
                        destinations[r.pool],
                        r.pool,
                        host=r.host,
                        path_prefix=r.path_prefix,
                        methods=r.methods,
                        header=r.header,
                        strip_prefix=r.strip_prefix,
                    )
                    for r in config.routes
                ]
            )
        self.proxy.set_routes(router, destinations[pools[0].name], destinations)

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
                self.upstream.drop_node(node.key)
        self._retire(removed)
        # New nodes or higher limits may have room for queued requests.
        for dest in destinations.values():
            dest.queue.dispatch()

    def _pool_configs(self, config: Config) -> tuple[PoolConfig, ...]:
        """
        The pools to run: each with its configured nodes, then (for the
        default pool) the demo backends, then the nodes found in DNS for its
        entries; a node listed twice in a pool runs once (the first one).
        """
        out = []
        for pc in all_pools(config, config.nodes + self.demo_nodes):
            nodes: dict[str, NodeSpec] = {}
            found = [n for entry in pc.dns_nodes for n in self.discovery.nodes_of(entry)]
            for node in pc.nodes + tuple(found):
                nodes.setdefault(node.key, node)
            out.append(dataclasses.replace(pc, nodes=tuple(nodes.values())))
        return tuple(out)

    def _send_proxy_for(self, host: str, port: int) -> Optional[str]:
        """
        The C{send_proxy} setting of the node at C{host} and C{port} (for
        the health checker's connections).
        """
        host = host.strip("[]").lower()
        for node in self.pools.nodes:
            if node.port == port and node.host.lower() == host:
                return node.send_proxy
        return None

    def nodes_found(self) -> None:
        """
        The nodes found in DNS changed: apply the new node sets of the pools
        the way a reload does, leaving every other setting as it is.
        """
        pool_configs = self._pool_configs(self.config)
        try:
            state = self.tls.nodes.prepare(_unique_nodes(pool_configs))
        except ConfigError as e:
            # A node TLS file went bad since the last reload: keep running.
            self.log.error("nodes from DNS not applied: {error}", error=str(e))
            return
        for key in self.tls.nodes.commit(state):
            self.upstream.drop_node(key)
        # Probes start for the nodes that came and stop for those that went.
        self._apply_pools(self.config, pool_configs)
        self.notify.send_status()

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
        observed = self.access_log is not None or self.admin_listener is not None
        self.site.access_log = self.metrics.record if observed else None

    # -- reload -------------------------------------------------------------

    def reload(self) -> bool:
        """
        Re-read the configuration (the C{--config} file with the same
        command-line overrides) and apply it. A configuration that fails
        validation is rejected with one log line and the running one stays.

        @return: whether the new configuration was applied.
        """
        if not self.running or self.stopping:
            self.log.info("reload ignored: rrlb is stopping")
            return False
        self.notify.reloading()
        try:
            if self.options is None:
                raise ConfigError("no command line to reload from")
            config = self.options.load()
        except ConfigError as e:
            self.log.error(
                "reload rejected: {error}; keeping the running configuration", error=str(e)
            )
            self.notify.note = "last reload rejected, see the log"
            self.notify.reloaded()
            return False
        if config.listen != self.config.listen:
            self.log.warn(
                "reload: listen endpoints changed ({old} -> {new}); restart rrlb to apply them",
                old=", ".join(self.config.listen),
                new=", ".join(config.listen),
            )
            config = dataclasses.replace(config, listen=self.config.listen)
        if config.workers != self.config.workers:
            self.log.warn(
                "reload: workers changed ({old} -> {new}); restart rrlb to apply it",
                old=self.config.workers,
                new=config.workers,
            )
            config = dataclasses.replace(config, workers=self.config.workers)
        before = {n.label for n in self.pools.nodes}
        try:
            self.apply(config)
        except Exception:
            self.log.failure("reload failed while applying the new configuration")
            self.notify.note = "last reload failed, see the log"
            self.notify.reloaded()
            return False
        after = {n.label for n in self.pools.nodes}
        self.log.info(
            "configuration reloaded: {count} nodes in {pools} pools ({added} added,"
            " {removed} removed)",
            count=len(after),
            pools=len(self.pools),
            added=len(after - before),
            removed=len(before - after),
        )
        self.notify.note = ""
        self.applied_everywhere().addBoth(lambda _: self.notify.reloaded())
        return True

    def _sighup(self, signum: int, frame: Any) -> None:
        # A signal handler runs between two bytecodes of whatever the reactor
        # was doing: hand the reload to the reactor's own turn.
        self.reactor.callFromThread(self.reload)

    def _install_signals(self) -> None:
        if not self.handle_signals or self._previous_sighup is not None:
            return
        try:
            previous = signal.signal(signal.SIGHUP, self._sighup)
        except (ValueError, OSError, AttributeError) as e:
            self.log.warn("cannot handle SIGHUP, so no reload on it: {error}", error=e)
            return
        self._previous_sighup = signal.SIG_DFL if previous is None else previous

    def _restore_signals(self) -> None:
        previous, self._previous_sighup = self._previous_sighup, None
        if previous is not None:
            signal.signal(signal.SIGHUP, previous)

    def _hold_signals(self) -> None:
        """
        While draining, a second SIGTERM or SIGINT only says so: Twisted's
        own handler would try to stop the stopping reactor and log a
        traceback.
        """
        if not self.handle_signals:
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                previous = signal.signal(signum, self._signal_while_draining)
            except (ValueError, OSError):
                continue
            self._held_signals[signum] = signal.SIG_DFL if previous is None else previous

    def _release_signals(self) -> None:
        held, self._held_signals = self._held_signals, {}
        for signum, previous in held.items():
            signal.signal(signum, previous)

    def _signal_while_draining(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._log_signal_while_draining, signum)

    def _log_signal_while_draining(self, signum: int) -> None:
        self.log.warn(
            "received {signal} while draining {connections} connections;"
            " still waiting (SIGKILL stops at once)",
            signal=signal.Signals(signum).name,
            connections=len(self.site.channels),
        )

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
                self.upstream.drop_node(node.key)
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

    def _listening(self, service: Any = None) -> Iterator[defer.Deferred[Any]]:
        for child in service if service is not None else self:
            if isinstance(child, StreamServerEndpointService):
                if child._waitingForPort is not None:
                    yield child._waitingForPort
            elif isinstance(child, MultiService):
                yield from self._listening(child)

    def startService(self) -> None:
        self.stopping = False
        super().startService()
        self._install_signals()
        listening = self.readiness()
        # twistd starts services before the reactor runs and installs its
        # SIGTERM/SIGINT handlers: tell systemd READY=1 only once it does.
        when_running = getattr(self.reactor, "callWhenRunning", None)
        if when_running is None:
            self.notify.ready_when(listening)
        else:
            when_running(self.notify.ready_when, listening)

    def stopService(self) -> defer.Deferred[None]:
        """
        Stop accepting, let in-flight requests finish (up to the drain
        timeout), then stop everything and close the upstream connections.
        """
        if self._stopping_d is not None:
            # Already stopping (say SIGTERM, then SIGINT): wait for that one.
            waiter: defer.Deferred[None] = defer.Deferred()

            def also(result: Any) -> Any:
                waiter.callback(None)
                return result

            self._stopping_d.addBoth(also)
            return waiter
        self.stopping = True
        self._restore_signals()
        self._hold_signals()
        timeout = self.config.drain_timeout
        self.notify.stopping(
            f"stopping: draining {len(self.site.channels)} connections for up to {timeout:g}s"
        )
        stops = [defer.maybeDeferred(listener.stopService) for listener in self.listeners]
        self.site.close_parked()
        d: defer.Deferred[Any] = defer.DeferredList(stops, consumeErrors=True)
        self._stopping_d = d
        d.addCallback(lambda _: self._drain(timeout))
        d.addBoth(lambda _: super(BalancerService, self).stopService())
        d.addBoth(lambda _: self.upstream.close())
        d.addBoth(self._stopped)
        return d

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
        self._stopping_d = None
        self._release_signals()
        if self._retired_call is not None and self._retired_call.active():
            self._retired_call.cancel()
        self._retired_call = None
        self.retired = []
        # twistd re-raises SIGTERM/SIGINT on itself after the reactor stops,
        # so the process would die "killed by SIGTERM". A drained shutdown is
        # a clean exit: exit 0 instead.
        if getattr(self.reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
            self.reactor._exitSignal = None
