# -*- test-case-name: tests.test_proxy -*-
"""
The proxy: a L{ReverseProxyResource} subclass that picks one node per
request from the pool and forwards the request to it exactly, streaming the
response back with backpressure, retrying connect failures of idempotent
requests on other nodes (within C{--retries} and the retry budget), queueing
requests while every node is full, and mapping failures to 502/503/504.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource
from zope.interface import implementer

from rrlb._twisted import client_gone, raw_headers, set_raw_headers
from rrlb.body import KEEP, StreamedBody
from rrlb.channel import (
    EDGE_UNTRUSTED,
    ClientLimits,
    ClientSite,
    ProxyChannel,
    error_response,
)
from rrlb.failures import DESCRIPTOR_ERRNOS, LocalErrors, local_errno
from rrlb.health import describe_failure
from rrlb.pool import Node, Pool
from rrlb.proxyproto import proxy_header
from rrlb.queue import RequestQueue, RetryBudget
from rrlb.routes import Route, Router
from rrlb.settings import Config, values_for
from rrlb.tunnel import Tunnel, switching_head, upgrade_token
from rrlb.upstream import UpstreamPool, UpstreamProtocol, _canonical, connection_tokens

log = Logger()

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

# Request headers never forwarded as they came: hop-by-hop ones (RFC 9110
# 7.6.1), the framing ones (the body is re-sent with its own length), and
# the ones the proxy sets itself. Names as Twisted canonicalizes them.
_SKIP_REQUEST = frozenset(
    {
        b"Connection",
        b"Keep-Alive",
        b"Proxy-Connection",
        b"TE",
        b"Trailer",
        b"Transfer-Encoding",
        b"Upgrade",
        b"Proxy-Authorization",
        b"Proxy-Authenticate",
        b"Content-Length",
        b"Expect",
        b"Host",
        b"X-Forwarded-For",
        b"X-Forwarded-Proto",
        b"X-Forwarded-Host",
        b"Via",
    }
)


# What only a proxy in front may say of the client or of the request it
# received (the client's address, scheme, host, port, original URL), as
# CDNs, balancers and frameworks spell it, lower-cased with "_" as "-". From
# an untrusted peer under --trusted-proxies these are dropped: a node that
# believes one would take the client's word for who it is or where it came
# in (docs/security.md, "Client addresses").
_CLIENT_CLAIMS = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-server",
        b"x-forwarded-scheme",
        b"x-forwarded-ssl",
        b"x-forwarded-prefix",
        b"x-forwarded",
        b"forwarded-for",
        b"x-real-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"client-ip",
        b"x-originating-ip",
        b"x-remote-ip",
        b"x-remote-addr",
        b"x-url-scheme",
        b"front-end-https",
        b"x-original-url",
        b"x-rewrite-url",
    }
)


@dataclass(frozen=True)
class ProxySettings:
    """
    What the proxy needs of the configuration; swapped whole on reload.

    @ivar node_host: send each node its own host:port as C{Host} instead of
        the client's.
    @ivar retries: other nodes an idempotent request is tried on at most.
    """

    node_host: bool = Config.node_host
    retry_after: int = 1
    retries: int = Config.retries
    tunnel_timeout: float = Config.tunnel_timeout

    @classmethod
    def from_config(cls, config: Config) -> ProxySettings:
        """
        The settings of C{config} that feed C{proxy}, and C{Retry-After}
        (a 503's) as the health check interval in whole seconds.
        """
        retry_after = max(1, int(config.health.interval + 0.999))
        return cls(retry_after=retry_after, **values_for("proxy", config))


class Destination:
    """
    One pool as the proxy uses it: the pool (nodes and policy), the queue
    of its requests waiting for a node with room (a full pool queues only
    its own), and its upstream settings.

    @ivar timeout: its response timeout, or L{None} for the upstream
        client's.
    """

    __slots__ = ("name", "pool", "queue", "node_host", "timeout")

    def __init__(
        self,
        pool: Pool,
        queue: RequestQueue,
        node_host: bool = False,
        timeout: Optional[float] = None,
    ) -> None:
        self.name = pool.name
        self.pool = pool
        self.queue = queue
        self.node_host = node_host
        self.timeout = timeout


def _text(value: bytes) -> str:
    """
    Request bytes for a log line (only ever formatted when something failed).
    """
    return value.decode("latin-1")[:200]


def split_target(uri: bytes) -> tuple[Optional[bytes], bytes]:
    """
    Split a request target into the authority of an absolute-form target
    (or L{None}) and the origin-form part that is forwarded.

    @raise ValueError: for a target that is neither.
    """
    if uri[:1] == b"/":
        return None, uri
    if uri == b"*":
        return None, uri
    lower = uri[:8].lower()
    if lower.startswith(b"http://"):
        rest = uri[7:]
    elif lower.startswith(b"https://"):
        rest = uri[8:]
    else:
        raise ValueError("bad request target")
    cut = len(rest)
    for sep in (b"/", b"?"):
        i = rest.find(sep)
        if 0 <= i < cut:
            cut = i
    authority, path = rest[:cut], rest[cut:]
    if b"@" in authority:
        authority = authority.rsplit(b"@", 1)[1]
    if not authority:
        raise ValueError("absolute-form target without a host")
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path


@implementer(IPushProducer)
class ProxyExchange:
    """
    One client request on its way to a node and back. It is the producer
    the client's channel pauses when the client reads slowly, and it passes
    the pause on to the node's connection.
    """

    __slots__ = (
        "proxy",
        "dest",
        "timeout",
        "request",
        "node",
        "tried",
        "head_tail",
        "target",
        "host",
        "body",
        "upstream",
        "connector",
        "responded",
        "finished",
        "active",
        "deadline",
        "started",
        "upstream_status",
        "upstream_time",
        "retries",
        "stale_retry",
        "paused",
        "upgrade",
        "tunnel",
        "expect",
    )

    def __init__(
        self, proxy: RotatingProxy, request: Any, node: Node, dest: Optional[Destination] = None
    ) -> None:
        self.proxy = proxy
        if dest is None:
            dest = proxy.default
        self.dest = dest
        self.timeout = dest.timeout
        self.request = request
        self.node = node
        self.tried: list[Node] = [node]
        self.upstream: Optional[UpstreamProtocol] = None
        self.connector: Any = None
        self.responded = False
        self.finished = False
        self.active = False
        self.deadline: Optional[float] = None
        self.started = proxy.clock.seconds()
        self.upstream_status: Optional[int] = None
        self.upstream_time: Optional[float] = None
        self.retries = 0
        self.stale_retry = False
        self.paused = False
        self.body: Any = None
        self.upgrade = False
        self.tunnel: Optional[Tunnel] = None
        # The head asks the node Expect: 100-continue.
        self.expect = False

    # -- building the upstream request ---------------------------------------

    def prepare(self) -> bool:
        """
        Build everything of the upstream request that does not depend on the
        node. Answers 400 and returns C{False} for a target it cannot forward.
        """
        request = self.request
        try:
            authority, target = split_target(request.uri)
        except ValueError as e:
            error_response(request, 400, str(e))
            return False
        self.target = target
        headers = request.requestHeaders
        raw = raw_headers(headers)  # one pass over the dict Headers keeps
        host_values = raw.get(b"Host")
        client_host = host_values[0] if host_values else None
        self.host = authority if authority is not None else client_host
        channel = request.channel
        proto, ip = channel.forwarded

        drop = _SKIP_REQUEST
        connection = raw.get(b"Connection")
        upgrade = None
        if connection:
            extra = connection_tokens(connection)
            if b"upgrade" in extra and request.method == b"GET" and request.body is None:
                # WebSocket: Connection: Upgrade and its Upgrade go to the
                # node (rrlb.tunnel); other upgrade tokens (h2c) do not.
                upgrade = upgrade_token(raw.get(b"Upgrade"))
            if extra:
                drop = drop | {_canonical(t) for t in extra}
        parts: list[bytes] = []
        append = parts.append
        edge = channel.edge
        if edge == EDGE_UNTRUSTED:
            # --trusted-proxies, and the peer is not one: what it says of the
            # client goes, in any spelling a node might read as the same
            # (Forwarded, X_Forwarded_For, which CGI-style servers fold into
            # the same variable).
            for name, values in raw.items():
                if name in drop or name.replace(b"_", b"-").lower() in _CLIENT_CLAIMS:
                    continue
                for value in values:
                    append(name + b": " + value + b"\r\n")
        else:
            for name, values in raw.items():
                if name in drop:
                    continue
                for value in values:
                    append(name + b": " + value + b"\r\n")
        xff = raw.get(b"X-Forwarded-For")
        forwarded_host = self.host
        if edge:
            if edge == EDGE_UNTRUSTED:
                xff = None
            else:
                # A trusted peer's own claims are kept, and rrlb's appended
                # (each proxy of a chain adds its hop, as X-Forwarded-For).
                claimed = raw.get(b"X-Forwarded-Proto")
                if claimed:
                    proto = b", ".join(claimed + [proto])
                claimed = raw.get(b"X-Forwarded-Host")
                if claimed and forwarded_host is not None:
                    forwarded_host = b", ".join(claimed + [forwarded_host])
        if ip:
            xff_value = b", ".join(xff + [ip]) if xff else ip
        else:
            xff_value = b", ".join(xff) if xff else None
        if xff_value is not None:
            append(b"X-Forwarded-For: " + xff_value + b"\r\n")
        append(b"X-Forwarded-Proto: " + proto + b"\r\n")
        if forwarded_host is not None:
            append(b"X-Forwarded-Host: " + forwarded_host + b"\r\n")
        version = request.clientproto[5:] or b"1.1"
        via = raw.get(b"Via")
        via_self = version + b" rrlb"
        append(b"Via: " + (b", ".join(via + [via_self]) if via else via_self) + b"\r\n")

        if upgrade is not None:
            append(b"Connection: Upgrade\r\nUpgrade: " + upgrade + b"\r\n")
        self.upgrade = upgrade is not None
        body = request.body
        if body is None:
            if b"Content-Length" in raw or b"Transfer-Encoding" in raw:
                append(b"Content-Length: 0\r\n")
        elif body.length is not None:
            append(b"Content-Length: %d\r\n" % body.length)
            if body.expect_continue:
                # The node answers the Expect (rrlb.body.go_on/no_continue).
                append(b"Expect: 100-continue\r\n")
                self.expect = True
        elif body.complete:
            # A chunked body that came whole with the head: its length.
            append(b"Content-Length: %d\r\n" % body.received)
        else:
            # A chunked body still coming: chunked to the node too.
            body.chunked = True
            append(b"Transfer-Encoding: chunked\r\n")
            if body.expect_continue:
                append(b"Expect: 100-continue\r\n")
                self.expect = True
        append(b"\r\n")
        self.head_tail = b"".join(parts)
        self.body = body
        return True

    def interim_continue(self) -> None:
        """
        The node answered C{Expect: 100-continue} with 100 Continue.
        """
        body = self.body
        if body is not None:
            body.go_on()

    def head_for(self, node: Node) -> bytes:
        host = node.host_header if (self.dest.node_host or self.host is None) else self.host
        return b"".join(
            (
                self.request.method,
                b" ",
                node.base_path if self.target != b"*" else b"",
                self.target,
                b" HTTP/1.1\r\nHost: ",
                host,
                b"\r\n",
                self.head_tail,
            )
        )

    def proxy_header(self, version: str) -> bytes:
        """
        The PROXY protocol header naming this request's client, for a new
        connection to a node with C{send_proxy} (see L{UpstreamPool.acquire}).
        """
        transport = self.request.channel.transport
        return proxy_header(version, transport.getPeer(), transport.getHost())

    # -- driving it -----------------------------------------------------------

    def start(self) -> None:
        node = self.node
        node.in_flight += 1
        node.requests += 1
        self.connector = self.proxy.upstream.acquire(node, self)

    def connected(self, protocol: UpstreamProtocol, reused: bool) -> None:
        self.connector = None
        if self.finished:
            # The client left while we were connecting: keep the connection
            # only if its node is still configured.
            if self.dest.pool.get(self.node.key) is self.node:
                self.proxy.upstream.release(protocol)
            else:
                protocol.transport.loseConnection()
            return
        self.upstream = protocol
        self.stale_retry = reused
        body = self.body
        if body is not None and body.complete and not body.chunked:
            # The whole body came before the connection: one write. Past what
            # is kept it is not sent again (README: only short bodies retry).
            if body.received > KEEP:
                body.spent = True
            body = body.buffered()
        protocol.send(
            self, self.head_for(self.node), body, self.request.method == b"HEAD", self.expect
        )
        self.proxy.upstream.watch(self)

    def connect_failed(self, reason: Failure) -> None:
        self.connector = None
        if self.finished:
            return
        code = local_errno(reason)
        if code is not None:
            self._local_failure(code)
            return
        self._failed(reason, passive=True)

    def _local_failure(self, code: int) -> None:
        """
        rrlb could not open a connection for want of a local resource (see
        L{rrlb.failures}): not the node's fault, so neither its health nor
        its error count changes, and no other node is tried; the client
        gets rrlb's own 503. Out of descriptors, the idle pooled
        connections are closed, so that the next request finds one.
        """
        proxy = self.proxy
        proxy.local_errors.failed(code, f"a request to {self.node.url}")
        if code in DESCRIPTOR_ERRNOS:
            # Idle node connections are the descriptors rrlb can give back
            # (not for EADDRNOTAVAIL: closing them would only add ports in
            # TIME_WAIT).
            proxy.upstream.close_idle()
        request = self.request
        self._end(ok=False)
        # Counted and logged as rrlb's answer, not the node's.
        request.exchange = None
        request.pool_name = self.dest.name
        error_response(
            request,
            503,
            "no connection to a node can be opened now; try again shortly",
            [(b"Retry-After", b"1")],
        )

    def upstream_lost(self, reason: Failure, got_response: bool) -> None:
        self.proxy.upstream.unwatch(self)
        self.upstream = None
        if self.finished:
            return
        if got_response:
            if self.responded and not self.request.startedWriting:
                # The head is still with rrlb (it goes out with the first
                # body byte): the body failed before any of it, so the
                # client can have a 502 instead of a bare close.
                self.request.unregisterProducer()
                self._bad_gateway(reason)
                return
            if self.responded:
                # The node dropped mid-body: never fake a complete response.
                log.warn(
                    "node {node} dropped the connection mid-response to {method} {uri}: {why}",
                    node=self.node.url,
                    method=_text(self.request.method),
                    uri=_text(self.request.uri),
                    why=describe_failure(reason),
                )
                self._end(ok=False)
                # The channel, not its transport: a transport with a paused
                # producer (the channel, when the client is slow) would never
                # close.
                self.request.channel.loseConnection()
                return
            self._bad_gateway(reason)
            return
        if self.stale_retry:
            # A pooled connection that closed with no answer. One the node had
            # closed before we wrote is caught before sending (any method
            # then takes a fresh connection, see UpstreamPool._reusable); here
            # the request went out, and the node may have acted on it, so
            # only an idempotent one is sent again, on a fresh connection.
            self.stale_retry = False
            if self.request.method in IDEMPOTENT and self.replayable():
                self.connector = self.proxy.upstream.acquire(self.node, self, fresh=True)
                return
            # Not a sign the node is down: a keep-alive close raced the request.
            self._failed(reason, passive=False)
            return
        self._failed(reason, passive=True)

    def replayable(self) -> bool:
        """
        Whether the request can be sent again: it has no body, or its body
        still fits in what rrlb keeps of it (see L{rrlb.body}).
        """
        body = self.body
        return body is None or body.replayable

    def _failed(self, reason: Failure, passive: bool) -> None:
        """
        Nothing of a response came: mark the node, retry elsewhere if the
        method allows it, else answer 502.
        """
        node = self.node
        proxy = self.proxy
        pool = self.dest.pool
        why = describe_failure(reason)
        node.errors += 1
        if passive:
            pool.mark(node, False, f"request failed: {why}")
        if (
            self.request.method in IDEMPOTENT
            and self.retries < proxy.settings.retries
            and self.replayable()
        ):
            other = pool.pick_other(self.tried)
            # A request holds one place in the retry budget from its first
            # retry until it ends, however many nodes it tries.
            if other is not None and not self.retries:
                if not proxy.budget.try_start(proxy.in_flight()):
                    log.info(
                        "not retrying {method} {uri}: the retry budget is spent",
                        method=_text(self.request.method),
                        uri=_text(self.request.uri),
                    )
                    other = None
            if other is not None:
                log.info(
                    "retrying {method} {uri} on {other}: {node} failed: {why}",
                    method=_text(self.request.method),
                    uri=_text(self.request.uri),
                    other=other.url,
                    node=node.url,
                    why=why,
                )
                node.in_flight -= 1
                self.retries += 1
                proxy.stats.retries += 1
                self.tried.append(other)
                self.node = other
                try:
                    self.start()
                except Exception:
                    # Say, no TLS context for the other node: answer, do not hang.
                    log.failure("retrying on {node}", node=other.url)
                    self._end(ok=False)
                    error_response(self.request, 502, "the upstream node failed")
                queue = self.dest.queue
                if queue.waiting:
                    # The failed node has a free slot now.
                    queue.dispatch()
                return
        log.info(
            "{node} failed for {method} {uri}: {why}",
            node=node.url,
            method=_text(self.request.method),
            uri=_text(self.request.uri),
            why=why,
        )
        self._end(ok=False)
        error_response(self.request, 502, f"the upstream node failed ({why})")

    def _bad_gateway(self, reason: Failure) -> None:
        why = describe_failure(reason)
        log.warn("bad response from {node}: {why}", node=self.node.url, why=why)
        self.node.errors += 1
        # A node that answers with what HTTP does not allow is failing, as
        # HAProxy's observe layer7 counts it (passive health).
        self.dest.pool.mark(self.node, False, f"bad response: {why}")
        self._end(ok=False)
        error_response(self.request, 502, f"the upstream node sent a bad response ({why})")

    def response_head(
        self, code: int, reason: bytes, headers: dict[bytes, list[bytes]], has_body: bool
    ) -> None:
        request = self.request
        body = self.body
        if body is not None and body.expect_continue:
            body.no_continue()
        self.upstream_status = code
        self.upstream_time = self.proxy.clock.seconds() - self.started
        pool = self.dest.pool
        if pool.latency_aware:
            pool.observe(self.node, self.upstream_time)
        if client_gone(request):
            return
        self.responded = True
        if pool.sticky is not None:
            cookie = pool.sticky_header(request, self.node)
            if cookie is not None:
                headers.setdefault(b"Set-Cookie", []).append(cookie)
        request.setResponseCode(code, reason)
        if b"Date" not in headers:
            headers[b"Date"] = [self.proxy.date()]
        # The upstream parser already keyed the headers by canonical name and
        # refused CR, LF and NUL, which is what Headers.addRawHeader checks:
        # hand the dict over whole instead of re-adding it value by value.
        response_headers = request.responseHeaders
        closing = raw_headers(response_headers).get(b"Connection")
        if closing is not None:
            # Twisted's own "Connection: close" for a client that asked for it.
            headers[b"Connection"] = closing
        set_raw_headers(response_headers, headers)
        if has_body:
            request.registerProducer(self, True)

    def switched(
        self, protocol: UpstreamProtocol, reason: bytes, headers: dict[bytes, list[bytes]]
    ) -> None:
        """
        The node answered 101 to an upgrade: pass the 101 on, and copy bytes
        both ways from now on (L{rrlb.tunnel}).
        """
        proxy = self.proxy
        proxy.upstream.unwatch(self)
        request = self.request
        self.upstream_status = 101
        self.upstream_time = proxy.clock.seconds() - self.started
        self.responded = True
        request.code = 101
        request.code_message = reason
        request.startedWriting = True
        channel = request.channel
        buffered = channel.start_tunnel(switching_head(reason, headers))
        tunnel = self.tunnel = Tunnel(
            self, channel, protocol, proxy.clock, proxy.settings.tunnel_timeout, proxy.stats
        )
        channel.dataReceived = tunnel.from_client
        protocol.tunnel = tunnel
        if buffered:
            tunnel.from_client(buffered)

    def tunnel_closed(self) -> None:
        """
        The tunnel ended (either side closed, or it was idle too long).
        """
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.close()
        self.upstream = None
        if not self.finished:
            self._end(ok=True)

    def response_body(self, data: bytes) -> None:
        self.request.write(data)

    def response_done(self) -> None:
        self.proxy.upstream.unwatch(self)
        self.upstream = None
        if self.finished:
            return
        request = self.request
        self._end(ok=True)
        if request.producer is not None:
            request.unregisterProducer()
        if not client_gone(request):
            request.finish()

    def timed_out(self) -> None:
        body = self.body
        if body is not None and body.consumer is not None and not body.complete:
            if not body.node_full:
                # The node takes the body as fast as it comes: it is the
                # client that is slow, and the client body timeout is the
                # one that applies.
                self.proxy.upstream.watch(self)
                return
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.abort()
        if self.finished:
            return
        if self.paused:
            # The client stopped reading, not the node.
            log.info(
                "client stopped reading {method} {uri} for {timeout}s; closing it",
                method=_text(self.request.method),
                uri=_text(self.request.uri),
                timeout=self.proxy.upstream.send_timeout,
            )
            self._end(ok=False)
            self.request.channel.loseConnection()
            return
        node = self.node
        node.errors += 1
        log.warn(
            "{node} made no progress for {timeout}s on {method} {uri}",
            node=node.url,
            timeout=self.proxy.upstream.timeout,
            method=_text(self.request.method),
            uri=_text(self.request.uri),
        )
        if self.responded:
            self._end(ok=False)
            self.request.channel.loseConnection()
        else:
            self.dest.pool.mark(node, False, "response timed out")
            self._end(ok=False)
            error_response(self.request, 504, "the upstream node did not answer in time")

    def client_gone(self) -> None:
        """
        The client went away: cancel the upstream request and its connection.
        """
        if self.finished:
            return
        if self.tunnel is not None:
            self.tunnel_closed()
            return
        self._end(ok=False)
        self.proxy.upstream.unwatch(self)
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.abort()
        connector = self.connector
        self.connector = None
        if connector is not None:
            try:
                connector.stopConnecting()
            except Exception:
                pass

    def _end(self, ok: bool) -> None:
        self.finished = True
        self.node.in_flight -= 1
        proxy = self.proxy
        if self.retries:
            proxy.budget.ended()
        if proxy.on_done is not None:
            proxy.on_done(self, ok)
        queue = self.dest.queue
        if queue.waiting:
            # A slot is free: the oldest request queued for this pool takes it.
            queue.dispatch()

    # -- IPushProducer, for the client's channel ------------------------------

    def pauseProducing(self) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.pause_reading()
            # The node is not idle while we hold it back: --timeout does not
            # run until the client reads again, but a client that reads
            # nothing for UpstreamPool.send_timeout is closed (nginx's send_timeout), so
            # it cannot hold a node connection for ever.
            self.paused = True
            self.deadline = None

    def resumeProducing(self) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.resume_reading()
            self.paused = False
            self.deadline = None

    def stopProducing(self) -> None:
        self.client_gone()


class ProxyStats:
    """
    Process-wide counters the admin API reads.
    """

    def __init__(self) -> None:
        self.retries = 0
        self.tunnels_open = 0
        self.tunnel_bytes_to_node = 0
        self.tunnel_bytes_to_client = 0


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
        self.on_done: Optional[Callable[[ProxyExchange, bool], None]] = None
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
            dest = Destination(pool, RequestQueue(pool, self.clock), node_host, timeout)
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
            dest = route.target
        pool = dest.pool
        node = pool.pick(request)
        if node is None:
            request.pool_name = dest.name
            if pool.serving:
                # Every node in rotation is full: wait for a slot.
                self._wait_for_node(request, dest, route)
                return server.NOT_DONE_YET
            error_response(
                request,
                503,
                "no healthy node to send the request to",
                [(b"Retry-After", b"%d" % self.settings.retry_after)],
            )
            return server.NOT_DONE_YET
        self._forward(request, node, dest, route)
        return server.NOT_DONE_YET

    def _forward(
        self,
        request: Any,
        node: Node,
        dest: Optional[Destination] = None,
        route: Optional[Route[Destination]] = None,
    ) -> None:
        exchange = ProxyExchange(self, request, node, dest)
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
    _parsePOSTFormSubmission = False
    exchange: Optional[ProxyExchange] = None
    # The reason rrlb refused the request itself (see rrlb.parser), if it did.
    client_error: Optional[str] = None
    # The client behind trusted proxies (--trusted-proxies), if not the peer.
    real_client: Optional[str] = None
    # The body, streamed to the node as it arrives (None: no body).
    body: Optional[StreamedBody] = None
    # The pool of a request answered without a node (503, queue timeout).
    pool_name: Optional[str] = None

    channel: Any

    def __init__(self, channel: Any, *args: Any, **kw: Any) -> None:
        # What server.Request.__init__ sets, without asking the transport
        # for the peer and host addresses again for every request (the
        # channel has them); tests/test_twisted_private.py checks that this
        # still sets every attribute Twisted's own does.
        self.notifications = []
        self.channel = channel
        self.client = channel.peer
        self.host = channel.local
        self.requestHeaders = Headers()
        self.received_cookies = {}
        self.responseHeaders = Headers()
        self.cookies = []
        self.transport = channel.transport
        self.queued = False
        self._adapterCache = {}

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

    def processingFailed(self, reason: Failure) -> None:
        log.failure(
            "proxying {method} {uri}", reason, method=_text(self.method), uri=_text(self.uri)
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
        ClientSite.__init__(self, resource, reactor, limits)
        # Bodies are forwarded, never parsed as forms (ProxyRequest skips
        # Request.requestReceived's parsing; this is for any code path that
        # reads the Site's setting).
        self._parsePOSTFormSubmission = False
        self.access_log = access_log

    def log(self, request: Any) -> None:
        if self.access_log is not None:
            self.access_log(request)

    def acceptableProtocols(self) -> list[bytes]:
        return self.alpn
