# -*- test-case-name: tests.test_twisted_private -*-
"""
Every private Twisted name rrlb leans on, in one place.

Each is a maintenance risk: a Twisted release may rename or change it
without notice. tests/test_twisted_private.py checks each one against the
installed Twisted, so such a release fails that test loudly instead of
failing requests quietly.

  - L{Headers._rawHeaders}: the dict of canonical name -> list of values a
    L{Headers} keeps. The request parser and the upstream client build that
    dict in one pass and hand it over whole, and the proxy reads it in one
    pass, instead of a method call per header.
  - C{twisted.web.http_headers._nameEncoder}: how L{Headers} spells a header
    name (C{content-type} -> C{Content-Type}); only asked once per distinct
    name, the answers are cached here.
  - L{HTTPChannel}'s producer state (C{_networkProducer},
    C{_requestProducer}, read through L{network_producer} and
    L{request_producer}): L{rrlb.channel} replaces the channel's parsing,
    and L{rrlb.connection} its C{pauseProducing}/C{resumeProducing} (to
    count its reasons not to read), but keeps the rest of its backpressure
    between the transport and the request (C{registerProducer} and
    C{unregisterProducer} set these).
  - L{Request._disconnected}: whether the client went away.
  - L{Request.__init__}'s work: L{init_request} sets what it sets, more
    cheaply (see there); the test compares the two attribute by attribute.
  - C{twisted.web.client._HTTP11ClientFactory} and
    C{HTTPConnectionPool._factory}: L{quiet_connection_pool} makes the
    health checker's connections not log their start and stop (one pair per
    probe would flood the log); there is no public switch.
  - C{twisted.internet.endpoints._SystemdParser._sddaemon}: the descriptors
    C{systemd:} endpoints take. L{systemd_descriptors} reads it and
    L{adopt_systemd_descriptors} replaces it, for L{rrlb.notify}'s recovery
    of sockets passed without C{LISTEN_FDNAMES} (there is no public way to
    hand the parser descriptors).
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.python.components import Componentized
from twisted.python.systemd import ListenFDs
from twisted.web import client as _webclient
from twisted.web.http_headers import Headers, InvalidHeaderName, _nameEncoder

__all__ = [
    "canonical_name",
    "raw_headers",
    "RAW_HEADERS_SLOT",
    "set_raw_headers",
    "client_gone",
    "init_request",
    "request_producer",
    "network_producer",
    "HeaderNameError",
    "quiet_connection_pool",
    "systemd_descriptors",
    "adopt_systemd_descriptors",
]

HeaderNameError = InvalidHeaderName

# Distinct names seen so far; an attacker sending random names can fill it
# up to the cap, after which new names are encoded without being cached.
_NAME_CACHE_SIZE = 4096
_names: dict[bytes, bytes] = {}


def canonical_name(name: bytes) -> bytes:
    """
    A header name as L{Headers} keys it.

    @raise HeaderNameError: C{name} is not an RFC 9110 token.
    """
    key = _names.get(name)
    if key is None:
        key = _nameEncoder.encode(name)
        if len(_names) < _NAME_CACHE_SIZE:
            _names[name] = key
    return key


def name_cache() -> dict[bytes, bytes]:
    """
    The cache behind L{canonical_name}, for parsers that look names up
    inline (a dict lookup instead of a function call per header).
    """
    return _names


# The slot L{Headers} keeps that dict in, as a descriptor: a subclass names
# it under a name of its own (L{rrlb.filterheaders.FilterHeaders._raw}) and
# reads the dict at the cost of an attribute, without a call.
RAW_HEADERS_SLOT: Any = Headers.__dict__["_rawHeaders"]


def raw_headers(headers: Headers) -> dict[bytes, list[bytes]]:
    """
    The canonical name -> values dict inside C{headers} (not a copy).
    """
    return headers._rawHeaders


def set_raw_headers(headers: Headers, raw: dict[bytes, list[bytes]]) -> None:
    """
    Make C{raw} (keyed by L{canonical_name}, values free of CR, LF and NUL)
    the contents of C{headers}.
    """
    headers._rawHeaders = raw


def client_gone(request: Any) -> bool:
    """
    Whether the client of a L{twisted.web.http.Request} went away.
    """
    return bool(request._disconnected)


def init_request(request: Any, channel: Any, headers: type[Headers] = Headers) -> None:
    """
    Set up C{request} (a L{twisted.web.server.Request}) of C{channel} as
    C{Request.__init__} does, without calling it. Twisted's constructor
    evaluates its attribute annotations (C{Deferred[None]}, C{dict[bytes,
    bytes]}, ...) on every call and asks the transport for both addresses,
    which together doubled the cost of making a request (6 us against
    13-15 us per request on the bench machine); the channel
    (L{rrlb.connection.ClientConnection}) has the addresses already. Only
    public attributes and L{Componentized}'s own constructor, but for the
    form-parsing flag, which only C{Request.requestReceived} reads (rrlb's
    requests override it). tests/test_twisted_private.py checks that this
    sets every other attribute Twisted's constructor sets, to the same
    values.

    @param headers: the class of both headers objects (L{Headers}, or a
        subclass of it).
    """
    request.notifications = []
    request.channel = channel
    request.client = channel.peer
    request.host = channel.local
    request.requestHeaders = headers()
    request.received_cookies = {}
    request.responseHeaders = headers()
    request.cookies = []
    request.transport = channel.transport
    request.queued = False
    Componentized.__init__(request)


# The HTTPChannel attributes rrlb.connection reads, through the two
# functions below (see the module docstring); the test checks that the
# installed Twisted still has them. (HTTPChannel's _handlingRequest and
# _waitingForTransport are read only by the methods ProxyChannel overrides:
# rrlb keeps that state under its own names, ClientConnection.in_request and
# client_full.)
CHANNEL_STATE = ("_networkProducer", "_requestProducer")


def request_producer(channel: Any) -> Any:
    """
    The producer the request registered on C{channel} (the node's
    connection while a response streams), or L{None}.
    """
    return channel._requestProducer


def network_producer(channel: Any) -> Any:
    """
    The transport C{channel} registered itself on as a producer.
    """
    return channel._networkProducer


def header_values(headers: Headers, name: bytes) -> Optional[list[bytes]]:
    """
    The values of a header given by its canonical name, or L{None}.
    """
    return headers._rawHeaders.get(name)


class _QuietFactory(_webclient._HTTP11ClientFactory):
    noisy = False


class _QuietConnectionPool(_webclient.HTTPConnectionPool):
    _factory = _QuietFactory


def quiet_connection_pool(reactor: Any, persistent: bool = True) -> _webclient.HTTPConnectionPool:
    """
    An L{HTTPConnectionPool} whose connections do not log their start and
    stop.
    """
    return _QuietConnectionPool(reactor, persistent=persistent)


def _systemd_parser() -> Any:
    from twisted.internet.endpoints import _SystemdParser

    return _SystemdParser


def systemd_descriptors() -> ListenFDs:
    """
    The descriptors C{systemd:} endpoints take (what Twisted read from
    C{LISTEN_FDS} when L{twisted.internet.endpoints} was imported).
    """
    return _systemd_parser()._sddaemon


def adopt_systemd_descriptors(descriptors: ListenFDs) -> None:
    """
    Make C{descriptors} the ones C{systemd:} endpoints take from now on.
    """
    _systemd_parser()._sddaemon = descriptors


def bind_synchronously(service: Any) -> None:
    """
    Make a L{StreamServerEndpointService} bind in C{privilegedStartService}
    and raise a failure to bind there (its C{_raiseSynchronously}), so a
    port that cannot be had stops the start with one line.
    """
    service._raiseSynchronously = True


def port_waiting(service: Any) -> Any:
    """
    The Deferred of a L{StreamServerEndpointService}'s listening port
    (its C{_waitingForPort}), or L{None} before it started listening.
    """
    return service._waitingForPort


def clear_exit_signal(reactor: Any, signals: tuple[int, ...]) -> None:
    """
    Forget that the reactor was stopped by one of C{signals} (its
    C{_exitSignal}): twistd re-raises that signal on itself once the
    reactor has stopped, so a drained shutdown would end "killed by
    SIGTERM" instead of exiting 0.
    """
    if getattr(reactor, "_exitSignal", None) in signals:
        reactor._exitSignal = None
