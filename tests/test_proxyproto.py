"""
Tests for the PROXY protocol both ways (L{rrlb.proxyproto}): C{--listen
haproxy:...} takes the client address from a real v1 or v2 header written by
the test, and a node with C{send_proxy} gets a real header at the start of
each connection, read by a test node (a raw one parsing it here, or
twisted.web behind Twisted's own C{haproxy:} wrapper).

The addresses in every header are loopback ones.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any, Optional, cast

import yaml
from OpenSSL import crypto
from twisted.internet import defer, task, tcp
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from twisted.web import server

from rrlb.clients import ClientLimits, ClientSite
from rrlb.config import ConfigError, parse_nodes
from rrlb.listeners import with_default_backlog
from rrlb.proxyproto import (
    PROXY_HEADER_TIMEOUT,
    V2_SIGNATURE,
    ProxyHeaderEndpoint,
    local_header,
    proxy_header,
)
from rrlb.settings import ListenTLS
from rrlb.tap import warn_open_proxy_protocol
from rrlb.tls import listen_endpoint
from tests.support import (
    CLIENT_IP,
    GET_CLOSE,
    LOOPBACK,
    V1_IN,
    Backend,
    LogCapture,
    RawClient,
    balancer_options,
    certs,
    parse_error,
    raw_connect,
    raw_request,
    reactor,
    start_backend,
    start_balancer,
    start_daemon,
    track_connections,
    wait_until,
)

CLIENT_PORT = 5555
V2_IN = (
    V2_SIGNATURE
    + b"\x21\x11\x00\x0c"
    + socket.inet_aton(CLIENT_IP)
    + socket.inet_aton("127.0.0.1")
    + struct.pack("!HH", CLIENT_PORT, 8080)
)
HAPROXY_LISTEN = f"haproxy:tcp:0:interface={LOOPBACK}"


def parse_header(data: bytes) -> tuple[Optional[tuple[Any, ...]], bytes]:
    """
    Parse a PROXY header (written from the specification, independently of
    rrlb's code): C{(version, command/protocol, source, destination,
    source port, destination port)} and the bytes after it, or L{None} and
    C{data} while the header is incomplete.

    @raise ValueError: for something that is no PROXY header.
    """
    if data.startswith(b"PROXY "):
        end = data.find(b"\r\n")
        if end < 0:
            return None, data
        parts = data[:end].split(b" ")
        if parts[1] == b"UNKNOWN":
            return ("v1", "UNKNOWN", None, None, None, None), data[end + 2 :]
        _, proto, src, dst, sport, dport = parts
        header = ("v1", proto.decode(), src.decode(), dst.decode(), int(sport), int(dport))
        return header, data[end + 2 :]
    if data.startswith(V2_SIGNATURE):
        if len(data) < 16:
            return None, data
        version_command, family, length = struct.unpack("!BBH", data[12:16])
        if len(data) < 16 + length:
            return None, data
        body, rest = data[16 : 16 + length], data[16 + length :]
        command = {0x20: "LOCAL", 0x21: "PROXY"}[version_command]
        if family == 0x11:
            src, dst = (
                socket.inet_ntop(socket.AF_INET, body[:4]),
                socket.inet_ntop(socket.AF_INET, body[4:8]),
            )
            sport, dport = struct.unpack("!HH", body[8:12])
        elif family == 0x21:
            src, dst = (
                socket.inet_ntop(socket.AF_INET6, body[:16]),
                socket.inet_ntop(socket.AF_INET6, body[16:32]),
            )
            sport, dport = struct.unpack("!HH", body[32:36])
        else:
            return ("v2", command, None, None, None, None), rest
        return ("v2", command, src, dst, sport, dport), rest
    if len(data) < 16 and (b"PROXY ".startswith(data[:6]) or V2_SIGNATURE.startswith(data[:12])):
        return None, data
    raise ValueError(f"no PROXY header: {data[:20]!r}")


class _NodeConnection(Protocol):
    """
    One connection to a L{ProxyNode}: a PROXY header, then HTTP/1.1
    requests without bodies, each answered with the connection's number.
    """

    factory: ProxyNode
    transport: Any

    def connectionMade(self) -> None:
        self.buffer = b""
        self.header: Optional[tuple[Any, ...]] = None
        self.number = len(self.factory.connections)
        self.factory.connections.append(self)
        self.paths: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.header is None:
            try:
                self.header, self.buffer = parse_header(self.buffer)
            except ValueError:
                self.factory.refused += 1
                self.transport.loseConnection()
                return
            if self.header is None:
                return
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            path = head.split(b" ")[1]
            self.paths.append(path)
            body = b"%d" % self.number
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )


class ProxyNode(Factory):
    """
    A node that demands a PROXY header and records it per connection.

    @ivar connections: every connection, in order.
    @ivar refused: connections that did not start with a PROXY header.
    """

    protocol = _NodeConnection
    noisy = False

    def __init__(self) -> None:
        self.connections: list[_NodeConnection] = []
        self.refused = 0
        self.port: Any = None

    @property
    def traffic(self) -> list[_NodeConnection]:
        """
        The connections that carried requests other than health probes.
        """
        return [c for c in self.connections if any(p != b"/health" for p in c.paths)]

    async def start(self, testcase: unittest.TestCase) -> ProxyNode:
        tracker = track_connections(self)
        self.port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(self)
        testcase.addCleanup(tracker.close_all)
        testcase.addCleanup(self.port.stopListening)
        return self

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port.getHost().port}"


async def haproxy_backend(
    testcase: unittest.TestCase, name: str, tls: Any = None
) -> tuple[Backend, list[Any]]:
    """
    A twisted.web L{Backend} behind Twisted's own PROXY protocol wrapper
    (TLS, if given, after the header); returns it and the client address
    each of its requests had.
    """
    backend = Backend(name)
    clients: list[Any] = []

    def record(request: Any) -> bytes:
        clients.append(request.getClientAddress())
        return name.encode()

    backend.handler = record
    site = server.Site(backend)
    site.noisy = False
    backend._tracker = track_connections(site)
    factory: Any = site if tls is None else TLSMemoryBIOFactory(tls, False, site)
    endpoint = proxyEndpoint(TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK))
    backend.port = await endpoint.listen(factory)
    testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(backend.stop()))
    return backend, clients


async def balancer_with(testcase: unittest.TestCase, nodes: list[Any], *args: str) -> Any:
    path = testcase.mktemp()
    with open(path, "w") as f:
        yaml.safe_dump({"nodes": nodes}, f)
    return await start_balancer(testcase, (), "--config", path, *args)


def responses(data: bytes) -> list[bytes]:
    """
    The bodies of the complete responses (with Content-Length) in C{data}.
    """
    bodies = []
    while b"\r\n\r\n" in data:
        head, rest = data.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            break
        bodies.append(rest[:length])
        data = rest[length:]
    return bodies


async def get(client: Any, path: bytes = b"/") -> bytes:
    """
    One keep-alive GET on a raw connection; its response body.
    """
    before = len(responses(client.received))
    client.send(b"GET %s HTTP/1.1\r\nHost: rrlb.test\r\n\r\n" % path)
    data = await client.wait_for(lambda d: len(responses(d)) > before)
    return responses(data)[before]


class HeaderTests(unittest.TestCase):
    """
    L{proxy_header} and L{local_header} build what the specification says.
    """

    def test_v1(self) -> None:
        """
        Version 1 is one text line naming both ends.
        """
        self.assertEqual(
            proxy_header(
                "v1", IPv4Address("TCP", "127.0.0.5", 40000), IPv4Address("TCP", "127.0.0.1", 80)
            ),
            b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 80\r\n",
        )
        self.assertEqual(
            proxy_header("v1", IPv6Address("TCP", "::1", 40000), IPv6Address("TCP", "::1", 443)),
            b"PROXY TCP6 ::1 ::1 40000 443\r\n",
        )

    def test_v2(self) -> None:
        """
        Version 2 is the binary signature, command PROXY, the family and the
        packed addresses; a parser written from the specification reads it.
        """
        header = proxy_header(
            "v2", IPv4Address("TCP", "127.0.0.5", 40000), IPv4Address("TCP", "127.0.0.1", 80)
        )
        self.assertEqual(len(header), 28)
        self.assertEqual(
            parse_header(header + b"GET"),
            (("v2", "PROXY", "127.0.0.5", "127.0.0.1", 40000, 80), b"GET"),
        )
        header = proxy_header("v2", IPv6Address("TCP", "::1", 1), IPv6Address("TCP", "::1", 2))
        self.assertEqual(parse_header(header), (("v2", "PROXY", "::1", "::1", 1, 2), b""))

    def test_unknown(self) -> None:
        """
        A client that is not on TCP/IP (a UNIX socket) is an unknown source.
        """
        unix = UNIXAddress(b"/run/rrlb.sock")
        self.assertEqual(proxy_header("v1", unix, unix), b"PROXY UNKNOWN\r\n")
        self.assertEqual(
            parse_header(proxy_header("v2", unix, unix))[0], ("v2", "PROXY", None, None, None, None)
        )

    def test_never_raises(self) -> None:
        """
        Addresses that are not what their type says (or a port out of
        range) make an unknown-source header, never an exception.
        """
        bad = IPv4Address("TCP", "foo", 1)
        good = IPv4Address("TCP", "127.0.0.1", 2)
        for source, destination in (
            (bad, good),
            (good, IPv4Address("TCP", "127.0.0.1", 99999)),
            (IPv6Address("TCP", "1.2.3.4", 1), IPv6Address("TCP", "::1", 2)),
        ):
            self.assertEqual(proxy_header("v1", source, destination), b"PROXY UNKNOWN\r\n")
            self.assertEqual(
                parse_header(proxy_header("v2", source, destination))[0][2:], (None,) * 4
            )

    def test_local(self) -> None:
        """
        A health check's header: in v1 the connection's own addresses, in v2
        the LOCAL command.
        """
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 40000),
            peerAddress=IPv4Address("TCP", "127.0.0.2", 80),
        )
        self.assertEqual(
            local_header("v1", transport), b"PROXY TCP4 127.0.0.1 127.0.0.2 40000 80\r\n"
        )
        self.assertEqual(
            parse_header(local_header("v2", transport))[0], ("v2", "LOCAL", None, None, None, None)
        )


class ListenConfigTests(unittest.TestCase):
    """
    C{haproxy:} listen descriptions are accepted, with the default backlog
    under the prefix and rrlb's TLS after the header.
    """

    def test_backlog(self) -> None:
        """
        The backlog goes to the endpoint under C{haproxy:}.
        """
        self.assertEqual(with_default_backlog("haproxy:tcp:8080"), "haproxy:tcp:8080:backlog=511")
        self.assertEqual(
            with_default_backlog("haproxy:tcp:8080:backlog=9"), "haproxy:tcp:8080:backlog=9"
        )

    def test_endpoints(self) -> None:
        """
        C{haproxy:tcp:} and C{haproxy:ssl:} are PROXY endpoints; the latter
        (and C{haproxy:tcp:} when tcp: listeners serve TLS) with rrlb's TLS.
        """
        endpoint, tls = listen_endpoint(reactor, "haproxy:tcp:0", ListenTLS())
        self.assertIsInstance(endpoint, ProxyHeaderEndpoint)
        self.assertIsNone(tls)
        cert = self.mktemp()
        with open(cert, "wb") as f:
            f.write(certs().site_a.cert_pem + certs().site_a.key_pem)
        endpoint, tls = listen_endpoint(reactor, "haproxy:ssl:0", ListenTLS(cert=cert))
        self.assertIsInstance(endpoint, ProxyHeaderEndpoint)
        self.assertIs(endpoint.tls, tls)
        endpoint, tls = listen_endpoint(reactor, "haproxy:tcp:0", ListenTLS(cert=cert), True)
        self.assertIsNotNone(tls)
        with self.assertRaises(ConfigError) as caught:
            listen_endpoint(reactor, "haproxy:ssl:0:bogus=1", ListenTLS(cert=cert))
        self.assertIn("a TLS listener behind haproxy: takes only", str(caught.exception))
        self.assertIn("not bogus", str(caught.exception))

    def test_options(self) -> None:
        """
        C{--listen haproxy:tcp:PORT} parses.
        """
        options = balancer_options("--nodes", "http://127.0.0.1:1", "--listen", "haproxy:tcp:0")
        self.assertEqual(options.config.listen, ("haproxy:tcp:0",))

    def test_send_proxy_key(self) -> None:
        """
        C{send_proxy} is a node key: v1 or v2.
        """
        (node,) = parse_nodes([{"url": "http://127.0.0.1:1", "send_proxy": "v2"}])
        self.assertEqual(node.send_proxy, "v2")
        with self.assertRaises(ConfigError) as caught:
            parse_nodes([{"url": "http://127.0.0.1:1", "send_proxy": True}])
        self.assertIn("nodes[0].send_proxy must be v1 or v2, not True", str(caught.exception))


class ReceiveTests(unittest.TestCase):
    """
    A C{haproxy:} listener: the client address of the PROXY header is the
    one rrlb forwards and logs.
    """

    async def test_v1(self) -> None:
        """
        With a v1 header, the node sees the header's client in
        C{X-Forwarded-For} and the access log names it.
        """
        backend = await start_backend(self, "a")
        log = self.mktemp()
        balancer = await start_balancer(
            self,
            [backend.url],
            "--listen",
            HAPROXY_LISTEN,
            "--access-log",
            log,
            "--access-log-format",
            "json",
        )
        reply = await raw_request(self, balancer.port, V1_IN + GET_CLOSE)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        self.assertEqual(backend.requests[0].header(b"X-Forwarded-For"), CLIENT_IP.encode())
        await balancer.stop()
        with open(log) as f:
            (line,) = f.read().splitlines()
        self.assertEqual(json.loads(line)["remote_addr"], CLIENT_IP)

    async def test_v2_then_keep_alive(self) -> None:
        """
        With a v2 header sent on its own before the request, every request
        on the connection carries the header's client.
        """
        backend = await start_backend(self, "a")
        balancer = await start_balancer(self, [backend.url], "--listen", HAPROXY_LISTEN)
        client = await raw_connect(self, balancer.port)
        client.send(V2_IN)
        for _ in range(2):
            self.assertEqual(await get(client), b"a")
        self.assertEqual(
            [r.header(b"X-Forwarded-For") for r in backend.requests], [CLIENT_IP.encode()] * 2
        )

    async def test_forwarded_for_appended(self) -> None:
        """
        An C{X-Forwarded-For} the client sent is kept, and the header's
        client added after it.
        """
        backend = await start_backend(self, "a")
        balancer = await start_balancer(self, [backend.url], "--listen", HAPROXY_LISTEN)
        await raw_request(
            self,
            balancer.port,
            V1_IN + b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 127.1.1.1\r\n"
            b"Connection: close\r\n\r\n",
        )
        self.assertEqual(
            backend.requests[0].header(b"X-Forwarded-For"), b"127.1.1.1, " + CLIENT_IP.encode()
        )

    async def test_no_header_refused(self) -> None:
        """
        A connection that does not start with a PROXY header (or starts
        with a broken one) is closed; nothing reaches a node.
        """
        backend = await start_backend(self, "a")
        balancer = await start_balancer(self, [backend.url], "--listen", HAPROXY_LISTEN)
        for data in (GET_CLOSE, b"PROXY TCP4 nonsense here\r\n" + GET_CLOSE):
            self.assertEqual(await raw_request(self, balancer.port, data), b"")
        self.assertEqual(backend.requests, [])

    async def test_bad_addresses_refused(self) -> None:
        """
        A header whose words parse but are not addresses of the family it
        names, or whose port is out of range, is a broken header: the
        connection is closed and nothing reaches a node (Twisted's parser
        alone would take them as they are).
        """
        backend = await start_backend(self, "a")
        balancer = await start_balancer(self, [backend.url], "--listen", HAPROXY_LISTEN)
        for header in (
            b"PROXY TCP4 foo bar 1 2\r\n",
            b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n",
            b"PROXY TCP4 6.6.6.6,7.7.7.7 127.0.0.1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 127.0.0.1 99999 8471\r\n",
            b"PROXY TCP6 1.2.3.4 127.0.0.1 1 2\r\n",
        ):
            self.assertEqual(await raw_request(self, balancer.port, header + GET_CLOSE), b"")
        self.assertEqual(backend.requests, [])

    async def test_ipv6_spelled_once(self) -> None:
        """
        An IPv6 client from a v1 or a v2 header is forwarded in the usual
        compressed spelling either way.
        """
        backend = await start_backend(self, "a")
        balancer = await start_balancer(self, [backend.url], "--listen", HAPROXY_LISTEN)
        v1 = b"PROXY TCP6 2001:db8:0:0:0:0:0:1 ::1 5000 80\r\n"
        v2 = V2_SIGNATURE + bytes([0x21, 0x21, 0, 36])
        v2 += socket.inet_pton(socket.AF_INET6, "2001:db8::1") + socket.inet_pton(
            socket.AF_INET6, "::1"
        )
        v2 += struct.pack("!HH", 5000, 80)
        for header in (v1, v2):
            reply = await raw_request(self, balancer.port, header + GET_CLOSE)
            self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        self.assertEqual(
            [r.header(b"X-Forwarded-For") for r in backend.requests], [b"2001:db8::1"] * 2
        )

    async def test_header_timeout(self) -> None:
        """
        A connection that sends no header is dropped after
        L{PROXY_HEADER_TIMEOUT}.
        """
        clock = task.Clock()
        site = ClientSite(Backend("a"), clock, ClientLimits())
        endpoint = ProxyHeaderEndpoint(TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK), clock)
        port = await endpoint.listen(site)
        self.addCleanup(port.stopListening)
        client = await raw_connect(self, port.getHost().port)
        await wait_until(lambda: clock.getDelayedCalls(), what="the header timer")
        clock.advance(PROXY_HEADER_TIMEOUT - 0.1)
        self.assertFalse(client.closed.called)
        clock.advance(0.1)
        await client.closed

    async def test_tls_after_header(self) -> None:
        """
        On C{haproxy:ssl:}, the header comes in the clear and TLS after it,
        as from a load balancer passing TLS through.
        """
        backend = await start_backend(self, "a")
        cert = self.mktemp()
        with open(cert, "wb") as f:
            f.write(certs().site_a.cert_pem + certs().site_a.key_pem)
        balancer = await start_balancer(
            self,
            [backend.url],
            "--listen",
            f"haproxy:ssl:0:interface={LOOPBACK}",
            "--tls-cert",
            cert,
        )
        client = await raw_connect(self, balancer.port)
        client.send(V1_IN)
        trust = Certificate(crypto.X509.from_cryptography(certs().ca.cert))
        client.transport.startTLS(optionsForClientTLS("a.test", trustRoot=trust))
        self.assertEqual(await get(client), b"a")
        request = backend.requests[0]
        self.assertEqual(request.header(b"X-Forwarded-For"), CLIENT_IP.encode())
        self.assertEqual(request.header(b"X-Forwarded-Proto"), b"https")


def accepted_on(port: int) -> int:
    """
    Connections the reactor reads from that were accepted on C{port}: what
    rrlb took from the kernel's backlog and did not park unread.
    """
    return sum(
        1
        for reader in reactor.getReaders()
        if isinstance(reader, tcp.Server) and reader.getHost().port == port
    )


async def connect_from(testcase: unittest.TestCase, source: str, port: int) -> RawClient:
    """
    A L{RawClient} connected to 127.0.0.1:C{port} from the loopback address
    C{source}; closed at cleanup.
    """
    endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, port, bindAddress=(source, 0))
    client: Any = await endpoint.connect(Factory.forProtocol(RawClient))
    testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(client.close()))
    return cast(RawClient, client)


class WaitingForHeaderTests(unittest.TestCase):
    """
    A connection on a C{haproxy:} listener holds a C{--max-connections}
    place from accept, and one that sends no header is closed after
    L{PROXY_HEADER_TIMEOUT}.
    """

    async def test_counted_from_accept(self) -> None:
        """
        With C{--max-connections 5}, of 200 connections that send nothing
        rrlb accepts five; the rest wait in the kernel's backlog. A sixth
        gets in once one of the five has gone.
        """
        backend = await start_backend(self, "a")
        balancer = await start_balancer(
            self, [backend.url], "--listen", HAPROXY_LISTEN, "--max-connections", "5"
        )
        clients = [await raw_connect(self, balancer.port) for _ in range(200)]
        # A request on the first: by the time it is answered, rrlb has had
        # every chance to accept the others.
        clients[0].send(V1_IN)
        self.assertEqual(await get(clients[0]), b"a")
        site = balancer.service.traffic.site
        self.assertEqual(site.open_count, 5)
        self.assertTrue(site.paused)
        self.assertLessEqual(accepted_on(balancer.port), 5)
        await clients[1].close()
        clients[5].send(V1_IN)
        self.assertEqual(await get(clients[5]), b"a")
        self.assertEqual(site.open_count, 5)

    async def test_silent_peer_closed(self) -> None:
        """
        A connection that sends no header is closed after
        L{PROXY_HEADER_TIMEOUT}, and its place goes to the next one.
        """
        clock = task.Clock()
        site = ClientSite(Backend("a"), clock, ClientLimits(max_connections=1))
        endpoint = ProxyHeaderEndpoint(TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK), clock)
        port = site.add_port(await endpoint.listen(site))
        self.addCleanup(port.stopListening)
        silent = await raw_connect(self, port.getHost().port)
        await wait_until(lambda: site.waiting, what="the silent connection accepted")
        self.assertTrue(site.paused)
        late = await raw_connect(self, port.getHost().port)
        late.send(V1_IN + GET_CLOSE)
        clock.advance(PROXY_HEADER_TIMEOUT - 0.1)
        self.assertFalse(silent.closed.called)
        self.assertEqual(len(site.waiting), 1)
        clock.advance(0.1)
        await silent.closed
        reply = await late.closed
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)

    async def test_closed_at_shutdown(self) -> None:
        """
        At shutdown a connection still waiting for its header is closed at
        once (no request of its has begun), and leaves no timer behind.
        """
        backend = await start_backend(self, "a")
        balancer = await start_balancer(self, [backend.url], "--listen", HAPROXY_LISTEN)
        site = balancer.service.traffic.site
        silent = await raw_connect(self, balancer.port)
        await wait_until(lambda: site.waiting, what="the connection accepted")
        await balancer.stop()
        self.assertEqual(await silent.closed, b"")
        self.assertEqual(site.open_count, 0)

    async def test_refused_peer_takes_no_place(self) -> None:
        """
        A connection closed for its peer (C{proxy_protocol_from}) never
        held a place.
        """
        backend = await start_backend(self, "a")
        balancer = await start_balancer(
            self,
            [backend.url],
            "--listen",
            HAPROXY_LISTEN,
            "--max-connections",
            "1",
            "--proxy-protocol-from",
            "127.0.0.2",
        )
        for _ in range(3):
            refused = await raw_connect(self, balancer.port)
            self.assertEqual(await refused.closed, b"")
        client = await connect_from(self, "127.0.0.2", balancer.port)
        client.send(V1_IN)
        self.assertEqual(await get(client), b"a")


class ProxyProtocolFromTests(unittest.TestCase):
    """
    C{proxy_protocol_from} (C{--proxy-protocol-from}): the peers whose
    PROXY headers are believed; a connection from any other is closed.
    """

    async def test_other_peer_closed(self) -> None:
        """
        A connection from outside the networks is closed before its header
        is read, and nothing reaches a node; one from inside is served with
        the header's client. One line says so.
        """
        logs = LogCapture.install(self)
        backend = await start_backend(self, "a")
        balancer = await start_balancer(
            self,
            [backend.url],
            "--listen",
            HAPROXY_LISTEN,
            "--proxy-protocol-from",
            "10.0.0.0/8,127.0.0.2/32",
        )
        for _ in range(2):
            outsider = await raw_connect(self, balancer.port)
            outsider.send(V1_IN + GET_CLOSE)
            self.assertEqual(await outsider.closed, b"")
        self.assertEqual(backend.requests, [])
        refusals = [m for m in logs.messages() if "proxy_protocol_from" in m]
        self.assertEqual(len(refusals), 1, refusals)
        self.assertIn("127.0.0.1", refusals[0])
        client = await connect_from(self, "127.0.0.2", balancer.port)
        client.send(V1_IN + GET_CLOSE)
        reply = await client.closed
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        self.assertEqual(backend.requests[0].header(b"X-Forwarded-For"), CLIENT_IP.encode())

    async def test_yaml_and_reload(self) -> None:
        """
        The YAML key C{proxy_protocol_from} sets it, and a reload changes it
        for new connections.
        """
        backend = await start_backend(self, "a")
        path = self.mktemp()
        with open(path, "w") as f:
            yaml.safe_dump({"nodes": [backend.url], "proxy_protocol_from": ["127.0.0.2"]}, f)
        balancer = await start_balancer(self, (), "--config", path, "--listen", HAPROXY_LISTEN)
        self.assertEqual(
            [str(n) for n in balancer.service.config.proxy_protocol_from], ["127.0.0.2/32"]
        )
        self.assertEqual(await raw_request(self, balancer.port, V1_IN + GET_CLOSE), b"")
        with open(path, "w") as f:
            yaml.safe_dump({"nodes": [backend.url], "proxy_protocol_from": ["127.0.0.0/8"]}, f)
        balancer.service.reload()
        reply = await raw_request(self, balancer.port, V1_IN + GET_CLOSE)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)

    def test_option(self) -> None:
        """
        The flag takes comma-separated networks, like C{--trusted-proxies},
        and a bad one is refused naming the option.
        """
        options = balancer_options(
            "--nodes", "http://127.0.0.1:9", "--proxy-protocol-from", "10.0.0.0/8, ::1"
        )
        self.assertEqual(
            [str(n) for n in options.config.proxy_protocol_from], ["10.0.0.0/8", "::1/128"]
        )
        self.assertIn(
            "--proxy-protocol-from",
            parse_error("--nodes", "http://127.0.0.1:9", "--proxy-protocol-from", "10.0.0/33"),
        )

    def test_warning_when_unset(self) -> None:
        """
        A C{haproxy:} listener without C{proxy_protocol_from} is warned
        about once at start; with it, or without such a listener, nothing
        is said.
        """
        logs = LogCapture.install(self)
        node = ("--nodes", "http://127.0.0.1:9")
        warn_open_proxy_protocol(balancer_options(*node, "--listen", HAPROXY_LISTEN).config)
        (warning,) = [m for m in logs.messages() if "proxy_protocol_from" in m]
        self.assertIn(HAPROXY_LISTEN, warning)
        warn_open_proxy_protocol(
            balancer_options(
                *node, "--listen", HAPROXY_LISTEN, "--proxy-protocol-from", "10.0.0.1"
            ).config
        )
        warn_open_proxy_protocol(balancer_options(*node).config)
        self.assertEqual(len([m for m in logs.messages() if "proxy_protocol_from" in m]), 1)


class SocketActivationTests(unittest.TestCase):
    """
    C{haproxy:systemd:...}: the PROXY protocol on a socket from systemd, in
    a real rrlb process.
    """

    async def test_haproxy_over_systemd_socket(self) -> None:
        """
        rrlb recovers the inherited socket under the C{haproxy:} prefix and
        takes the client from the header.
        """
        backend = await start_backend(self, "a")
        daemon = await start_daemon(
            self, "--listen", "haproxy:systemd:domain=INET:index=0", "--nodes", backend.url
        )
        await daemon.wait_for_message("READY=1")
        reply = await raw_request(self, daemon.port, V1_IN + GET_CLOSE)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        self.assertEqual(backend.requests[0].header(b"X-Forwarded-For"), CLIENT_IP.encode())
        daemon.signal("TERM")
        self.assertEqual(await daemon.exit_code(), 0)


class SendTests(unittest.TestCase):
    """
    A node with C{send_proxy} gets a PROXY header naming the client at the
    start of each connection; such a connection serves one client only.
    """

    async def test_v1_per_client_connection(self) -> None:
        """
        Each client connection gets its own node connection, which starts
        with a v1 header naming that client and carries its later requests;
        health probes start with a header of their own.
        """
        node = await ProxyNode().start(self)
        balancer = await balancer_with(
            self, [{"url": node.url, "send_proxy": "v1"}], "--health-interval", "0.2"
        )
        first = await raw_connect(self, balancer.port)
        second = await raw_connect(self, balancer.port)
        a1 = await get(first)
        b1 = await get(second)
        a2 = await get(first)
        b2 = await get(second)
        self.assertEqual((a1, a2), (a1, a1))
        self.assertEqual((b1, b2), (b1, b1))
        self.assertNotEqual(a1, b1)
        rrlb_port = balancer.port
        for client, body in ((first, a1), (second, b1)):
            connection = node.connections[int(body)]
            self.assertEqual(
                connection.header,
                ("v1", "TCP4", LOOPBACK, LOOPBACK, client.transport.getHost().port, rrlb_port),
            )
            self.assertEqual(connection.paths, [b"/", b"/"])
        await wait_until(
            lambda: any(c.paths == [b"/health"] for c in node.connections), what="a probe"
        )
        probe = next(c for c in node.connections if c.paths == [b"/health"])
        # The probe's own connection: from rrlb's side to the node.
        self.assertEqual(probe.header[:4], ("v1", "TCP4", LOOPBACK, LOOPBACK))
        self.assertEqual(probe.header[5], node.port.getHost().port)
        self.assertEqual(node.refused, 0)
        self.assertTrue(balancer.service.pool.nodes[0].healthy)

    async def test_idle_cap(self) -> None:
        """
        At most C{--max-idle-per-node} idle PROXY connections are kept per
        node: the oldest client's is closed to keep a newer one.
        """
        node = await ProxyNode().start(self)
        balancer = await balancer_with(
            self,
            [{"url": node.url, "send_proxy": "v2"}],
            "--max-idle-per-node",
            "1",
            "--health-interval",
            "30",
        )
        first = await raw_connect(self, balancer.port)
        second = await raw_connect(self, balancer.port)
        a1 = await get(first)
        b1 = await get(second)
        b2 = await get(second)
        a2 = await get(first)
        self.assertEqual(b1, b2)
        self.assertNotEqual(a1, a2)
        self.assertEqual(len(node.traffic), 3)
        self.assertEqual(balancer.service.traffic.upstream.idle_count(node.url), 1)

    async def test_v2_through_twisted_haproxy_node(self) -> None:
        """
        A twisted.web node behind Twisted's own PROXY wrapper sees the
        client's address and port, and takes the health probes' LOCAL header.
        """
        backend, clients = await haproxy_backend(self, "n")
        url = f"http://{LOOPBACK}:{backend.port_number}"
        balancer = await balancer_with(
            self, [{"url": url, "send_proxy": "v2"}], "--health-interval", "0.2"
        )
        client = await raw_connect(self, balancer.port)
        self.assertEqual(await get(client), b"n")
        self.assertEqual(clients, [IPv4Address("TCP", LOOPBACK, client.transport.getHost().port)])
        await wait_until(lambda: backend.probes >= 2, what="probes")
        self.assertTrue(balancer.service.pool.nodes[0].healthy)

    async def test_both_ways(self) -> None:
        """
        Behind a load balancer and in front of a PROXY node, rrlb passes the
        client of the header it got on to the node.
        """
        backend, clients = await haproxy_backend(self, "n")
        url = f"http://{LOOPBACK}:{backend.port_number}"
        balancer = await balancer_with(
            self, [{"url": url, "send_proxy": "v1"}], "--listen", HAPROXY_LISTEN
        )
        reply = await raw_request(self, balancer.port, V2_IN + GET_CLOSE)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        self.assertEqual(clients, [IPv4Address("TCP", CLIENT_IP, CLIENT_PORT)])

    async def test_https_node(self) -> None:
        """
        To an https node the header goes in the clear, TLS after it.
        """
        issued = certs().node
        backend, clients = await haproxy_backend(self, "s", tls=issued.options())
        ca = self.mktemp()
        with open(ca, "wb") as f:
            f.write(certs().ca.cert_pem)
        url = f"https://{LOOPBACK}:{backend.port_number}"
        balancer = await balancer_with(
            self,
            [{"url": url, "send_proxy": "v1", "tls": {"ca_file": ca}}],
            "--health-interval",
            "0.2",
        )
        client = await raw_connect(self, balancer.port)
        self.assertEqual(await get(client), b"s")
        self.assertEqual(clients, [IPv4Address("TCP", LOOPBACK, client.transport.getHost().port)])
        await wait_until(lambda: backend.probes >= 1, what="a probe")
        self.assertTrue(balancer.service.pool.nodes[0].healthy)

    async def test_reload_changes_version(self) -> None:
        """
        A reload that changes a node's C{send_proxy} closes its idle
        connections, which began with the old header; the next request
        opens one with the new.
        """
        node = await ProxyNode().start(self)
        path = self.mktemp()

        def write(version: str) -> None:
            with open(path, "w") as f:
                yaml.safe_dump({"nodes": [{"url": node.url, "send_proxy": version}]}, f)

        write("v1")
        balancer = await start_balancer(self, (), "--config", path, "--health-interval", "30")
        client = await raw_connect(self, balancer.port)
        first = await get(client)
        self.assertEqual(balancer.service.traffic.upstream.idle_count(node.url), 1)
        write("v2")
        self.assertTrue(balancer.service.reload())
        self.assertEqual(balancer.service.traffic.upstream.idle_count(node.url), 0)
        second = await get(client)
        self.assertNotEqual(first, second)
        self.assertEqual(node.connections[int(second)].header[:2], ("v2", "PROXY"))
