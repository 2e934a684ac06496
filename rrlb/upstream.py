# -*- test-case-name: tests.test_upstream -*-
"""
A lean HTTP/1.1 client for talking to nodes, with a keep-alive connection
pool per node.

Why not L{twisted.web.client.Agent}: per request it builds a Request, a
Response, two Headers objects, a body producer and a chain of Deferreds, which
costs more CPU than the whole server side of a proxied request. This client
does one write for the request head, parses the response head with a few
C{bytes} splits and hands the body straight to its L{Exchange}-like consumer,
with callbacks instead of Deferreds.

The connection itself, and what its consumer (an I{exchange}) provides,
is L{rrlb.nodeconn.UpstreamProtocol}.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Optional

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from rrlb.nodeconn import MAX_HEADERS, UpstreamProtocol

SEND_TIMEOUT = 60.0
# How long idle connections beyond --max-idle-per-node may stay open.
IDLE_TRIM_DELAY = 1.0
# A node that sends bytes after its responses is logged at most this often.
STRAY_LOG_INTERVAL = 60.0


class _ConnectFactory(ClientFactory):
    """
    Builds the protocol for one new connection and reports its outcome to
    the exchange that asked for it.
    """

    noisy = False

    def __init__(
        self,
        pool: UpstreamPool,
        key: str,
        exchange: Any,
        proxy_header: Optional[bytes] = None,
        tls: Any = None,
    ) -> None:
        self.pool = pool
        self.key = key
        self.exchange = exchange
        self.proxy_header = proxy_header
        self.tls = tls

    def buildProtocol(self, addr: Any) -> UpstreamProtocol:
        protocol = UpstreamProtocol(self.pool, self.key)
        protocol.factory = self
        protocol.proxy_header = self.proxy_header
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        exchange = self.exchange
        self.exchange = None
        if exchange is not None:
            exchange.connect_failed(reason)


class UpstreamPool:
    """
    Keep-alive connections to nodes: at most C{max_idle_per_node} idle ones
    per node, reused most-recent first.

    It also owns the response timeout: a sweep every C{granularity} seconds
    times out exchanges that made no progress for C{timeout} seconds, which
    costs nothing per request beyond a set insertion (no timer per request).

    @ivar tls_creator: called with a node, returns the client connection
        creator for an https node (see L{rrlb.tls}).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        connect_timeout: float = 5.0,
        timeout: float = 30.0,
        max_idle_per_node: int = 32,
        tls_creator: Optional[Callable[[Any], Any]] = None,
        max_headers: int = MAX_HEADERS,
    ) -> None:
        self.reactor: Any = reactor
        self.clock: IReactorTime = reactor
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.max_idle_per_node = max_idle_per_node
        # Node key -> its pool's max_idle_per_node, where that differs.
        self.idle_caps: dict[str, int] = {}
        self.tls_creator = tls_creator
        # Header lines a response may have (--max-headers, as for requests).
        self.max_headers = max_headers
        # Node key -> when its stray bytes were last logged.
        self._stray_logged: dict[str, float] = {}
        # How long a client that paused its response may read nothing
        # (nginx's send_timeout); never less than the response timeout.
        self.send_timeout = SEND_TIMEOUT
        self._idle: dict[str, list[UpstreamProtocol]] = {}
        # Idle connections that began with a PROXY header, per node, keyed by
        # that header (client address and port): never shared between
        # clients, as HAProxy does not share them. Oldest first.
        self._private: dict[str, dict[bytes, UpstreamProtocol]] = {}
        self._connections: set[UpstreamProtocol] = set()
        self._closed_waiters: list[defer.Deferred[None]] = []
        self._watched: set[Any] = set()
        self._sweep_call: Optional[Any] = None
        self._trim_call: Optional[Any] = None
        self._trim_round = 0
        self.new_connections = 0

    # -- connections ----------------------------------------------------------

    def acquire(self, node: Any, exchange: Any, fresh: bool = False) -> Any:
        """
        Hand C{exchange} a connection to C{node}: an idle one at once (unless
        C{fresh}), or a new one when it is made.

        @return: the connector of a new connection (to stop it), or L{None}.
        """
        # Nodes without the attribute (stand-ins in tests) send no header.
        send_proxy = getattr(node, "send_proxy", None)
        if send_proxy is not None:
            return self._acquire_private(node, exchange, fresh, exchange.proxy_header(send_proxy))
        idle = None if fresh else self._idle.get(node.key)
        while idle:
            protocol = idle.pop()
            protocol.idle = False
            if self._reusable(protocol):
                exchange.connected(protocol, True)
                return None
            # The node closed it between requests (its FIN not read yet), or
            # sent bytes since: nothing was sent on it, so any request may
            # take a fresh one.
            protocol.transport.abortConnection()
        factory = _ConnectFactory(self, node.key, exchange)
        self.new_connections += 1
        # The node's pool's connect timeout, if it has its own.
        connect_timeout = getattr(node, "connect_timeout", None) or self.connect_timeout
        if node.scheme == "https":
            creator = self.tls_creator(node) if self.tls_creator else None
            if creator is None:
                from twisted.internet.ssl import optionsForClientTLS

                creator = optionsForClientTLS(node.host)
            return self.reactor.connectSSL(
                node.host, node.port, factory, creator, timeout=connect_timeout
            )
        return self.reactor.connectTCP(node.host, node.port, factory, timeout=connect_timeout)

    def _reusable(self, protocol: UpstreamProtocol) -> bool:
        """
        Whether an idle pooled connection can carry a request: it is open,
        and nothing arrived on it since its response ended.

        Bytes the reactor read while it was idle closed it already
        (L{UpstreamProtocol.dataReceived}). What is left to look at costs a
        system call per reuse: a one-byte C{MSG_PEEK} at the socket, for a
        FIN or bytes not read yet; and over TLS, a one-byte peek at the TLS
        layer first. The TLS layer hands over the records of one read one
        by one, so a record that came in the same read as the response's
        last one is still held there while that response ends, and a
        request waiting in the queue takes the connection back at that very
        moment. (Part of a record, its rest still on the wire, is not seen:
        that is the window every HTTP/1.1 proxy has, docs/security.md.)
        """
        transport = protocol.transport
        if transport is None or not protocol.connected or transport.disconnecting:
            return False
        tls = ISSLTransport.providedBy(transport)
        if tls:
            try:
                transport.getHandle().recv(1, socket.MSG_PEEK)
            except SSL.WantReadError:
                pass  # no whole record held
            except Exception:
                return False  # a close_notify, or TLS broke
            else:
                self.stray(protocol)
                return False
        sock = getattr(transport, "socket", None)
        if sock is None:  # TLS over a transport of its own
            sock = getattr(getattr(transport, "transport", None), "socket", None)
        if sock is None:
            return True
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True  # nothing to read: open and quiet
        except OSError:
            return False
        if data and not tls:
            # (Over TLS they may be the TLS layer's own: a session ticket.)
            self.stray(protocol)
        return False  # b"" is the node's FIN

    def stray(self, protocol: UpstreamProtocol) -> None:
        """
        A node sent bytes after a response, that nobody asked for: say so,
        at most once every L{STRAY_LOG_INTERVAL} seconds per node.
        """
        key = protocol.key
        now = self.clock.seconds()
        last = self._stray_logged.get(key)
        if last is None or now - last >= STRAY_LOG_INTERVAL:
            self._stray_logged[key] = now
            self.log.warn(
                "node {node} sent bytes after its response, which another request"
                " could have taken for its own; the connection was closed, not reused"
                " (said at most once a minute per node)",
                node=key,
            )

    def _acquire_private(self, node: Any, exchange: Any, fresh: bool, header: bytes) -> Any:
        """
        L{acquire} for a node with C{send_proxy}: the idle connection that
        began with the same header (the same client connection), or a new
        one that begins with it.
        """
        private = None if fresh else self._private.get(node.key)
        protocol = private.pop(header, None) if private else None
        if protocol is not None:
            protocol.idle = False
            if not private:
                del self._private[node.key]
            if self._reusable(protocol):
                exchange.connected(protocol, True)
                return None
            protocol.transport.abortConnection()
        tls = None
        if node.scheme == "https":
            tls = self.tls_creator(node) if self.tls_creator else None
            if tls is None:
                from twisted.internet.ssl import optionsForClientTLS

                tls = optionsForClientTLS(node.host)
        factory = _ConnectFactory(self, node.key, exchange, header, tls)
        self.new_connections += 1
        return self.reactor.connectTCP(node.host, node.port, factory, timeout=self.connect_timeout)

    def _release_private(self, protocol: UpstreamProtocol, header: bytes) -> None:
        private = self._private.setdefault(protocol.key, {})
        previous = private.pop(header, None)
        if previous is not None:
            previous.idle = False
            previous.transport.loseConnection()
        protocol.idle = True
        private[header] = protocol
        if len(private) > self.max_idle_per_node:
            # At most max_idle_per_node per node: the oldest client's goes.
            oldest = private.pop(next(iter(private)))
            oldest.idle = False
            oldest.transport.loseConnection()

    def release(self, protocol: UpstreamProtocol) -> None:
        """
        Take back a connection whose response is complete.
        """
        header = protocol.proxy_header
        if header is not None and self.max_idle_per_node:
            self._release_private(protocol, header)
            return
        idle = self._idle.get(protocol.key)
        if idle is None:
            idle = self._idle[protocol.key] = []
        cap = self.idle_caps.get(protocol.key, self.max_idle_per_node)
        if cap == 0:
            protocol.transport.loseConnection()
            return
        protocol.idle = True
        protocol.idle_round = self._trim_round
        idle.append(protocol)
        if len(idle) > cap and self._trim_call is None:
            # Over the cap: close the surplus only once it has stayed idle
            # for IDLE_TRIM_DELAY. Under steady high concurrency responses
            # end in bursts, and closing at once what the next burst of
            # requests reopens would cost a connection per few requests.
            self._schedule_trim()

    def _schedule_trim(self) -> None:
        # Connections released from now on belong to the next round.
        self._trim_round += 1
        self._trim_call = self.clock.callLater(IDLE_TRIM_DELAY, self._trim)

    def _trim(self) -> None:
        """
        Close idle connections beyond the cap that were already idle when
        this trim was scheduled, oldest first (reuse is most-recent first, so the
        oldest are the ones traffic does not need).
        """
        self._trim_call = None
        cutoff = self._trim_round
        caps = self.idle_caps
        default_cap = self.max_idle_per_node
        over = False
        for key, idle in self._idle.items():
            excess = len(idle) - caps.get(key, default_cap)
            while excess > 0 and idle[0].idle_round < cutoff:
                protocol = idle.pop(0)
                protocol.idle = False
                protocol.transport.loseConnection()
                excess -= 1
            over = over or excess > 0
        if over:
            self._schedule_trim()

    def drop_node(self, key: str) -> None:
        """
        Close the idle connections of a node that is gone.
        """
        self._stray_logged.pop(key, None)
        for protocol in self._idle.pop(key, []) + list(self._private.pop(key, {}).values()):
            protocol.idle = False
            protocol.transport.loseConnection()

    def close_idle(self) -> int:
        """
        Close every idle connection, to give their descriptors back (rrlb
        ran out of them, see L{rrlb.failures}); how many there were.
        """
        idle = [p for shared in self._idle.values() for p in shared]
        idle += [p for private in self._private.values() for p in private.values()]
        self._idle.clear()
        self._private.clear()
        for protocol in idle:
            protocol.idle = False
            protocol.transport.loseConnection()
        return len(idle)

    def forget_idle(self, protocol: UpstreamProtocol) -> None:
        if protocol.idle:
            protocol.idle = False
            header = protocol.proxy_header
            if header is not None:
                private = self._private.get(protocol.key)
                if private and private.get(header) is protocol:
                    del private[header]
                    if not private:
                        del self._private[protocol.key]
                return
            idle = self._idle.get(protocol.key)
            if idle and protocol in idle:
                idle.remove(protocol)

    def idle_count(self, key: str) -> int:
        return len(self._idle.get(key, ())) + len(self._private.get(key, ()))

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def connection_made(self, protocol: UpstreamProtocol) -> None:
        self._connections.add(protocol)
        factory = protocol.factory
        exchange = factory.exchange
        factory.exchange = None
        if exchange is None:
            protocol.transport.loseConnection()
        else:
            exchange.connected(protocol, False)

    def connection_lost(self, protocol: UpstreamProtocol) -> None:
        self._connections.discard(protocol)
        self.forget_idle(protocol)
        if not self._connections and self._closed_waiters:
            waiters, self._closed_waiters = self._closed_waiters, []
            for d in waiters:
                d.callback(None)

    def close(self) -> defer.Deferred[None]:
        """
        Close every connection; fires when all are gone.
        """
        self._stop_sweeping()
        for key in list(self._idle) + list(self._private):
            self.drop_node(key)
        for protocol in list(self._connections):
            protocol.transport.abortConnection()
        if not self._connections:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._closed_waiters.append(d)
        return d

    # -- timeouts -------------------------------------------------------------

    @property
    def granularity(self) -> float:
        return min(1.0, self.timeout / 10)

    def watch(self, exchange: Any) -> None:
        """
        Time out C{exchange} if it makes no progress for C{timeout} seconds.
        """
        exchange.deadline = None
        self._watched.add(exchange)
        if self._sweep_call is None:
            self._sweep_call = self.clock.callLater(self.granularity, self._sweep)

    def unwatch(self, exchange: Any) -> None:
        self._watched.discard(exchange)

    def _sweep(self) -> None:
        self._sweep_call = None
        if not self._watched:
            return
        now = self.clock.seconds()
        timeout = self.timeout
        send_timeout = max(timeout, self.send_timeout)
        expired = []
        for exchange in self._watched:
            if exchange.active or exchange.deadline is None:
                exchange.active = False
                # The exchange's pool's own timeout, if it has one.
                own = getattr(exchange, "timeout", None) or timeout
                exchange.deadline = now + (
                    max(own, send_timeout) if getattr(exchange, "paused", False) else own
                )
            elif now >= exchange.deadline:
                expired.append(exchange)
        for exchange in expired:
            self._watched.discard(exchange)
            try:
                exchange.timed_out()
            except Exception:
                self.log.failure("timing out {exchange}", exchange=exchange)
        if self._sweep_call is None:  # timed_out may watch again, and schedule it
            self._sweep_call = self.clock.callLater(self.granularity, self._sweep)

    def _stop_sweeping(self) -> None:
        for call in (self._sweep_call, self._trim_call):
            if call is not None and call.active():
                call.cancel()
        self._sweep_call = self._trim_call = None
