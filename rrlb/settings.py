# -*- test-case-name: tests.test_settings,tests.test_config -*-
"""
Every setting of rrlb, declared once: each is a field of L{Config}, or of a
section it holds (L{HealthConfig}, L{ListenTLS}) or of L{PoolSettings}, the
part a pool may set too, declared by L{setting} with its type, default,
parser, help, option, scope and whether a reload applies it; its YAML key is
its name. L{rrlb.config} reads YAML and the command line by these rows,
L{rrlb.tap} builds its options from them, and tests/test_settings.py checks
README's options table against them. Pure: no Twisted, no I/O.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, TypeVar, Union

from rrlb.actions import Forward, Redirect, Respond
from rrlb.filters import FilterSpec
from rrlb.values import (
    ClientAuth,
    Network,
    Parser,
    admin_host_names,
    as_given,
    boolean,
    byte_size,
    duration,
    non_negative_float,
    non_negative_int,
    one_of,
    parse_access_log_format,
    parse_balance,
    parse_certificates,
    parse_client_auth,
    parse_domains,
    parse_email,
    parse_hash_key,
    parse_health_path,
    parse_health_service,
    parse_health_type,
    parse_listen,
    parse_log_format,
    parse_node_protocol,
    parse_resolver,
    parse_resolvers,
    parse_sticky,
    parse_url,
    parse_workers,
    percent,
    positive_float,
    positive_int,
    string,
    trusted_networks,
)

T = TypeVar("T")


# -- the declaration --------------------------------------------------------------

# Where a setting applies, and how a pool gets it.
TOP = "top level"
POOL = "top level and pools; a pool inherits the top-level value"
POOL_OWN = "top level (the --nodes pool) and pools; a pool does not inherit it"
_ROW = "rrlb.setting"


@dataclass(frozen=True)
class Setting:
    """
    One setting: see L{setting}, which declares it, and L{rows}.

    @ivar name: its field's name, which is also its YAML key.
    @ivar parse: the parser of its value; L{None} for a section (whose value
        is a class of settings) or a structure L{rrlb.config} reads itself.
    @ivar flag: its option without the dashes; L{None} in L{setting}: the
        name with dashes; C{""}: none.
    @ivar each: for an option given once per value, the parser of one value.
    @ivar shown: its default as README's options table shows it; L{None} in
        L{setting}: the default as it is.
    @ivar feeds: what it is copied into (C{client}: L{rrlb.clients.ClientLimits},
        C{proxy}: L{rrlb.proxy.ProxySettings}), and after a dot its name
        there if that differs.
    """

    default: Any
    parse: Optional[Parser]
    help: str
    scope: str = TOP
    flag: Optional[str] = None
    yaml: bool = True
    reload: bool = True
    shown: Optional[str] = None
    each: Optional[Parser] = None
    feeds: str = ""
    name: str = ""

    @property
    def section(self) -> Optional[type]:
        """
        The class whose settings make up this one's value, if any.
        """
        kind: type = type(self.default)
        return kind if dataclasses.is_dataclass(self.default) and rows(kind) else None

    def help_text(self) -> str:
        """
        The C{--help} text: the help, the default, and whether a reload
        applies it.
        """
        notes = [f"default: {self.shown.replace('`', '')}"] if self.shown else []
        notes += [] if self.reload else ["a reload keeps the running value"]
        return f"{self.help} ({'; '.join(notes)})." if notes else f"{self.help}."


def setting(default: T, parse: Optional[Parser], help: str, **how: Any) -> T:
    """
    Declare a dataclass field as a setting: its default, parser, help, and
    C{how} as the other attributes of L{Setting}.
    """
    return field(default=default, metadata={_ROW: Setting(default, parse, help, **how)})


def _shown(default: Any) -> str:
    if default is False:
        return "off"
    if isinstance(default, (int, float)):
        return f"`{int(default) if float(default).is_integer() else default}`"
    if isinstance(default, str):
        return f"`{default}`"
    if isinstance(default, tuple) and default and all(isinstance(d, str) for d in default):
        return f"`{', '.join(default)}`"
    return ""


@functools.cache
def rows(cls: type) -> tuple[Setting, ...]:
    """
    The settings declared in dataclass C{cls}, in order, named.
    """
    return tuple(
        dataclasses.replace(
            row,
            name=f.name,
            flag=f.name.replace("_", "-") if row.flag is None else row.flag,
            shown=_shown(row.default) if row.shown is None else row.shown,
        )
        for f in dataclasses.fields(cls)
        for row in [f.metadata.get(_ROW)]
        if row is not None
    )


def command_line(cls: Optional[type] = None) -> Iterator[tuple[tuple[str, ...], Setting]]:
    """
    Every setting with an option, and its path in L{Config}: C{("timeout",)},
    or C{("health", "interval")} in a section.
    """
    for row in rows(cls or Config):
        if row.section is not None:
            yield from (((row.name, *path), sub) for path, sub in command_line(row.section))
        elif row.flag:
            yield (row.name,), row


def values_for(part: str, config: Any) -> dict[str, Any]:
    """
    The values of the settings that feed C{part}, by their names there.
    """
    table: type = type(config)
    return {
        (row.feeds.partition(".")[2] or row.name): getattr(config, row.name)
        for row in rows(table)
        if row.feeds.partition(".")[0] == part
    }


# -- the values -------------------------------------------------------------------


@dataclass(frozen=True)
class NodeTLS:
    """
    TLS settings for talking to one https node.
    """

    verify: bool = True
    ca_file: Optional[str] = None
    server_name: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None


@dataclass(frozen=True)
class NodeSpec:
    """
    One backend as configured: where it is and how much traffic it gets.

    @ivar key: what identifies the node across reloads (its URL).
    @ivar base_path: prefixed to every forwarded request target; no trailing
        slash.
    @ivar max_connections: requests in flight to the node at most (0: no
        limit); L{None} follows C{max_conns_per_node}.
    @ivar send_proxy: the PROXY protocol version sent at the start of each
        connection (L{None}: off).
    """

    url: str
    scheme: str
    host: str
    port: int
    base_path: bytes
    weight: int = 1
    tls: NodeTLS = field(default_factory=NodeTLS)
    max_connections: Optional[int] = None
    send_proxy: Optional[str] = None

    @property
    def key(self) -> str:
        return self.url

    @property
    def hostport(self) -> bytes:
        """
        The node's own C{Host} value: host, and the port unless it is the
        scheme's default.
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != (443 if self.scheme == "https" else 80):
            host = f"{host}:{self.port}"
        return host.encode("idna" if not host.isascii() else "ascii")


@dataclass(frozen=True)
class DnsNodes:
    """
    A node entry naming DNS records rather than one address:
    C{{dns: NAME, port: N}} (a node per A/AAAA record) or C{{srv: NAME}} (a
    node per SRV target, at its port). L{rrlb.discovery} resolves it.

    @ivar weight: the entry's own C{weight}, which wins over SRV weights;
        L{None} when not given.
    @ivar template: every other setting of the entry (scheme, tls,
        send_proxy, ...) as a node; each node found is a copy of it.
    """

    name: str
    srv: bool
    port: int
    weight: Optional[int]
    template: NodeSpec

    @property
    def setting(self) -> str:
        return f"{'srv' if self.srv else 'dns'} {self.name}"

    def node(self, address: str, port: int, weight: int = 1, target: str = "") -> NodeSpec:
        """
        The node for one address found: keyed by its URL with the address
        itself in it, and verified (for https) against the DNS name unless
        the entry names a C{tls.server_name}.
        """
        t = self.template
        host = f"[{address}]" if ":" in address else address
        tls = t.tls
        if t.scheme == "https" and tls.server_name is None:
            tls = dataclasses.replace(tls, server_name=(target or self.name).rstrip("."))
        return dataclasses.replace(
            t,
            url=f"{t.scheme}://{host}:{port}{t.base_path.decode('ascii')}",
            host=address,
            port=port,
            weight=self.weight if self.weight is not None else weight,
            tls=tls,
        )


@dataclass(frozen=True)
class RouteConfig:
    """
    One route: its conditions (none: the default route), its filters, and
    its action: its pool, or another action (L{rrlb.actions}).

    @ivar name: its C{name:}, else L{None} (filters then see its index).
    """

    pool: str = ""
    host: Optional[str] = None
    path_prefix: Optional[str] = None
    methods: tuple[str, ...] = ()
    header: tuple[tuple[str, str], ...] = ()
    strip_prefix: bool = False
    name: Optional[str] = None
    filters: tuple[FilterSpec, ...] = ()
    scheme: Optional[str] = None
    query: tuple[tuple[str, str], ...] = ()
    source: tuple[Network, ...] = ()
    path: Optional[str] = None
    # Its action if not pool (""): an rrlb.actions Redirect, Respond or Forward.
    action: Union[Redirect, Respond, Forward, None] = None
    # Whether the client showed a verified certificate (tls.client_auth).
    client_cert: Optional[bool] = None
    # The route as the file gave it, which --print-config writes back
    # (rrlb.configdump).
    entry: Any = field(default=None, compare=False, repr=False)


# -- the table: every setting, declared once --------------------------------------


@dataclass(frozen=True)
class HealthConfig:
    """
    Active health checks: each node is probed on its own timer.
    """

    path: str = setting("/", parse_health_path, "Path probed on each node", flag="health-path")
    interval: float = setting(5.0, positive_float, "Seconds between checks", flag="health-interval")
    timeout: float = setting(2.0, positive_float, "Seconds a check may take", flag="health-timeout")
    rise: int = setting(2, positive_int, "Passed checks in a row that bring a node back")
    fall: int = setting(3, positive_int, "Failed checks in a row that take a node out")
    # None: not set, which is http (and a warning for an h2 pool).
    type: Optional[str] = setting(
        None, parse_health_type, "http (GET the health path), grpc (grpc.health.v1) or tcp",
        flag="health-type", shown="`http`",
    )  # fmt: skip
    service: str = setting(
        "", parse_health_service, "Service name a grpc check asks after", flag="health-service",
        shown="the whole server",
    )  # fmt: skip


ACME_CHALLENGES = ("http-01", "tls-alpn-01")


@dataclass(frozen=True)
class AcmeConfig:
    """
    Certificates from an ACME CA (L{rrlb.acme}), YAML only (C{tls: acme:});
    off unless C{directory} is set.
    """

    directory: Optional[str] = setting(None, parse_url, "ACME directory URL", flag="")
    email: Optional[str] = setting(None, parse_email, "Contact address of the account", flag="")
    domains: tuple[str, ...] = setting((), parse_domains, "Names of the certificate", flag="")
    storage: Optional[str] = setting(
        None, string, "Directory of the account key, keys and certificates", flag=""
    )
    challenge: str = setting("http-01", one_of(*ACME_CHALLENGES), "http-01 or tls-alpn-01", flag="")
    ca_file: Optional[str] = setting(
        None, string, "PEM CA certificates of the ACME server's HTTPS", flag=""
    )
    # None: a third of the certificate's lifetime.
    renew_before: Optional[float] = setting(
        None, duration, "Renew with less than this left (30d)", flag=""
    )

    @property
    def enabled(self) -> bool:
        return self.directory is not None


@dataclass(frozen=True)
class ListenTLS:
    """
    The listeners' certificate and key (the key may sit in the certificate
    file), more certificates chosen by SNI, client certificates, and the
    https nodes' CA file.
    """

    cert: Optional[str] = setting(
        None, string, "PEM certificate (chain) for TLS listeners", flag="tls-cert"
    )
    key: Optional[str] = setting(
        None, string, "PEM key of --tls-cert", flag="tls-key", shown="in `--tls-cert`"
    )
    ca_file: Optional[str] = setting(
        None, string, "PEM CA certificates for https nodes", shown="system trust store"
    )
    certificates: tuple[tuple[str, Optional[str]], ...] = setting(
        (), parse_certificates, "More certificates, chosen by SNI", flag=""
    )
    acme: AcmeConfig = setting(AcmeConfig(), None, "Certificates from an ACME CA", flag="")
    # Client certificates (mTLS) on the TLS listeners rrlb serves.
    client_auth: Optional[ClientAuth] = setting(
        None, parse_client_auth, "Client certificates: {ca_file, mode: require|optional}", flag=""
    )


DEFAULT_POOL = "default"
# Client connections at most when max_connections is not set and the file
# descriptor limit fits more (rrlb.clients.connections_that_fit).
DEFAULT_MAX_CONNECTIONS = 10000


@dataclass(frozen=True)
class PoolSettings:
    """
    What a pool may set. The top level's values (L{Config} is a
    L{PoolSettings} too) are the C{--nodes} pool's, and those of scope
    L{POOL} every other pool's unless it sets its own.
    """

    nodes: tuple[NodeSpec, ...] = setting(
        (), None, "Node base URLs, comma-separated: http[s]://host[:port][/path]", scope=POOL_OWN
    )
    # The entries of nodes: that name DNS records (rrlb.discovery).
    dns_nodes: tuple[DnsNodes, ...] = ()
    health: HealthConfig = setting(HealthConfig(), None, "Health checks", scope=POOL)
    timeout: float = setting(
        30.0, positive_float, "Seconds to wait for a node's response head or body", scope=POOL
    )
    connect_timeout: float = setting(
        5.0, positive_float, "Seconds to wait for a connection to a node", scope=POOL
    )
    protocol: str = setting(
        "http1", parse_node_protocol, "Protocol to nodes: http1, or h2 (HTTP/2; gRPC)",
        scope=POOL, flag="node-protocol",
    )  # fmt: skip
    node_host: bool = setting(
        False, boolean, "Send each node its own host:port as Host", scope=POOL, feeds="proxy"
    )
    max_idle_per_node: int = setting(
        32, non_negative_int, "Idle keep-alive connections kept per node", scope=POOL
    )
    balance: str = setting(
        "roundrobin", parse_balance, "Picking: roundrobin, leastconn, p2c or hash", scope=POOL_OWN
    )
    hash_key: str = setting(
        "source", parse_hash_key, "Hashed: source, uri, header:NAME or cookie:NAME", scope=POOL_OWN
    )
    sticky: Optional[str] = setting(
        None, parse_sticky, "Sticky cookie: {cookie: NAME}", scope=POOL_OWN, flag=""
    )
    slow_start: float = setting(
        0.0, non_negative_float, "Seconds to ramp up a node", scope=POOL_OWN, flag=""
    )


@dataclass(frozen=True)
class PoolConfig(PoolSettings):
    """
    One pool of nodes with all its settings (see L{rrlb.config.all_pools}).
    """

    name: str = DEFAULT_POOL


@dataclass(frozen=True)
class Config(PoolSettings):
    """
    Everything rrlb runs with. A reload builds a new one and swaps it in.
    """

    listen: tuple[str, ...] = setting(
        ("tcp:8080",), parse_listen, "Endpoint to listen on, e.g. tcp:8080; repeatable",
        each=as_given, reload=False,
    )  # fmt: skip
    pools: tuple[PoolConfig, ...] = setting((), None, "Named pools", flag="")
    routes: tuple[RouteConfig, ...] = setting((), None, "Routes to pools", flag="")
    filters: tuple[FilterSpec, ...] = setting(
        (), None, "Filters of every request, before routes", flag=""
    )
    demo: int = setting(
        0, positive_int, "Start N demo nodes on loopback", yaml=False, shown=""
    )
    access_log: Optional[str] = setting(
        None, string, "Access log file ('-' for stdout)", shown="off"
    )
    access_log_format: str = setting("combined", parse_access_log_format, "combined or json")
    log_format: str = setting(
        "text", parse_log_format, "The daemon's own log: text (Twisted's) or json, a JSON object"
        " a line", reload=False,
    )  # fmt: skip
    admin: Optional[str] = setting(
        None, string, "Endpoint of the admin API and status page", reload=False, shown="off"
    )
    admin_hosts: tuple[str, ...] = setting(
        (), admin_host_names, "NAME[,NAME...]: Host names the admin endpoint answers to besides"
        " localhost and IP addresses; any other gets 421", shown="none",
    )  # fmt: skip
    admin_token_file: Optional[str] = setting(
        None, string, "File holding a bearer token every admin request must send as"
        " Authorization: Bearer TOKEN; read at start-up and on reload", shown="none",
    )  # fmt: skip
    # The token itself, read from admin_token_file at start-up and on reload
    # (rrlb.config.with_admin_token); never printed.
    admin_token: Optional[bytes] = field(default=None, repr=False)
    drain_timeout: float = setting(30.0, positive_float, "Seconds in-flight requests get at exit")
    tls: ListenTLS = setting(ListenTLS(), None, "TLS certificates and CA file")
    # What a client may send, and for how long (docs/security.md).
    max_header_size: int = setting(
        32768, positive_int, "Bytes of a request head at most, else 431", feeds="client"
    )
    max_headers: int = setting(
        100, positive_int, "Header lines of a request at most, else 431", feeds="client"
    )
    max_body_size: int = setting(
        0, byte_size, "Request body size at most (K, M, G), else 413", feeds="client",
        shown="`0` (no limit)",
    )  # fmt: skip
    client_header_timeout: float = setting(
        10.0, positive_float, "Seconds a request head may take", feeds="client.header_timeout"
    )
    client_body_timeout: float = setting(
        60.0, positive_float, "Seconds between body bytes at most", feeds="client.body_timeout"
    )
    keepalive_timeout: float = setting(
        60.0, positive_float, "Seconds an idle client connection stays open", feeds="client"
    )
    max_connections: Optional[int] = setting(
        None, positive_int, "Client connections open at most", feeds="client",
        shown=f"what the descriptor limit fits, at most `{DEFAULT_MAX_CONNECTIONS}`",
    )  # fmt: skip
    trusted_proxies: tuple[Network, ...] = setting(
        (), trusted_networks, "CIDR[,CIDR...] whose X-Forwarded-* are kept", feeds="client",
        shown="unset",
    )  # fmt: skip
    proxy_protocol_from: tuple[Network, ...] = setting(
        (), trusted_networks, "CIDR[,CIDR...]: the peers haproxy: listeners take a PROXY header"
        " from; a connection from any other is closed", feeds="client", shown="unset",
    )  # fmt: skip
    # Overload: per-node limits, the queue, retries and their budget.
    max_conns_per_node: int = setting(
        0, non_negative_int, "Requests in flight to a node at most", shown="`0` (no limit)"
    )
    queue_timeout: float = setting(
        5.0, non_negative_float, "Seconds a request waits for a node with room"
    )
    retries: int = setting(
        2, non_negative_int, "Other nodes an idempotent request is tried on", feeds="proxy"
    )
    retry_budget: float = setting(20.0, percent, "Retries in flight at most, in % of requests")
    tunnel_timeout: float = setting(
        3600.0, positive_float, "Seconds a quiet WebSocket tunnel stays open", feeds="proxy"
    )
    http2: bool = setting(
        False, boolean, "Offer HTTP/2 (h2) besides HTTP/1.1 by ALPN on TLS listeners, and h2c"
        " (prior knowledge) on tcp: listeners",
        reload=False,
    )
    # Nodes from DNS (rrlb.discovery).
    dns_refresh: float = setting(30.0, positive_float, "Seconds between DNS lookups at most")
    resolvers: tuple[tuple[str, int], ...] = setting(
        (), parse_resolvers, "Name server HOST[:PORT]; repeatable", flag="resolver",
        each=parse_resolver, shown="`/etc/resolv.conf`",
    )  # fmt: skip
    workers: int = setting(1, parse_workers, "Worker processes, or auto", reload=False)


def restart_only() -> tuple[Setting, ...]:
    """
    The settings a reload does not apply (declared with C{reload=False}):
    they change only with a restart.
    """
    return tuple(row for row in rows(Config) if not row.reload)
