"""
Route conditions and actions end to end, over loopback: scheme, query,
source and path glob conditions; redirect, respond and weighted, sticky
forward; the nodes' records show what each received (or that nothing was).
"""

from __future__ import annotations

from typing import Any, Optional

from rrlb.actions import Forward, Redirect, cookie_value, smooth_schedule
from tests.support import (
    FakeRequest,
    HTTPClient,
    YamlCase,
    raw_request,
    split_response,
    start_backends,
)


class ActionCase(YamlCase):
    """
    Start backends and rrlb from a YAML text.
    """


class ConditionTests(ActionCase):
    """
    scheme, query, source and path: each a route condition.
    """

    async def test_query_and_path_glob(self) -> None:
        """
        A query route needs each parameter with exactly its value; a path
        glob matches the whole normalized path, * any run, ? one character.
        """
        q, g, d = await start_backends(self, "q", "g", "d")
        await self.start(
            f"pools: {{q: {{nodes: [{q.url}]}}, g: {{nodes: [{g.url}]}},"
            f" d: {{nodes: [{d.url}]}}}}\n"
            "routes:\n"
            "  - {query: {version: '2', beta: 'on'}, pool: q}\n"
            "  - {path: '/img/*.p?g', pool: g}\n"
            "  - {pool: d}\n"
        )
        self.assertEqual((await self.get("/x?beta=on&version=2")).body, b"q")
        self.assertEqual((await self.get("/x?version=2&beta=o%6E")).body, b"q")
        self.assertEqual((await self.get("/x?version=2")).body, b"d")
        self.assertEqual((await self.get("/x?version=20&beta=on")).body, b"d")
        self.assertEqual((await self.get("/img/a/b.png")).body, b"g")
        self.assertEqual((await self.get("/img/x/../c.pjg?z")).body, b"g")
        self.assertEqual((await self.get("/img/c.pngx")).body, b"d")
        self.assertEqual((await self.get("/images/c.png")).body, b"d")
        self.assertEqual([r.uri for r in g.requests], [b"/img/a/b.png", b"/img/x/../c.pjg?z"])

    async def test_scheme_and_source(self) -> None:
        """
        scheme is what the client used, behind --trusted-proxies the
        trusted X-Forwarded-Proto; source is the real client's address.
        """
        s, t, d = await start_backends(self, "s", "t", "d")
        await self.start(
            f"pools: {{s: {{nodes: [{s.url}]}}, t: {{nodes: [{t.url}]}},"
            f" d: {{nodes: [{d.url}]}}}}\n"
            "trusted_proxies: [127.0.0.1/32]\n"
            "routes:\n"
            "  - {scheme: https, pool: s}\n"
            "  - {source: [10.0.0.0/8], pool: t}\n"
            "  - {pool: d}\n"
        )
        self.assertEqual((await self.get("/", x_forwarded_proto=b"https")).body, b"s")
        self.assertEqual((await self.get("/")).body, b"d")
        self.assertEqual((await self.get("/", x_forwarded_for=b"10.9.8.7")).body, b"t")
        self.assertEqual((await self.get("/", x_forwarded_for=b"192.168.1.1")).body, b"d")

    async def test_source_direct(self) -> None:
        """
        Without --trusted-proxies the source is the peer, whatever
        X-Forwarded-For says.
        """
        s, d = await start_backends(self, "s", "d")
        await self.start(
            f"pools: {{s: {{nodes: [{s.url}]}}, d: {{nodes: [{d.url}]}}}}\n"
            "routes:\n  - {source: [127.0.0.0/8], scheme: http, pool: s}\n  - {pool: d}\n"
        )
        self.assertEqual((await self.get("/", x_forwarded_for=b"10.0.0.1")).body, b"s")

    def test_bad_conditions(self) -> None:
        """
        Each bad condition is one line naming routes[N] and the key.
        """
        base = "nodes: [http://127.0.0.1:1]\nroutes:\n  - {pool: default, %s}\n"
        for text, wanted in [
            ("scheme: ftp", "routes[0].scheme must be http or https"),
            ("query: [a]", "routes[0].query must be a mapping"),
            ("query: {a: [1]}", "routes[0].query: 'a'"),
            ("source: [nope]", "routes[0].source: 'nope' is not a network"),
            ("path: 'x*'", "routes[0].path must be a glob"),
            ("path: '/a b'", "routes[0].path must be a glob"),
        ]:
            message = self.error(base % text)
            self.assertIn(wanted, message)
            self.assertNotIn("\n", message)


class RedirectTests(ActionCase):
    """
    redirect: every part kept unless changed; the default port left out.
    """

    async def test_http_to_https(self) -> None:
        """
        Port 80 to HTTPS: the scheme changes, the port becomes 443 (left out
        of Location), path and query are kept; no node is contacted.
        """
        (n,) = await start_backends(self, "n")
        await self.start(
            f"nodes: [{n.url}]\n"
            "routes:\n"
            "  - {path_prefix: /port, redirect: {scheme: https, port: 8443, status: 308}}\n"
            "  - {path_prefix: /moved, redirect: {path: '/new{path}', query: '', status: 302}}\n"
            "  - {path_prefix: /q, redirect: {host: other.example, query: 'a=1'}}\n"
            "  - {scheme: http, redirect: {scheme: https}}\n"
        )
        reply = await self.get("/a/b?x=1&y=%20", host=b"Shop.Example:8080")
        self.assertEqual(reply.code, 301)
        self.assertEqual(reply.header(b"Location"), b"https://Shop.Example/a/b?x=1&y=%20")
        self.assertEqual(reply.body, b"")
        reply = await self.get("/port/x?k", host=b"shop.example")
        self.assertEqual(reply.code, 308)
        self.assertEqual(reply.header(b"Location"), b"https://shop.example:8443/port/x?k")
        reply = await self.get("/moved/x?k=1", host=b"shop.example:8080")
        self.assertEqual(reply.code, 302)
        self.assertEqual(reply.header(b"Location"), b"http://shop.example:8080/new/moved/x")
        reply = await self.get("/q?old", host=b"[::1]:80")
        self.assertEqual(reply.header(b"Location"), b"http://other.example/q?a=1")
        reply = await self.get("/r", host=b"[::1]:81")
        self.assertEqual(reply.header(b"Location"), b"https://[::1]/r")
        self.assertEqual(n.requests, [])

    def test_location_forms(self) -> None:
        """
        The host and port come from an absolute-form target, else Host,
        else the address the request came in on; {path} is the path as
        sent.
        """

        class Local:
            host = "10.0.0.9"

        class Channel:
            edge = 0
            forwarded = (b"http", b"10.1.1.1")
            local = Local()

        def request(uri: bytes, host: Optional[bytes] = None) -> Any:
            r = FakeRequest(uri=uri, headers={b"Host": [host]} if host else {})
            r.channel = Channel()
            return r

        to_https = Redirect(scheme="https")
        self.assertEqual(
            to_https.location(request(b"http://abs.example:8080/p?q", b"other")),
            b"https://abs.example/p?q",
        )
        self.assertEqual(to_https.location(request(b"/x")), b"https://10.0.0.9/x")
        self.assertEqual(
            Redirect(port=8443, path="/v2{path}").location(request(b"/a%20b?x", b"h.example")),
            b"http://h.example:8443/v2/a%20b?x",
        )
        self.assertEqual(
            Redirect(host="n.example", query="").location(request(b"/?x", b"h:81")),
            b"http://n.example:81/",
        )

    def test_bad_redirects(self) -> None:
        """
        A redirect that changes nothing, and every bad part, is one line
        naming the route.
        """
        base = "nodes: [http://127.0.0.1:1]\nroutes:\n  - {redirect: %s}\n"
        for text, wanted in [
            ("{status: 302}", "routes[0]: a redirect must change one of scheme"),
            ("{}", "routes[0]: a redirect must change one of scheme"),
            ("{scheme: ftp}", "routes[0].redirect.scheme must be http or https"),
            ("{scheme: https, status: 200}", "routes[0].redirect.status must be 301"),
            ("{port: 0}", "routes[0].redirect.port must be a whole number"),
            ("{path: 'x'}", "routes[0].redirect.path must start with /"),
            ("{path: '/a?b'}", "routes[0].redirect.path must start with /"),
            ("{host: 'a b'}", "routes[0].redirect.host must be percent-encoded"),
            ("{host: 'a:1'}", "routes[0].redirect.host must be a host name"),
            ("{query: '?a'}", "routes[0].redirect.query is the query string"),
            ('{query: "a\\r\\nb"}', "routes[0].redirect.query must be percent-encoded"),
            ("{scheme: https, nope: 1}", "unknown setting routes[0].redirect.nope"),
            ("[1]", "routes[0].redirect must be a mapping"),
        ]:
            message = self.error(base % text)
            self.assertIn(wanted, message)
            self.assertNotIn("\n", message)


class RespondTests(ActionCase):
    """
    respond: a fixed answer without a node.
    """

    async def test_maintenance_page(self) -> None:
        """
        respond answers with its status, body, content type and headers.
        """
        (n,) = await start_backends(self, "n")
        await self.start(
            f"nodes: [{n.url}]\n"
            "routes:\n"
            "  - path_prefix: /down\n"
            "    respond:\n"
            "      status: 503\n"
            '      body: "<h1>Back soon</h1>\\n"\n'
            "      content_type: text/html\n"
            "      headers: {Retry-After: 120}\n"
            "  - {path: /ok, respond: {}}\n"
            "  - {pool: default}\n"
        )
        reply = await self.get("/down/x")
        self.assertEqual(reply.code, 503)
        self.assertEqual(reply.body, b"<h1>Back soon</h1>\n")
        self.assertEqual(reply.header(b"Content-Type"), b"text/html")
        self.assertEqual(reply.header(b"Retry-After"), b"120")
        reply = await self.get("/ok")
        self.assertEqual((reply.code, reply.body), (200, b""))
        self.assertEqual(reply.header(b"Content-Type"), b"text/plain; charset=utf-8")
        head = await self.get("/down", method="HEAD")
        self.assertEqual((head.code, head.body), (503, b""))
        self.assertEqual(n.requests, [])
        self.assertEqual((await self.get("/other")).body, b"n")

    async def test_no_body_statuses(self) -> None:
        """
        A respond of 204 or 304 sends no Content-Length and no body (RFC
        9110 8.6: never a Content-Length on a 204), even with a body
        configured, so the next response on the connection is framed right.
        """
        (n,) = await start_backends(self, "n")
        await self.start(
            f"nodes: [{n.url}]\n"
            "routes:\n"
            "  - {path: /204, respond: {status: 204, body: xyz}}\n"
            "  - {path: /304, respond: {status: 304, body: xyz}}\n"
            "  - {path: /ok, respond: {body: ok}}\n"
        )
        for status in (b"204", b"304"):
            data = await raw_request(
                self,
                self.balancer.port,
                b"GET /" + status + b" HTTP/1.1\r\nHost: a\r\n\r\n"
                b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            first, headers, rest = split_response(data)
            self.assertIn(status, first)
            self.assertNotIn(b"content-length", [name.lower() for name, _ in headers])
            self.assertTrue(rest.startswith(b"HTTP/1.1 200 "), rest)
            self.assertTrue(rest.endswith(b"\r\n\r\nok"), rest)
        self.assertEqual(n.requests, [])

    def test_bad_respond(self) -> None:
        """
        Every bad part of respond is one line naming the route.
        """
        base = "nodes: [http://127.0.0.1:1]\nroutes:\n  - {respond: %s}\n"
        for text, wanted in [
            ("{status: 99}", "routes[0].respond.status must be a status"),
            ("{body: [1]}", "routes[0].respond.body must be a string"),
            ("{headers: {Connection: close}}", "hop-by-hop or framing"),
            ('{headers: {X-A: "a\\nb"}}', "has a CR, LF or NUL"),
            ("{headers: {Content-Type: x}}", "set Content-Type with content_type"),
            ('{content_type: "a\\r\\nb: c"}', "has a CR, LF or NUL"),
        ]:
            message = self.error(base % text)
            self.assertIn(wanted, message)
            self.assertNotIn("\n", message)

    def test_one_action(self) -> None:
        """
        A route has exactly one action.
        """
        base = "nodes: [http://127.0.0.1:1]\nroutes:\n  - %s\n"
        for text, wanted in [
            ("{host: a}", "routes[0] needs exactly one action"),
            ("{pool: default, respond: {}}", "(it has pool, respond)"),
            ("{pool: default, stickiness: {cookie: a, duration: 1}}", "stickiness goes with"),
            ("{path_prefix: /a, strip_prefix: true, respond: {}}", "forwards nothing"),
        ]:
            message = self.error(base % text)
            self.assertIn(wanted, message)


class ForwardTests(ActionCase):
    """
    forward: weighted pools, smooth and exact; stickiness; empty pools skipped.
    """

    def test_schedule(self) -> None:
        """
        The smooth schedule is exact per round and interleaves.
        """
        self.assertEqual(smooth_schedule([90, 10]).count(1), 1)
        self.assertEqual(len(smooth_schedule([90, 10])), 10)
        self.assertEqual(smooth_schedule([1, 1]), (0, 1))
        self.assertEqual(smooth_schedule([5, 1, 1]), (0, 0, 1, 0, 2, 0, 0))
        picker = Forward((("a", 2), ("b", 1))).picker(["A", "B"])
        picks = [picker.pick(lambda t: t != "A")[0] for _ in range(3)]
        self.assertEqual(picks, ["B", "B", "B"])

    async def test_ninety_ten(self) -> None:
        """
        Over 1,000 requests a 90/10 split is exactly 900 and 100, and exact
        over every 10.
        """
        blue, green = await start_backends(self, "blue", "green")
        await self.start(
            f"pools: {{blue: {{nodes: [{blue.url}]}}, green: {{nodes: [{green.url}]}}}}\n"
            "routes:\n"
            "  - forward: [{pool: blue, weight: 90}, {pool: green, weight: 10}]\n"
        )
        client = HTTPClient()
        self.addCleanup(client.close)
        bodies = []
        for _ in range(1000):
            bodies.append((await client.request("GET", self.balancer.url + "/")).body)
        self.assertEqual((len(blue.requests), len(green.requests)), (900, 100))
        for i in range(0, 1000, 10):
            self.assertEqual(bodies[i : i + 10].count(b"green"), 1)

    async def test_stickiness(self) -> None:
        """
        A client without the cookie gets the pool's opaque cookie with
        Max-Age; with it, it keeps that pool while it serves; a pool without
        a node in rotation is skipped.
        """
        blue, green = await start_backends(self, "blue", "green")
        await self.start(
            f"pools: {{blue: {{nodes: [{blue.url}]}}, green: {{nodes: [{green.url}]}}}}\n"
            "routes:\n"
            "  - forward: [{pool: blue, weight: 1}, {pool: green, weight: 1}]\n"
            "    stickiness: {cookie: lb, duration: 600}\n"
        )
        first = await self.get("/")
        cookie = first.header(b"Set-Cookie")
        assert cookie is not None
        pool = first.body.decode()
        self.assertEqual(
            cookie, b"lb=%s; Max-Age=600; Path=/; HttpOnly" % cookie_value(pool).encode()
        )
        self.assertNotIn(pool.encode(), cookie)
        jar = cookie.split(b";")[0]
        for _ in range(4):
            again = await self.get("/", cookie=b"a=b; " + jar)
            self.assertEqual(again.body.decode(), pool)
            self.assertIsNone(again.header(b"Set-Cookie"))
        others = {(await self.get("/")).body.decode() for _ in range(2)}
        self.assertEqual(others, {"blue", "green"})
        # Its pool goes out of rotation: the client moves, and is told.
        pools = self.balancer.service.traffic.pools
        for node in pools.by_name[pool].nodes:
            pools.by_name[pool].mark(node, False, "test")
            pools.by_name[pool].mark(node, False, "test")
            pools.by_name[pool].mark(node, False, "test")
        moved = await self.get("/", cookie=jar)
        self.assertNotEqual(moved.body.decode(), pool)
        self.assertIsNotNone(moved.header(b"Set-Cookie"))

    def test_bad_forward(self) -> None:
        """
        Bad forward and stickiness values are one line naming the route.
        """
        base = "pools: {a: {nodes: [http://127.0.0.1:1]}}\nroutes:\n  - %s\n"
        for text, wanted in [
            ("{forward: []}", "routes[0].forward must be a list"),
            ("{forward: [{weight: 1}]}", "routes[0].forward[0] needs a pool"),
            ("{forward: [{pool: a, weight: 0}]}", "routes[0].forward[0].weight must be"),
            ("{forward: [{pool: b}]}", "routes[0].forward[0].pool: no pool 'b'"),
            ("{forward: [{pool: a}, {pool: a}]}", "routes[0].forward[1].pool: 'a' is listed"),
            ("{forward: [{pool: a}], stickiness: {cookie: a}}", "needs a cookie and a duration"),
            ("{forward: [{pool: a}], stickiness: {cookie: 'a b', duration: 1}}", "cookie name"),
        ]:
            message = self.error(base % text)
            self.assertIn(wanted, message)
            self.assertNotIn("\n", message)
