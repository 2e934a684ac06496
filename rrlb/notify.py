# -*- test-case-name: tests.test_notify -*-
"""
rrlb under systemd.

The readiness protocol (sd_notify): C{READY=1} once every listener is
bound, C{RELOADING=1} and C{READY=1} around a reload, C{STOPPING=1} at
shutdown, a one-line C{STATUS=} with the pool's health, and C{WATCHDOG=1}
pings when the unit has C{WatchdogSec=}. Messages are datagrams to the
C{AF_UNIX} socket named by C{NOTIFY_SOCKET} (a path, or an abstract name
written with a leading C{@}). Nothing is sent when it is unset, so rrlb
behaves the same outside systemd. Each message is one C{KEY=value} line in
its own datagram.

Socket activation itself is Twisted's C{systemd:} endpoint; L{recover_listen_fds}
only fills a gap in it (sockets passed without C{LISTEN_FDNAMES}).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Iterable, Mapping, Optional, Union

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from rrlb.pool import Node, Pool, Pools

# Ping the watchdog twice per WATCHDOG_USEC, as sd_watchdog_enabled(3) advises.
WATCHDOG_FRACTION = 0.5
# The first descriptor systemd passes (sd_listen_fds(3): SD_LISTEN_FDS_START).
SD_LISTEN_FDS_START = 3


def notify_address(environ: Mapping[str, str]) -> Optional[Union[str, bytes]]:
    """
    The address of the notification socket named by C{NOTIFY_SOCKET}, or
    L{None} when there is none (or it is a kind rrlb does not speak).
    """
    value = environ.get("NOTIFY_SOCKET", "")
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # An abstract socket: the name is the rest, after a NUL byte.
        return b"\0" + value[1:].encode("utf-8", "surrogateescape")
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> Optional[float]:
    """
    Seconds between C{WATCHDOG=1} pings, or L{None} when the watchdog is off
    or meant for another process (C{WATCHDOG_PID}).
    """
    owner = environ.get("WATCHDOG_PID")
    if owner is not None and owner.strip() != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000 * WATCHDOG_FRACTION


class Notifier:
    """
    Sends sd_notify messages; a no-op when C{NOTIFY_SOCKET} is unset.

    A failed send is logged once and never raised: telling systemd about
    rrlb must never stop rrlb.
    """

    log = Logger()

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.address = notify_address(environ)
        if environ.get("NOTIFY_SOCKET") and self.address is None:
            self.log.warn(
                "NOTIFY_SOCKET={value!r} is not a path or an @abstract name; not notifying",
                value=environ.get("NOTIFY_SOCKET"),
            )
        self._socket: Optional[socket.socket] = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, message: str) -> bool:
        """
        Send one C{KEY=value} message.

        @return: whether it was sent.
        """
        if self.address is None:
            return False
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._socket = sock
            self._socket.sendto(message.encode("utf-8", "replace"), self.address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                self.log.warn(
                    "cannot notify systemd at {address!r}: {error}",
                    address=self.address,
                    error=e.strerror or e,
                )
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def pool_status(pool: Pool | Pools) -> str:
    """
    The one-line summary shown by C{systemctl status}: healthy nodes / total.
    """
    nodes = pool.nodes
    healthy = sum(1 for n in nodes if n.healthy)
    text = f"{healthy}/{len(nodes)} nodes healthy"
    drained = sum(1 for n in nodes if n.drained)
    if drained:
        text += f", {drained} drained"
    return text


def _observe(source: defer.Deferred[Any]) -> defer.Deferred[Any]:
    """
    A Deferred that fires with C{source}'s result, leaving that result in
    place for C{source}'s other users (a listener's C{stopService} needs its
    port) and never cancelling C{source}.
    """
    d: defer.Deferred[Any] = defer.Deferred()

    def passthrough(result: Any) -> Any:
        if d.called:
            pass
        elif isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)
        return result

    source.addBoth(passthrough)
    return d


class SystemdNotify(Service):
    """
    Keeps systemd told of rrlb's state.

    L{rrlb.service.ControlService} calls L{ready_when}, L{reloading}, L{reloaded} and
    L{stopping} at those moments; this service adds the C{STATUS=} updates
    on every health change of the pool and the watchdog pings, which run
    from the reactor, so a stuck reactor stops them and systemd notices.

    @ivar note: an extra remark appended to the status line (the outcome of
        the last reload when it was rejected).
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        pool: Pool | Pools,
        environ: Mapping[str, str],
        pid: int,
        notifier: Optional[Notifier] = None,
    ) -> None:
        self.reactor = reactor
        self.pool = pool
        self.notifier = notifier if notifier is not None else Notifier(environ)
        self.watchdog_interval = watchdog_interval(environ, pid)
        self.note = ""
        self.is_ready = False
        self.is_stopping = False
        self._watchdog: Optional[LoopingCall] = None
        self._waiting: Optional[defer.Deferred[Any]] = None
        pool.add_listener(self._pool_changed)

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled

    def status_line(self) -> str:
        text = pool_status(self.pool)
        if self.note:
            text += f"; {self.note}"
        return text

    def send_status(self) -> None:
        if self.is_ready and not self.is_stopping:
            self.notifier.send("STATUS=" + self.status_line())

    # -- the moments -----------------------------------------------------------

    def ready_when(self, listening: Iterable[defer.Deferred[Any]]) -> None:
        """
        Send C{READY=1} (and the first status) once every Deferred in
        C{listening} has fired with a port; nothing if one of them did not.
        """
        waits = [_observe(w) for w in listening]
        d = defer.gatherResults(waits, consumeErrors=True)
        self._waiting = d

        def bound(ports: list[Any]) -> None:
            self._waiting = None
            if not self.running or self.is_stopping:
                return
            if any(port is None for port in ports):
                self.log.error("not telling systemd READY=1: a listener could not be bound")
                return
            self.ready()

        def failed(reason: Any) -> None:
            self._waiting = None
            if not reason.check(defer.CancelledError):
                self.log.error(
                    "not telling systemd READY=1: a listener failed: {error}",
                    error=reason.getErrorMessage(),
                )

        d.addCallbacks(bound, failed)

    def ready(self) -> None:
        self.is_ready = True
        self.notifier.send("READY=1")
        self.send_status()
        self._start_watchdog()

    def reloading(self) -> None:
        self.notifier.send("RELOADING=1")

    def reloaded(self) -> None:
        self.notifier.send("READY=1")
        self.send_status()

    def stopping(self, why: str = "") -> None:
        if self.is_stopping:
            return
        if self.is_ready and why:
            self.notifier.send("STATUS=" + why)
        self.is_stopping = True
        self.notifier.send("STOPPING=1")

    def _pool_changed(self, node: Node) -> None:
        if self.running:
            self.send_status()

    # -- the watchdog ------------------------------------------------------------

    def _start_watchdog(self) -> None:
        interval = self.watchdog_interval
        if interval is None or self._watchdog is not None or not self.enabled:
            return
        loop = LoopingCall(self.notifier.send, "WATCHDOG=1")
        loop.clock = self.reactor
        self._watchdog = loop
        loop.start(interval, now=True)

    # -- the service ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.is_ready = False
        self.is_stopping = False

    def stopService(self) -> None:
        super().stopService()
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None
        if self._watchdog is not None:
            if self._watchdog.running:
                self._watchdog.stop()
            self._watchdog = None
        self.notifier.close()


# -- socket activation ------------------------------------------------------------


def initial_environ(path: str = "/proc/self/environ") -> dict[str, str]:
    """
    The environment this process was started with (Linux), whatever has
    been removed from C{os.environ} since.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return {}
    environ = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            environ[key.decode("utf-8", "surrogateescape")] = value.decode(
                "utf-8", "surrogateescape"
            )
    return environ


def recover_listen_fds(pid: int, environ: Optional[Mapping[str, str]] = None) -> int:
    """
    Let C{systemd:} endpoints find sockets passed with C{LISTEN_FDS} and
    C{LISTEN_PID} but without C{LISTEN_FDNAMES}.

    Twisted reads (and removes) those variables when
    L{twisted.internet.endpoints} is first imported, and ignores the
    descriptors unless C{LISTEN_FDNAMES} names each one, which systemd
    before 227 and hand-written launchers leave out. This reads the
    environment the process started with and gives Twisted's parser the
    descriptors, named C{unknown} as C{sd_listen_fds_with_names} does.

    @param environ: the environment the process started with (default: read
        from C{/proc/self/environ}).
    @return: the number of descriptors recovered (0 when Twisted already
        has them, or none were passed to this process).
    """
    from twisted.python.systemd import ListenFDs

    from rrlb._twisted import adopt_systemd_descriptors, systemd_descriptors

    if systemd_descriptors().inheritedDescriptors():
        return 0
    if environ is None:
        environ = initial_environ()
    if environ.get("LISTEN_PID", "").strip() != str(pid):
        return 0
    try:
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return 0
    if count <= 0:
        return 0
    start = SD_LISTEN_FDS_START
    descriptors = list(range(start, start + count))
    for fd in descriptors:
        try:
            os.fstat(fd)
        except OSError:
            return 0
    fdnames = environ.get("LISTEN_FDNAMES", "")
    names = fdnames.split(":") if fdnames else []
    if len(names) != count:
        names = ["unknown"] * count
    adopt_systemd_descriptors(ListenFDs(descriptors, tuple(names)))
    return count
