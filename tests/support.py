"""
The one support module for rrlb's trial tests: every helper a test module
shares lives here, and no test module imports another (L{tests.test_layers}
checks it).

Everything listens on 127.0.0.1 port 0 and everything cleans up after itself,
so a test that uses these never leaves a DirtyReactorAggregateError behind.
Passing the test case registers the cleanup (stop listening, drop open
connections, cancel pending timers) with C{testcase.addCleanup}.

Waiting: nothing here sleeps for a fixed time and then looks. L{wait_until}
and L{wait_for} poll a condition with a bounded wait; time-driven behaviour
runs on a L{twisted.internet.task.Clock} (L{Harness}, L{clock_on}). A check
that bytes stopped flowing first waits until nothing can move them (L{stuck}
senders, paused readers: L{reads}), then lets the reactor go round
(L{reactor_turns}) and looks.

The pieces, by section:
  - waiting and logs: L{wait_until}, L{wait_for}, L{stuck}, L{LogCapture};
  - loopback HTTP through twisted.web: L{Backend}/L{start_backend} (a
    recording backend), L{Balancer}/L{start_balancer} (the real service tree
    from command-line style arguments), L{http_request}/L{HTTPClient},
    L{raw_request}/L{RawClient} (exact bytes, the whole answer);
  - raw bytes both ways: L{RawBackend} (records each request's exact bytes,
    answers canned bytes), L{WireClient} (parses each response),
    L{WireCase} (raw backends + rrlb + raw clients), L{BulkProducer};
  - rrlb as a real process (systemd socket activation): L{start_daemon};
  - the admin endpoint: L{admin_url}, L{samples};
  - a L{ProxySite} on a Clock with in-memory transports: L{Harness};
  - a twisted.names server whose records change: L{start_server};
  - TLS: test certificates (L{certs}), L{TLSCase}, L{https_get};
  - the PROXY protocol: L{V1_IN} and friends;
  - WebSocket: autobahn's L{EchoFactory} node and L{Client}.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, TypeVar

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import yaml
from autobahn.twisted.websocket import (
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, error
from twisted.internet import reactor as _global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import (
    SSL4ClientEndpoint,
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
)
from twisted.internet.protocol import DatagramProtocol, Factory, ProcessProtocol, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.names import authority, common, dns
from twisted.names import server as dns_server_module
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.trial.unittest import TestCase
from twisted.web import server
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    readBody,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from rrlb.channel import ClientLimits
from rrlb.config import Config, NodeSpec, parse_node
from rrlb.pool import Node, Pool
from rrlb.proxy import ProxyChannel, ProxySite
from rrlb.service import ControlService
from rrlb.tap import Options, compose, makeService

reactor: Any = _global_reactor

LOOPBACK = "127.0.0.1"
# Bounded waits: long enough for a loaded CI machine, short enough that a
# hang fails the test well before trial's own two-minute timeout.
WAIT_TIMEOUT = 10.0
WAIT = WAIT_TIMEOUT
# rrlb as a process (with --workers, three of them) until it says READY=1.
START_TIMEOUT = 30.0
POLL_INTERVAL = 0.005
# The User-Agent prefix of rrlb's health probes.
PROBE_AGENT = b"rrlb-health"


# == waiting ===========================================================================


def sleep(seconds: float) -> defer.Deferred[None]:
    """
    A Deferred that fires after C{seconds} of real time: the polling step of
    L{wait_for}. A test never sleeps and then asserts that something did not
    happen; it waits for the event that would have made it happen.
    """
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def wait_for(
    condition: Callable[[], Any], what: str = "condition", timeout: float = WAIT_TIMEOUT
) -> Any:
    """
    Poll C{condition()} until it is true (returning it); fail after C{timeout}.
    """
    deadline = reactor.seconds() + timeout
    while True:
        value = condition()
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await sleep(POLL_INTERVAL)


async def wait_until(
    condition: Callable[[], Any],
    timeout: float = WAIT_TIMEOUT,
    what: str = "condition",
) -> None:
    """
    Poll C{condition()} every few milliseconds until it is true.

    @raise AssertionError: if it is still false after C{timeout} seconds.
    """
    await wait_for(condition, what, timeout)


async def wait_for_value(get: Any, what: str, timeout: float = WAIT_TIMEOUT) -> Any:
    """
    Poll the coroutine function C{get} until it returns something true
    (returning it); fail after C{timeout}.
    """
    deadline = reactor.seconds() + timeout
    while True:
        value = await get()
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await sleep(POLL_INTERVAL)


async def reactor_turns(count: int = 3) -> None:
    """
    Let the reactor go round C{count} times, reads and writes included: a
    byte that could move has moved. For checks that something stays still
    once L{stuck} and L{reads} say nothing can move it.
    """
    for _ in range(count):
        d: defer.Deferred[None] = defer.Deferred()
        reactor.callLater(0, d.callback, None)
        await d


def reads(transport: Any) -> bool:
    """
    Whether the reactor reads from C{transport} (it is not paused).
    """
    return transport in reactor.getReaders()


def stuck(transport: Any) -> bool:
    """
    Whether C{transport} has bytes queued that its socket does not take:
    it waits to write, and the kernel's buffers on the way to the peer are
    full, so nothing more leaves until the peer reads.
    """
    if transport not in reactor.getWriters():
        return False
    _, writable, _ = select.select([], [transport.getHandle()], [], 0)
    return not writable


# Linux's struct tcp_info: where tcpi_snd_wnd is (Linux 5.19 and later).
TCP_INFO_SND_WND = 228


def peer_window(transport: Any) -> int:
    """
    The receive window the peer of TCP C{transport} last advertised: 0 once
    the peer stopped reading and its receive buffer is full, so nothing
    more can leave until it reads.
    """
    size = TCP_INFO_SND_WND + 4
    info = transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, size)
    if len(info) < size:
        raise unittest.SkipTest("this kernel's TCP_INFO has no tcpi_snd_wnd")
    return int.from_bytes(info[TCP_INFO_SND_WND:], sys.byteorder)


def clock_on(service: Any) -> Clock:
    """
    Put the response timeouts of C{service}'s upstream client on a fresh
    L{Clock} for the test to drive (before any request is made).
    """
    clock = Clock()
    service.traffic.upstream.clock = clock
    return clock


def rrlb_end(service: Any, peer: Any) -> Any:
    """
    rrlb's own transport of the connection whose other end is C{peer} (a
    test client's transport, or a test node's).
    """
    host, remote = peer.getHost(), peer.getPeer()
    traffic = service.traffic
    ends = [channel.transport for channel in traffic.site.channels]
    ends += [protocol.transport for protocol in traffic.upstream._connections]
    for end in ends:
        if end is not None and end.getPeer() == host and end.getHost() == remote:
            return end
    raise AssertionError(f"no connection of rrlb's is the other end of {peer}")


# == loopback HTTP through twisted.web =================================================


# -- tracking server-side connections --------------------------------------------------


class _ConnectionTracker:
    """
    Remembers the live connections a factory built, so a test can drop them
    and wait until they are gone (C{stopListening} leaves them open).
    """

    def __init__(self) -> None:
        self.live: dict[Any, defer.Deferred[None]] = {}

    def track(self, protocol: Any) -> Any:
        lost: defer.Deferred[None] = defer.Deferred()
        self.live[protocol] = lost
        original = protocol.connectionLost

        def connectionLost(reason: Failure) -> None:
            try:
                original(reason)
            finally:
                self.live.pop(protocol, None)
                lost.callback(None)

        protocol.connectionLost = connectionLost
        return protocol

    def close_all(self) -> defer.Deferred[Any]:
        waits = []
        for protocol, lost in list(self.live.items()):
            waits.append(lost)
            # Site wraps its HTTPChannel in a proxy that hides the transport.
            transport = getattr(getattr(protocol, "_channel", protocol), "transport", None)
            if transport is not None:
                transport.abortConnection()
        return defer.gatherResults(waits)


def track_connections(factory: Any) -> _ConnectionTracker:
    """
    Make C{factory} (a Site or any protocol factory) remember the connections
    it builds; returns the tracker whose C{close_all()} drops them.
    """
    tracker = _ConnectionTracker()
    build = factory.buildProtocol

    def buildProtocol(addr: Any) -> Any:
        protocol = build(addr)
        return None if protocol is None else tracker.track(protocol)

    factory.buildProtocol = buildProtocol
    return tracker


# -- a test backend --------------------------------------------------------------------


@dataclass
class Recorded:
    """
    One request a L{Backend} received.

    @ivar headers: the request headers as (name, value) pairs, names as
        twisted.web canonicalizes them (C{X-Foo}), in arrival order per name.
    """

    method: bytes
    uri: bytes
    path: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    clientproto: bytes

    def header(self, name: bytes) -> Optional[bytes]:
        """
        The first value of header C{name} (any case), or L{None}.
        """
        lower = name.lower()
        for n, v in self.headers:
            if n.lower() == lower:
                return v
        return None


class Backend(Resource):
    """
    A configurable HTTP backend for tests. Change its attributes at any time:

    @ivar name: answered as the default body and in C{X-Backend}.
    @ivar status: status code of ordinary answers (default 200).
    @ivar reason: reason phrase, or L{None} for the standard one.
    @ivar headers: extra response headers, a list of (name, value) bytes.
    @ivar body: response body, or L{None} for the name.
    @ivar delay: seconds to wait before answering ordinary requests.
    @ivar health_path: requests to this path, and any request from rrlb's
        health checker (its C{User-Agent}), are health probes: their paths go
        to C{probe_paths}, they are answered with C{health_status} after
        C{health_delay}, and they are not recorded in C{requests}.
    @ivar healthy: L{False} makes health probes answer 503.
    @ivar health_status: the status of probes while C{healthy} (default 200).
    @ivar handler: if set, called with each ordinary twisted.web request; it
        returns the body bytes or C{server.NOT_DONE_YET} and overrides all of
        the above.
    @ivar requests: the L{Recorded} ordinary requests, in order.
    @ivar probe_paths: the path of each health probe received.
    """

    isLeaf = True

    def __init__(self, name: str, health_path: bytes = b"/health") -> None:
        super().__init__()
        self.name = name
        self.status = 200
        self.reason: Optional[bytes] = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: Optional[bytes] = None
        self.delay = 0.0
        self.health_path = health_path
        self.healthy = True
        self.health_status = 200
        self.health_delay = 0.0
        self.handler: Optional[Callable[[Any], Any]] = None
        self.requests: list[Recorded] = []
        self.probe_paths: list[bytes] = []
        self.port: Any = None
        self._port_number: Optional[int] = None
        self._tracker: Optional[_ConnectionTracker] = None
        self._pending: set[Any] = set()

    @property
    def port_number(self) -> int:
        """
        The port it listens on (still known after it stopped).
        """
        if self._port_number is None:
            self._port_number = int(self.port.getHost().port)
        return self._port_number

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port_number}"

    @property
    def open_connections(self) -> int:
        """
        The connections to it open now.
        """
        return len(self._tracker.live) if self._tracker is not None else 0

    @property
    def probes(self) -> int:
        """
        The number of health probes received.
        """
        return len(self.probe_paths)

    def render(self, request: Any) -> Any:
        agent = request.getHeader(b"user-agent") or b""
        if request.path == self.health_path or agent.startswith(b"rrlb-health/"):
            self.probe_paths.append(request.path)
            if self.health_delay:
                return self._later(request, self.health_delay, self._health_answer)
            return self._health_answer(request)
        self.requests.append(
            Recorded(
                method=request.method,
                uri=request.uri,
                path=request.path,
                headers=[
                    (name, value)
                    for name, values in request.requestHeaders.getAllRawHeaders()
                    for value in values
                ],
                body=request.content.read(),
                clientproto=request.clientproto,
            )
        )
        if self.handler is not None:
            return self.handler(request)
        if self.delay:
            return self._later(request, self.delay, self._answer)
        return self._answer(request)

    def _answer(self, request: Any) -> bytes:
        request.setResponseCode(self.status, self.reason)
        request.setHeader(b"X-Backend", self.name.encode("ascii"))
        for name, value in self.headers:
            request.responseHeaders.addRawHeader(name, value)
        return self.name.encode("ascii") if self.body is None else self.body

    def _health_answer(self, request: Any) -> bytes:
        request.setResponseCode(self.health_status if self.healthy else 503)
        return b"ok" if self.healthy else b"unhealthy"

    def _later(self, request: Any, delay: float, answer: Callable[[Any], bytes]) -> Any:
        def fire() -> None:
            self._pending.discard(call)
            if request._disconnected or request.finished:
                return
            request.write(answer(request))
            request.finish()

        call = reactor.callLater(delay, fire)
        self._pending.add(call)

        def gone(_: Any) -> None:
            if call.active():
                call.cancel()
            self._pending.discard(call)

        request.notifyFinish().addErrback(gone)
        return server.NOT_DONE_YET

    async def start(self) -> Backend:
        site = server.Site(self)
        site.noisy = False
        self._tracker = track_connections(site)
        self.port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(site)
        self._port_number = self.port.getHost().port
        return self

    async def stop(self) -> None:
        """
        Stop listening, drop open connections and cancel delayed answers.
        """
        for call in list(self._pending):
            if call.active():
                call.cancel()
        self._pending.clear()
        if self.port is not None:
            await defer.maybeDeferred(self.port.stopListening)
        if self._tracker is not None:
            await self._tracker.close_all()


async def start_backend(
    testcase: Optional[TestCase], name: str, health_path: bytes = b"/health"
) -> Backend:
    """
    Start a L{Backend} on 127.0.0.1 port 0; stopped at C{testcase}'s cleanup.
    """
    backend = await Backend(name, health_path).start()
    if testcase is not None:
        testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(backend.stop()))
    return backend


async def start_backends(testcase: Optional[TestCase], *names: str) -> list[Backend]:
    """
    Start one L{Backend} per name.
    """
    return [await start_backend(testcase, name) for name in names]


async def closed_port_url() -> str:
    """
    The URL of a loopback port that was free a moment ago and is now closed,
    so connecting to it is refused.
    """
    port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(Factory())
    number = port.getHost().port
    await defer.maybeDeferred(port.stopListening)
    return f"http://{LOOPBACK}:{number}"


# -- the balancer ----------------------------------------------------------------------


@dataclass
class Balancer:
    """
    A running rrlb service tree.

    @ivar service: the L{ControlService} (its C{pool}, C{checker}, and its
        C{traffic}'s C{proxy}, C{upstream}, C{site} are the real ones).
    @ivar port: the port its (first) listener got.
    @ivar url: C{http://127.0.0.1:<port>}, without a trailing slash.
    """

    service: ControlService
    port: int
    url: str
    _tracker: _ConnectionTracker = field(repr=False)
    _stopped: bool = False

    async def stop(self) -> None:
        """
        Stop the service tree (listeners, checker, upstream connections) and
        drop any client connections still open to it. Safe to call twice.
        """
        if self._stopped:
            return
        self._stopped = True
        if self.service.running:
            await defer.maybeDeferred(self.service.stopService)
        await self._tracker.close_all()


# What start_balancer adds unless the test gives the option itself: listen
# on a free loopback port, probe the path L{Backend} treats as its health
# check, and never wait long for open connections when stopping.
TEST_DEFAULTS = {
    "--listen": f"tcp:0:interface={LOOPBACK}",
    "--health-path": "/health",
    "--drain-timeout": "2",
}


def balancer_options(*args: str) -> Options:
    """
    Parse rrlb's command-line C{args} as twistd would (a UsageError for bad
    ones), adding L{TEST_DEFAULTS} for the options C{args} does not give.
    """
    argv = list(args)
    for option, value in TEST_DEFAULTS.items():
        if option not in argv and not any(a.startswith(option + "=") for a in argv):
            argv = [option, value] + argv
    options = Options()
    options.parseOptions(argv)
    return options


async def start_balancer(
    testcase: Optional[TestCase],
    nodes: Sequence[str] = (),
    *args: str,
    config: Optional[Config] = None,
) -> Balancer:
    """
    Build rrlb's service tree with L{makeService} and start it.

    @param nodes: node URLs, passed as C{--nodes}.
    @param args: more rrlb command-line arguments, e.g. C{"--timeout", "0.5"};
        L{TEST_DEFAULTS} fill in the options they leave out (as flags, so
        they also win over a C{--config} file).
    @param config: a ready L{Config} to run instead of parsing arguments (its
        first listener should be C{tcp:0:interface=127.0.0.1}).
    """
    if config is None:
        argv = list(args)
        if nodes:
            argv = ["--nodes", ",".join(nodes)] + argv
        service = makeService(balancer_options(*argv))
    else:
        service = compose(config, reactor)
    tracker = track_connections(service.traffic.site)
    service.startService()
    port = (await _listening_port(service.traffic.listeners[0])).getHost().port
    balancer = Balancer(service, port, f"http://{LOOPBACK}:{port}", tracker)
    if testcase is not None:
        testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(balancer.stop()))
    return balancer


def _listening_port(listener: Any) -> defer.Deferred[Any]:
    """
    The port a started C{StreamServerEndpointService} listens on, without
    consuming the result its C{stopService} needs.
    """
    d: defer.Deferred[Any] = defer.Deferred()

    def got(port: Any) -> Any:
        d.callback(port)
        return port

    listener._waitingForPort.addCallback(got)
    return d


def parse_error(*args: str) -> str:
    """
    The message of the L{usage.UsageError} that parsing C{args} raises.

    @raise AssertionError: if they parse.
    """
    try:
        Options().parseOptions(list(args))
    except usage.UsageError as e:
        return str(e)
    raise AssertionError(f"{args!r} parsed without error")


# -- an Agent-based client -------------------------------------------------------------


@dataclass
class Reply:
    """
    A complete HTTP response as a client saw it.
    """

    code: int
    phrase: bytes
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> Optional[bytes]:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


@implementer(IBodyProducer)
class _BytesProducer:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class HTTPClient:
    """
    An Agent with its own connection pool; C{close()} closes its connections.

    @param persistent: reuse connections (keep-alive) between requests.
    """

    def __init__(self, persistent: bool = True) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=persistent)
        self.agent = Agent(reactor, pool=self.pool)

    async def request(
        self,
        method: str | bytes,
        url: str,
        headers: Optional[dict[bytes, list[bytes]]] = None,
        body: Optional[bytes] = None,
    ) -> Reply:
        if isinstance(method, str):
            method = method.encode("ascii")
        response = await self.agent.request(
            method,
            url.encode("ascii"),
            Headers(headers or {}),
            None if body is None else _BytesProducer(body),
        )
        data = await readBody(response)
        return Reply(response.code, response.phrase, response.headers, data)

    def close(self) -> defer.Deferred[Any]:
        return self.pool.closeCachedConnections()


async def http_request(
    testcase: TestCase,
    method: str | bytes,
    url: str,
    headers: Optional[dict[bytes, list[bytes]]] = None,
    body: Optional[bytes] = None,
) -> Reply:
    """
    One request through a fresh L{HTTPClient} closed at C{testcase}'s cleanup.
    """
    client = HTTPClient()
    testcase.addCleanup(client.close)
    return await client.request(method, url, headers, body)


# -- a raw-bytes client ----------------------------------------------------------------


class RawClient(Protocol):
    """
    A TCP connection that collects every byte it receives.

    @ivar received: everything received so far.
    @ivar closed: a Deferred fired with C{received} when the connection ends.
    """

    transport: Any

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[bytes] = defer.Deferred()
        self._waiters: list[tuple[Callable[[bytes], bool], defer.Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        waiting, self._waiters = self._waiters, []
        for check, d in waiting:
            if check(self.received):
                d.callback(self.received)
            else:
                self._waiters.append((check, d))

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        waiting, self._waiters = self._waiters, []
        for _, d in waiting:
            d.callback(self.received)
        self.closed.callback(self.received)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    async def wait_for(
        self, check: Callable[[bytes], bool], timeout: float = WAIT_TIMEOUT
    ) -> bytes:
        """
        Wait until C{check(received)} is true or the connection closes; then
        return everything received so far.
        """
        if check(self.received) or self.closed.called:
            return self.received
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiters.append((check, d))
        d.addTimeout(timeout, reactor)
        return await d

    async def close(self) -> bytes:
        """
        Drop the connection and wait until it is gone.
        """
        if not self.closed.called:
            self.transport.abortConnection()
        return await self.closed


async def raw_connect(testcase: Optional[TestCase], port: int) -> RawClient:
    """
    Connect a L{RawClient} to 127.0.0.1:C{port}; closed at C{testcase}'s cleanup.
    """
    endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, port, timeout=WAIT_TIMEOUT)
    client: RawClient = await endpoint.connect(Factory.forProtocol(RawClient))  # type: ignore[assignment]
    if testcase is not None:
        testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(client.close()))
    return client


_Lost = TypeVar("_Lost", bound=Protocol)


async def connect_aborted_at_cleanup(testcase: TestCase, port: int, protocol: _Lost) -> _Lost:
    """
    Connect C{protocol} (one with a C{lost} Deferred that fires when its
    connection is gone) to 127.0.0.1:C{port}; at C{testcase}'s cleanup the
    connection is aborted if still open, and its end waited for.
    """
    await connectProtocol(TCP4ClientEndpoint(reactor, LOOPBACK, port), protocol)

    async def close() -> None:
        if protocol.transport.connected:
            protocol.transport.abortConnection()
        await protocol.lost  # type: ignore[attr-defined]

    testcase.addCleanup(close)
    return protocol


def s_client(
    port: int, ca_file: str, *options: str, name: str = "a.test", stdin: bytes = b""
) -> str:
    """
    What C{openssl s_client} printed after connecting to 127.0.0.1:C{port}
    for C{name}, trusting C{ca_file}, with C{options}, sending C{stdin}.
    Blocks: call it in a thread while rrlb serves in this process.
    """
    argv = ["openssl", "s_client", "-connect", f"{LOOPBACK}:{port}", "-servername", name]
    argv += ["-CAfile", ca_file, *options]
    result = subprocess.run(argv, input=stdin, capture_output=True, timeout=20)
    return result.stdout.decode("utf-8", "replace")


async def raw_request(
    testcase: Optional[TestCase], port: int, data: bytes, timeout: float = WAIT_TIMEOUT
) -> bytes:
    """
    Send C{data} on a new connection and return every byte received until the
    server closes it (send C{Connection: close}), or until C{timeout}, when
    the connection is dropped and what came so far is returned.
    """
    client = await raw_connect(testcase, port)
    client.send(data)
    call = reactor.callLater(timeout, client.transport.abortConnection)
    received = await client.closed
    if call.active():
        call.cancel()
    return received


def split_response(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """
    Split one raw HTTP response into its status line, its headers as
    (name, value) pairs exactly as sent, and everything after the head.
    """
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip()))
    return lines[0], headers, rest


# -- logs ------------------------------------------------------------------------------


@implementer(ILogObserver)
class LogCapture:
    """
    Collects twisted.logger events while installed; use as
    C{logs = LogCapture.install(self)}.
    """

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    @classmethod
    def install(cls, testcase: TestCase) -> LogCapture:
        capture = cls()
        globalLogPublisher.addObserver(capture)
        testcase.addCleanup(globalLogPublisher.removeObserver, capture)
        return capture

    def messages(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def matching(self, **fields: Any) -> list[LogEvent]:
        """
        The events whose fields include all of C{fields}.
        """
        return [e for e in self.events if all(e.get(k) == v for k, v in fields.items())]


# == raw bytes both ways (the wire tests) ==============================================


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """
    Every value of header C{name} (any case), in order.
    """
    lower = name.lower()
    return [v for n, v in headers if n.lower() == lower]


def by_name(headers: list[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    """
    Lower-cased name -> values in order: what a proxy must keep of a header list.
    """
    out: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        out.setdefault(name.lower(), []).append(value)
    return out


def parse_header_lines(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip(b" \t")))
    return headers


def response(
    status: bytes = b"200 OK", body: bytes = b"ok", headers: tuple[bytes, ...] = ()
) -> bytes:
    """
    Exact bytes of an HTTP/1.1 response with a Content-Length.
    """
    head = [b"HTTP/1.1 " + status, b"Content-Length: %d" % len(body), *headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def chunked_body(*chunks: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n" + trailer + b"\r\n"


# -- a raw backend ---------------------------------------------------------------------


@dataclass
class RecordedRequest:
    """
    One request exactly as a backend received it.
    """

    raw: bytes
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    connection: BackendConnection

    def header(self, name: bytes) -> list[bytes]:
        return values(self.headers, name)


Handler = Callable[[RecordedRequest, "BackendConnection"], Optional[bytes]]


class BackendConnection(Protocol):
    """
    One connection to a L{RawBackend}: parses requests (Content-Length or
    chunked bodies), records them, and hands each to the backend's handler,
    writing what it returns (it returns L{None} to answer later itself).
    """

    def __init__(self, backend: RawBackend) -> None:
        self.backend = backend
        self.buffer = bytearray()
        self.requests: list[RecordedRequest] = []
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.closed = False
        self._head: Optional[tuple[bytes, bytes, bytes, bytes, list[tuple[bytes, bytes]]]] = None
        self._need = 0

    def connectionMade(self) -> None:
        self.backend.connections.append(self)

    def connectionLost(self, reason: Failure) -> None:
        self.closed = True
        self.lost.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while not self.closed and self._parse_one():
            pass

    def _parse_one(self) -> bool:
        buf = self.buffer
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = bytes(buf[: end + 4])
            lines = head[:-4].split(b"\r\n")
            method, target, version = lines[0].split(b" ", 2)
            headers = parse_header_lines(lines[1:])
            del buf[: end + 4]
            self._head = (head, method, target, version, headers)
            length = values(headers, b"content-length")
            self._need = int(length[0]) if length else 0
            if values(headers, b"transfer-encoding"):
                self._need = -1
            if self.backend.interim and values(headers, b"expect"):
                # A node that answers Expect: 100-continue itself.
                self.transport.write(self.backend.interim)
        head, method, target, version, headers = self._head
        if self._need >= 0:
            if len(buf) < self._need:
                return False
            body = bytes(buf[: self._need])
            raw = head + body
            del buf[: self._need]
        else:
            decoded = decode_chunked(bytes(buf), 0)
            if decoded is None:
                return False
            body, used, _ = decoded
            raw = head + bytes(buf[:used])
            del buf[:used]
        self._head = None
        request = RecordedRequest(raw, method, target, version, headers, body, self)
        if any(v.startswith(PROBE_AGENT) for v in request.header(b"user-agent")):
            self.transport.write(response())
            return True
        self.requests.append(request)
        self.backend.requests.append(request)
        answer = self.backend.handler(request, self)
        if answer is not None:
            self.transport.write(answer)
        return True


class RawBackend(Factory):
    """
    A backend on 127.0.0.1 port 0 speaking raw bytes.
    """

    noisy = False

    # Written as soon as a request head with Expect arrives (a 100 Continue).
    interim = b""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[RecordedRequest] = []
        self.connections: list[BackendConnection] = []
        self.port: Any = None
        self._url: Optional[str] = None

    def buildProtocol(self, addr: Any) -> BackendConnection:
        return BackendConnection(self)

    @property
    def url(self) -> str:
        # Remembered, so it is still known after the port stopped listening.
        if self._url is None:
            self._url = f"http://{LOOPBACK}:{self.port.getHost().port}"
        return self._url

    @property
    def open_connections(self) -> list[BackendConnection]:
        return [c for c in self.connections if not c.closed]

    async def stop(self) -> None:
        if self.port is not None:
            # None, not a Deferred, when it already stopped (a killed node).
            await defer.maybeDeferred(self.port.stopListening)
        waits = []
        for connection in self.connections:
            if not connection.closed:
                connection.transport.abortConnection()
            waits.append(connection.lost)
        await defer.gatherResults(waits)


def decode_chunked(data: bytes, pos: int) -> Optional[tuple[bytes, int, bool]]:
    """
    Decode a chunked body starting at C{pos}: (body, end position, whether
    the chunk framing was intact), or L{None} if it is not complete yet.
    """
    body = bytearray()
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(data[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = data.find(b"\r\n", pos)
            while end >= 0 and end != pos:  # trailer fields
                pos = end + 2
                end = data.find(b"\r\n", pos)
            if end < 0:
                return None
            return bytes(body), end + 2, True
        if len(data) < pos + size + 2:
            return None
        body += data[pos : pos + size]
        pos += size + 2


# -- a raw client ----------------------------------------------------------------------


@dataclass
class Response:
    """
    One response as the client received it.
    """

    version: bytes
    code: int
    reason: bytes
    status_line: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes
    chunked: bool
    interim: list[int] = field(default_factory=list)

    def header(self, name: bytes) -> list[bytes]:
        return values(self.headers, name)


def parse_response(data: bytes, pos: int, head_request: bool, closed: bool) -> Any:
    """
    Parse one response starting at C{pos}: (L{Response}, end) or L{None}.
    """
    start = pos
    interim = []
    while True:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return None
        lines = data[pos:end].split(b"\r\n")
        status = lines[0].split(b" ", 2)
        code = int(status[1])
        headers = parse_header_lines(lines[1:])
        pos = end + 4
        if 100 <= code < 200:
            interim.append(code)
            continue
        break
    chunked = bool(values(headers, b"transfer-encoding"))
    length = values(headers, b"content-length")
    if head_request or code in (204, 304):
        body, stop = b"", pos
    elif chunked:
        decoded = decode_chunked(data, pos)
        if decoded is None:
            return None
        body, stop, _ = decoded
    elif length:
        stop = pos + int(length[0])
        if len(data) < stop:
            return None
        body = data[pos:stop]
    else:
        if not closed:
            return None
        body, stop = data[pos:], len(data)
    result = Response(
        version=status[0],
        code=code,
        reason=status[2] if len(status) > 2 else b"",
        status_line=lines[0],
        headers=headers,
        body=body,
        raw=data[start:stop],
        chunked=chunked,
        interim=interim,
    )
    return result, stop


class WireClient(Protocol):
    """
    A client connection that sends exact bytes and keeps every byte back,
    parsing them into L{Response}s on request (L{WireCase.client}). Called
    C{RawClient} in C{tests/test_wire.py} before the two helper libraries
    became this module; L{RawClient} is the simpler whole-answer one.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.on_data: Optional[Callable[[WireClient], None]] = None
        self._parsed = 0
        self._heads: list[bool] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.on_data is not None:
            self.on_data(self)

    def connectionLost(self, reason: Failure) -> None:
        self.closed = True
        self.lost.callback(None)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    async def response(self, head_request: bool = False) -> Optional[Response]:
        """
        The next complete response on this connection, or L{None} if the
        connection closed before one was complete.
        """
        parsed: list[Any] = []

        def ready() -> bool:
            result = parse_response(bytes(self.data), self._parsed, head_request, self.closed)
            if result is not None:
                parsed.append(result)
                return True
            return self.closed

        await wait_for(ready, "a response")
        if not parsed:
            return None
        result, self._parsed = parsed[0]
        return result  # type: ignore[no-any-return]

    async def close(self) -> None:
        if not self.closed:
            self.transport.loseConnection()
        await self.lost


# -- a test case with the three pieces -------------------------------------------------


def read_then_pause(client: WireClient) -> dict[str, int]:
    """
    Make C{client} a slow reader: it stops reading once the first bytes of
    the response arrive. Returns the count of bytes it has taken, under "n".
    """
    received = {"n": 0}

    def on_data(c: WireClient) -> None:
        if not received["n"]:
            c.transport.pauseProducing()
        received["n"] += len(c.data)
        c.data.clear()

    client.on_data = on_data
    return received


class YamlCase(unittest.TestCase):
    """
    Start backends and rrlb from a YAML text (C{start}), ask it (C{get}),
    and read what a bad configuration says (C{error}).
    """

    balancer: Balancer

    def write(self, text: str, path: str = "") -> str:
        path = path or self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    async def start(self, yaml: str, *args: str) -> Balancer:
        self.config_path = self.write(yaml)
        self.balancer = await start_balancer(self, (), "--config", self.config_path, *args)
        return self.balancer

    async def get(
        self, path: str, host: Optional[bytes] = None, method: str = "GET", **headers: bytes
    ) -> Any:
        raw = {name.replace("_", "-").encode("ascii"): [v] for name, v in headers.items()}
        if host is not None:
            raw[b"Host"] = [host]
        return await http_request(self, method, self.balancer.url + path, raw)

    def error(self, yaml: str) -> str:
        return parse_error("--config", self.write(yaml))


class WireCase(unittest.TestCase):
    """
    Starts raw backends, the real rrlb service tree and raw clients, and
    tears all of them down cleanly (clients, then rrlb, then backends).
    """

    timeout = 30

    async def backend(self, handler: Optional[Handler] = None, interim: bytes = b"") -> RawBackend:
        backend = RawBackend(handler or (lambda request, conn: response()))
        backend.interim = interim
        backend.port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(backend)
        self.addCleanup(backend.stop)
        return backend

    def dead_url(self) -> str:
        """
        A loopback URL nobody listens on: connecting is refused.
        """
        s = socket.socket()
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]
        s.close()
        return f"http://{LOOPBACK}:{port}"

    async def balancer(
        self, nodes: list[str], *args: str, probes: bool = False, listen: Optional[str] = None
    ) -> tuple[ControlService, int]:
        """
        Start rrlb over C{nodes} with extra command-line C{args}; return the
        service and its port. Without C{probes} the health checker is left
        out, so only real traffic reaches the backends and feeds the pool.
        """
        argv = ["--listen", listen or f"tcp:0:interface={LOOPBACK}", "--health-interval", "3600"]
        if nodes:
            argv += ["--nodes", ",".join(nodes)]
        options = Options()
        options.parseOptions(argv + list(args))
        service = makeService(options)
        return await self.start_service(service, probes)

    async def start_service(
        self, service: ControlService, probes: bool = False
    ) -> tuple[ControlService, int]:
        if not probes:
            service.removeService(service.checker)
        channels: list[Any] = []
        build = service.traffic.site.buildProtocol

        def buildProtocol(addr: Any) -> Any:
            protocol = build(addr)
            channels.append(protocol)
            return protocol

        service.traffic.site.buildProtocol = buildProtocol  # type: ignore[method-assign]
        service.startService()

        def transports() -> list[Any]:
            # A Site may wrap its channel in a proxy that hides the transport.
            found = (getattr(getattr(c, "_channel", c), "transport", None) for c in channels)
            return [t for t in found if t is not None]

        async def stop() -> None:
            # Client connections outlive stopListening: drop what is left and
            # wait until rrlb has seen every one of them go.
            for transport in transports():
                if not transport.disconnected:
                    transport.abortConnection()
            await wait_for(
                lambda: all(t.disconnected for t in transports()),
                "rrlb's client connections to close",
            )
            await service.stopService()

        self.addCleanup(stop)
        self.channels = channels
        port = await service.traffic.listeners[0]._waitingForPort
        return service, port.getHost().port

    async def client(self, port: int) -> WireClient:
        client = WireClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, LOOPBACK, port), client)

        async def close() -> None:
            if not client.closed and client.transport in reactor.getWriters():
                # Bytes still queued (a test that stopped half way through an
                # upload): a polite close would wait for them for ever.
                client.transport.abortConnection()
            await client.close()

        self.addCleanup(close)
        return client

    async def exchange(
        self, port: int, data: bytes, head_request: bool = False
    ) -> Optional[Response]:
        """
        Send C{data} on a new connection, return the response and close.
        """
        client = await self.client(port)
        client.send(data)
        result = await client.response(head_request)
        await client.close()
        return result

    def capture_log(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def assertPlainTextError(self, result: Optional[Response], code: int) -> None:
        """
        C{result} is rrlb's own short plain-text error C{code}.
        """
        assert result is not None
        self.assertEqual(result.code, code)
        self.assertEqual(result.header(b"content-type"), [b"text/plain; charset=utf-8"])
        self.assertTrue(result.body.startswith(b"%d " % code), result.body)
        self.assertEqual(result.body.count(b"\n"), 1, result.body)
        self.assertNotIn(b"Traceback", result.body)
        self.assertLess(len(result.body), 300)


def get(target: bytes = b"/", host: bytes = b"client.example", *extra: bytes) -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: " + host, *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def post(target: bytes, body: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        target,
        len(body),
        body,
    )


@implementer(IPushProducer)
class BulkProducer:
    """
    Writes C{total} bytes (C{block} repeated) to a transport as fast as the
    transport takes them, pausing when it says so, and counts its pauses.
    """

    def __init__(self, transport: Any, block: bytes, total: int) -> None:
        self.transport = transport
        self.block = block
        self.total = total
        self.sent = 0
        self.pauses = 0
        self.paused = False
        self.stopped = False

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self._write()

    def _write(self) -> None:
        while not self.paused and not self.stopped and self.sent < self.total:
            piece = self.block[: self.total - self.sent]
            self.sent += len(piece)
            self.transport.write(piece)
        if self.sent >= self.total and not self.stopped:
            self.stopped = True
            self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self._write()

    def stopProducing(self) -> None:
        self.stopped = True


def client_buffered(channel: Any) -> int:
    """
    Bytes rrlb holds in user space for one client connection.
    """
    transport = getattr(channel, "_channel", channel).transport
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen  # type: ignore[no-any-return]


# == rrlb as a real process ============================================================


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# twistd's own entry point, run from the worktree so its rrlb is the one.
TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


def launcher(
    listen_fds: bool, fdnames: Optional[str], nofile: Optional[int] = None, twistd: bool = False
) -> str:
    """
    Python code that sets C{LISTEN_PID} to its own pid (exec keeps it), as
    systemd does, then becomes rrlb; the listening socket is already fd 3.
    With C{nofile}, C{RLIMIT_NOFILE} is that, soft and hard (systemd's
    C{LimitNOFILE=}, or C{prlimit --nofile=N:N}).
    """
    # systemd starts services with default signal dispositions; a test
    # runner in the background may have SIGINT ignored, which exec keeps.
    lines = ["import os, signal, sys", "signal.signal(signal.SIGINT, signal.SIG_DFL)"]
    if nofile is not None:
        lines.append(
            f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile}))"
        )
    if listen_fds:
        lines.append("os.environ['LISTEN_PID'] = str(os.getpid())")
        lines.append("os.environ['LISTEN_FDS'] = '1'")
    if fdnames is not None:
        lines.append(f"os.environ['LISTEN_FDNAMES'] = {fdnames!r}")
    if twistd:
        runner = f"'-c', {TWISTD!r}, '-n', '--pidfile='"
    else:
        runner = "'-m', 'twisted', '--log-format', 'text'"
    lines.append(f"os.execv(sys.executable, [sys.executable, {runner}, 'rrlb'] + sys.argv[1:])")
    return "\n".join(lines) + "\n"


class _NotifyReceiver(DatagramProtocol):
    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.messages.append(datagram)


class Daemon(ProcessProtocol):
    """
    One rrlb process.

    @ivar messages: the sd_notify datagrams it sent, in order.
    @ivar output: its stdout and stderr together.
    @ivar port: the TCP port of the socket handed to it.
    """

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.output = b""
        self.port = 0
        self.ended: defer.Deferred[Optional[int]] = defer.Deferred()
        self.exit_signal: Optional[int] = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        self.exit_signal = getattr(value, "signal", None)
        self.ended.callback(getattr(value, "exitCode", None))

    @property
    def running(self) -> bool:
        return not self.ended.called

    def signal(self, name: str) -> None:
        self.transport.signalProcess(name)

    def lines(self) -> list[str]:
        return self.output.decode("utf-8", "replace").splitlines()

    async def wait_for_message(self, message: str, timeout: float = START_TIMEOUT) -> None:
        """
        Wait until rrlb sends C{message} to the notify socket (C{READY=1}
        comes once every process is up: allow for a loaded machine).
        """
        wanted = message.encode("utf-8")
        await self._wait(
            lambda: wanted in self.messages or not self.running, timeout, f"{message} from rrlb"
        )
        if wanted not in self.messages:
            raise AssertionError(f"rrlb exited before sending {message}; its output:\n{self.text}")

    async def wait_for_output(self, text: str, timeout: float = WAIT_TIMEOUT) -> None:
        await self._wait(
            lambda: text.encode("utf-8") in self.output, timeout, f"{text!r} in rrlb's output"
        )

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    async def _wait(self, condition: Callable[[], Any], timeout: float, what: str) -> None:
        try:
            await wait_for(condition, what, timeout)
        except AssertionError as e:
            # The output as it is now, not as it was when the wait began.
            raise AssertionError(f"{e}; rrlb's output:\n{self.text}") from None

    async def exit_code(self, timeout: float = WAIT_TIMEOUT) -> Optional[int]:
        """
        Wait for the process to end and return its exit code (L{None} when a
        signal killed it; see C{exit_signal}).
        """
        await wait_until(lambda: not self.running, timeout, "rrlb to exit")
        return await self.ended


async def start_daemon(
    testcase: TestCase,
    *args: str,
    environ: Optional[dict[str, str]] = None,
    listen_fds: bool = True,
    fdnames: Optional[str] = None,
    wrapper: Sequence[str] = (),
    nofile: Optional[int] = None,
    twistd: bool = False,
) -> Daemon:
    """
    Start rrlb with C{args} (C{--listen systemd:domain=INET:index=0} unless
    they have a C{--listen}), a listening socket on 127.0.0.1 handed to it
    as fd 3, and C{NOTIFY_SOCKET} pointing at a socket this test reads.
    Killed (if still running) and cleaned up at the end of the test.

    @param listen_fds: set C{LISTEN_FDS}/C{LISTEN_PID} for the socket.
    @param fdnames: the C{LISTEN_FDNAMES} value, if any.
    @param wrapper: a command that runs rrlb in its own process, C{exec}ing
        it (C{("prlimit", "--nofile=300:300")}).
    @param nofile: its C{RLIMIT_NOFILE}, soft and hard, if not this process's.
    @param twistd: run it as C{twistd -n --pidfile= rrlb} rather than as
        C{python -m twisted rrlb}.
    """
    directory = tempfile.mkdtemp(prefix="rrlb-test-")
    testcase.addCleanup(shutil.rmtree, directory, True)
    daemon = Daemon()
    notify_path = os.path.join(directory, "notify")
    notify_port = reactor.listenUNIXDatagram(notify_path, _NotifyReceiver(daemon.messages))
    testcase.addCleanup(notify_port.stopListening)

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, 0))
    listener.listen(64)
    daemon.port = listener.getsockname()[1]

    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))
    }
    env["NOTIFY_SOCKET"] = notify_path
    env["PYTHONUNBUFFERED"] = "1"
    env.update(environ or {})
    listen = [] if "--listen" in args else ["--listen", "systemd:domain=INET:index=0"]
    argv: Sequence[str] = [
        *wrapper,
        sys.executable,
        "-c",
        launcher(listen_fds, fdnames, nofile, twistd),
        *listen,
        *args,
    ]
    try:
        reactor.spawnProcess(
            daemon,
            argv[0] if wrapper else sys.executable,
            list(argv),
            env=env,
            path=ROOT,
            childFDs={0: "w", 1: "r", 2: "r", 3: listener.fileno()},
        )
    finally:
        # Only the daemon holds the socket now, so when it stops listening
        # new connections are refused rather than queued here.
        listener.close()

    async def stop() -> None:
        if daemon.running:
            try:
                daemon.signal("KILL")
            except error.ProcessExitedAlready:
                pass
            await daemon.ended

    testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
    return daemon


# == pools and policies, without I/O =================================================


def specs(*names: str, weights: Optional[Sequence[int]] = None) -> list[NodeSpec]:
    """
    Node specs named by one letter each: C{a} is C{http://a}.
    """
    out = []
    for i, name in enumerate(names):
        spec = parse_node(f"http://{name}")
        if weights is not None:
            spec = NodeSpec(**{**spec.__dict__, "weight": weights[i]})
        out.append(spec)
    return out


def name(node: Optional[Node]) -> str:
    assert node is not None
    return node.host


def take_out(pool: Pool, node: Node) -> None:
    for _ in range(pool.fall):
        pool.mark(node, False, "test failure")
    assert not node.healthy


def bring_back(pool: Pool, node: Node) -> None:
    for _ in range(pool.rise):
        pool.mark(node, True, "test success")
    assert node.healthy


class FakeChannel:
    def __init__(self, ip: bytes) -> None:
        self.forwarded = (b"http", ip)


class FakeHeaders:
    def __init__(self, raw: dict[bytes, list[bytes]]) -> None:
        self._rawHeaders = raw


class FakeRequest:
    """
    What policies read of a request.
    """

    def __init__(
        self,
        uri: bytes = b"/",
        headers: Optional[dict[bytes, list[bytes]]] = None,
        ip: bytes = b"127.0.0.1",
        real_client: Optional[str] = None,
    ) -> None:
        self.uri = uri
        self.method = b"GET"
        self.requestHeaders = FakeHeaders(headers or {})
        self.channel = FakeChannel(ip)
        self.real_client = real_client


# == the admin endpoint ================================================================


ADMIN = "tcp:0:interface=127.0.0.1"


async def admin_url(balancer: Balancer) -> str:
    """
    The base URL of a running balancer's admin endpoint.
    """
    listener = balancer.service.admin_listener
    assert listener is not None
    got: defer.Deferred[Any] = defer.Deferred()

    def port(p: Any) -> Any:
        got.callback(p)
        return p

    listener._waitingForPort.addCallback(port)
    return f"http://127.0.0.1:{(await got).getHost().port}"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    The samples of a Prometheus exposition, keyed by name and sorted labels.
    """
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# == a ProxySite on a Clock ============================================================


class Answer(Resource):
    """
    Answers every request with C{ok}.
    """

    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"ok"


class BodySink:
    """
    A consumer of streamed request bodies (L{rrlb.body}) that takes every
    byte as it comes.
    """

    def __init__(self) -> None:
        self.data = b""
        self.ended = False

    def body_data(self, data: bytes) -> None:
        self.data += data

    def body_end(self) -> None:
        self.ended = True

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


class Swallow(Resource):
    """
    Takes each request's body into a L{BodySink} and never answers.
    """

    isLeaf = True

    attach = True

    def __init__(self) -> None:
        super().__init__()
        self.sinks: list[BodySink] = []

    def render(self, request: Any) -> Any:
        sink = BodySink()
        self.sinks.append(sink)
        if request.body is not None and self.attach:
            request.body.attach(sink)
        return NOT_DONE_YET


class Harness:
    """
    A L{ProxySite} on a L{Clock}, with channels on in-memory transports.
    """

    def __init__(self, resource: Any = None, **limits: Any) -> None:
        self.clock = Clock()
        self.logged: list[Any] = []
        self.site = ProxySite(
            resource or Answer(),
            access_log=self.logged.append,
            reactor=self.clock,
            limits=ClientLimits(**limits),
        )

    def connect(self) -> tuple[ProxyChannel, StringTransport]:
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        channel = self.site.buildProtocol(peer)
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8080), peerAddress=peer
        )
        channel.makeConnection(transport)
        return channel, transport

    def lose(self, channel: ProxyChannel) -> None:
        channel.connectionLost(Failure(error.ConnectionDone()))


# == a DNS server ======================================================================


ZONE = b"rrlb.test"
SRV_NAME = "_http._tcp.api.rrlb.test"


class MemoryAuthority(authority.FileAuthority):
    """
    An authority for L{ZONE} whose records live in a dict the test changes
    while the server runs; it counts the queries it answers.

    @ivar additional: whether SRV answers carry their targets' addresses.
    """

    def __init__(self) -> None:
        common.ResolverBase.__init__(self)
        self.soa = (
            ZONE,
            dns.Record_SOA(mname=b"ns." + ZONE, rname=b"root." + ZONE, minimum=7, expire=60, ttl=7),
        )
        self.records: dict[bytes, list[Any]] = {}
        self.queries: list[tuple[bytes, int]] = []
        self.additional = True

    def _lookup(self, name: Any, cls: int, type: int, timeout: Any = None) -> Any:
        self.queries.append((name, type))
        return super()._lookup(name, cls, type, timeout)

    def _additionalRecords(self, answer: Any, authority: Any, ttl: int) -> Any:
        # Twisted's authority adds addresses for CNAME, MX and NS only; DNS
        # servers such as CoreDNS and Consul add them for SRV targets too.
        if not self.additional:
            return
        yield from super()._additionalRecords(answer, authority, ttl)
        for record in answer:
            if record.type == dns.SRV:
                name = record.payload.target.name
                for rec in self.records.get(name.lower(), ()):
                    if rec.TYPE in (dns.A, dns.AAAA):
                        yield dns.RRHeader(name, rec.TYPE, dns.IN, rec.ttl or ttl, rec, auth=True)

    def set(self, name: str, *records: Any) -> None:
        self.records[name.encode("ascii")] = list(records)

    def count(self, name: str, type: int = dns.A) -> int:
        return sum(1 for n, t in self.queries if n == name.encode("ascii") and t == type)


class DnsServer:
    """
    A twisted.names authoritative server on 127.0.0.1 (UDP), port 0.
    """

    def __init__(self) -> None:
        self.authority = MemoryAuthority()
        self.port: Any = None
        self.tcp_port: Any = None
        self.number = 0
        self.connections: list[Any] = []

    def start(self, number: int = 0) -> DnsServer:
        factory = dns_server_module.DNSServerFactory(authorities=[self.authority])
        factory.noisy = False
        # The same port over TCP, where rrlb asks (rrlb.discovery.TCPResolver);
        # its connections are remembered so that stop() really goes away.
        build = factory.buildProtocol

        def remembered(addr: Any) -> Any:
            connection = build(addr)
            self.connections.append(connection)
            return connection

        factory.buildProtocol = remembered  # type: ignore[method-assign]
        for _ in range(50):
            protocol = dns.DNSDatagramProtocol(factory)
            protocol.noisy = False
            self.port = reactor.listenUDP(number, protocol, interface=LOOPBACK)
            self.number = self.port.getHost().port
            try:
                self.tcp_port = reactor.listenTCP(self.number, factory, interface=LOOPBACK)
                return self
            except CannotListenError:
                # That number is taken over TCP (say, by a client's port).
                self.port.stopListening()
                if number:
                    raise
        raise AssertionError("no port free over both UDP and TCP")

    def stop(self) -> defer.Deferred[Any]:
        ports = [p for p in (self.port, self.tcp_port) if p is not None]
        self.port = self.tcp_port = None
        connections, self.connections = self.connections, []
        for connection in connections:
            if connection.transport is not None:
                connection.transport.abortConnection()
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.number}"


def a(address: str, ttl: Optional[int] = 30) -> dns.Record_A:
    return dns.Record_A(address, ttl)


def srv(target: str, port: int, weight: int = 1, ttl: int = 30) -> dns.Record_SRV:
    return dns.Record_SRV(0, weight, port, target, ttl)


def start_server(testcase: unittest.TestCase) -> DnsServer:
    dns_server = DnsServer().start()
    testcase.addCleanup(dns_server.stop)
    return dns_server


# == TLS ===============================================================================


NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


@dataclass
class Issued:
    """
    A key and certificate (and the PEM of both).
    """

    key: Any
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def options(self, **kwargs: Any) -> CertificateOptions:
        """
        Server options for a test node presenting this certificate.
        """
        return CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(self.key),
            certificate=crypto.X509.from_cryptography(self.cert),
            **kwargs,
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def issue(
    ca: Issued,
    names: Sequence[str] = ("localhost",),
    ips: Sequence[str] = (LOOPBACK,),
    not_before: datetime.datetime = NOW - DAY,
    not_after: datetime.datetime = NOW + 30 * DAY,
    uris: Sequence[str] = (),
    subject: Optional[x509.Name] = None,
    ocsp_url: Optional[str] = None,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    san += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    san += [x509.UniformResourceIdentifier(u) for u in uris]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject or _name((list(names) + list(ips))[0]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if ocsp_url is not None:
        access = x509.AccessDescription(
            x509.oid.AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url)
        )
        cert = cert.add_extension(x509.AuthorityInformationAccess([access]), critical=False)
    return Issued(key, cert.sign(ca.key, hashes.SHA256()))


class Certs:
    """
    The certificates every test here uses, made once per test run.
    """

    def __init__(self) -> None:
        self.ca = make_ca("rrlb test CA")
        self.node = issue(self.ca)
        self.wrong_host = issue(self.ca, names=["elsewhere.test"], ips=[])
        self.expired = issue(self.ca, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
        self.other_ca = make_ca("rrlb unknown CA")
        self.unknown = issue(self.other_ca)
        self.named = issue(self.ca, names=["node.test"], ips=[])
        self.client_ca = make_ca("rrlb client CA")
        self.client = issue(self.client_ca, names=["rrlb.test"], ips=[])
        self.site_a = issue(self.ca, names=["a.test"], ips=[LOOPBACK])
        self.site_b = issue(self.ca, names=["b.test", "*.b.test"], ips=[])


_CERTS: Optional[Certs] = None


def certs() -> Certs:
    global _CERTS
    if _CERTS is None:
        _CERTS = Certs()
    return _CERTS


class TLSCase(unittest.TestCase):
    """
    Writes PEM files into a fresh directory and starts TLS backends.
    """

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.certs = certs()

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def write_pair(self, name: str, issued: Issued) -> tuple[str, str]:
        """
        Write C{name}.crt and C{name}.key; returns their paths.
        """
        return (
            self.write(f"{name}.crt", issued.cert_pem),
            self.write(f"{name}.key", issued.key_pem),
        )

    @property
    def ca_file(self) -> str:
        return self.write("ca.pem", self.certs.ca.cert_pem)

    async def tls_backend(
        self, issued: Issued, name: str = "node", **options: Any
    ) -> tuple[Backend, str, CertificateOptions]:
        """
        A recording backend serving HTTPS with C{issued} on 127.0.0.1 port 0;
        returns it, its https base URL and its TLS options.
        """
        backend = Backend(name)
        tls = issued.options(**options)
        site = server.Site(backend)
        site.noisy = False
        backend._tracker = track_connections(site)
        backend.port = await SSL4ServerEndpoint(reactor, 0, tls, interface=LOOPBACK).listen(site)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(backend.stop()))
        return backend, f"https://{LOOPBACK}:{backend.port_number}", tls

    async def balancer_yaml(self, settings: dict[str, Any], *args: str) -> Balancer:
        """
        rrlb from a YAML file holding C{settings} (plus command-line C{args}).
        """
        path = self.write("rrlb.yaml", yaml.safe_dump(settings).encode("utf-8"))
        return await start_balancer(self, (), "--config", path, *args)


async def https_get(
    testcase: unittest.TestCase,
    url: str,
    ca: Issued,
    headers: Optional[dict[bytes, list[bytes]]] = None,
) -> tuple[int, bytes, Headers]:
    """
    A GET through twisted.web's Agent trusting only C{ca}.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(
        reactor,
        contextFactory=BrowserLikePolicyForHTTPS(
            Certificate(crypto.X509.from_cryptography(ca.cert))
        ),
        pool=pool,
    )
    testcase.addCleanup(pool.closeCachedConnections)
    response = await agent.request(b"GET", url.encode("ascii"), Headers(headers or {}))
    body = await readBody(response)
    return response.code, body, response.headers


# == HTTP/2 clients ===================================================================


class H2Response:
    """
    One response on a stream, as the client got it.
    """

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.done: defer.Deferred[H2Response] = defer.Deferred()
        self.reset: Optional[int] = None

    @property
    def status(self) -> int:
        return int(self.headers[b":status"])


class H2Client(Protocol):
    """
    An HTTP/2 client connection made with the C{h2} library.
    """

    def __init__(self) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.responses: dict[int, H2Response] = {}
        self.lost: defer.Deferred[None] = defer.Deferred()
        # The error code of each GOAWAY received.
        self.goaways: list[int] = []
        self._pings: dict[bytes, defer.Deferred[None]] = {}

    def connectionMade(self) -> None:
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)

    def request(
        self,
        method: bytes,
        path: bytes,
        body: Optional[bytes] = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        end: bool = True,
    ) -> tuple[int, H2Response]:
        """
        Start a request; returns its stream id and its (future) response.
        """
        stream = self.conn.get_next_available_stream_id()
        head = [
            (b":method", method),
            (b":path", path),
            (b":scheme", b"https"),
            (b":authority", b"h2.example"),
            *headers,
        ]
        self.conn.send_headers(stream, head, end_stream=body is None and end)
        if body is not None:
            self.conn.send_data(stream, body, end_stream=end)
        self.responses[stream] = H2Response()
        self.flush()
        return stream, self.responses[stream]

    def send(self, stream: int, data: bytes, end: bool = False) -> None:
        self.conn.send_data(stream, data, end_stream=end)
        self.flush()

    def ping(self) -> defer.Deferred[None]:
        """
        Send a PING; the Deferred fires when its ACK comes back, which shows
        the server read and answered everything sent before it.
        """
        if self.lost.called:
            return defer.fail(ConnectionError("the connection is closed"))
        opaque = b"%08d" % len(self._pings)
        self._pings[opaque] = d = defer.Deferred()
        self.conn.ping(opaque)
        self.flush()
        return d

    def cancel(self, stream: int) -> None:
        self.conn.reset_stream(stream)
        self.flush()
        # h2 reports no event for a reset of our own: end the response here.
        answer = self.responses[stream]
        answer.reset = 8  # CANCEL
        if not answer.done.called:
            answer.done.callback(answer)

    def dataReceived(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                answer = self.responses[event.stream_id]
                answer.raw_headers = list(event.headers)
                answer.headers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                self.responses[event.stream_id].body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                answer = self.responses[event.stream_id]
                answer.done.callback(answer)
            elif isinstance(event, h2.events.StreamReset):
                answer = self.responses[event.stream_id]
                answer.reset = event.error_code
                if not answer.done.called:
                    answer.done.callback(answer)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaways.append(event.error_code)
            elif isinstance(event, h2.events.PingAckReceived):
                self._pings.pop(event.ping_data).callback(None)
        self.flush()

    def connectionLost(self, reason: Failure) -> None:
        for answer in self.responses.values():
            if not answer.done.called:
                answer.done.errback(reason)
        pings, self._pings = self._pings, {}
        for d in pings.values():
            d.errback(reason)
        self.lost.callback(None)


class HTTP2Case(TLSCase):
    timeout = 60

    async def backend(self, handler: Any) -> RawBackend:
        from twisted.internet.endpoints import TCP4ServerEndpoint

        backend = RawBackend(handler)
        backend.port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(backend)
        self.addCleanup(backend.stop)
        return backend

    async def h2_balancer(self, nodes: list[str], *args: str) -> Balancer:
        cert, key = self.write_pair("site", self.certs.site_a)
        return await start_balancer(
            self,
            nodes,
            "--listen",
            "ssl:0:interface=127.0.0.1",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--http2",
            "--health-interval",
            "3600",
            *args,
        )

    async def h2_connect(self, port: int, protocol: Any = None) -> Any:
        """
        An HTTP/2 client over TLS to C{port} (an L{H2Client}, or C{protocol}),
        aborted at cleanup.
        """
        trust = Certificate(crypto.X509.from_cryptography(self.certs.ca.cert))
        options = optionsForClientTLS("a.test", trustRoot=trust, acceptableProtocols=[b"h2"])
        endpoint = SSL4ClientEndpoint(reactor, LOOPBACK, port, options)
        client = await connectProtocol(endpoint, H2Client() if protocol is None else protocol)

        async def close() -> None:
            if client.transport.connected:
                client.transport.abortConnection()
                await client.lost

        self.addCleanup(close)
        return client


# == the PROXY protocol ================================================================


# The client a load balancer in front of rrlb says it relays.
CLIENT_IP = "127.8.9.10"
V1_IN = b"PROXY TCP4 127.8.9.10 127.0.0.1 5555 8080\r\n"
GET_CLOSE = b"GET /x HTTP/1.1\r\nHost: rrlb.test\r\nConnection: close\r\n\r\n"


# == WebSocket =========================================================================


class EchoNode(WebSocketServerProtocol):
    """
    Says its node's name when the tunnel opens, then echoes every message.
    """

    def onOpen(self) -> None:
        self.factory.opened += 1
        self.sendMessage(self.factory.name.encode())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self.factory.closes.append((wasClean, code, reason))


class EchoFactory(WebSocketServerFactory):
    protocol = EchoNode

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.opened = 0
        self.closes: list[tuple[bool, Optional[int], Optional[str]]] = []
        self.port: Any = None

    @property
    def node_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port.getHost().port}"


class Client(WebSocketClientProtocol):
    """
    Keeps what it receives; C{opened}, C{closed} and C{next_message()}
    are Deferreds a test waits on.
    """

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[tuple[bytes, bool]] = []
        self.pongs: list[bytes] = []
        self.opened: defer.Deferred[Client] = defer.Deferred()
        self.closed: defer.Deferred[tuple[bool, Optional[int], Optional[str]]] = defer.Deferred()
        self.response: Any = None

    def onConnect(self, response: Any) -> None:
        self.response = response

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append((payload, isBinary))

    def onPong(self, payload: bytes) -> None:
        self.pongs.append(payload)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(reason))
        if not self.closed.called:
            self.closed.callback((wasClean, code, reason))

    async def message(self, count: int = 1) -> tuple[bytes, bool]:
        await wait_for(lambda: len(self.messages) >= count, f"message {count}")
        return self.messages[count - 1]


# == an ACME CA ========================================================================


PEBBLE = shutil.which("pebble")
# Pebble's own settings: no random sleeps before validating, no nonces
# refused at random, no authorization reused from an earlier order.
PEBBLE_ENV = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
# Names under the test DNS server's zone, which it answers with 127.0.0.1.
ACME_NAME = "site.rrlb.test"
ACME_WWW = "www.site.rrlb.test"
ACME_BLOCKED = "blocked.rrlb.test"


def free_port() -> int:
    """
    A TCP port free on 127.0.0.1 now, for a peer whose configuration names
    the port of another (pebble validates on rrlb's listener ports).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class Pebble(ProcessProtocol):
    """
    One pebble process (Let's Encrypt's test CA).

    @ivar directory: its ACME directory URL.
    @ivar ca_file: the CA file that its own HTTPS certificate chains to.
    """

    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred[Any] = defer.Deferred()
        self.directory = ""
        self.ca_file = ""

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")


async def start_pebble(
    testcase: TestCase,
    dns_server: DnsServer,
    http_port: int,
    tls_port: int,
    blocked: Sequence[str] = (),
    validity: Optional[int] = None,
) -> Pebble:
    """
    Start pebble on a free loopback port: it validates http-01 on
    C{http_port} and tls-alpn-01 on C{tls_port} of the address
    C{dns_server} gives (127.0.0.1 for L{ACME_NAME}), refuses orders for
    the names C{blocked}, and issues certificates valid for C{validity}
    seconds. Skips the test where pebble is not installed.
    """
    if PEBBLE is None:
        raise unittest.SkipTest("pebble is not installed (apt-get install pebble)")
    for name in (ACME_NAME, ACME_WWW, ACME_BLOCKED):
        dns_server.authority.set(name, a(LOOPBACK))
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    own = issue(certs().ca, names=["localhost"], ips=[LOOPBACK])
    paths = {}
    for name, data in (
        ("cert.pem", own.cert_pem),
        ("key.pem", own.key_pem),
        ("ca.pem", certs().ca.cert_pem),
    ):
        paths[name] = os.path.join(directory, name)
        with open(paths[name], "wb") as f:
            f.write(data)
    port = free_port()
    settings: dict[str, Any] = {
        "listenAddress": f"{LOOPBACK}:{port}",
        "managementListenAddress": f"{LOOPBACK}:{free_port()}",
        "certificate": paths["cert.pem"],
        "privateKey": paths["key.pem"],
        "httpPort": http_port,
        "tlsPort": tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
        "domainBlocklist": list(blocked),
    }
    if validity is not None:
        settings["certificateValidityPeriod"] = validity
    config = os.path.join(directory, "pebble.json")
    with open(config, "w", encoding="utf-8") as f:
        f.write(json.dumps({"pebble": settings}))
    pebble = Pebble()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **PEBBLE_ENV}
    transport = reactor.spawnProcess(
        pebble,
        PEBBLE,
        [PEBBLE, "-config", config, "-dnsserver", dns_server.address],
        env=env,
        path=directory,
    )

    async def stop() -> None:
        if not pebble.ended.called:
            try:
                transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass
            await pebble.ended

    testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
    try:
        await wait_for(
            lambda: b"Listening on:" in pebble.output or pebble.ended.called,
            "pebble to start",
            START_TIMEOUT,
        )
    except AssertionError as e:
        raise AssertionError(f"{e}; pebble's output:\n{pebble.text}") from None
    if pebble.ended.called:
        raise AssertionError(f"pebble ended; its output:\n{pebble.text}")
    # It says so just before it listens: wait until it accepts.
    await wait_for_value(lambda: _accepts(port), "pebble to accept", START_TIMEOUT)
    pebble.directory = f"https://{LOOPBACK}:{port}/dir"
    pebble.ca_file = paths["ca.pem"]
    return pebble


async def _accepts(port: int) -> bool:
    try:
        protocol = await connectProtocol(TCP4ClientEndpoint(reactor, LOOPBACK, port), Protocol())
    except error.ConnectError:
        return False
    protocol.transport.abortConnection()
    return True


@implementer(IOpenSSLClientConnectionCreator)
class AnyCertificate:
    """
    A TLS client that sends C{name} by SNI (and C{alpn}), and takes any
    certificate: the tests look at what was served.
    """

    def __init__(self, name: str, alpn: Sequence[bytes] = ()) -> None:
        self.name = name
        self.alpn = list(alpn)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if self.alpn:
            context.set_alpn_protos(self.alpn)
        connection = SSL.Connection(context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(self.name.encode("ascii"))
        return connection


@implementer(IHandshakeListener)
class _Handshake(Protocol):
    def __init__(self) -> None:
        self.done: defer.Deferred[Any] = defer.Deferred()

    def handshakeCompleted(self) -> None:
        cert = self.transport.getPeerCertificate()
        protocol = getattr(self.transport, "negotiatedProtocol", None)
        if not self.done.called:
            self.done.callback((cert.to_cryptography() if cert else None, protocol))
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if not self.done.called:
            self.done.callback((None, None))


async def served_certificate(
    port: int, name: str, alpn: Sequence[bytes] = ()
) -> tuple[Optional[x509.Certificate], Optional[bytes]]:
    """
    The certificate a TLS listener on C{port} serves to a ClientHello for
    C{name} (offering C{alpn}), and the protocol chosen; L{None} when the
    handshake fails.
    """
    endpoint = wrapClientTLS(
        AnyCertificate(name, alpn), TCP4ClientEndpoint(reactor, LOOPBACK, port, timeout=5)
    )
    protocol = _Handshake()
    try:
        await connectProtocol(endpoint, protocol)
    except error.ConnectError:
        return None, None
    result: tuple[Optional[x509.Certificate], Optional[bytes]] = await protocol.done
    return result


# == Redis =============================================================================


class _RedisProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"Ready to accept connections" in self.output and not self.ready.called:
            self.ready.callback(None)

    def processEnded(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(AssertionError(f"redis-server ended: {self.output[-500:]!r}"))
        self.ended.callback(None)


class RedisServer:
    """
    A redis-server (Debian's package, installed by .ci/run) of one test
    case, on a free loopback port, without persistence; L{kill} and
    L{start} again restart it on the same port.
    """

    def __init__(self, *args: str, tls: Optional[tuple[str, str, str]] = None) -> None:
        self.port = 0
        self.args = args
        # (certificate, key, CA) files: serve TLS only, on self.port.
        self.tls = tls
        self.process: Optional[_RedisProcess] = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{LOOPBACK}:{self.port}/0"

    async def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise unittest.SkipTest("redis-server is not installed (apt-get install redis-server)")
        # A port free a moment ago may be taken by the time redis-server
        # binds it: then another, unless this is a restart on its port.
        fixed = bool(self.port)
        for _ in range(1 if fixed else 5):
            if not fixed:
                probe = socket.socket()
                probe.bind((LOOPBACK, 0))
                self.port = probe.getsockname()[1]
                probe.close()
            process = self.process = _RedisProcess()
            ports = ["--port", str(self.port)]
            if self.tls:
                cert, key, ca = self.tls
                ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert,
                         "--tls-key-file", key, "--tls-ca-cert-file", ca,
                         "--tls-auth-clients", "no"]  # fmt: skip
            argv = [
                binary,
                *ports,
                "--bind", LOOPBACK,
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--protected-mode", "no",
                *self.args,
            ]  # fmt: skip
            reactor.spawnProcess(process, binary, argv, env=None)
            try:
                await process.ready.addTimeout(START_TIMEOUT, reactor)
                return self
            except AssertionError:
                if b"Address already in use" not in process.output:
                    raise
        raise AssertionError(f"redis-server could not listen on port {self.port}")

    async def kill(self) -> None:
        process, self.process = self.process, None
        if process is not None and not process.ended.called:
            process.transport.signalProcess("KILL")
            await process.ended


async def start_redis(testcase: unittest.TestCase, *args: str) -> RedisServer:
    """
    A L{RedisServer} of C{testcase} (with more redis-server C{args}), killed
    in its cleanup.
    """
    server = RedisServer(*args)
    testcase.addCleanup(lambda: defer.ensureDeferred(server.kill()))
    return await server.start()


# == HTTP/2 and gRPC nodes (issue 21) ===================================================


class H2ServerConnection(Protocol):
    """
    One connection to an L{H2Node}: HTTP/2 with prior knowledge, made with
    the C{h2} library. Each complete request goes to the node's handler.
    """

    def __init__(self, node: H2Node) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.node = node
        self.conn = h2.connection.H2Connection(config=config)
        self.heads: dict[int, dict[bytes, bytes]] = {}
        self.bodies: dict[int, bytearray] = {}
        # Stream id -> [bytes still to send, trailers or None, end at the end].
        self.outgoing: dict[int, list[Any]] = {}
        self.resets: list[int] = []
        self.lost: defer.Deferred[None] = defer.Deferred()
        # What the node read but did not let the client send again (its
        # windows), while its node is not reading.
        self.unacked: list[tuple[int, int]] = []

    def read_on(self) -> None:
        """
        Open the windows for everything read so far, and from now on.
        """
        self.node.reading = True
        unacked, self.unacked = self.unacked, []
        for size, stream_id in unacked:
            self.conn.acknowledge_received_data(size, stream_id)
        self.flush()

    def connectionMade(self) -> None:
        self.node.connections.append(self)
        if self.node.settings:
            # Whole: h2 sends only acknowledged values, never pending updates.
            self.conn.local_settings = h2.settings.Settings(
                client=False, initial_values=self.node.settings
            )
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except Exception:
            self.transport.abortConnection()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.heads[event.stream_id] = dict(event.headers)
                self.bodies[event.stream_id] = bytearray()
                self.node.streams_seen += 1
                if self.node.on_headers is not None:
                    self.node.on_headers(self, event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                self.bodies[event.stream_id] += event.data
                if self.node.reading:
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                else:
                    self.unacked.append((event.flow_controlled_length, event.stream_id))
            elif isinstance(event, h2.events.StreamEnded):
                self.node.handler(self, event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.resets.append(event.stream_id)
                self.outgoing.pop(event.stream_id, None)
            elif isinstance(event, h2.events.WindowUpdated):
                self.pump()
        self.flush()

    def respond(
        self,
        stream_id: int,
        body: bytes = b"",
        status: int = 200,
        headers: Sequence[tuple[bytes, bytes]] = (),
        trailers: Optional[list[tuple[bytes, bytes]]] = None,
    ) -> None:
        """
        Answer a stream: its head, its body as the windows allow, then its
        trailers or its end.
        """
        head = [(b":status", b"%d" % status), *headers]
        self.conn.send_headers(stream_id, head, end_stream=not body and trailers is None)
        if body or trailers is not None:
            self.outgoing[stream_id] = [body, trailers]
            self.pump()
        self.flush()

    def pump(self) -> None:
        for stream_id in list(self.outgoing):
            body, trailers = self.outgoing[stream_id]
            try:
                while body:
                    window = min(
                        self.conn.local_flow_control_window(stream_id),
                        self.conn.max_outbound_frame_size,
                    )
                    if window <= 0:
                        break
                    self.conn.send_data(stream_id, body[:window])
                    body = body[window:]
                self.outgoing[stream_id][0] = body
                if not body:
                    del self.outgoing[stream_id]
                    if trailers is not None:
                        self.conn.send_headers(stream_id, trailers, end_stream=True)
                    else:
                        self.conn.end_stream(stream_id)
            except h2.exceptions.StreamClosedError:
                self.outgoing.pop(stream_id, None)
        self.flush()

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)


def h2_echo(conn: H2ServerConnection, stream_id: int) -> None:
    """
    An L{H2Node} handler: the node's name, the path and the body it got.
    """
    head = conn.heads[stream_id]
    conn.respond(
        stream_id, conn.node.name.encode() + b":" + head[b":path"] + bytes(conn.bodies[stream_id])
    )


class H2Node(Factory):
    """
    A node serving HTTP/2 with prior knowledge on 127.0.0.1 (L{start_h2_node}).

    @ivar handler: called with the connection and a stream id once a request
        is complete (L{h2_echo} by default).
    @ivar on_headers: called with the same as soon as a request's head came.
    @ivar settings: the node's SETTINGS, beyond h2's defaults.
    """

    def __init__(
        self,
        name: str = "node",
        handler: Callable[[H2ServerConnection, int], None] = h2_echo,
        settings: Optional[dict[int, int]] = None,
    ) -> None:
        self.name = name
        self.handler = handler
        self.on_headers: Optional[Callable[[H2ServerConnection, int], None]] = None
        self.settings = settings or {}
        self.connections: list[H2ServerConnection] = []
        self.streams_seen = 0
        self.port: Any = None
        # Reopen windows for the bytes received (off: a node that reads slowly).
        self.reading = True

    def buildProtocol(self, addr: Any) -> H2ServerConnection:
        return H2ServerConnection(self)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port.getHost().port}"

    async def stop(self) -> None:
        await defer.maybeDeferred(self.port.stopListening)
        for conn in self.connections:
            if conn.transport is not None and conn.transport.connected:
                conn.transport.abortConnection()
            if not conn.lost.called:
                await conn.lost


async def start_h2_node(testcase: TestCase, node: H2Node) -> H2Node:
    """
    Listen for C{node} on a free loopback port; stopped at cleanup.
    """
    node.port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(node)
    testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(node.stop()))
    return node


class GrpcNode:
    """
    A grpcio server on 127.0.0.1 with the four kinds of RPC of service
    C{test.Echo} (raw bytes, no protobuf) and the standard health service.

     - C{Unary}: C{NAME:request}; C{fail:N} ends with status N, C{sleep:S}
       answers after S seconds; request metadata C{x-echo} comes back as
       initial metadata C{x-echo} and trailing metadata C{x-trailer};
     - C{ServerStream}: C{N} answers C{NAME:0} ... C{NAME:N-1};
     - C{ClientStream}: the requests joined, after C{NAME:};
     - C{Bidi}: each request answered with C{NAME:request} as it comes.
    """

    def __init__(
        self,
        name: str,
        workers: int = 32,
        options: Sequence[Any] = (),
        tls: Optional[Issued] = None,
    ) -> None:
        import grpc
        from grpc_health.v1 import health, health_pb2_grpc

        self.grpc = grpc
        self.name = name
        self.calls = 0
        self.server = grpc.server(
            futures.ThreadPoolExecutor(workers),
            options=[("grpc.max_receive_message_length", 64 << 20),
                     ("grpc.max_send_message_length", 64 << 20), *options],
        )  # fmt: skip
        prefix = name.encode() + b":"

        def unary(request: bytes, context: Any) -> bytes:
            self.calls += 1
            metadata = dict(context.invocation_metadata())
            echo = metadata.get("x-echo")
            if echo is not None:
                context.send_initial_metadata((("x-echo", echo),))
                context.set_trailing_metadata((("x-trailer", echo),))
            if request.startswith(b"fail:"):
                context.abort(grpc.StatusCode(_status_tuple(int(request[5:]))), "asked to fail")
            if request.startswith(b"sleep:"):
                import time

                time.sleep(float(request[6:]))
            return prefix + request

        def server_stream(request: bytes, context: Any) -> Any:
            for i in range(int(request)):
                yield prefix + b"%d" % i

        def client_stream(requests: Any, context: Any) -> bytes:
            return prefix + b"".join(requests)

        def bidi(requests: Any, context: Any) -> Any:
            for request in requests:
                yield prefix + request

        handler = grpc.method_handlers_generic_handler(
            "test.Echo",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"{LOOPBACK}:0"
        self.scheme = "http"
        if tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.scheme = "https"
            credentials = grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)])
            self.port = self.server.add_secure_port(address, credentials)
        self.server.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.port}"

    def stop(self, grace: Optional[float] = None) -> defer.Deferred[Any]:
        """
        Stop serving (after C{grace} seconds for the calls in flight).
        """
        from twisted.internet import threads

        return threads.deferToThread(lambda: self.server.stop(grace).wait(30))


def _status_tuple(number: int) -> Any:
    import grpc

    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.value
    raise ValueError(number)


def grpc_node(
    testcase: TestCase, name: str, options: Sequence[Any] = (), tls: Optional[Issued] = None
) -> GrpcNode:
    """
    A L{GrpcNode} (with grpc server C{options}; TLS with C{tls}), stopped
    at cleanup.
    """
    node = GrpcNode(name, options=options, tls=tls)
    testcase.addCleanup(node.stop)
    return node


# == rrlb's command line, run to its end ==============================================


class _Output(ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred[Optional[int]] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))


@dataclass
class Ran:
    """
    What a command that ran to its end said and how it exited.
    """

    code: Optional[int]
    out: str
    err: str


async def run_twistd(*args: str, timeout: float = START_TIMEOUT) -> Ran:
    """
    Run C{twistd ARGS} (C{-n --pidfile=} first) to its end, killed after
    C{timeout} seconds, and return what it wrote and its exit code.
    """
    output = _Output()
    argv = [sys.executable, "-W", "ignore", "-c", TWISTD, "-n", "--pidfile=", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    process = reactor.spawnProcess(output, sys.executable, argv, env=env, path=ROOT)

    def kill() -> None:
        try:
            process.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    timer = reactor.callLater(timeout, kill)
    code = await output.ended
    if timer.active():
        timer.cancel()
    return Ran(code, output.out.decode("utf-8", "replace"), output.err.decode("utf-8", "replace"))
