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
  - L{HTTPChannel}'s producer state (C{_handlingRequest},
    C{_networkProducer}, C{_waitingForTransport}, C{_requestProducer}):
    L{rrlb.channel} replaces the channel's parsing, and L{rrlb.connection}
    its C{pauseProducing}/C{resumeProducing} (to count its reasons not to read),
    but keeps the rest of its backpressure between the transport and the
    request, which reads these.
  - L{Request._disconnected}: whether the client went away.
  - With C{--http2} only, L{rrlb.http2} subclasses the private
    L{twisted.web._http2} (Twisted's own HTTP/2, there is no public one): it
    overrides the event handlers of C{H2Connection} and C{H2Stream} named in
    L{H2_OVERRIDES} and uses the attributes in L{H2_STATE} (with
    L{rrlb.h2buffers}, which bounds what they hold). Its per-stream
    send queues (C{_outboundStreamQueues}) are rrlb's own deques, which
    Twisted's send loop only appends to and pops from.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.web.http_headers import Headers, InvalidHeaderName, _nameEncoder

__all__ = ["canonical_name", "raw_headers", "set_raw_headers", "client_gone", "HeaderNameError"]

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


# The HTTPChannel attributes rrlb.channel and rrlb.connection read or set
# (see the module docstring); the test checks that the installed Twisted
# still has them.
CHANNEL_STATE = ("_handlingRequest", "_networkProducer", "_waitingForTransport", "_requestProducer")


def header_values(headers: Headers, name: bytes) -> Optional[list[bytes]]:
    """
    The values of a header given by its canonical name, or L{None}.
    """
    return headers._rawHeaders.get(name)


# What rrlb.http2 overrides and uses of twisted.web._http2 (see the module
# docstring); the test checks that the installed Twisted still has them.
H2_OVERRIDES = {
    "H2Connection": (
        "_requestReceived",
        "_requestDataReceived",
        "_requestEnded",
        "_requestAborted",
        "_requestDone",
        "_handlePriorityUpdate",
        "pauseProducing",
        "resumeProducing",
        "remainingOutboundWindow",
    ),
    "H2Stream": (
        "_convertHeaders",
        "receiveDataChunk",
        "requestComplete",
        "writeHeaders",
        "registerProducer",
        "flowControlBlocked",
        "windowUpdated",
    ),
}
H2_STATE = {
    "H2Connection": (
        "_streamCleanupCallbacks",
        "_outboundStreamQueues",
        "_consumerBlocked",
        "_tryToWriteControlData",
        "_send100Continue",
        "_streamIsActive",
        "openStreamWindow",
        "writeHeaders",
        "priority",
        "streams",
        "conn",
    ),
    "H2Stream": ("_conn", "_request", "streamID", "command", "path", "producer"),
}
