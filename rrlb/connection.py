# -*- test-case-name: tests.test_limits,tests.test_slow_peers -*-
"""
One client connection as a connection, whatever its requests:
L{ClientConnection} works out once what every request on it forwards (the
scheme, the client address, whether its X-Forwarded-* headers are trusted),
keeps the reasons it is not read from, lingers after a refusal, closes when
idle for a drain, and writes a response head as one joined string.

L{rrlb.channel.ProxyChannel} reads the requests on top of it; this module
is below that one and never imports it.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http
from zope.interface import implementer

from rrlb._twisted import network_producer, request_producer
from rrlb.clientcert import ClientCertificate, peer_certificate
from rrlb.clients import LINGER_TIMEOUT, ClientSite, is_trusted
from rrlb.http1 import EDGE_OFF, EDGE_TRUSTED, EDGE_UNTRUSTED

# Why a channel does not read from its client: flags, so that each reason
# is lifted on its own and reading resumes only when none is left.
_AHEAD = 1  # READ_AHEAD bytes of pipelined requests wait to be served
_SENDING = 2  # between requests, the client is not taking its responses
_HELD = 4  # the request body (or a tunnel) is held back (rrlb.body's flags)


_IDLE, _HEAD, _BODY, _BUSY, _CLOSED, _TUNNEL = range(6)
_STATE_NAMES = ("idle", "reading head", "reading body", "in progress", "closing", "tunnel")


@implementer(IHandshakeListener)
class ClientConnection(http.HTTPChannel):
    """
    An HTTP/1.1 connection from a client, as a connection: its addresses,
    its state, reading or not, lingering, closing.

    @ivar deadline: when the sweep of L{ClientSite} times this connection
        out (its idle, head, body or linger time runs out), or L{None}.
    @ivar client_cert: the certificate the client showed in its TLS
        handshake (C{tls.client_auth}), verified, or L{None}.
    """

    forwarded: tuple[bytes, bytes] = (b"http", b"")
    edge = EDGE_OFF
    client_cert: Optional[ClientCertificate] = None
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
    # rrlb's own producer state (HTTPChannel keeps its own under private
    # names, which only its methods that rrlb overrides read): a request is
    # being handled, and the client's write buffer is full.
    in_request = False
    client_full = False
    transport: Any
    site: ClientSite

    def __init__(self) -> None:
        super().__init__()
        self._state = _IDLE
        self._stops = 0
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

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake is over: keep what every request on the connection
        tells the nodes of the client's certificate (once per connection; a
        client asked for none has none).
        """
        self.client_cert = peer_certificate(self.transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._state = _CLOSED
        self.deadline = None
        super().connectionLost(reason)
        self.site.channel_closed(self)

    @property
    def state_name(self) -> str:
        """
        What the connection is doing, in words (for C{/status}).
        """
        return _STATE_NAMES[self._state]

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
        self.client_full = True
        producer = request_producer(self)
        if producer is not None:
            producer.pauseProducing()
        if not self.in_request:
            self._stop_reading(_SENDING)

    def resumeProducing(self) -> None:
        """
        The client's write buffer drained: the response goes on, the next
        request starts if it was waiting for that, and reading goes on
        unless another reason still stops it.
        """
        self.client_full = False
        producer = request_producer(self)
        if producer is not None:
            producer.resumeProducing()
        self._go_on_reading(_SENDING)
        if self._next_waits:
            self._next_waits = False
            if self._state == _IDLE:
                self._next_requests()

    def _next_requests(self) -> None:
        """
        Serve the requests read ahead, or wait for the next one (the
        subclass reads requests: L{rrlb.channel.ProxyChannel}).
        """
        raise NotImplementedError

    # -- closing -------------------------------------------------------------

    def _linger(self) -> None:
        """
        After an error response: send FIN, and read and drop what the client
        still sends for up to L{LINGER_TIMEOUT}, so the answer is not lost
        to a reset.
        """
        self._state = _CLOSED
        transport: Any = network_producer(self)
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
