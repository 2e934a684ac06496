# -*- test-case-name: tests.test_proxyproto -*-
"""
The PROXY protocol (HAProxy's, versions 1 and 2) both ways.

Receiving: a C{haproxy:} listener (C{--listen haproxy:tcp:8080}) is
Twisted's own L{proxyEndpoint} wrapper, whose transport's C{getPeer()} and
C{getHost()} answer with the addresses of the header. Twisted connects the
protocol it wraps at once, though, before the header has been read, when
C{getPeer()} is still the load balancer's address: L{ProxyHeaderEndpoint}
connects rrlb's channel only once the header (and the first bytes after it)
have arrived, so everything the channel works out from its peer (the client
address for C{X-Forwarded-For} and the access log) is the client's.

Such a connection holds a C{--max-connections} place from accept, and has
L{PROXY_HEADER_TIMEOUT} for its header; with C{proxy_protocol_from} set, one
from any other peer is closed at accept, before a byte of it is read (like
nginx's C{set_real_ip_from}, except that the connection is refused rather
than taken without the header's address: a listener that expects the header
cannot serve a connection without one).

Sending: L{proxy_header} builds the header a node with C{send_proxy} gets at
the start of each new connection (see L{rrlb.upstream.UpstreamPool}); the
health checker's connections to it start with L{local_header}, a header for
a connection of the balancer's own (L{ProbeEndpoints}), as HAProxy's checks
do: a node that takes PROXY connections only refuses any other.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any, Callable, Optional

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHandshakeListener,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from rrlb.clients import ClientSite, is_trusted

log = Logger()

# How long a connection to a haproxy: listener may take to send its PROXY
# header (and, behind it, the TLS handshake and the first request bytes)
# before it is dropped, as HAProxy's "timeout client" bounds its handshakes.
# The channel's own timeouts start after that. (A load balancer sends the
# header as soon as it has connected.)
PROXY_HEADER_TIMEOUT = 10.0
# The most often a closed connection from outside proxy_protocol_from is
# logged.
REFUSAL_LOG_INTERVAL = 60.0

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21  # version 2, command PROXY
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21
_V2_UNSPEC = 0x00


def checked_address(address: Any) -> Any:
    """
    C{address} (a Twisted address from a PROXY header) if it is an IP
    address of the family its type names with a port from 0 to 65535, in
    the usual spelling (an IPv6 address compressed); L{None} if not. Other
    kinds of address (a UNIX socket, v2's LOCAL) are taken as they are.
    """
    family = _family(address)
    if family is None:
        return address
    try:
        parsed = ipaddress.ip_address(address.host)
    except ValueError:
        return None
    if (parsed.version == 4) != (family == socket.AF_INET):
        return None
    if not 0 <= address.port <= 65535:
        return None
    spelled = str(parsed)
    if spelled == address.host:
        return address
    return type(address)("TCP", spelled, address.port)


def _family(address: Any) -> Optional[int]:
    if isinstance(address, IPv4Address):
        return socket.AF_INET
    if isinstance(address, IPv6Address):
        return socket.AF_INET6
    return None


def proxy_header(version: str, source: Any, destination: Any) -> bytes:
    """
    The PROXY protocol header (C{"v1"} or C{"v2"}) for a TCP connection from
    C{source} to C{destination} (Twisted addresses). Anything that is not a
    pair of IPv4 or of IPv6 addresses (a client on a UNIX socket) is sent as
    an unknown source, which the node treats as a connection of its own.
    """
    family = _family(source)
    if (
        family is None
        or family != _family(destination)
        or checked_address(source) is None
        or checked_address(destination) is None
    ):
        return b"PROXY UNKNOWN\r\n" if version == "v1" else V2_SIGNATURE + b"\x21\x00\x00\x00"
    src_host = source.host.split("%", 1)[0]
    dst_host = destination.host.split("%", 1)[0]
    if version == "v1":
        return b"PROXY %s %s %s %d %d\r\n" % (
            b"TCP4" if family == socket.AF_INET else b"TCP6",
            src_host.encode("ascii"),
            dst_host.encode("ascii"),
            source.port,
            destination.port,
        )
    addresses = (
        socket.inet_pton(family, src_host)
        + socket.inet_pton(family, dst_host)
        + struct.pack("!HH", source.port, destination.port)
    )
    kind = _V2_TCP4 if family == socket.AF_INET else _V2_TCP6
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, kind, len(addresses)) + addresses


def local_header(version: str, transport: Any) -> bytes:
    """
    The header of a connection the balancer makes on its own behalf (a
    health check): v2's C{LOCAL} command; in v1, which has no such command,
    the connection's own addresses. (Not v1's C{UNKNOWN}: Twisted's parser,
    for one, refuses the bare C{PROXY UNKNOWN} line.)
    """
    if version == "v1":
        return proxy_header(version, transport.getHost(), transport.getPeer())
    return V2_SIGNATURE + b"\x20\x00\x00\x00"


@implementer(IHandshakeListener)
class _AwaitProxyHeader(Protocol):
    """
    Stands in for the channel until Twisted's PROXY wrapper (or the TLS
    layer over it) hands on the first bytes after the header; then builds
    the channel, connects it to the wrapper and steps out of the way, so
    each later byte costs no extra call.

    It holds a place under C{--max-connections} from accept (see
    L{ClientSite.header_awaited}), and has L{PROXY_HEADER_TIMEOUT} from
    then for the header and what comes before the first request bytes.
    """

    def __init__(self, factory: _AfterProxyHeaderFactory, addr: Any) -> None:
        self.factory = factory
        self.addr = addr
        self._timer: Any = None
        self.handshake_done = False

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def connectionMade(self) -> None:
        factory = self.factory
        site = factory.site
        networks = site.limits.proxy_protocol_from
        if networks:
            # Before the header, getPeer() is the TCP peer itself. A UNIX
            # socket's peer has no address: its file's permissions decide.
            transport: Any = self.transport
            host = getattr(transport.getPeer(), "host", None)
            if isinstance(host, str) and not is_trusted(host, networks):
                factory.refused(host)
                transport.abortConnection()
                return
        if site.header_awaited(self):
            self.admitted()

    def admitted(self) -> None:
        """
        The connection has a place: its header timeout starts.
        """
        factory = self.factory
        self._timer = factory.clock.callLater(factory.timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._timer = None
        self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        wrapper: Any = self.transport
        # Twisted's parser takes the header's words as they are: what it
        # carries must be an address of the family it names and a port, or
        # the connection is dropped like one with a broken header.
        client = checked_address(wrapper.getPeer())
        if client is None:
            wrapper.abortConnection()
            return
        site = self.factory.site
        channel = site.buildProtocol(self.addr)
        if channel is None:
            wrapper.loseConnection()
            return
        site.header_arrived(self, channel)
        # ProtocolWrapper.wrappedProtocol (Twisted's PROXY wrapper, or the
        # TLS protocol) is documented: point it at the channel directly.
        wrapper.wrappedProtocol = channel
        channel.makeConnection(wrapper)
        if self.handshake_done and IHandshakeListener.providedBy(channel):
            # The TLS handshake ended before the channel existed.
            channel.handshakeCompleted()
        set_peer = getattr(channel, "set_peer", None)
        if set_peer is not None and client is not wrapper.getPeer():
            set_peer(client)  # the address in its usual spelling
        channel.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # No header (or nothing after it) came: there is no channel to
        # tell, but its place is free.
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.factory.site.channel_closed(self)


class _AfterProxyHeaderFactory(Factory):
    """
    Builds an L{_AwaitProxyHeader} per connection for C{site}.
    """

    noisy = False

    def __init__(self, site: ClientSite, clock: IReactorTime, timeout: float) -> None:
        self.site = site
        self.clock = clock
        self.timeout = timeout
        self.refusals = 0
        self._next_refusal_log = 0.0

    def doStart(self) -> None:
        self.site.doStart()

    def doStop(self) -> None:
        self.site.doStop()

    def logPrefix(self) -> str:
        return self.site.logPrefix()

    def buildProtocol(self, addr: Any) -> _AwaitProxyHeader:
        return _AwaitProxyHeader(self, addr)

    def refused(self, host: str) -> None:
        """
        A connection from C{host}, outside C{proxy_protocol_from}, was
        closed: say so, at most once every L{REFUSAL_LOG_INTERVAL}.
        """
        self.refusals += 1
        now = self.clock.seconds()
        if now < self._next_refusal_log:
            return
        self._next_refusal_log = now + REFUSAL_LOG_INTERVAL
        log.warn(
            "closed a connection from {peer}: it is not in proxy_protocol_from, so its"
            " PROXY header is not believed ({count} such connections closed so far;"
            " logged at most once a minute)",
            peer=host,
            count=self.refusals,
        )


@implementer(IStreamServerEndpoint)
class ProxyHeaderEndpoint:
    """
    A C{haproxy:} listener: Twisted's L{proxyEndpoint} around C{wrapped},
    the channel connected once the header is read (see the module
    docstring), and rrlb's TLS, if the listener serves it, after the header
    in the clear: a TCP load balancer passes TLS through and puts its header
    before it.

    @param tls: the L{rrlb.tls.ServerTLS} of the listener, or L{None}.
    """

    def __init__(
        self,
        wrapped: IStreamServerEndpoint,
        clock: IReactorTime,
        tls: Any = None,
        timeout: float = PROXY_HEADER_TIMEOUT,
    ) -> None:
        self.wrapped = wrapped
        self.clock = clock
        self.tls = tls
        self.timeout = timeout

    def listen(self, factory: Any) -> Any:
        """
        Listen for C{factory}, a L{ClientSite} (whose limits and counts the
        connections waiting for their header share).
        """
        inner: Any = _AfterProxyHeaderFactory(factory, self.clock, self.timeout)
        if self.tls is not None:
            inner = TLSMemoryBIOFactory(self.tls, False, inner)
        return proxyEndpoint(self.wrapped).listen(inner)

    def __repr__(self) -> str:
        return f"<ProxyHeaderEndpoint {self.wrapped!r}>"


class _HeaderFirst(ProtocolWrapper):
    """
    Writes a PROXY header before anything of the protocol it wraps.
    """

    def makeConnection(self, transport: Any) -> None:
        transport.write(local_header(self.factory.version, transport))
        super().makeConnection(transport)


class _HeaderFirstFactory(WrappingFactory):
    protocol = _HeaderFirst
    noisy = False

    def __init__(self, wrapped: Any, version: str) -> None:
        super().__init__(wrapped)
        self.version = version


@implementer(IStreamClientEndpoint)
class _SendHeaderEndpoint:
    def __init__(self, wrapped: IStreamClientEndpoint, version: str) -> None:
        self.wrapped = wrapped
        self.version = version

    def connect(self, factory: Any) -> Any:
        d: Any = self.wrapped.connect(_HeaderFirstFactory(factory, self.version))
        return d.addCallback(lambda wrapper: wrapper.wrappedProtocol)


@implementer(IAgentEndpointFactory)
class ProbeEndpoints:
    """
    The health checker's endpoints: what L{twisted.web.client.Agent} uses by
    default (L{HostnameEndpoint}, TLS from C{policy}), and for a node with
    C{send_proxy} the L{local_header} first, before any TLS.

    @param send_proxy_for: the C{send_proxy} setting of the node at a host
        and port, or L{None}.
    """

    def __init__(
        self,
        reactor: Any,
        policy: IPolicyForHTTPS,
        send_proxy_for: Callable[[str, int], Optional[str]],
        connect_timeout: Optional[float] = None,
    ) -> None:
        self.reactor = reactor
        self.policy = policy
        self.send_proxy_for = send_proxy_for
        self.connect_timeout = connect_timeout

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self.reactor, host, uri.port, timeout=self.connect_timeout or 30
        )
        version = self.send_proxy_for(host, uri.port)
        if version is not None:
            endpoint = _SendHeaderEndpoint(endpoint, version)
        if uri.scheme == b"https":
            creator = self.policy.creatorForNetloc(uri.host, uri.port)
            endpoint = wrapClientTLS(creator, endpoint)
        return endpoint
