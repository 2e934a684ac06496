# -*- test-case-name: tests.test_h2upstream,tests.test_grpc -*-
"""
HTTP/2 to nodes (C{protocol: h2}): the client beside L{rrlb.upstream}'s
HTTP/1.1 one, on the C{h2} state machine. Prior knowledge over C{http://},
ALPN C{h2} over C{https://}.

 - L{H2UpstreamPool}: the connections to each node. Requests are streams
   multiplexed over few connections: a new connection opens only when every
   open one has as many streams as the node's
   C{SETTINGS_MAX_CONCURRENT_STREAMS}.
 - L{rrlb.h2nodeconn}: one connection (L{H2NodeConnection}) and the
   requests on it (L{NodeStream}, in L{rrlb.h2nodestream}): GOAWAY,
   REFUSED_STREAM, flow control, and what a node may not send.

A connection that could not be made fails the request that asked for it;
the others that only waited on it go to another node as if first picked
there (L{rrlb.h2exchange}).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rrlb.h2nodeconn import H2NodeConnection
from rrlb.h2nodestream import (
    STREAM_WINDOW,
    NodeStream,
    NotHTTP2,
    StreamFailed,
    Unprocessed,
)

__all__ = [
    "STREAM_WINDOW",
    "H2NodeConnection",
    "H2UpstreamPool",
    "NodeStream",
    "NotHTTP2",
    "StreamFailed",
    "Unprocessed",
]

log = Logger()

# A node's connection with no stream left, beside another of its
# connections, is closed after this long.
IDLE_EXTRA = 1.0


def _h2_creator(creator: Any) -> Any:
    """
    C{creator} (a node's TLS connection creator) offering only C{h2} by ALPN.
    """
    return _ALPNCreator(creator)


@implementer(IOpenSSLClientConnectionCreator)
class _ALPNCreator:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        connection = self.inner.clientConnectionForTLS(tlsProtocol)
        connection.set_alpn_protos([b"h2"])
        return connection


class _ConnectFactory(ClientFactory):
    noisy = False

    def __init__(self, connection: H2NodeConnection) -> None:
        self.connection = connection

    def buildProtocol(self, addr: Any) -> H2NodeConnection:
        return self.connection

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        connection = self.connection
        connection.closed = True
        connection.pool.connection_lost(connection)
        waiting, connection.waiting = connection.waiting, []
        for index, exchange in enumerate(waiting):
            # The first asked for the connection; the others only waited
            # on it, and did not cause a connection attempt of their own.
            exchange.connect_failed(reason, index > 0)
        settled, connection.settled = connection.settled, None
        if settled is not None:
            settled.errback(reason)


class _Waiting:
    """
    What an exchange waiting for a connection holds as its connector: it
    stops waiting, not the connection (others may wait on it too).
    """

    __slots__ = ("connection", "exchange")

    def __init__(self, connection: H2NodeConnection, exchange: Any) -> None:
        self.connection = connection
        self.exchange = exchange

    def stopConnecting(self) -> None:
        waiting = self.connection.waiting
        if self.exchange in waiting:
            waiting.remove(self.exchange)


class H2UpstreamPool:
    """
    HTTP/2 connections to nodes, a few per node, each carrying many streams.

    @ivar tls_creator: called with a node, returns the client connection
        creator for an https node (see L{rrlb.tls}); rrlb makes it offer h2.
    """

    def __init__(
        self,
        reactor: Any,
        connect_timeout: float = 5.0,
        tls_creator: Optional[Callable[[Any], Any]] = None,
    ) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.tls_creator = tls_creator
        # Node key -> its connections that take new streams, oldest first.
        self._usable: dict[str, list[H2NodeConnection]] = {}
        self._connections: set[H2NodeConnection] = set()
        self._closed_waiters: list[defer.Deferred[None]] = []
        self._broken_logged: dict[str, float] = {}
        # Node key -> the node, as last connected to.
        self._nodes: dict[str, Any] = {}
        self.new_connections = 0

    def acquire(self, node: Any, exchange: Any, fresh: bool = False) -> Any:
        """
        Give C{exchange} a stream to C{node}, on a connection with room or a
        new one.

        @return: what stops the wait for a new connection, or L{None}.
        """
        if not fresh:
            for connection in self._usable.get(node.key, ()):
                if connection.has_room():
                    connection.take(exchange)
                    return _Waiting(connection, exchange) if connection.waiting else None
        connection = self.connect(node)
        connection.take(exchange)
        return _Waiting(connection, exchange)

    def acquire_again(self, key: str, exchange: Any) -> None:
        """
        C{exchange} waited for a connection the node allows fewer streams
        on: another one takes it.
        """
        node = self._nodes.get(key)
        if node is None:
            exchange.connect_failed(Failure(Unprocessed("the node left")))
            return
        connector = self.acquire(node, exchange)
        exchange.connector = connector

    def connect(self, node: Any) -> H2NodeConnection:
        """
        Open a new connection to C{node}.
        """
        connection = H2NodeConnection(self, node.key, node.scheme == "https")
        self._usable.setdefault(node.key, []).append(connection)
        self._nodes[node.key] = node
        self.new_connections += 1
        self._open(connection, node)
        return connection

    def handshake(self, node: Any) -> defer.Deferred[None]:
        """
        Open a connection to C{node} just to exchange the preface and
        SETTINGS (the C{tcp} health check of an h2 pool); it is closed after.
        """
        connection = H2NodeConnection(self, node.key, node.scheme == "https")
        connection.going_away = True

        def cancel(d: defer.Deferred[None]) -> None:
            connection.settled = None
            self.abort(connection)

        d: defer.Deferred[None] = defer.Deferred(cancel)
        connection.settled = d
        self._open(connection, node)

        def done(result: Any) -> Any:
            if not connection.closed and connection.transport is not None:
                connection.close()
            return result

        return d.addBoth(done)

    def _open(self, connection: H2NodeConnection, node: Any) -> None:
        self._connections.add(connection)
        factory = _ConnectFactory(connection)
        timeout = getattr(node, "connect_timeout", None) or self.connect_timeout
        if connection.tls:
            creator = self.tls_creator(node) if self.tls_creator else None
            if creator is None:
                from twisted.internet.ssl import optionsForClientTLS

                creator = optionsForClientTLS(node.host, acceptableProtocols=[b"h2"])
            else:
                creator = _h2_creator(creator)
            connection.connector = self.reactor.connectSSL(
                node.host, node.port, factory, creator, timeout=timeout
            )
        else:
            connection.connector = self.reactor.connectTCP(
                node.host, node.port, factory, timeout=timeout
            )

    def abort(self, connection: H2NodeConnection) -> None:
        transport = connection.transport
        if transport is not None:
            transport.abortConnection()
        elif connection.connector is not None:
            try:
                connection.connector.stopConnecting()
            except Exception:
                pass  # not connecting any more

    # -- what connections tell the pool -------------------------------------------

    def idle(self, connection: H2NodeConnection) -> None:
        """
        C{connection} has no stream left: it stays for the next ones if it
        is the node's first, else it closes after L{IDLE_EXTRA} unused.
        """
        usable = self._usable.get(connection.key)
        if usable and usable[0] is not connection and connection.idle_call is None:
            connection.idle_call = self.reactor.callLater(IDLE_EXTRA, self._idle_close, connection)

    def _idle_close(self, connection: H2NodeConnection) -> None:
        connection.idle_call = None
        if not connection.streams and not connection.closed:
            self.forget(connection)
            connection.close()

    def forget(self, connection: H2NodeConnection) -> None:
        """
        Open no new stream on C{connection}.
        """
        usable = self._usable.get(connection.key)
        if usable and connection in usable:
            usable.remove(connection)
            if not usable:
                del self._usable[connection.key]

    def broken(self, connection: H2NodeConnection, why: str) -> None:
        self.forget(connection)
        now = self.reactor.seconds()
        last = self._broken_logged.get(connection.key)
        if last is None or now - last >= 60:
            self._broken_logged[connection.key] = now
            log.warn(
                "node {node} broke HTTP/2, its connection was closed: {why}"
                " (said at most once a minute per node)",
                node=connection.key,
                why=why,
            )

    def connection_lost(self, connection: H2NodeConnection) -> None:
        self.forget(connection)
        self._connections.discard(connection)
        if not self._connections and self._closed_waiters:
            waiters, self._closed_waiters = self._closed_waiters, []
            for d in waiters:
                d.callback(None)

    def drop_node(self, key: str) -> None:
        """
        A node left: close its idle connections, and the others once their
        streams end.
        """
        self._broken_logged.pop(key, None)
        self._nodes.pop(key, None)
        for connection in self._usable.pop(key, []):
            connection.going_away = True
            if not connection.streams and not connection.waiting and connection.open:
                connection.close()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def close(self) -> defer.Deferred[None]:
        """
        Close every connection; fires when all are gone.
        """
        self._usable.clear()
        for connection in list(self._connections):
            self.abort(connection)
        if not self._connections:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._closed_waiters.append(d)
        return d
