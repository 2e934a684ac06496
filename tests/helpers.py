"""
Shared helpers for rrlb's trial tests, for real loopback sockets only.

Everything listens on 127.0.0.1 port 0 and everything cleans up after itself,
so a test that uses these never leaves a DirtyReactorAggregateError behind.
Typical use in an C{async def} test method::

    backend = await start_backend(self, "a")            # a recording backend
    balancer = await start_balancer(self, [backend.url], "--health-path", "/health")
    reply = await http_request(self, "GET", balancer.url + "/x?y=1")
    self.assertEqual(reply.body, b"a")
    self.assertEqual(backend.requests[0].uri, b"/x?y=1")

    raw = await raw_request(self, balancer.port, b"GET / HTTP/1.1\\r\\nHost: x\\r\\n"
                                                 b"Connection: close\\r\\n\\r\\n")

Passing the test case registers the cleanup (stop listening, drop open
connections, cancel pending timers) with C{testcase.addCleanup}; every
helper's object also has its own C{stop()}/C{close()} for use without one.

The pieces:
  - L{Backend} / L{start_backend}: a small configurable twisted.web backend
    that records requests, answers with a given status/reason/headers/body,
    can be slow, and can be told to fail its health checks.
  - L{closed_port_url}: the URL of a loopback port nobody listens on (refused).
  - L{Balancer} / L{start_balancer}: the real rrlb service tree
    (L{rrlb.tap.makeService}) built from command-line style arguments (or a
    ready L{rrlb.config.Config}) and listening on 127.0.0.1 port 0.
  - L{http_request} / L{HTTPClient}: requests through twisted.web's Agent,
    returning a L{Reply} (code, phrase, headers, body).
  - L{raw_request} / L{RawClient}: exact bytes over a TCP connection made
    with Twisted (never a blocking socket in the reactor thread).
  - L{wait_until}: poll a condition with a bounded wait.
  - L{LogCapture}: collect twisted.logger events during a test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web import server
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from twisted.web.resource import Resource
from zope.interface import implementer

from rrlb.config import Config
from rrlb.service import ControlService
from rrlb.tap import Options, compose, makeService

# Bounded waits: long enough for a loaded CI machine, short enough that a
# hang fails the test well before trial's own two-minute timeout.
WAIT_TIMEOUT = 10.0
POLL_INTERVAL = 0.01
LOOPBACK = "127.0.0.1"

_reactor: Any = reactor


def sleep(seconds: float) -> defer.Deferred[None]:
    """
    A Deferred that fires after C{seconds} of real time.
    """
    d: defer.Deferred[None] = defer.Deferred()
    _reactor.callLater(seconds, d.callback, None)
    return d


async def wait_until(
    condition: Callable[[], Any],
    timeout: float = WAIT_TIMEOUT,
    what: str = "condition",
) -> None:
    """
    Poll C{condition()} every few milliseconds until it is true.

    @raise AssertionError: if it is still false after C{timeout} seconds.
    """
    deadline = _reactor.seconds() + timeout
    while not condition():
        if _reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await sleep(POLL_INTERVAL)


# -- tracking server-side connections ----------------------------------------


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


# -- a test backend -----------------------------------------------------------


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

        call = _reactor.callLater(delay, fire)
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
        self.port = await TCP4ServerEndpoint(_reactor, 0, interface=LOOPBACK).listen(site)
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
    port = await TCP4ServerEndpoint(_reactor, 0, interface=LOOPBACK).listen(Factory())
    number = port.getHost().port
    await defer.maybeDeferred(port.stopListening)
    return f"http://{LOOPBACK}:{number}"


# -- the balancer ---------------------------------------------------------------


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
        service = compose(config, _reactor)
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


# -- an Agent-based client ----------------------------------------------------------


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
        self.pool = HTTPConnectionPool(_reactor, persistent=persistent)
        self.agent = Agent(_reactor, pool=self.pool)

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


# -- a raw-bytes client ------------------------------------------------------------


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
        d.addTimeout(timeout, _reactor)
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
    endpoint = TCP4ClientEndpoint(_reactor, LOOPBACK, port, timeout=WAIT_TIMEOUT)
    client: RawClient = await endpoint.connect(Factory.forProtocol(RawClient))  # type: ignore[assignment]
    if testcase is not None:
        testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(client.close()))
    return client


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
    call = _reactor.callLater(timeout, client.transport.abortConnection)
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
