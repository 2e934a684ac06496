# -*- test-case-name: tests.test_limits,tests.test_framing,tests.test_slow_peers -*-
"""
The client side of a connection: L{ProxyChannel} reads requests with the
strict one-pass parser of L{rrlb.parser} instead of L{HTTPChannel}'s line
by line parsing, and enforces the client limits (head size and count, body
size, header, body and keep-alive timeouts); L{ClientSite} keeps the open
channels, times them out in one sweep, and stops accepting at
C{--max-connections}.

Everything else of L{HTTPChannel} stays: L{twisted.web.http.Request}
objects, response writing, and the backpressure between the transport and
the request in progress.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server

from rrlb._twisted import set_raw_headers
from rrlb.body import CONTINUE, StreamedBody
from rrlb.http1 import EDGE_OFF, EDGE_TRUSTED, EDGE_UNTRUSTED, error_response
from rrlb.parser import (
    BAD_FRAMING,
    BAD_REQUEST,
    BODY_TIMEOUT,
    BODY_TOO_LARGE,
    HEAD_BYTES,
    HEADER_TIMEOUT,
    HEADER_TOO_LARGE,
    MAX_REQUEST_LINE,
    URI_TOO_LONG,
    BadChunk,
    BadRequest,
    BodyTooLarge,
    ChunkedDecoder,
    RequestHead,
    parse_request_head,
)
from rrlb.settings import DEFAULT_MAX_CONNECTIONS, Config, values_for
from rrlb.values import Network

log = Logger()

# How long a connection whose request was refused is read from (and the
# bytes dropped) after the error response, so that a client still sending
# its body gets to read the answer instead of a reset (nginx's
# lingering_close).
LINGER_TIMEOUT = 2.0
# The most bytes of a refused request's target written to the access log.
MAX_LOGGED_TARGET = 2048
# The most seconds between two sweeps over the open connections.
MAX_SWEEP_INTERVAL = 1.0
# Bytes of pipelined requests read ahead while one is in progress, before
# the client is held back (twisted.web's _optimisticEagerReadSize): past
# them, what the client sends waits in the kernel, as with nginx and HAProxy.
READ_AHEAD = 0x4000
# How long a connection rrlb closes may take to send what is left of its
# last response: a client that reads none of it is cut off then (nginx's
# send_timeout), or its connection and that buffer would stay for as long
# as it reads nothing.
CLOSE_TIMEOUT = 60.0

# Why a channel does not read from its client: flags, so that each reason
# is lifted on its own and reading resumes only when none is left.
_AHEAD = 1  # READ_AHEAD bytes of pipelined requests wait to be served
_SENDING = 2  # between requests, the client is not taking its responses
_HELD = 4  # the request body (or a tunnel) is held back (rrlb.body's flags)

# Empty lines before a request line (RFC 9112 2.2).
_EMPTY_LINES = re.compile(rb"[\r\n]*")


@dataclass(frozen=True)
class ClientLimits:
    """
    What a client may send, and for how long (see docs/security.md).

    @ivar trusted_proxies: networks whose X-Forwarded-* headers are kept; an
        empty tuple means the option is unset (X-Forwarded-For is appended
        to, whoever sent it).
    @ivar proxy_protocol_from: the peers a C{haproxy:} listener takes a
        PROXY header from (L{rrlb.proxyproto}); empty: any peer.
    """

    # The defaults are rrlb.settings', where the options are.
    max_header_size: int = Config.max_header_size
    max_headers: int = Config.max_headers
    max_body_size: int = Config.max_body_size
    header_timeout: float = Config.client_header_timeout
    body_timeout: float = Config.client_body_timeout
    keepalive_timeout: float = Config.keepalive_timeout
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    trusted_proxies: tuple[Network, ...] = ()
    proxy_protocol_from: tuple[Network, ...] = ()

    @classmethod
    def from_config(cls, config: Config) -> ClientLimits:
        """
        The limits C{config} sets (its settings that feed C{client}), with
        C{max_connections} as what fits (L{connections_that_fit}).
        """
        limits = values_for("client", config)
        return cls(**{**limits, "max_connections": connections_that_fit(limits["max_connections"])})


# File descriptors kept beyond two per client connection (the client's and
# its node connection): listeners, health probes, logs, the admin API.
FD_RESERVE = 64


def connections_that_fit(max_connections: Optional[int]) -> int:
    """
    The cap on client connections: C{max_connections}, or fewer if that many
    cannot have their file descriptors under the soft C{RLIMIT_NOFILE}
    (HAProxy lowers its maxconn the same way). Unset (L{None}), it is what
    the limit fits, at most L{DEFAULT_MAX_CONNECTIONS}.
    """
    wanted = DEFAULT_MAX_CONNECTIONS if max_connections is None else max_connections
    try:
        import resource
    except ImportError:  # not on POSIX
        return wanted
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, (soft - FD_RESERVE) // 2))


def raise_fd_limit(max_connections: Optional[int]) -> None:
    """
    Raise the soft C{RLIMIT_NOFILE} to the hard limit, and say so once if a
    C{max_connections} the operator set still cannot fit in it (rrlb then
    uses the cap L{connections_that_fit} gives). Unset, the cap is what
    fits, and nothing is said.
    """
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    elif hard == resource.RLIM_INFINITY:
        soft = hard
    if max_connections is None:
        return
    needed = 2 * max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warn(
            "--max-connections {max} needs up to {needed} file descriptors (a client"
            " and a node connection each), but the limit (RLIMIT_NOFILE) is {limit}:"
            " accepting at most {fits} client connections; raise the limit"
            " (LimitNOFILE= in the systemd unit) or lower --max-connections",
            max=max_connections,
            needed=needed,
            limit=soft,
            fits=connections_that_fit(max_connections),
        )


_IDLE, _HEAD, _BODY, _BUSY, _CLOSED, _TUNNEL = range(6)
_STATE_NAMES = ("idle", "reading head", "reading body", "in progress", "closing", "tunnel")
# Client connections /status lists at most.
MAX_LISTED_CLIENTS = 100

def request_line_of(head: bytes) -> tuple[Optional[bytes], Optional[bytes], bytes]:
    """
    Method, target and version of the request line at the start of a head
    that was refused, as far as they can be read (L{None} if not), for the
    access log.
    """
    line = head[: head.find(b"\r\n")] if b"\r\n" in head[:MAX_REQUEST_LINE + 2] else b""
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return None, None, b"HTTP/1.1"
    method, target, version = parts
    return method[:32], target[:MAX_LOGGED_TARGET], version[:16]


def is_trusted(host: Optional[str], networks: Sequence[Network]) -> bool:
    """
    Whether an address (text) is inside one of C{networks}.
    """
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return any(address in network for network in networks)


def real_client(peer: bytes, forwarded_for: list[bytes], networks: Sequence[Network]) -> bytes:
    """
    The client behind a chain of trusted proxies: the first address of
    C{X-Forwarded-For} from the right (after the peer) that is not trusted,
    or the leftmost one if every hop is trusted. The walk stops at a hop
    that is not an IP address; the answer is then the last address before
    it (the peer's, if none).
    """
    client = peer
    for value in reversed(forwarded_for):
        for hop in reversed(value.split(b",")):
            try:
                address = ipaddress.ip_address(hop.strip().decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                # Not an address: nothing to its left can be believed, and
                # nothing but an address may stand in the log.
                return client
            client = str(address).encode("ascii")
            if not is_trusted(client.decode("ascii"), networks):
                return client
    return client


def _skip_empty_lines(buffer: bytes, pos: int) -> int:
    """
    Where the request line starts in C{buffer} after any empty lines at
    C{pos}, which RFC 9112 2.2 says to ignore.
    """
    match = _EMPTY_LINES.match(buffer, pos)
    return match.end() if match is not None else pos


class ProxyChannel(http.HTTPChannel):
    """
    An HTTP/1.1 connection from a client.

    It works out once per connection what every request on it forwards
    (the scheme and the client address, and whether the client's
    X-Forwarded-* headers are trusted), parses each request head in one
    pass, decodes the body itself, and writes a response head as one joined
    string rather than a sequence of some fifty small ones, which Twisted
    checks piece by piece.

    @ivar deadline: when the sweep of L{ClientSite} times this connection
        out (its idle, head, body or linger time runs out), or L{None}.
    """

    forwarded: tuple[bytes, bytes] = (b"http", b"")
    edge = EDGE_OFF
    peer: Any = None
    local: Any = None
    # For /status: when it opened, who the client is, requests answered.
    opened = 0.0
    client_address = ""
    served = 0
    deadline: Optional[float] = None
    # A drain asked it to close after the request in progress: its
    # response says Connection: close.
    closing = False
    # Where the client's bytes go once the connection is a tunnel (set by
    # the proxy along with start_tunnel).
    tunnel_reader: Optional[Callable[[bytes], None]] = None
    transport: Any
    site: ClientSite

    def __init__(self) -> None:
        super().__init__()
        self._state = _IDLE
        # What was read and not parsed yet: self._buffer[self._offset:], then
        # the reads in self._more (those that came while a request was in
        # progress, kept as they came rather than copied onto the rest).
        self._buffer = b""
        self._offset = 0
        self._more: list[bytes] = []
        self._more_size = 0
        self._scanned = 0
        self._left = 0
        self._decoder: Optional[ChunkedDecoder] = None
        self._holds = 0
        self._stops = 0
        self._starting = False
        self._again = False
        # The next request waits for the client to take the last response.
        self._next_waits = False

    # -- the connection -------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        site = self.site
        self.clock = site.clock
        # Every request on the connection has the same addresses.
        self.local = self.transport.getHost()
        self.set_peer(self.transport.getPeer())
        # A connection that sends nothing is closed quietly after the header
        # timeout, as nginx does.
        self.opened = now = self.clock.seconds()
        self.deadline = now + site.limits.header_timeout
        site.channel_opened(self)

    def set_peer(self, peer: Any) -> None:
        """
        Take C{peer} as the client's address: for X-Forwarded-For, the access
        log, /status and --trusted-proxies. (A C{haproxy:} listener sets the
        address its PROXY header carried.)
        """
        self.peer = peer
        host = getattr(peer, "host", None)
        self.forwarded = (
            b"https" if self.isSecure() else b"http",
            host.encode("ascii") if isinstance(host, str) else b"",
        )
        self.client_address = host if isinstance(host, str) else ""
        trusted = self.site.limits.trusted_proxies
        if trusted:
            self.edge = EDGE_TRUSTED if is_trusted(host, trusted) else EDGE_UNTRUSTED

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._state = _CLOSED
        self.deadline = None
        super().connectionLost(reason)
        self.site.channel_closed(self)

    # -- reading, or not ------------------------------------------------------

    def _stop_reading(self, why: int) -> None:
        if not self._stops:
            self.transport.pauseProducing()
        self._stops |= why

    def _go_on_reading(self, why: int) -> None:
        stops = self._stops
        if stops & why:
            self._stops = stops = stops & ~why
            if not stops:
                self.transport.resumeProducing()

    def pauseProducing(self) -> None:
        """
        The client's connection has a full write buffer: the response in
        progress is paused and, between requests, nothing more is read
        (Twisted's HTTPChannel does the same). During a request, reading is
        bounded by L{READ_AHEAD} and the body's holds instead.
        """
        self._waitingForTransport = True
        producer = self._requestProducer
        if producer is not None:
            producer.pauseProducing()
        if not self._handlingRequest:
            self._stop_reading(_SENDING)

    def resumeProducing(self) -> None:
        """
        The client's write buffer drained: the response goes on, the next
        request starts if it was waiting for that, and reading goes on
        unless another reason still stops it.
        """
        self._waitingForTransport = False
        producer = self._requestProducer
        if producer is not None:
            producer.resumeProducing()
        self._go_on_reading(_SENDING)
        if self._next_waits:
            self._next_waits = False
            if self._state == _IDLE:
                self._next_requests()

    # -- reading requests -----------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _BODY:
            self._body_received(data, 0)
        elif state == _BUSY:
            # Pipelined requests: kept for when this one is done. Past
            # READ_AHEAD bytes the client is not read, whatever the state
            # of the writes (a client that does not read its responses
            # while it sends would otherwise fill rrlb's memory).
            self._more.append(data)
            self._more_size += len(data)
            if self._more_size + len(self._buffer) - self._offset > READ_AHEAD:
                self._stop_reading(_AHEAD)
        elif state == _TUNNEL:
            self.tunnel_reader(data)  # type: ignore[misc]
        elif state != _CLOSED:
            if self._next_waits:
                # Read after reading stopped (TLS hands on the rest of a
                # record): kept with the requests read ahead.
                self._more.append(data)
                self._more_size += len(data)
                return
            buffer = self._buffer
            # A head that came in pieces (at most max_header_size) is joined.
            self._head_received(buffer + data if buffer else data, 0)

    def _head_received(self, buffer: bytes, pos: int) -> None:
        """
        Read the request head at C{buffer[pos:]}: start its request, or keep
        what came of it until the rest comes.
        """
        if self._state == _IDLE and buffer[pos : pos + 1] in (b"\r", b"\n"):
            # Empty lines before a request line are ignored (RFC 9112 2.2).
            pos = _skip_empty_lines(buffer, pos)
            if pos == len(buffer):
                self._buffer = b""
                self._offset = 0
                return
        limits = self.site.limits
        # A head arriving in pieces is searched only where its end could be
        # that was not searched before.
        scanned = self._scanned
        end = buffer.find(b"\r\n\r\n", pos + scanned)
        if end < 0 or end - pos > limits.max_header_size:
            if end < 0 and len(buffer) - pos <= limits.max_header_size:
                if pos:
                    buffer = buffer[pos:]  # the head so far, nothing before it
                self._buffer = buffer
                self._offset = 0
                if len(buffer) > MAX_REQUEST_LINE + 1 and (
                    buffer.find(b"\r\n", 0, MAX_REQUEST_LINE + 2) < 0
                ):
                    self._refuse(BadRequest(414, URI_TOO_LONG, "the request line is too long"))
                elif buffer.find(b"\n\n", max(0, scanned - 1)) >= 0:
                    self._refuse(BadRequest(400, BAD_REQUEST, "bare LF in the request head"))
                elif buffer[scanned:].translate(None, HEAD_BYTES):
                    # Control bytes (a TLS handshake on a plain port, say):
                    # no need to wait for the end of a head that cannot be.
                    self._refuse(BadRequest(400, BAD_REQUEST, "control bytes in the request head"))
                else:
                    self._scanned = max(0, len(buffer) - 3)
                    if self._state == _IDLE:
                        # The head is coming in pieces: it has header_timeout
                        # from its first byte (slowloris).
                        self._state = _HEAD
                        self.deadline = self.clock.seconds() + limits.header_timeout
                return
            self._buffer = buffer
            self._offset = pos
            if buffer.find(b"\r\n", pos, pos + MAX_REQUEST_LINE + 2) < 0:
                self._refuse(BadRequest(414, URI_TOO_LONG, "the request line is too long"))
            else:
                self._refuse(BadRequest(431, HEADER_TOO_LARGE, "the request head is too large"))
            return
        self._scanned = 0
        try:
            head = parse_request_head(buffer[pos:end], limits.max_headers)
        except BadRequest as e:
            self._buffer = buffer
            self._offset = pos
            self._refuse(e)
            return
        self._start(head, buffer, end + 4, limits)

    def _start(self, head: RequestHead, buffer: bytes, pos: int, limits: ClientLimits) -> None:
        """
        Start the request of C{head}; what follows it is C{buffer[pos:]}
        (then L{_more}, if the head came from the read-ahead).
        """
        request: Any = self.requestFactory(self, len(self.requests))
        self.requests.append(request)
        set_raw_headers(request.requestHeaders, head.headers)
        request.method = head.method
        request.uri = head.target
        request.clientproto = head.version
        if self.edge == EDGE_TRUSTED:
            xff = head.headers.get(b"X-Forwarded-For")
            if xff:
                request.real_client = self.client_address = real_client(
                    self.forwarded[1], xff, limits.trusted_proxies
                ).decode("ascii")
        self.persistent = head.persistent
        if not head.persistent and head.version == b"HTTP/1.1":
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        length = head.length
        if length == 0:
            self._state = _BUSY
            self.deadline = None
            self._handlingRequest = True
            # Whatever follows stays where it is, read ahead: no copy.
            self._buffer = buffer
            self._offset = pos
            if len(buffer) - pos + self._more_size > READ_AHEAD:
                self._stop_reading(_AHEAD)
            request.content = None
            request.requestReceived(head.method, head.target, head.version)
            return
        maximum = limits.max_body_size
        if maximum and length is not None and length > maximum:
            # Refused before reading a byte of it (and before 100 Continue).
            self._refuse(BadRequest(413, BODY_TOO_LARGE, "the body is too large"), request)
            return
        # The body streams to the node as it arrives (rrlb.body): the
        # request is forwarded as soon as its head is in, and the channel
        # reads the body only as fast as the node takes it.
        request.content = None
        self._buffer = b""
        self._offset = 0
        self._state = _BODY
        self._handlingRequest = True
        self.deadline = self.clock.seconds() + limits.body_timeout
        body = request.body = StreamedBody(self, length, head.expect_continue)
        if length is None:
            self._decoder = ChunkedDecoder(body.feed, self._body_done, maximum)
        else:
            self._left = length
        # What came with the head is in the body before the request is
        # forwarded: a small body that came whole goes out with the head.
        if pos < len(buffer):
            self._body_received(buffer, pos)
        more = self._more
        while more and self._state == _BODY:
            data = more.pop(0)
            self._more_size -= len(data)
            self._body_received(data, 0)
        if self._state == _CLOSED:
            return
        request.requestReceived(head.method, head.target, head.version)

    def _body_received(self, data: bytes, pos: int) -> None:
        """
        Body bytes: C{data[pos:]}.
        """
        decoder = self._decoder
        if decoder is not None:
            try:
                decoder.feed(data, pos)
            except BadChunk as e:
                self._body_failed(BadRequest(400, BAD_FRAMING, str(e)))
                return
            except BodyTooLarge as e:
                self._body_failed(BadRequest(413, BODY_TOO_LARGE, str(e)))
                return
        else:
            left = self._left
            request = self.requests[-1]
            if len(data) - pos < left:
                self._left = left - len(data) + pos
                request.body.feed(data[pos:] if pos else data)
            else:
                self._left = 0
                end = pos + left
                request.body.feed(data[pos:end])
                self._body_done(data, end)
                return
        if self._state == _BODY and not self._holds:
            self.deadline = self.clock.seconds() + self.site.limits.body_timeout

    def _body_done(self, rest: bytes, pos: int = 0) -> None:
        """
        The body ended; C{rest[pos:]} is what the client sent after it.
        """
        self._decoder = None
        self._state = _BUSY
        self.deadline = None
        self._buffer = rest
        self._offset = pos
        self._holds = 0
        # Nothing more of this request to read: take pipelined bytes (up to
        # READ_AHEAD) as after a request without a body.
        if len(rest) - pos + self._more_size > READ_AHEAD:
            self._stop_reading(_AHEAD)
        self._go_on_reading(_HELD)
        self.requests[-1].body.finish()

    def _body_failed(self, error: BadRequest) -> None:
        """
        The body broke a limit or its framing while it was streaming: the
        node's request is cancelled, and the client gets C{error} if no
        response has started yet, else the connection closes.
        """
        request = self.requests[-1]
        exchange = getattr(request, "exchange", None)
        if exchange is not None and not exchange.finished:
            exchange.client_gone()
        if request.startedWriting:
            self._state = _CLOSED
            self.deadline = None
            self._decoder = None
            request.client_error = error.reason
            self.transport.abortConnection()
            return
        self._refuse(error, request)

    # -- holding the client back (rrlb.body, rrlb.tunnel) -------------------------

    def hold(self, flag: int) -> None:
        """
        Hold the client back for the reason C{flag}: stop reading its body
        or its side of a tunnel (except while only waiting to send 100
        Continue, when it is not sending). The body timeout does not run
        while the client is held.
        """
        self._holds |= flag
        self._read_body()

    def release(self, flag: int) -> None:
        """
        The reason C{flag} to hold the client back is gone.
        """
        if self._holds & flag:
            self._holds &= ~flag
            self._read_body()

    def _read_body(self) -> None:
        state = self._state
        if state != _BODY and state != _TUNNEL:
            return
        holds = self._holds
        if holds & ~CONTINUE:
            self._stop_reading(_HELD)
        else:
            self._go_on_reading(_HELD)
        if state == _BODY:
            self.deadline = None if holds else self.clock.seconds() + self.site.limits.body_timeout

    def start_tunnel(self, head: bytes) -> bytes:
        """
        The node switched protocols: send the client C{head} (the 101),
        read from now on for the tunnel (L{rrlb.tunnel}), and return what
        the client already sent past its request.
        """
        self._state = _TUNNEL
        self.deadline = None
        self.persistent = False
        self.transport.write(head)
        buffered = b"".join([self._buffer[self._offset :], *self._more])
        self._buffer = b""
        self._offset = 0
        self._more = []
        self._more_size = 0
        self._go_on_reading(_AHEAD)
        return buffered

    def send_continue(self) -> None:
        """
        Tell a client that sent C{Expect: 100-continue} to send its body.
        """
        if self._state == _BODY:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def requestDone(self, request: Any) -> None:
        """
        The response to C{request} is complete: read the next request (the
        pipelined one already here, or wait with the keep-alive timeout), or
        close the connection.
        """
        if request is not self.requests[0]:
            raise TypeError
        del self.requests[0]
        self.served += 1
        if getattr(request, "client_error", None) is not None:
            self._linger()
            return
        if self._state == _BODY:
            # The response ended before the request body did (the node, or
            # rrlb, answered without reading it all): the rest of the body
            # is read and dropped for a while, then the connection closes.
            self._decoder = None
            self._holds = 0
            self._linger()
            return
        if not self.persistent or self._state == _CLOSED:
            self.loseConnection()
            return
        self._handlingRequest = False
        self._state = _IDLE
        self.deadline = self.clock.seconds() + self.site.limits.keepalive_timeout
        if self._waitingForTransport:
            # The client has not taken this response yet: nothing more is
            # read from it, and the next request does not start (even one
            # already read), until it has, as with nginx. Else a client that
            # reads nothing could have every request it sent ahead answered
            # into rrlb's memory.
            self._stop_reading(_SENDING)
            self._next_waits = True
            return
        self._next_requests()

    def _next_requests(self) -> None:
        """
        Start the pipelined requests already read, one after another, in a
        loop: a request answered at once (a 404, a 503) ends inside its own
        L{_start}, and recursing from there would run out of stack.
        """
        if self._starting:
            self._again = True
            return
        self._starting = True
        try:
            again = True
            while again:
                self._again = False
                self._next_request()
                again = self._again
        finally:
            self._starting = False
        if self._state != _BUSY or (
            len(self._buffer) - self._offset + self._more_size <= READ_AHEAD
        ):
            self._go_on_reading(_AHEAD)

    def _next_request(self) -> None:
        """
        Start the next request read ahead, if there is one.

        Nothing is copied but the request's own head, and, when the buffer
        holds no complete head, the reads kept in L{_more} joined to what is
        left of it (less than a head): each byte read ahead is copied once
        more at most, so the cost per request is that of its own bytes,
        however much waits behind it.
        """
        buffer = self._buffer
        pos = self._offset
        if buffer[pos : pos + 1] in (b"\r", b"\n"):
            pos = _skip_empty_lines(buffer, pos)
        more = self._more
        if more and buffer.find(b"\r\n\r\n", pos) < 0:
            if pos < len(buffer):
                more.insert(0, buffer[pos:])
            buffer = b"".join(more)
            pos = 0
            self._more = []
            self._more_size = 0
            if buffer[:1] in (b"\r", b"\n"):
                pos = _skip_empty_lines(buffer, 0)
        if pos >= len(buffer):
            self._buffer = b""
            self._offset = 0
            return
        self._head_received(buffer, pos)

    # -- refusing ----------------------------------------------------------

    def _refuse(self, error: BadRequest, request: Any = None) -> None:
        """
        Answer a request rrlb will not serve with C{error}'s status and
        C{Connection: close}, count and log it, and close the connection
        once the answer is out.
        """
        offset = self._offset
        head = self._buffer[offset : offset + MAX_REQUEST_LINE + 2]
        self._state = _CLOSED
        self.deadline = None
        self._decoder = None
        self._buffer = b""
        self._offset = 0
        self._more = []
        self._more_size = 0
        self.persistent = False
        self._holds = 0
        # Read again, so that lingering drains what the client still sends.
        self._go_on_reading(_HELD)
        if request is None:
            request = self.requestFactory(self, len(self.requests))
            self.requests.append(request)
            # For the access log: what can be read of the request line.
            request.method, request.uri, version = request_line_of(head)
            request.clientproto = version if version in (b"HTTP/1.0", b"HTTP/1.1") else b"HTTP/1.1"
        request.content = None
        request.client_error = error.reason
        self._handlingRequest = True
        error_response(
            request, error.code, error.text, ((b"Connection", b"close"),) + error.headers
        )

    def _linger(self) -> None:
        """
        After an error response: send FIN, and read and drop what the client
        still sends for up to L{LINGER_TIMEOUT}, so the answer is not lost
        to a reset.
        """
        self._state = _CLOSED
        transport: Any = self._networkProducer
        transport.unregisterProducer()
        lose_write = getattr(self.transport, "loseWriteConnection", None)
        if lose_write is None or not self.site.linger:
            # No half-close (TLS, a haproxy: listener): close, and cut the
            # client off if it does not take the answer.
            self.transport.loseConnection()
            self.deadline = self.clock.seconds() + self.site.close_timeout
            return
        # Whatever stopped reading before, the client's bytes are dropped now
        # (for LINGER_TIMEOUT at most).
        if self._stops:
            self._stops = 0
            self.transport.resumeProducing()
        lose_write()
        self.deadline = self.clock.seconds() + LINGER_TIMEOUT

    def loseConnection(self) -> None:
        """
        Close the connection once what was written to it has gone out; if the
        client takes none of it for the site's C{close_timeout}, the sweep
        cuts it off.
        """
        self._state = _CLOSED
        self.deadline = self.clock.seconds() + self.site.close_timeout
        super().loseConnection()

    def timed_out(self) -> None:
        """
        The deadline passed: what that means depends on what the connection
        was doing.
        """
        state = self._state
        if state == _HEAD:
            self._refuse(BadRequest(408, HEADER_TIMEOUT, "the request head took too long"))
        elif state == _BODY:
            self._body_failed(BadRequest(408, BODY_TIMEOUT, "the request body took too long"))
        elif state == _IDLE:
            self._state = _CLOSED
            self.loseConnection()
        elif state == _CLOSED:
            self.transport.abortConnection()

    # -- drain ---------------------------------------------------------------

    def close_when_idle(self) -> None:
        """
        For a drain: close now if no request is in progress, else finish the
        one in progress with C{Connection: close} and close after it.
        """
        if not self.requests:
            self._state = _CLOSED
            self.loseConnection()
            return
        self.persistent = False
        self.closing = True

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        if self.closing:
            headers.setRawHeaders(b"Connection", [b"close"])
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        extend = parts.extend
        for name, values in headers.getAllRawHeaders():
            for value in values:
                extend((name, b": ", value, b"\r\n"))
        parts.append(b"\r\n")
        self.transport.write(b"".join(parts))


class ClientSite(server.Site):
    """
    A L{server.Site} that keeps its open channels: it times them out in one
    sweep (no timer per connection or request), pauses its listening ports
    at C{max_connections} and resumes them below it, and hands the drain
    the channels to close.

    A connection on a C{haproxy:} listener holds its place from accept: it
    is in L{waiting} until its PROXY header has come (L{rrlb.proxyproto}),
    then in L{channels}.

    @ivar ports: the listening ports to pause and resume (the service adds
        them once they listen).
    @ivar streams: places under C{max_connections} taken by HTTP/2 streams
        beyond the first of their connection (L{stream_opened}).
    @ivar waiting: connections waiting for their PROXY header.
    @ivar parked: connections accepted past the cap (Twisted accepts several
        per wake-up), unread until a place is free.
    @ivar linger: read and drop what a refused client still sends before
        closing (off in tests that use in-memory transports).
    @ivar close_timeout: how long a connection rrlb closes may take to send
        what is left of its last response (L{CLOSE_TIMEOUT}).
    """

    linger = True
    close_timeout = CLOSE_TIMEOUT

    def __init__(self, resource: Any, clock: Any, limits: ClientLimits, **kw: Any) -> None:
        # No twisted.web timeout: the sweep does every client timeout.
        server.Site.__init__(self, resource, timeout=None, reactor=clock, **kw)
        self.clock = clock
        self.limits = limits
        self.channels: set[ProxyChannel] = set()
        self.waiting: set[Any] = set()
        self.on_channel_lost: Optional[Callable[[], None]] = None
        self.ports: list[Any] = []
        self.parked: list[Any] = []
        self.streams = 0
        self.paused = False
        self._sweep_call: Any = None

    @property
    def open_count(self) -> int:
        """
        The client connections open, those waiting for a PROXY header too
        (C{rrlb_client_connections}).
        """
        return len(self.channels) + len(self.waiting)

    @property
    def taken(self) -> int:
        """
        The places taken under C{max_connections}: every client connection
        (from accept), and the HTTP/2 streams beyond the first of theirs.
        """
        return len(self.channels) + len(self.waiting) + self.streams

    def add_port(self, port: Any) -> Any:
        self.ports.append(port)
        read = getattr(port, "doRead", None)
        if read is not None and hasattr(port, "numberAccepts"):
            # Twisted's port accepts up to numberAccepts clients per wake-up
            # (a hundred at first): never more than there are places for,
            # or a burst would hold descriptors past the cap, parked.
            def doRead() -> Any:
                room = self.limits.max_connections - self.taken
                port.numberAccepts = max(1, min(port.numberAccepts, room))
                return read()

            port.doRead = doRead
        if self.paused:
            port.stopReading()
        return port

    def _park(self, connection: Any) -> None:
        # Twisted accepts several clients per wake-up, so a few may come in
        # past the cap: they wait, unread, for a free place.
        connection.transport.pauseProducing()
        self.parked.append(connection)
        if not self.paused:
            self.pause_accepting()

    def channel_opened(self, channel: ProxyChannel) -> None:
        channels = self.channels
        if channel not in channels:
            # (One that waited for its PROXY header is in already.)
            if self.taken >= self.limits.max_connections:
                channel.deadline = None
                self._park(channel)
                return
            channels.add(channel)
        if self.taken >= self.limits.max_connections and not self.paused:
            self.pause_accepting()
        if self._sweep_call is None:
            self._sweep_call = self.clock.callLater(self.sweep_interval(), self._sweep)

    def header_awaited(self, connection: Any) -> bool:
        """
        C{connection} was accepted on a C{haproxy:} listener and waits for
        its PROXY header: it holds a place from now on.

        @return: whether it has one; if not, it is parked (unread) until a
            place is free, and then its C{admitted()} is called.
        """
        if self.taken >= self.limits.max_connections:
            self._park(connection)
            return False
        self.waiting.add(connection)
        if self.taken >= self.limits.max_connections and not self.paused:
            self.pause_accepting()
        return True

    def header_arrived(self, connection: Any, channel: ProxyChannel) -> None:
        """
        The PROXY header of C{connection} came: C{channel}, about to be
        connected, takes over its place.
        """
        self.waiting.discard(connection)
        self.channels.add(channel)

    def channel_closed(self, channel: Any) -> None:
        """
        C{channel} (a L{ProxyChannel}, or a connection still waiting for its
        PROXY header) is gone: its place goes to the first parked one.
        """
        channels = self.channels
        if channel in channels:
            channels.discard(channel)
        elif channel in self.waiting:
            self.waiting.discard(channel)
        elif channel in self.parked:
            self.parked.remove(channel)
        self._room_freed()
        if self.on_channel_lost is not None:
            self.on_channel_lost()

    def stream_opened(self) -> bool:
        """
        An HTTP/2 connection opens a stream beside those it has open: each
        may hold a node connection, so it takes a place under
        C{max_connections} as a client connection does. Returns C{False},
        taking nothing, when there is no place left (the stream is refused).
        """
        if self.taken >= self.limits.max_connections:
            return False
        self.streams += 1
        if self.taken >= self.limits.max_connections and not self.paused:
            self.pause_accepting()
        return True

    def stream_closed(self) -> None:
        """
        A stream that took a place with L{stream_opened} ended.
        """
        self.streams -= 1
        self._room_freed()

    def _room_freed(self) -> None:
        """
        A place may be free: a client held unread takes it, and accepting
        resumes if there is still room.
        """
        channels = self.channels
        room = self.limits.max_connections - self.taken
        while self.parked and room > 0:
            parked = self.parked.pop(0)
            room -= 1
            if isinstance(parked, ProxyChannel):
                channels.add(parked)
                parked.deadline = self.clock.seconds() + self.limits.header_timeout
            else:
                self.waiting.add(parked)
                parked.admitted()
            parked.transport.resumeProducing()
        if not channels:
            self.stop_sweeping()
        elif self._sweep_call is None:
            self._sweep_call = self.clock.callLater(self.sweep_interval(), self._sweep)
        if self.paused and room > 0:
            self.resume_accepting()

    def client_list(self, limit: int = MAX_LISTED_CLIENTS) -> list[dict[str, Any]]:
        """
        The open client connections for C{/status} (the longest-open first,
        at most C{limit}): who the client is (behind trusted proxies: the
        real client of its latest request), its peer, what it is doing and
        how many requests it has had answered.
        """
        listed = sorted(self.channels, key=lambda c: c.opened)[:limit]
        return [
            {
                "client": channel.client_address,
                "peer": channel.forwarded[1].decode("ascii", "replace"),
                "state": _STATE_NAMES[channel._state],
                "requests": channel.served,
                "since": channel.opened,
            }
            for channel in listed
        ]

    def close_parked(self) -> None:
        """
        At shutdown: close the clients waiting for a place (they sent
        nothing that was read), and those still waiting for their PROXY
        header (no request of theirs has begun).
        """
        parked, self.parked = self.parked, []
        waiting, self.waiting = self.waiting, set()
        for connection in parked + list(waiting):
            connection.transport.abortConnection()

    def pause_accepting(self) -> None:
        """
        Stop accepting: new clients wait in the kernel's listen backlog.
        """
        self.paused = True
        log.warn(
            "{count} client connections open (--max-connections): not accepting more"
            " until one closes",
            count=self.open_count,
        )
        for port in self.ports:
            port.stopReading()

    def resume_accepting(self) -> None:
        self.paused = False
        log.info("below --max-connections again: accepting clients")
        for port in self.ports:
            if getattr(port, "connected", False) and not getattr(port, "disconnecting", False):
                port.startReading()

    def set_limits(self, limits: ClientLimits) -> None:
        """
        A reload: new limits apply to connections from now on; a lower
        C{max_connections} pauses accepting until enough have closed.
        """
        self.limits = limits
        over = self.taken >= limits.max_connections
        if over and not self.paused:
            self.pause_accepting()
        elif not over and self.paused:
            self.resume_accepting()

    # -- timeouts -------------------------------------------------------------

    def sweep_interval(self) -> float:
        limits = self.limits
        shortest = min(
            limits.header_timeout, limits.body_timeout, limits.keepalive_timeout, LINGER_TIMEOUT
        )
        return min(MAX_SWEEP_INTERVAL, shortest / 4)

    def _sweep(self) -> None:
        self._sweep_call = None
        now = self.clock.seconds()
        expired = [c for c in self.channels if c.deadline is not None and now >= c.deadline]
        for channel in expired:
            channel.deadline = None
            try:
                channel.timed_out()
            except Exception:
                log.failure("timing out a client connection")
        if self.channels:
            self._sweep_call = self.clock.callLater(self.sweep_interval(), self._sweep)

    def stop_sweeping(self) -> None:
        call, self._sweep_call = self._sweep_call, None
        if call is not None and call.active():
            call.cancel()
