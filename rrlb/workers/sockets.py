# -*- test-case-name: tests.test_workers -*-
"""
The listening sockets of C{--workers}: the main process binds every
listener (or takes it from systemd) without serving it, and hands its
sockets to the workers, which adopt them and wrap TLS and the PROXY header
around them themselves.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from rrlb.config import Config
from rrlb.listeners import with_default_backlog
from rrlb.proxyproto import ProxyHeaderEndpoint
from rrlb.tls import ServerTLS, listen_endpoint, listen_kind, split_description, tls_on_tcp

log = Logger()

class SocketGroup:
    """
    The listening sockets of one TCP listener of the main process: one per
    worker, all bound to the same address with C{SO_REUSEPORT}, so the
    kernel spreads new connections evenly over the workers. (On one shared
    socket, whichever worker is awake first takes a whole burst of clients;
    on a small machine, where the other waits for a core, that was every one
    of wrk's connections.)

    Also the listening port L{Listener} sees: C{stopListening} closes them.
    """

    def __init__(self, family: int, interface: str, port: int, backlog: int, count: int) -> None:
        self.family = family
        self.interface = interface
        self.backlog = backlog
        self.sockets: list[Optional[socket.socket]] = []
        self.port = port
        for _ in range(count):
            self.sockets.append(self._bind())

    def _bind(self) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        # Port 0: the first socket chose the port, the others join it.
        self.port = sock.getsockname()[1]
        return sock

    def fileno_for(self, index: int) -> int:
        """
        The socket of worker C{index}: a new one after L{worker_gone}, or,
        if binding again fails (privileges dropped since start-up, for a
        port below 1024), another worker's, which they then share.
        """
        sock = self.sockets[index]
        if sock is None:
            try:
                sock = self.sockets[index] = self._bind()
            except OSError as e:
                shared = next((s for s in self.sockets if s is not None), None)
                if shared is None:
                    raise
                log.warn(
                    "cannot bind port {port} again for worker {index} ({error});"
                    " it shares another worker's socket",
                    port=self.port,
                    index=index,
                    error=e.strerror or e,
                )
                return shared.fileno()
        return sock.fileno()

    def worker_gone(self, index: int) -> None:
        """
        Close the socket of a worker that died, so that new connections go
        to the others until it is back (those it had queued are reset); its
        successor gets a new one.
        """
        sock, self.sockets[index] = self.sockets[index], None
        if sock is not None:
            sock.close()

    def stopReading(self) -> None:
        pass

    def stopListening(self) -> None:
        for i in range(len(self.sockets)):
            self.worker_gone(i)

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address, IPv6Address

        kind = IPv6Address if self.family == socket.AF_INET6 else IPv4Address
        return kind("TCP", self.interface, self.port)


@implementer(IStreamServerEndpoint)
class SocketGroupEndpoint:
    def __init__(self, family: int, interface: str, port: int, backlog: int, count: int) -> None:
        self.args = (family, interface, port, backlog, count)

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        return defer.execute(SocketGroup, *self.args)


def bind_endpoint(reactor: Any, description: str, workers: int) -> IStreamServerEndpoint:
    """
    The endpoint the main process binds for a C{--listen} description: the
    sockets only, without the TLS or PROXY header the workers wrap around
    them. TCP listeners get a L{SocketGroup}; the others (systemd's,
    UNIX sockets) one socket the workers share.
    """
    proxied, kind, inner = listen_kind(with_default_backlog(description))
    if kind in ("tcp", "tcp6", "ssl") and hasattr(socket, "SO_REUSEPORT"):
        args, kwargs = split_description(inner)
        port = args[1] if len(args) > 1 else kwargs.get("port", "")
        interface = kwargs.get("interface", "::" if kind == "tcp6" else "")
        family = socket.AF_INET6 if kind == "tcp6" or ":" in interface else socket.AF_INET
        return SocketGroupEndpoint(
            family, interface, int(port), int(kwargs.get("backlog", "50")), workers
        )
    from twisted.internet.endpoints import serverFromString

    return _Held(serverFromString(reactor, inner))


class HeldForWorkers(Factory):
    """
    The factory of a listening socket the main process only holds: it stops
    reading at once (see L{rrlb.workers.supervisor.WorkersTraffic}), so it never builds
    a protocol; its name is what Twisted's "starting on" line shows.
    """

    noisy = False

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        return None


@implementer(IStreamServerEndpoint)
class _Held:
    def __init__(self, wrapped: IStreamServerEndpoint) -> None:
        self.wrapped = wrapped

    def listen(self, factory: Any) -> Any:
        return self.wrapped.listen(HeldForWorkers())


@implementer(IStreamServerEndpoint)
class _TLSEndpoint:
    def __init__(self, wrapped: IStreamServerEndpoint, tls: Any) -> None:
        self.wrapped = wrapped
        self.tls = tls

    def listen(self, factory: Any) -> Any:
        return self.wrapped.listen(TLSMemoryBIOFactory(self.tls, False, factory))


def adopted_endpoint(
    reactor: Any, description: str, fd: int, config: Config
) -> tuple[IStreamServerEndpoint, Optional[ServerTLS]]:
    """
    The endpoint of a worker for the listening socket C{fd} the main process
    bound for C{description}, with its TLS (the L{rrlb.tls.ServerTLS}, also
    returned) and PROXY header as that description asks. (The worker's site
    has its port accept one client per wake-up: L{rrlb.clients.ClientSite}'s
    C{accepts_per_wakeup}.)
    """
    proxied, kind, _ = listen_kind(description)
    on_tcp = tls_on_tcp(config.listen, config.tls)
    tls = None
    if kind == "ssl" or (kind == "tcp" and on_tcp):
        # Only built, never listened on: the TLS side of the listener.
        tls = listen_endpoint(None, description, config.tls, on_tcp)[1]
    family = socket.socket(fileno=os.dup(fd))
    try:
        base: IStreamServerEndpoint = AdoptedStreamServerEndpoint(reactor, fd, family.family)
    finally:
        family.close()
    if proxied:
        return ProxyHeaderEndpoint(base, reactor, tls), tls
    if tls is not None:
        return _TLSEndpoint(base, tls), tls
    return base, None
