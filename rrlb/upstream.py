# -*- test-case-name: tests.test_upstream -*-
"""
A lean HTTP/1.1 client for talking to nodes, with a keep-alive connection
pool per node.

Why not L{twisted.web.client.Agent}: per request it builds a Request, a
Response, two Headers objects, a body producer and a chain of Deferreds, which
costs more CPU than the whole server side of a proxied request. This client
does one write for the request head, parses the response head with a few
C{bytes} splits and hands the body straight to its L{Exchange}-like consumer,
with callbacks instead of Deferreds.

The consumer (an I{exchange}) provides::

    connected(protocol, reused)          a connection is ready for the request
    connect_failed(reason)               connecting failed
    response_head(code, reason, headers, has_body)
    response_body(data)
    response_done()
    upstream_lost(reason, got_response)  the connection ended early
    timed_out(got_response)              no progress within the timeout
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Optional

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from rrlb._twisted import HeaderNameError, canonical_name, name_cache
from rrlb.http1 import HOP_BY_HOP_NAMES, NOT_DROPPED_BY_CONNECTION, canonical, connection_tokens
from rrlb.parser import HEAD_BYTES, ChunkedDecoder

MAX_HEAD_SIZE = 65536
READ_SIZE = 256 * 1024
SEND_TIMEOUT = 60.0
# How long idle connections beyond --max-idle-per-node may stay open.
IDLE_TRIM_DELAY = 1.0
# Request bodies up to this size go out in the same write as the head.
INLINE_BODY_SIZE = 65536
# A node that sends bytes after its responses is logged at most this often.
STRAY_LOG_INTERVAL = 60.0
# Header lines in a response at most, unless told (--max-headers).
MAX_HEADERS = 100

_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _IDLE, _TUNNEL = range(6)


class BadResponse(Exception):
    """
    The node sent something that is not an HTTP/1.x response.
    """


def parse_head(
    block: bytes, max_headers: int = MAX_HEADERS
) -> tuple[bytes, int, bytes, dict[bytes, list[bytes]]]:
    """
    Split a response head (without its blank line) into version, code,
    reason and the headers, keyed by Twisted's canonical names with every
    value in order: the shape L{Headers} keeps, so the proxy can hand it on
    without another pass.

    @raise BadResponse: for anything that is not a well-formed HTTP/1.x head,
        including a bare CR or LF that could split a header downstream, any
        other control byte but HTAB (NUL, ESC, VT, DEL...: the request
        head's rule, L{rrlb.parser}), and more than C{max_headers} lines.
    """
    if block.translate(None, HEAD_BYTES):
        raise BadResponse("control byte in the response head")
    crlf = block.count(b"\r\n")
    if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
        raise BadResponse("stray CR or LF in the response head")
    if crlf > max_headers:
        raise BadResponse(f"more than {max_headers} header lines")
    lines = block.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    version = status[0]
    if (
        len(status) < 2
        or len(version) != 8
        or not version.startswith(b"HTTP/1.")
        or not version[7:].isdigit()
        or len(status[1]) != 3
        or not status[1].isdigit()
        or not 100 <= int(status[1]) <= 599
    ):
        raise BadResponse(f"bad status line {lines[0][:80]!r}")
    code = int(status[1])
    reason = status[2] if len(status) == 3 else b""
    headers: dict[bytes, list[bytes]] = {}
    names = name_cache()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise BadResponse(f"bad header line {line[:80]!r}")
        key = names.get(name)
        if key is None:
            try:
                # Rejects names that are not tokens, which also catches
                # obs-fold continuation lines.
                key = canonical_name(name)
            except HeaderNameError:
                raise BadResponse(f"bad header line {line[:80]!r}") from None
        values = headers.get(key)
        if values is None:
            headers[key] = [value.strip(b" \t")]
        else:
            values.append(value.strip(b" \t"))
    return version, code, reason, headers


class UpstreamProtocol(Protocol):
    """
    One connection to one node, carrying one request at a time.
    """

    log = Logger()
    # A TCP or TLS transport: it has abortConnection and the producer methods.
    transport: Any

    def __init__(self, pool: UpstreamPool, key: str) -> None:
        self.pool = pool
        self.key = key
        self.exchange: Any = None
        self.idle = False
        self._state = _IDLE
        self._buffer = b""
        self._remaining = 0
        self._decoder: Optional[ChunkedDecoder] = None
        self._keep_alive = True
        self._got_response = False
        self._head_request = False
        # The request asked Expect: 100-continue, and no 100 came yet.
        self._expect = False
        # The tunnel this connection carries after a 101 (rrlb.tunnel).
        self.tunnel: Any = None
        # The request body still streaming to the node, if any.
        self._body: Any = None
        self._chunked_body = False
        self._producing = False
        self.paused = False
        self.idle_round = 0
        self.requests = 0
        # The PROXY header this connection began with (send_proxy): it is
        # pooled for requests of that client connection only.
        self.proxy_header: Optional[bytes] = None

    # -- sending --------------------------------------------------------------

    def send(
        self, exchange: Any, head: bytes, body: Any, head_request: bool, expect: bool = False
    ) -> None:
        """
        Send a request: C{head} is the request line and header block; C{body}
        is L{None}, C{bytes}, or a L{rrlb.body.StreamedBody} whose bytes
        follow as the client sends them. C{expect}: the head asks
        C{Expect: 100-continue}.
        """
        self.exchange = exchange
        self._state = _HEAD
        self._buffer = b""
        self._got_response = False
        self._head_request = head_request
        self._expect = expect
        self.requests += 1
        if body is None:
            self.transport.write(head)
        elif isinstance(body, bytes):
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self._chunked_body = body.chunked
            self._body = body
            body.attach(self)

    # -- the streamed body's consumer (rrlb.body) ---------------------------------

    def body_data(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            # Bytes the node takes are progress (see UpstreamPool._sweep).
            exchange.active = True
        if self._chunked_body:
            self.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.transport.write(data)

    def body_end(self) -> None:
        self._body = None
        if self._chunked_body:
            self.transport.write(b"0\r\n\r\n")

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producing = True
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()

    def _stop_body(self) -> None:
        """
        Take no more of the request body (the node answered, or the request
        was dropped): the connection cannot carry another request.
        """
        body = self._body
        if body is not None:
            self._body = None
            self._keep_alive = False
            body.detach(self)

    # -- receiving ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes nobody asked for: the connection is not safe to reuse.
            self.pool.stray(self)
            self.pool._forget_idle(self)
            self.transport.abortConnection()
            return
        state = self._state
        if state != _HEAD:
            # Progress for the silence timeout between body chunks. Bytes of
            # a head are not: --timeout bounds the wait for the whole head,
            # or a node sending a byte a second could hold it for ever.
            exchange.active = True
        if state == _LENGTH:
            remaining = self._remaining - len(data)
            if remaining > 0:
                self._remaining = remaining
                exchange.response_body(data)
                return
            if remaining < 0:
                # More than the node announced: keep what was announced.
                data = data[: self._remaining]
                self._after_response()
            self._remaining = 0
            if data:
                exchange.response_body(data)
            self._done()
        elif state == _HEAD:
            self._buffer += data
            self._head_received()
        elif state == _CHUNKED:
            try:
                self._decoder.feed(data)  # type: ignore[union-attr]
            except Exception as e:
                self._protocol_error(f"bad chunked body: {e}")
        elif state == _UNTIL_CLOSE:
            exchange.response_body(data)
        elif state == _TUNNEL:
            self.tunnel.from_node(data)
        else:
            self.transport.loseConnection()

    def _head_received(self) -> None:
        while True:
            buffer = self._buffer
            end = buffer.find(b"\r\n\r\n")
            if end < 0 or end > MAX_HEAD_SIZE:
                # The limit holds however the head arrives: in pieces, or
                # complete in one read of up to READ_SIZE bytes.
                if end > MAX_HEAD_SIZE or len(buffer) > MAX_HEAD_SIZE:
                    self._protocol_error("response head too large")
                return
            self._got_response = True
            try:
                version, code, reason, raw = parse_head(buffer[:end], self.pool.max_headers)
            except BadResponse as e:
                self._protocol_error(str(e))
                return
            self._buffer = buffer[end + 4 :]
            if 100 <= code < 200:
                if code == 101:
                    self._switched(reason, raw)
                    return
                # An interim response: a 100 Continue tells a client waiting
                # on Expect to send its body (rrlb.body); others (103 Early
                # Hints) are not passed on. Then wait for the final one.
                if code == 100:
                    self._expect = False
                    interim = getattr(self.exchange, "interim_continue", None)
                    if interim is not None:
                        interim()
                    if self.exchange is None:
                        return
                continue
            break
        # The head is complete: the body's silence timeout starts now.
        self.exchange.active = True
        self._start_body(version, code, reason, raw)

    def _switched(self, reason: bytes, headers: dict[bytes, list[bytes]]) -> None:
        """
        A 101: from now on the connection is a tunnel (L{rrlb.tunnel}) if
        the request asked to upgrade, else the node is broken.
        """
        exchange = self.exchange
        if not getattr(exchange, "upgrade", False):
            self._protocol_error("node switched protocols unasked")
            return
        self._state = _TUNNEL
        self._keep_alive = False
        rest = self._buffer
        self._buffer = b""
        exchange.switched(self, reason, headers)
        if rest and self.tunnel is not None:
            self.tunnel.from_node(rest)

    def _start_body(
        self, version: bytes, code: int, reason: bytes, headers: dict[bytes, list[bytes]]
    ) -> None:
        tokens: set[bytes] = set()
        chunked = other_coding = False
        coding = None
        if not HOP_BY_HOP_NAMES.isdisjoint(headers):
            connection = headers.get(b"Connection")
            # The framing first: a Connection header naming Transfer-Encoding
            # or Content-Length must not take away how the body is delimited
            # (that would read chunk syntax as the body, and the rest of it as
            # the next response on this connection).
            coding = headers.get(b"Transfer-Encoding")
            if coding:
                if coding != [b"chunked"]:
                    codings = [c.strip().lower() for v in coding for c in v.split(b",")]
                    # The last coding frames the body (chunked, or until the
                    # close); any other one rrlb cannot undo (gzip, chunked
                    # twice), and its body is refused below.
                    chunked = codings[-1] == b"chunked"
                    other_coding = codings != [b"chunked"]
                else:
                    chunked = True
            if connection:
                tokens = connection_tokens(connection)
                for token in tokens - NOT_DROPPED_BY_CONNECTION:
                    # Headers named in Connection are hop-by-hop too.
                    headers.pop(canonical(token), None)
            for name in HOP_BY_HOP_NAMES.intersection(headers):
                del headers[name]
        length = None
        lengths = headers.get(b"Content-Length")
        if lengths:
            # Strict (RFC 9112 6.3 lets a recipient refuse or fold them): two
            # Content-Length lines or a list are refused even when equal, as
            # nginx does; HAProxy folds equal ones. A node that sends them is
            # broken, and a client behind rrlb must never see two.
            if len(lengths) != 1 or not lengths[0].isdigit():
                what = "two Content-Length values" if len(lengths) > 1 else "bad Content-Length"
                self._protocol_error(f"{what} {b', '.join(lengths)[:40]!r}")
                return
            length = int(lengths[0])
        self._keep_alive = (
            b"close" not in tokens if version == b"HTTP/1.1" else b"keep-alive" in tokens
        )
        if (chunked or other_coding) and version != b"HTTP/1.1":
            # Transfer-Encoding in an HTTP/1.0 message: its framing is faulty
            # (RFC 9112 6.1): read this one, never another on this connection.
            self._keep_alive = False
        has_body = not (self._head_request or code in (204, 304))
        if not has_body and (self._head_request or coding or length):
            # A HEAD, or a 204 or 304 that declared a body: a node that sends
            # that body anyway (a common bug) would have it read as the next
            # request's response on this connection, so it carries no other.
            self._keep_alive = False
        if self._expect:
            # A final answer to Expect: 100-continue with no 100 first: the
            # node may not have read the body (RFC 9110 10.1.1 lets it read
            # and drop it, or close). One that does neither reads the body
            # as its next request, and its answer to that would be read as
            # the next response here.
            self._expect = False
            self._keep_alive = False
        if has_body and other_coding:
            # A coding rrlb cannot undo (gzip as a transfer coding): passing
            # the body on without its Transfer-Encoding would corrupt it.
            self._protocol_error("unsupported Transfer-Encoding from the node")
            return
        if has_body:
            if chunked or other_coding:
                # Transfer-Encoding wins over Content-Length (RFC 9112 6.3).
                headers.pop(b"Content-Length", None)
                length = None
            if chunked:
                self._state = _CHUNKED
                self._decoder = ChunkedDecoder(
                    self.exchange.response_body,
                    self._chunked_done,
                )
            elif length is not None:
                self._state = _LENGTH
                self._remaining = length
            else:
                self._state = _UNTIL_CLOSE
                self._keep_alive = False
        exchange = self.exchange
        exchange.response_head(code, reason, headers, has_body)
        if self.exchange is not exchange:
            return  # the exchange gave up (client gone) while handling the head
        rest = self._buffer
        self._buffer = b""
        if not has_body or (self._state == _LENGTH and self._remaining == 0):
            if rest:
                self._after_response()
            self._done()
        elif rest:
            self.dataReceived(rest)

    def _chunked_done(self, rest: bytes) -> None:
        if rest:
            self._after_response()
        self._done()

    def _after_response(self) -> None:
        """
        Bytes came after the response, in the same read: they are nobody's,
        and the connection carries no other request.
        """
        self._keep_alive = False
        self.pool.stray(self)

    def _done(self) -> None:
        """
        The response is complete: hand the connection back, then tell the
        exchange (so a request it triggers may reuse this connection).
        """
        exchange = self.exchange
        self.exchange = None
        self._state = _IDLE
        self._decoder = None
        if self.paused:
            # The client was slow to the end: a connection goes back to the
            # pool reading, or the next request on it would never see its
            # response.
            self.resume_reading()
        if self._keep_alive and self._body is None and self.transport is not None:
            self.pool.release(self)
        elif self._body is not None:
            # The node answered before taking the whole body: the rest of it
            # is not wanted, and the connection cannot carry another request.
            self._stop_body()
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()
        if exchange is not None:
            exchange.response_done()

    def _protocol_error(self, why: str) -> None:
        exchange = self.exchange
        self.exchange = None
        self._state = _IDLE
        self._keep_alive = False
        self._stop_body()
        self.transport.abortConnection()
        if exchange is not None:
            exchange.upstream_lost(Failure(BadResponse(why)), self._got_response)

    def pause_reading(self) -> None:
        """
        Stop reading the response: the client is not keeping up.
        """
        if not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()

    def abort(self) -> None:
        """
        Drop the request in progress (the client went away) and the connection.
        """
        self.exchange = None
        self._state = _IDLE
        self._keep_alive = False
        self._stop_body()
        self.transport.abortConnection()

    # -- the connection -------------------------------------------------------

    def connectionMade(self) -> None:
        # Read large bodies in bigger bites than Twisted's 64 KiB: fewer
        # trips through the reactor per megabyte streamed. recv() returns
        # what is there, so small responses cost nothing more.
        self.transport.bufferSize = READ_SIZE
        factory = self.factory
        if factory.proxy_header is not None:
            # HAProxy's send-proxy: the header first, in the clear, then TLS.
            self.transport.write(factory.proxy_header)
            if factory.tls is not None:
                self.transport.startTLS(factory.tls)
        self.pool._connected(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.pool._lost(self)
        exchange = self.exchange
        if exchange is None:
            return
        self.exchange = None
        if self._state == _TUNNEL:
            exchange.tunnel_closed()
            return
        self._stop_body()
        if self._state == _UNTIL_CLOSE and reason.check(error.ConnectionDone):
            # A body without a length ends with a clean close; a reset cuts it.
            self._state = _IDLE
            exchange.response_done()
        else:
            exchange.upstream_lost(reason, self._got_response)


class _ConnectFactory(ClientFactory):
    """
    Builds the protocol for one new connection and reports its outcome to
    the exchange that asked for it.
    """

    noisy = False

    def __init__(
        self,
        pool: UpstreamPool,
        key: str,
        exchange: Any,
        proxy_header: Optional[bytes] = None,
        tls: Any = None,
    ) -> None:
        self.pool = pool
        self.key = key
        self.exchange = exchange
        self.proxy_header = proxy_header
        self.tls = tls

    def buildProtocol(self, addr: Any) -> UpstreamProtocol:
        protocol = UpstreamProtocol(self.pool, self.key)
        protocol.factory = self
        protocol.proxy_header = self.proxy_header
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        exchange = self.exchange
        self.exchange = None
        if exchange is not None:
            exchange.connect_failed(reason)


class UpstreamPool:
    """
    Keep-alive connections to nodes: at most C{max_idle_per_node} idle ones
    per node, reused most-recent first.

    It also owns the response timeout: a sweep every C{granularity} seconds
    times out exchanges that made no progress for C{timeout} seconds, which
    costs nothing per request beyond a set insertion (no timer per request).

    @ivar tls_creator: called with a node, returns the client connection
        creator for an https node (see L{rrlb.tls}).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        connect_timeout: float = 5.0,
        timeout: float = 30.0,
        max_idle_per_node: int = 32,
        tls_creator: Optional[Callable[[Any], Any]] = None,
        max_headers: int = MAX_HEADERS,
    ) -> None:
        self.reactor: Any = reactor
        self.clock: IReactorTime = reactor
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.max_idle_per_node = max_idle_per_node
        # Node key -> its pool's max_idle_per_node, where that differs.
        self.idle_caps: dict[str, int] = {}
        self.tls_creator = tls_creator
        # Header lines a response may have (--max-headers, as for requests).
        self.max_headers = max_headers
        # Node key -> when its stray bytes were last logged.
        self._stray_logged: dict[str, float] = {}
        # How long a client that paused its response may read nothing
        # (nginx's send_timeout); never less than the response timeout.
        self.send_timeout = SEND_TIMEOUT
        self._idle: dict[str, list[UpstreamProtocol]] = {}
        # Idle connections that began with a PROXY header, per node, keyed by
        # that header (client address and port): never shared between
        # clients, as HAProxy does not share them. Oldest first.
        self._private: dict[str, dict[bytes, UpstreamProtocol]] = {}
        self._connections: set[UpstreamProtocol] = set()
        self._closed_waiters: list[defer.Deferred[None]] = []
        self._watched: set[Any] = set()
        self._sweep_call: Optional[Any] = None
        self._trim_call: Optional[Any] = None
        self._trim_round = 0
        self.new_connections = 0

    # -- connections ----------------------------------------------------------

    def acquire(self, node: Any, exchange: Any, fresh: bool = False) -> Any:
        """
        Hand C{exchange} a connection to C{node}: an idle one at once (unless
        C{fresh}), or a new one when it is made.

        @return: the connector of a new connection (to stop it), or L{None}.
        """
        # Nodes without the attribute (stand-ins in tests) send no header.
        send_proxy = getattr(node, "send_proxy", None)
        if send_proxy is not None:
            return self._acquire_private(node, exchange, fresh, exchange.proxy_header(send_proxy))
        idle = None if fresh else self._idle.get(node.key)
        while idle:
            protocol = idle.pop()
            protocol.idle = False
            if self._reusable(protocol):
                exchange.connected(protocol, True)
                return None
            # The node closed it between requests (its FIN not read yet), or
            # sent bytes since: nothing was sent on it, so any request may
            # take a fresh one.
            protocol.transport.abortConnection()
        factory = _ConnectFactory(self, node.key, exchange)
        self.new_connections += 1
        # The node's pool's connect timeout, if it has its own.
        connect_timeout = getattr(node, "connect_timeout", None) or self.connect_timeout
        if node.scheme == "https":
            creator = self.tls_creator(node) if self.tls_creator else None
            if creator is None:
                from twisted.internet.ssl import optionsForClientTLS

                creator = optionsForClientTLS(node.host)
            return self.reactor.connectSSL(
                node.host, node.port, factory, creator, timeout=connect_timeout
            )
        return self.reactor.connectTCP(node.host, node.port, factory, timeout=connect_timeout)

    def _reusable(self, protocol: UpstreamProtocol) -> bool:
        """
        Whether an idle pooled connection can carry a request: it is open,
        and nothing arrived on it since its response ended.

        Bytes the reactor read while it was idle closed it already
        (L{UpstreamProtocol.dataReceived}). What is left to look at costs a
        system call per reuse: a one-byte C{MSG_PEEK} at the socket, for a
        FIN or bytes not read yet; and over TLS, a one-byte peek at the TLS
        layer first. The TLS layer hands over the records of one read one
        by one, so a record that came in the same read as the response's
        last one is still held there while that response ends, and a
        request waiting in the queue takes the connection back at that very
        moment. (Part of a record, its rest still on the wire, is not seen:
        that is the window every HTTP/1.1 proxy has, docs/security.md.)
        """
        transport = protocol.transport
        if transport is None or not protocol.connected or transport.disconnecting:
            return False
        tls = ISSLTransport.providedBy(transport)
        if tls:
            try:
                transport.getHandle().recv(1, socket.MSG_PEEK)
            except SSL.WantReadError:
                pass  # no whole record held
            except Exception:
                return False  # a close_notify, or TLS broke
            else:
                self.stray(protocol)
                return False
        sock = getattr(transport, "socket", None)
        if sock is None:  # TLS over a transport of its own
            sock = getattr(getattr(transport, "transport", None), "socket", None)
        if sock is None:
            return True
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True  # nothing to read: open and quiet
        except OSError:
            return False
        if data and not tls:
            # (Over TLS they may be the TLS layer's own: a session ticket.)
            self.stray(protocol)
        return False  # b"" is the node's FIN

    def stray(self, protocol: UpstreamProtocol) -> None:
        """
        A node sent bytes after a response, that nobody asked for: say so,
        at most once every L{STRAY_LOG_INTERVAL} seconds per node.
        """
        key = protocol.key
        now = self.clock.seconds()
        last = self._stray_logged.get(key)
        if last is None or now - last >= STRAY_LOG_INTERVAL:
            self._stray_logged[key] = now
            self.log.warn(
                "node {node} sent bytes after its response, which another request"
                " could have taken for its own; the connection was closed, not reused"
                " (said at most once a minute per node)",
                node=key,
            )

    def _acquire_private(self, node: Any, exchange: Any, fresh: bool, header: bytes) -> Any:
        """
        L{acquire} for a node with C{send_proxy}: the idle connection that
        began with the same header (the same client connection), or a new
        one that begins with it.
        """
        private = None if fresh else self._private.get(node.key)
        protocol = private.pop(header, None) if private else None
        if protocol is not None:
            protocol.idle = False
            if not private:
                del self._private[node.key]
            if self._reusable(protocol):
                exchange.connected(protocol, True)
                return None
            protocol.transport.abortConnection()
        tls = None
        if node.scheme == "https":
            tls = self.tls_creator(node) if self.tls_creator else None
            if tls is None:
                from twisted.internet.ssl import optionsForClientTLS

                tls = optionsForClientTLS(node.host)
        factory = _ConnectFactory(self, node.key, exchange, header, tls)
        self.new_connections += 1
        return self.reactor.connectTCP(node.host, node.port, factory, timeout=self.connect_timeout)

    def _release_private(self, protocol: UpstreamProtocol, header: bytes) -> None:
        private = self._private.setdefault(protocol.key, {})
        previous = private.pop(header, None)
        if previous is not None:
            previous.idle = False
            previous.transport.loseConnection()
        protocol.idle = True
        private[header] = protocol
        if len(private) > self.max_idle_per_node:
            # At most max_idle_per_node per node: the oldest client's goes.
            oldest = private.pop(next(iter(private)))
            oldest.idle = False
            oldest.transport.loseConnection()

    def release(self, protocol: UpstreamProtocol) -> None:
        """
        Take back a connection whose response is complete.
        """
        header = protocol.proxy_header
        if header is not None and self.max_idle_per_node:
            self._release_private(protocol, header)
            return
        idle = self._idle.get(protocol.key)
        if idle is None:
            idle = self._idle[protocol.key] = []
        cap = self.idle_caps.get(protocol.key, self.max_idle_per_node)
        if cap == 0:
            protocol.transport.loseConnection()
            return
        protocol.idle = True
        protocol.idle_round = self._trim_round
        idle.append(protocol)
        if len(idle) > cap and self._trim_call is None:
            # Over the cap: close the surplus only once it has stayed idle
            # for IDLE_TRIM_DELAY. Under steady high concurrency responses
            # end in bursts, and closing at once what the next burst of
            # requests reopens would cost a connection per few requests.
            self._schedule_trim()

    def _schedule_trim(self) -> None:
        # Connections released from now on belong to the next round.
        self._trim_round += 1
        self._trim_call = self.clock.callLater(IDLE_TRIM_DELAY, self._trim)

    def _trim(self) -> None:
        """
        Close idle connections beyond the cap that were already idle when
        this trim was scheduled, oldest first (reuse is most-recent first, so the
        oldest are the ones traffic does not need).
        """
        self._trim_call = None
        cutoff = self._trim_round
        caps = self.idle_caps
        default_cap = self.max_idle_per_node
        over = False
        for key, idle in self._idle.items():
            excess = len(idle) - caps.get(key, default_cap)
            while excess > 0 and idle[0].idle_round < cutoff:
                protocol = idle.pop(0)
                protocol.idle = False
                protocol.transport.loseConnection()
                excess -= 1
            over = over or excess > 0
        if over:
            self._schedule_trim()

    def drop_node(self, key: str) -> None:
        """
        Close the idle connections of a node that is gone.
        """
        self._stray_logged.pop(key, None)
        for protocol in self._idle.pop(key, []) + list(self._private.pop(key, {}).values()):
            protocol.idle = False
            protocol.transport.loseConnection()

    def _forget_idle(self, protocol: UpstreamProtocol) -> None:
        if protocol.idle:
            protocol.idle = False
            header = protocol.proxy_header
            if header is not None:
                private = self._private.get(protocol.key)
                if private and private.get(header) is protocol:
                    del private[header]
                    if not private:
                        del self._private[protocol.key]
                return
            idle = self._idle.get(protocol.key)
            if idle and protocol in idle:
                idle.remove(protocol)

    def idle_count(self, key: str) -> int:
        return len(self._idle.get(key, ())) + len(self._private.get(key, ()))

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def _connected(self, protocol: UpstreamProtocol) -> None:
        self._connections.add(protocol)
        factory = protocol.factory
        exchange = factory.exchange
        factory.exchange = None
        if exchange is None:
            protocol.transport.loseConnection()
        else:
            exchange.connected(protocol, False)

    def _lost(self, protocol: UpstreamProtocol) -> None:
        self._connections.discard(protocol)
        self._forget_idle(protocol)
        if not self._connections and self._closed_waiters:
            waiters, self._closed_waiters = self._closed_waiters, []
            for d in waiters:
                d.callback(None)

    def close(self) -> defer.Deferred[None]:
        """
        Close every connection; fires when all are gone.
        """
        self._stop_sweeping()
        for key in list(self._idle) + list(self._private):
            self.drop_node(key)
        for protocol in list(self._connections):
            protocol.transport.abortConnection()
        if not self._connections:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._closed_waiters.append(d)
        return d

    # -- timeouts -------------------------------------------------------------

    @property
    def granularity(self) -> float:
        return min(1.0, self.timeout / 10)

    def watch(self, exchange: Any) -> None:
        """
        Time out C{exchange} if it makes no progress for C{timeout} seconds.
        """
        exchange.deadline = None
        self._watched.add(exchange)
        if self._sweep_call is None:
            self._sweep_call = self.clock.callLater(self.granularity, self._sweep)

    def unwatch(self, exchange: Any) -> None:
        self._watched.discard(exchange)

    def _sweep(self) -> None:
        self._sweep_call = None
        if not self._watched:
            return
        now = self.clock.seconds()
        timeout = self.timeout
        send_timeout = max(timeout, self.send_timeout)
        expired = []
        for exchange in self._watched:
            if exchange.active or exchange.deadline is None:
                exchange.active = False
                # The exchange's pool's own timeout, if it has one.
                own = getattr(exchange, "timeout", None) or timeout
                exchange.deadline = now + (
                    max(own, send_timeout) if getattr(exchange, "paused", False) else own
                )
            elif now >= exchange.deadline:
                expired.append(exchange)
        for exchange in expired:
            self._watched.discard(exchange)
            try:
                exchange.timed_out()
            except Exception:
                self.log.failure("timing out {exchange}", exchange=exchange)
        if self._sweep_call is None:  # timed_out may watch again, and schedule it
            self._sweep_call = self.clock.callLater(self.granularity, self._sweep)

    def _stop_sweeping(self) -> None:
        for call in (self._sweep_call, self._trim_call):
            if call is not None and call.active():
                call.cancel()
        self._sweep_call = self._trim_call = None
