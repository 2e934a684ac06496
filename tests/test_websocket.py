"""
WebSocket tunnels (issue 12) with autobahn's Twisted WebSocket client and
server on the test side: rrlb forwards the upgrade, passes the node's 101 on
and copies frames both ways; a node that refuses the upgrade answers as
usual; tunnels rotate over nodes, count as requests in flight, time out
when idle, and are logged and counted when they end.
"""

from __future__ import annotations

import json
import os
from typing import Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
)
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.trial import unittest

from rrlb.accesslog import format_combined, format_json
from rrlb.drain import DRAIN_POLL
from tests.support import (
    LOOPBACK,
    BackendConnection,
    BulkProducer,
    Client,
    EchoFactory,
    RecordedRequest,
    WireCase,
    admin_url,
    balancer_options,
    http_request,
    parse_error,
    reactor,
    reactor_turns,
    read_then_pause,
    reads,
    response,
    rrlb_end,
    samples,
    start_balancer,
    stuck,
    wait_for,
)


class WebSocketCase(WireCase):
    async def node(self, name: str) -> EchoFactory:
        factory = EchoFactory(name)
        factory.port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(factory)

        async def stop() -> None:
            await factory.port.stopListening()

        self.addCleanup(stop)
        return factory

    async def connect(self, port: int, path: str = "/chat") -> Client:
        factory = WebSocketClientFactory(f"ws://{LOOPBACK}:{port}{path}")
        factory.protocol = Client
        client: Client = await TCP4ClientEndpoint(reactor, LOOPBACK, port).connect(factory)

        async def close() -> None:
            if client.transport is not None and client.transport.connected:
                client.transport.abortConnection()
            await wait_for(lambda: client.closed.called, "the client to close")

        self.addCleanup(close)
        await client.opened
        return client


class TunnelTests(WebSocketCase):
    """
    Frames pass both ways through the tunnel.
    """

    async def test_text_and_binary_echo(self) -> None:
        """
        The node's 101 reaches the client with its Upgrade and Connection
        headers, and text and binary messages echo back unchanged.
        """
        node = await self.node("a")
        _, port = await self.balancer([node.node_url])
        client = await self.connect(port)
        self.assertEqual(client.response.headers.get("upgrade").lower(), "websocket")
        self.assertEqual(await client.message(1), (b"a", False))
        client.sendMessage("héllo".encode(), False)
        self.assertEqual(await client.message(2), ("héllo".encode(), False))
        data = os.urandom(1000)
        client.sendMessage(data, True)
        self.assertEqual(await client.message(3), (data, True))

    async def test_large_message(self) -> None:
        """
        A 1 MiB message goes through and comes back intact.
        """
        node = await self.node("a")
        _, port = await self.balancer([node.node_url])
        client = await self.connect(port)
        await client.message(1)
        data = os.urandom(1 << 20)
        client.sendMessage(data, True)
        self.assertEqual(await client.message(2), (data, True))

    async def test_ping_pong(self) -> None:
        """
        A ping from the client gets the node's pong.
        """
        node = await self.node("a")
        _, port = await self.balancer([node.node_url])
        client = await self.connect(port)
        client.sendPing(b"are you there")
        await wait_for(lambda: client.pongs, "a pong")
        self.assertEqual(client.pongs, [b"are you there"])

    async def test_close_handshake(self) -> None:
        """
        A close with a code and reason reaches the node, whose answer
        closes the tunnel cleanly; the node's connection and the in-flight
        count are gone afterwards.
        """
        node = await self.node("a")
        service, port = await self.balancer([node.node_url])
        client = await self.connect(port)
        await client.message(1)
        self.assertEqual(service.pool.nodes[0].in_flight, 1)
        client.sendClose(code=4001, reason="bye now")
        was_clean, code, reason = await client.closed
        self.assertTrue(was_clean)
        await wait_for(lambda: node.closes, "the node to see the close")
        self.assertEqual(node.closes[0], (True, 4001, "bye now"))
        await wait_for(lambda: service.pool.nodes[0].in_flight == 0, "the tunnel to end")
        upstream = service.traffic.upstream
        await wait_for(lambda: upstream.connection_count == 0, "the node connection")
        self.assertEqual(service.traffic.proxy.stats.tunnels_open, 0)

    async def test_node_refuses_upgrade(self) -> None:
        """
        A node that answers the upgrade with anything but 101 has its
        answer passed on as a normal response, and the connection stays an
        HTTP one.
        """
        backend = await self.backend(lambda request, conn: response(b"403 Forbidden", b"no"))
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        upgrade = (
            b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Protocol: chat\r\n\r\n"
        )
        client.send(upgrade)
        result = await client.response()
        assert result is not None
        self.assertEqual((result.code, result.body), (403, b"no"))
        sent = backend.requests[0]
        self.assertEqual(sent.header(b"upgrade"), [b"websocket"])
        self.assertEqual(sent.header(b"connection"), [b"Upgrade"])
        self.assertEqual(sent.header(b"sec-websocket-key"), [b"dGhlIHNhbXBsZSBub25jZQ=="])
        self.assertEqual(sent.header(b"sec-websocket-version"), [b"13"])
        self.assertEqual(sent.header(b"sec-websocket-protocol"), [b"chat"])
        client.send(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        result = await client.response()
        assert result is not None
        self.assertEqual(result.code, 403)

    async def test_h2c_not_forwarded(self) -> None:
        """
        Upgrade: h2c is not forwarded: the node gets a plain request.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        result = await self.exchange(
            port,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        )
        assert result is not None
        self.assertEqual(result.code, 200)
        names = {n.lower() for n, _ in backend.requests[0].headers}
        self.assertNotIn(b"upgrade", names)
        self.assertNotIn(b"connection", names)
        self.assertNotIn(b"http2-settings", names)

    async def test_many_tunnels_rotate(self) -> None:
        """
        Tunnels opened one after another go to the nodes in turn, and all
        of them carry their own messages at once.
        """
        nodes = [await self.node(name) for name in "abc"]
        service, port = await self.balancer([n.node_url for n in nodes])
        clients = [await self.connect(port) for _ in range(12)]
        names = [(await c.message(1))[0] for c in clients]
        self.assertEqual(names, [b"a", b"b", b"c"] * 4)
        self.assertEqual([n.in_flight for n in service.pool.nodes], [4, 4, 4])
        for i, client in enumerate(clients):
            client.sendMessage(b"from %d" % i, False)
        for i, client in enumerate(clients):
            self.assertEqual(await client.message(2), (b"from %d" % i, False))


class TunnelLifeTests(WebSocketCase):
    """
    How tunnels end, and what is seen of them.
    """

    async def test_idle_timeout(self) -> None:
        """
        A tunnel with no byte either way for --tunnel-timeout is closed on
        both sides; traffic keeps it open.
        """
        node = await self.node("a")
        service, port = await self.balancer([node.node_url], "--tunnel-timeout", "0.4")
        # The tunnel's idle timer runs on a clock the test drives.
        clock = service.traffic.proxy.clock = Clock()
        client = await self.connect(port)
        await client.message(1)
        for i in range(3):
            clock.advance(0.25)
            client.sendMessage(b"%d" % i)
            # Its echo is traffic both ways at this moment.
            self.assertEqual(await client.message(i + 2), (b"%d" % i, False))
        # 0.75 s in all, never 0.4 s without a byte: still open.
        self.assertFalse(client.closed.called)
        clock.advance(0.5)
        was_clean, _, _ = await client.closed
        self.assertFalse(was_clean)
        await wait_for(lambda: service.pool.nodes[0].in_flight == 0, "the tunnel to end")
        await wait_for(lambda: node.closes, "the node's side to close")

    async def test_node_close_closes_client(self) -> None:
        """
        The node dropping its connection closes the client's.
        """
        node = await self.node("a")
        service, port = await self.balancer([node.node_url])
        client = await self.connect(port)
        await client.message(1)
        await wait_for(lambda: node.opened, "the node side")
        for protocol in list(service.traffic.upstream._connections):
            protocol.transport.abortConnection()
        await client.closed
        await wait_for(lambda: service.pool.nodes[0].in_flight == 0, "the tunnel to end")

    async def test_logged_counted_and_drained(self) -> None:
        """
        An open tunnel shows in /status and /metrics; when it ends it gets
        one access-log line with status 101, the bytes each way and its
        duration, and the byte counters have moved.
        """
        node = await self.node("a")
        log = self.mktemp()
        balancer = await start_balancer(
            self,
            [node.node_url],
            "--admin",
            "tcp:0:interface=127.0.0.1",
            "--access-log",
            log,
            "--access-log-format",
            "json",
            "--health-interval",
            "3600",
        )
        client = await self.connect(balancer.port)
        await client.message(1)
        client.sendMessage(b"x" * 1000, True)
        await client.message(2)
        admin = await admin_url(balancer)
        status = json.loads((await http_request(self, "GET", admin + "/status")).body)
        self.assertEqual(status["process"]["tunnels_open"], 1)
        self.assertEqual(status["nodes"][0]["in_flight"], 1)
        metrics = samples((await http_request(self, "GET", admin + "/metrics")).body.decode())
        self.assertEqual(metrics[("rrlb_tunnels_open", ())], 1)
        self.assertGreater(metrics[("rrlb_tunnel_bytes_total", (("direction", "to_node"),))], 1000)
        self.assertGreater(
            metrics[("rrlb_tunnel_bytes_total", (("direction", "to_client"),))], 1000
        )
        client.sendClose(code=1000)
        await client.closed
        await wait_for(lambda: balancer.service.pool.nodes[0].in_flight == 0, "the tunnel end")
        balancer.service.traffic.access_log.flush()  # type: ignore[union-attr]
        with open(log, "rb") as f:
            lines = [json.loads(line) for line in f]
        tunnels = [r for r in lines if r["status"] == 101]
        self.assertEqual(len(tunnels), 1)
        (record,) = tunnels
        self.assertEqual(record["upstream_status"], 101)
        self.assertGreater(record["tunnel_bytes_to_node"], 1000)
        self.assertGreater(record["tunnel_bytes_to_client"], 1000)
        self.assertGreaterEqual(record["tunnel_time"], 0)

    async def test_drain_waits_for_tunnel(self) -> None:
        """
        Stopping rrlb waits for an open tunnel (up to the drain timeout)
        rather than cutting it at once.
        """
        node = await self.node("a")
        balancer = await start_balancer(
            self, [node.node_url], "--drain-timeout", "5", "--health-interval", "3600"
        )
        client = await self.connect(balancer.port)
        await client.message(1)
        stopped: list[bool] = []
        service = balancer.service
        traffic = service.traffic
        stopping = defer.maybeDeferred(service.stopService)
        stopping.addBoth(lambda result: stopped.append(True) or result)
        # The drain looks at the connections every DRAIN_POLL: let it look a
        # few times; a message echoed after that shows the tunnel outlived it.
        await wait_for(
            lambda: traffic.drain is None or traffic.drain.elapsed >= 3 * DRAIN_POLL,
            "the drain to look at the tunnel again",
        )
        self.assertEqual(stopped, [])
        client.sendMessage(b"still here")
        self.assertEqual(await client.message(2), (b"still here", False))
        self.assertEqual(stopped, [])
        client.sendClose(code=1000)
        await client.closed
        await wait_for(lambda: stopped, "the drain to end")


SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class TunnelBackpressureTests(WebSocketCase):
    """
    Raw bytes through a tunnel: a slow reader on either side holds the
    other side back instead of filling rrlb's memory.
    """

    async def test_slow_client_holds_node_back(self) -> None:
        """
        A client that stops reading stops rrlb reading from the node; once
        it reads again every byte arrives.
        """
        total = 32 << 20
        producers: list[BulkProducer] = []

        def switch(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(SWITCH)
            producer = BulkProducer(conn.transport, b"n" * 65536, total)
            producers.append(producer)
            producer.start()

        backend = await self.backend(switch)
        service, port = await self.balancer([backend.url])
        client = await self.client(port)
        received = read_then_pause(client)
        client.send(UPGRADE)
        await wait_for(lambda: producers and producers[0].pauses, "the node to be held back")
        (node,) = backend.connections
        rrlb_node = rrlb_end(service, node.transport)
        rrlb_client = rrlb_end(service, client.transport)
        # Held for good: the client reads nothing, rrlb's writes to it are
        # stuck, rrlb reads nothing from the node, whose writes are stuck.
        await wait_for(
            lambda: (
                stuck(rrlb_client)
                and not reads(rrlb_node)
                and stuck(node.transport)
                and producers[0].paused
            ),
            "every buffer on the way to fill",
        )
        sent = producers[0].sent
        await reactor_turns()
        self.assertEqual(producers[0].sent, sent)
        self.assertLess(sent, total // 2)
        client.transport.resumeProducing()
        await wait_for(lambda: received["n"] >= total + len(SWITCH), "every byte")

    async def test_slow_node_holds_client_back(self) -> None:
        """
        A node that stops reading stops rrlb reading from the client.
        """
        conns: list[BackendConnection] = []

        def switch(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(SWITCH)
            conn.transport.pauseProducing()
            conns.append(conn)

        backend = await self.backend(switch)
        service, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(UPGRADE)
        await wait_for(lambda: b"101 Switching" in client.data, "the 101")
        total = 32 << 20
        producer = BulkProducer(client.transport, b"c" * 65536, total)
        producer.start()
        await wait_for(lambda: producer.pauses, "the client to be held back")
        (node,) = conns
        rrlb_node = rrlb_end(service, node.transport)
        rrlb_client = rrlb_end(service, client.transport)
        # Held for good: the node reads nothing, rrlb's writes to it are
        # stuck, rrlb reads nothing from the client, whose writes are stuck.
        await wait_for(
            lambda: (
                stuck(rrlb_node)
                and not reads(rrlb_client)
                and stuck(client.transport)
                and producer.paused
            ),
            "every buffer on the way to fill",
        )
        sent = producer.sent
        await reactor_turns()
        self.assertEqual(producer.sent, sent)
        self.assertLess(sent, total // 2)
        # Once the node reads again, so does rrlb, and the client writes on.
        node.transport.resumeProducing()
        await wait_for(lambda: producer.sent > sent, "the client to write again")
        producer.stopProducing()
        client.transport.abortConnection()
        await client.lost

    async def test_client_that_does_not_read_cut_off_after_close(self) -> None:
        """
        A tunnel closed (here: idle, its client reading nothing of what the
        node sent) is cut off on the client's side after the close timeout,
        instead of staying open with what is buffered for the client for as
        long as it reads nothing.
        """

        def switch(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(SWITCH)
            BulkProducer(conn.transport, b"n" * 65536, 64 << 20).start()

        backend = await self.backend(switch)
        service, port = await self.balancer([backend.url], "--tunnel-timeout", "0.5")
        service.traffic.site.close_timeout = 0.5
        client = await self.client(port)
        read_then_pause(client)
        client.send(UPGRADE)
        await wait_for(lambda: service.traffic.site.channels, "the client's connection")
        await wait_for(lambda: not service.traffic.site.channels, "rrlb to cut the client off")
        await wait_for(lambda: not backend.open_connections, "the node connection to close")

    async def test_node_that_does_not_read_dropped_after_close(self) -> None:
        """
        A tunnel whose node stopped reading is dropped on the node's side
        when it closes (here: idle, nothing getting through), instead of
        staying open with what is buffered for the node for as long as it
        reads nothing.
        """

        def switch(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(SWITCH)
            conn.transport.pauseProducing()

        backend = await self.backend(switch)
        service, port = await self.balancer([backend.url], "--tunnel-timeout", "0.5")
        client = await self.client(port)
        client.send(UPGRADE)
        await wait_for(lambda: b"101 Switching" in client.data, "the 101")
        producer = BulkProducer(client.transport, b"c" * 65536, 64 << 20)
        producer.start()
        await wait_for(lambda: producer.pauses, "the client to be held back")
        upstream = service.traffic.upstream
        await wait_for(lambda: not upstream.connection_count, "rrlb to drop the node connection")
        producer.stopProducing()


class TunnelSettingsTests(unittest.TestCase):
    """
    --tunnel-timeout and its YAML key, and the access-log fields of a tunnel.
    """

    def test_default_option_and_yaml(self) -> None:
        """
        The default is an hour; the option and the YAML key set it; a flag
        wins over the file; a bad value names the setting.
        """
        nodes = ("--nodes", "http://127.0.0.1:9")
        self.assertEqual(balancer_options(*nodes).config.tunnel_timeout, 3600.0)
        self.assertEqual(
            balancer_options(*nodes, "--tunnel-timeout", "90").config.tunnel_timeout, 90.0
        )
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("nodes: [http://127.0.0.1:9]\ntunnel_timeout: 120\n")
        self.assertEqual(balancer_options("--config", path).config.tunnel_timeout, 120.0)
        self.assertIn("--tunnel-timeout", parse_error(*nodes, "--tunnel-timeout", "0"))
        with open(path, "w") as f:
            f.write("nodes: [http://127.0.0.1:9]\ntunnel_timeout: never\n")
        self.assertIn("tunnel_timeout", parse_error("--config", path))

    def test_log_fields(self) -> None:
        """
        A tunnel's line has its bytes each way and its duration after the
        usual fields, in both formats.
        """
        entry: Any = (
            1760104536.0,
            "192.0.2.7",
            b"GET",
            b"/chat",
            b"HTTP/1.1",
            101,
            2000,
            None,
            None,
            "http://10.0.0.1:8080",
            101,
            0.002,
            (1500, 2000, 61.25),
        )
        line = format_combined(entry).decode()
        self.assertTrue(
            line.endswith(
                ' 101 2000 "-" "-" node="http://10.0.0.1:8080" upstream_status=101'
                " upstream_time=0.002 tunnel_bytes_to_node=1500 tunnel_bytes_to_client=2000"
                " tunnel_time=61.250\n"
            ),
            line,
        )
        record = json.loads(format_json(entry))
        self.assertEqual(
            (record["tunnel_bytes_to_node"], record["tunnel_bytes_to_client"]), (1500, 2000)
        )
        self.assertEqual((record["status"], record["tunnel_time"]), (101, 61.25))


class SwitchingHeadTests(WebSocketCase):
    """
    The node's 101 reaches the client less its hop-by-hop headers.
    """

    async def filtered_upgrade(self, filters: str) -> tuple[Any, Any, Any]:
        """
        rrlb with C{filters} (YAML list entries) in front of a node that
        answers an upgrade with a 101 (with C{X-Node: a}) and C{from node};
        a client sends the upgrade. Return the service, the client and the
        node.
        """

        def switch(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nX-Node: a\r\n\r\nfrom node"
            )

        backend = await self.backend(switch)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"nodes: [{backend.url}]\nfilters:\n{filters}")
        service, port = await self.balancer([], "--config", path)
        client = await self.client(port)
        client.send(UPGRADE)
        return service, client, backend

    async def test_response_filters_run_on_101(self) -> None:
        """
        Response filters run on a node's 101 as on any response rrlb sends:
        the header a C{response_headers} filter sets and the request's ID
        reach the client on the 101, and the tunnel works.
        """
        _, client, _ = await self.filtered_upgrade(
            "  - request_id: {}\n  - response_headers: {set: {X-Edge: 'yes'}}\n"
        )
        await wait_for(lambda: b"\r\n\r\nfrom node" in client.data, "the 101 and the tunnel")
        head = bytes(client.data).split(b"\r\n\r\n", 1)[0].lower()
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"http/1.1 101 switching protocols")
        self.assertIn(b"x-edge: yes", lines)
        self.assertIn(b"x-node: a", lines)
        ids = [line for line in lines if line.startswith(b"x-request-id: ")]
        self.assertEqual(len(ids), 1)
        self.assertRegex(ids[0], rb"^x-request-id: [0-9a-f]{32}$")
        client.transport.abortConnection()
        await client.lost

    async def test_response_filter_failing_on_101(self) -> None:
        """
        A response filter that raises on a node's 101: the client gets
        rrlb's plain 500 and no tunnel, the node's connection is let go,
        and the failure is counted.
        """
        service, client, backend = await self.filtered_upgrade(
            "  - use: tests.filterpkg:Raises\n    with: {where: response}\n"
        )
        await wait_for(lambda: b"\r\n\r\n" in client.data, "an answer")
        await wait_for(lambda: not backend.open_connections, "the node's connection let go")
        self.assertTrue(bytes(client.data).startswith(b"HTTP/1.1 500 "), bytes(client.data))
        self.assertNotIn(b"from node", bytes(client.data))
        self.assertEqual(service.traffic.proxy.stats.filter_errors, {"tests.filterpkg:Raises": 1})
        self.flushLoggedErrors(RuntimeError)

    async def test_hop_by_hop_of_101_dropped(self) -> None:
        """
        A node's C{TE}, C{Keep-Alive}, C{Trailer} and C{Proxy-Connection}
        on a 101 stay between rrlb and the node (they spoke of that hop);
        C{Upgrade}, C{Connection} and the node's own headers reach the
        client, and the tunnel works.
        """

        def switch(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nTE: trailers\r\nKeep-Alive: timeout=5\r\n"
                b"Trailer: X-Sum\r\nProxy-Connection: keep-alive\r\n"
                b"X-Node: a\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
                b"from node"
            )

        backend = await self.backend(switch)
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(UPGRADE)
        await wait_for(lambda: b"\r\n\r\nfrom node" in client.data, "the 101 and the tunnel")
        head = bytes(client.data).split(b"\r\n\r\n", 1)[0].lower()
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"http/1.1 101 switching protocols")
        names = {line.split(b":", 1)[0] for line in lines[1:]}
        for name in (b"te", b"keep-alive", b"trailer", b"proxy-connection"):
            self.assertNotIn(name, names)
        for name in (b"upgrade", b"connection", b"x-node", b"sec-websocket-accept"):
            self.assertIn(name, names)
        client.transport.abortConnection()
        await client.lost
