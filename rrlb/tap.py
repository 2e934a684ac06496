# -*- test-case-name: tests.test_tap -*-
"""
The twistd plugin: its options, and L{makeService}, the only place that
picks the real reactor and the process's environment and hands them to the
service tree (L{rrlb.service.BalancerService}).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from rrlb import __version__
from rrlb.accesslog import STDOUT
from rrlb.channel import raise_fd_limit
from rrlb.config import (
    Config,
    ConfigError,
    admin_host_names,
    build_config,
    byte_size,
    non_negative_float,
    non_negative_int,
    parse_access_log_format,
    parse_balance,
    parse_hash_key,
    parse_health_path,
    parse_node,
    parse_resolver,
    parse_workers,
    percent,
    positive_float,
    positive_int,
    trusted_networks,
    with_admin_token,
)
from rrlb.notify import recover_listen_fds
from rrlb.service import BalancerService
from rrlb.tls import check_tls, listen_endpoint, listen_kind, tls_on_tcp

log = Logger()


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
    "admin-hosts": "admin_hosts",
    "admin-token-file": "admin_token_file",
    "drain-timeout": "drain_timeout",
    "max-header-size": "max_header_size",
    "max-headers": "max_headers",
    "max-body-size": "max_body_size",
    "client-header-timeout": "client_header_timeout",
    "client-body-timeout": "client_body_timeout",
    "keepalive-timeout": "keepalive_timeout",
    "max-connections": "max_connections",
    "trusted-proxies": "trusted_proxies",
    "proxy-protocol-from": "proxy_protocol_from",
    "max-conns-per-node": "max_conns_per_node",
    "queue-timeout": "queue_timeout",
    "tunnel-timeout": "tunnel_timeout",
    "retries": "retries",
    "retry-budget": "retry_budget",
    "balance": "balance",
    "hash-key": "hash_key",
    "dns-refresh": "dns_refresh",
    "workers": "workers",
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
        [
            "http2",
            None,
            "Offer HTTP/2 (h2) besides HTTP/1.1 by ALPN on TLS listeners.",
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
            _coerce(lambda name, v: parse_access_log_format(v, name), "--access-log-format"),
        ],
        [
            "admin",
            None,
            None,
            "Endpoint for the admin API and status page,"
            " e.g. tcp:8081:interface=127.0.0.1 (default: off).",
        ],
        [
            "admin-hosts",
            None,
            None,
            "NAME[,NAME...]: Host names the admin endpoint answers to besides localhost"
            " and IP addresses; any other gets 421 (default: none).",
            _coerce(admin_host_names, "--admin-hosts"),
        ],
        [
            "admin-token-file",
            None,
            None,
            "File holding a bearer token every admin request must send as"
            " Authorization: Bearer TOKEN; read at start-up and on reload (default: none).",
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
            "max-header-size",
            None,
            None,
            "Most bytes of a request line and its header lines; more gets 431"
            " (default: 32768; a request line over 8192 gets 414).",
            _coerce(positive_int, "--max-header-size"),
        ],
        [
            "max-headers",
            None,
            None,
            "Most header lines in a request; more gets 431 (default: 100).",
            _coerce(positive_int, "--max-headers"),
        ],
        [
            "max-body-size",
            None,
            None,
            "Largest request body, in bytes or with K, M, G; more gets 413"
            " (default: 0, no limit).",
            _coerce(byte_size, "--max-body-size"),
        ],
        [
            "client-header-timeout",
            None,
            None,
            "Seconds a request head may take from its first byte; then 408 (default: 10).",
            _coerce(positive_float, "--client-header-timeout"),
        ],
        [
            "client-body-timeout",
            None,
            None,
            "Seconds without a byte of the request body before 408 (default: 60).",
            _coerce(positive_float, "--client-body-timeout"),
        ],
        [
            "keepalive-timeout",
            None,
            None,
            "Seconds an idle keep-alive client connection stays open (default: 60).",
            _coerce(positive_float, "--keepalive-timeout"),
        ],
        [
            "max-connections",
            None,
            None,
            "Most client connections open at once; at the cap rrlb stops accepting"
            " (default: what the file descriptor limit fits, at most 10000).",
            _coerce(positive_int, "--max-connections"),
        ],
        [
            "trusted-proxies",
            None,
            None,
            "CIDR[,CIDR...]: proxies whose X-Forwarded-* headers are kept; from any"
            " other peer they are replaced (default: unset, X-Forwarded-For is appended to).",
            _coerce(trusted_networks, "--trusted-proxies"),
        ],
        [
            "proxy-protocol-from",
            None,
            None,
            "CIDR[,CIDR...]: the peers haproxy: listeners take a PROXY header from;"
            " a connection from any other is closed (default: unset, any peer).",
            _coerce(trusted_networks, "--proxy-protocol-from"),
        ],
        [
            "dns-refresh",
            None,
            None,
            "Longest time in seconds between two DNS lookups of a node name;"
            " shorter TTLs win (default: 30).",
            _coerce(positive_float, "--dns-refresh"),
        ],
        [
            "workers",
            None,
            None,
            "Worker processes serving traffic, or auto for one per CPU; the main"
            " process keeps the listeners, health checks and admin (default: 1).",
            _coerce(parse_workers, "--workers"),
        ],
        [
            "demo",
            None,
            None,
            "Start N demo backends on loopback and balance over them.",
            _coerce(positive_int, "--demo"),
        ],
        # Overload: per-node limits, the queue, retries and their budget.
        [
            "max-conns-per-node",
            None,
            None,
            "Requests in flight to a node at most, for nodes without their own"
            " max_connections (default: 0, no limit).",
            _coerce(non_negative_int, "--max-conns-per-node"),
        ],
        [
            "queue-timeout",
            None,
            None,
            "Seconds a request waits when every node is full before it gets 503 (default: 5).",
            _coerce(non_negative_float, "--queue-timeout"),
        ],
        [
            "tunnel-timeout",
            None,
            None,
            "Seconds a WebSocket tunnel may pass no byte either way before it is"
            " closed (default: 3600).",
            _coerce(positive_float, "--tunnel-timeout"),
        ],
        [
            "retries",
            None,
            None,
            "Other nodes an idempotent request is tried on at most (default: 2).",
            _coerce(non_negative_int, "--retries"),
        ],
        [
            "retry-budget",
            None,
            None,
            "Retries in flight at most, as a percentage of requests in flight;"
            " 3 are always allowed (default: 20).",
            _coerce(percent, "--retry-budget"),
        ],
        # Balancing of the --nodes pool (pools: in YAML set their own).
        [
            "balance",
            None,
            None,
            "How the --nodes pool picks a node: roundrobin, leastconn, p2c or hash"
            " (default: roundrobin).",
            _coerce(parse_balance, "--balance"),
        ],
        [
            "hash-key",
            None,
            None,
            "What --balance hash hashes: source, uri, header:NAME or cookie:NAME"
            " (default: source).",
            _coerce(parse_hash_key, "--hash-key"),
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["resolvers"] = []

    def opt_listen(self, description: str) -> None:
        """
        Listen on a Twisted server endpoint description, e.g. tcp:8080 or
        ssl:8443:privateKey=key.pem:certKey=cert.pem; repeatable (default: tcp:8080).
        """
        self["listen"].append(description)

    def opt_resolver(self, server: str) -> None:
        """
        Name server HOST[:PORT] for DNS node entries (default: resolv.conf's); repeatable.
        """
        try:
            self["resolvers"].append(parse_resolver("--resolver", server))
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

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
        if self["resolvers"]:
            top["resolvers"] = tuple(self["resolvers"])
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
        if self["http2"]:
            top["http2"] = True
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
        name = "--admin-token-file" if self["admin-token-file"] else "admin_token_file"
        return with_admin_token(config, name)

    def postOptions(self) -> None:
        try:
            self.config = self.load()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        from twisted.internet import reactor

        descriptions = self.config.listen + ((self.config.admin,) if self.config.admin else ())
        if any(listen_kind(d.lstrip())[1] == "systemd" for d in descriptions):
            recover_listen_fds(os.getpid())
        on_tcp = tls_on_tcp(self.config.listen, self.config.tls)
        for description in self.config.listen:
            check_endpoint(reactor, description, tls=(self.config.tls, on_tcp))
        if self.config.admin:
            check_endpoint(reactor, self.config.admin, "--admin")
        if self.config.http2:
            check_http2("--http2" if self["http2"] else "http2")
        if self.config.workers > 1:
            from rrlb.workers import check_listeners

            try:
                check_listeners(self.config)
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None
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
    except (IndexError, KeyError) as e:
        if listen_kind(description)[1] == "systemd":
            # twisted.python.systemd found no such inherited socket.
            raise usage.UsageError(
                f"{name}: no socket from systemd for {description!r}"
                " (LISTEN_FDS/LISTEN_PID do not pass one to this process; see rrlb.socket)"
            ) from None
        raise usage.UsageError(f"{name}: bad endpoint description {description!r}: {e}") from None
    except Exception as e:
        raise usage.UsageError(f"{name}: bad endpoint description {description!r}: {e}") from None


def check_http2(name: str) -> None:
    """
    Load rrlb's HTTP/2 support now, so that a missing C{h2} package (a
    dependency, so only in a broken install) stops start-up with one line
    rather than a traceback when the service is built.
    """
    try:
        import rrlb.http2  # noqa: F401
    except ImportError as e:
        raise usage.UsageError(
            f"{name}: HTTP/2 support cannot be loaded ({e});"
            " reinstall rrlb, or pip install 'twisted[http2]'"
        ) from None


def check_log_path(path: str, name: str) -> None:
    """
    Open the access log file once now, so one that cannot be written stops
    start-up with a clear line.
    """
    try:
        open(path, "ab").close()
    except OSError as e:
        raise usage.UsageError(f"{name}: cannot open {path!r}: {e.strerror or e}") from None


def warn_open_proxy_protocol(config: Config) -> None:
    """
    Say once at start-up that C{haproxy:} listeners believe any peer's
    PROXY header when C{proxy_protocol_from} is unset.
    """
    if config.proxy_protocol_from:
        return
    proxied = [d for d in config.listen if listen_kind(d)[0]]
    if proxied:
        log.warn(
            "{listeners}: any peer that reaches a haproxy: listener can claim any client"
            " address in its PROXY header; set proxy_protocol_from"
            " (--proxy-protocol-from) to the load balancers' addresses",
            listeners=", ".join(proxied),
        )


def makeService(options: Options) -> BalancerService:
    """
    Build rrlb's service tree from parsed options: with C{--workers} above
    1, the main process of L{rrlb.workers} (imported only then).
    """
    from twisted.internet import reactor

    raise_fd_limit(options.config.max_connections)
    warn_open_proxy_protocol(options.config)
    if options.config.workers > 1:
        from rrlb.workers import MainService

        return MainService(
            options.config,
            reactor,
            options,
            environ=os.environ,
            pid=os.getpid(),
            handle_signals=True,
        )
    return BalancerService(
        options.config, reactor, options, environ=os.environ, pid=os.getpid(), handle_signals=True
    )
