"""
HTTP/2 for clients (issue 12) over real loopback TLS: a client that picks
h2 by ALPN gets its streams proxied to nodes over the pooled HTTP/1.1
connections. The clients are the C{h2} library driven by a Twisted
protocol (many concurrent streams, resets) and Debian's curl (C{--http2}).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from typing import Any

from OpenSSL import crypto
from twisted.internet import defer, utils
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.ssl import Certificate, optionsForClientTLS

from rrlb.drain import DRAIN_POLL
from tests.support import (
    LOOPBACK,
    BackendConnection,
    Client,
    EchoFactory,
    HTTP2Case,
    RecordedRequest,
    WireClient,
    balancer_options,
    https_get,
    parse_error,
    reactor,
    response,
    start_balancer,
    wait_for,
)


def named(name: bytes) -> Any:
    def handler(request: RecordedRequest, conn: BackendConnection) -> bytes:
        return response(body=name, headers=(b"Connection: keep-alive", b"Keep-Alive: timeout=5"))

    return handler


class HTTP2Tests(HTTP2Case):
    """
    Streams proxied over HTTP/1.1 to the nodes.
    """

    async def test_concurrent_streams_rotate(self) -> None:
        """
        Many concurrent streams on one connection rotate over the nodes;
        the nodes get HTTP/1.1 with Host from :authority and Via 2 rrlb, and
        no connection-specific header reaches the client.
        """
        nodes = [await self.backend(named(n)) for n in (b"a", b"b", b"c")]
        balancer = await self.h2_balancer([n.url for n in nodes])
        client = await self.h2_connect(balancer.port)
        answers = [client.request(b"GET", b"/s/%d" % i)[1] for i in range(30)]
        done = await defer.gatherResults([a.done for a in answers])
        bodies = sorted(bytes(a.body) for a in done)
        self.assertEqual(bodies, [b"a"] * 10 + [b"b"] * 10 + [b"c"] * 10)
        self.assertEqual({a.status for a in done}, {200})
        for answer in done:
            names = {name.lower() for name, _ in answer.raw_headers}
            self.assertFalse(names & {b"connection", b"keep-alive", b"transfer-encoding"})
        request = nodes[0].requests[0]
        self.assertEqual(request.version, b"HTTP/1.1")
        self.assertEqual(request.header(b"host"), [b"h2.example"])
        self.assertEqual(request.header(b"via"), [b"2 rrlb"])
        self.assertEqual(request.header(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(len(balancer.service.traffic.site.channels), 1)

    async def test_large_streamed_response(self) -> None:
        """
        A large response streams to the client under HTTP/2 flow control,
        intact.
        """
        data = os.urandom(8 << 20)
        node = await self.backend(lambda request, conn: response(body=data))
        balancer = await self.h2_balancer([node.url])
        client = await self.h2_connect(balancer.port)
        _, answer = client.request(b"GET", b"/big")
        await answer.done
        self.assertEqual(answer.status, 200)
        self.assertEqual(hashlib.sha256(answer.body).digest(), hashlib.sha256(data).digest())

    async def test_upload_streams(self) -> None:
        """
        A request body sent over HTTP/2 reaches the node with its length.
        """

        def digest(request: RecordedRequest, conn: BackendConnection) -> bytes:
            return response(body=hashlib.sha256(request.body).hexdigest().encode())

        node = await self.backend(digest)
        balancer = await self.h2_balancer([node.url])
        client = await self.h2_connect(balancer.port)
        data = os.urandom(200_000)
        stream, answer = client.request(
            b"POST", b"/up", data[:1000], ((b"content-length", b"%d" % len(data)),), end=False
        )
        sent = 1000
        while sent < len(data):
            window = client.conn.local_flow_control_window(stream)
            if window <= 0:
                await wait_for(lambda: client.conn.local_flow_control_window(stream) > 0)
                continue
            piece = data[sent : sent + min(window, 16384)]
            sent += len(piece)
            client.send(stream, piece, end=sent == len(data))
        await answer.done
        self.assertEqual(bytes(answer.body), hashlib.sha256(data).hexdigest().encode())
        self.assertEqual(node.requests[0].header(b"content-length"), [b"%d" % len(data)])

    async def test_reset_cancels_only_its_request(self) -> None:
        """
        A stream the client resets cancels its own upstream request (its
        node connection closes); the other stream on the connection is
        answered.
        """
        held: list[BackendConnection] = []

        def hold(request: RecordedRequest, conn: BackendConnection) -> None:
            held.append(conn)

        node = await self.backend(hold)
        balancer = await self.h2_balancer([node.url])
        client = await self.h2_connect(balancer.port)
        first, gone = client.request(b"GET", b"/first")
        await wait_for(lambda: len(held) == 1, "the first request at the node")
        second, kept = client.request(b"GET", b"/second")
        await wait_for(lambda: len(held) == 2, "the second request at the node")
        client.cancel(first)
        await wait_for(lambda: held[0].closed, "the first upstream request to be cancelled")
        self.assertFalse(held[1].closed)
        held[1].transport.write(response(body=b"second"))
        await kept.done
        self.assertEqual((kept.status, bytes(kept.body)), (200, b"second"))
        await wait_for(lambda: balancer.service.pool.nodes[0].in_flight == 0, "no request left")

    async def test_http11_on_the_same_listener(self) -> None:
        """
        A client offering only http/1.1 by ALPN is served HTTP/1.1 as before.
        """

        node = await self.backend(named(b"a"))
        balancer = await self.h2_balancer([node.url])
        code, body, headers = await https_get(
            self, f"https://127.0.0.1:{balancer.port}/", self.certs.ca
        )
        self.assertEqual((code, body), (200, b"a"))
        self.assertEqual(node.requests[0].header(b"via"), [b"1.1 rrlb"])

    async def test_curl_http2(self) -> None:
        """
        Debian's curl with --http2 speaks HTTP/2 to rrlb and gets the node's
        answer.
        """
        curl = shutil.which("curl")
        if curl is None:
            raise self.skipTest("curl is not installed")
        node = await self.backend(named(b"a"))
        balancer = await self.h2_balancer([node.url])
        out, err, code = await utils.getProcessOutputAndValue(
            curl,
            [
                "--http2",
                "-sS",
                "--max-time",
                "10",
                "--cacert",
                self.ca_file,
                "--resolve",
                f"a.test:{balancer.port}:127.0.0.1",
                "-w",
                "\n%{http_version}",
                f"https://a.test:{balancer.port}/curl",
            ],
            env=os.environ,
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"a\n2")


class HTTP2SettingTests(HTTP2Case):
    """
    --http2 and its YAML key; off, nothing of rrlb's HTTP/2 is loaded.
    """

    def test_option_and_yaml(self) -> None:
        """
        --http2 and YAML http2: true turn it on; it is off by default.
        """

        nodes = ("--nodes", "http://127.0.0.1:9")
        self.assertFalse(balancer_options(*nodes).config.http2)
        self.assertTrue(balancer_options(*nodes, "--http2").config.http2)
        path = self.write("h2.yaml", b"nodes: [http://127.0.0.1:9]\nhttp2: true\n")
        self.assertTrue(balancer_options("--config", path).config.http2)
        path = self.write("bad.yaml", b"nodes: [http://127.0.0.1:9]\nhttp2: sometimes\n")
        self.assertIn("http2", parse_error("--config", path))

    def test_off_loads_nothing(self) -> None:
        """
        Without --http2 the service never imports rrlb.http2, and a TLS
        listener offers no h2.
        """
        code = (
            "import sys\n"
            "from rrlb.tap import Options, makeService\n"
            "o = Options(); o.parseOptions(['--nodes', 'http://127.0.0.1:9'])\n"
            "makeService(o)\n"
            "print('rrlb.http2' in sys.modules)\n"
        )
        import rrlb

        # The rrlb under test, wherever trial runs from.
        top = os.path.dirname(os.path.dirname(os.path.abspath(rrlb.__file__)))
        env = dict(os.environ, PYTHONPATH=top)
        out = subprocess.run(
            [sys.executable, "-c", code + "import rrlb; print(rrlb.__file__)\n"],
            capture_output=True,
            timeout=60,
            env=env,
        )
        lines = out.stdout.split()
        self.assertEqual(lines[-1].decode(), os.path.abspath(rrlb.__file__), out.stderr)
        out.stdout = lines[0]
        self.assertEqual(out.stdout.strip(), b"False", out.stderr)

    async def test_off_no_alpn_h2(self) -> None:
        """
        Without --http2, a client asking for h2 by ALPN gets none.
        """
        cert, key = self.write_pair("site", self.certs.site_a)
        node = await self.backend(named(b"a"))
        balancer = await start_balancer(
            self,
            [node.url],
            "--listen",
            "ssl:0:interface=127.0.0.1",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--health-interval",
            "3600",
        )
        trust = Certificate(crypto.X509.from_cryptography(self.certs.ca.cert))
        options = optionsForClientTLS(
            "a.test", trustRoot=trust, acceptableProtocols=[b"h2", b"http/1.1"]
        )
        endpoint = SSL4ClientEndpoint(reactor, LOOPBACK, balancer.port, options)
        client = await connectProtocol(endpoint, WireClient())
        client.send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        result = await client.response()
        assert result is not None
        self.assertEqual((result.version, result.body), (b"HTTP/1.1", b"a"))
        self.assertIn(client.transport.negotiatedProtocol, (None, b"http/1.1"))
        await client.close()


class HTTP2ConnectionLifeTests(HTTP2Case):
    """
    Limits, idle timeout and the drain for HTTP/2 connections.
    """

    async def test_max_body_size(self) -> None:
        """
        --max-body-size refuses an HTTP/2 body announced too large, and one
        that grows past it while streaming, with 413 on that stream only.
        """
        node = await self.backend(lambda request, conn: None)
        balancer = await self.h2_balancer([node.url], "--max-body-size", "1000")
        client = await self.h2_connect(balancer.port)
        _, announced = client.request(
            b"POST", b"/a", None, ((b"content-length", b"5000"),), end=False
        )
        await announced.done
        self.assertEqual(announced.status, 413)
        stream, grown = client.request(b"POST", b"/b", b"y" * 600, end=False)
        await wait_for(lambda: node.connections, "the request at the node")
        client.send(stream, b"z" * 600)
        await grown.done
        self.assertEqual(grown.status, 413)
        await wait_for(lambda: node.connections[0].closed, "the node's request to be cut")
        _, after = client.request(b"GET", b"/c")
        await wait_for(lambda: len(node.requests) >= 1, "the next request")
        node.requests[-1].connection.transport.write(response(body=b"ok"))
        await after.done
        self.assertEqual((after.status, bytes(after.body)), (200, b"ok"))

    async def test_body_timeout(self) -> None:
        """
        An HTTP/2 body that stops coming for --client-body-timeout gets 408
        and its node request is cut off; the connection carries on.
        """
        node = await self.backend(lambda request, conn: None)
        balancer = await self.h2_balancer([node.url], "--client-body-timeout", "0.3")
        client = await self.h2_connect(balancer.port)
        _, stalled = client.request(
            b"POST", b"/a", b"part", ((b"content-length", b"100"),), end=False
        )
        await wait_for(lambda: node.connections, "the request at the node")
        await stalled.done
        self.assertEqual(stalled.status, 408)
        await wait_for(lambda: node.connections[0].closed, "the node's request to be cut")
        self.assertEqual(balancer.service.pool.nodes[0].in_flight, 0)
        self.assertEqual(len(balancer.service.traffic.site.channels), 1)

    async def test_idle_connection_closes(self) -> None:
        """
        An HTTP/2 connection with no stream open for --keepalive-timeout is
        closed.
        """
        node = await self.backend(named(b"a"))
        balancer = await self.h2_balancer([node.url], "--keepalive-timeout", "0.3")
        client = await self.h2_connect(balancer.port)
        _, answer = client.request(b"GET", b"/")
        await answer.done
        await client.lost
        await wait_for(lambda: not balancer.service.traffic.site.channels, "rrlb to close it")

    async def test_protocol_error_closes(self) -> None:
        """
        After a connection error of the client's (a CONTINUATION frame with
        no HEADERS before it), rrlb sends GOAWAY and closes the connection at
        once: it neither keeps it open until --keepalive-timeout nor keeps
        the bytes that follow (h2 would hold every one in its frame buffer;
        a CONTINUATION flood grew rrlb by 90 MB in 20 s).
        """
        node = await self.backend(named(b"a"))
        balancer = await self.h2_balancer([node.url], "--keepalive-timeout", "3600")
        client = await self.h2_connect(balancer.port)
        _, answer = client.request(b"GET", b"/")
        await answer.done
        frame = b"\x00\x00\x01\x09\x04\x00\x00\x00\x03\x82"
        client.transport.write(frame + b"\x00" * 65536)
        await client.lost
        await wait_for(lambda: not balancer.service.traffic.site.channels, "rrlb to close it")
        self.assertEqual(node.requests[0].target, b"/")

    async def test_close_notify_withheld(self) -> None:
        """
        An HTTP/2 connection rrlb closes (here at --keepalive-timeout) whose
        client never answers TLS close_notify (it stopped reading) is cut
        off after the site's close_timeout, as an HTTP/1.1 one is: TLS waits
        for the client's close_notify, and the connection kept its place
        under --max-connections for ever.
        """
        node = await self.backend(named(b"a"))
        balancer = await self.h2_balancer([node.url], "--keepalive-timeout", "0.3")
        balancer.service.traffic.site.close_timeout = 0.5
        client = await self.h2_connect(balancer.port)
        _, answer = client.request(b"GET", b"/")
        await answer.done
        client.transport.pauseProducing()
        await wait_for(lambda: not balancer.service.traffic.site.channels, "rrlb to cut it off")

    async def test_drain_waits_for_streams(self) -> None:
        """
        Stopping rrlb sends GOAWAY, lets the open stream finish, then closes
        the connection.
        """
        held: list[BackendConnection] = []
        node = await self.backend(lambda request, conn: held.append(conn))
        balancer = await self.h2_balancer([node.url], "--drain-timeout", "5")
        client = await self.h2_connect(balancer.port)
        _, answer = client.request(b"GET", b"/slow")
        await wait_for(lambda: held, "the request at the node")
        stopped: list[bool] = []
        service = balancer.service
        traffic = service.traffic
        stopping = defer.maybeDeferred(service.stopService)
        stopping.addBoth(lambda result: stopped.append(True) or result)
        (channel,) = service.traffic.site.channels
        await wait_for(lambda: channel.h2.going_away, "the drain to ask the connection to end")
        # The drain asks again every DRAIN_POLL: let it ask a few times, then
        # a PING answered shows the connection outlived every ask.
        await wait_for(
            lambda: traffic.drain is None or traffic.drain.elapsed >= 3 * DRAIN_POLL,
            "the drain to look at the connection again",
        )
        await client.ping()
        self.assertEqual(client.goaways, [])
        self.assertEqual(stopped, [])
        self.assertFalse(answer.done.called)
        held[0].transport.write(response(body=b"late"))
        await answer.done
        self.assertEqual(bytes(answer.body), b"late")
        await client.lost
        self.assertEqual(client.goaways, [0])
        await wait_for(lambda: stopped, "the drain to end")


class SecureWebSocketTests(HTTP2Case):
    """
    WebSocket over TLS on a listener that also offers h2.
    """

    async def test_wss_through_http2_listener(self) -> None:
        """
        A client that picks http/1.1 by ALPN can open a WebSocket tunnel
        through a --http2 listener and echo a message.
        """
        from autobahn.twisted.websocket import WebSocketClientFactory
        from twisted.internet.endpoints import TCP4ServerEndpoint

        echo = EchoFactory("a")
        echo.port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(echo)
        self.addCleanup(echo.port.stopListening)
        balancer = await self.h2_balancer([echo.node_url])
        factory = WebSocketClientFactory(f"wss://a.test:{balancer.port}/chat")
        factory.protocol = Client
        trust = Certificate(crypto.X509.from_cryptography(self.certs.ca.cert))
        options = optionsForClientTLS("a.test", trustRoot=trust, acceptableProtocols=[b"http/1.1"])
        endpoint = SSL4ClientEndpoint(reactor, LOOPBACK, balancer.port, options)
        client = await endpoint.connect(factory)
        await client.opened
        self.assertEqual(await client.message(1), (b"a", False))
        client.sendMessage(b"over tls")
        self.assertEqual(await client.message(2), (b"over tls", False))
        client.sendClose(code=1000)
        await client.closed
