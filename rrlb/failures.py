# -*- test-case-name: tests.test_health -*-
"""
Words for failures: what went wrong talking to a node, said once for the
proxy (a 502's text, the access log) and the health checker (a node's
status) alike.
"""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.python.failure import Failure
from twisted.web import client as webclient

from rrlb.tls import describe_tls_error


def describe_failure(reason: Failure) -> str:
    """
    A short, single-line reason for an upstream failure, for logs and status.
    """
    exc = reason.value
    if isinstance(exc, (webclient.ResponseNeverReceived, webclient.RequestTransmissionFailed)):
        inner = getattr(exc, "reasons", None)
        if inner:
            return describe_failure(inner[0])
    if isinstance(exc, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (defer.TimeoutError, error.TimeoutError, defer.CancelledError)):
        return "timed out"
    if isinstance(exc, error.ConnectionLost):
        return "connection reset"
    if isinstance(exc, error.DNSLookupError):
        return "host name lookup failed"
    tls = describe_tls_error(exc)
    if tls is not None:
        return tls
    text = str(exc) or type(exc).__name__
    # OpenSSL errors carry a list of tuples; keep the most telling part.
    text = " ".join(text.split())
    return f"{type(exc).__name__}: {text}"[:300]
