# -*- test-case-name: tests.test_check,tests.test_runtime -*-
"""
A configuration written out again in the layout of a config file: what
C{--print-config} prints as YAML and C{GET /config} answers as JSON. Every
YAML setting of L{rrlb.settings} appears with its value, the defaults
filled in; a pool with every setting it runs with, inherited ones too.
Secrets are left out: the admin token is never a setting, only the path of
its file is (the same holds for key files). Loading the document again
(L{rrlb.config.build_config}) gives the same configuration. Pure: no
Twisted.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any, Optional

from rrlb.config import all_pools
from rrlb.settings import (
    Config,
    DnsNodes,
    ListenTLS,
    NodeSpec,
    NodeTLS,
    PoolConfig,
    PoolSettings,
    rows,
)


def document(config: Config) -> dict[str, Any]:
    """
    C{config} as a config file's mapping of plain values (strings, numbers,
    booleans, null, lists and mappings), in the table's order.
    """
    ca_file = config.tls.ca_file
    out: dict[str, Any] = {}
    for row in rows(Config):
        if not row.yaml:
            continue
        if row.name == "nodes":
            out["nodes"] = _nodes(config.nodes, config.dns_nodes, ca_file)
        elif row.name == "pools":
            out["pools"] = {pool.name: _pool(pool, ca_file) for pool in config.pools}
        elif row.name == "tls":
            out["tls"] = _listen_tls(config.tls)
        elif row.name == "resolvers":
            out["resolvers"] = [_resolver(host, port) for host, port in config.resolvers]
        elif row.name == "routes":
            out["routes"] = [_route(route) for route in config.routes]
        elif row.name == "filters":
            out["filters"] = _filters(config.filters)
        else:
            out[row.name] = _setting(row.name, getattr(config, row.name))
    return out


def _setting(name: str, value: Any) -> Any:
    if name == "sticky":
        return None if value is None else {"cookie": value}
    section: type = type(value)
    if dataclasses.is_dataclass(value) and rows(section):
        # A section (health): every one of its settings.
        return {row.name: plain(getattr(value, row.name)) for row in rows(section) if row.yaml}
    return plain(value)


def _route(route: Any) -> Any:
    # As the file gave it: a route's actions and filters are read into
    # values with no way back to their YAML.
    if route.entry is not None:
        return plain(route.entry)
    out = plain(route)
    if "header" in out:
        out["header"] = dict(route.header)
    return {"pool": out.pop("pool"), **out} if "pool" in out else out


def _filters(filters: Any) -> list[Any]:
    return [plain(f.entry) if f.entry is not None else plain(f) for f in filters]


def summary(config: Config) -> str:
    """
    What C{--check} and C{PUT /config} say of a configuration: its pools
    (the named ones, and C{default} for top-level nodes), its nodes (each
    listed one, DNS entry and demo backend) and its routes.
    """
    pools = all_pools(config)
    nodes = sum(len(p.nodes) + len(p.dns_nodes) for p in pools) + config.demo
    return f"{len(pools)} pools, {nodes} nodes, {len(config.routes)} routes"


def plain(value: Any) -> Any:
    """
    A value of a setting as YAML and JSON write it: tuples as lists, a
    network as its CIDR text, a frozen value as the mapping of its fields
    that differ from their defaults.
    """
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.repr and getattr(value, f.name) != _default(f)
        }
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _resolver(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen_tls(tls: ListenTLS) -> dict[str, Any]:
    out = {row.name: plain(getattr(tls, row.name)) for row in rows(ListenTLS) if row.yaml}
    out["certificates"] = [
        {"cert": cert, **({"key": key} if key is not None else {})}
        for cert, key in tls.certificates
    ]
    out["acme"] = _setting("acme", tls.acme)
    return out


def _node_tls(tls: NodeTLS, ca_file: Optional[str]) -> dict[str, Any]:
    # The top-level ca_file is every node's default: a node shows its own.
    if tls.ca_file == ca_file:
        tls = dataclasses.replace(tls, ca_file=None)
    return {k: v for k, v in plain(tls).items() if v is not None}


def node_entry(node: NodeSpec, ca_file: Optional[str] = None) -> dict[str, Any]:
    """
    One node as a C{nodes:} entry: its URL, weight and whatever else it sets.
    """
    out: dict[str, Any] = {"url": node.url, "weight": node.weight}
    if node.max_connections is not None:
        out["max_connections"] = node.max_connections
    tls = _node_tls(node.tls, ca_file)
    if tls:
        out["tls"] = tls
    if node.send_proxy is not None:
        out["send_proxy"] = node.send_proxy
    return out


def _dns_entry(entry: DnsNodes, ca_file: Optional[str]) -> dict[str, Any]:
    t = entry.template
    out: dict[str, Any] = {"srv" if entry.srv else "dns": entry.name}
    if not entry.srv:
        out["port"] = entry.port
    out["scheme"] = t.scheme
    if entry.weight is not None:
        out["weight"] = entry.weight
    rest = node_entry(t, ca_file)
    del rest["url"], rest["weight"]
    return {**out, **rest}


def _nodes(
    nodes: tuple[NodeSpec, ...], dns: tuple[DnsNodes, ...], ca_file: Optional[str]
) -> list[dict[str, Any]]:
    return [node_entry(n, ca_file) for n in nodes] + [_dns_entry(d, ca_file) for d in dns]


def _pool(pool: PoolConfig, ca_file: Optional[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for row in rows(PoolSettings):
        if row.name == "nodes":
            out["nodes"] = _nodes(pool.nodes, pool.dns_nodes, ca_file)
        elif row.name == "hash_key" and pool.balance != "hash":
            continue  # a pool may set it only with balance: hash
        else:
            out[row.name] = _setting(row.name, getattr(pool, row.name))
    return out
