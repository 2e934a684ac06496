# -*- test-case-name: tests.test_routes -*-
"""
Route matching: which pool a request goes to. Pure: no reactor and no I/O;
it reads the request's method, target and headers (anything with
C{method}, C{uri} and C{requestHeaders}) and returns the first L{Route}
whose every condition holds.

Conditions (all optional; a route without any is the default):
  - C{host}: the request's host (the absolute-form target's authority, else
    the C{Host} header) without its port, compared case-insensitively;
    exact, or C{*.example.com} for exactly one more label.
  - C{path_prefix}: whole path segments of the target's path, after
    normalization (percent-encoded unreserved characters decoded, C{.} and
    C{..} segments resolved; an encoded C{/} stays one segment), so
    C{/static} matches C{/static} and C{/static/x} but not C{/staticx}, and
    C{/static/../admin} is not under C{/static}.
  - C{methods}: one of these methods.
  - C{header}: every one of these headers has (one of its values) exactly
    this value.
  - C{scheme}: C{http} or C{https}, what the client used (behind
    C{--trusted-proxies}, the trusted C{X-Forwarded-Proto}).
  - C{query}: each of these query parameters is present with exactly this
    value (percent-decoded).
  - C{source}: the real client's address is in one of these networks.
  - C{path}: a glob of the whole normalized path: C{*} any run of
    characters, C{?} one.
  - C{client_cert}: C{true}, the client showed a verified certificate in
    its TLS handshake (C{tls.client_auth}); C{false}, it showed none.

A route also carries what the proxy does with its requests besides
forwarding them to its pool: its C{filters} and its C{action}
(L{rrlb.chain}); C{chained} says it has either.

The per-request cost is kept small: hosts and paths in their common forms
are compared without copying, and the normalized host of the last few
hundred distinct C{Host} values is cached.
"""

from __future__ import annotations

import re
from typing import Any, Generic, Optional, Sequence, TypeVar
from urllib.parse import parse_qsl

from rrlb._twisted import canonical_name, raw_headers
from rrlb.filters import request_scheme
from rrlb.stdfilters import AccessList

T = TypeVar("T")

# Distinct Host values whose normalized form is remembered; past this many
# (a client sending random hosts) they are normalized every time.
_HOST_CACHE_SIZE = 512

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


def normalize_host(value: bytes) -> bytes:
    """
    A host as routes compare it: no port, no trailing dot, lower case.
    """
    value = value.strip()
    if value.startswith(b"["):
        end = value.find(b"]")
        host = value[: end + 1] if end > 0 else value
    else:
        host = value.rpartition(b":")[0] if b":" in value else value
    if host.endswith(b"."):
        host = host[:-1]
    return host.lower()


def _decode_unreserved(match: re.Match[bytes]) -> bytes:
    octet = int(match.group(1), 16)
    if octet in _UNRESERVED:
        return bytes((octet,))
    return b"%" + match.group(1).upper()


def normalize_path(path: bytes) -> bytes:
    """
    C{path} with percent-encoded unreserved characters decoded (RFC 3986
    6.2.2.2) and dot segments removed (5.2.4). Everything else stays as
    sent, so the result can be forwarded as a request target.
    """
    if _PERCENT_BYTE in path:
        path = _PERCENT.sub(_decode_unreserved, path)
    if path.find(b"/.") < 0:
        return path
    out: list[bytes] = []
    segments = path.split(b"/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == b".":
            if last:
                out.append(b"")
        elif segment == b"..":
            if out:
                out.pop()
            if last:
                out.append(b"")
        else:
            out.append(segment)
    return b"/" + b"/".join(out)


_PERCENT_BYTE = ord("%")
_DOT_BYTE = ord(".")


def _needs_normalizing(path: bytes) -> bool:
    # Membership of an int is several times cheaper than of a bytes string
    # (no buffer protocol): most paths have no "%" and at most a file
    # extension's ".".
    return _PERCENT_BYTE in path or (_DOT_BYTE in path and path.find(b"/.") >= 0)


class Route(Generic[T]):
    """
    One compiled route: its conditions and where it sends requests.

    @ivar target: what the route sends to (the proxy's pool handle).
    @ivar prefix: the normalized path prefix without a trailing slash, or
        L{None}.
    @ivar strip_prefix: whether the prefix is removed from the forwarded
        target.
    """

    __slots__ = (
        "target",
        "pool",
        "hosts",
        "wildcards",
        "prefix",
        "prefix_slash",
        "strip_prefix",
        "methods",
        "headers",
        "is_default",
        "scheme",
        "query",
        "source",
        "glob",
        "client_cert",
        "extra",
        "name",
        "label",
        "filters",
        "action",
        "chained",
        "responders",
    )

    def __init__(
        self,
        target: T,
        pool: str = "",
        host: Optional[str] = None,
        path_prefix: Optional[str] = None,
        methods: Sequence[str] = (),
        header: Sequence[tuple[str, str]] = (),
        strip_prefix: bool = False,
        scheme: Optional[str] = None,
        query: Sequence[tuple[str, str]] = (),
        source: Sequence[Any] = (),
        path: Optional[str] = None,
        client_cert: Optional[bool] = None,
    ) -> None:
        self.target = target
        self.pool = pool
        self.hosts: Optional[bytes] = None
        self.wildcards: Optional[bytes] = None
        if host is not None:
            lowered = host.lower().encode("idna" if not host.isascii() else "ascii")
            if lowered.startswith(b"*."):
                # The suffix with its dot: ".example.com".
                self.wildcards = lowered[1:]
            else:
                self.hosts = lowered
        self.prefix: Optional[bytes] = None
        self.prefix_slash = b""
        if path_prefix is not None:
            prefix = normalize_path(path_prefix.encode("ascii")).rstrip(b"/")
            self.prefix = prefix
            self.prefix_slash = prefix + b"/"
        self.strip_prefix = strip_prefix and bool(self.prefix)
        self.methods = frozenset(m.encode("ascii") for m in methods) or None
        self.headers = tuple(
            (canonical_name(name.encode("ascii")), value.encode("latin-1"))
            for name, value in header
        )
        self.scheme = scheme.encode("ascii") if scheme is not None else None
        self.query = tuple(query)
        self.source = AccessList(tuple(source), allow=True) if source else None
        self.glob = glob_pattern(path) if path is not None else None
        self.client_cert = client_cert
        # The conditions checked by extra_matches, only for a route with any.
        self.extra = bool(
            self.scheme or self.query or self.source or self.glob or client_cert is not None
        )
        self.is_default = (
            host is None
            and path_prefix is None
            and not self.methods
            and not self.headers
            and not self.extra
        )
        # What happens to its requests (set by whoever builds the routes):
        # its name (else its index) as filters see it, its filters (see
        # rrlb.chain) and its action (None: forward to target).
        self.name: Optional[str] = None
        self.label: Any = None
        self.filters: tuple[Any, ...] = ()
        self.action: Any = None
        self.chained = False
        self.responders: Any = None

    def host_matches(self, host: Optional[bytes]) -> bool:
        if host is None:
            return False
        if self.hosts is not None:
            return host == self.hosts
        suffix = self.wildcards
        assert suffix is not None
        # Exactly one label before the suffix.
        return (
            host.endswith(suffix)
            and host.find(b".", 0, len(host) - len(suffix)) < 0
            and (len(host) > len(suffix))
        )

    def path_matches(self, path: bytes) -> bool:
        prefix = self.prefix
        assert prefix is not None
        if not prefix:
            return True  # "/": every path
        return path == prefix or path.startswith(self.prefix_slash)

    def extra_matches(self, request: Any, path: bytes) -> bool:
        """
        Whether C{request} (of normalized path C{path}) meets this route's
        scheme, client_cert, query, source and path glob conditions.
        """
        if self.scheme is not None and request_scheme(request) != self.scheme:
            return False
        if self.client_cert is not None:
            # The connection's verified certificate (tls.client_auth).
            if (request.channel.client_cert is not None) is not self.client_cert:
                return False
        if self.glob is not None and self.glob.fullmatch(path) is None:
            return False
        if self.source is not None:
            client = request.real_client or getattr(request.client, "host", None) or ""
            if not self.source.permits(client):
                return False
        if self.query:
            cut = request.uri.find(b"?")
            if cut < 0:
                return False
            text = request.uri[cut + 1 :].decode("latin-1")
            pairs = set(parse_qsl(text, keep_blank_values=True, encoding="latin-1"))
            if not all(pair in pairs for pair in self.query):
                return False
        return True

    def strip(self, target: bytes) -> bytes:
        """
        The origin-form C{target} without this route's prefix: C{/static/a?x}
        becomes C{/a?x} and C{/static} becomes C{/}.
        """
        cut = target.find(b"?")
        path, query = (target, b"") if cut < 0 else (target[:cut], target[cut:])
        if _needs_normalizing(path):
            path = normalize_path(path)
        rest = path[len(self.prefix or b"") :]
        if not rest.startswith(b"/"):
            rest = b"/" + rest
        return rest + query

    def __repr__(self) -> str:
        return f"<Route to {self.pool}>"


class Router(Generic[T]):
    """
    The routes in order; L{match} returns the first that matches, or L{None}.
    """

    def __init__(self, routes: Sequence[Route[T]]) -> None:
        self.routes = tuple(routes)
        # Each route's fields in a tuple: unpacking one is cheaper than
        # reading the attributes one by one, per route, per request.
        self._compiled = tuple(
            (
                r.is_default,
                r.hosts,
                r.wildcards,
                r.prefix or None,
                r.prefix_slash,
                r.methods,
                r.headers,
                r.extra,
                r,
            )
            for r in routes
        )
        self.uses_host = any(r.hosts is not None or r.wildcards is not None for r in routes)
        self.uses_path = any(r.prefix is not None or r.glob is not None for r in routes)
        self._hosts: dict[bytes, bytes] = {}

    def request_host(self, request: Any) -> Optional[bytes]:
        """
        The normalized host of C{request}: the authority of an absolute-form
        target, else its C{Host} header.
        """
        uri = request.uri
        if uri[:1] == b"/" or uri == b"*":
            values = raw_headers(request.requestHeaders).get(b"Host")
            if not values:
                return None
            raw = values[0]
        else:
            rest = uri.partition(b"://")[2]
            end = len(rest)
            for sep in (b"/", b"?"):
                i = rest.find(sep)
                if 0 <= i < end:
                    end = i
            raw = rest[:end].rpartition(b"@")[2]
        cache = self._hosts
        host = cache.get(raw)
        if host is None:
            host = normalize_host(raw)
            if len(cache) < _HOST_CACHE_SIZE:
                cache[raw] = host
        return host

    @staticmethod
    def request_path(request: Any) -> bytes:
        """
        The normalized path of C{request}'s target (origin or absolute form).
        """
        uri = request.uri
        if uri[:1] != b"/":
            rest = uri.partition(b"://")[2]
            slash = rest.find(b"/")
            uri = rest[slash:] if slash >= 0 else b"/"
        cut = uri.find(b"?")
        path = uri if cut < 0 else uri[:cut]
        if _needs_normalizing(path):
            path = normalize_path(path)
        return path

    def match(self, request: Any) -> Optional[Route[T]]:
        """
        The first route whose conditions all hold for C{request}.
        """
        host: Optional[bytes] = None
        path = b"/"
        if self.uses_host:
            host = self.request_host(request)
        if self.uses_path:
            path = self.request_path(request)
        headers = None
        method = request.method
        # The checks inline rather than as method calls: this runs per request.
        for (
            is_default,
            exact,
            wildcards,
            prefix,
            prefix_slash,
            methods,
            wanted,
            extra,
            route,
        ) in self._compiled:
            if is_default:
                return route
            if exact is not None:
                if host != exact:
                    continue
            elif wildcards is not None and not route.host_matches(host):
                continue
            if prefix is not None and path != prefix and not path.startswith(prefix_slash):
                continue
            if methods is not None and method not in methods:
                continue
            if wanted:
                if headers is None:
                    headers = raw_headers(request.requestHeaders)
                missing = False
                for name, value in wanted:
                    values = headers.get(name)
                    if values is None or value not in values:
                        missing = True
                        break
                if missing:
                    continue
            if extra and not route.extra_matches(request, path):
                continue
            return route
        return None


def glob_pattern(pattern: str) -> re.Pattern[bytes]:
    """
    A route's C{path} glob as a regular expression over normalized paths:
    C{*} is any run of characters (C{/} included), C{?} one, as ALB path
    patterns work; the rest is literal, normalized as paths are.
    """
    literal = normalize_path(pattern.encode("ascii"))
    parts = [b".*" if c == b"*" else b"." if c == b"?" else re.escape(c) for c in _chars(literal)]
    return re.compile(b"".join(parts), re.S)


def _chars(text: bytes) -> list[bytes]:
    return [text[i : i + 1] for i in range(len(text))]
