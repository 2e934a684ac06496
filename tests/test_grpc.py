"""
gRPC through rrlb (issue 21): grpcio servers as nodes of a C{protocol: h2}
pool, grpcio clients over cleartext HTTP/2 (h2c) to rrlb, every RPC one
pick. rrlb's own errors are gRPC-shaped, and C{health.type: grpc} asks the
standard health service.

grpcio's calls block, so each runs in a thread (the reactor runs rrlb).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from typing import Any, Callable

from twisted.internet import threads, utils
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.trial import unittest
from twisted.web import server

from rrlb.grpcwire import frame
from tests.support import (
    LOOPBACK,
    Backend,
    GrpcNode,
    H2Client,
    H2Node,
    LogCapture,
    certs,
    connect_aborted_at_cleanup,
    grpc_node,
    http_request,
    reactor,
    start_balancer,
    start_h2_node,
    wait_for,
)

try:
    import grpc
except ImportError:  # pragma: no cover
    grpc = None

BIG = 8 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    # One HTTP/2 connection to rrlb for the whole test.
    ("grpc.use_local_subchannel_pool", 1),
]


def in_thread(call: Callable[[], Any]) -> Any:
    return threads.deferToThread(call)


class GrpcCase(unittest.TestCase):
    timeout = 90

    def setUp(self) -> None:
        if grpc is None:
            raise unittest.SkipTest("grpcio is not installed")

    async def balancer(self, nodes: list[GrpcNode], *args: str) -> Any:
        balancer = await start_balancer(
            self,
            [n.url for n in nodes],
            "--http2",
            "--node-protocol",
            "h2",
            "--health-type",
            "grpc",
            "--health-interval",
            "0.2",
            "--rise",
            "1",
            *args,
        )
        await wait_for(
            lambda: all(n.healthy and n.last_check for n in self.nodes_of(balancer)),
            "the first health checks",
        )
        return balancer

    def nodes_of(self, balancer: Any) -> Any:
        return balancer.service.traffic.proxy.pool.nodes

    def channel(self, port: int) -> Any:
        channel = grpc.insecure_channel(f"{LOOPBACK}:{port}", options=CHANNEL_OPTIONS)
        self.addCleanup(channel.close)
        return channel

    async def setup(self, count: int = 1, *args: str) -> tuple[list[GrpcNode], Any, Any]:
        nodes = [grpc_node(self, f"g{i}") for i in range(count)]
        balancer = await self.balancer(nodes, *args)
        return nodes, balancer, self.channel(balancer.port)


class RpcKindTests(GrpcCase):
    """
    The four kinds of RPC, metadata, statuses and deadlines, end to end.
    """

    async def test_unary(self) -> None:
        """
        A unary RPC through rrlb gets the node's answer and status OK; its
        connection to the node counts in rrlb_upstream_connections.
        """
        _, balancer, channel = await self.setup()
        unary = channel.unary_unary("/test.Echo/Unary")
        self.assertEqual(await in_thread(lambda: unary(b"hi", timeout=10)), b"g0:hi")
        self.assertEqual(balancer.service.traffic.metrics.upstream_connections(), 1)

    async def test_metadata_both_ways(self) -> None:
        """
        Request metadata reaches the node; the node's initial and trailing
        metadata reach the client.
        """
        _, _, channel = await self.setup()
        unary = channel.unary_unary("/test.Echo/Unary")
        answer, call = await in_thread(
            lambda: unary.with_call(b"m", metadata=[("x-echo", "value-1")], timeout=10)
        )
        self.assertEqual(answer, b"g0:m")
        self.assertIn(("x-echo", "value-1"), list(call.initial_metadata()))
        self.assertIn(("x-trailer", "value-1"), list(call.trailing_metadata()))

    async def test_server_streaming(self) -> None:
        """
        A server-streaming RPC gets every message, in order.
        """
        _, _, channel = await self.setup()
        stream = channel.unary_stream("/test.Echo/ServerStream")
        got = await in_thread(lambda: list(stream(b"5", timeout=10)))
        self.assertEqual(got, [b"g0:%d" % i for i in range(5)])

    async def test_client_streaming(self) -> None:
        """
        A client-streaming RPC's messages all reach the node.
        """
        _, _, channel = await self.setup()
        stream = channel.stream_unary("/test.Echo/ClientStream")
        got = await in_thread(lambda: stream(iter([b"a", b"b", b"c"]), timeout=10))
        self.assertEqual(got, b"g0:abc")

    async def test_bidirectional(self) -> None:
        """
        A bidirectional RPC: each message is answered while the client
        still streams (the next request goes only after the previous
        answer came back).
        """
        _, _, channel = await self.setup()
        bidi = channel.stream_stream("/test.Echo/Bidi")

        def talk() -> list[bytes]:
            import queue

            outbox: queue.Queue[Any] = queue.Queue()
            outbox.put(b"0")
            got = []

            def requests() -> Any:
                while True:
                    item = outbox.get(timeout=10)
                    if item is None:
                        return
                    yield item

            for answer in bidi(requests(), timeout=20):
                got.append(answer)
                outbox.put(b"%d" % len(got) if len(got) < 5 else None)
            return got

        got = await in_thread(talk)
        self.assertEqual(got, [b"g0:%d" % i for i in range(5)])

    async def test_status_passed_through(self) -> None:
        """
        A status the node ends an RPC with reaches the client, with its
        message.
        """
        _, _, channel = await self.setup()
        unary = channel.unary_unary("/test.Echo/Unary")
        error = await in_thread(lambda: _error_of(lambda: unary(b"fail:5", timeout=10)))
        self.assertEqual(error.code(), grpc.StatusCode.NOT_FOUND)
        self.assertEqual(error.details(), "asked to fail")

    async def test_deadline_exceeded(self) -> None:
        """
        A call whose deadline passes while the node works ends with
        DEADLINE_EXCEEDED, and rrlb ends its stream to the node.
        """
        nodes, balancer, channel = await self.setup()
        unary = channel.unary_unary("/test.Echo/Unary")
        error = await in_thread(lambda: _error_of(lambda: unary(b"sleep:3", timeout=0.5)))
        self.assertEqual(error.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        await wait_for(
            lambda: balancer.service.traffic.proxy.pool.nodes[0].in_flight == 0,
            "the RPC to end at rrlb",
        )

    async def test_big_message(self) -> None:
        """
        An 8 MiB message goes through both ways intact.
        """
        _, _, channel = await self.setup()
        unary = channel.unary_unary("/test.Echo/Unary")
        payload = os.urandom(BIG)
        got = await in_thread(lambda: unary(payload, timeout=60))
        self.assertEqual(got, b"g0:" + payload)


class PerStreamTests(GrpcCase):
    """
    The access log, the response timeout and passive health work per
    stream (per RPC).
    """

    async def test_access_log_per_rpc(self) -> None:
        """
        Three RPCs on one client connection are three access-log lines,
        each with the node that served it.
        """
        path = self.mktemp()
        nodes, balancer, channel = await self.setup(
            2, "--access-log", path, "--access-log-format", "json"
        )
        unary = channel.unary_unary("/test.Echo/Unary")
        for _ in range(3):
            await in_thread(lambda: unary(b"x", timeout=10))
        balancer.service.traffic.access_log.flush()
        with open(path) as f:
            records = [json.loads(line) for line in f if "/test.Echo/Unary" in line]
        self.assertEqual(len(records), 3)
        self.assertEqual({r["node"] for r in records}, {n.url for n in nodes})
        self.assertEqual({r["status"] for r in records}, {200})

    async def test_response_timeout_is_deadline_exceeded(self) -> None:
        """
        A node that does not answer within --timeout: the call (with no
        grpc-timeout of its own) gets DEADLINE_EXCEEDED (4) from rrlb.
        """
        _, balancer, _ = await self.setup(1, "--timeout", "0.5")
        client = await OwnErrorTests.raw(self, balancer.port)  # type: ignore[arg-type]
        _, answer = client.request(
            b"POST", b"/test.Echo/Unary", frame(b"sleep:3"),
            ((b"content-type", b"application/grpc"), (b"te", b"trailers")),
        )  # fmt: skip
        await answer.done
        self.assertEqual(answer.headers[b"grpc-status"], b"4")

    async def test_tcp_health_on_http1_pool(self) -> None:
        """
        health.type tcp on an http1 pool passes on a connection alone (the
        node need not answer HTTP), and fails once nothing listens.
        """
        peer = await start_h2_node(self, H2Node("n"))
        balancer = await start_balancer(
            self, [peer.url], "--health-type", "tcp", "--health-interval", "0.2",
            "--fall", "1",
        )  # fmt: skip
        node = self.nodes_of(balancer)[0]
        await wait_for(lambda: node.successes >= 2, "passed checks")
        self.assertEqual(peer.streams_seen, 0)
        await peer.stop()
        await wait_for(lambda: not node.healthy, "the node to go down")


class BalancingTests(GrpcCase):
    """
    Each RPC is one pick: the RPCs of one client connection are spread.
    """

    async def test_spread_over_three_nodes(self) -> None:
        """
        100 concurrent RPCs on one channel are spread evenly over 3 nodes
        by round robin (34, 33, 33).
        """
        _, _, channel = await self.setup(3)
        unary = channel.unary_unary("/test.Echo/Unary")

        def run() -> list[bytes]:
            calls = [unary.future(b"x", timeout=30) for _ in range(100)]
            return [c.result() for c in calls]

        got = await in_thread(run)
        counts = Counter(answer.split(b":")[0] for answer in got)
        self.assertEqual(sorted(counts.values()), [33, 33, 34])

    async def test_goaway_mid_load(self) -> None:
        """
        A node that sends GOAWAY every 100 ms mid-load (grpc's
        max_connection_age) fails no RPC: the calls open on each old
        connection finish there, new ones go to fresh connections.
        """
        nodes = [
            grpc_node(self, "g0", [("grpc.max_connection_age_ms", 100),
                                   ("grpc.max_connection_age_grace_ms", 10000)]),
            grpc_node(self, "g1"),
            grpc_node(self, "g2"),
        ]  # fmt: skip
        balancer = await self.balancer(nodes)
        unary = self.channel(balancer.port).unary_unary("/test.Echo/Unary")

        def run() -> list[Any]:
            outcomes = []
            for _ in range(6):
                calls = [unary.future(b"sleep:0.02", timeout=30) for _ in range(60)]
                outcomes += [_outcome(c) for c in calls]
            return outcomes

        outcomes = await in_thread(run)
        self.assertEqual([o for o in outcomes if isinstance(o, grpc.StatusCode)], [])
        self.assertEqual(len(outcomes), 360)
        self.assertGreater(nodes[0].calls, 100)
        # More than one connection per node: g0's GOAWAYs were followed.
        self.assertGreater(balancer.service.traffic.proxy.h2.new_connections, 3)

    async def test_node_killed_mid_load(self) -> None:
        """
        A node stopped at once mid-load: only its calls in flight fail, as
        UNAVAILABLE or CANCELLED, and the calls after it all succeed on the
        others.
        """
        nodes, _, channel = await self.setup(3)
        unary = channel.unary_unary("/test.Echo/Unary")

        def run() -> list[Any]:
            calls = [unary.future(b"sleep:0.05", timeout=30) for _ in range(150)]
            return [_outcome(c) for c in calls]

        load = in_thread(run)
        await wait_for(lambda: nodes[0].calls >= 5, "calls at the first node")
        await nodes[0].stop()
        outcomes = await load
        failed = {o for o in outcomes if isinstance(o, grpc.StatusCode)}
        self.assertLessEqual(failed, {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
        after = await in_thread(lambda: [unary(b"after", timeout=10) for _ in range(10)])
        self.assertNotIn(b"g0:after", after)


class HealthTests(GrpcCase):
    """
    C{health.type: grpc} asks grpc.health.v1.Health/Check.
    """

    async def test_not_serving_takes_node_out(self) -> None:
        """
        A node whose health service says NOT_SERVING is taken out of
        rotation, and put back once it says SERVING again.
        """
        from grpc_health.v1 import health_pb2

        nodes, balancer, _ = await self.setup(1, "--fall", "1")
        node = balancer.service.traffic.proxy.pool.nodes[0]
        nodes[0].health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await wait_for(lambda: not node.healthy, "the node to go down")
        self.assertEqual(node.last_error, "NOT_SERVING")
        nodes[0].health.set("", health_pb2.HealthCheckResponse.SERVING)
        await wait_for(lambda: node.healthy, "the node to come back")

    async def test_named_service(self) -> None:
        """
        With C{--health-service}, the check asks after that service: one
        the node does not know fails.
        """
        nodes = [grpc_node(self, "g0")]
        balancer = await start_balancer(
            self, [nodes[0].url], "--http2", "--node-protocol", "h2",
            "--health-type", "grpc", "--health-service", "nosuch",
            "--health-interval", "0.2", "--fall", "1",
        )  # fmt: skip
        node = balancer.service.traffic.proxy.pool.nodes[0]
        await wait_for(lambda: not node.healthy, "the node to go down")
        self.assertIn("gRPC status 5", node.last_error)

    async def test_tcp_on_h2_pool(self) -> None:
        """
        C{health.type: tcp} on an h2 pool passes once the HTTP/2 preface
        and SETTINGS went both ways, and fails when the port is closed.
        """
        peer = await start_h2_node(self, H2Node("n"))
        balancer = await start_balancer(
            self, [peer.url], "--node-protocol", "h2", "--health-type", "tcp",
            "--health-interval", "0.2", "--fall", "1",
        )  # fmt: skip
        node = balancer.service.traffic.proxy.pool.nodes[0]
        await wait_for(lambda: node.successes >= 2 and peer.connections, "passed checks")
        await peer.stop()
        await wait_for(lambda: not node.healthy, "the node to go down")


class OwnErrorTests(GrpcCase):
    """
    What rrlb answers itself is gRPC-shaped: HTTP 200, application/grpc,
    the status in the only HEADERS frame.
    """

    async def raw(self, port: int) -> H2Client:
        return await connect_aborted_at_cleanup(self, port, H2Client())

    async def raw_call(self, port: int, message: bytes, *headers: tuple[bytes, bytes]) -> Any:
        """
        One unary call to /test.Echo/Unary from a raw h2 client, with
        C{headers} beside the gRPC ones; its answer, once it ended.
        """
        client = await self.raw(port)
        _, answer = client.request(
            b"POST", b"/test.Echo/Unary", frame(message),
            ((b"content-type", b"application/grpc"), (b"te", b"trailers"), *headers),
        )  # fmt: skip
        await answer.done
        return answer

    def assert_trailers_only(self, answer: Any, status: bytes) -> None:
        """
        C{answer} is rrlb's own gRPC-shaped one: HTTP 200, application/grpc,
        grpc-status C{status} in its only HEADERS frame, no body.
        """
        self.assertEqual(answer.headers[b":status"], b"200")
        self.assertEqual(answer.headers[b"content-type"], b"application/grpc")
        self.assertEqual(answer.headers[b"grpc-status"], status)
        self.assertEqual(bytes(answer.body), b"")

    async def test_no_node_is_unavailable(self) -> None:
        """
        With no node up, a gRPC call gets status 14 (UNAVAILABLE) in
        trailers-only form, and a grpcio client sees UNAVAILABLE.
        """
        nodes, balancer, channel = await self.setup(1, "--fall", "1")
        await nodes[0].stop()
        node = balancer.service.traffic.proxy.pool.nodes[0]
        await wait_for(lambda: not node.healthy, "the node to go down")
        answer = await self.raw_call(balancer.port, b"x")
        self.assert_trailers_only(answer, b"14")
        unary = channel.unary_unary("/test.Echo/Unary")
        error = await in_thread(lambda: _error_of(lambda: unary(b"x", timeout=10)))
        self.assertEqual(error.code(), grpc.StatusCode.UNAVAILABLE)

    async def test_grpc_timeout_bounds_rrlb_wait(self) -> None:
        """
        A call whose client does not enforce its deadline itself: rrlb
        forwards grpc-timeout to the node, and when it passes answers
        DEADLINE_EXCEEDED (4) itself and resets the node's stream.
        """
        nodes, balancer, _ = await self.setup()
        started = reactor.seconds()
        answer = await self.raw_call(balancer.port, b"sleep:3", (b"grpc-timeout", b"300m"))
        self.assertLess(reactor.seconds() - started, 2.5)
        self.assertEqual(answer.headers[b":status"], b"200")
        self.assertEqual(answer.headers[b"grpc-status"], b"4")
        await wait_for(lambda: self.nodes_of(balancer)[0].in_flight == 0, "the call to end")

    async def test_queue_timeout_is_resource_exhausted(self) -> None:
        """
        A call that waited the whole queue timeout for a full node gets 8
        (RESOURCE_EXHAUSTED).
        """
        _, balancer, channel = await self.setup(
            1, "--max-conns-per-node", "1", "--queue-timeout", "0.2"
        )
        unary = channel.unary_unary("/test.Echo/Unary")
        slow = unary.future(b"sleep:2", timeout=10)
        await wait_for(lambda: self.nodes_of(balancer)[0].in_flight == 1, "the slow call")
        error = await in_thread(lambda: _error_of(lambda: unary(b"x", timeout=10)))
        self.assertEqual(error.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertEqual(await in_thread(slow.result), b"g0:sleep:2")

    async def test_rate_limited_is_resource_exhausted(self) -> None:
        """
        A call a C{rate_limit} filter refuses on an h2 pool gets 8
        (RESOURCE_EXHAUSTED) in trailers-only form with HTTP 200, never a
        plain 429, and a grpcio client sees RESOURCE_EXHAUSTED; the call
        the limit lets through reaches the node.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("filters:\n  - rate_limit: {rate: 1/m, burst: 1}\n")
        nodes = [grpc_node(self, "g0")]
        balancer = await self.balancer(nodes, "--config", path)
        unary = self.channel(balancer.port).unary_unary("/test.Echo/Unary")
        self.assertEqual(await in_thread(lambda: unary(b"first", timeout=10)), b"g0:first")
        answer = await self.raw_call(balancer.port, b"x")
        self.assert_trailers_only(answer, b"8")
        self.assertIsNone(answer.reset)
        error = await in_thread(lambda: _error_of(lambda: unary(b"x", timeout=10)))
        self.assertEqual(error.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)


class ForwardingTests(GrpcCase):
    """
    What an h2 node gets of a gRPC call.
    """

    async def test_fields_forwarded(self) -> None:
        """
        grpc-timeout goes to the node as received, with te: trailers and
        the request's own fields, lower-cased, X-Forwarded-For added; the
        node's trailers come back to the client.
        """
        peer = await start_h2_node(self, H2Node("n"))

        def trailers(conn: Any, sid: int) -> None:
            conn.respond(sid, frame(b"ok"), headers=[(b"content-type", b"application/grpc")],
                         trailers=[(b"grpc-status", b"0"), (b"x-t", b"v")])  # fmt: skip

        peer.handler = trailers
        balancer = await start_balancer(
            self, [peer.url], "--http2", "--node-protocol", "h2", "--health-type", "tcp"
        )
        client = await OwnErrorTests.raw(self, balancer.port)  # type: ignore[arg-type]
        _, answer = client.request(
            b"POST", b"/test.Echo/Unary", frame(b"x"),
            ((b"content-type", b"application/grpc"), (b"te", b"trailers"),
             (b"grpc-timeout", b"5S"), (b"x-meta", b"m")),
        )  # fmt: skip
        await answer.done
        (head,) = [h for conn in peer.connections for h in conn.heads.values()]
        self.assertEqual(head[b"grpc-timeout"], b"5S")
        self.assertEqual(head[b"te"], b"trailers")
        self.assertEqual(head[b"x-meta"], b"m")
        self.assertEqual(head[b"x-forwarded-for"], b"127.0.0.1")
        self.assertEqual(head[b":path"], b"/test.Echo/Unary")
        self.assertEqual(bytes(answer.body), frame(b"ok"))


class MisbehavingNodeTests(GrpcCase):
    """
    A node that breaks HTTP/2 costs its own clients a 502 (UNAVAILABLE for
    gRPC), never the daemon or another client.
    """

    async def test_garbage_from_node(self) -> None:
        """
        A node answering with garbage: its client gets 502 over HTTP/1.1,
        a gRPC call to it UNAVAILABLE, and a request to the good pool
        meanwhile is answered.
        """

        def garbage(conn: Any, sid: int) -> None:
            conn.transport.write(b"\x00\x00\x05\xfe\x00\x00\x00\x00\x01garbage" * 3)

        bad = await start_h2_node(self, H2Node("bad", handler=garbage))
        good = await start_h2_node(self, H2Node("good"))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                f"nodes: [{bad.url}]\nprotocol: h2\nhealth: {{type: tcp}}\nhttp2: true\n"
                f"pools: {{good: {{nodes: [{good.url}], protocol: h2}}}}\n"
                "routes: [{path_prefix: /good, pool: good}, {pool: default}]\n"
            )
        balancer = await start_balancer(self, (), "--config", path, "--retries", "0")
        client = await OwnErrorTests.raw(self, balancer.port)  # type: ignore[arg-type]
        _, broken = client.request(
            b"POST", b"/test.Echo/Unary", frame(b"x"),
            ((b"content-type", b"application/grpc"), (b"te", b"trailers")),
        )  # fmt: skip
        _, fine = client.request(b"GET", b"/good/x")
        await broken.done
        await fine.done
        self.assertEqual(broken.headers[b"grpc-status"], b"14")
        self.assertEqual(bytes(fine.body), b"good:/good/x")
        self.assertFalse(balancer.service.traffic.proxy.pool.nodes[0].in_flight)


class TLSNodeTests(GrpcCase):
    """
    h2 over https: ALPN h2 to the node, its certificate verified.
    """

    def setUp(self) -> None:
        GrpcCase.setUp(self)
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.ca_file = os.path.join(self.dir, "ca.pem")
        with open(self.ca_file, "wb") as f:
            f.write(certs().ca.cert_pem)

    async def test_grpc_over_tls(self) -> None:
        """
        A gRPC node serving TLS: its health check passes and a call goes
        through, over ALPN h2.
        """
        node = grpc_node(self, "t", tls=certs().node)
        balancer = await self.balancer([node], "--ca-file", self.ca_file)
        unary = self.channel(balancer.port).unary_unary("/test.Echo/Unary")
        self.assertEqual(await in_thread(lambda: unary(b"hi", timeout=10)), b"t:hi")

    async def test_node_without_h2(self) -> None:
        """
        An https node that does not agree to h2 by ALPN (HTTP/1.1 only)
        fails the request with 502, logged.
        """
        backend = Backend("h1")
        site = server.Site(backend)
        # Twisted's Site offers h2 by ALPN whenever h2 is installed: not this one.
        site.acceptableProtocols = lambda: [b"http/1.1"]  # type: ignore[method-assign]
        port = await SSL4ServerEndpoint(
            reactor, 0, certs().node.options(), interface=LOOPBACK
        ).listen(site)
        self.addCleanup(port.stopListening)
        url = f"https://{LOOPBACK}:{port.getHost().port}"
        logged = LogCapture.install(self)
        balancer = await start_balancer(
            self, [url], "--node-protocol", "h2", "--ca-file", self.ca_file,
            "--health-type", "tcp", "--retries", "0",
        )  # fmt: skip
        reply = await http_request(self, "GET", balancer.url + "/x")
        self.assertEqual(reply.code, 502)
        # The node refuses the handshake (no protocol in common) or, if it
        # lets it through, rrlb refuses a connection without h2.
        failed = [m for m in logged.messages() if "failed for GET /x" in m]
        self.assertEqual(len(failed), 1)
        self.assertTrue("alert" in failed[0] or "did not agree to h2" in failed[0], failed)


class CurlTests(GrpcCase):
    """
    curl --http2-prior-knowledge through rrlb to an h2 pool.
    """

    async def test_curl_prior_knowledge(self) -> None:
        """
        curl over h2c reaches an HTTP/2 node through an h2 pool, and a
        POST body arrives whole.
        """
        curl = shutil.which("curl")
        if curl is None:
            raise unittest.SkipTest("curl is not installed")
        peer = await start_h2_node(self, H2Node("n"))
        logged = LogCapture.install(self)
        balancer = await start_balancer(
            self, [peer.url], "--http2", "--node-protocol", "h2",
            "--health-type", "tcp",
        )  # fmt: skip
        self.assertEqual([m for m in logged.messages() if "default health check" in m], [])
        out, err, code = await utils.getProcessOutputAndValue(
            curl, ["-sS", "--max-time", "10", "--http2-prior-knowledge", "-d", "body",
                   f"{balancer.url}/p"],
            env=os.environ,
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"n:/pbody")


def _error_of(call: Callable[[], Any]) -> Any:
    try:
        call()
    except grpc.RpcError as e:
        return e
    raise AssertionError("the call succeeded")


def _outcome(future: Any) -> Any:
    try:
        return future.result()
    except grpc.RpcError as e:
        return e.code()


class HealthServiceSettingTests(unittest.TestCase):
    """
    health.service may be empty: the server as a whole.
    """

    def test_empty_service(self) -> None:
        """
        C{service: ""} in YAML is the server as a whole, as leaving it out
        is; a service that is not a string is refused, naming the setting.
        """
        from rrlb.config import ConfigError, build_config

        path = self.mktemp()
        with open(path, "w") as f:
            f.write('nodes: [http://a]\nhealth: {type: grpc, service: ""}\n')
        self.assertEqual(build_config(path).health.service, "")
        with open(path, "w") as f:
            f.write("nodes: [http://a]\nhealth: {type: grpc, service: 5}\n")
        with self.assertRaises(ConfigError) as caught:
            build_config(path)
        self.assertIn("health.service", str(caught.exception))


class WarningTests(unittest.TestCase):
    """
    An h2 pool without a health type is warned about once at load.
    """

    async def test_h2_pool_without_health_type(self) -> None:
        """
        C{--node-protocol h2} without C{--health-type} logs one warning
        naming the pool and suggesting grpc or tcp.
        """
        peer = await start_h2_node(self, H2Node("n"))
        logged = LogCapture.install(self)
        await start_balancer(self, [peer.url], "--node-protocol", "h2")
        warned = [m for m in logged.messages() if "default health check" in m]
        self.assertEqual(len(warned), 1)
        self.assertIn("pool default", warned[0])
        self.assertIn("grpc or tcp", warned[0])
