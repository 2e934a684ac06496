# -*- test-case-name: tests.test_grpc,tests.test_h2upstream -*-
"""
A request to a C{protocol: h2} pool (L{H2Exchange}): the exchange of
L{rrlb.exchange}, over a stream of L{rrlb.h2upstream} instead of an
HTTP/1.1 connection.

What differs from HTTP/1.1:
 - the head goes as HTTP/2 fields: the same rewrite (hop-by-hop headers
   out, C{X-Forwarded-*}, C{Via}), lower-cased, with pseudo-headers first;
   C{te: trailers} goes on when the client sent it (gRPC needs it);
 - the node's trailers reach an HTTP/2 client (C{request.write_trailers});
 - a stream the node did not process (C{REFUSED_STREAM}, above its
   GOAWAY's last stream ID) or a connection that could not be made is
   sent again whatever its method (RFC 9113 8.7), within C{--retries} and
   the budget;
 - a gRPC call's C{grpc-timeout} goes to the node as received, and bounds
   rrlb's own wait: past it the client gets C{DEADLINE_EXCEEDED}.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.python.failure import Failure
from twisted.web import http

from rrlb._twisted import client_gone
from rrlb.body import KEEP
from rrlb.exchange import ProxyExchange, log
from rrlb.failures import log_text
from rrlb.grpcwire import DEADLINE_EXCEEDED, grpc_request, message_value, parse_timeout
from rrlb.h2upstream import Unprocessed
from rrlb.http1 import error_response

# Lines of the rewritten HTTP/1.1 head that have no place in HTTP/2: the
# framing (HTTP/2 frames the body itself) and the upgrade.
_NOT_H2 = frozenset({b"transfer-encoding", b"expect", b"connection", b"upgrade"})


class H2Exchange(ProxyExchange):
    """
    One client request on its way to a node over HTTP/2, and back.
    """

    __slots__ = ("fields", "trailers", "grpc", "deadline_call")

    def prepare(self) -> bool:
        if not ProxyExchange.prepare(self):
            return False
        request = self.request
        fields = []
        for line in self.head_tail.split(b"\r\n"):
            name, sep, value = line.partition(b": ")
            if sep:
                name = name.lower()
                if name not in _NOT_H2:
                    fields.append((name, value))
        te = request.requestHeaders.getRawHeaders(b"te")
        if te and any(b"trailers" in v.lower() for v in te):
            fields.append((b"te", b"trailers"))
        self.fields = fields
        self.trailers: Optional[list[tuple[bytes, bytes]]] = None
        self.deadline_call: Any = None
        self.upgrade = False
        self.grpc = grpc = grpc_request(request)
        if grpc:
            timeout = request.requestHeaders.getRawHeaders(b"grpc-timeout")
            seconds = parse_timeout(timeout[0]) if timeout else None
            if seconds is not None:
                # rrlb's wait is the smaller of it and --timeout (the sweep's).
                self.deadline_call = self.proxy.clock.callLater(seconds, self._deadline)
        body = self.body
        if body is not None and body.expect_continue:
            # The node is not asked: the client goes on at once.
            self.expect = False
            body.go_on()
        return True

    def connections(self) -> Any:
        return self.proxy.h2

    def connected(self, stream: Any, reused: bool) -> None:
        self.connector = None
        if self.finished:
            stream.abort()
            return
        self.upstream = stream
        self.stale_retry = False
        node = self.node
        request = self.request
        host = node.host_header if (self.dest.node_host or self.host is None) else self.host
        target = self.target
        headers = [
            (b":method", request.method),
            (b":scheme", b"https" if node.scheme == "https" else b"http"),
            (b":authority", host),
            (b":path", node.base_path + target if target != b"*" else target),
            *self.fields,
        ]
        body = self.body
        if body is not None and body.complete:
            if body.received > KEEP:
                body.spent = True
            body = body.buffered()
        stream.send(self, headers, body, request.method == b"HEAD")
        if self.upstream is stream:
            self.proxy.upstream.watch(self)

    def connect_failed(self, reason: Failure, shared: bool = False) -> None:
        """
        No connection to the node could be made: nothing was sent, so any
        method may go to another node. C{shared}: the request only waited
        for a connection another one asked for (a burst of requests, a
        node gone after its GOAWAY); that one counts the failure and the
        retry, this one is sent to another node as if first picked there.
        """
        if self._connect_over(reason):
            return
        if shared:
            other = self.dest.pool.pick_other(self.tried)
            if other is not None:
                self.node.in_flight -= 1
                self.tried.append(other)
                self.node = other
                self.start()
                return
        self._failed(reason, passive=not shared, unprocessed=True)

    def upstream_lost(self, reason: Failure, got_response: bool) -> None:
        if not got_response and reason.check(Unprocessed) and not self.finished:
            self.proxy.upstream.unwatch(self)
            self.upstream = None
            self._failed(reason, passive=False, unprocessed=True)
            return
        ProxyExchange.upstream_lost(self, reason, got_response)

    def response_head(
        self, code: int, reason: bytes, headers: dict[bytes, list[bytes]], has_body: bool
    ) -> None:
        ProxyExchange.response_head(self, code, http.RESPONSES.get(code, b""), headers, has_body)
        if self.grpc and has_body and self.responded:
            # A gRPC client may wait for the response head before it sends
            # (bidirectional streaming): it goes out now, not with the
            # first message.
            request = self.request
            request.write(b"")
            request.channel.write(b"")

    def response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.trailers = trailers

    def response_done(self) -> None:
        trailers = self.trailers
        request = self.request
        if trailers and not self.finished and not client_gone(request):
            write_trailers = getattr(request, "write_trailers", None)
            if write_trailers is not None:
                write_trailers(trailers)
        ProxyExchange.response_done(self)

    def _deadline(self) -> None:
        """
        The call's C{grpc-timeout} passed: the client's own deadline is
        over, so the node's stream is reset and the client told so.
        """
        self.deadline_call = None
        if self.finished:
            return
        self.let_go()
        request = self.request
        log.info(
            "{method} {uri}: its grpc-timeout passed",
            method=log_text(request.method),
            uri=log_text(request.uri),
        )
        if not self.responded:
            self._end(ok=False)
            error_response(request, 504, "deadline exceeded", grpc_status=DEADLINE_EXCEEDED)
            return
        self._end(ok=False)
        write_trailers = getattr(request, "write_trailers", None)
        if write_trailers is None or client_gone(request):
            request.channel.loseConnection()
            return
        if request.producer is not None:
            request.unregisterProducer()
        write_trailers(
            [
                (b"grpc-status", b"%d" % DEADLINE_EXCEEDED),
                (b"grpc-message", message_value("deadline exceeded")),
            ]
        )
        request.finish()

    def _end(self, ok: bool) -> None:
        call = self.deadline_call
        if call is not None:
            self.deadline_call = None
            if call.active():
                call.cancel()
        ProxyExchange._end(self, ok)
