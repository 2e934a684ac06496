"""
Routes and pools end to end, over loopback: rrlb runs from a YAML file with
several pools and routes, and real backends see what it forwards.
"""

from __future__ import annotations

import json

from twisted.internet import defer

from tests.support import (
    ADMIN,
    SRV_NAME,
    Backend,
    LogCapture,
    YamlCase,
    a,
    admin_url,
    http_request,
    parse_error,
    srv,
    start_backends,
    start_balancer,
    start_server,
    wait_until,
)


class RoutingCase(YamlCase):
    """
    Start backends and rrlb from a YAML template.
    """


def issue_yaml(api: list[Backend], static: list[Backend]) -> str:
    """
    The issue's example, on loopback backends.
    """
    return (
        "pools:\n"
        "  api:\n"
        f"    nodes: [{api[0].url}, {{url: {api[1].url}, weight: 2}}]\n"
        "    balance: leastconn\n"
        "    health: {interval: 2}\n"
        "  static:\n"
        f"    nodes: [{static[0].url}]\n"
        "routes:\n"
        "  - {host: api.example.com, pool: api}\n"
        "  - {path_prefix: /static/, pool: static, strip_prefix: true}\n"
        '  - {header: {X-Canary: "1"}, pool: api}\n'
        "  - {pool: static}\n"
    )


class RouteTests(RoutingCase):
    """
    Host, path prefix, header and default routes; strip_prefix; no route.
    """

    async def test_issue_example(self) -> None:
        """
        Each request goes to the pool of the first route that matches: the
        API host to api, /static/ to static without its prefix, X-Canary: 1
        to api, anything else to the default route's pool.
        """
        a1, a2, s1 = await start_backends(self, "a1", "a2", "s1")
        await self.start(issue_yaml([a1, a2], [s1]))
        api = {"a1", "a2"}
        self.assertIn((await self.get("/x", host=b"API.example.com:8080")).body.decode(), api)
        reply = await self.get("/static/app.js?v=2")
        self.assertEqual(reply.body, b"s1")
        self.assertEqual(s1.requests[-1].uri, b"/app.js?v=2")
        self.assertIn((await self.get("/y", x_canary=b"1")).body.decode(), api)
        reply = await self.get("/z", x_canary=b"2")
        self.assertEqual(reply.body, b"s1")
        self.assertEqual(s1.requests[-1].uri, b"/z")
        # A host route wins over the path route that comes after it.
        self.assertIn((await self.get("/static/a", host=b"api.example.com")).body.decode(), api)
        self.assertEqual(
            [r.uri for r in a1.requests + a2.requests if r.uri.startswith(b"/static")],
            [b"/static/a"],
        )

    async def test_no_route_404(self) -> None:
        """
        Without a default route, a request no route matches gets 404 with a
        short body, and nothing is forwarded.
        """
        (a,) = await start_backends(self, "a")
        await self.start(
            f"pools: {{a: {{nodes: [{a.url}]}}}}\nroutes: [{{host: a.example, pool: a}}]\n"
        )
        reply = await self.get("/x", host=b"b.example")
        self.assertEqual(reply.code, 404)
        self.assertLess(len(reply.body), 200)
        self.assertEqual(a.requests, [])
        self.assertEqual((await self.get("/x", host=b"a.example")).code, 200)

    async def test_strip_prefix_with_base_path(self) -> None:
        """
        strip_prefix removes the matched prefix before the node's base path
        is added.
        """
        (s,) = await start_backends(self, "s")
        await self.start(
            f"pools: {{s: {{nodes: [{s.url}/base]}}}}\n"
            "routes: [{path_prefix: /static, pool: s, strip_prefix: true}]\n"
        )
        await self.get("/static/a/b?q=1")
        await self.get("/static")
        await self.get("/static/")
        self.assertEqual([r.uri for r in s.requests], [b"/base/a/b?q=1", b"/base/", b"/base/"])
        self.assertEqual((await self.get("/staticx")).code, 404)

    async def test_methods_route(self) -> None:
        """
        A methods route sends only those methods to its pool.
        """
        w, r = await start_backends(self, "w", "r")
        await self.start(
            f"pools: {{w: {{nodes: [{w.url}]}}, r: {{nodes: [{r.url}]}}}}\n"
            "routes: [{methods: [POST, PUT], pool: w}, {pool: r}]\n"
        )
        self.assertEqual((await self.get("/", method="POST")).body, b"w")
        self.assertEqual((await self.get("/")).body, b"r")

    async def test_one_pool_down(self) -> None:
        """
        A pool with no node in rotation answers 503 while another pool
        serves on.
        """
        a, s = await start_backends(self, "a", "s")
        await self.start(
            f"pools: {{a: {{nodes: [{a.url}]}}, s: {{nodes: [{s.url}]}}}}\n"
            "routes: [{path_prefix: /api, pool: a}, {pool: s}]\n"
        )
        pool = self.balancer.service.pools.by_name["a"]
        pool.set_drained(pool.nodes[0], True)
        reply = await self.get("/api/x")
        self.assertEqual(reply.code, 503)
        self.assertEqual((await self.get("/other")).body, b"s")

    async def test_nodes_flag_is_default_pool(self) -> None:
        """
        --nodes with pools: the top-level nodes are the pool named default,
        which a route names.
        """
        d, b = await start_backends(self, "d", "b")
        await self.start(
            f"pools: {{b: {{nodes: [{b.url}]}}}}\n"
            "routes: [{host: b.example, pool: b}, {pool: default}]\n",
            "--nodes",
            d.url,
        )
        self.assertEqual((await self.get("/", host=b"b.example")).body, b"b")
        self.assertEqual((await self.get("/")).body, b"d")


class PolicyTests(RoutingCase):
    """
    Policies over real sockets.
    """

    async def test_sticky_cookie(self) -> None:
        """
        The first response sets the sticky cookie (an opaque id, HttpOnly,
        Path=/); requests with it go to that node; when that node is drained
        the next request goes elsewhere and the cookie is set again.
        """
        a, b, c = await start_backends(self, "a", "b", "c")
        await self.start(
            f"pools: {{web: {{nodes: [{a.url}, {b.url}, {c.url}], sticky: {{cookie: LB}}}}}}\n"
        )
        first = await self.get("/")
        cookie = first.header(b"Set-Cookie")
        assert cookie is not None
        self.assertTrue(cookie.startswith(b"LB="), cookie)
        self.assertIn(b"HttpOnly", cookie)
        self.assertIn(b"Path=/", cookie)
        self.assertNotIn(b"127.0.0.1", cookie)
        value = cookie.split(b";")[0]
        for _ in range(5):
            reply = await self.get("/", cookie=value)
            self.assertEqual(reply.body, first.body)
            self.assertIsNone(reply.header(b"Set-Cookie"))
        pool = self.balancer.service.pools.by_name["web"]
        backend = {"a": a, "b": b, "c": c}[first.body.decode()]
        (node,) = [n for n in pool.nodes if n.port == backend.port_number]
        pool.set_drained(node, True)
        moved = await self.get("/", cookie=value)
        self.assertNotEqual(moved.body, first.body)
        again = moved.header(b"Set-Cookie")
        assert again is not None
        self.assertNotEqual(again.split(b";")[0], value)

    async def test_leastconn_avoids_slow_node(self) -> None:
        """
        With leastconn, while one node holds slow requests, new requests go
        to the other.
        """
        slow, fast = await start_backends(self, "slow", "fast")
        slow.delay = 1.5
        await self.start(f"pools: {{p: {{nodes: [{slow.url}, {fast.url}], balance: leastconn}}}}\n")
        pool = self.balancer.service.pools.by_name["p"]
        # Two requests in parallel: the first to "slow" (ties go in order),
        # the second to "fast".
        held = defer.ensureDeferred(http_request(self, "GET", self.balancer.url + "/hold"))
        await wait_until(lambda: pool.nodes[0].in_flight == 1, what="a slow request in flight")
        bodies = [(await self.get("/")).body for _ in range(4)]
        self.assertEqual(bodies, [b"fast"] * 4)
        self.assertEqual((await held).body, b"slow")

    async def test_hash_source_sticks(self) -> None:
        """
        --balance hash (source) on the --nodes pool: one client always
        reaches the same node.
        """
        backends = await start_backends(self, "a", "b", "c")
        self.balancer = await start_balancer(self, [b.url for b in backends], "--balance", "hash")
        bodies = {(await self.get("/")).body for _ in range(6)}
        self.assertEqual(len(bodies), 1)

    async def test_hash_header_key(self) -> None:
        """
        --hash-key header:X-User: each user sticks to one node, and users
        spread over nodes.
        """
        backends = await start_backends(self, "a", "b", "c")
        self.balancer = await start_balancer(
            self, [b.url for b in backends], "--balance", "hash", "--hash-key", "header:X-User"
        )
        seen = {}
        for user in range(12):
            key = b"user-%d" % user
            bodies = {(await self.get("/", x_user=key)).body for _ in range(2)}
            self.assertEqual(len(bodies), 1)
            seen[key] = bodies.pop()
        self.assertGreater(len(set(seen.values())), 1)


class PoolStateTests(RoutingCase):
    """
    Reload, the admin API and metrics with several pools.
    """

    async def test_reload_keeps_node_state(self) -> None:
        """
        A reload that changes routes and adds a pool keeps the state of
        nodes that stay (a drained node stays drained) and applies the new
        routes at once.
        """
        a, b, c = await start_backends(self, "a", "b", "c")
        await self.start(f"pools: {{pa: {{nodes: [{a.url}, {b.url}]}}}}\nroutes: [{{pool: pa}}]\n")
        service = self.balancer.service
        pa = service.pools.by_name["pa"]
        node_b = pa.nodes[1]
        pa.set_drained(node_b, True)
        with open(self.config_path, "w") as f:
            f.write(
                f"pools:\n  pa: {{nodes: [{a.url}, {b.url}], balance: leastconn}}\n"
                f"  pc: {{nodes: [{c.url}]}}\n"
                "routes: [{path_prefix: /c, pool: pc}, {pool: pa}]\n"
            )
        self.assertTrue(service.reload())
        self.assertIs(service.pools.by_name["pa"], pa)
        self.assertIs(pa.nodes[1], node_b)
        self.assertTrue(node_b.drained)
        self.assertEqual(pa.balance, "leastconn")
        self.assertEqual((await self.get("/c/x")).body, b"c")
        self.assertEqual({(await self.get("/x")).body for _ in range(3)}, {b"a"})
        self.assertIn("pc", service.checkers)

        # Removing a pool stops its checker and retires its nodes.
        with open(self.config_path, "w") as f:
            f.write(f"pools: {{pa: {{nodes: [{a.url}, {b.url}]}}}}\nroutes: [{{pool: pa}}]\n")
        self.assertTrue(service.reload())
        self.assertNotIn("pc", service.checkers)
        self.assertEqual(list(service.pools.by_name), ["pa"])
        self.assertEqual((await self.get("/c/x")).body, b"a")

    async def test_reload_error_names_pool(self) -> None:
        """
        A reload with a bad pool node is rejected with a line naming
        pools.NAME.nodes[i], and the running pools stay.
        """
        a, b = await start_backends(self, "a", "b")
        await self.start(f"pools: {{api: {{nodes: [{a.url}]}}}}\n")
        logs = LogCapture.install(self)
        with open(self.config_path, "w") as f:
            f.write(f"pools: {{api: {{nodes: [{a.url}, 'ftp://x']}}}}\n")
        self.assertFalse(self.balancer.service.reload())
        self.assertTrue(any("pools.api.nodes[1]:" in m for m in logs.messages()), logs.messages())
        self.assertEqual((await self.get("/")).body, b"a")

    async def test_status_metrics_and_drain(self) -> None:
        """
        /status lists every pool and its nodes, /metrics labels by pool, and
        POST /nodes/POOL/NODE/drain drains that pool's node only, even when
        the same URL is in another pool.
        """
        a, b = await start_backends(self, "a", "b")
        await self.start(
            f"pools:\n  one: {{nodes: [{a.url}, {b.url}]}}\n"
            f"  two: {{nodes: [{a.url}], balance: p2c}}\n"
            "routes: [{path_prefix: /two, pool: two}, {pool: one}]\n",
            "--admin",
            ADMIN,
        )
        admin = await admin_url(self.balancer)
        await self.get("/two/x")
        await self.get("/x")
        status = json.loads((await http_request(self, "GET", admin + "/status")).body)
        self.assertEqual([p["name"] for p in status["pools"]], ["one", "two"])
        self.assertEqual(status["pools"][1]["balance"], "p2c")
        self.assertEqual([n["pool"] for n in status["nodes"]], ["one", "one", "two"])
        reply = await http_request(self, "POST", admin + "/nodes/two/0/drain")
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(json.loads(reply.body)["pool"], "two")
        pools = self.balancer.service.pools.by_name
        self.assertTrue(pools["two"].nodes[0].drained)
        self.assertFalse(pools["one"].nodes[0].drained)
        self.assertEqual((await self.get("/two/y")).code, 503)
        # The URL is in both pools: without the pool it is ambiguous.
        from urllib.parse import quote

        reply = await http_request(self, "POST", admin + f"/nodes/{quote(a.url, safe='')}/drain")
        self.assertEqual(reply.code, 409, reply.body)
        reply = await http_request(self, "GET", admin + "/nodes/nope/0")
        self.assertEqual(reply.code, 404)
        listed = json.loads((await http_request(self, "GET", admin + "/nodes/one")).body)
        self.assertEqual([(n["pool"], n["id"]) for n in listed], [("one", 0), ("one", 1)])
        node = json.loads((await http_request(self, "GET", admin + "/nodes/two/0")).body)
        self.assertEqual((node["pool"], node["url"], node["drained"]), ("two", a.url, True))
        metrics = (await http_request(self, "GET", admin + "/metrics")).body.decode()
        self.assertIn(f'rrlb_node_in_rotation{{node="{a.url}",pool="two"}} 0.0', metrics)
        self.assertIn(f'rrlb_node_in_rotation{{node="{a.url}",pool="one"}} 1.0', metrics)
        self.assertIn(
            f'rrlb_requests_total{{method="GET",node="{a.url}",pool="two",status="2xx"}} 1.0',
            metrics,
        )
        self.assertIn(
            'rrlb_requests_total{method="GET",node="none",pool="two",status="5xx"} 1.0', metrics
        )


class PoolHealthTests(RoutingCase):
    """
    Each pool's nodes are checked with that pool's health settings.
    """

    async def test_own_health_settings(self) -> None:
        """
        A pool's health path and thresholds are its own; a pool without them
        inherits the top-level ones; one URL in two pools is probed by each
        with its own path.
        """
        a, b = await start_backends(self, "a", "b")
        await self.start(
            "health: {rise: 4}\n"
            "pools:\n"
            f"  api: {{nodes: [{a.url}, {b.url}], health: {{path: /healthz, fall: 1}}}}\n"
            f"  web: {{nodes: [{b.url}]}}\n"
            "routes: [{pool: web}]\n"
        )
        service = self.balancer.service
        api, web = service.pools.by_name["api"], service.pools.by_name["web"]
        self.assertEqual((api.rise, api.fall), (4, 1))
        self.assertEqual((web.rise, web.fall), (4, 3))
        await wait_until(
            lambda: all(n.last_check is not None for n in api.nodes + web.nodes),
            what="the first health checks of both pools",
        )
        self.assertEqual(set(a.probe_paths), {b"/healthz"})
        self.assertEqual(set(b.probe_paths), {b"/healthz", b"/health"})
        # fall: 1 in api: one failed probe takes a out of api.
        a.healthy = False
        await service.checkers["api"].probe(api.nodes[0])
        self.assertFalse(api.nodes[0].healthy)


class PoolUpstreamSettingsTests(RoutingCase):
    """
    timeout, node_host and max_idle_per_node per pool.
    """

    async def test_timeout_and_node_host(self) -> None:
        """
        A pool's short timeout gives 504 for its slow node while another
        pool with the top-level timeout waits for the same slowness; a
        pool's node_host sends the node's own Host.
        """
        quick, patient = await start_backends(self, "quick", "patient")
        quick.delay = patient.delay = 0.6
        await self.start(
            "timeout: 5\n"
            "pools:\n"
            f"  quick: {{nodes: [{quick.url}], timeout: 0.2, node_host: true,"
            " connect_timeout: 1.5}\n"
            f"  patient: {{nodes: [{patient.url}], max_idle_per_node: 0}}\n"
            "routes: [{path_prefix: /quick, pool: quick}, {pool: patient}]\n"
        )
        self.assertEqual((await self.get("/quick", host=b"site.example")).code, 504)
        self.assertEqual(
            quick.requests[-1].header(b"Host"), f"127.0.0.1:{quick.port_number}".encode()
        )
        reply = await self.get("/other", host=b"site.example")
        self.assertEqual((reply.code, reply.body), (200, b"patient"))
        self.assertEqual(patient.requests[-1].header(b"Host"), b"site.example")
        upstream = self.balancer.service.traffic.upstream
        self.assertEqual(upstream.idle_caps, {patient.url: 0})
        self.assertEqual(upstream.idle_count(patient.url), 0)
        pools = self.balancer.service.pools.by_name
        self.assertEqual(pools["quick"].nodes[0].connect_timeout, 1.5)
        self.assertEqual(pools["patient"].nodes[0].connect_timeout, 5.0)


class PoolDnsTests(RoutingCase):
    """
    DNS node entries (rrlb.discovery) inside a pool.
    """

    async def test_srv_entry_in_pool(self) -> None:
        """
        A pool's srv: entry gives that pool the nodes found, following the
        records as they change; other pools keep their own nodes.
        """
        one, two, web = await start_backends(self, "one", "two", "web")
        dns_server = start_server(self)
        auth = dns_server.authority
        auth.set(SRV_NAME, srv("one.rrlb.test", one.port_number, ttl=1))
        auth.set("one.rrlb.test", a("127.0.0.1", 1))
        auth.set("two.rrlb.test", a("127.0.0.1", 1))
        await self.start(
            f"resolvers: ['{dns_server.address}']\n"
            f"pools:\n  api: {{nodes: [{{srv: {SRV_NAME}}}], balance: leastconn}}\n"
            f"  web: {{nodes: [{web.url}]}}\n"
            "routes: [{path_prefix: /api, pool: api}, {pool: web}]\n"
        )
        pools = self.balancer.service.pools.by_name
        await wait_until(lambda: len(pools["api"].nodes) == 1, what="the api node from DNS")
        self.assertEqual((await self.get("/api/x")).body, b"one")
        auth.set(
            SRV_NAME,
            srv("one.rrlb.test", one.port_number, ttl=1),
            srv("two.rrlb.test", two.port_number, ttl=1),
        )
        await wait_until(lambda: len(pools["api"].nodes) == 2, what="a second api node")
        self.assertEqual({(await self.get("/api/x")).body for _ in range(4)}, {b"one", b"two"})
        self.assertEqual([n.url for n in pools["web"].nodes], [web.url])
        self.assertEqual((await self.get("/x")).body, b"web")
        self.assertEqual({n.pool_name for n in pools["api"].nodes}, {"api"})
        self.assertIn("api", self.balancer.service.checkers)

    def test_dns_entry_errors_name_the_pool(self) -> None:
        """
        A bad DNS entry in a pool names pools.NAME.nodes[i].
        """
        message = parse_error(
            "--config", self.write("pools: {api: {nodes: [{dns: api.internal}]}}\n")
        )
        self.assertIn("pools.api.nodes[0].port", message)
