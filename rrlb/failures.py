# -*- test-case-name: tests.test_failures -*-
"""
Whose fault a failure is, and words for it (L{describe_failure}, for the
proxy and the health checker alike). A connection to a node that fails because rrlb
itself is out of a local resource (file descriptors, socket memory, local
ports) says nothing about the node: it is not counted against the node's
health (passive or active), the request gets C{503} rather than C{502},
and L{LocalErrors} logs each burst of such errors once rather than once
per request or probe. Once the resource is free again, traffic flows at
once: no node left the rotation, so none waits for probes to come back.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client as webclient

from rrlb.nodetls import describe_tls_error

log = Logger()

# Errors of connect() (and socket()) that are about this machine, not the
# peer: out of descriptors for the process (EMFILE) or the system (ENFILE),
# out of socket buffers or kernel memory, no free local address or port.
LOCAL_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
)
# Of those, out of descriptors: what closing idle connections helps.
DESCRIPTOR_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})
# What an operator can do about each.
_REMEDIES = {
    errno.EMFILE: "raise the descriptor limit (LimitNOFILE=) or lower --max-connections",
    errno.ENFILE: "the whole system is out of file descriptors (fs.file-max)",
    errno.ENOBUFS: "the kernel is short of socket memory",
    errno.ENOMEM: "the kernel is short of memory",
    errno.EADDRNOTAVAIL: "no local port is free (net.ipv4.ip_local_port_range,"
    " connections in TIME_WAIT)",
}
# A burst of local errors ends after this long without one; then its count
# is logged.
BURST_GAP = 10.0


def local_errno(reason: Failure) -> Optional[int]:
    """
    The errno of C{reason} if it is one of L{LOCAL_ERRNOS}: a connection
    that failed for want of a local resource (as Twisted reports a failed
    C{socket()} or C{connect()}, also inside a twisted.web agent's
    C{ResponseNeverReceived}); L{None} for anything else. A failed host
    name lookup is one if opening a socket fails with one right now.
    """
    exc: Any = reason.value
    # twisted.web.client's wrappers carry the underlying failures.
    for _ in range(3):
        inner = getattr(exc, "reasons", None)
        if not inner or not isinstance(inner[0], Failure):
            break
        exc = inner[0].value
    if isinstance(exc, error.DNSLookupError):
        # A host name lookup (HostnameEndpoint's getaddrinfo, in a thread)
        # that could not open /etc/hosts or a socket reports only "no
        # results": ask the system whether it is out of descriptors now.
        return exhausted_now()
    if isinstance(exc, error.ConnectError):
        code = exc.osError
    elif isinstance(exc, OSError):
        code = exc.errno
    else:
        return None
    return code if code in LOCAL_ERRNOS else None


def exhausted_now() -> Optional[int]:
    """
    The local errno of opening a socket now, if it fails with one: whether
    rrlb is out of a resource at this moment. One system call; only ever
    made when something has already failed.
    """
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    except OSError as e:
        return e.errno if e.errno in LOCAL_ERRNOS else None
    return None


def describe_errno(code: int) -> str:
    """
    C{EMFILE (Too many open files)}, for a log line.
    """
    return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"


class LocalErrors(Service):
    """
    Logs rrlb's own resource errors once per burst: the first of a burst
    says what failed and what to do; when none has come for L{BURST_GAP}
    seconds, one more line says how many there were. One timer per burst,
    none per error.

    @ivar count: every local error so far.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.count = 0
        self._burst = 0
        self._started = 0.0
        self._last = 0.0
        self._call: Any = None

    def failed(self, code: int, what: str) -> None:
        """
        A connection for C{what} (C{"a request to http://10.0.0.1:8080"})
        failed with the local error C{code}.
        """
        now = self.clock.seconds()
        self.count += 1
        self._burst += 1
        self._last = now
        if self._call is not None:
            return
        self._started = now
        log.error(
            "connecting for {what} failed: {error}. This is rrlb's own limit, not the"
            " node's: requests get 503 and node health is unchanged; {remedy}"
            " (logged once per burst)",
            what=what,
            error=describe_errno(code),
            remedy=_REMEDIES.get(code, "a local resource is exhausted"),
        )
        self._call = self.clock.callLater(BURST_GAP, self._burst_over)

    def _burst_over(self) -> None:
        quiet = self.clock.seconds() - self._last
        if quiet < BURST_GAP:
            self._call = self.clock.callLater(BURST_GAP - quiet, self._burst_over)
            return
        self._call = None
        count, self._burst = self._burst, 0
        log.info(
            "local resource errors stopped: {count} connections to nodes failed for"
            " want of one in {seconds:.1f}s",
            count=count,
            seconds=self._last - self._started,
        )

    def stopService(self) -> Any:
        super().stopService()
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        return None


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


def log_text(value: bytes) -> str:
    """
    Request bytes for a log line (only ever formatted when something failed).
    """
    return value.decode("latin-1")[:200]
