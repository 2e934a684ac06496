# -*- test-case-name: tests.test_runtime -*-
"""
The admin endpoint's runtime API: the running configuration read and
replaced, and nodes added, removed and changed, without editing a file
(HAProxy's runtime API, Caddy's admin API).

  - C{GET /config}: the running configuration as JSON, in the layout of a
    config file (L{rrlb.configdump}).
  - C{PUT /config}: a YAML or JSON body applied exactly as a C{SIGHUP}
    would apply a C{--config} file holding it.
  - C{POST /nodes/<pool>} C{{url, weight, max_connections}}: a new node.
  - C{DELETE /nodes/<pool>/<id>}: the node drained and removed; its
    in-flight requests finish.
  - C{PATCH /nodes/<pool>/<id>} C{{weight}} or C{{max_connections}}.

Each change is a new L{Config}, checked like a file's, then applied by the
control side (L{Control.change}) the way a reload applies one: in one step,
in every worker process, counted and logged. A bad body or value is a
L{ApiError} (400) and changes nothing. A change lasts until the next reload
from the file.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional, Protocol

import yaml
from twisted.internet import defer

from rrlb.config import (
    DEFAULT_POOL,
    MAX_WEIGHT,
    Config,
    ConfigError,
    NodeSpec,
    check_document,
    check_pools,
    has_default_pool,
    parse_node,
    with_tls_defaults,
)
from rrlb.configdump import document, summary
from rrlb.pool import Node, Pools
from rrlb.values import non_negative_int, positive_int

# The longest error message an answer carries (a message may quote a value
# from the body).
MAX_ERROR = 300
YAML_TYPES = (b"application/yaml", b"application/x-yaml", b"text/yaml", b"text/x-yaml")
JSON_TYPE = b"application/json"
# The deepest nesting of YAML flow collections a body may have.
MAX_DEPTH = 32
_NODE_CHANGES = frozenset({"weight", "max_connections"})


class ApiError(Exception):
    """
    An admin request that gets a JSON error: its status and message (and,
    for 405, the methods allowed).
    """

    def __init__(self, code: int, message: str, allow: Optional[bytes] = None) -> None:
        if len(message) > MAX_ERROR:
            message = message[: MAX_ERROR - 3] + "..."
        super().__init__(message)
        self.code = code
        self.message = message
        self.allow = allow


class Control(Protocol):
    """
    What the runtime API asks of the control side
    (L{rrlb.service.ControlService}).
    """

    config: Config

    def load(self, document: Mapping[str, Any]) -> Config:
        """
        The configuration a reload would run from a file holding C{document}.

        @raise ConfigError: it is not valid.
        """

    def change(self, config: Config, peer: str, what: str, before: str, after: str) -> Any:
        """
        Apply C{config}, counted and logged as the API's change.

        @return: a Deferred that fires once every process runs it.
        @raise ConfigError: it cannot be applied; nothing changed.
        """


def peer_of(request: Any) -> str:
    """
    Who sent C{request}, for the log: C{host:port}, or the kind of socket.
    """
    address = request.getClientAddress()
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None:
        return getattr(address, "name", None) or "a unix socket"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- bodies ------------------------------------------------------------------------


def _text(request: Any) -> str:
    request.content.seek(0)
    try:
        return str(request.content.read().decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not UTF-8 text") from None


def read_json(request: Any) -> Any:
    """
    The JSON value of C{request}'s body.

    @raise ApiError: 400, it is not JSON.
    """
    try:
        return json.loads(_text(request))
    except RecursionError:
        raise ApiError(400, "the JSON body is nested too deeply") from None
    except ValueError as e:
        raise ApiError(400, f"the body is not JSON: {e}") from None


def read_yaml(text: str) -> Any:
    """
    A YAML document without anchors and aliases (whose expansion a small
    body could make huge).

    @raise ApiError: 400, it is not such YAML.
    """
    if _flow_depth(text) > MAX_DEPTH:
        raise ApiError(400, "the YAML body is nested too deeply")
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ApiError(400, "YAML anchors and aliases are not taken through the API")
        return yaml.safe_load(text)
    except RecursionError:
        raise ApiError(400, "the YAML body is nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ApiError(400, f"invalid YAML{where}: {problem}") from None


def _flow_depth(text: str) -> int:
    """
    How deeply C{[...]} and C{{...}} nest in C{text} (outside quotes, near
    enough): PyYAML's scanner takes time quadratic in that depth.
    """
    depth = deepest = 0
    quote = ""
    for c in text:
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def read_document(request: Any) -> Any:
    """
    The body of C{PUT /config}: YAML or JSON, as its C{Content-Type} says.

    @raise ApiError: 415 for another type, 400 for a body that does not parse.
    """
    kind = (request.getHeader(b"Content-Type") or b"").split(b";")[0].strip().lower()
    if kind == JSON_TYPE:
        return read_json(request)
    if kind in YAML_TYPES:
        return read_yaml(_text(request))
    raise ApiError(415, "send the configuration as application/yaml or application/json")


def _object(value: Any, shape: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ApiError(400, f"the body must be a JSON object like {shape}")
    for key in _NODE_CHANGES:
        number = value.get(key)
        if number is not None and (not isinstance(number, int) or isinstance(number, bool)):
            raise ApiError(400, f"{key} must be a whole number, not {number!r}")
    return value


# -- the configured nodes of a pool ---------------------------------------------------


def configured(config: Config, pool: str) -> tuple[NodeSpec, ...]:
    """
    The nodes C{config} lists for C{pool} (not those found in DNS, nor
    demo backends).
    """
    if pool == DEFAULT_POOL and has_default_pool(config):
        return config.nodes
    for pc in config.pools:
        if pc.name == pool:
            return pc.nodes
    raise ApiError(404, f"no pool {pool!r} in the configuration")


def with_nodes(config: Config, pool: str, nodes: tuple[NodeSpec, ...]) -> Config:
    """
    C{config} with C{pool}'s listed nodes C{nodes}, checked as a file's.

    @raise ApiError: 400, the result is not a valid configuration.
    """
    if pool == DEFAULT_POOL and has_default_pool(config):
        config = dataclasses.replace(config, nodes=nodes)
    else:
        config = dataclasses.replace(
            config,
            pools=tuple(
                dataclasses.replace(pc, nodes=nodes) if pc.name == pool else pc
                for pc in config.pools
            ),
        )
    try:
        config = with_tls_defaults(config)
        check_pools(config)
    except ConfigError as e:
        raise ApiError(400, str(e)) from None
    return config


def _limits(spec: NodeSpec) -> str:
    limit = "default" if spec.max_connections is None else spec.max_connections
    return f"weight {spec.weight}, max_connections {limit}"


class RuntimeAPI:
    """
    The runtime API's changes, on a control side and the pools it runs.
    Each method answers C{(status, JSON value)}, or a Deferred of that once
    every process runs the change.
    """

    def __init__(self, control: Control, pools: Pools, node_status: Any) -> None:
        self.control = control
        self.pools = pools
        self.node_status = node_status

    def get_config(self) -> dict[str, Any]:
        return document(self.control.config)

    def _apply(self, config: Config, peer: str, what: str, before: str, after: str) -> Any:
        try:
            applied = self.control.change(config, peer, what, before, after)
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        return applied if isinstance(applied, defer.Deferred) else defer.succeed(applied)

    def put_config(self, request: Any, peer: str) -> Any:
        """
        C{PUT /config}: the body applied as a reload from a file holding it.
        """
        raw = read_document(request)
        try:
            config = self.control.load(check_document(raw, "the request body"))
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        except RecursionError:
            raise ApiError(400, "the configuration is nested too deeply") from None
        running = self.control.config
        before, after = summary(running), summary(config)
        old, new = document(running), document(config)
        changed = ", ".join(key for key, value in new.items() if old.get(key) != value)
        what = f"the configuration (PUT /config; settings changed: {changed or 'none'})"
        d = self._apply(config, peer, what, before, after)
        return d.addCallback(lambda _: (200, {"applied": True, "summary": after}))

    def add_node(self, request: Any, pool_name: str, peer: str) -> Any:
        """
        C{POST /nodes/<pool>}: a new node, C{{url, weight, max_connections}}.
        """
        pool = self.pools.get(pool_name)
        if pool is None:
            raise ApiError(404, f"no pool {pool_name!r} (pools: {', '.join(self.pools.by_name)})")
        body = _object(read_json(request), '{"url": "http://10.0.0.9:8080", "weight": 1}')
        try:
            spec = parse_node(body, "node")
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        if pool.get(spec.key) is not None:
            raise ApiError(409, f"{spec.url} is in pool {pool_name} already")
        config = self.control.config
        config = with_nodes(config, pool_name, configured(config, pool_name) + (spec,))
        what = f"pool {pool_name}: node {spec.url}"
        d = self._apply(config, peer, what, "absent", f"added, {_limits(spec)}")

        def answer(_: Any) -> tuple[int, Any]:
            node = pool.get(spec.key)
            if node is None:
                raise ApiError(409, f"{spec.url} was removed meanwhile")
            return 201, self.node_status(pool.nodes.index(node), node)

        return d.addCallback(answer)

    def remove_node(self, node: Node, peer: str) -> Any:
        """
        C{DELETE /nodes/<pool>/<id>}: drain the node and remove it; its
        in-flight requests finish.
        """
        pool_name = node.pool_name
        config = self.control.config
        listed = configured(config, pool_name)
        if not any(spec.key == node.key for spec in listed):
            raise ApiError(409, f"{node.url} is not listed in the configuration (DNS or --demo)")
        nodes = tuple(spec for spec in listed if spec.key != node.key)
        pool_dns = config.dns_nodes if pool_name == DEFAULT_POOL else ()
        pool_dns += tuple(d for pc in config.pools if pc.name == pool_name for d in pc.dns_nodes)
        if not nodes and not pool_dns and not (pool_name == DEFAULT_POOL and config.demo):
            raise ApiError(409, f"{node.url} is the last node of pool {pool_name}")
        config = with_nodes(config, pool_name, nodes)
        pool = self.pools.get(pool_name)
        index = pool.nodes.index(node) if pool is not None else 0
        # Removed, it leaves the rotation at once (its state: draining) and
        # the traffic side lets its requests in flight finish.
        what = f"pool {pool_name}: node {node.url}"
        d = self._apply(config, peer, what, _limits(node.spec), "removed")
        return d.addCallback(lambda _: (200, self.node_status(index, node)))

    def change_node(self, request: Any, node: Node, peer: str) -> Any:
        """
        C{PATCH /nodes/<pool>/<id>}: a new C{weight} or C{max_connections}.
        """
        body = _object(read_json(request), '{"weight": 2} or {"max_connections": 100}')
        unknown = sorted(str(k) for k in body if k not in _NODE_CHANGES)
        if unknown or not body:
            raise ApiError(400, "the body may set weight and max_connections, nothing else")
        own: dict[str, Any] = {}
        try:
            if "weight" in body:
                own["weight"] = positive_int("weight", body["weight"], MAX_WEIGHT)
            if "max_connections" in body and body["max_connections"] is not None:
                own["max_connections"] = non_negative_int(
                    "max_connections", body["max_connections"]
                )
            elif "max_connections" in body:
                own["max_connections"] = None  # the pool's default again
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        pool_name = node.pool_name
        config = self.control.config
        listed = configured(config, pool_name)
        if not any(spec.key == node.key for spec in listed):
            raise ApiError(409, f"{node.url} is not listed in the configuration (DNS or --demo)")
        before = next(spec for spec in listed if spec.key == node.key)
        spec = dataclasses.replace(before, **own)
        nodes = tuple(spec if s.key == node.key else s for s in listed)
        config = with_nodes(config, pool_name, nodes)
        what = f"pool {pool_name}: node {node.url}"
        d = self._apply(config, peer, what, _limits(before), _limits(spec))
        pool = self.pools.get(pool_name)

        def answer(_: Any) -> tuple[int, Any]:
            if pool is None or node not in pool.nodes:
                raise ApiError(409, f"{node.url} was removed meanwhile")
            return 200, self.node_status(pool.nodes.index(node), node)

        return d.addCallback(answer)
