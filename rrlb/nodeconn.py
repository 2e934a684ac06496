# -*- test-case-name: tests.test_upstream,tests.test_misbehaving_node,tests.test_late_bytes -*-
"""
One connection to one node (L{UpstreamProtocol}): the lean HTTP/1.1 client
side of rrlb. It writes a request head in one write, parses the response
head with a few C{bytes} splits (L{parse_head}), reads the body by its
framing, and hands everything to its exchange with callbacks instead of
Deferreds. L{rrlb.upstream.UpstreamPool} makes, keeps and reuses these
connections.

The consumer (an I{exchange}) provides::

    connected(protocol, reused)          a connection is ready for the request
    connect_failed(reason)               connecting failed
    response_head(code, reason, headers, has_body)
    response_body(data)
    response_done()
    upstream_lost(reason, got_response)  the connection ended early
    timed_out(got_response)              no progress within the timeout

The pool provides C{max_headers}, C{stray}, C{release}, C{forget_idle},
C{connection_made} and C{connection_lost}.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import error
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from rrlb._twisted import HeaderNameError, canonical_name, name_cache
from rrlb.http1 import HOP_BY_HOP_NAMES, NOT_DROPPED_BY_CONNECTION, canonical, connection_tokens
from rrlb.parser import HEAD_BYTES, ChunkedDecoder

MAX_HEAD_SIZE = 65536
READ_SIZE = 256 * 1024
# Request bodies up to this size go out in the same write as the head.
INLINE_BODY_SIZE = 65536
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

    def __init__(self, pool: Any, key: str) -> None:
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
        if not data:
            # Nothing to frame (an HTTP/2 DATA frame that was empty or only
            # padding): as a chunk, an empty piece would be the last chunk,
            # ending the body early for the node (issue 17).
            return
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
            self.pool.forget_idle(self)
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
        self.pool.connection_made(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.pool.connection_lost(self)
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
