# -*- test-case-name: tests.test_proxy -*-
"""
The proxy: a L{ReverseProxyResource} subclass that picks one node per
request from the pool and forwards the request to it exactly, streaming the
response back with backpressure, retrying connect failures of idempotent
requests on other nodes (within C{--retries} and the retry budget), queueing
requests while every node is full, and mapping failures to 502/503/504.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource

from rrlb._twisted import client_gone, init_request
from rrlb.body import StreamedBody
from rrlb.channel import ClientLimits, ClientSite, ProxyChannel
from rrlb.destination import Destination, ProxySettings
from rrlb.exchange import ProxyExchange
from rrlb.failures import LocalErrors, log_text
from rrlb.filterheaders import FilterHeaders
from rrlb.grpcwire import RESOURCE_EXHAUSTED
from rrlb.http1 import error_response
from rrlb.pool import Node, Pool
from rrlb.queue import RequestQueue, RetryBudget
from rrlb.routes import Route, Router
from rrlb.upstream import UpstreamPool

log = Logger()


class ProxyStats:
    """
    Process-wide counters the admin API reads.
    """

    def __init__(self) -> None:
        self.retries = 0
        self.tunnels_open = 0
        self.tunnel_bytes_to_node = 0
        self.tunnel_bytes_to_client = 0
        # Failures of filters, by label (rrlb.chain).
        self.filter_errors: dict[str, int] = {}


class RotatingProxy(ReverseProxyResource):
    """
    The root resource: every request goes to the node its pool picks. The
    pool is the default one, or with routes (L{set_routes}) the one of the
    first route that matches. It stays a L{ReverseProxyResource} in the
    resource tree, but forwards through L{UpstreamPool} rather than
    C{ProxyClientFactory}.

    @ivar pool: the default pool (the first, without a default).
    @ivar queue: the default pool's queue.
    @ivar local_errors: where connections that failed for want of a local
        resource are logged (shared with the health checkers).
    """

    isLeaf = True

    def __init__(
        self,
        pool: Pool,
        upstream: UpstreamPool,
        reactor: Any,
        settings: ProxySettings = ProxySettings(),
        local_errors: Optional[LocalErrors] = None,
    ) -> None:
        Resource.__init__(self)
        # ReverseProxyResource's own attributes, for code that inspects them.
        self.host = ""
        self.port = 0
        self.path = b""
        self.reactor = reactor
        self.clock = reactor
        self.upstream = upstream
        self.settings = settings
        self.local_errors = LocalErrors(reactor) if local_errors is None else local_errors
        self.stats = ProxyStats()
        self.budget = RetryBudget()
        # Overload control: each pool's queue is empty and unused unless
        # its nodes have limits.
        self.destinations: dict[str, Destination] = {}
        self.default = self.destination(pool, settings.node_host)
        self.pool = pool
        self.queue = self.default.queue
        # No routes: every request goes to the default pool.
        self.router: Optional[Router[Destination]] = None
        # What runs filters and actions (rrlb.chain.Chains), if any are
        # configured; all_chained is it too with top-level filters, which
        # every request goes through.
        self.chains: Any = None
        self.all_chained: Any = None
        self.on_done: Optional[Callable[[ProxyExchange, bool], None]] = None
        # The HTTP/2 client to nodes (rrlb.h2upstream), once a pool has
        # protocol: h2.
        self.h2: Any = None
        self._date_second = -1
        self._date = b""

    def getChild(self, path: bytes, request: Any) -> RotatingProxy:
        return self

    def destination(
        self, pool: Pool, node_host: bool = False, timeout: Optional[float] = None
    ) -> Destination:
        """
        The L{Destination} of C{pool} (made with its queue the first time),
        with these settings.
        """
        dest = self.destinations.get(pool.name)
        if dest is None or dest.pool is not pool:
            dest = Destination(
                pool, RequestQueue(pool, self.clock), node_host, timeout, exchange=ProxyExchange
            )
            self.destinations[pool.name] = dest
        dest.node_host = node_host
        dest.timeout = timeout
        return dest

    def set_routes(
        self,
        router: Optional[Router[Destination]],
        default: Destination,
        destinations: Optional[dict[str, Destination]] = None,
    ) -> None:
        """
        Route requests with C{router} (L{None}: all to C{default}); the
        pools not in C{destinations} are forgotten.
        """
        if destinations is not None:
            self.destinations = dict(destinations)
        self.router = router
        self.default = default
        self.pool = default.pool
        self.queue = default.queue

    def in_flight(self) -> int:
        """
        Requests in flight to the nodes of every pool.
        """
        return sum(n.in_flight for d in self.destinations.values() for n in d.pool.nodes)

    def date(self) -> bytes:
        """
        The current C{Date} value, formatted at most once a second.
        """
        now = int(self.clock.seconds())
        if now != self._date_second:
            self._date_second = now
            self._date = http.datetimeToString(now)
        return self._date

    def render(self, request: Any) -> int:
        # CONNECT and malformed targets never get here: the channel's parser
        # refuses them (rrlb.parser).
        if self.all_chained is not None:
            # Filters at the top level: every request goes through them.
            self.all_chained.start(request)
            return server.NOT_DONE_YET
        router = self.router
        route: Optional[Route[Destination]]
        if router is None:
            dest = self.default
            route = None
        else:
            route = router.match(request)
            if route is None:
                error_response(request, 404, "no route for this request")
                return server.NOT_DONE_YET
            if route.chained:
                # Filters, or an action other than a pool (rrlb.chain).
                self.chains.start(request, route)
                return server.NOT_DONE_YET
            dest = route.target
        self.send(request, dest, route)
        return server.NOT_DONE_YET

    def send(self, request: Any, dest: Destination, route: Optional[Route[Destination]]) -> None:
        """
        Forward C{request} to a node of C{dest}'s pool: at once, after a
        wait in its queue while every node is full, or answer 503.
        """
        pool = dest.pool
        node = pool.pick(request)
        if node is None:
            request.pool_name = dest.name
            if pool.serving:
                # Every node in rotation is full: wait for a slot.
                self._wait_for_node(request, dest, route)
                return
            error_response(
                request,
                503,
                "no healthy node to send the request to",
                [(b"Retry-After", b"%d" % self.settings.retry_after)],
            )
            return
        self._forward(request, node, dest, route)

    def _forward(
        self,
        request: Any,
        node: Node,
        dest: Optional[Destination] = None,
        route: Optional[Route[Destination]] = None,
    ) -> None:
        exchange = (dest or self.default).exchange(self, request, node, dest)
        if exchange.prepare():
            if route is not None and route.strip_prefix:
                exchange.target = route.strip(exchange.target)
            request.exchange = exchange
            exchange.start()

    def _wait_for_node(
        self,
        request: Any,
        dest: Optional[Destination] = None,
        route: Optional[Route[Destination]] = None,
    ) -> None:
        """
        Queue C{request} until a node has room, or answer 503 when the queue
        timeout passes. While it waits it has no exchange (the access log
        and metrics count a client that leaves as C{none}, 499).
        """

        if dest is None:
            dest = self.default
        queue = dest.queue

        def deliver(node: Node) -> None:
            self._forward(request, node, dest, route)

        def expire() -> None:
            error_response(
                request,
                503,
                "every node is busy and the request waited the whole queue timeout",
                [(b"Retry-After", b"%d" % self.settings.retry_after)],
                grpc_status=RESOURCE_EXHAUSTED,
            )

        waiter = queue.wait(deliver, expire)
        if waiter is not None:
            # A client that leaves is out of the queue at once (notifyFinish
            # fails from Request.connectionLost); after delivery this is a
            # no-op.
            request.notifyFinish().addBoth(lambda _: queue.leave(waiter))


class ProxyRequest(server.Request):
    """
    A request of the proxy's site: no default headers of its own (the node's
    C{Server}, C{Date} and C{Content-Type} pass through untouched), no form
    parsing of bodies, no traceback pages, and it tells its exchange when
    the client goes away.
    """

    defaultContentType = None

    # rrlb's own state of a request, in slots set by the constructor: kept
    # out of the instance dict, which Twisted's attributes fill to the size
    # past which Python stops sharing its keys between instances, and a
    # store into it would copy it (a filtered request's view, hook and log
    # fields made every request so copy its dict once, about 10k
    # instructions).
    __slots__ = (
        "exchange",
        "client_error",
        "real_client",
        "body",
        "pool_name",
        "response_hook",
        "filter_view",
        "log_notes",
    )
    exchange: Optional[ProxyExchange]
    # The reason rrlb refused the request itself (see rrlb.parser), if it did.
    client_error: Optional[str]
    # The client behind trusted proxies (--trusted-proxies), if not the peer.
    real_client: Optional[str]
    # The body, streamed to the node as it arrives (None: no body).
    body: Optional[StreamedBody]
    # The pool of a request answered without a node (503, queue timeout).
    pool_name: Optional[str]
    # What its response filters do to each response head (rrlb.chain), if
    # it has any.
    response_hook: Optional[Callable[[Any, int], bool]]
    # The request as its filters see it (rrlb.filters.FilterRequest).
    filter_view: Any
    # Fields filters added to its access log line (FilterRequest.note).
    log_notes: Optional[dict[str, str]]

    channel: Any

    def __init__(self, channel: Any, *args: Any, **kw: Any) -> None:
        # What server.Request.__init__ sets, at half its cost (see there).
        init_request(self, channel, FilterHeaders)
        self.exchange = self.client_error = self.real_client = self.body = None
        self.pool_name = self.response_hook = self.filter_view = self.log_notes = None

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # ProxyChannel has parsed and checked everything already; the
        # proxy needs no query arguments or form parsing (Request's own
        # version does both).
        self.method = command
        self.uri = path
        self.clientproto = version
        self.path = path.split(b"?", 1)[0]
        self.args = {}
        self.process()

    def process(self) -> None:
        site = self.site = self.channel.site
        self.prepath = []
        self.postpath = []
        self.sitepath: list[bytes] = []
        try:
            resource = site.resource
            if not resource.isLeaf:
                resource = site.getResourceFor(self)
            # RotatingProxy answers every path itself: no traversal (and no
            # copy of prepath) per request.
            self.render(resource)
        except Exception:
            self.processingFailed(Failure())

    def write_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        """
        End the response with C{headers} as trailers (gRPC's C{grpc-status}),
        called just before L{finish}: over HTTP/2 the stream ends with a
        HEADERS frame carrying them; over HTTP/1.1 they are the chunked
        body's trailer section, and are dropped when the body is not
        chunked. Names and values are the node's, checked by its parser.
        """
        if self.finished or client_gone(self):
            return
        self.channel.write_trailers(self, headers)

    def processingFailed(self, reason: Failure) -> None:
        log.failure(
            "proxying {method} {uri}", reason, method=log_text(self.method), uri=log_text(self.uri)
        )
        exchange = self.exchange
        if exchange is not None and not exchange.finished:
            exchange.client_gone()
        if self.startedWriting:
            if self.channel is not None:
                self.channel.transport.loseConnection()
            return
        error_response(self, 500, "internal error")

    def connectionLost(self, reason: Failure) -> None:
        server.Request.connectionLost(self, reason)
        exchange = self.exchange
        if exchange is not None and not exchange.finished:
            exchange.client_gone()
        site = self.site
        if site is not None and not self.finished:
            # The client left, or was cut off mid-body, before the response
            # ended, so Site.log (called from finish) never ran: count and
            # log it now (as 499 if no response head went out).
            site.log(self)


class ProxySite(ClientSite):
    """
    The listening side: L{ProxyChannel}s making L{ProxyRequest}s, the client
    limits, and the access log handed in by the service (none by default,
    which keeps the hot path free of it).
    """

    # A plain HTTP/1.1 channel: no HTTP/2 negotiation wrapper around it
    # (with --http2, rrlb.http2.ALPNChannel).
    protocol = ProxyChannel  # type: ignore[assignment]
    requestFactory = ProxyRequest
    displayTracebacks = False
    # Offered by ALPN on TLS listeners. Twisted's Site offers h2 whenever the
    # h2 package is installed; rrlb only with --http2.
    alpn: list[bytes] = [b"http/1.1"]

    def __init__(
        self,
        resource: RotatingProxy,
        access_log: Optional[Callable[[Any], None]] = None,
        reactor: Any = None,
        limits: ClientLimits = ClientLimits(),
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        # Bodies are forwarded, never parsed as forms (ProxyRequest skips
        # Request.requestReceived's parsing; this is for any code path that
        # reads the Site's setting).
        ClientSite.__init__(self, resource, reactor, limits, parsePOSTFormSubmission=False)
        self.access_log = access_log

    def log(self, request: Any) -> None:
        if self.access_log is not None:
            self.access_log(request)

    def acceptableProtocols(self) -> list[bytes]:
        return self.alpn
