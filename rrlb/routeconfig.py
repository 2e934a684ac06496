# -*- test-case-name: tests.test_config,tests.test_actions -*-
"""
The YAML C{routes} list read into L{RouteConfig}s: each route's conditions,
its name, its filters (L{rrlb.filters}) and its one action (a pool, or
L{rrlb.actions}). Every mistake raises L{ConfigError} naming C{routes[N]}.
Pool names are checked here too (L{pool_name}). No Twisted: this only parses.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from rrlb.actions import Forward, Redirect, Respond, Stickiness
from rrlb.filters import parse_filters
from rrlb.settings import RouteConfig
from rrlb.values import ConfigError, boolean, mapping, string, token, trusted_networks

_ROUTE_KEYS = frozenset(
    {"name", "host", "path_prefix", "methods", "header", "strip_prefix", "pool", "filters"}
    | {"scheme", "query", "source", "path", "redirect", "respond", "forward", "stickiness"}
    | {"client_cert"}
)
_ACTIONS = ("pool", "forward", "redirect", "respond")
_POOL_NAME = frozenset("-_.0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

# Characters that cannot appear in a host or path as sent on the wire (they
# would break the request line or the Host header).
BAD_URL_CHARS = frozenset(' <>"{}|\\^`')


def pool_name(name: str, value: Any) -> str:
    # Not all digits: /nodes/0 in the admin API is a node's position.
    if not isinstance(value, str) or not value or not set(value) <= _POOL_NAME or value.isdigit():
        raise ConfigError(
            f"{name}: a pool name must be letters, digits, '-', '_' or '.' (not only"
            f" digits), not {value!r}"
        )
    if value == "none":
        # The pool label of answers that had no pool (rrlb.metrics.NO_NODE).
        raise ConfigError(f"{name}: 'none' is reserved (the metrics' label for no pool)")
    return value


def parse_routes(value: Any) -> tuple[RouteConfig, ...]:
    """
    The YAML C{routes} list (their pools are checked by L{build_config}).
    """
    if not isinstance(value, list):
        raise ConfigError(
            f"routes must be a list of routes like {{host: ..., pool: ...}}, not {value!r}"
        )
    routes = []
    for i, item in enumerate(value):
        where = f"routes[{i}]"
        raw = mapping(where, item, _ROUTE_KEYS)
        kwargs: dict[str, Any] = route_action(where, raw)
        if "host" in raw:
            kwargs["host"] = parse_route_host(f"{where}.host", raw["host"])
        if "path_prefix" in raw:
            kwargs["path_prefix"] = url_path(
                f"{where}.path_prefix", raw["path_prefix"], "?#", "a percent-encoded path"
            )
        if "methods" in raw:
            methods = [raw["methods"]] if isinstance(raw["methods"], str) else raw["methods"]
            if not isinstance(methods, list) or not methods:
                raise ConfigError(f"{where}.methods must be a list of methods, not {methods!r}")
            kwargs["methods"] = tuple(
                token(f"{where}.methods", m, "an HTTP method").upper() for m in methods
            )
        if "header" in raw:
            header = raw["header"]
            if not isinstance(header, dict) or not header:
                raise ConfigError(
                    f"{where}.header must be a mapping of header names to values, not {header!r}"
                )
            pairs = []
            for name, wanted in header.items():
                token(f"{where}.header", name, "a header name")
                if isinstance(wanted, (int, float)) and not isinstance(wanted, bool):
                    wanted = str(wanted)
                if not isinstance(wanted, str) or any(c in wanted for c in "\r\n\0"):
                    raise ConfigError(f"{where}.header.{name} must be a string, not {wanted!r}")
                pairs.append((name, wanted))
            kwargs["header"] = tuple(pairs)
        if "client_cert" in raw:
            kwargs["client_cert"] = boolean(f"{where}.client_cert", raw["client_cert"])
        if "strip_prefix" in raw:
            kwargs["strip_prefix"] = boolean(f"{where}.strip_prefix", raw["strip_prefix"])
            if kwargs["strip_prefix"] and "path_prefix" not in kwargs:
                raise ConfigError(f"{where}.strip_prefix needs a path_prefix")
        if "name" in raw:
            kwargs["name"] = token(f"{where}.name", raw["name"], "a route name")
        if "filters" in raw:
            kwargs["filters"] = parse_filters(f"{where}.filters", raw["filters"])
        kwargs.update(route_conditions(where, raw))
        routes.append(RouteConfig(**kwargs, entry=item))
    names = [r.name for r in routes if r.name is not None]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"routes: two routes are named {name!r}")
    return tuple(routes)


def route_action(where: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """
    A route's one action: C{pool}, C{forward} (with C{stickiness}),
    C{redirect} or C{respond}.
    """
    given = [key for key in _ACTIONS if key in raw]
    if len(given) != 1:
        raise ConfigError(
            f"{where} needs exactly one action: pool, forward, redirect or respond"
            + (f" (it has {', '.join(given)})" if given else "")
        )
    if "stickiness" in raw and "forward" not in raw:
        raise ConfigError(f"{where}.stickiness goes with forward")
    if "strip_prefix" in raw and given[0] in ("redirect", "respond"):
        raise ConfigError(f"{where}.strip_prefix: a {given[0]} route forwards nothing")
    if "pool" in raw:
        return {"pool": pool_name(f"{where}.pool", raw["pool"])}
    if "redirect" in raw:
        return {"action": Redirect.parse(f"{where}.redirect", raw["redirect"])}
    if "respond" in raw:
        return {"action": Respond.parse(f"{where}.respond", raw["respond"])}
    forward = Forward.parse(f"{where}.forward", raw["forward"], pool_name)
    if "stickiness" in raw:
        forward = replace(
            forward, stickiness=Stickiness.parse(f"{where}.stickiness", raw["stickiness"])
        )
    return {"action": forward}


def route_conditions(where: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """
    A route's scheme, query, source and path conditions.
    """
    kwargs: dict[str, Any] = {}
    if "scheme" in raw:
        if raw["scheme"] not in ("http", "https"):
            raise ConfigError(f"{where}.scheme must be http or https, not {raw['scheme']!r}")
        kwargs["scheme"] = raw["scheme"]
    if "query" in raw:
        query = raw["query"]
        if not isinstance(query, dict) or not query:
            raise ConfigError(
                f"{where}.query must be a mapping of parameters to values, not {query!r}"
            )
        pairs = []
        for name, value in query.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(name, str) or not name or not isinstance(value, str):
                raise ConfigError(f"{where}.query: {name!r}: {value!r} must be a name and a string")
            pairs.append((name, value))
        kwargs["query"] = tuple(pairs)
    if "source" in raw:
        kwargs["source"] = trusted_networks(f"{where}.source", raw["source"])
    if "path" in raw:
        kwargs["path"] = url_path(
            f"{where}.path", raw["path"], "#", "a glob of a percent-encoded path"
        )
    return kwargs


def url_path(where: str, value: Any, forbidden: str, what: str) -> str:
    """
    A route's C{path_prefix} or C{path}: visible ASCII starting with C{/},
    without the characters a URL cannot carry or C{forbidden}.

    @param what: what it must be, for the message.
    """
    path = string(where, value)
    if (
        not path.startswith("/")
        or not path.isascii()
        or any(c in BAD_URL_CHARS or not c.isprintable() or c in forbidden for c in path)
    ):
        raise ConfigError(f"{where} must be {what} starting with '/', not {path!r}")
    return path


def parse_route_host(name: str, value: Any) -> str:
    """
    A route's host: a name (any case, no port) or C{*.} and a name.
    """
    host = string(name, value).strip().lower().rstrip(".")
    bare = host[2:] if host.startswith("*.") else host
    if not bare or "*" in bare or ":" in bare.strip("[]") and not bare.startswith("["):
        raise ConfigError(f"{name} must be a host name, or *.name for one label, not {value!r}")
    if any(c in BAD_URL_CHARS or c in "/?#@" or not c.isprintable() for c in bare):
        raise ConfigError(f"{name} must be a host name, or *.name for one label, not {value!r}")
    return host
