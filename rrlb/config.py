# -*- test-case-name: tests.test_config -*-
"""
rrlb's settings: YAML and command-line values merged into one frozen
L{Config}. Every mistake raises L{ConfigError} with a message that names the
setting and the bad value. No Twisted here: this module only parses.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union
from urllib.parse import urlsplit

import yaml

DEFAULT_LISTEN = ("tcp:8080",)
MAX_WEIGHT = 256
# Client connections at most when max_connections is not set and the file
# descriptor limit fits more (rrlb.channel.connections_that_fit).
DEFAULT_MAX_CONNECTIONS = 10000


Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class ConfigError(ValueError):
    """
    A setting is missing or wrong; the message names it and its value.
    """


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
    """

    url: str
    scheme: str
    host: str
    port: int
    base_path: bytes
    weight: int = 1
    tls: NodeTLS = field(default_factory=NodeTLS)
    # Requests in flight to the node at most (0: no limit); None follows
    # max_conns_per_node.
    max_connections: Optional[int] = None
    # PROXY protocol version sent at the start of each connection (None: off).
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
        default = 443 if self.scheme == "https" else 80
        if self.port != default:
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
class HealthConfig:
    """
    Active health check settings.
    """

    path: str = "/"
    interval: float = 5.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3


BALANCE_POLICIES = ("roundrobin", "leastconn", "p2c", "hash")
DEFAULT_POOL = "default"


@dataclass(frozen=True)
class PoolConfig:
    """
    One pool of nodes with its own health checks, policy and upstream
    settings, each inherited from the top level unless the pool sets it.

    @ivar sticky: the sticky cookie's name, or L{None}.
    @ivar slow_start: seconds over which a node that comes back ramps from
        10% to 100% of its weight (0: none).
    """

    name: str
    nodes: tuple[NodeSpec, ...] = ()
    # Entries whose nodes come from DNS (rrlb.discovery).
    dns_nodes: tuple[DnsNodes, ...] = ()
    health: HealthConfig = field(default_factory=HealthConfig)
    balance: str = "roundrobin"
    hash_key: str = "source"
    sticky: Optional[str] = None
    slow_start: float = 0.0
    timeout: float = 30.0
    connect_timeout: float = 5.0
    node_host: bool = False
    max_idle_per_node: int = 32


@dataclass(frozen=True)
class RouteConfig:
    """
    One route: its conditions (none: the default route) and its pool.
    """

    pool: str
    host: Optional[str] = None
    path_prefix: Optional[str] = None
    methods: tuple[str, ...] = ()
    header: tuple[tuple[str, str], ...] = ()
    strip_prefix: bool = False


@dataclass(frozen=True)
class ListenTLS:
    """
    The top-level C{tls} settings: the listeners' certificate and key
    (C{--tls-cert}/C{--tls-key}; the key may sit in the certificate file),
    more certificates chosen by SNI, and the default CA file for https nodes
    (C{--ca-file}).
    """

    cert: Optional[str] = None
    key: Optional[str] = None
    ca_file: Optional[str] = None
    certificates: tuple[tuple[str, Optional[str]], ...] = ()


@dataclass(frozen=True)
class Config:
    """
    Everything rrlb runs with. A reload builds a new one and swaps it in.
    """

    listen: tuple[str, ...] = DEFAULT_LISTEN
    nodes: tuple[NodeSpec, ...] = ()
    health: HealthConfig = field(default_factory=HealthConfig)
    timeout: float = 30.0
    connect_timeout: float = 5.0
    node_host: bool = False
    max_idle_per_node: int = 32
    access_log: Optional[str] = None
    access_log_format: str = "combined"
    admin: Optional[str] = None
    # Host names the admin endpoint answers to besides localhost and IP
    # literals, and the file of its bearer token (rrlb.admin).
    admin_hosts: tuple[str, ...] = ()
    admin_token_file: Optional[str] = None
    # The token itself, read from admin_token_file at start-up and on
    # reload (with_admin_token); never printed.
    admin_token: Optional[bytes] = field(default=None, repr=False)
    drain_timeout: float = 30.0
    demo: int = 0
    tls: ListenTLS = field(default_factory=ListenTLS)
    # Client limits (docs/security.md).
    max_header_size: int = 32768
    max_headers: int = 100
    max_body_size: int = 0
    client_header_timeout: float = 10.0
    client_body_timeout: float = 60.0
    keepalive_timeout: float = 60.0
    # None: what the file descriptor limit fits, at most
    # DEFAULT_MAX_CONNECTIONS (rrlb.channel.connections_that_fit).
    max_connections: Optional[int] = None
    trusted_proxies: tuple[Network, ...] = ()
    # The peers a haproxy: listener takes a PROXY header from; empty: any.
    proxy_protocol_from: tuple[Network, ...] = ()
    # Overload: per-node limits, the queue, retries and their budget.
    max_conns_per_node: int = 0
    queue_timeout: float = 5.0
    retries: int = 2
    retry_budget: float = 20.0
    # WebSocket tunnels: closed after this long with no byte either way.
    tunnel_timeout: float = 3600.0
    # HTTP/2 for clients on TLS listeners (ALPN h2), rrlb.http2.
    http2: bool = False
    # Nodes from DNS (rrlb.discovery): the entries, the longest time between
    # two lookups of a name, and the name servers (none: /etc/resolv.conf).
    dns_nodes: tuple[DnsNodes, ...] = ()
    dns_refresh: float = 30.0
    resolvers: tuple[tuple[str, int], ...] = ()
    # Worker processes serving traffic (rrlb.workers); 1 is one process.
    workers: int = 1
    # Balancing of the default pool (nodes/--nodes), and the named pools and
    # the routes to them (docs: README "Routing").
    balance: str = "roundrobin"
    hash_key: str = "source"
    sticky: Optional[str] = None
    slow_start: float = 0.0
    pools: tuple[PoolConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()


# The command-line names of the settings that can come from either place,
# mapped to their place in the YAML file.
_TOP_KEYS = frozenset(
    {
        "listen",
        "nodes",
        "health",
        "timeout",
        "connect_timeout",
        "node_host",
        "max_idle_per_node",
        "access_log",
        "access_log_format",
        "admin",
        "admin_hosts",
        "admin_token_file",
        "drain_timeout",
        "tls",
        "max_header_size",
        "max_headers",
        "max_body_size",
        "client_header_timeout",
        "client_body_timeout",
        "keepalive_timeout",
        "max_connections",
        "trusted_proxies",
        "proxy_protocol_from",
        "max_conns_per_node",
        "queue_timeout",
        "retries",
        "retry_budget",
        "tunnel_timeout",
        "http2",
        "dns_refresh",
        "resolvers",
        "workers",
        "balance",
        "hash_key",
        "sticky",
        "slow_start",
        "pools",
        "routes",
    }
)
# What a pool may set; everything but nodes is inherited from the top level.
_POOL_KEYS = frozenset(
    {
        "nodes",
        "health",
        "balance",
        "hash_key",
        "sticky",
        "slow_start",
        "timeout",
        "connect_timeout",
        "node_host",
        "max_idle_per_node",
    }
)
_ROUTE_KEYS = frozenset({"host", "path_prefix", "methods", "header", "strip_prefix", "pool"})
_STICKY_KEYS = frozenset({"cookie"})
_HEALTH_KEYS = frozenset({"path", "interval", "timeout", "rise", "fall"})
_NODE_KEYS = frozenset({"url", "weight", "tls", "max_connections", "send_proxy"})
# Keys of a DNS node entry besides the node keys (url excepted) it shares.
_DNS_NODE_KEYS = frozenset({"dns", "srv", "port", "scheme"})
SEND_PROXY_VERSIONS = ("v1", "v2")
_NODE_TLS_KEYS = frozenset({"verify", "ca_file", "server_name", "cert", "key"})
_LISTEN_TLS_KEYS = frozenset({"cert", "key", "ca_file", "certificates"})
_SNI_CERT_KEYS = frozenset({"cert", "key"})
ACCESS_LOG_FORMATS = ("combined", "json")


def positive_float(name: str, value: Any) -> float:
    """
    A number of seconds greater than zero.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}") from None
    if not number > 0 or not math.isfinite(number):
        raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
    return number


def positive_int(name: str, value: Any, maximum: Optional[int] = None) -> int:
    """
    A whole number from 1 (to C{maximum}).
    """
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().lstrip("+").isdigit():
        number = int(value)
    else:
        number = None
    if number is None or number < 1 or (maximum is not None and number > maximum):
        bound = f" from 1 to {maximum}" if maximum else " of at least 1"
        raise ConfigError(f"{name} must be a whole number{bound}, not {value!r}")
    return number


def non_negative_int(name: str, value: Any) -> int:
    """
    A whole number from 0.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ConfigError(f"{name} must be a whole number of at least 0, not {value!r}")


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def byte_size(name: str, value: Any) -> int:
    """
    A number of bytes, with an optional C{K}, C{M} or C{G} suffix (powers of
    1024, as nginx reads them); 0 is allowed (no limit).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    text = value.strip().upper() if isinstance(value, str) else ""
    if text.endswith("B") and text[-2:-1] in ("K", "M", "G"):
        text = text[:-1]
    unit = text[-1:] if text[-1:] in ("K", "M", "G") else ""
    digits = text[: len(text) - len(unit)].strip()
    if not digits.isdigit() or not digits.isascii():
        raise ConfigError(
            f"{name} must be a size in bytes, optionally with K, M or G (e.g. 10M), not {value!r}"
        )
    return int(digits) * _SIZE_UNITS[unit]


def trusted_networks(name: str, value: Any) -> tuple[Network, ...]:
    """
    Networks in CIDR notation (a bare address is a /32 or /128): a list, or
    one comma-separated string.
    """
    if isinstance(value, str):
        value = [v for v in value.split(",")]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{name} must be a list of networks like 10.0.0.0/8, not {value!r}")
    networks = []
    for item in value:
        text = item.strip() if isinstance(item, str) else item
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except (TypeError, ValueError):
            raise ConfigError(
                f"{name}: {item!r} is not a network in CIDR notation (like 10.0.0.0/8)"
            ) from None
    return tuple(networks)


# A host name as an admin_hosts entry (underscores too: container and
# compose service names have them).
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


def admin_host_names(name: str, value: Any) -> tuple[str, ...]:
    """
    Host names the admin endpoint answers to (a list, or one comma-separated
    string), lower-cased, without a port or a trailing dot.
    """
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{name} must be a list of host names like admin.internal, not {value!r}")
    names = []
    for item in value:
        text = item.strip().lower().rstrip(".") if isinstance(item, str) else ""
        if not _HOST_NAME.fullmatch(text):
            raise ConfigError(
                f"{name}: {item!r} is not a host name (like admin.internal, without a port)"
            )
        names.append(text)
    return tuple(names)


# RFC 6750's b64token, what a bearer token may hold; and a bound on the file.
_BEARER_TOKEN = re.compile(rb"[A-Za-z0-9._~+/-]+=*")
MAX_TOKEN = 4096


def read_admin_token(path: str, name: str = "admin_token_file") -> bytes:
    """
    The bearer token in the file at C{path}: one token (RFC 6750 characters),
    with surrounding whitespace and a final newline ignored.

    @raise ConfigError: naming C{name} if the file cannot be read, is empty
        or holds something else.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TOKEN + 1)
    except OSError as e:
        raise ConfigError(f"{name}: cannot read {path!r}: {e.strerror or e}") from None
    token = data.strip()
    if not token:
        raise ConfigError(f"{name}: {path!r} is empty; it must hold the admin API's bearer token")
    if len(data) > MAX_TOKEN or not _BEARER_TOKEN.fullmatch(token):
        raise ConfigError(
            f"{name}: {path!r} must hold one token of letters, digits and -._~+/"
            " (e.g. from: openssl rand -hex 32)"
        )
    return token


def with_admin_token(config: Config, name: str = "admin_token_file") -> Config:
    """
    C{config} with the token of its C{admin_token_file} read (none without).

    @raise ConfigError: the file cannot be used (L{read_admin_token}).
    """
    if config.admin_token_file is None:
        return config
    return dataclasses.replace(config, admin_token=read_admin_token(config.admin_token_file, name))


# Most worker processes: far more than any machine has cores, so a typo
# (--workers 1000) is refused rather than forking a thousand processes.
MAX_WORKERS = 256


def parse_workers(name: str, value: Any) -> int:
    """
    The number of worker processes: a whole number, or C{auto} for one per
    CPU.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return max(1, os.cpu_count() or 1)
    try:
        return positive_int(name, value, MAX_WORKERS)
    except ConfigError:
        raise ConfigError(
            f"{name} must be auto or a whole number from 1 to {MAX_WORKERS}, not {value!r}"
        ) from None


def non_negative_float(name: str, value: Any) -> float:
    """
    A number of seconds from 0.
    """
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not number >= 0 or not math.isfinite(number):
        raise ConfigError(f"{name} must be a number of seconds of at least 0, not {value!r}")
    return number


def percent(name: str, value: Any) -> float:
    """
    A percentage from 0 to 100.
    """
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not 0 <= number <= 100:
        raise ConfigError(f"{name} must be a percentage from 0 to 100, not {value!r}")
    return number


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{name} must be true or false, not {value!r}")


def _string(name: str, value: Any) -> str:
    if isinstance(value, str) and value:
        return value
    raise ConfigError(f"{name} must be a non-empty string, not {value!r}")


def _mapping(name: str, value: Any, allowed: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a mapping, not {value!r}")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise ConfigError(
            f"unknown setting {name}.{unknown[0]} (known: {', '.join(sorted(allowed))})"
        )
    return value


def parse_node_tls(name: str, value: Any) -> NodeTLS:
    """
    A node's C{tls} mapping.
    """
    raw = _mapping(name, value, _NODE_TLS_KEYS)
    kwargs: dict[str, Any] = {}
    for key, item in raw.items():
        if key == "verify":
            kwargs[key] = _boolean(f"{name}.verify", item)
        else:
            kwargs[key] = _string(f"{name}.{key}", item)
    if ("cert" in kwargs) != ("key" in kwargs):
        raise ConfigError(f"{name} needs both cert and key for a client certificate")
    return NodeTLS(**kwargs)


# Characters that cannot appear in a host or path as sent on the wire (they
# would break the request line or the Host header).
_BAD_URL_CHARS = frozenset(' <>"{}|\\^`')


def parse_node(value: Any, where: str = "nodes", default_tls: Optional[NodeTLS] = None) -> NodeSpec:
    """
    One node: a URL, or a mapping C{{url: URL, weight: N, tls: {...}}}.
    """
    weight = 1
    max_connections = None
    tls = default_tls or NodeTLS()
    send_proxy = None
    if isinstance(value, dict):
        raw = _mapping(where, value, _NODE_KEYS)
        if "url" not in raw:
            raise ConfigError(f"{where} needs a url, got {value!r}")
        if "weight" in raw:
            weight = positive_int(f"{where}.weight", raw["weight"], MAX_WEIGHT)
        if "max_connections" in raw:
            max_connections = non_negative_int(f"{where}.max_connections", raw["max_connections"])
        if "tls" in raw:
            tls = parse_node_tls(f"{where}.tls", raw["tls"])
            if default_tls is not None and tls.ca_file is None:
                tls = dataclasses.replace(tls, ca_file=default_tls.ca_file)
        if "send_proxy" in raw:
            send_proxy = raw["send_proxy"]
            if send_proxy not in SEND_PROXY_VERSIONS:
                raise ConfigError(f"{where}.send_proxy must be v1 or v2, not {send_proxy!r}")
        value = raw["url"]
    if not isinstance(value, str):
        raise ConfigError(f"{where}: a node must be a URL, not {value!r}")
    url = value.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"{where}: bad node URL {url!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ConfigError(f"{where}: node URL {url!r} must start with http:// or https://")
    if not parts.hostname:
        raise ConfigError(f"{where}: node URL {url!r} has no host")
    if any(c in _BAD_URL_CHARS or not c.isprintable() for c in parts.hostname):
        raise ConfigError(f"{where}: node URL {url!r} has a bad host {parts.hostname!r}")
    if any(c in _BAD_URL_CHARS or not c.isprintable() for c in parts.path):
        raise ConfigError(f"{where}: node URL {url!r} has a path that is not percent-encoded")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{where}: node URL {url!r} may have only a scheme, host, port and path")
    if port is None:
        port = 443 if scheme == "https" else 80
    if port == 0:
        raise ConfigError(f"{where}: node URL {url!r} has port 0")
    base = parts.path.rstrip("/")
    try:
        base_path = base.encode("ascii")
    except UnicodeEncodeError:
        raise ConfigError(
            f"{where}: node URL {url!r} has a path that is not percent-encoded"
        ) from None
    return NodeSpec(
        url=url,
        scheme=scheme,
        host=parts.hostname,
        port=port,
        base_path=base_path,
        weight=weight,
        tls=tls,
        max_connections=max_connections,
        send_proxy=send_proxy,
    )


def _dns_name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a DNS name, not {value!r}")
    text = value.strip().rstrip(".").lower()
    labels = text.split(".")
    if len(text) > 253 or not all(
        0 < len(label) <= 63 and label.isascii() and all(c.isalnum() or c in "-_" for c in label)
        for label in labels
    ):
        raise ConfigError(f"{name} must be a DNS name, not {value!r}")
    return text


def parse_dns_node(
    value: Mapping[str, Any], where: str = "nodes", default_tls: Optional[NodeTLS] = None
) -> DnsNodes:
    """
    A node entry naming DNS records: C{{dns: NAME, port: N}} or C{{srv:
    NAME}}, with C{scheme} (default http) and any node key but C{url}, which
    apply to every node found.
    """
    allowed = (_NODE_KEYS - {"url"}) | _DNS_NODE_KEYS
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise ConfigError(
            f"unknown setting {where}.{unknown[0]} (known: {', '.join(sorted(allowed))})"
        )
    if "dns" in value and "srv" in value:
        raise ConfigError(f"{where} may name dns or srv, not both")
    srv = "srv" in value
    name = _dns_name(f"{where}.{'srv' if srv else 'dns'}", value["srv" if srv else "dns"])
    scheme = value.get("scheme", "http")
    if scheme not in ("http", "https"):
        raise ConfigError(f"{where}.scheme must be http or https, not {scheme!r}")
    port = 0
    if srv:
        if "port" in value:
            raise ConfigError(f"{where}.port: an srv entry takes each target's port from DNS")
    elif "port" not in value:
        raise ConfigError(f"{where}.port: a dns entry needs the nodes' port")
    else:
        port = positive_int(f"{where}.port", value["port"], 65535)
    # Every other key means what it means for one node: parse it as one.
    node = {k: v for k, v in value.items() if k not in _DNS_NODE_KEYS}
    node["url"] = f"{scheme}://{name}"
    template = parse_node(node, where, default_tls)
    weight = template.weight if "weight" in value else None
    return DnsNodes(name=name, srv=srv, port=port, weight=weight, template=template)


def parse_node_entries(
    value: Any, where: str = "nodes", default_tls: Optional[NodeTLS] = None
) -> tuple[tuple[NodeSpec, ...], tuple[DnsNodes, ...]]:
    """
    The YAML C{nodes} list: nodes (see L{parse_nodes}) and DNS entries.
    """
    if not isinstance(value, list):
        return parse_nodes(value, where, default_tls), ()
    plain = []
    dns: list[DnsNodes] = []
    for i, entry in enumerate(value):
        if isinstance(entry, dict) and ("dns" in entry or "srv" in entry):
            dns.append(parse_dns_node(entry, f"{where}[{i}]", default_tls))
        else:
            plain.append((i, entry))
    nodes = tuple(parse_node(v, f"{where}[{i}]", default_tls) for i, v in plain)
    _check_unique(nodes, where)
    seen: set[tuple[str, bool, int]] = set()
    for entry in dns:
        if (entry.name, entry.srv, entry.port) in seen:
            raise ConfigError(f"{where}: {entry.setting} is listed twice")
        seen.add((entry.name, entry.srv, entry.port))
    return nodes, tuple(dns)


def _check_unique(nodes: tuple[NodeSpec, ...], where: str) -> None:
    seen: set[str] = set()
    for node in nodes:
        if node.key in seen:
            raise ConfigError(f"{where}: node {node.url!r} is listed twice")
        seen.add(node.key)


def parse_resolver(name: str, value: Any) -> tuple[str, int]:
    """
    A name server as C{HOST[:PORT]}: an IPv4 address, or an IPv6 one in
    brackets when a port follows (C{[::1]:53}); the port defaults to 53.
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be HOST[:PORT] with HOST an IP address, not {value!r}")
    text = value.strip()
    host, port_text = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                host = ""
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{name} must be HOST[:PORT] with HOST an IP address, not {value!r}"
        ) from None
    try:
        port = positive_int(name, port_text, 65535)
    except ConfigError:
        raise ConfigError(f"{name}: bad port in {value!r}") from None
    return str(address), port


def parse_resolvers(name: str, value: Any) -> tuple[tuple[str, int], ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{name} must be a list of HOST[:PORT], not {value!r}")
    return tuple(parse_resolver(f"{name}[{i}]", v) for i, v in enumerate(value))


def parse_nodes(
    value: Any, where: str = "nodes", default_tls: Optional[NodeTLS] = None
) -> tuple[NodeSpec, ...]:
    """
    A list of nodes (or a comma-separated string of URLs); no two the same.
    """
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of node URLs, not {value!r}")
    nodes = tuple(parse_node(v, f"{where}[{i}]", default_tls) for i, v in enumerate(value))
    _check_unique(nodes, where)
    return nodes


def parse_health_path(name: str, value: Any) -> str:
    path = _string(name, value)
    if not path.startswith("/"):
        raise ConfigError(f"{name} must start with '/', not {value!r}")
    if any(c in path for c in " \r\n\t") or not path.isascii():
        raise ConfigError(f"{name} must be a percent-encoded path, not {value!r}")
    return path


def parse_health(value: Any, where: str = "health") -> dict[str, Any]:
    """
    The YAML C{health} mapping, as keyword arguments of L{HealthConfig}.
    """
    raw = _mapping(where, value, _HEALTH_KEYS)
    out: dict[str, Any] = {}
    for key, item in raw.items():
        name = f"{where}.{key}"
        if key == "path":
            out[key] = parse_health_path(name, item)
        elif key in ("interval", "timeout"):
            out[key] = positive_float(name, item)
        else:
            out[key] = positive_int(name, item)
    return out


_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_POOL_NAME = frozenset("-_.0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _token(name: str, value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or not set(value) <= _TOKEN:
        raise ConfigError(f"{name} must be {what} (letters, digits and -._~ etc.), not {value!r}")
    return value


def parse_balance(name: str, value: Any) -> str:
    """
    A balancing policy: roundrobin, leastconn, p2c or hash.
    """
    if value not in BALANCE_POLICIES:
        raise ConfigError(f"{name} must be one of {', '.join(BALANCE_POLICIES)}, not {value!r}")
    return str(value)


def parse_hash_key(name: str, value: Any) -> str:
    """
    What C{balance: hash} hashes: source, uri, header:NAME or cookie:NAME.
    """
    if value in ("source", "uri"):
        return str(value)
    if isinstance(value, str) and ":" in value:
        kind, _, key = value.partition(":")
        if kind in ("header", "cookie"):
            _token(name, key, f"{kind}:NAME with a valid {kind} name")
            return f"{kind}:{key}"
    raise ConfigError(f"{name} must be source, uri, header:NAME or cookie:NAME, not {value!r}")


def parse_sticky(name: str, value: Any) -> str:
    """
    C{sticky: {cookie: NAME}}, as the cookie name.
    """
    raw = _mapping(name, value, _STICKY_KEYS)
    if "cookie" not in raw:
        raise ConfigError(f"{name} needs a cookie name, like {{cookie: SERVERID}}")
    return _token(f"{name}.cookie", raw["cookie"], "a cookie name")


def _pool_name(name: str, value: Any) -> str:
    # Not all digits: /nodes/0 in the admin API is a node's position.
    if (
        not isinstance(value, str)
        or not value
        or not set(value) <= _POOL_NAME
        or value.isdigit()
    ):
        raise ConfigError(
            f"{name}: a pool name must be letters, digits, '-', '_' or '.' (not only"
            f" digits), not {value!r}"
        )
    if value == "none":
        # The pool label of answers that had no pool (rrlb.metrics.NO_NODE).
        raise ConfigError(f"{name}: 'none' is reserved (the metrics' label for no pool)")
    return value


def parse_pools(value: Any) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """
    The YAML C{pools} mapping: pool name -> (its own L{PoolConfig} fields,
    its own L{HealthConfig} fields), to be completed from the top level by
    L{resolve_pools}.
    """
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"pools must be a mapping of pool names to pools, not {value!r}")
    out = {}
    for pool_name, raw_pool in value.items():
        pool_name = _pool_name("pools", pool_name)
        where = f"pools.{pool_name}"
        raw = _mapping(where, raw_pool, _POOL_KEYS)
        if "nodes" not in raw:
            raise ConfigError(f"{where}.nodes: a pool needs nodes")
        fields: dict[str, Any] = {}
        health: dict[str, Any] = {}
        for key, item in raw.items():
            name = f"{where}.{key}"
            if key == "nodes":
                fields[key], fields["dns_nodes"] = parse_node_entries(item, name)
                if not fields[key] and not fields["dns_nodes"]:
                    raise ConfigError(f"{name}: a pool needs at least one node")
            elif key == "health":
                health = parse_health(item, f"{name}")
            elif key == "balance":
                fields[key] = parse_balance(name, item)
            elif key == "hash_key":
                fields[key] = parse_hash_key(name, item)
            elif key == "sticky":
                fields[key] = parse_sticky(name, item)
            elif key == "slow_start":
                fields[key] = non_negative_float(name, item)
            elif key in ("timeout", "connect_timeout"):
                fields[key] = positive_float(name, item)
            elif key == "node_host":
                fields[key] = _boolean(name, item)
            elif key == "max_idle_per_node":
                fields[key] = non_negative_int(name, item)
        if "hash_key" in fields and fields.get("balance") != "hash":
            raise ConfigError(f"{where}.hash_key is only used with balance: hash")
        out[pool_name] = (fields, health)
    return out


def parse_routes(value: Any) -> tuple[RouteConfig, ...]:
    """
    The YAML C{routes} list (their pools are checked by L{build_config}).
    """
    if not isinstance(value, list) or not value:
        raise ConfigError(
            f"routes must be a list of routes like {{host: ..., pool: ...}}, not {value!r}"
        )
    routes = []
    for i, item in enumerate(value):
        where = f"routes[{i}]"
        raw = _mapping(where, item, _ROUTE_KEYS)
        if "pool" not in raw:
            raise ConfigError(f"{where} needs a pool")
        kwargs: dict[str, Any] = {"pool": _pool_name(f"{where}.pool", raw["pool"])}
        if "host" in raw:
            kwargs["host"] = parse_route_host(f"{where}.host", raw["host"])
        if "path_prefix" in raw:
            prefix = _string(f"{where}.path_prefix", raw["path_prefix"])
            if (
                not prefix.startswith("/")
                or not prefix.isascii()
                or any(c in _BAD_URL_CHARS or not c.isprintable() or c in "?#" for c in prefix)
            ):
                raise ConfigError(
                    f"{where}.path_prefix must be a percent-encoded path starting with '/',"
                    f" not {prefix!r}"
                )
            kwargs["path_prefix"] = prefix
        if "methods" in raw:
            methods = raw["methods"]
            if isinstance(methods, str):
                methods = [methods]
            if not isinstance(methods, list) or not methods:
                raise ConfigError(f"{where}.methods must be a list of methods, not {methods!r}")
            kwargs["methods"] = tuple(
                _token(f"{where}.methods", m, "an HTTP method").upper() for m in methods
            )
        if "header" in raw:
            header = raw["header"]
            if not isinstance(header, dict) or not header:
                raise ConfigError(
                    f"{where}.header must be a mapping of header names to values, not {header!r}"
                )
            pairs = []
            for name, wanted in header.items():
                _token(f"{where}.header", name, "a header name")
                if isinstance(wanted, (int, float)) and not isinstance(wanted, bool):
                    wanted = str(wanted)
                if not isinstance(wanted, str) or any(c in wanted for c in "\r\n\0"):
                    raise ConfigError(f"{where}.header.{name} must be a string, not {wanted!r}")
                pairs.append((name, wanted))
            kwargs["header"] = tuple(pairs)
        if "strip_prefix" in raw:
            kwargs["strip_prefix"] = _boolean(f"{where}.strip_prefix", raw["strip_prefix"])
            if kwargs["strip_prefix"] and "path_prefix" not in kwargs:
                raise ConfigError(f"{where}.strip_prefix needs a path_prefix")
        routes.append(RouteConfig(**kwargs))
    return tuple(routes)


def parse_route_host(name: str, value: Any) -> str:
    """
    A route's host: a name (any case, no port) or C{*.} and a name.
    """
    host = _string(name, value).strip().lower().rstrip(".")
    bare = host[2:] if host.startswith("*.") else host
    if not bare or "*" in bare or ":" in bare.strip("[]") and not bare.startswith("["):
        raise ConfigError(f"{name} must be a host name, or *.name for one label, not {value!r}")
    if any(c in _BAD_URL_CHARS or c in "/?#@" or not c.isprintable() for c in bare):
        raise ConfigError(f"{name} must be a host name, or *.name for one label, not {value!r}")
    return host


def default_pool(config: Config, nodes: Optional[tuple[NodeSpec, ...]] = None) -> PoolConfig:
    """
    The pool of the top-level nodes (C{nodes:}, C{--nodes}), with the
    top-level settings.
    """
    return PoolConfig(
        name=DEFAULT_POOL,
        nodes=config.nodes if nodes is None else nodes,
        dns_nodes=config.dns_nodes,
        health=config.health,
        balance=config.balance,
        hash_key=config.hash_key,
        sticky=config.sticky,
        slow_start=config.slow_start,
        timeout=config.timeout,
        connect_timeout=config.connect_timeout,
        node_host=config.node_host,
        max_idle_per_node=config.max_idle_per_node,
    )


def has_default_pool(config: Config) -> bool:
    """
    Whether the top-level nodes make a pool: they do when there are any (or
    demo backends or DNS entries will give some), or when no named pool is
    configured.
    """
    return bool(config.nodes or config.dns_nodes or config.demo) or not config.pools


def all_pools(
    config: Config, default_nodes: Optional[tuple[NodeSpec, ...]] = None
) -> tuple[PoolConfig, ...]:
    """
    Every pool to run: the default one (if any) first, then the named ones.
    """
    if has_default_pool(config):
        return (default_pool(config, default_nodes),) + config.pools
    return config.pools


def resolve_pools(
    config: Config, raw: dict[str, tuple[dict[str, Any], dict[str, Any]]]
) -> tuple[PoolConfig, ...]:
    """
    Complete parsed pools with the top-level settings they do not set.
    """
    inherited = {
        "balance": "roundrobin",
        "hash_key": "source",
        "sticky": None,
        "slow_start": 0.0,
        "timeout": config.timeout,
        "connect_timeout": config.connect_timeout,
        "node_host": config.node_host,
        "max_idle_per_node": config.max_idle_per_node,
    }
    pools = []
    for name, (fields, health) in raw.items():
        pools.append(
            PoolConfig(
                name=name,
                health=dataclasses.replace(config.health, **health),
                **{**inherited, **fields},
            )
        )
    return tuple(pools)


def check_pools(config: Config) -> None:
    """
    Check how pools and routes fit together.

    @raise ConfigError: a route names an unknown pool, a pool is called
        C{default} beside top-level nodes, or requests would have nowhere
        to go.
    """
    names = [p.name for p in config.pools]
    has_default = has_default_pool(config)
    if has_default and DEFAULT_POOL in names:
        raise ConfigError(
            f"pools.{DEFAULT_POOL}: that name is the pool of the top-level nodes"
            " (nodes:, --nodes); give this pool another name"
        )
    known = ([DEFAULT_POOL] if has_default else []) + names
    for i, route in enumerate(config.routes):
        if route.pool not in known:
            raise ConfigError(
                f"routes[{i}].pool: no pool {route.pool!r} (pools: {', '.join(known) or 'none'})"
            )
    if not config.routes and not has_default and len(names) > 1:
        raise ConfigError(
            f"routes: {len(names)} pools ({', '.join(names)}) but no routes to send requests"
            " to them (add routes:, or a route with only a pool as the default)"
        )
    if not has_default and (
        config.balance != "roundrobin" or config.sticky is not None or config.slow_start
    ):
        raise ConfigError(
            "balance/sticky/slow_start at the top level apply to the top-level nodes"
            " (--nodes), and there are none: set them in each pool instead"
        )
    if config.hash_key != "source" and config.balance != "hash":
        raise ConfigError("hash_key/--hash-key is only used with balance: hash (--balance hash)")
    # One URL in two pools is two nodes (each pool checks its own), but
    # they share keep-alive connections, so they must connect alike.
    seen: dict[str, tuple[str, NodeSpec]] = {}
    for pool in all_pools(config):
        for i, node in enumerate(pool.nodes):
            first = seen.setdefault(node.key, (pool.name, node))
            other = first[1]
            if first[0] != pool.name and (
                other.tls != node.tls or other.send_proxy != node.send_proxy
            ):
                where = "nodes" if pool.name == DEFAULT_POOL else f"pools.{pool.name}.nodes"
                raise ConfigError(
                    f"{where}[{i}]: {node.url!r} is also in pool {first[0]!r} with other"
                    " tls or send_proxy settings; a node URL connects one way in every pool"
                )


def parse_listen(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"listen must be a list of endpoint descriptions, not {value!r}")
    return tuple(_string("listen", v) for v in value)


def parse_access_log_format(value: Any, name: str = "access_log_format") -> str:
    if value not in ACCESS_LOG_FORMATS:
        raise ConfigError(
            f"{name} must be one of {', '.join(ACCESS_LOG_FORMATS)}, not {value!r}"
        )
    return str(value)


def load_yaml(path: str) -> Mapping[str, Any]:
    """
    Read a YAML configuration file into a mapping, checking its top-level keys.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"config: cannot read {path!r}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config: invalid YAML in {path!r}{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config: {path!r} is not UTF-8 text") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path!r} must hold a mapping of settings")
    unknown = sorted(str(k) for k in data if k not in _TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"config: unknown setting {unknown[0]!r} in {path!r}"
            f" (known: {', '.join(sorted(_TOP_KEYS))})"
        )
    return data


def parse_listen_tls(value: Any) -> ListenTLS:
    """
    The top-level YAML C{tls} mapping: C{{cert, key, ca_file, certificates:
    [{cert, key}, ...]}}.
    """
    raw = _mapping("tls", value, _LISTEN_TLS_KEYS)
    kwargs: dict[str, Any] = {}
    for key, item in raw.items():
        if key == "certificates":
            if not isinstance(item, list):
                raise ConfigError(f"tls.certificates must be a list of {{cert, key}}, not {item!r}")
            pairs = []
            for i, entry in enumerate(item):
                where = f"tls.certificates[{i}]"
                pair = _mapping(where, entry, _SNI_CERT_KEYS)
                if "cert" not in pair:
                    raise ConfigError(f"{where} needs a cert, got {entry!r}")
                cert = _string(f"{where}.cert", pair["cert"])
                key_file = _string(f"{where}.key", pair["key"]) if "key" in pair else None
                pairs.append((cert, key_file))
            kwargs[key] = tuple(pairs)
        else:
            kwargs[key] = _string(f"tls.{key}", item)
    return ListenTLS(**kwargs)


def with_tls_defaults(config: Config) -> Config:
    """
    Check the top-level TLS settings and give https nodes without a
    C{ca_file} of their own the top-level one (C{--ca-file}, C{tls.ca_file}).
    """
    tls = config.tls
    if tls.key and not tls.cert:
        raise ConfigError(f"--tls-key/tls.key {tls.key!r} needs --tls-cert/tls.cert as well")
    if tls.certificates and not tls.cert:
        raise ConfigError("tls.certificates needs tls.cert (the default certificate) as well")
    if not tls.ca_file:
        return config

    def with_ca(n: NodeSpec) -> NodeSpec:
        if n.tls.ca_file is not None:
            return n
        return dataclasses.replace(n, tls=dataclasses.replace(n.tls, ca_file=tls.ca_file))

    def dns_with_ca(entries: tuple[DnsNodes, ...]) -> tuple[DnsNodes, ...]:
        return tuple(dataclasses.replace(d, template=with_ca(d.template)) for d in entries)

    nodes = tuple(with_ca(n) for n in config.nodes)
    pools = tuple(
        dataclasses.replace(
            p, nodes=tuple(with_ca(n) for n in p.nodes), dns_nodes=dns_with_ca(p.dns_nodes)
        )
        for p in config.pools
    )
    return dataclasses.replace(
        config, nodes=nodes, dns_nodes=dns_with_ca(config.dns_nodes), pools=pools
    )


def _from_yaml(data: Mapping[str, Any]) -> dict[str, Any]:
    """
    Turn the checked YAML mapping into keyword arguments of L{Config}.
    """
    out: dict[str, Any] = {}
    if "tls" in data:
        out["tls"] = parse_listen_tls(data["tls"])
    for key, value in data.items():
        if key == "listen":
            out[key] = parse_listen(value)
        elif key == "nodes":
            out[key], out["dns_nodes"] = parse_node_entries(value, "nodes")
        elif key == "dns_refresh":
            out[key] = positive_float(key, value)
        elif key == "resolvers":
            out[key] = parse_resolvers(key, value)
        elif key == "health":
            out[key] = parse_health(value)
        elif key in ("timeout", "connect_timeout", "drain_timeout", "tunnel_timeout"):
            out[key] = positive_float(key, value)
        elif key in ("node_host", "http2"):
            out[key] = _boolean(key, value)
        elif key == "max_idle_per_node":
            out[key] = non_negative_int(key, value)
        elif key in ("access_log", "admin", "admin_token_file"):
            out[key] = _string(key, value)
        elif key == "admin_hosts":
            out[key] = admin_host_names(key, value)
        elif key == "access_log_format":
            out[key] = parse_access_log_format(value)
        elif key in ("max_header_size", "max_headers", "max_connections"):
            out[key] = positive_int(key, value)
        elif key == "max_body_size":
            out[key] = byte_size(key, value)
        elif key in ("client_header_timeout", "client_body_timeout", "keepalive_timeout"):
            out[key] = positive_float(key, value)
        elif key in ("trusted_proxies", "proxy_protocol_from"):
            out[key] = trusted_networks(key, value)
        elif key in ("max_conns_per_node", "retries"):
            out[key] = non_negative_int(key, value)
        elif key == "queue_timeout":
            out[key] = non_negative_float(key, value)
        elif key == "retry_budget":
            out[key] = percent(key, value)
        elif key == "workers":
            out[key] = parse_workers(key, value)
        elif key == "balance":
            out[key] = parse_balance(key, value)
        elif key == "hash_key":
            out[key] = parse_hash_key(key, value)
        elif key == "sticky":
            out[key] = parse_sticky(key, value)
        elif key == "slow_start":
            out[key] = non_negative_float(key, value)
        elif key == "pools":
            out[key] = parse_pools(value)
        elif key == "routes":
            out[key] = parse_routes(value)
    return out


def build_config(
    path: Optional[str] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    health_overrides: Optional[Mapping[str, Any]] = None,
    require_nodes: bool = True,
) -> Config:
    """
    Build a L{Config} from an optional YAML file and already-coerced
    command-line values, which win over the file.

    @param overrides: L{Config} field values given on the command line.
    @param health_overrides: L{HealthConfig} field values from the command line.
    @param require_nodes: whether no nodes at all is an error (it is not when
        demo backends will supply them).
    """
    values: dict[str, Any] = {}
    health: dict[str, Any] = {}
    pools: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    if path is not None:
        values = _from_yaml(load_yaml(path))
        health = values.pop("health", {})
        pools = values.pop("pools", {})
    overrides = dict(overrides or {})
    if "nodes" in overrides:
        # --nodes replaces the whole YAML nodes list, DNS entries too.
        values.pop("dns_nodes", None)
    tls_overrides = overrides.pop("tls", None)
    values.update(overrides)
    health.update(health_overrides or {})
    if isinstance(tls_overrides, ListenTLS):
        values["tls"] = tls_overrides
    elif tls_overrides:
        # --tls-cert, --tls-key and --ca-file each win over their YAML key.
        values["tls"] = dataclasses.replace(values.get("tls", ListenTLS()), **tls_overrides)
    config = Config(health=HealthConfig(**health), **values)
    if pools:
        config = dataclasses.replace(config, pools=resolve_pools(config, pools))
    config = with_tls_defaults(config)
    if require_nodes and not config.nodes and not config.dns_nodes and not config.pools:
        raise ConfigError(
            "nodes: no nodes given (use --nodes URL[,URL...], or nodes: or pools: in --config)"
        )
    check_pools(config)
    return config
