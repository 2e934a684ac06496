# -*- test-case-name: tests.test_config -*-
"""
rrlb's configuration: the YAML file and the command-line values read into
one frozen L{Config} by the table of L{rrlb.settings}, the pools completed
from the top level, and the nodes, pools and routes, which have structures
of their own. Every mistake raises L{ConfigError} with a message that names
the setting and the bad value. No Twisted here: this module only parses.
"""

from __future__ import annotations

import re
from dataclasses import fields, replace
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

import yaml

from rrlb.actions import Forward
from rrlb.filters import parse_filters
from rrlb.routeconfig import BAD_URL_CHARS, parse_routes, pool_name
from rrlb.settings import (
    DEFAULT_POOL,
    POOL,
    AcmeConfig,
    Config,
    DnsNodes,
    NodeSpec,
    NodeTLS,
    PoolConfig,
    PoolSettings,
    Setting,
    rows,
)
from rrlb.values import (
    ConfigError,
    Parser,
    boolean,
    mapping,
    non_negative_int,
    positive_int,
    string,
)

MAX_WEIGHT = 256
_NODE_KEYS = frozenset({"url", "weight", "tls", "max_connections", "send_proxy"})
# Keys of a DNS node entry besides the node keys (url excepted) it shares.
_DNS_NODE_KEYS = frozenset({"dns", "srv", "port", "scheme"})
SEND_PROXY_VERSIONS = ("v1", "v2")
_NODE_TLS_KEYS = frozenset({"verify", "ca_file", "server_name", "cert", "key"})


def parse_node_tls(name: str, value: Any) -> NodeTLS:
    """
    A node's C{tls} mapping.
    """
    raw = mapping(name, value, _NODE_TLS_KEYS)
    kwargs: dict[str, Any] = {
        key: (boolean if key == "verify" else string)(f"{name}.{key}", item)
        for key, item in raw.items()
    }
    if ("cert" in kwargs) != ("key" in kwargs):
        raise ConfigError(f"{name} needs both cert and key for a client certificate")
    return NodeTLS(**kwargs)


def parse_node(value: Any, where: str = "nodes") -> NodeSpec:
    """
    One node: a URL, or a mapping C{{url: URL, weight: N, tls: {...}}}.
    """
    own: dict[str, Any] = {}
    if isinstance(value, dict):
        raw = mapping(where, value, _NODE_KEYS)
        if "url" not in raw:
            raise ConfigError(f"{where} needs a url, got {value!r}")
        if "weight" in raw:
            own["weight"] = positive_int(f"{where}.weight", raw["weight"], MAX_WEIGHT)
        if "max_connections" in raw:
            own["max_connections"] = non_negative_int(
                f"{where}.max_connections", raw["max_connections"]
            )
        if "tls" in raw:
            own["tls"] = parse_node_tls(f"{where}.tls", raw["tls"])
        if raw.get("send_proxy", "v1") not in SEND_PROXY_VERSIONS:
            raise ConfigError(f"{where}.send_proxy must be v1 or v2, not {raw['send_proxy']!r}")
        own["send_proxy"] = raw.get("send_proxy")
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
    if any(c in BAD_URL_CHARS or not c.isprintable() for c in parts.hostname):
        raise ConfigError(f"{where}: node URL {url!r} has a bad host {parts.hostname!r}")
    if any(c in BAD_URL_CHARS or not c.isprintable() for c in parts.path):
        raise ConfigError(f"{where}: node URL {url!r} has a path that is not percent-encoded")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{where}: node URL {url!r} may have only a scheme, host, port and path")
    if port is None:
        port = 443 if scheme == "https" else 80
    if port == 0:
        raise ConfigError(f"{where}: node URL {url!r} has port 0")
    if not parts.path.isascii():
        raise ConfigError(f"{where}: node URL {url!r} has a path that is not percent-encoded")
    base_path = parts.path.rstrip("/").encode("ascii")
    return NodeSpec(url, scheme, parts.hostname, port, base_path, **own)


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


def parse_dns_node(value: Mapping[str, Any], where: str = "nodes") -> DnsNodes:
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
    template = parse_node(node, where)
    weight = template.weight if "weight" in value else None
    return DnsNodes(name=name, srv=srv, port=port, weight=weight, template=template)


def parse_node_entries(
    value: Any, where: str = "nodes"
) -> tuple[tuple[NodeSpec, ...], tuple[DnsNodes, ...]]:
    """
    The YAML C{nodes} list: nodes (see L{parse_nodes}) and DNS entries.
    """
    if not isinstance(value, list):
        return parse_nodes(value, where), ()
    plain = []
    dns: list[DnsNodes] = []
    for i, entry in enumerate(value):
        if isinstance(entry, dict) and ("dns" in entry or "srv" in entry):
            dns.append(parse_dns_node(entry, f"{where}[{i}]"))
        else:
            plain.append((i, entry))
    nodes = tuple(parse_node(v, f"{where}[{i}]") for i, v in plain)
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


def parse_nodes(value: Any, where: str = "nodes") -> tuple[NodeSpec, ...]:
    """
    A list of nodes (or a comma-separated string of URLs); no two the same.
    """
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of node URLs, not {value!r}")
    nodes = tuple(parse_node(v, f"{where}[{i}]") for i, v in enumerate(value))
    _check_unique(nodes, where)
    return nodes


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
        named = [(f"routes[{i}].pool", route.pool)] if route.pool else []
        if isinstance(route.action, Forward):
            named = [
                (f"routes[{i}].forward[{j}].pool", p) for j, (p, _) in enumerate(route.action.pools)
            ]
        for where, wanted in named:
            if wanted not in known:
                raise ConfigError(
                    f"{where}: no pool {wanted!r} (pools: {', '.join(known) or 'none'})"
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
    return check_document(data, repr(path))


def check_document(data: Any, source: str) -> Mapping[str, Any]:
    """
    C{data}, read from a YAML or JSON document (named C{source} in
    messages), as a mapping of known top-level settings.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config: {source} must hold a mapping of settings")
    known = sorted(row.name for row in rows(Config) if row.yaml)
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ConfigError(
            f"config: unknown setting {unknown[0]!r} in {source} (known: {', '.join(known)})"
        )
    return data


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
    check_acme(tls.acme)
    if not tls.ca_file:
        return config

    def with_ca(n: NodeSpec) -> NodeSpec:
        if n.tls.ca_file is not None:
            return n
        return replace(n, tls=replace(n.tls, ca_file=tls.ca_file))

    def dns_with_ca(entries: tuple[DnsNodes, ...]) -> tuple[DnsNodes, ...]:
        return tuple(replace(d, template=with_ca(d.template)) for d in entries)

    nodes = tuple(with_ca(n) for n in config.nodes)
    pools = tuple(
        replace(p, nodes=tuple(with_ca(n) for n in p.nodes), dns_nodes=dns_with_ca(p.dns_nodes))
        for p in config.pools
    )
    return replace(config, nodes=nodes, dns_nodes=dns_with_ca(config.dns_nodes), pools=pools)


def check_acme(acme: AcmeConfig) -> None:
    """
    C{tls.acme} needs a directory, domains and storage together.

    @raise ConfigError: naming the missing key.
    """
    if not acme.enabled:
        if acme != AcmeConfig():
            raise ConfigError("tls.acme.directory: the ACME server's directory URL is needed")
        return
    if not acme.domains:
        raise ConfigError("tls.acme.domains: the names of the certificate are needed")
    if not acme.storage:
        raise ConfigError("tls.acme.storage: a directory for keys and certificates is needed")
    if any(d.startswith("*.") for d in acme.domains):
        raise ConfigError("tls.acme.domains: wildcard names need dns-01, which rrlb does not do")


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
    return replace(config, admin_token=read_admin_token(config.admin_token_file, name))


def _nodes_flag(name: str, value: str) -> tuple[NodeSpec, ...]:
    urls = [u for u in value.split(",") if u.strip()]
    if not urls:
        raise ConfigError(f"{name}: no node URL given")
    nodes = tuple(parse_node(u, name) for u in urls)
    _check_unique(nodes, name)
    return nodes


def parse_pools(name: str, value: Any) -> dict[str, dict[str, Any]]:
    """
    The YAML C{pools} mapping: each pool's name and the settings it sets,
    completed from the top level by L{resolve_pools}.
    """
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a mapping of pool names to pools, not {value!r}")
    pools = {}
    for key, raw in value.items():
        where = f"{name}.{pool_name(name, key)}"
        own = read(PoolSettings, raw, where)
        if "nodes" not in own:
            raise ConfigError(f"{where}.nodes: a pool needs nodes")
        if not own["nodes"] and not own["dns_nodes"]:
            raise ConfigError(f"{where}.nodes: a pool needs at least one node")
        if "hash_key" in own and own.get("balance") != "hash":
            raise ConfigError(f"{where}.hash_key is only used with balance: hash")
        pools[key] = own
    return pools


# The parsers of the settings whose values have structures of their own
# (parse is None in the table): --nodes here, and YAML's nodes (which may
# name DNS records too) in read.
_STRUCTURES: dict[str, Parser] = {
    "nodes": _nodes_flag,
    "pools": parse_pools,
    "routes": lambda name, value: parse_routes(value),
    "filters": parse_filters,
}


def parser(row: Setting) -> Parser:
    """
    The parser of C{row}'s values (given on the command line, or in YAML).
    """
    return row.parse or _STRUCTURES[row.name]


def read(table: type, value: Any, where: str = "") -> dict[str, Any]:
    """
    The settings of C{table} (a class of L{rrlb.settings}) that the YAML
    mapping C{value} sets, parsed; a section as a mapping of its own.

    @param where: the mapping's place in the file, which names its settings
        in messages (C{pools.api}: C{pools.api.timeout}).
    """
    known = {row.name: row for row in rows(table) if row.yaml}
    out: dict[str, Any] = {}
    for key, item in mapping(where, value, frozenset(known)).items():
        row, name = known[key], f"{where}.{key}" if where else key
        if key == "nodes":
            out["nodes"], out["dns_nodes"] = parse_node_entries(item, name)
        elif item is None and row.default is None or item == [] and row.default == ():
            out[key] = row.default  # null, []: unset, as --print-config shows it
        elif row.section is not None:
            out[key] = read(row.section, item, name)
        else:
            out[key] = parser(row)(name, item)
    return out


def default_pool(config: Config, nodes: Optional[tuple[NodeSpec, ...]] = None) -> PoolConfig:
    """
    The pool of the top-level nodes (C{nodes:}, C{--nodes}), with the
    top-level settings.
    """
    own = {f.name: getattr(config, f.name) for f in fields(PoolSettings)}
    return PoolConfig(**{**own, "nodes": config.nodes if nodes is None else nodes})


def resolve_pools(config: Config, raw: Mapping[str, Mapping[str, Any]]) -> tuple[PoolConfig, ...]:
    """
    Complete the pools L{parse_pools} read with the top-level settings they
    inherit (scope L{POOL}) and do not set.
    """
    inherited = {r.name: getattr(config, r.name) for r in rows(PoolSettings) if r.scope == POOL}
    return tuple(
        PoolConfig(
            name=name,
            **{**inherited, **own, "health": replace(config.health, **own.get("health", {}))},
        )
        for name, own in raw.items()
    )


def sections(table: type, values: dict[str, Any]) -> dict[str, Any]:
    """
    C{values} with each section's mapping made its class, sections inside
    sections (C{tls: acme:}) too.
    """
    out = dict(values)
    for row in rows(table):
        if row.section is not None and isinstance(out.get(row.name), dict):
            out[row.name] = row.section(**sections(row.section, out[row.name]))
    return out


def build_config(
    path: Optional[str] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    require_nodes: bool = True,
    document: Optional[Mapping[str, Any]] = None,
) -> Config:
    """
    Build a L{Config} from an optional YAML file (or the C{document} read
    from one, see L{check_document}) and already-parsed command-line
    values, which win over the file.

    @param overrides: L{Config} field values; a section's (C{health},
        C{tls}) as a mapping of the settings given.
    @param require_nodes: whether no nodes at all is an error (it is not when
        demo backends will supply them).
    """
    if document is None and path is not None:
        document = load_yaml(path)
    values = read(Config, document) if document is not None else {}
    if overrides and "nodes" in overrides:
        # --nodes replaces the whole YAML nodes list, DNS entries too.
        values.pop("dns_nodes", None)
    for key, value in (overrides or {}).items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    values = sections(Config, values)
    pools = values.pop("pools", {})
    config = Config(**values)
    if pools:
        config = replace(config, pools=resolve_pools(config, pools))
    config = with_tls_defaults(config)
    if require_nodes and not config.nodes and not config.dns_nodes and not config.pools:
        raise ConfigError(
            "nodes: no nodes given (use --nodes URL[,URL...], or nodes: or pools: in --config)"
        )
    check_pools(config)
    return config
