# -*- test-case-name: tests.test_reload,tests.test_drain,tests.test_notify,tests.test_runtime -*-
"""
The control side: L{ControlService} owns the running configuration and
what decides about the nodes (the health checkers, DNS discovery, the demo
backends), the admin endpoint and its charts, and systemd's notifications.
It applies a configuration in one place (start-up, demo backends coming
up, nodes found in DNS, SIGHUP) and hands it to a traffic side
(L{TrafficSide}), which serves the traffic, and which it stops first at
shutdown, so in-flight requests drain while the health checks go on.

What the traffic side is, is decided in L{rrlb.tap.makeService}: one
L{rrlb.traffic.Traffic} in a single process, or the workers' supervisor
(L{rrlb.workers.main.WorkersTraffic}) with C{--workers}.
"""

from __future__ import annotations

import dataclasses
import signal
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.client import Agent

from rrlb._twisted import clear_exit_signal
from rrlb.acme import AcmeManager
from rrlb.acmetls import AcmeState, certificate_status, listener_certificates
from rrlb.admin import AdminSite
from rrlb.config import Config, ConfigError, DnsNodes, NodeSpec, PoolConfig, all_pools, parse_node
from rrlb.demo import DemoBackends
from rrlb.discovery import DnsDiscovery, make_resolver
from rrlb.failures import LocalErrors
from rrlb.health import HealthChecker, QuietConnectionPool
from rrlb.history import History
from rrlb.listeners import Listener
from rrlb.metrics import Metrics
from rrlb.notify import SystemdNotify
from rrlb.pool import Pool, Pools
from rrlb.proxyproto import ProbeEndpoints
from rrlb.settings import restart_only


class TrafficSide(Protocol):
    """
    What the control side asks of the side that serves the traffic. Both
    are given the same L{Pools}: the traffic side makes them those of each
    configuration it applies, the control side's checkers mark their
    nodes, and node states reach the traffic through them (the workers'
    supervisor forwards each change to its workers).
    """

    @property
    def metrics(self) -> Metrics:
        """
        The counters of the traffic, which the admin endpoint, its charts
        and the checkers' results are read through.
        """

    @property
    def tls_policy(self) -> Any:
        """
        The nodes' TLS connection creators, which the health probes share.
        """

    def apply(
        self, config: Config, pool_configs: Sequence[PoolConfig], reload: bool
    ) -> defer.Deferred[Any]:
        """
        Run C{config} with these pools, each with its node set (C{reload}:
        every setting, else only the node sets changed).

        @return: a Deferred that fires once every process runs it.
        @raise ConfigError: a TLS file cannot be used; nothing was changed.
        """

    def ready(self) -> list[defer.Deferred[Any]]:
        """
        What fires once the traffic is served (for C{READY=1}).
        """

    def acme_update(self, state: AcmeState) -> Any:
        """
        Serve C{state} (the ACME certificate and challenges) everywhere.
        """

    def stopping_status(self) -> str:
        """
        What systemd shows while the traffic drains at shutdown.
        """

    def setServiceParent(self, parent: Any) -> Any: ...

    def stopService(self) -> Any: ...


AdminSiteFactory = Callable[..., Any]
# Where an applied configuration came from (rrlb_config_changes_total's
# source label).
SIGHUP = "sighup"
API = "api"
CHANGE_SOURCES = (SIGHUP, API)
HistoryFactory = Callable[[Pools, Metrics, Any], History]


def _dns_entries(config: Config) -> tuple[DnsNodes, ...]:
    """
    Every DNS node entry, top-level and in pools, each name looked up once.
    """
    entries: dict[tuple[str, bool, int], DnsNodes] = {}
    for entry in config.dns_nodes + tuple(d for p in config.pools for d in p.dns_nodes):
        entries.setdefault((entry.name, entry.srv, entry.port), entry)
    return tuple(entries.values())


class ControlService(MultiService):
    """
    The control side of rrlb, around a traffic side (a child service).

    @param pools: the pools, which C{traffic} makes those of the
        configuration and the checkers made here mark.
    @param load_config: reads the configuration again, for a reload (none:
        a reload is refused).
    @param environ: the process environment, for systemd's C{NOTIFY_SOCKET}
        and C{WATCHDOG_USEC} (none by default: no notifications).
    @param pid: this process's id, for C{WATCHDOG_PID}.
    @param handle_signals: reload on C{SIGHUP} while running (only for the
        real reactor in the real process; see L{rrlb.tap.makeService}).
    @param admin_site: makes the admin endpoint's site from the pools, the
        metrics and the history (and C{reactor=}).
    @param history: makes the status page's history from the pools, the
        metrics and the clock.
    @param local_errors: logs rrlb's own resource errors (out of file
        descriptors, ...), which the probes share with the traffic side of
        this process (default: the probes' own).
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        pools: Pools,
        traffic: TrafficSide,
        load_config: Optional[Callable[..., Config]] = None,
        environ: Optional[Mapping[str, str]] = None,
        pid: int = 0,
        handle_signals: bool = False,
        admin_site: AdminSiteFactory = AdminSite,
        history: HistoryFactory = History,
        local_errors: Optional[LocalErrors] = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.load_config = load_config
        # Configurations applied, by where they came from (SIGHUP, the
        # admin API), for rrlb_config_changes_total.
        self.config_changes = dict.fromkeys(CHANGE_SOURCES, 0)
        self.handle_signals = handle_signals
        self._previous_sighup: Any = None
        self._held_signals: dict[int, Any] = {}
        self.stopping = False
        self._stopping_d: Optional[defer.Deferred[Any]] = None
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
        self.pools = pools
        self.local_errors = LocalErrors(reactor) if local_errors is None else local_errors
        self.local_errors.setServiceParent(self)
        self.traffic = traffic
        traffic.setServiceParent(self)
        self.metrics = traffic.metrics
        self.metrics.checkers = lambda: list(self.checkers.values())
        self.metrics.config_changes = lambda: dict(self.config_changes)
        # Agent's own endpoints, plus the PROXY header for send_proxy nodes.
        self.health_agent = Agent.usingEndpointFactory(
            reactor,
            ProbeEndpoints(
                reactor, traffic.tls_policy, self._send_proxy_for, config.health.timeout
            ),
            pool=QuietConnectionPool(reactor, persistent=False),
        )
        self.demo_nodes: tuple[NodeSpec, ...] = ()
        if config.demo:
            DemoBackends(reactor, config.demo, self._demo_ready).setServiceParent(self)
        # One checker per pool; self.checker is the first pool's.
        self.checkers: dict[str, HealthChecker] = {}
        self.checker: Optional[HealthChecker] = None
        self._check(self._pool_configs(config))
        self.admin_listener: Optional[Listener] = None
        # The status page's charts, sampled once a second (only with --admin).
        self.history: Optional[History] = None
        if config.admin:
            self.history = history(self.pools, self.metrics, reactor)
            self.history.setServiceParent(self)
            site = admin_site(self.pools, self.metrics, self.history, reactor=reactor, control=self)
            # Its admin_hosts and token (read by load_config).
            site.configure(config)
            self.admin_listener = Listener(
                serverFromString(reactor, config.admin),
                site,
                setting=f"--admin: cannot listen on {config.admin!r}",
            )
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
        self.notify = SystemdNotify(reactor, self.pools, environ or {}, pid)
        self.notify.setServiceParent(self)
        # Certificates from ACME: orders from this process only.
        self.acme: Optional[AcmeManager] = None
        if config.tls.acme.enabled:
            self.acme = AcmeManager(config.tls.acme, reactor, traffic.acme_update)
            self.acme.setServiceParent(self)
            self.metrics.acme_orders = lambda: self.acme.orders if self.acme else None
        # The certificates of the listeners' files, read at start and reload.
        self._file_certificates = listener_certificates(config)
        self.metrics.certificates = self.certificates

    def certificates(self) -> list[dict[str, Any]]:
        """
        Every certificate served (ACME's first), for C{/status} and
        C{/metrics}.
        """
        found = []
        current = self.acme.current if self.acme is not None else None
        if current is not None:
            found.append(certificate_status(current.leaf, "acme"))
        found += [certificate_status(c, "file") for c in self._file_certificates]
        return found

    @property
    def pool(self) -> Pool:
        """
        The first pool (the default one when there are top-level nodes).
        """
        return next(iter(self.pools))

    def _demo_ready(self, urls: list[str]) -> None:
        self.demo_nodes = tuple(parse_node(u, "--demo") for u in urls)
        self.apply(self.config)
        self.notify.send_status()

    # -- applying a configuration ----------------------------------------------

    def apply(self, config: Config) -> defer.Deferred[Any]:
        """
        Make C{config} the running configuration. Nodes that stay keep their
        health state and pooled connections (unless their TLS settings
        changed). Every TLS certificate, key and CA file is read again.

        @return: a Deferred that fires once every process runs it.
        @raise ConfigError: a TLS file cannot be used; nothing was changed.
        """
        entries = _dns_entries(config)
        resolver = None
        if entries and (config.resolvers != self._resolvers or self.discovery.resolver is None):
            resolver = make_resolver(self.reactor, config.resolvers)
        self.discovery.configure(entries, config.dns_refresh, resolver)
        self._resolvers = config.resolvers
        if config.tls.acme.enabled != self.config.tls.acme.enabled:
            self.log.warn("tls.acme on or off changes only with a restart")
            tls = dataclasses.replace(config.tls, acme=self.config.tls.acme)
            config = dataclasses.replace(config, tls=tls)
        pool_configs = self._pool_configs(config)
        applied = self.traffic.apply(config, pool_configs, True)
        self._check(pool_configs)
        self._apply_admin(config)
        self._file_certificates = listener_certificates(config)
        if self.acme is not None:
            # A reload is one of the renewal checks.
            self.acme.configure(config.tls.acme)
        self.config = dataclasses.replace(config)
        return applied

    def _apply_admin(self, config: Config) -> None:
        """
        The admin endpoint's part of a configuration (its listener stays).
        """
        if self.admin_listener is not None:
            # New admin_hosts and token (read again by the reload) from now on.
            self.admin_listener.factory.configure(config)

    def _check(self, pool_configs: Sequence[PoolConfig]) -> None:
        """
        One health checker per pool of C{pool_configs}, with that pool's
        health settings.
        """
        for pc in pool_configs:
            checker = self.checkers.get(pc.name)
            pool = self.pools.by_name[pc.name]
            if checker is None or checker.pool is not pool:
                checker = HealthChecker(
                    pool,
                    pc.health,
                    self.reactor,
                    self.health_agent,
                    self.local_errors,
                    pc.protocol,
                    self.traffic.tls_policy,
                )
                self.checkers[pc.name] = checker
                checker.setServiceParent(self)
            else:
                checker.protocol = pc.protocol
                checker.update(pc.health)
        names = {pc.name for pc in pool_configs}
        for name in list(self.checkers):
            if name not in names:
                self.checkers.pop(name).disownServiceParent()
        self.checker = self.checkers.get(pool_configs[0].name)

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
            self.traffic.apply(self.config, pool_configs, False)
        except ConfigError as e:
            # A node TLS file went bad since the last reload: keep running.
            self.log.error("nodes from DNS not applied: {error}", error=str(e))
            return
        # Probes start for the nodes that came and stop for those that went.
        self._check(pool_configs)
        self.notify.send_status()

    # -- reload -------------------------------------------------------------

    def reload(self) -> bool:
        """
        Load the configuration again (the C{--config} file with the same
        command-line overrides) and apply it. A configuration that fails
        validation is rejected with one log line and the running one stays.

        @return: whether the new configuration was applied.
        """
        if not self.running or self.stopping:
            self.log.info("reload ignored: rrlb is stopping")
            return False
        self.notify.reloading()
        try:
            if self.load_config is None:
                raise ConfigError("no command line to reload from")
            config = self.load_config()
        except ConfigError as e:
            self.log.error(
                "reload rejected: {error}; keeping the running configuration", error=str(e)
            )
            self.notify.note = "last reload rejected, see the log"
            self.notify.reloaded()
            if self.acme is not None:
                # SIGHUP is a renewal check, whatever became of the reload.
                self.acme.check()
            return False
        config = self._restart_only(config)
        before = {n.label for n in self.pools.nodes}
        try:
            applied = self.apply(config)
        except Exception:
            self.log.failure("reload failed while applying the new configuration")
            self.notify.note = "last reload failed, see the log"
            self.notify.reloaded()
            return False
        self.config_changes[SIGHUP] += 1
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
        applied.addBoth(lambda _: self.notify.reloaded())
        return True

    def _restart_only(self, config: Config) -> Config:
        """
        C{config} with the running value of every setting a reload does not
        apply (declared with C{reload=False} in L{rrlb.settings}), each one
        that changed logged as needing a restart.
        """
        kept = {}
        for row in restart_only():
            old, new = getattr(self.config, row.name), getattr(config, row.name)
            if new != old:
                self.log.warn(
                    "reload: {setting} changed ({old} -> {new}); restart rrlb to apply it",
                    setting=row.name,
                    old=_shown(old),
                    new=_shown(new),
                )
                kept[row.name] = old
        return dataclasses.replace(config, **kept) if kept else config

    # -- the runtime API (rrlb.runtime) -------------------------------------------

    def load(self, document: Mapping[str, Any]) -> Config:
        """
        The configuration a reload would run if the C{--config} file held
        C{document} (the command-line flags still win), for C{PUT /config}.

        @raise ConfigError: it is not valid.
        """
        if self.load_config is None:
            raise ConfigError("no command line to reload from")
        return self._restart_only(self.load_config(document))

    def change(self, config: Config, peer: str, what: str, before: str, after: str) -> Any:
        """
        Apply C{config}, made by the admin API, as a reload applies one;
        count it and log it in one line: who, what, before and after. It
        lasts until the next reload from the file.

        @return: a Deferred that fires once every process runs it.
        @raise ConfigError: it cannot be applied (a TLS file, or rrlb is
            stopping); nothing changed.
        """
        if not self.running or self.stopping:
            raise ConfigError("rrlb is stopping")
        applied = self.apply(config)
        self.config_changes[API] += 1
        self.log.info(
            "admin API: {peer} changed {what}: {before} -> {after}",
            peer=peer,
            what=what,
            before=before,
            after=after,
            source=API,
        )
        self.notify.send_status()
        return applied

    # -- signals ----------------------------------------------------------------

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
            connections=self.metrics.connections(),
        )

    # -- start and stop -------------------------------------------------------

    def readiness(self) -> list[defer.Deferred[Any]]:
        """
        What has to happen before systemd is told C{READY=1}: the traffic
        served and the admin endpoint bound.
        """
        admin = self.admin_listener.listening() if self.admin_listener is not None else []
        return self.traffic.ready() + admin

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
        Stop the traffic side (it stops accepting and lets in-flight
        requests finish, up to the drain timeout), then everything else.
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
        self.notify.stopping(self.traffic.stopping_status())
        d: defer.Deferred[Any] = defer.maybeDeferred(self.traffic.stopService)
        self._stopping_d = d
        d.addBoth(lambda _: self._stop_the_rest())
        d.addBoth(self._stopped)
        return d

    def _stop_the_rest(self) -> defer.Deferred[Any]:
        """
        Stop every child but the traffic side (stopped already), the last
        started first, as L{MultiService} does.
        """
        Service.stopService(self)
        stops = [
            defer.maybeDeferred(child.stopService)
            for child in reversed(list(self))
            if child is not self.traffic
        ]
        return defer.DeferredList(stops)

    def _stopped(self, result: Any) -> None:
        self._stopping_d = None
        self._release_signals()
        # twistd re-raises SIGTERM/SIGINT on itself after the reactor stops,
        # so the process would die "killed by SIGTERM". A drained shutdown is
        # a clean exit: exit 0 instead.
        clear_exit_signal(self.reactor, (signal.SIGTERM, signal.SIGINT))


def _shown(value: Any) -> str:
    """
    A setting's value as a log line shows it.
    """
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    return str(value)
