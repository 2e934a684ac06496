# -*- test-case-name: tests.test_tap -*-
"""
The twistd plugin's options and service tree. This is the only module that
wires rrlb's pieces together and the only one that picks the real reactor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import Agent

from rrlb import __version__
from rrlb.accesslog import STDOUT, AccessLog
from rrlb.admin import AdminSite
from rrlb.config import (
    Config,
    ConfigError,
    build_config,
    non_negative_int,
    parse_access_log_format,
    parse_health_path,
    parse_node,
    positive_float,
    positive_int,
)
from rrlb.demo import DemoBackends
from rrlb.health import HealthChecker, QuietConnectionPool
from rrlb.metrics import Metrics
from rrlb.pool import Pool
from rrlb.proxy import ProxySettings, ProxySite, RotatingProxy
from rrlb.tls import BalancerTLS, check_tls, listen_endpoint, tls_on_tcp
from rrlb.upstream import UpstreamPool


def _coerce(parse: Any, name: str) -> Any:
    def coerce(value: str) -> Any:
        try:
            return parse(name, value)
        except ConfigError as e:
            # usage.Options turns a ValueError into a UsageError with this text.
            raise ValueError(str(e)) from None

    coerce.coerceDoc = ""  # type: ignore[attr-defined]
    return coerce


# Command-line option -> Config field, for the settings a YAML file also has.
_TOP_OPTIONS = {
    "timeout": "timeout",
    "connect-timeout": "connect_timeout",
    "max-idle-per-node": "max_idle_per_node",
    "access-log": "access_log",
    "access-log-format": "access_log_format",
    "admin": "admin",
    "drain-timeout": "drain_timeout",
}
_HEALTH_OPTIONS = {
    "health-path": "path",
    "health-interval": "interval",
    "health-timeout": "timeout",
    "rise": "rise",
    "fall": "fall",
}


class Options(usage.Options):
    """
    C{twistd rrlb} options. Every default is L{None} here so that a value
    given on the command line can be told from one not given, and win over
    the YAML file; the real defaults live in L{rrlb.config}.
    """

    synopsis = "[options]"
    longdesc = (
        "rrlb balances HTTP requests over backend nodes in round-robin order, "
        "taking nodes out of rotation when their health checks fail."
    )

    optFlags = [
        [
            "node-host",
            None,
            "Send each node its own host:port as Host (default: the client's Host).",
        ],
    ]
    optParameters = [
        ["config", "c", None, "YAML configuration file; command-line flags override it."],
        [
            "nodes",
            None,
            None,
            "Backend base URLs, comma-separated: http[s]://host[:port][/base/path].",
        ],
        [
            "health-path",
            None,
            None,
            "Path probed on each node (default: /).",
            _coerce(parse_health_path, "--health-path"),
        ],
        [
            "health-interval",
            None,
            None,
            "Seconds between health checks (default: 5).",
            _coerce(positive_float, "--health-interval"),
        ],
        [
            "health-timeout",
            None,
            None,
            "Seconds a health check may take (default: 2).",
            _coerce(positive_float, "--health-timeout"),
        ],
        [
            "rise",
            None,
            None,
            "Passed checks in a row that bring a node back (default: 2).",
            _coerce(positive_int, "--rise"),
        ],
        [
            "fall",
            None,
            None,
            "Failed checks in a row that take a node out (default: 3).",
            _coerce(positive_int, "--fall"),
        ],
        [
            "timeout",
            None,
            None,
            "Seconds to wait for a node's response head, and between body chunks (default: 30).",
            _coerce(positive_float, "--timeout"),
        ],
        [
            "connect-timeout",
            None,
            None,
            "Seconds to wait for a connection to a node (default: 5).",
            _coerce(positive_float, "--connect-timeout"),
        ],
        [
            "max-idle-per-node",
            None,
            None,
            "Idle keep-alive connections kept per node (default: 32).",
            _coerce(non_negative_int, "--max-idle-per-node"),
        ],
        [
            "access-log",
            None,
            None,
            "Write an access log line per request to PATH ('-' for stdout).",
        ],
        [
            "access-log-format",
            None,
            None,
            "Access log format: combined or json (default: combined).",
            _coerce(lambda name, v: parse_access_log_format(v), "--access-log-format"),
        ],
        [
            "admin",
            None,
            None,
            "Endpoint for the admin API and status page,"
            " e.g. tcp:8081:interface=127.0.0.1 (default: off).",
        ],
        [
            "drain-timeout",
            None,
            None,
            "Seconds to let in-flight requests finish at shutdown (default: 30).",
            _coerce(positive_float, "--drain-timeout"),
        ],
        [
            "tls-cert",
            None,
            None,
            "PEM certificate (chain) for ssl: listeners without privateKey=;"
            " with no ssl: listener, tcp: listeners serve TLS with it.",
        ],
        [
            "tls-key",
            None,
            None,
            "PEM private key for --tls-cert (default: read from the --tls-cert file).",
        ],
        [
            "ca-file",
            None,
            None,
            "PEM CA certificates that https nodes are verified against"
            " (default: the system trust store).",
        ],
        [
            "demo",
            None,
            None,
            "Start N demo backends on loopback and balance over them.",
            _coerce(positive_int, "--demo"),
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """
        Listen on a Twisted server endpoint description, e.g. tcp:8080 or
        ssl:8443:privateKey=key.pem:certKey=cert.pem; repeatable (default: tcp:8080).
        """
        self["listen"].append(description)

    def opt_version(self) -> None:
        """
        Print rrlb's version and exit.
        """
        print(f"rrlb {__version__}")
        raise SystemExit(0)

    def overrides(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """
        The settings given on the command line, as L{Config} and
        L{HealthConfig} fields.
        """
        top: dict[str, Any] = {}
        for option, field in _TOP_OPTIONS.items():
            if self[option] is not None:
                top[field] = self[option]
        if self["listen"]:
            top["listen"] = tuple(self["listen"])
        if self["nodes"] is not None:
            urls = [u for u in self["nodes"].split(",") if u.strip()]
            top["nodes"] = tuple(parse_node(u, "--nodes") for u in urls)
            if not urls:
                raise ConfigError("--nodes: no node URL given")
            # As in YAML: a node listed twice would be two pool entries under
            # one key, and only one of them would ever be health-checked.
            seen: set[str] = set()
            for node in top["nodes"]:
                if node.key in seen:
                    raise ConfigError(f"--nodes: node {node.url!r} is listed twice")
                seen.add(node.key)
        if self["node-host"]:
            top["node_host"] = True
        if self["demo"]:
            top["demo"] = self["demo"]
        tls = {
            field: self[option]
            for option, field in (("tls-cert", "cert"), ("tls-key", "key"), ("ca-file", "ca_file"))
            if self[option] is not None
        }
        if tls:
            top["tls"] = tls
        health = {
            field: self[option]
            for option, field in _HEALTH_OPTIONS.items()
            if self[option] is not None
        }
        return top, health

    def load(self) -> Config:
        """
        Build the configuration from the YAML file and the command line.

        @raise ConfigError: for any bad setting.
        """
        top, health = self.overrides()
        config = build_config(self["config"], top, health, require_nodes=not self["demo"])
        # Certificate, key and CA files are read now, so a bad one is refused
        # at start-up and on reload before anything changes.
        check_tls(config)
        return config

    def postOptions(self) -> None:
        try:
            self.config = self.load()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        from twisted.internet import reactor

        on_tcp = tls_on_tcp(self.config.listen, self.config.tls)
        for description in self.config.listen:
            check_endpoint(reactor, description, tls=(self.config.tls, on_tcp))
        if self.config.admin:
            check_endpoint(reactor, self.config.admin, "--admin")
        if self.config.access_log not in (None, STDOUT):
            check_log_path(
                self.config.access_log, "--access-log" if self["access-log"] else "access_log"
            )


def check_endpoint(
    reactor: Any, description: str, name: str = "--listen", tls: Optional[tuple[Any, bool]] = None
) -> None:
    """
    Parse an endpoint description now, so a bad one stops start-up with a
    clear line rather than a traceback later.

    @param tls: for a listener, the L{ListenTLS} settings and whether tcp:
        listeners serve TLS (see L{rrlb.tls.listen_endpoint}).
    """
    try:
        if tls is None:
            serverFromString(reactor, description)
        else:
            listen_endpoint(reactor, description, *tls)
    except ConfigError as e:
        raise usage.UsageError(str(e)) from None
    except Exception as e:
        raise usage.UsageError(f"{name}: bad endpoint description {description!r}: {e}") from None


def check_log_path(path: str, name: str) -> None:
    """
    Open the access log file once now, so one that cannot be written stops
    start-up with a clear line.
    """
    try:
        open(path, "ab").close()
    except OSError as e:
        raise usage.UsageError(f"{name}: cannot open {path!r}: {e.strerror or e}") from None


class Listener(StreamServerEndpointService):
    """
    A listener whose failure to listen at start-up (port in use, no
    permission, no such directory) stops rrlb with one line naming the
    setting, rather than a traceback from the service machinery.
    """

    setting = "cannot listen"

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            # SystemExit prints its message and exits 1, under twistd and twist.
            raise SystemExit(f"{self.setting}: {e}") from None


class BalancerService(MultiService):
    """
    The whole balancer: owns the current L{Config} and applies a new one to
    the pool, the checker, the upstream connections and the proxy in one
    place (start-up, demo backends coming up, reload).
    """

    log = Logger()

    def __init__(self, config: Config, reactor: Any, options: Optional[Options] = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.options = options
        self.config = config
        self.pool = Pool(config.nodes, config.health.rise, config.health.fall)
        # Node creators are built once per node here and on apply(), never
        # per request; traffic and health probes share them.
        self.tls = BalancerTLS()
        self.tls.prepare(config, config.nodes)()
        self.upstream = UpstreamPool(
            reactor,
            connect_timeout=config.connect_timeout,
            timeout=config.timeout,
            max_idle_per_node=config.max_idle_per_node,
            tls_creator=self.tls.nodes,
        )
        self.proxy = RotatingProxy(self.pool, self.upstream, reactor, self.proxy_settings(config))
        self.site = ProxySite(self.proxy, reactor=reactor)
        self.health_agent = Agent(
            reactor,
            contextFactory=self.tls.nodes.policy,
            pool=QuietConnectionPool(reactor, persistent=False),
            connectTimeout=config.health.timeout,
        )
        self.checker = HealthChecker(self.pool, config.health, reactor, self.health_agent)
        self.metrics = Metrics(
            self.pool,
            reactor,
            stats=self.proxy.stats,
            checker=self.checker,
            connections=lambda: len(getattr(self.site, "channels", ())),
            upstream_connections=lambda: self.upstream.connection_count,
        )
        self.demo_nodes: tuple[Any, ...] = ()
        if config.demo:
            DemoBackends(reactor, config.demo, self._demo_ready).setServiceParent(self)
        self.checker.setServiceParent(self)
        self.listeners = []
        for description in config.listen:
            listener = Listener(
                self.tls.listen_endpoint(reactor, description, config), self.site
            )
            listener.setting = f"--listen: cannot listen on {description!r}"
            listener._raiseSynchronously = True
            listener.setServiceParent(self)
            self.listeners.append(listener)
        self.admin_listener: Optional[Listener] = None
        if config.admin:
            self.admin_listener = Listener(
                serverFromString(reactor, config.admin),
                AdminSite(self.pool, self.metrics, reactor=reactor),
            )
            self.admin_listener.setting = f"--admin: cannot listen on {config.admin!r}"
            self.admin_listener._raiseSynchronously = True
            self.admin_listener.setServiceParent(self)
            kind = config.admin.split(":", 1)[0]
            if kind in ("tcp", "tcp6", "ssl") and "interface=" not in config.admin:
                self.log.warn(
                    "the admin endpoint {admin} listens on every interface and has no"
                    " authentication: bind it to loopback ({kind}:PORT:interface=127.0.0.1)",
                    admin=config.admin,
                    kind=kind,
                )
        self.access_log: Optional[AccessLog] = None
        self._apply_access_log(config)

    @staticmethod
    def proxy_settings(config: Config) -> ProxySettings:
        return ProxySettings(
            node_host=config.node_host,
            retry_after=max(1, int(config.health.interval + 0.999)),
        )

    def _demo_ready(self, urls: list[str]) -> None:
        self.demo_nodes = tuple(parse_node(u, "--demo") for u in urls)
        self.apply(self.config)

    def apply(self, config: Config) -> None:
        """
        Make C{config} the running configuration. Nodes that stay keep their
        health state and pooled connections (unless their TLS settings
        changed). Every TLS certificate, key and CA file is read again.

        @raise ConfigError: a TLS file cannot be used; nothing was changed.
        """
        nodes = config.nodes + tuple(
            n for n in self.demo_nodes if n.key not in {c.key for c in config.nodes}
        )
        commit_tls = self.tls.prepare(config, nodes)
        for key in commit_tls():
            self.upstream.drop_node(key)
        _, removed = self.pool.update(nodes)
        for node in removed:
            self.upstream.drop_node(node.key)
        self.upstream.connect_timeout = config.connect_timeout
        self.upstream.timeout = config.timeout
        self.upstream.max_idle_per_node = config.max_idle_per_node
        self.proxy.settings = self.proxy_settings(config)
        self.checker.update(config.health)
        self._apply_access_log(config)
        if config.admin != self.config.admin:
            self.log.warn("the admin endpoint changes only with a restart")
        self.config = dataclasses.replace(config)

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

    def stopService(self) -> defer.Deferred[None]:
        d = defer.maybeDeferred(super().stopService)
        d.addBoth(lambda _: self.upstream.close())
        return d


def makeService(options: Options) -> BalancerService:
    """
    Build rrlb's service tree from parsed options.
    """
    from twisted.internet import reactor

    return BalancerService(options.config, reactor, options)
