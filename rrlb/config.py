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
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union
from urllib.parse import urlsplit

import yaml

DEFAULT_LISTEN = ("tcp:8080",)
MAX_WEIGHT = 256


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
    max_connections: int = 10000
    trusted_proxies: tuple[Network, ...] = ()
    # Overload: per-node limits, the queue, retries and their budget.
    max_conns_per_node: int = 0
    queue_timeout: float = 5.0
    retries: int = 2
    retry_budget: float = 20.0
    # Nodes from DNS (rrlb.discovery): the entries, the longest time between
    # two lookups of a name, and the name servers (none: /etc/resolv.conf).
    dns_nodes: tuple[DnsNodes, ...] = ()
    dns_refresh: float = 30.0
    resolvers: tuple[tuple[str, int], ...] = ()
    # Worker processes serving traffic (rrlb.workers); 1 is one process.
    workers: int = 1


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
        "max_conns_per_node",
        "queue_timeout",
        "retries",
        "retry_budget",
        "dns_refresh",
        "resolvers",
        "workers",
    }
)
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


def parse_health(value: Any) -> dict[str, Any]:
    """
    The YAML C{health} mapping, as keyword arguments of L{HealthConfig}.
    """
    raw = _mapping("health", value, _HEALTH_KEYS)
    out: dict[str, Any] = {}
    for key, item in raw.items():
        name = f"health.{key}"
        if key == "path":
            out[key] = parse_health_path(name, item)
        elif key in ("interval", "timeout"):
            out[key] = positive_float(name, item)
        else:
            out[key] = positive_int(name, item)
    return out


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

    nodes = tuple(with_ca(n) for n in config.nodes)
    dns_nodes = tuple(
        dataclasses.replace(d, template=with_ca(d.template)) for d in config.dns_nodes
    )
    return dataclasses.replace(config, nodes=nodes, dns_nodes=dns_nodes)


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
        elif key in ("timeout", "connect_timeout", "drain_timeout"):
            out[key] = positive_float(key, value)
        elif key == "node_host":
            out[key] = _boolean(key, value)
        elif key == "max_idle_per_node":
            out[key] = non_negative_int(key, value)
        elif key in ("access_log", "admin"):
            out[key] = _string(key, value)
        elif key == "access_log_format":
            out[key] = parse_access_log_format(value)
        elif key in ("max_header_size", "max_headers", "max_connections"):
            out[key] = positive_int(key, value)
        elif key == "max_body_size":
            out[key] = byte_size(key, value)
        elif key in ("client_header_timeout", "client_body_timeout", "keepalive_timeout"):
            out[key] = positive_float(key, value)
        elif key == "trusted_proxies":
            out[key] = trusted_networks(key, value)
        elif key in ("max_conns_per_node", "retries"):
            out[key] = non_negative_int(key, value)
        elif key == "queue_timeout":
            out[key] = non_negative_float(key, value)
        elif key == "retry_budget":
            out[key] = percent(key, value)
        elif key == "workers":
            out[key] = parse_workers(key, value)
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
    if path is not None:
        values = _from_yaml(load_yaml(path))
        health = values.pop("health", {})
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
    config = with_tls_defaults(Config(health=HealthConfig(**health), **values))
    if require_nodes and not config.nodes and not config.dns_nodes:
        raise ConfigError("nodes: no nodes given (use --nodes URL[,URL...] or nodes: in --config)")
    return config
