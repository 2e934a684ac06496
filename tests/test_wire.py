"""
Wire-exactness tests: rrlb between a raw client and raw backends over real
loopback sockets.

The backends here are plain Protocols that record the exact bytes of every
request they receive and answer with exact canned bytes; the clients send
exact request bytes and keep every response byte. That lets the tests assert
what a higher-level HTTP library would hide: header order, repeated headers,
reason phrases, chunked framing, bodies cut short, writes blocked.

The helpers at the top are also used by L{tests.test_upstream}.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet import reactor as _global_reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from rrlb import body as body_module
from rrlb.service import ControlService
from rrlb.tap import Options, makeService

reactor: Any = _global_reactor

LOOPBACK = "127.0.0.1"
# Every wait in these tests is bounded by this, well under trial's timeout.
WAIT = 10.0
POLL = 0.005
PROBE_AGENT = b"rrlb-health"


def sleep(seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def wait_for(
    condition: Callable[[], Any], what: str = "condition", timeout: float = WAIT
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
        await sleep(POLL)


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


# -- a raw backend -------------------------------------------------------------


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


# -- a raw client --------------------------------------------------------------


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


class RawClient(Protocol):
    """
    A client connection that sends exact bytes and keeps every byte back.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.on_data: Optional[Callable[[RawClient], None]] = None
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


# -- a test case with the three pieces -------------------------------------------


def read_then_pause(client: RawClient) -> dict[str, int]:
    """
    Make C{client} a slow reader: it stops reading once the first bytes of
    the response arrive. Returns the count of bytes it has taken, under "n".
    """
    received = {"n": 0}

    def on_data(c: RawClient) -> None:
        if not received["n"]:
            c.transport.pauseProducing()
        received["n"] += len(c.data)
        c.data.clear()

    client.on_data = on_data
    return received


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
        import socket

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

    async def client(self, port: int) -> RawClient:
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, LOOPBACK, port), client)
        self.addCleanup(client.close)
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


# -- requests ----------------------------------------------------------------------


class RequestForwardingTests(WireCase):
    """
    What a node receives for what a client sent.
    """

    async def test_encoded_target_forwarded_byte_for_byte(self) -> None:
        """
        The request target reaches the node exactly as received: percent
        escapes (even an encoded slash) and the query untouched.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        target = b"/a%2Fb/%7Euser?q=%20&x=1"
        result = await self.exchange(port, get(target))
        assert result is not None
        self.assertEqual(result.code, 200)
        self.assertEqual(backend.requests[0].target, target)
        self.assertTrue(backend.requests[0].raw.startswith(b"GET " + target + b" HTTP/1.1\r\n"))

    async def test_base_path_prefixed(self) -> None:
        """
        A node with a base path gets it in front of the target, which is
        otherwise byte for byte what the client sent.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url + "/base/app"])
        await self.exchange(port, get(b"/a%2Fb/%7Euser?q=%20&x=1"))
        self.assertEqual(backend.requests[0].target, b"/base/app/a%2Fb/%7Euser?q=%20&x=1")

    async def test_repeated_headers_keep_values_and_order(self) -> None:
        """
        Every end-to-end header reaches the node with all its values in
        order, repeated ones included; nothing is merged or dropped.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        sent = [
            (b"Accept", b"text/html"),
            (b"X-Multi", b"one"),
            (b"Cookie", b"a=1"),
            (b"X-Multi", b"two, three"),
            (b"x-lower-case", b"Mixed Case Value"),
            (b"Cookie", b"b=2"),
            (b"X-Multi", b"four"),
            (b"Authorization", b"Bearer abc=="),
        ]
        lines = [b"%s: %s" % pair for pair in sent]
        await self.exchange(port, get(b"/h", b"client.example", *lines))
        got = backend.requests[0].headers
        expected = by_name(sent)
        received = by_name(got)
        for name, vals in expected.items():
            self.assertEqual(received.get(name), vals, name)
        # The names keep the order in which they first appeared.
        first = [n for n in dict.fromkeys(n.lower() for n, _ in got) if n in expected]
        self.assertEqual(first, list(expected))

    async def test_hop_by_hop_request_headers_dropped(self) -> None:
        """
        Hop-by-hop headers (RFC 9110 7.6.1) and every header named in
        Connection stop at rrlb; the end-to-end ones around them pass.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        request = get(
            b"/",
            b"client.example",
            b"Connection: keep-alive, X-Hop-One,x-hop-two",
            b"Keep-Alive: timeout=5",
            b"Proxy-Connection: keep-alive",
            b"TE: trailers",
            b"Trailer: X-Checksum",
            b"Proxy-Authorization: Basic cHJveHk6c2VjcmV0",
            b"Proxy-Authenticate: Basic realm=x",
            b"X-Hop-One: secret",
            b"X-Hop-Two: secret",
            b"X-Keep: kept",
        )
        result = await self.exchange(port, request)
        assert result is not None
        self.assertEqual(result.code, 200)
        names = {n.lower() for n, _ in backend.requests[0].headers}
        for hop in (
            b"connection",
            b"keep-alive",
            b"proxy-connection",
            b"te",
            b"trailer",
            b"transfer-encoding",
            b"upgrade",
            b"proxy-authorization",
            b"proxy-authenticate",
            b"x-hop-one",
            b"x-hop-two",
        ):
            self.assertNotIn(hop, names)
        self.assertEqual(backend.requests[0].header(b"x-keep"), [b"kept"])

    async def test_upgrade_request_header_dropped(self) -> None:
        """
        Upgrade (with Connection: upgrade) to anything but WebSocket is
        hop-by-hop: the node sees neither, and gets an ordinary request.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        result = await self.exchange(
            port, get(b"/ws", b"client.example", b"Connection: Upgrade", b"Upgrade: TLS/1.2")
        )
        assert result is not None
        self.assertEqual(result.code, 200)
        names = {n.lower() for n, _ in backend.requests[0].headers}
        self.assertNotIn(b"upgrade", names)
        self.assertNotIn(b"connection", names)

    async def test_client_host_by_default(self) -> None:
        """
        By default the node gets the client's Host, once.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        await self.exchange(port, get(b"/", b"Client.Example:8080"))
        self.assertEqual(backend.requests[0].header(b"host"), [b"Client.Example:8080"])

    async def test_node_host_option(self) -> None:
        """
        With --node-host each node gets its own host:port as Host.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url], "--node-host")
        await self.exchange(port, get(b"/", b"client.example"))
        node_port = backend.port.getHost().port
        self.assertEqual(backend.requests[0].header(b"host"), [b"127.0.0.1:%d" % node_port])

    async def test_node_host_yaml(self) -> None:
        """
        YAML C{node_host: true} does what --node-host does.
        """
        backend = await self.backend()
        fd, path = tempfile.mkstemp(suffix=".yaml")
        self.addCleanup(os.remove, path)
        with os.fdopen(fd, "w") as f:
            f.write(f"nodes:\n  - {backend.url}\nnode_host: true\n")
        _, port = await self.balancer([], "--config", path)
        await self.exchange(port, get(b"/", b"client.example"))
        node_port = backend.port.getHost().port
        self.assertEqual(backend.requests[0].header(b"host"), [b"127.0.0.1:%d" % node_port])

    async def test_no_client_host(self) -> None:
        """
        An HTTP/1.0 request without Host still reaches the node with a Host
        (the node's own), as HTTP/1.1 requires.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        await self.exchange(port, b"GET /old HTTP/1.0\r\n\r\n")
        node_port = backend.port.getHost().port
        self.assertEqual(backend.requests[0].header(b"host"), [b"127.0.0.1:%d" % node_port])
        self.assertEqual(backend.requests[0].version, b"HTTP/1.1")

    async def test_forwarded_headers_set(self) -> None:
        """
        X-Forwarded-For is the client address, X-Forwarded-Proto http,
        X-Forwarded-Host the client's Host, Via 1.1 rrlb: one of each.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        await self.exchange(port, get(b"/", b"client.example:8080"))
        request = backend.requests[0]
        self.assertEqual(request.header(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(request.header(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(request.header(b"x-forwarded-host"), [b"client.example:8080"])
        self.assertEqual(request.header(b"via"), [b"1.1 rrlb"])

    async def test_forwarded_for_appended(self) -> None:
        """
        Existing X-Forwarded-For values are kept, in order, with the client
        address appended, ", " separated; a client's own X-Forwarded-Proto
        and X-Forwarded-Host are replaced, an existing Via is extended.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        await self.exchange(
            port,
            get(
                b"/",
                b"client.example",
                b"X-Forwarded-For: 10.0.0.1",
                b"X-Forwarded-Proto: https",
                b"X-Forwarded-For: 10.0.0.2, 10.0.0.3",
                b"X-Forwarded-Host: spoofed.example",
                b"Via: 1.0 fred",
            ),
        )
        request = backend.requests[0]
        self.assertEqual(
            request.header(b"x-forwarded-for"), [b"10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"]
        )
        self.assertEqual(request.header(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(request.header(b"x-forwarded-host"), [b"client.example"])
        self.assertEqual(request.header(b"via"), [b"1.0 fred, 1.1 rrlb"])

    async def test_forwarded_proto_https(self) -> None:
        """
        A request that came in over TLS is forwarded with
        X-Forwarded-Proto: https.
        """
        from twisted.internet import ssl
        from twisted.internet.endpoints import SSL4ClientEndpoint
        from twisted.test import __file__ as twisted_test

        pem = os.path.join(os.path.dirname(twisted_test), "server.pem")
        backend = await self.backend()
        _, port = await self.balancer(
            [backend.url],
            listen=f"ssl:0:interface={LOOPBACK}:privateKey={pem}:certKey={pem}",
        )
        client = RawClient()
        options = ssl.CertificateOptions(verify=False)
        await connectProtocol(SSL4ClientEndpoint(reactor, LOOPBACK, port, options), client)
        self.addCleanup(client.close)
        client.send(get(b"/tls", b"secure.example"))
        result = await client.response()
        assert result is not None
        self.assertEqual(result.code, 200)
        self.assertEqual(backend.requests[0].header(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(backend.requests[0].header(b"x-forwarded-host"), [b"secure.example"])

    async def test_large_post_body(self) -> None:
        """
        A 5 MB POST body reaches the node whole, with its length, its
        sha256 intact, and no chunked framing.
        """

        def digest(request: RecordedRequest, conn: BackendConnection) -> bytes:
            return response(body=hashlib.sha256(request.body).hexdigest().encode())

        backend = await self.backend(digest)
        _, port = await self.balancer([backend.url])
        body = os.urandom(5 * 1024 * 1024)
        head = (
            b"POST /upload HTTP/1.1\r\nHost: client.example\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        result = await self.exchange(port, head + body)
        assert result is not None
        self.assertEqual(result.code, 200)
        self.assertEqual(result.body, hashlib.sha256(body).hexdigest().encode())
        request = backend.requests[0]
        self.assertEqual(request.header(b"content-length"), [b"%d" % len(body)])
        self.assertEqual(request.header(b"transfer-encoding"), [])
        self.assertEqual(request.header(b"content-type"), [b"application/octet-stream"])

    async def test_chunked_request_body(self) -> None:
        """
        A chunked request body is forwarded with its Content-Length instead
        of the chunked framing, byte for byte.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        await self.exchange(
            port,
            b"PUT /c HTTP/1.1\r\nHost: client.example\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked_body(b"hello ", b"chunked ", b"world"),
        )
        request = backend.requests[0]
        self.assertEqual(request.body, b"hello chunked world")
        self.assertEqual(request.header(b"content-length"), [b"19"])
        self.assertEqual(request.header(b"transfer-encoding"), [])

    async def test_bodiless_get_has_no_length(self) -> None:
        """
        A GET without a body is forwarded without Content-Length or
        Transfer-Encoding.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        await self.exchange(port, get(b"/"))
        request = backend.requests[0]
        self.assertEqual(request.header(b"content-length"), [])
        self.assertEqual(request.header(b"transfer-encoding"), [])
        self.assertEqual(request.body, b"")

    async def test_expect_100_continue(self) -> None:
        """
        A client that sends Expect: 100-continue gets 100 Continue (here
        from rrlb, as this node never answers the Expect itself), then its
        body reaches the node and the node's answer comes back.
        """
        backend = await self.backend(lambda request, conn: response(body=b"got " + request.body))
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(
            b"POST /e HTTP/1.1\r\nHost: client.example\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\n\r\n"
        )
        await wait_for(lambda: b"\r\n\r\n" in client.data, "100 Continue")
        self.assertTrue(bytes(client.data).startswith(b"HTTP/1.1 100 Continue\r\n"), client.data)
        self.assertEqual(backend.requests, [])
        client.send(b"hello")
        result = await client.response()
        assert result is not None
        self.assertEqual(result.code, 200)
        self.assertEqual(result.body, b"got hello")
        self.assertEqual(backend.requests[0].body, b"hello")
        self.assertEqual(backend.requests[0].header(b"expect"), [b"100-continue"])

    async def test_expect_100_continue_from_the_node(self) -> None:
        """
        A node that answers Expect: 100-continue with its own 100 Continue
        has it passed on to the client at once, once only.
        """
        # rrlb's own 100 after a silent node would come too late to count.
        self.patch(body_module, "CONTINUE_WAIT", 60.0)
        backend = await self.backend(
            lambda request, conn: response(body=b"got " + request.body),
            interim=b"HTTP/1.1 100 Continue\r\n\r\n",
        )
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(
            b"POST /e HTTP/1.1\r\nHost: client.example\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\n\r\n"
        )
        await wait_for(lambda: b"\r\n\r\n" in client.data, "100 Continue")
        client.send(b"hello")
        result = await client.response()
        assert result is not None
        self.assertEqual(result.body, b"got hello")
        self.assertEqual(bytes(client.data).count(b"100 Continue"), 1)

    async def test_absolute_form_target(self) -> None:
        """
        An absolute-form target goes to a configured node, never to the
        host it names: the node gets its path and query, and the target's
        authority as Host (RFC 9112 3.2.2).
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        result = await self.exchange(
            port,
            b"GET http://other.example:81/x/%7Ey?q=%20 HTTP/1.1\r\nHost: ignored.example\r\n\r\n",
        )
        assert result is not None
        self.assertEqual(result.code, 200)
        request = backend.requests[0]
        self.assertEqual(request.target, b"/x/%7Ey?q=%20")
        self.assertEqual(request.header(b"host"), [b"other.example:81"])

    async def test_absolute_form_without_path(self) -> None:
        """
        An absolute-form target with no path is forwarded as "/" (with its
        query), under the node's base path.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url + "/base"])
        await self.exchange(port, b"GET http://other.example?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(backend.requests[0].target, b"/base/?q=1")
        self.assertEqual(backend.requests[0].header(b"host"), [b"other.example"])

    async def test_connect_refused(self) -> None:
        """
        CONNECT gets a plain-text 405 and never reaches a node: rrlb is not
        an open proxy.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        result = await self.exchange(
            port, b"CONNECT other.example:443 HTTP/1.1\r\nHost: other.example:443\r\n\r\n"
        )
        self.assertPlainTextError(result, 405)
        self.assertEqual(backend.requests, [])

    async def test_bad_target(self) -> None:
        """
        A target that is neither origin- nor absolute-form gets a
        plain-text 400 and never reaches a node.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        result = await self.exchange(port, b"GET ftp://x/y HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertPlainTextError(result, 400)
        self.assertEqual(backend.requests, [])


# -- responses ---------------------------------------------------------------------


class ResponseForwardingTests(WireCase):
    """
    What a client receives for what a node sent.
    """

    async def test_status_and_reason(self) -> None:
        """
        Status code and reason phrase reach the client as the node sent
        them, standard or not, on one keep-alive connection.
        """
        statuses = [
            b"201 Created",
            b"302 Found",
            b"404 Not Found",
            b"500 Internal Server Error",
            b"200 Fine By Me",
            b"418 I'm a teapot",
            b"599 Custom Failure",
            b"404 ",
        ]
        answers = iter(statuses)

        def handler(request: RecordedRequest, conn: BackendConnection) -> bytes:
            return response(next(answers), b"x", (b"Location: /elsewhere",))

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        for status in statuses:
            client.send(get(b"/s"))
            result = await client.response()
            assert result is not None
            self.assertEqual(result.status_line, b"HTTP/1.1 " + status)
            self.assertEqual(result.body, b"x")

    async def test_no_content(self) -> None:
        """
        A 204 reaches the client with its reason and no body, and the
        connection stays usable.
        """
        answers = iter([b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", response()])
        backend = await self.backend(lambda request, conn: next(answers))
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/one") + get(b"/two"))
        first = await client.response()
        second = await client.response()
        assert first is not None and second is not None
        self.assertEqual(first.status_line, b"HTTP/1.1 204 No Content")
        self.assertEqual(first.header(b"x-a"), [b"1"])
        self.assertEqual(first.header(b"transfer-encoding"), [])
        self.assertEqual((second.code, second.body), (200, b"ok"))

    async def test_not_modified(self) -> None:
        """
        A 304 reaches the client with its validators and no body, and the
        connection stays usable.
        """
        answers = iter(
            [b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 50\r\n\r\n', response()]
        )
        backend = await self.backend(lambda request, conn: next(answers))
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/one", b"h", b'If-None-Match: "v1"') + get(b"/two"))
        first = await client.response()
        second = await client.response()
        assert first is not None and second is not None
        self.assertEqual(first.status_line, b"HTTP/1.1 304 Not Modified")
        self.assertEqual(first.header(b"etag"), [b'"v1"'])
        self.assertEqual((second.code, second.body), (200, b"ok"))

    async def test_response_headers_pass_through(self) -> None:
        """
        Every end-to-end response header arrives with all its values in
        order (repeated Set-Cookie included); the node's Server, Date and
        Content-Type are neither replaced nor duplicated; hop-by-hop ones
        and those named in Connection are dropped.
        """
        node_headers = (
            b"Server: node-server/1.0",
            b"Date: Tue, 01 Jan 2030 00:00:00 GMT",
            b"Content-Type: application/x-node; charset=latin-1",
            b"Set-Cookie: a=1; Path=/",
            b"X-Multi: one",
            b"Set-Cookie: b=2; Expires=Wed, 09 Jun 2031 10:18:14 GMT",
            b"X-Multi: two, three",
            b"Connection: X-Secret",
            b"X-Secret: hidden",
            b"Keep-Alive: timeout=5",
            b"Proxy-Authenticate: Basic realm=x",
            b"Trailer: X-Sum",
            b"Upgrade: h2c",
            b"Set-Cookie: c=3",
            b"Cache-Control: no-store",
        )
        backend = await self.backend(
            lambda request, conn: response(b"200 OK", b"body", node_headers)
        )
        _, port = await self.balancer([backend.url])
        result = await self.exchange(port, get(b"/"))
        assert result is not None
        self.assertEqual(result.header(b"server"), [b"node-server/1.0"])
        self.assertEqual(result.header(b"date"), [b"Tue, 01 Jan 2030 00:00:00 GMT"])
        self.assertEqual(result.header(b"content-type"), [b"application/x-node; charset=latin-1"])
        self.assertEqual(
            result.header(b"set-cookie"),
            [b"a=1; Path=/", b"b=2; Expires=Wed, 09 Jun 2031 10:18:14 GMT", b"c=3"],
        )
        self.assertEqual(result.header(b"x-multi"), [b"one", b"two, three"])
        self.assertEqual(result.header(b"cache-control"), [b"no-store"])
        self.assertEqual(result.header(b"content-length"), [b"4"])
        names = {n.lower() for n, _ in result.headers}
        for hop in (b"x-secret", b"keep-alive", b"proxy-authenticate", b"trailer", b"upgrade"):
            self.assertNotIn(hop, names)
        self.assertEqual(result.body, b"body")

    async def test_no_defaults_added(self) -> None:
        """
        A node that sends no Server or Content-Type gets none added by
        rrlb, and exactly one Date.
        """
        backend = await self.backend(lambda request, conn: response(b"200 OK", b"bare"))
        _, port = await self.balancer([backend.url])
        result = await self.exchange(port, get(b"/"))
        assert result is not None
        self.assertEqual(result.header(b"server"), [])
        self.assertEqual(result.header(b"content-type"), [])
        self.assertEqual(len(result.header(b"date")), 1)

    async def test_content_length_kept(self) -> None:
        """
        A node's Content-Length reaches the client and the body is not
        re-framed as chunked.
        """
        backend = await self.backend(lambda request, conn: response(body=b"x" * 100000))
        _, port = await self.balancer([backend.url])
        result = await self.exchange(port, get(b"/"))
        assert result is not None
        self.assertEqual(result.header(b"content-length"), [b"100000"])
        self.assertFalse(result.chunked)
        self.assertEqual(result.body, b"x" * 100000)

    async def test_chunked_upstream_response(self) -> None:
        """
        A chunked response from the node reaches an HTTP/1.1 client chunked
        (no Content-Length), with the same body; chunk extensions and
        trailers of the node do not leak.
        """
        body = b"5;ext=1\r\nhello\r\n7\r\n chunky\r\n0\r\nX-Sum: 1\r\n\r\n"
        backend = await self.backend(
            lambda request, conn: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
        )
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/one") + get(b"/two"))
        for _ in range(2):
            result = await client.response()
            assert result is not None
            self.assertTrue(result.chunked)
            self.assertEqual(result.header(b"content-length"), [])
            self.assertEqual(result.body, b"hello chunky")
            self.assertNotIn(b"ext=1", result.raw)
            self.assertNotIn(b"X-Sum", result.raw)

    async def test_connection_cannot_remove_framing(self) -> None:
        """
        A response whose Connection header names Transfer-Encoding (or
        Content-Length) is still read by its chunked framing: the chunk
        syntax is never taken for the body, and what follows it is never
        served as another client's response.
        """
        body = b"5\r\nhello\r\n0\r\n\r\n"
        backend = await self.backend(
            lambda request, conn: (
                b"HTTP/1.1 200 OK\r\nConnection: Transfer-Encoding, Content-Length"
                b"\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n" + body
            )
        )
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/one") + get(b"/two"))
        for _ in range(2):
            result = await client.response()
            assert result is not None
            self.assertEqual(result.body, b"hello")
        self.assertEqual(len(backend.connections), 1)

    async def test_http10_response_with_coding_not_reused(self) -> None:
        """
        An HTTP/1.0 response with Transfer-Encoding has faulty framing (RFC
        9112 6.1): it is read, and its connection is never used again.
        """
        backend = await self.backend(
            lambda request, conn: (
                b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
            )
        )
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/one") + get(b"/two"))
        for _ in range(2):
            result = await client.response()
            assert result is not None
            self.assertEqual(result.body, b"hi")
        self.assertEqual(len(backend.connections), 2)

    async def test_chunked_upstream_response_to_http10_client(self) -> None:
        """
        An HTTP/1.0 client gets a chunked node response unchunked, ended by
        the connection closing.
        """
        backend = await self.backend(
            lambda request, conn: (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                + chunked_body(b"hello", b" old", b" client")
            )
        )
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        await wait_for(lambda: client.closed, "rrlb to close the HTTP/1.0 connection")
        result = await client.response()
        assert result is not None
        self.assertFalse(result.chunked)
        self.assertEqual(result.body, b"hello old client")

    async def test_body_until_close(self) -> None:
        """
        A node response framed by closing the connection (no length, not
        chunked) reaches an HTTP/1.1 client chunked and complete.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nX-Close: 1\r\n\r\nuntil ")
            conn.transport.write(b"close")
            conn.transport.loseConnection()

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url])
        result = await self.exchange(port, get(b"/"))
        assert result is not None
        self.assertTrue(result.chunked)
        self.assertEqual(result.body, b"until close")
        self.assertTrue(result.raw.endswith(b"0\r\n\r\n"))

    async def test_body_streamed_as_it_arrives(self) -> None:
        """
        Body bytes reach the client as the node sends them, before the
        node has finished (Content-Length and chunked alike).
        """
        held: list[BackendConnection] = []

        def handler(request: RecordedRequest, conn: BackendConnection) -> bytes:
            held.append(conn)
            if request.target == b"/length":
                return b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst"
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/length"))
        await wait_for(lambda: bytes(client.data).endswith(b"first"), "the first bytes")
        held[0].transport.write(b"after")
        result = await client.response()
        assert result is not None
        self.assertEqual(result.body, b"firstafter")
        client.send(get(b"/chunked"))
        await wait_for(lambda: bytes(client.data).endswith(b"first\r\n"), "the first chunk")
        held[1].transport.write(b"5\r\nafter\r\n0\r\n\r\n")
        result = await client.response()
        assert result is not None
        self.assertEqual(result.body, b"firstafter")

    async def test_head(self) -> None:
        """
        HEAD gets the node's headers (Content-Length included) and no body,
        and the client connection stays usable. The node's connection is not
        reused: a node that sends a body for HEAD anyway would have it read
        as the next response (tests/test_late_bytes.py).
        """
        answers = iter(
            [
                b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/x\r\n\r\n",
                response(body=b"after head"),
            ]
        )
        backend = await self.backend(lambda request, conn: next(answers))
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await client.response(head_request=True)
        client.send(get(b"/g"))
        second = await client.response()
        assert first is not None and second is not None
        self.assertEqual(first.code, 200)
        self.assertEqual(first.header(b"content-length"), [b"1234"])
        self.assertEqual(first.header(b"transfer-encoding"), [])
        self.assertEqual(second.body, b"after head")
        self.assertEqual(backend.requests[0].method, b"HEAD")
        self.assertEqual(len(backend.connections), 2)


# -- failures ------------------------------------------------------------------------


class FailureTests(WireCase):
    """
    Nodes and clients that fail, and what each side then sees.
    """

    async def test_node_drops_mid_body(self) -> None:
        """
        A node that closes the connection mid-body (Content-Length not
        reached): the client's connection is closed without a complete
        response, and it is logged.
        """
        events = self.capture_log()

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            conn.transport.write(b"x" * 1000)
            reactor.callLater(0.05, conn.transport.loseConnection)

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/"))
        result = await client.response()
        self.assertIsNone(result)
        self.assertTrue(client.closed)
        self.assertIn(b"Content-Length: 100000", client.data)
        self.assertLess(len(client.data), 100000)
        self.assertTrue(
            any("dropped" in (e.get("log_format") or "") for e in events),
            [e.get("log_format") for e in events],
        )

    async def test_node_drops_mid_chunked_body(self) -> None:
        """
        A node that closes mid-way through a chunked body: the client never
        gets the final chunk, and its connection is closed.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
            )
            reactor.callLater(0.05, conn.transport.loseConnection)

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/"))
        result = await client.response()
        self.assertIsNone(result)
        self.assertTrue(client.closed)
        self.assertIn(b"hello", client.data)
        self.assertNotIn(b"0\r\n\r\n", client.data)

    async def test_node_drops_mid_body_to_slow_reader(self) -> None:
        """
        A node that closes mid-body while the client is reading slowly (so
        rrlb has paused it): once the client has read what was sent, its
        connection is closed rather than left hanging.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 << 20))
            producer = BulkProducer(conn.transport, b"d" * 65536, 16 << 20)
            producer.start()
            conn.transport.loseConnection()  # once the 16 MB are written

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        received = read_then_pause(client)
        client.send(get(b"/"))
        await wait_for(lambda: received["n"], "the start of the response")
        await sleep(0.3)  # let rrlb's buffer to this client fill up
        client.transport.resumeProducing()
        await wait_for(lambda: client.closed, "rrlb to close the client connection")
        self.assertLess(received["n"], 64 << 20)
        self.assertGreater(received["n"], 16 << 20)

    async def test_client_drops_mid_body(self) -> None:
        """
        A client that goes away mid-response: the upstream connection is
        closed (the node sees it go), nothing stays in flight or pooled.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
            conn.transport.write(b"x" * 5000)

        backend = await self.backend(handler)
        service, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/"))
        await wait_for(lambda: len(client.data) > 5000, "the start of the body")
        client.transport.abortConnection()
        await wait_for(lambda: backend.connections[0].closed, "the upstream connection to close")
        upstream = service.traffic.upstream
        await wait_for(lambda: upstream.connection_count == 0, "no upstream connections")
        node = service.pool.nodes[0]
        self.assertEqual(node.in_flight, 0)
        self.assertEqual(service.traffic.upstream.idle_count(node.key), 0)

    async def test_client_drops_before_response(self) -> None:
        """
        A client that goes away while the node has not answered yet: the
        upstream request is cancelled and its connection closed.
        """
        backend = await self.backend(lambda request, conn: None)
        service, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/slow"))
        await wait_for(lambda: backend.requests, "the request to reach the node")
        await client.close()
        await wait_for(lambda: backend.connections[0].closed, "the upstream connection to close")
        self.assertEqual(service.pool.nodes[0].in_flight, 0)

    async def test_get_retried_on_refused_node(self) -> None:
        """
        A GET whose node refuses the connection is retried on the next
        node, and the client gets that node's answer.
        """
        backend = await self.backend(lambda request, conn: response(body=b"second"))
        service, port = await self.balancer([self.dead_url(), backend.url])
        result = await self.exchange(port, get(b"/r"))
        assert result is not None
        self.assertEqual((result.code, result.body), (200, b"second"))
        self.assertEqual(len(backend.requests), 1)
        self.assertEqual(service.pool.nodes[0].failures, 1)

    async def test_post_not_retried_on_refused_node(self) -> None:
        """
        A POST whose node refuses the connection is not retried: the client
        gets a plain-text 502 and the other node never sees it.
        """
        backend = await self.backend()
        _, port = await self.balancer([self.dead_url(), backend.url])
        result = await self.exchange(
            port, b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        )
        self.assertPlainTextError(result, 502)
        self.assertEqual(backend.requests, [])

    async def test_reset_before_response(self) -> None:
        """
        A node that accepts a request on a fresh connection and resets it
        before any byte of a response: a GET is retried on the next node, a
        POST gets a plain-text 502 (the node may have acted on it).
        """

        def reset(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.abortConnection()

        bad = await self.backend(reset)
        good = await self.backend(lambda request, conn: response(body=b"good"))
        service, port = await self.balancer([bad.url, good.url], "--max-idle-per-node", "0")
        result = await self.exchange(port, get(b"/g"))
        assert result is not None
        self.assertEqual((result.code, result.body), (200, b"good"))
        self.assertEqual(service.pool.nodes[0].failures, 1)
        # The retry moved the rotation on: the bad node's turn again.
        result = await self.exchange(port, post(b"/p", b"x"))
        self.assertPlainTextError(result, 502)
        self.assertEqual([r.method for r in bad.requests], [b"GET", b"POST"])
        self.assertEqual([r.method for r in good.requests], [b"GET"])

    async def test_retry_at_most_once_per_node(self) -> None:
        """
        When every node refuses, an idempotent request tries each once and
        then gets a 502.
        """
        service, port = await self.balancer([self.dead_url(), self.dead_url(), self.dead_url()])
        result = await self.exchange(port, get(b"/"))
        self.assertPlainTextError(result, 502)
        self.assertEqual([n.errors for n in service.pool.nodes], [1, 1, 1])

    async def test_passive_ejection(self) -> None:
        """
        Refused connections count as failed checks at once: after C{fall}
        of them the dead node leaves the rotation and real traffic no longer
        tries it, with no probe involved.
        """
        backend = await self.backend()
        service, port = await self.balancer([self.dead_url(), backend.url], "--fall", "2")
        dead = service.pool.nodes[0]
        for _ in range(6):
            result = await self.exchange(port, get(b"/"))
            assert result is not None
            self.assertEqual(result.code, 200)
        self.assertFalse(dead.healthy)
        self.assertNotIn(dead, service.pool.in_rotation)
        self.assertEqual(dead.errors, 2)
        self.assertEqual(len(backend.requests), 6)

    async def test_response_timeout(self) -> None:
        """
        A node that does not answer within --timeout: the client gets a
        plain-text 504.
        """
        backend = await self.backend(lambda request, conn: None)
        _, port = await self.balancer([backend.url], "--timeout", "0.3")
        result = await self.exchange(port, get(b"/"))
        self.assertPlainTextError(result, 504)

    async def test_timeout_between_body_chunks(self) -> None:
        """
        A node that goes silent mid-body for longer than --timeout: the
        client's connection is closed, never a fake complete response.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url], "--timeout", "0.3")
        client = await self.client(port)
        client.send(get(b"/"))
        result = await client.response()
        self.assertIsNone(result)
        self.assertTrue(bytes(client.data).endswith(b"abc"))

    async def test_bad_response_502(self) -> None:
        """
        A node that answers with something that is not HTTP: plain-text 502.
        """
        backend = await self.backend(lambda request, conn: b"SPAM\r\n\r\n")
        _, port = await self.balancer([backend.url])
        result = await self.exchange(port, get(b"/"))
        self.assertPlainTextError(result, 502)


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
