# -*- test-case-name: tests.test_proxy,tests.test_wire -*-
"""
One client request on its way to a node and back (L{ProxyExchange}): the
upstream request built once, the node's connection from the upstream
client, the response streamed back with backpressure both ways, retries of
idempotent requests on other nodes, tunnels after a 101, and the failures
mapped to 502/503/504. L{rrlb.proxy.RotatingProxy} picks the node and
starts it.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rrlb._twisted import client_gone, raw_headers, set_raw_headers
from rrlb.body import KEEP
from rrlb.destination import Destination
from rrlb.failures import DESCRIPTOR_ERRNOS, describe_failure, local_errno, log_text
from rrlb.http1 import error_response, rewrite_request_head, split_target, switching_head
from rrlb.nodeconn import UpstreamProtocol
from rrlb.pool import Node
from rrlb.proxyproto import proxy_header
from rrlb.tunnel import Tunnel

log = Logger()

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


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
        self, proxy: Any, request: Any, node: Node, dest: Optional[Destination] = None
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
        raw = raw_headers(request.requestHeaders)  # one pass over the dict Headers keeps
        if authority is None:
            host_values = raw.get(b"Host")
            authority = host_values[0] if host_values else None
        self.host = authority
        channel = request.channel
        body = request.body
        self.head_tail, upgrade, self.expect = rewrite_request_head(
            raw,
            request.method,
            body,
            authority,
            channel.forwarded,
            channel.edge,
            request.clientproto,
            channel.client_cert,
        )
        self.upgrade = upgrade is not None
        self.body = body
        return True

    def interim_continue(self) -> None:
        """The node answered C{Expect: 100-continue} with 100 Continue."""
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

    def connections(self) -> Any:
        """
        Where the node's connections come from: the HTTP/1.1 pool
        (L{rrlb.h2exchange.H2Exchange}: the HTTP/2 one).
        """
        return self.proxy.upstream

    def start(self) -> None:
        node = self.node
        node.in_flight += 1
        node.requests += 1
        self.connector = self.connections().acquire(node, self)

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
        if not self._connect_over(reason):
            self._failed(reason, passive=True)

    def _connect_over(self, reason: Failure) -> bool:
        """
        The attempt to connect failed: forget it, and say whether nothing
        more is to be done, because the request ended meanwhile or the
        failure was rrlb's own (out of descriptors, answered here).
        """
        self.connector = None
        if self.finished:
            return True
        code = local_errno(reason)
        if code is not None:
            self._local_failure(code)
            return True
        return False

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
                    method=log_text(self.request.method),
                    uri=log_text(self.request.uri),
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

    def _failed(self, reason: Failure, passive: bool, unprocessed: bool = False) -> None:
        """
        Nothing of a response came: mark the node, retry elsewhere if the
        method allows it (any method if the node did not process the
        request: C{unprocessed}), else answer 502.
        """
        node = self.node
        proxy = self.proxy
        pool = self.dest.pool
        why = describe_failure(reason)
        node.errors += 1
        if passive:
            pool.mark(node, False, f"request failed: {why}")
        if (
            (unprocessed or self.request.method in IDEMPOTENT)
            and self.retries < proxy.settings.retries
            and self.replayable()
        ):
            other = pool.pick_other(self.tried)
            if other is None and unprocessed and not passive and node.in_rotation:
                # Refused or turned away by a GOAWAY, not failing: a fresh
                # connection to the same node may take it.
                other = node
            # A request holds one place in the retry budget from its first
            # retry until it ends, however many nodes it tries.
            if other is not None and not self.retries:
                if not proxy.budget.try_start(proxy.in_flight()):
                    log.info(
                        "not retrying {method} {uri}: the retry budget is spent",
                        method=log_text(self.request.method),
                        uri=log_text(self.request.uri),
                    )
                    other = None
            if other is not None:
                log.info(
                    "retrying {method} {uri} on {other}: {node} failed: {why}",
                    method=log_text(self.request.method),
                    uri=log_text(self.request.uri),
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
            method=log_text(self.request.method),
            uri=log_text(self.request.uri),
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
        # The upstream parser keyed the headers by canonical name and refused
        # CR, LF and NUL (Headers.addRawHeader's checks): hand the dict over.
        response_headers = request.responseHeaders
        closing = raw_headers(response_headers).get(b"Connection")
        if closing is not None:  # Twisted's "Connection: close" for a client that asked
            headers[b"Connection"] = closing
        set_raw_headers(response_headers, headers)
        hook = request.response_hook  # response filters (rrlb.chain)
        if hook is not None and not hook(request, code):
            return  # one failed: the client got rrlb's 500 instead
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
        hook = request.response_hook  # response filters (rrlb.chain)
        if hook is not None:
            response_headers = request.responseHeaders
            set_raw_headers(response_headers, headers)
            if not hook(request, 101):
                return  # one failed: the node is let go, the client got rrlb's 500
            headers = raw_headers(response_headers)
        self.responded = True
        request.code = 101
        request.code_message = reason
        request.startedWriting = True
        channel = request.channel
        buffered = channel.start_tunnel(switching_head(reason, headers))
        tunnel = self.tunnel = Tunnel(
            self, channel, protocol, proxy.clock, proxy.settings.tunnel_timeout, proxy.stats
        )
        channel.tunnel_reader = tunnel.from_client
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
                method=log_text(self.request.method),
                uri=log_text(self.request.uri),
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
            method=log_text(self.request.method),
            uri=log_text(self.request.uri),
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
        self.let_go()

    def let_go(self) -> None:
        """
        Stop watching for progress and give up the node: abort its request
        (and its connection), or stop connecting to it.
        """
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
                pass  # it connected or failed meanwhile: nothing to stop

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
