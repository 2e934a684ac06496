# -*- test-case-name: tests.test_admin,tests.test_runtime -*-
"""
The admin endpoint (C{--admin DESC}, off by default; bind it to loopback):

  - C{GET /}: the status page, one row per node (plain HTML and CSS served
    from here, refreshing itself every two seconds; L{rrlb.statuspage}).
  - C{GET /status}: JSON of every node and of the process.
  - C{GET /metrics}: Prometheus text exposition, every name starting C{rrlb_}.
  - C{GET /nodes}: every node; C{GET /nodes/<pool>}: one pool's nodes.
  - C{GET /nodes/<pool>/<id>} (or C{/nodes/<id>}): one node's JSON.
  - C{POST /nodes/<pool>/<id>/drain}, C{POST /nodes/<pool>/<id>/enable}
    (or without the pool): take a node out of rotation by hand (its
    in-flight requests finish) and put it back.
  - The runtime API (L{rrlb.runtime}), given a control side: C{GET /config},
    C{PUT /config}, C{POST /nodes/<pool>}, C{PATCH} and C{DELETE
    /nodes/<pool>/<id>}. Request bodies are read up to L{MAX_ADMIN_BODY}.

A node's C{<id>} is its position in its pool's node list (C{0}, C{1}, ...),
its name (C{host:port} plus any base path, e.g. C{10.0.0.1:8080}) or its
URL, percent-encoded. Without a pool, a position is in the first pool (the
default one) and a name or URL may be in any pool, but only in one. API
errors are JSON C{{"error": "..."}}: 404 for an unknown path, pool or node,
405 (with C{Allow}) for a wrong method, 409 for a name that matches several
nodes, 403 for a cross-site browser request.

Before any of that, every request is checked by L{AdminAccess} (its
C{Host}, then its bearer token when C{admin_token_file} is set): 421 for a
C{Host} that is not one of the endpoint's names (DNS rebinding), 401 with
C{WWW-Authenticate: Bearer} without the token.

It reads the pool and L{Metrics}; it never touches the request path.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from rrlb.config import Config
from rrlb.history import History
from rrlb.metrics import Metrics, exposition, node_name
from rrlb.pool import Node, Pool, Pools
from rrlb.runtime import ApiError, Control, RuntimeAPI, peer_of
from rrlb.statuspage import PAGE_POLICY, STYLESHEET, render_page

log = Logger()

JSON = b"application/json"
PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"
ACTIONS = {"drain": True, "enable": False}
# The methods of the runtime API's changes.
WRITES = (b"PUT", b"POST", b"PATCH", b"DELETE")


def find_node(pools: Pools, ident: str, pool_name: Optional[str] = None) -> tuple[int, Node]:
    """
    The node C{ident} names (position, name or URL) in pool C{pool_name},
    or without one in the first pool (a position) or any pool (a name or
    URL), and its position in its pool.

    @raise ApiError: 404 if none does, 409 if a name fits several.
    """
    if pool_name is not None:
        pool = pools.get(pool_name)
        if pool is None:
            raise ApiError(404, f"no pool {pool_name!r} (pools: {', '.join(pools.by_name)})")
        return find_in_pool(pool, ident)
    if ident.isdigit() and ident.isascii() or len(pools) == 1:
        return find_in_pool(next(iter(pools)), ident)
    found = []
    for pool in pools:
        try:
            found.append(find_in_pool(pool, ident))
        except ApiError as e:
            if e.code != 404:
                raise
    if len(found) == 1:
        return found[0]
    if found:
        raise ApiError(409, f"{ident!r} is in {len(found)} pools: use POOL/NODE")
    raise ApiError(404, f"no node {ident!r}")


def find_in_pool(pool: Pool, ident: str) -> tuple[int, Node]:
    """
    The node C{ident} names in C{pool}, and its position.
    """
    nodes = pool.nodes
    if ident.isdigit() and ident.isascii():
        index = int(ident)
        if index < len(nodes):
            return index, nodes[index]
        raise ApiError(404, f"no node {ident}: ids are 0 to {len(nodes) - 1}")
    for index, node in enumerate(nodes):
        if node.url == ident or node.url.rstrip("/") == ident.rstrip("/"):
            return index, node
    found = [(i, n) for i, n in enumerate(nodes) if node_name(n) == ident]
    if len(found) == 1:
        return found[0]
    if found:
        raise ApiError(409, f"{ident!r} names {len(found)} nodes: use its id or URL")
    raise ApiError(404, f"no node {ident!r}")


# Reason phrases Twisted does not know.
_PHRASES = {421: b"Misdirected Request"}


def _json(request: Any, code: int, value: Any) -> bytes:
    request.setResponseCode(code, _PHRASES.get(code))
    request.setHeader(b"Content-Type", JSON)
    return json.dumps(value, indent=1).encode("utf-8") + b"\n"


def _cross_site(request: Any) -> bool:
    """
    Whether a browser sent this from another site's page (a form or script
    there aiming at a loopback admin port): its C{Origin} names another
    host, or C{Sec-Fetch-Site} says so. Tools like curl send neither.
    """
    site = request.getHeader(b"Sec-Fetch-Site")
    if site is not None and site not in (b"same-origin", b"none"):
        return True
    origin = request.getHeader(b"Origin")
    if origin is None:
        return False
    host = request.getHeader(b"Host") or b""
    try:
        netloc = urlsplit(origin.decode("ascii")).netloc.encode("ascii")
    except (UnicodeError, ValueError):
        return True
    return netloc.lower() != host.lower()


# -- who may ask -------------------------------------------------------------------

# The name every admin endpoint answers to, besides IP literals.
LOCALHOST = "localhost"


def host_name(host: bytes) -> Optional[str]:
    """
    The name part of a C{Host} value (lower-cased, without its port or a
    trailing dot; an IPv6 literal without its brackets), or L{None} if the
    value is not an authority.
    """
    try:
        text = host.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    if text.startswith("["):
        literal, bracket, port = text[1:].partition("]")
        if not bracket or not (port == "" or port.startswith(":") and port[1:].isdigit()):
            return None
        return literal
    name, colon, port = text.partition(":")
    if colon and not port.isdigit() or name.endswith(".."):
        return None
    return name[:-1] if name.endswith(".") else name


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class AdminAccess:
    """
    Who the admin endpoint answers, swapped whole on reload.

    @ivar hosts: the names a C{Host} may give besides IP literals
        (C{localhost} and C{admin_hosts}).
    @ivar token_digest: the SHA-256 of the bearer token every request must
        send, or L{None} for none (hashed, so that comparing it takes the
        same time whatever a client sends).
    """

    hosts: frozenset[str] = frozenset({LOCALHOST})
    token_digest: Optional[bytes] = None

    @classmethod
    def of(cls, config: Config) -> AdminAccess:
        token = config.admin_token
        return cls(
            frozenset((LOCALHOST,) + config.admin_hosts),
            None if token is None else hashlib.sha256(token).digest(),
        )

    def host_allowed(self, request: Any) -> bool:
        """
        Whether the request's C{Host} is a name this endpoint is reached
        by: an IP literal (one cannot be rebound to another address), a
        name in L{hosts}, or none at all (not a browser: HTTP/1.0 tools).
        On a Unix socket the same rule holds.
        """
        values = request.requestHeaders.getRawHeaders(b"Host")
        if values is None:
            return True
        if len(values) != 1:
            return False
        name = host_name(values[0])
        return name is not None and (name in self.hosts or is_ip_literal(name))

    def refusal(self, request: Any) -> Optional[Resource]:
        """
        L{None} if the request may go on, or the answer that refuses it:
        421 for a C{Host} that is not one of the endpoint's names, then 401
        without the bearer token (when one is set).
        """
        if not self.host_allowed(request):
            return Refused(
                421,
                "this admin endpoint answers only to localhost, an IP address and the"
                " names in admin_hosts",
            )
        if self.token_digest is None:
            return None
        values = request.requestHeaders.getRawHeaders(b"Authorization")
        if values is None:
            return Refused(
                401,
                "the admin API needs a bearer token (admin_token_file)",
                ((b"WWW-Authenticate", b'Bearer realm="rrlb admin"'),),
            )
        scheme, _, credentials = values[0].strip().partition(b" ")
        digest = hashlib.sha256(credentials.strip()).digest()
        if (
            len(values) == 1
            and scheme.lower() == b"bearer"
            and hmac.compare_digest(digest, self.token_digest)
        ):
            return None
        return Refused(
            401,
            "the bearer token is not valid",
            ((b"WWW-Authenticate", b'Bearer realm="rrlb admin", error="invalid_token"'),),
        )


class Refused(Resource):
    """
    An admin request refused before routing: a JSON error.
    """

    isLeaf = True

    def __init__(self, code: int, message: str, headers: Sequence[tuple[bytes, bytes]] = ()):
        super().__init__()
        self.code = code
        self.message = message
        self.headers = headers

    def render(self, request: Any) -> bytes:
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        for name, value in self.headers:
            request.setHeader(name, value)
        return _json(request, self.code, {"error": self.message})


class AdminResource(Resource):
    """
    The whole admin tree, routed by path in one place.
    """

    isLeaf = True

    def __init__(
        self,
        pools: Pools,
        metrics: Metrics,
        history: Optional[History] = None,
        control: Optional[Control] = None,
    ) -> None:
        super().__init__()
        self.pools = pools
        self.metrics = metrics
        self.history = history
        # The runtime API (rrlb.runtime), with a control side to change.
        self.runtime = None if control is None else RuntimeAPI(control, pools, metrics.node_status)

    def render(self, request: Any) -> bytes:
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        path = [p.decode("utf-8", "replace") for p in request.postpath]
        if len(path) > 1 and path[-1] == "":
            path.pop()  # one trailing slash is fine
        method = request.method
        try:
            if path == [""]:
                self._allow(method, b"GET, HEAD")
                return self.page(request)
            if path == ["status.css"]:
                self._allow(method, b"GET, HEAD")
                request.setHeader(b"Content-Type", b"text/css; charset=utf-8")
                return STYLESHEET
            if path == ["status"]:
                self._allow(method, b"GET, HEAD")
                return _json(request, 200, self.metrics.status())
            if path == ["metrics"]:
                self._allow(method, b"GET, HEAD")
                request.setHeader(b"Content-Type", PROMETHEUS)
                return exposition(self.metrics)
            if path == ["nodes"]:
                self._allow(method, b"GET, HEAD")
                return _json(request, 200, self.metrics.status()["nodes"])
            if self.runtime is not None and (path == ["config"] or method in WRITES):
                answer = self.change(request, path, self.runtime)
                if answer is not None:
                    return answer
            if len(path) == 2 and path[0] == "nodes":
                self._allow(method, b"GET, HEAD, POST" if self.runtime else b"GET, HEAD")
                pool = self.pools.get(path[1])
                if pool is not None:
                    return _json(
                        request,
                        200,
                        [self.metrics.node_status(i, n) for i, n in enumerate(pool.nodes)],
                    )
                index, node = find_node(self.pools, path[1])
                return _json(request, 200, self.metrics.node_status(index, node))
            if len(path) == 3 and path[0] == "nodes" and path[2] not in ACTIONS:
                index, node = find_node(self.pools, path[2], path[1])
                self._allow(method, b"GET, HEAD, PATCH, DELETE" if self.runtime else b"GET, HEAD")
                return _json(request, 200, self.metrics.node_status(index, node))
            if len(path) in (3, 4) and path[0] == "nodes" and path[-1] in ACTIONS:
                self._allow(method, b"POST")
                if _cross_site(request):
                    raise ApiError(403, "cross-site requests to the admin API are refused")
                pool_name = path[1] if len(path) == 4 else None
                index, node = find_node(self.pools, path[-2], pool_name)
                pool = self.pools.get(node.pool_name)
                assert pool is not None
                pool.set_drained(node, ACTIONS[path[-1]])
                accept = request.getHeader(b"Accept") or b""
                if b"text/html" in accept:
                    # A form on the status page, without script: back to it.
                    request.setResponseCode(303)
                    request.setHeader(b"Location", b"/")
                    return b""
                return _json(request, 200, self.metrics.node_status(index, node))
            raise ApiError(404, f"no such admin path: /{'/'.join(path)}")
        except ApiError as e:
            if e.allow is not None:
                request.setHeader(b"Allow", e.allow)
            return _json(request, e.code, {"error": e.message})

    def change(self, request: Any, path: list[str], runtime: RuntimeAPI) -> Any:
        """
        The runtime API's answer to C{request}, or L{None} for a path it
        does not serve. A change is answered once every process runs it.
        """
        method = request.method
        if path == ["config"]:
            self._allow(method, b"GET, HEAD, PUT")
            if method != b"PUT":
                return _json(request, 200, runtime.get_config())
        elif len(path) == 2 and path[0] == "nodes" and method == b"POST":
            pass
        elif len(path) == 3 and path[0] == "nodes" and method in (b"PATCH", b"DELETE"):
            pass
        else:
            return None
        if _cross_site(request):
            raise ApiError(403, "cross-site requests to the admin API are refused")
        peer = peer_of(request)
        if method == b"PUT":
            applied = runtime.put_config(request, peer)
        elif method == b"POST":
            applied = runtime.add_node(request, path[1], peer)
        else:
            node = find_node(self.pools, path[2], path[1])[1]
            if method == b"DELETE":
                applied = runtime.remove_node(node, peer)
            else:
                applied = runtime.change_node(request, node, peer)
        return self._later(request, applied)

    def _later(self, request: Any, applied: Any) -> Any:
        """
        Answer C{request} when C{applied} fires with C{(status, value)}.
        """
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(result: tuple[int, Any]) -> None:
            if not gone:
                request.write(_json(request, *result))
                request.finish()

        def failed(reason: Failure) -> None:
            error = reason.value
            if isinstance(error, ApiError):
                return answer((error.code, {"error": error.message}))
            log.failure("admin API change", reason)
            answer((500, {"error": "the change failed; see rrlb's log"}))

        applied.addCallback(answer).addErrback(failed)
        return server.NOT_DONE_YET

    @staticmethod
    def _allow(method: bytes, allowed: bytes) -> None:
        if method not in allowed.split(b", "):
            raise ApiError(
                405, f"{method.decode('ascii', 'replace')} is not allowed here", allow=allowed
            )

    def page(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Security-Policy", PAGE_POLICY)
        request.setHeader(b"X-Frame-Options", b"DENY")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        return render_page(self.metrics.status(), self.history).encode("utf-8")


# The admin endpoint's connections are not under --max-connections: their
# descriptors come out of rrlb.clients.FD_RESERVE. So at most this many are
# open, each idle at most this long (Twisted's default is twelve hours). At
# the cap a new connection takes the place of the oldest idle one (nginx
# reuses idle keep-alive connections the same way), or is closed at once if
# every one is in the middle of a request.
ADMIN_MAX_CONNECTIONS = 16
ADMIN_IDLE_TIMEOUT = 60.0


# The largest request body the admin endpoint reads (a PUT /config).
MAX_ADMIN_BODY = 1024 * 1024
_TOO_LARGE = json.dumps({"error": f"the body is larger than {MAX_ADMIN_BODY} bytes"}).encode()


class AdminRequest(server.Request):
    """
    An admin request whose body is read up to L{MAX_ADMIN_BODY}: a longer
    one (by its C{Content-Length}, or as it arrives) gets 413 and the
    connection closes, before the rest is read.
    """

    too_large = False

    def gotLength(self, length: Optional[int]) -> None:
        super().gotLength(length)
        if length is not None and length > MAX_ADMIN_BODY:
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        content: Any = self.content
        if content.tell() + len(data) > MAX_ADMIN_BODY:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        # The request is not complete, so twisted.web has no response to
        # send yet: the answer goes out as Twisted sends its own 400s.
        self.too_large = True
        transport: Any = self.channel.transport
        transport.write(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s\n"
            % (len(_TOO_LARGE) + 1, _TOO_LARGE)
        )
        transport.loseConnection()

    def process(self) -> None:
        if not self.too_large:
            super().process()


class AdminChannel(http.HTTPChannel):
    """
    An admin connection: kept by its L{AdminSite} while it is open.
    """

    site: AdminSite

    def connectionMade(self) -> None:
        self.site.channels[self] = None
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.channels.pop(self, None)
        super().connectionLost(reason)


class AdminSite(server.Site):
    """
    The admin endpoint's site: quiet (scrapes every few seconds would flood
    the log), never a traceback, and at most L{ADMIN_MAX_CONNECTIONS}
    connections, each idle at most L{ADMIN_IDLE_TIMEOUT}.
    """

    noisy = False
    displayTracebacks = False
    protocol = AdminChannel  # type: ignore[assignment]  # HTTP/1.1 only
    requestFactory = AdminRequest
    access = AdminAccess()

    def __init__(
        self,
        pools: Pools,
        metrics: Metrics,
        history: Optional[History] = None,
        resource: Optional[Resource] = None,
        control: Optional[Control] = None,
        **kw: Any,
    ) -> None:
        kw.setdefault("timeout", ADMIN_IDLE_TIMEOUT)
        super().__init__(resource or AdminResource(pools, metrics, history, control), **kw)
        # The open connections, oldest first.
        self.channels: dict[AdminChannel, None] = {}

    @property
    def open_connections(self) -> int:
        return len(self.channels)

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.channels) >= ADMIN_MAX_CONNECTIONS and not self._close_idle():
            return None  # the port closes it
        return super().buildProtocol(addr)

    def _close_idle(self) -> bool:
        """
        Close the oldest connection with no request in progress, to make
        room; whether there was one.
        """
        for channel in self.channels:
            if not channel.requests:
                del self.channels[channel]
                channel.loseConnection()
                return True
        return False

    def configure(self, config: Config) -> None:
        """
        Answer as C{config} says (its C{admin_hosts} and token): at start-up
        and on each reload.
        """
        self.access = AdminAccess.of(config)

    def getResourceFor(self, request: Any) -> Any:
        # Checked before any resource sees the request, so that a refused
        # one costs nothing else (the workers' counters are not asked for).
        refused = self.access.refusal(request)
        if refused is not None:
            request.site = self
            return refused
        return super().getResourceFor(request)

    def log(self, request: Any) -> None:
        pass
