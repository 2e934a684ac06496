"""
End-to-end tests of the balancer over real loopback sockets: the real
service tree in front of test backends on 127.0.0.1, real health checks with
short intervals, and the error answers (503, 502, 504).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.trial import unittest
from twisted.web import server

from rrlb.config import parse_node
from tests.support import (
    Backend,
    Balancer,
    HTTPClient,
    LogCapture,
    Reply,
    closed_port_url,
    http_request,
    raw_request,
    split_response,
    start_backend,
    start_backends,
    start_balancer,
    wait_until,
)

# Health checks fast enough that a node leaves and comes back in a fraction
# of a second: probes every 50 ms, two in a row to move.
FAST_HEALTH = ("--health-interval", "0.05", "--health-timeout", "0.5", "--rise", "2", "--fall", "2")


def assertNoTraceback(tc: unittest.TestCase, body: bytes) -> None:
    tc.assertNotIn(b"Traceback", body)
    tc.assertNotIn(b'File "', body)
    tc.assertNotIn(b"<html", body.lower())


class ProxyTestCase(unittest.TestCase):
    async def client(self) -> HTTPClient:
        client = HTTPClient()
        self.addCleanup(client.close)
        return client

    async def bodies(self, balancer: Balancer, count: int, path: str = "/") -> list[bytes]:
        """
        The bodies of C{count} GET requests, one after another.
        """
        client = await self.client()
        return [(await client.request("GET", balancer.url + path)).body for _ in range(count)]

    def node(self, balancer: Balancer, backend: Backend) -> Any:
        node = balancer.service.pool.get(backend.url)
        assert node is not None
        return node


class RotationTests(ProxyTestCase):
    """
    Requests go round the backends in order.
    """

    async def test_three_backends(self) -> None:
        """
        Nine requests over three backends go a, b, c, a, b, c, a, b, c,
        whatever their paths, and each backend sees exactly its three.
        """
        backends = await start_backends(self, "a", "b", "c")
        balancer = await start_balancer(self, [b.url for b in backends])
        client = await self.client()
        paths = ["/", "/x", "/x", "/y?z=1", "/", "/deep/er/path", "/x", "/", "/"]
        got = [(await client.request("GET", balancer.url + p)).body for p in paths]
        self.assertEqual(got, [b"a", b"b", b"c"] * 3)
        uris = [p.encode() for p in paths]
        self.assertEqual(
            [[r.uri for r in b.requests] for b in backends],
            [uris[0::3], uris[1::3], uris[2::3]],
        )

    async def test_new_connections(self) -> None:
        """
        The rotation is per request, not per client connection: requests on
        separate connections also go round.
        """
        backends = await start_backends(self, "a", "b")
        balancer = await start_balancer(self, [b.url for b in backends])
        got = [(await http_request(self, "GET", balancer.url + "/")).body for _ in range(4)]
        self.assertEqual(got, [b"a", b"b", b"a", b"b"])

    async def test_weights(self) -> None:
        """
        Weighted nodes from a YAML file get smooth weighted turns.
        """
        backends = await start_backends(self, "a", "b", "c")
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("nodes:\n")
            for backend, weight in zip(backends, (5, 1, 1)):
                f.write(f"  - {{url: '{backend.url}', weight: {weight}}}\n")
        balancer = await start_balancer(self, [], "--config", path)
        self.assertEqual(b"".join(await self.bodies(balancer, 14)), b"aabacaa" * 2)

    async def test_nodes_added_and_removed(self) -> None:
        """
        The node set can change while running: a node added gets its turns
        at once, a node removed gets no more, and the others keep going.
        """
        a, b, c = await start_backends(self, "a", "b", "c")
        balancer = await start_balancer(self, [a.url, b.url])
        service = balancer.service
        self.assertEqual(await self.bodies(balancer, 2), [b"a", b"b"])
        service.apply(
            dataclasses.replace(service.config, nodes=service.config.nodes + (parse_node(c.url),))
        )
        self.assertEqual(await self.bodies(balancer, 3), [b"c", b"a", b"b"])
        service.apply(dataclasses.replace(service.config, nodes=(parse_node(c.url),)))
        self.assertEqual(await self.bodies(balancer, 2), [b"c", b"c"])
        await wait_until(lambda: c.probes >= 1, what="a probe of the added node")


class ForwardingTests(ProxyTestCase):
    """
    Requests and responses pass through unchanged.
    """

    async def test_method_target_body_headers(self) -> None:
        """
        The method, the request target exactly as sent (no re-quoting), the
        body and the headers reach the backend.
        """
        (backend,) = await start_backends(self, "a")
        balancer = await start_balancer(self, [backend.url])
        target = b"/p%2Fq/%7euser/a%20b/./x/../y;m=1?q=%ZZ&a=1&a=2&e=&sp=a+b&u=%E2%82%AC#"
        target = target.rstrip(b"#")
        body = bytes(range(256)) * 4
        request = (
            b"PATCH " + target + b" HTTP/1.1\r\n"
            b"Host: service.example:8080\r\n"
            b"X-Custom: one value\r\n"
            b"X-Multi: 1\r\n"
            b"X-Multi: 2\r\n"
            b"Authorization: Bearer secret\r\n"
            b"Cookie: a=b; c=d\r\n"
            b"Content-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n"
            b"\r\n" % len(body)
        ) + body
        response = await raw_request(self, balancer.port, request)
        self.assertTrue(response.startswith(b"HTTP/1.1 200 OK\r\n"), response[:200])
        (seen,) = backend.requests
        self.assertEqual(seen.method, b"PATCH")
        self.assertEqual(seen.uri, target)
        self.assertEqual(seen.body, body)
        self.assertEqual(seen.header(b"host"), b"service.example:8080")
        self.assertEqual(seen.header(b"x-custom"), b"one value")
        self.assertEqual([v for n, v in seen.headers if n.lower() == b"x-multi"], [b"1", b"2"])
        self.assertEqual(seen.header(b"authorization"), b"Bearer secret")
        self.assertEqual(seen.header(b"cookie"), b"a=b; c=d")
        self.assertEqual(seen.header(b"content-type"), b"application/octet-stream")
        self.assertEqual(seen.header(b"content-length"), str(len(body)).encode())

    async def test_methods(self) -> None:
        """
        Every method, standard or not, is forwarded as it came.
        """
        (backend,) = await start_backends(self, "a")
        balancer = await start_balancer(self, [backend.url])
        client = await self.client()
        methods = [b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"PURGE", b"HEAD"]
        for method in methods:
            reply = await client.request(method, balancer.url + "/m", body=b"x")
            self.assertEqual(reply.code, 200, method)
        self.assertEqual([r.method for r in backend.requests], methods)

    async def test_empty_and_large_bodies(self) -> None:
        """
        An empty body stays empty; a large one arrives whole, both ways.
        """
        (backend,) = await start_backends(self, "a")
        balancer = await start_balancer(self, [backend.url])
        client = await self.client()
        big = b"0123456789abcdef" * 65536 * 2
        await client.request("POST", balancer.url + "/empty", body=b"")
        backend.body = big[::-1]
        reply = await client.request("POST", balancer.url + "/big", body=big)
        self.assertEqual([r.body for r in backend.requests], [b"", big])
        self.assertEqual(reply.body, big[::-1])

    async def test_response_unchanged(self) -> None:
        """
        The backend's status code, reason phrase, headers and body come back
        as the backend sent them.
        """
        (backend,) = await start_backends(self, "a")
        balancer = await start_balancer(self, [backend.url])
        backend.status = 201
        backend.reason = b"Made It Just Now"
        backend.headers = [
            (b"X-Answer", b"42"),
            (b"Set-Cookie", b"a=1; Path=/"),
            (b"Set-Cookie", b"b=2; HttpOnly"),
            (b"Content-Type", b"application/x-test"),
            (b"Cache-Control", b"no-store"),
        ]
        backend.body = b"created\x00\xff"
        response = await raw_request(
            self, balancer.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        status, headers, body = split_response(response)
        self.assertEqual(status, b"HTTP/1.1 201 Made It Just Now")
        lowered = [(n.lower(), v) for n, v in headers]
        self.assertIn((b"x-answer", b"42"), lowered)
        self.assertEqual(
            [v for n, v in lowered if n == b"set-cookie"], [b"a=1; Path=/", b"b=2; HttpOnly"]
        )
        self.assertIn((b"content-type", b"application/x-test"), lowered)
        self.assertIn((b"cache-control", b"no-store"), lowered)
        self.assertIn((b"x-backend", b"a"), lowered)
        self.assertEqual(body, b"created\x00\xff")

    async def test_error_statuses_pass_through(self) -> None:
        """
        A backend's own error answers are the client's answers, not the
        balancer's 502.
        """
        (backend,) = await start_backends(self, "a")
        balancer = await start_balancer(self, [backend.url])
        client = await self.client()
        for code, reason in [(404, b"Not Here"), (500, b"Oops"), (503, b"Busy"), (418, b"Tea")]:
            backend.status, backend.reason, backend.body = code, reason, b"own body %d" % code
            reply = await client.request("GET", balancer.url + "/")
            self.assertEqual(
                (reply.code, reply.phrase, reply.body), (code, reason, b"own body %d" % code)
            )

    async def test_head(self) -> None:
        """
        A HEAD request gets the head of the answer and no body.
        """
        (backend,) = await start_backends(self, "a")
        balancer = await start_balancer(self, [backend.url])
        response = await raw_request(
            self, balancer.port, b"HEAD /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        status, headers, body = split_response(response)
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(body, b"")
        self.assertEqual(backend.requests[0].method, b"HEAD")

    async def test_base_path(self) -> None:
        """
        A node's base path is put in front of every forwarded path.
        """
        (backend,) = await start_backends(self, "a")
        balancer = await start_balancer(self, [backend.url + "/app/v1/"])
        await http_request(self, "GET", balancer.url + "/users?id=7")
        self.assertEqual(backend.requests[0].uri, b"/app/v1/users?id=7")
        await wait_until(lambda: backend.probes >= 1, what="a probe")
        self.assertEqual(backend.probe_paths[0], b"/app/v1/health")

    async def test_keep_alive_client(self) -> None:
        """
        Several requests on one client connection are each forwarded and
        answered in order.
        """
        backends = await start_backends(self, "a", "b")
        balancer = await start_balancer(self, [b.url for b in backends])
        one = b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
        last = b"GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        response = await raw_request(self, balancer.port, one + one + last)
        self.assertEqual(response.count(b"HTTP/1.1 200 OK"), 3)
        self.assertEqual([r.uri for r in backends[0].requests], [b"/1", b"/3"])
        self.assertEqual([r.uri for r in backends[1].requests], [b"/1"])


class HealthTests(ProxyTestCase):
    """
    Health checks take nodes out of rotation and bring them back.
    """

    async def test_first_probe_at_start(self) -> None:
        """
        Every node is probed as soon as the balancer starts, not one
        interval later.
        """
        backends = await start_backends(self, "a", "b")
        await start_balancer(self, [b.url for b in backends], "--health-interval", "60")
        await wait_until(lambda: all(b.probes == 1 for b in backends), what="first probes")

    async def test_out_and_back(self) -> None:
        """
        A backend failing its health checks leaves the rotation (the others
        share the requests in order) and rejoins it, in its place, once it
        passes them again.
        """
        logs = LogCapture.install(self)
        a, b, c = await start_backends(self, "a", "b", "c")
        balancer = await start_balancer(self, [a.url, b.url, c.url], *FAST_HEALTH)
        node_b = self.node(balancer, b)
        b.healthy = False
        await wait_until(lambda: not node_b.in_rotation, what="b to leave")
        before = len(b.requests)
        got = await self.bodies(balancer, 6)
        self.assertEqual(sorted(got[:2]), [b"a", b"c"])
        self.assertEqual(got, got[:2] * 3)
        self.assertEqual(len(b.requests), before)
        b.healthy = True
        await wait_until(lambda: node_b.in_rotation, what="b to come back")
        got = await self.bodies(balancer, 6)
        self.assertEqual(sorted(got[:3]), [b"a", b"b", b"c"])
        self.assertEqual(got[3:], got[:3])
        messages = [m for m in logs.messages() if b.url in m]
        self.assertTrue(any("down" in m and "HTTP 503" in m for m in messages), messages)
        self.assertTrue(any(" up" in m for m in messages), messages)

    async def test_slow_health_check(self) -> None:
        """
        A node whose health check does not answer within the health timeout
        leaves the rotation; the others stay.
        """
        a, b = await start_backends(self, "a", "b")
        balancer = await start_balancer(
            self, [a.url, b.url], *FAST_HEALTH, "--health-timeout", "0.1"
        )
        b.health_delay = 1.0
        await wait_until(lambda: not self.node(balancer, b).in_rotation, what="b to leave")
        self.assertTrue(self.node(balancer, a).in_rotation)
        self.assertIn("timed out", self.node(balancer, b).last_error)
        self.assertEqual(await self.bodies(balancer, 2), [b"a", b"a"])

    async def test_stopped_backend(self) -> None:
        """
        A backend that stops listening (refused) leaves the rotation.
        """
        a, b = await start_backends(self, "a", "b")
        balancer = await start_balancer(self, [a.url, b.url], *FAST_HEALTH)
        await b.stop()
        await wait_until(lambda: not self.node(balancer, b).in_rotation, what="b to leave")
        self.assertEqual(await self.bodies(balancer, 3), [b"a"] * 3)


class ErrorTests(ProxyTestCase):
    """
    503, 502 and 504: short plain-text answers, never a traceback.
    """

    def assertPlainError(self, reply: Reply, code: int) -> None:
        self.assertEqual(reply.code, code, reply.body)
        content_type = reply.header(b"content-type") or b""
        self.assertTrue(content_type.startswith(b"text/plain"), content_type)
        self.assertTrue(0 < len(reply.body) < 200, reply.body)
        assertNoTraceback(self, reply.body)

    async def test_503_no_healthy_node(self) -> None:
        """
        With every node out of rotation the answer is 503 at once, with
        Retry-After and a short plain-text body; nothing reaches a backend.
        """
        backends = await start_backends(self, "a", "b")
        balancer = await start_balancer(self, [b.url for b in backends], *FAST_HEALTH)
        for backend in backends:
            backend.healthy = False
        pool = balancer.service.pool
        await wait_until(lambda: not pool.in_rotation, what="every node to leave")
        started = balancer.service.reactor.seconds()
        reply = await http_request(self, "GET", balancer.url + "/")
        self.assertLess(balancer.service.reactor.seconds() - started, 1.0)
        self.assertPlainError(reply, 503)
        self.assertEqual(reply.phrase, b"Service Unavailable")
        retry_after = reply.header(b"retry-after")
        assert retry_after is not None
        self.assertGreaterEqual(int(retry_after), 1)
        self.assertEqual([len(b.requests) for b in backends], [0, 0])

    async def test_502_refused(self) -> None:
        """
        A node that refuses the connection gives 502.
        """
        balancer = await start_balancer(self, [await closed_port_url()])
        client = await self.client()
        for method in ("GET", "POST"):
            self.assertPlainError(await client.request(method, balancer.url + "/x", body=b""), 502)

    async def test_502_refused_post_not_retried(self) -> None:
        """
        A POST whose node refuses is answered 502, not sent elsewhere.
        """
        backend = await start_backend(self, "a")
        refused = await closed_port_url()
        balancer = await start_balancer(self, [refused, backend.url], "--fall", "10")
        reply = await http_request(self, "POST", balancer.url + "/", body=b"data")
        self.assertPlainError(reply, 502)
        self.assertEqual(backend.requests, [])

    async def test_502_dropped(self) -> None:
        """
        A node that drops the connection without answering gives 502.
        """
        backend = await start_backend(self, "a")

        def drop(request: Any) -> Any:
            request.channel.transport.abortConnection()
            return server.NOT_DONE_YET

        backend.handler = drop
        balancer = await start_balancer(self, [backend.url])
        client = await self.client()
        for method in ("GET", "POST"):
            self.assertPlainError(await client.request(method, balancer.url + "/x", body=b""), 502)

    async def test_502_garbage(self) -> None:
        """
        A node that answers something that is not HTTP gives 502.
        """
        backend = await start_backend(self, "a")

        def garbage(request: Any) -> Any:
            request.channel.transport.write(b"SSH-2.0-OpenSSH\r\n\r\n")
            request.channel.transport.loseConnection()
            return server.NOT_DONE_YET

        backend.handler = garbage
        balancer = await start_balancer(self, [backend.url])
        self.assertPlainError(await http_request(self, "POST", balancer.url + "/", body=b""), 502)

    async def test_504_slow_node(self) -> None:
        """
        A node that does not answer within C{--timeout} gives 504, about
        when the timeout ends.
        """
        backend = await start_backend(self, "a")
        backend.delay = 5.0
        balancer = await start_balancer(self, [backend.url], "--timeout", "0.3")
        reactor = balancer.service.reactor
        started = reactor.seconds()
        reply = await http_request(self, "GET", balancer.url + "/slow")
        elapsed = reactor.seconds() - started
        self.assertPlainError(reply, 504)
        self.assertEqual(reply.phrase, b"Gateway Timeout")
        self.assertGreaterEqual(elapsed, 0.3)
        self.assertLess(elapsed, 2.0)

    async def test_slow_but_in_time(self) -> None:
        """
        A node that answers within the timeout is waited for.
        """
        backend = await start_backend(self, "a")
        backend.delay = 0.2
        balancer = await start_balancer(self, [backend.url], "--timeout", "2")
        reply = await http_request(self, "GET", balancer.url + "/")
        self.assertEqual((reply.code, reply.body), (200, b"a"))

    async def test_no_traceback_anywhere(self) -> None:
        """
        Bad requests get short answers without a traceback either.
        """
        (backend,) = await start_backends(self, "a")
        balancer = await start_balancer(self, [backend.url])
        for request in [
            b"GET nonsense HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\nConnection: close\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\nConnection: close\r\n\r\n",
        ]:
            response = await raw_request(self, balancer.port, request)
            status, _, body = split_response(response)
            self.assertRegex(status.decode("latin-1"), r"^HTTP/1\.1 4\d\d ")
            assertNoTraceback(self, body)
