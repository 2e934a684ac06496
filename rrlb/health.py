# -*- test-case-name: tests.test_health -*-
"""
Active health checks: every node is probed on its own timer, and the
outcome is fed to the pool; a probe that could not connect for want of a
local resource (L{rrlb.failures}) feeds it nothing. By C{health.type}:

 - C{http} (the default): C{GET <health path>} through a twisted.web agent
   (the body is read with treq); a 2xx or 3xx passes;
 - C{grpc}: C{grpc.health.v1.Health/Check} for C{health.service}, through
   rrlb's own HTTP/2 client (L{rrlb.h2upstream}) on a connection of its
   own; only C{SERVING} passes;
 - C{tcp}: a connection, and on an C{h2} pool the HTTP/2 preface and
   SETTINGS exchanged both ways.
"""

from __future__ import annotations

from typing import Any, Optional

import treq
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from rrlb import __version__
from rrlb._twisted import quiet_connection_pool
from rrlb.failures import LocalErrors, describe_failure, exhausted_now, local_errno
from rrlb.grpcwire import (
    HEALTH_CHECK_PATH,
    SERVING,
    health_request,
    health_status,
)
from rrlb.pool import Node, Pool
from rrlb.settings import HealthConfig

USER_AGENT = f"rrlb-health/{__version__}".encode("ascii")


# A connection pool whose connections do not log their start and stop: with
# a probe every few seconds per node they would flood the log.
QuietConnectionPool = quiet_connection_pool


class HealthChecker(Service):
    """
    Probes each node of a L{Pool} every C{interval} seconds and marks it.

    Each node has its own L{LoopingCall}, so probes of one node never
    overlap (the loop waits for the probe's Deferred) and a slow node never
    delays the others. The first round runs at start-up.
    """

    log = Logger()

    def __init__(
        self,
        pool: Pool,
        health: HealthConfig,
        reactor: IReactorTime,
        agent: IAgent,
        local_errors: Optional[LocalErrors] = None,
        protocol: str = "http1",
        tls_policy: Any = None,
    ) -> None:
        self.pool = pool
        self.health = health
        self.reactor = reactor
        self._agent = agent
        # The pool's protocol to its nodes, and what grpc and tcp probes
        # connect with (made on first use).
        self.protocol = protocol
        self.tls_policy = tls_policy
        self._h2: Any = None
        self.local_errors = LocalErrors(reactor) if local_errors is None else local_errors
        self._loops: dict[str, tuple[Node, LoopingCall]] = {}
        self._probes: dict[str, defer.Deferred[Any]] = {}
        # ((pool, node key), passed) -> probes, for the metrics.
        self.results: dict[tuple[tuple[str, str], bool], int] = {}

    def startService(self) -> None:
        super().startService()
        self.sync()

    def stopService(self) -> Optional[defer.Deferred[None]]:
        super().stopService()
        for _, loop in self._loops.values():
            if loop.running:
                loop.stop()
        self._loops.clear()
        for d in list(self._probes.values()):
            d.cancel()
        if self._h2 is not None:
            self._h2.close()
        return None

    def update(self, health: HealthConfig) -> None:
        """
        Take new health settings; a changed interval restarts every timer.
        """
        restart = health.interval != self.health.interval
        self.health = health
        self.pool.set_thresholds(health.rise, health.fall)
        if restart:
            for _, loop in self._loops.values():
                if loop.running:
                    loop.stop()
            self._loops.clear()
        self.sync()

    def sync(self) -> None:
        """
        Start timers for nodes the pool has gained, stop those of nodes it lost.
        """
        if not self.running:
            return
        current = {n.key: n for n in self.pool.nodes}
        for key in list(self._loops):
            node, loop = self._loops[key]
            if current.get(key) is not node:
                if loop.running:
                    loop.stop()
                del self._loops[key]
        for key, node in current.items():
            if key not in self._loops:
                loop = LoopingCall(self.probe, node)
                loop.clock = self.reactor
                self._loops[key] = (node, loop)
                pending = self._probes.get(key)
                if pending is None:
                    self._start_loop(loop, node, now=True)
                else:
                    # A probe from before the timers restarted is still out:
                    # start the new timer when it ends, so probes never overlap.
                    pending.addBoth(self._start_after_probe, loop, node)

    def _start_loop(self, loop: LoopingCall, node: Node, now: bool) -> None:
        loop.start(self.health.interval, now=now).addErrback(self._loop_died, node)

    def _start_after_probe(self, result: Any, loop: LoopingCall, node: Node) -> Any:
        current = self._loops.get(node.key)
        if self.running and current is not None and current[1] is loop and not loop.running:
            self._start_loop(loop, node, now=False)
        return result

    def _loop_died(self, reason: Failure, node: Node) -> None:
        # probe() never fails, so this is a bug; say so rather than go quiet.
        self.log.failure("health check loop for {node} stopped", reason, node=node.url)

    def url_for(self, node: Node) -> bytes:
        # Built from the node's parts and sent through the agent as is:
        # treq's URL parsing (hyperlink) refuses host names that networks do
        # use, such as "web_1", and would raise out of the timer.
        return b"".join(
            (
                node.scheme.encode("ascii"),
                b"://",
                node.host_header,
                node.base_path,
                self.health.path.encode("ascii"),
            )
        )

    def _http(self, node: Node) -> defer.Deferred[tuple[bool, str]]:
        d = defer.maybeDeferred(
            self._agent.request,
            b"GET",
            self.url_for(node),
            Headers({b"User-Agent": [USER_AGENT]}),
            None,
        )

        def read(response: Any) -> defer.Deferred[tuple[bool, str]]:
            code = response.code
            return treq.collect(response, lambda data: None).addCallback(
                lambda _: (200 <= code < 400, f"HTTP {code}")
            )

        return d.addCallback(read)

    def _h2_pool(self) -> Any:
        if self._h2 is None:
            from rrlb.h2upstream import H2UpstreamPool

            policy = self.tls_policy

            def creator(node: Node) -> Any:
                if policy is None:
                    return None
                return policy.creatorForNetloc(node.host.encode("idna"), node.port)

            self._h2 = H2UpstreamPool(self.reactor, self.health.timeout, tls_creator=creator)
        return self._h2

    def _grpc(self, node: Node) -> defer.Deferred[tuple[bool, str]]:
        h2 = self._h2_pool()
        connection = h2.connect(node)
        h2.forget(connection)
        # Closed once the probe's stream ends: a probe per connection.
        connection.going_away = True
        check = _GrpcCheck(node, self.health.service)
        d: defer.Deferred[tuple[bool, str]] = defer.Deferred(lambda _: h2.abort(connection))
        check.done = d
        connection.take(check)
        return d

    def _tcp(self, node: Node) -> defer.Deferred[tuple[bool, str]]:
        if self.protocol == "h2":
            return self._h2_pool().handshake(node).addCallback(
                lambda _: (True, "HTTP/2 SETTINGS exchanged")
            )
        from twisted.internet.endpoints import HostnameEndpoint
        from twisted.internet.protocol import Factory, Protocol

        endpoint = HostnameEndpoint(self.reactor, node.host, node.port, self.health.timeout)

        def connected(protocol: Any) -> tuple[bool, str]:
            protocol.transport.abortConnection()
            return True, "TCP connection made"

        return endpoint.connect(Factory.forProtocol(Protocol)).addCallback(connected)

    def probe(self, node: Node) -> defer.Deferred[Any]:
        """
        Probe C{node} once and mark it. The returned Deferred never fails.
        """
        started = self.reactor.seconds()
        health = self.health
        kind = health.type
        if kind == "grpc":
            d = self._grpc(node)
        elif kind == "tcp":
            d = self._tcp(node)
        else:
            d = self._http(node)
        d.addTimeout(health.timeout, self.reactor)
        self._probes[node.key] = d

        def done(result: Any) -> None:
            if self._probes.get(node.key) is d:
                del self._probes[node.key]
            if not self.running:
                # Cancelled by stopService: says nothing about the node.
                return
            now = self.reactor.seconds()
            latency = now - started
            if isinstance(result, Failure):
                # A probe that failed while rrlb cannot open a socket says
                # nothing of the node, whatever the failure looks like (a
                # name lookup that failed, or hung until the timeout): see
                # rrlb.failures.
                code = local_errno(result) or exhausted_now()
                if code is not None:
                    self.local_errors.failed(code, f"a health check of {node.url}")
                    return
                if result.check(defer.TimeoutError, defer.CancelledError):
                    reason = f"timed out after {health.timeout:g}s"
                else:
                    reason = describe_failure(result)
                ok = False
            else:
                ok, reason = result
            if node.removed:
                return
            counted = (node.label, ok)
            self.results[counted] = self.results.get(counted, 0) + 1
            self.pool.mark(node, ok, reason, when=now, latency=latency)

        d.addBoth(done)
        d.addErrback(
            lambda f: self.log.failure("recording a health check of {node}", f, node=node.url)
        )
        return d


class _GrpcCheck:
    """
    One C{grpc.health.v1.Health/Check} call, as the exchange of a stream of
    L{rrlb.h2upstream}: its outcome fires C{done} with (passed, why).
    """

    # Bytes of an answer read at most (a HealthCheckResponse is a few).
    MAX_BODY = 4096
    active = False

    def __init__(self, node: Node, service: str) -> None:
        self.node = node
        self.service = service
        self.done: Optional[defer.Deferred[tuple[bool, str]]] = None
        self.code = 0
        self.status: Optional[bytes] = None
        self.message = b""
        self.body = b""
        self.stream: Any = None

    def connected(self, stream: Any, reused: bool) -> None:
        node = self.node
        self.stream = stream
        stream.send(
            self,
            [
                (b":method", b"POST"),
                (b":scheme", b"https" if node.scheme == "https" else b"http"),
                (b":authority", node.host_header),
                (b":path", node.base_path + HEALTH_CHECK_PATH),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                (b"user-agent", USER_AGENT),
            ],
            health_request(self.service),
        )

    def connect_failed(self, reason: Failure, shared: bool = False) -> None:
        self._fire(reason)

    def upstream_lost(self, reason: Failure, got_response: bool) -> None:
        self._fire(reason)

    def response_head(
        self, code: int, reason: bytes, headers: dict[bytes, list[bytes]], has_body: bool
    ) -> None:
        self.code = code
        self._take(headers.get(b"Grpc-Status"), headers.get(b"Grpc-Message"))

    def response_body(self, data: bytes) -> None:
        self.body += data
        if len(self.body) > self.MAX_BODY:
            stream, self.stream = self.stream, None
            if stream is not None:
                stream.abort()
            self._fire((False, "the health answer is too large"))

    def response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        values = dict(trailers)
        status = values.get(b"grpc-status")
        self._take([status] if status is not None else None, [values.get(b"grpc-message", b"")])

    def _take(self, status: Optional[list[bytes]], message: Optional[list[bytes]]) -> None:
        if status:
            self.status = status[0]
            self.message = (message or [b""])[0]

    def response_done(self) -> None:
        if self.code != 200:
            self._fire((False, f"HTTP {self.code}"))
        elif self.status != b"0":
            status = "none" if self.status is None else self.status.decode("ascii", "replace")
            text = self.message[:100].decode("ascii", "replace")
            self._fire((False, f"gRPC status {status}{': ' + text if text else ''}"))
        else:
            serving = health_status(self.body)
            if serving == SERVING:
                self._fire((True, "SERVING"))
            else:
                self._fire((False, _SERVING_NAMES.get(serving, f"status {serving}")))

    def _fire(self, result: Any) -> None:
        done, self.done = self.done, None
        if done is not None and not done.called:  # (called: cancelled at its timeout)
            if isinstance(result, Failure):
                done.errback(result)
            else:
                done.callback(result)


_SERVING_NAMES = {0: "UNKNOWN", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN", None: "not a health answer"}
