# -*- test-case-name: tests.test_actions -*-
"""
What a route does besides sending its requests to one pool: C{redirect},
C{respond} and C{forward} (weighted pools, optionally sticky). Each is
parsed from its YAML value (every mistake a one-line L{ConfigError} naming
C{routes[N]}) into a small frozen value the proxy calls per request:

  - L{Redirect.location}: the C{Location} of a request;
  - L{Respond}: its status, body and headers, built once;
  - L{Forward}: which of its targets a request goes to (L{Forward.picker}).

Pure: no reactor and no I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from math import gcd
from typing import Any, Callable, Generic, Optional, Sequence, TypeVar

from rrlb._twisted import raw_headers
from rrlb.filterheaders import header_name, header_value
from rrlb.filters import request_scheme
from rrlb.values import ConfigError, positive_int, string

T = TypeVar("T")

REDIRECT_STATUSES = (301, 302, 303, 307, 308)
DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECT_KEYS = frozenset({"scheme", "host", "port", "path", "query", "status"})
_RESPOND_KEYS = frozenset({"status", "body", "content_type", "headers"})
MAX_FORWARD_WEIGHT = 1000
# Characters that may not appear in a redirect's host, path or query as given.
_BAD_URL_CHARS = frozenset(' <>"\\^`{|}\r\n\0')


def _mapping(where: str, value: Any, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, not {value!r}")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise ConfigError(
            f"unknown setting {where}.{unknown[0]} (known: {', '.join(sorted(allowed))})"
        )
    return value


def _url_part(where: str, value: Any, allow_braces: bool = False) -> str:
    if not isinstance(value, str) or not value.isascii():
        raise ConfigError(f"{where} must be a percent-encoded ASCII string, not {value!r}")
    text = value.replace("{path}", "") if allow_braces else value
    if any(c in _BAD_URL_CHARS or not c.isprintable() for c in text):
        raise ConfigError(
            f"{where} must be percent-encoded (no spaces, quotes or braces), not {value!r}"
        )
    return value


@dataclass(frozen=True)
class Redirect:
    """
    C{redirect: {scheme, host, port, path, query, status}}: every part left
    out (L{None}) keeps the request's, but a new scheme without a port gets
    that scheme's default port. C{path} may hold C{{path}}, the request's
    path; C{query: ""} drops the query string.
    """

    scheme: Optional[str] = None
    host: Optional[str] = None
    port: Optional[int] = None
    path: Optional[str] = None
    query: Optional[str] = None
    status: int = 301

    @classmethod
    def parse(cls, where: str, value: Any) -> Redirect:
        raw = _mapping(where, value, _REDIRECT_KEYS)
        kwargs: dict[str, Any] = {}
        if "scheme" in raw:
            if raw["scheme"] not in DEFAULT_PORTS:
                raise ConfigError(f"{where}.scheme must be http or https, not {raw['scheme']!r}")
            kwargs["scheme"] = raw["scheme"]
        if "host" in raw:
            host = _url_part(f"{where}.host", raw["host"])
            if not host or any(c in host for c in "/?#@:") and not host.startswith("["):
                raise ConfigError(f"{where}.host must be a host name without a port, not {host!r}")
            kwargs["host"] = host.lower()
        if "port" in raw:
            kwargs["port"] = positive_int(f"{where}.port", raw["port"], 65535)
        if "path" in raw:
            path = _url_part(f"{where}.path", raw["path"], allow_braces=True)
            if (
                not path.startswith("/")
                and not path.startswith("{path}")
                or "?" in path
                or "#" in path
            ):
                raise ConfigError(
                    f"{where}.path must start with / or {{path}}, without ? or #, not {path!r}"
                )
            kwargs["path"] = path
        if "query" in raw:
            query = raw["query"]
            if query != "":
                query = _url_part(f"{where}.query", query)
                if query.startswith("?") or "#" in query:
                    raise ConfigError(f"{where}.query is the query string without ?, not {query!r}")
            kwargs["query"] = query
        if "status" in raw:
            if raw["status"] not in REDIRECT_STATUSES or isinstance(raw["status"], bool):
                raise ConfigError(
                    f"{where}.status must be 301, 302, 303, 307 or 308, not {raw['status']!r}"
                )
            kwargs["status"] = raw["status"]
        if not set(kwargs) - {"status"}:
            route = where.rpartition(".")[0] or where
            raise ConfigError(
                f"{route}: a redirect must change one of scheme, host, port, path or query"
                " (it would send the client back to the same URL)"
            )
        return cls(**kwargs)

    def location(self, request: Any) -> bytes:
        """
        The C{Location} of C{request}'s redirect.
        """
        old_scheme = request_scheme(request).decode("ascii")
        host, port = request_authority(request)
        if port is None:
            port = DEFAULT_PORTS[old_scheme]
        scheme = self.scheme or old_scheme
        if self.port is not None:
            port = self.port
        elif scheme != old_scheme:
            port = DEFAULT_PORTS[scheme]
        if self.host is not None:
            host = self.host
        uri: bytes = request.uri
        if uri[:1] != b"/":
            rest = uri.partition(b"://")[2]
            cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
            uri = rest[cut:] or b"/"
        path, mark, query = uri.partition(b"?")
        text_path = path.decode("latin-1")
        if not text_path.startswith("/"):
            text_path = "/" + text_path
        if self.path is not None:
            text_path = self.path.replace("{path}", text_path)
        text_query = query.decode("latin-1") if mark else None
        if self.query is not None:
            text_query = self.query or None
        authority = host if port == DEFAULT_PORTS[scheme] else f"{host}:{port}"
        location = f"{scheme}://{authority}{text_path}"
        if text_query is not None:
            location += "?" + text_query
        return location.encode("latin-1")


def request_authority(request: Any) -> tuple[str, Optional[int]]:
    """
    The host and port (L{None}: none given) of C{request}'s absolute-form
    target, else of its C{Host}, else of the address it came in on.
    """
    uri: bytes = request.uri
    raw: Optional[bytes] = None
    if uri[:1] != b"/" and b"://" in uri:
        rest = uri.partition(b"://")[2]
        cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        raw = rest[:cut].rpartition(b"@")[2]
    else:
        values = raw_headers(request.requestHeaders).get(b"Host")
        raw = values[0].strip() if values else None
    if not raw:
        local = getattr(getattr(request.channel, "local", None), "host", None) or "localhost"
        return (f"[{local}]" if ":" in local else local), None
    text = raw.decode("latin-1")
    if text.startswith("["):
        end = text.find("]")
        host, after = text[: end + 1], text[end + 1 :]
        digits = after[1:] if after.startswith(":") else ""
    else:
        host, _, digits = text.partition(":")
    return host, (int(digits) if digits.isdigit() and 0 < int(digits) < 65536 else None)


@dataclass(frozen=True)
class Respond:
    """
    C{respond: {status, body, content_type, headers}}: an answer without a
    node.
    """

    status: int = 200
    body: bytes = b""
    content_type: bytes = b"text/plain; charset=utf-8"
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def parse(cls, where: str, value: Any) -> Respond:
        raw = _mapping(where, value, _RESPOND_KEYS)
        kwargs: dict[str, Any] = {}
        if "status" in raw:
            status = raw["status"]
            if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
                raise ConfigError(
                    f"{where}.status must be a status from 200 to 599, not {status!r}"
                )
            kwargs["status"] = status
        if "body" in raw:
            body = raw["body"]
            if not isinstance(body, str):
                raise ConfigError(f"{where}.body must be a string, not {body!r}")
            kwargs["body"] = body.encode("utf-8")
        if "content_type" in raw:
            try:
                kwargs["content_type"] = header_value(
                    "content_type", string(f"{where}.content_type", raw["content_type"])
                )
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
        if "headers" in raw:
            headers = raw["headers"]
            if not isinstance(headers, dict):
                raise ConfigError(
                    f"{where}.headers must be a mapping of names to values, not {headers!r}"
                )
            pairs = []
            for name, item in headers.items():
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    item = str(item)
                try:
                    pairs.append((header_name(name), header_value(name, item)))
                except ValueError as e:
                    raise ConfigError(f"{where}.headers: {e}") from None
                if pairs[-1][0] == b"Content-Type":
                    raise ConfigError(f"{where}.headers: set Content-Type with content_type")
            kwargs["headers"] = tuple(pairs)
        return cls(**kwargs)


@dataclass(frozen=True)
class Stickiness:
    """
    C{stickiness: {cookie: NAME, duration: SECONDS}} beside C{forward}.
    """

    cookie: str
    duration: int

    @classmethod
    def parse(cls, where: str, value: Any) -> Stickiness:
        raw = _mapping(where, value, frozenset({"cookie", "duration"}))
        if "cookie" not in raw or "duration" not in raw:
            raise ConfigError(f"{where} needs a cookie and a duration in seconds")
        cookie = raw["cookie"]
        if not isinstance(cookie, str) or not cookie or not set(cookie) <= _COOKIE_NAME:
            raise ConfigError(f"{where}.cookie must be a cookie name, not {cookie!r}")
        return cls(cookie, positive_int(f"{where}.duration", raw["duration"]))


_COOKIE_NAME = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


@dataclass(frozen=True)
class Forward:
    """
    C{forward: [{pool, weight}, ...]}: requests split between pools in
    proportion to their weights (smooth weighted round robin), optionally
    sticky by a cookie.
    """

    pools: tuple[tuple[str, int], ...]
    stickiness: Optional[Stickiness] = None

    @classmethod
    def parse(cls, where: str, value: Any, pool_name: Callable[[str, Any], str]) -> Forward:
        if not isinstance(value, list) or not value:
            raise ConfigError(
                f"{where} must be a list like [{{pool: blue, weight: 90}}, {{pool: green,"
                f" weight: 10}}], not {value!r}"
            )
        pools: list[tuple[str, int]] = []
        for i, item in enumerate(value):
            raw = _mapping(f"{where}[{i}]", item, frozenset({"pool", "weight"}))
            if "pool" not in raw:
                raise ConfigError(f"{where}[{i}] needs a pool")
            name = pool_name(f"{where}[{i}].pool", raw["pool"])
            weight = positive_int(f"{where}[{i}].weight", raw.get("weight", 1), MAX_FORWARD_WEIGHT)
            if any(name == p for p, _ in pools):
                raise ConfigError(f"{where}[{i}].pool: {name!r} is listed twice")
            pools.append((name, weight))
        return cls(tuple(pools))

    def picker(self, targets: Sequence[T]) -> ForwardPicker[T]:
        """
        The per-process picker of this forward, over C{targets} (one per
        pool, in order).
        """
        return ForwardPicker(self, targets)


def cookie_value(pool: str) -> str:
    """
    The sticky cookie's opaque name for C{pool}.
    """
    return hashlib.sha256(b"rrlb-forward:" + pool.encode("utf-8")).hexdigest()[:16]


def smooth_schedule(weights: Sequence[int]) -> tuple[int, ...]:
    """
    Smooth weighted round robin (nginx's) over C{weights}: the order of
    indexes for one round of C{sum(weights) / gcd} picks, so that every
    round is exact.
    """
    divisor = 0
    for w in weights:
        divisor = gcd(divisor, w)
    weights = [w // divisor for w in weights]
    total = sum(weights)
    current = [0] * len(weights)
    order = []
    for _ in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=lambda i: current[i])
        current[best] -= total
        order.append(best)
    return tuple(order)


class ForwardPicker(Generic[T]):
    """
    Picks a target of a L{Forward} per request, in its schedule's order,
    skipping those not serving while another is.
    """

    def __init__(self, forward: Forward, targets: Sequence[T]) -> None:
        self.targets = tuple(targets)
        self.schedule = smooth_schedule([w for _, w in forward.pools])
        self.position = 0
        self.stickiness = forward.stickiness
        self.by_cookie = {cookie_value(name): i for i, (name, _) in enumerate(forward.pools)}
        self.cookies: tuple[bytes, ...] = ()
        sticky = forward.stickiness
        if sticky is not None:
            self.cookies = tuple(
                f"{sticky.cookie}={cookie_value(name)}; Max-Age={sticky.duration}; Path=/;"
                " HttpOnly".encode("ascii")
                for name, _ in forward.pools
            )

    def pick(
        self, serving: Callable[[T], bool], cookie: Optional[str] = None
    ) -> tuple[T, Optional[bytes]]:
        """
        The target of the next request, and the C{Set-Cookie} value to send
        with its response (L{None}: none).

        @param serving: whether a target has a node in rotation.
        @param cookie: the request's sticky cookie, if any.
        """
        targets = self.targets
        if cookie is not None:
            index = self.by_cookie.get(cookie)
            if index is not None and serving(targets[index]):
                return targets[index], None
        schedule = self.schedule
        n = len(schedule)
        first = None
        for _ in range(n):
            index = schedule[self.position]
            self.position = (self.position + 1) % n
            if first is None:
                first = index
            if serving(targets[index]):
                break
        else:
            assert first is not None
            index = first  # none serving: the scheduled one answers 503
        return targets[index], (self.cookies[index] if self.cookies else None)
