"""
Tests for the admin endpoint (L{rrlb.admin}) and the counters behind it
(L{rrlb.metrics}): /status, /metrics, the page and drain/enable, after real
requests through rrlb over loopback.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from rrlb import __version__
from rrlb.metrics import status_class
from rrlb.tap import makeService
from tests.helpers import (
    Balancer,
    Reply,
    balancer_options,
    closed_port_url,
    http_request,
    parse_error,
    raw_connect,
    start_backends,
    start_balancer,
    wait_until,
)

ADMIN = "tcp:0:interface=127.0.0.1"
reactor: Any = _reactor


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


class AdminCase(unittest.TestCase):
    """
    Two backends, a and b, behind rrlb with the admin endpoint on.
    """

    async def start(self, *args: str, names: tuple[str, ...] = ("a", "b")) -> None:
        self.backends = await start_backends(self, *names)
        self.balancer = await start_balancer(
            self,
            [b.url for b in self.backends],
            "--health-path",
            "/health",
            "--admin",
            ADMIN,
            *args,
        )
        self.admin = await admin_url(self.balancer)
        self.pool = self.balancer.service.pool

    async def get(self, path: str, headers: Optional[dict[bytes, list[bytes]]] = None) -> Reply:
        return await http_request(self, "GET", self.admin + path, headers)

    async def post(self, path: str, headers: Optional[dict[bytes, list[bytes]]] = None) -> Reply:
        return await http_request(self, "POST", self.admin + path, headers)

    async def status(self) -> dict[str, Any]:
        reply = await self.get("/status")
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.header(b"Content-Type"), b"application/json")
        result: dict[str, Any] = json.loads(reply.body)
        return result

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        reply = await self.get("/metrics")
        self.assertEqual(reply.code, 200)
        self.assertTrue(reply.header(b"Content-Type").startswith(b"text/plain"))  # type: ignore[union-attr]
        return samples(reply.body.decode("utf-8"))

    async def proxied(self, method: str, path: str, **kw: Any) -> Reply:
        return await http_request(self, method, self.balancer.url + path, **kw)


class StatusTests(AdminCase):
    """
    GET /status.
    """

    async def test_nodes_and_process(self) -> None:
        """
        /status lists every node with its health and counters, and the
        process's uptime, version and connections.
        """
        await self.start()
        await wait_until(
            lambda: all(n.last_check is not None for n in self.pool.nodes),
            what="the first health checks",
        )
        for _ in range(4):
            self.assertEqual((await self.proxied("GET", "/x")).code, 200)
        status = await self.status()
        process = status["process"]
        self.assertEqual(process["version"], __version__)
        self.assertGreaterEqual(process["uptime"], 0)
        self.assertIsInstance(process["connections"], int)
        self.assertIsInstance(process["upstream_connections"], int)
        self.assertEqual(process["requests"], 4)
        self.assertEqual(process["nodes"], {"up": 2, "down": 0, "draining": 0})
        nodes = status["nodes"]
        self.assertEqual([n["url"] for n in nodes], [b.url for b in self.backends])
        for i, node in enumerate(nodes):
            self.assertEqual(node["id"], i)
            self.assertEqual(node["state"], "up")
            self.assertTrue(node["healthy"])
            self.assertEqual(node["consecutive_successes"], 1)
            self.assertEqual(node["consecutive_failures"], 0)
            self.assertIsInstance(node["last_check"], float)
            self.assertIsInstance(node["last_latency"], float)
            self.assertIsNone(node["last_error"])
            self.assertEqual(node["in_flight"], 0)
            self.assertEqual(node["requests"], 2)
            self.assertEqual(node["errors"], 0)

    async def test_down_node(self) -> None:
        """
        A node that fails its checks shows as down, with its failures and
        last error.
        """
        await self.start("--fall", "1")
        self.backends[1].healthy = False
        node = self.pool.nodes[1]
        await wait_until(lambda: not node.healthy, what="b to go down")
        nodes = (await self.status())["nodes"]
        self.assertEqual(nodes[1]["state"], "down")
        self.assertFalse(nodes[1]["healthy"])
        self.assertEqual(nodes[1]["consecutive_failures"], 1)
        self.assertEqual(nodes[1]["last_error"], "HTTP 503")

    async def test_in_flight_and_connections(self) -> None:
        """
        A request waiting on a node shows in its in-flight count and the
        client's connection in the process's connections.
        """
        await self.start()
        self.backends[0].delay = 5.0
        client = await raw_connect(self, self.balancer.port)
        client.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        node = self.pool.nodes[0]
        await wait_until(lambda: node.in_flight == 1, what="the request to reach a")
        status = await self.status()
        self.assertEqual(status["nodes"][0]["in_flight"], 1)
        self.assertGreaterEqual(status["process"]["connections"], 1)
        metrics = await self.metrics()
        self.assertEqual(
            metrics[
                ("rrlb_in_flight_requests", (("node", self.backends[0].url), ("pool", "default")))
            ],
            1,
        )
        await client.close()
        await wait_until(lambda: node.in_flight == 0, what="the request to end")


class MetricsTests(AdminCase):
    """
    GET /metrics.
    """

    async def test_only_rrlb_names(self) -> None:
        """
        Every metric exposed starts with rrlb_ (no default process metrics).
        """
        await self.start()
        reply = await self.get("/metrics")
        families = list(text_string_to_metric_families(reply.body.decode("utf-8")))
        names = {f.name for f in families}
        self.assertTrue(names)
        self.assertEqual({n for n in names if not n.startswith("rrlb_")}, set())
        for expected in (
            "rrlb_requests",
            "rrlb_upstream_latency_seconds",
            "rrlb_in_flight_requests",
            "rrlb_node_healthy",
            "rrlb_node_state",
            "rrlb_health_checks",
            "rrlb_retries",
            "rrlb_proxy_errors",
            "rrlb_client_connections",
            "rrlb_uptime_seconds",
            "rrlb_info",
        ):
            self.assertIn(expected, names)

    async def test_request_counts(self) -> None:
        """
        Requests are counted by node, method class and status class, and
        their upstream latency lands in the node's histogram.
        """
        await self.start()
        a, b = self.backends
        b.status = 404
        for _ in range(3):
            await self.proxied("GET", "/")
            await self.proxied("POST", "/", body=b"x")
        await self.proxied("PROPFIND", "/")
        m = await self.metrics()

        def requests(node: str, method: str, status: str) -> float:
            key = (
                "rrlb_requests_total",
                (("method", method), ("node", node), ("pool", "default"), ("status", status)),
            )
            return m.get(key, 0)

        # Rotation a, b, a, b, ...: GETs go to a, POSTs to b, PROPFIND to a.
        self.assertEqual(requests(a.url, "GET", "2xx"), 3)
        self.assertEqual(requests(b.url, "POST", "4xx"), 3)
        self.assertEqual(requests(a.url, "other", "2xx"), 1)
        self.assertEqual(
            m[("rrlb_upstream_latency_seconds_count", (("node", a.url), ("pool", "default")))], 4
        )
        self.assertEqual(
            m[("rrlb_upstream_latency_seconds_count", (("node", b.url), ("pool", "default")))], 3
        )
        self.assertEqual(
            m[
                (
                    "rrlb_upstream_latency_seconds_bucket",
                    (("le", "+Inf"), ("node", a.url), ("pool", "default")),
                )
            ],
            4,
        )
        self.assertGreater(
            m[("rrlb_upstream_latency_seconds_sum", (("node", a.url), ("pool", "default")))], 0
        )
        self.assertEqual(m[("rrlb_node_healthy", (("node", a.url), ("pool", "default")))], 1)
        self.assertEqual(m[("rrlb_in_flight_requests", (("node", b.url), ("pool", "default")))], 0)
        self.assertEqual(
            m[("rrlb_node_state", (("node", a.url), ("pool", "default"), ("state", "up")))], 1
        )
        self.assertEqual(
            m[("rrlb_node_state", (("node", a.url), ("pool", "default"), ("state", "down")))], 0
        )
        self.assertEqual(
            m[
                (
                    "rrlb_health_checks_total",
                    (("node", a.url), ("pool", "default"), ("result", "pass")),
                )
            ],
            1,
        )
        self.assertEqual(m[("rrlb_info", (("version", __version__),))], 1)

    async def test_proxy_errors_and_retries(self) -> None:
        """
        rrlb's own 502 and 503 are counted by code; a retry on the next
        node is counted; 504 is there from the start.
        """
        dead = await closed_port_url()
        backends = await start_backends(self, "a")
        self.backends = backends
        self.balancer = await start_balancer(
            self,
            [dead, backends[0].url],
            "--health-path",
            "/health",
            "--health-interval",
            "60",
            "--fall",
            "100",
            "--admin",
            ADMIN,
        )
        self.admin = await admin_url(self.balancer)
        # The health checks of the dead node fail on their own; wait for them
        # so they do not race the counts below.
        await wait_until(
            lambda: all(n.last_check is not None for n in self.balancer.service.pool.nodes),
            what="the first health checks",
        )
        # GET to the dead node: retried on a, 200.
        self.assertEqual((await self.proxied("GET", "/")).code, 200)
        # POST to the dead node (not idempotent, so not retried): 502.
        codes = [(await self.proxied("POST", "/", body=b"x")).code for _ in range(2)]
        self.assertIn(502, codes)
        pool = self.balancer.service.pool
        for node in pool.nodes:
            pool.set_drained(node, True)
        self.assertEqual((await self.proxied("GET", "/")).code, 503)
        m = await self.metrics()
        self.assertEqual(m[("rrlb_retries_total", ())], 1)
        self.assertEqual(m[("rrlb_proxy_errors_total", (("code", "502"),))], 1)
        self.assertEqual(m[("rrlb_proxy_errors_total", (("code", "503"),))], 1)
        self.assertEqual(m[("rrlb_proxy_errors_total", (("code", "504"),))], 0)
        key = (
            "rrlb_requests_total",
            (("method", "GET"), ("node", "none"), ("pool", "default"), ("status", "5xx")),
        )
        self.assertEqual(m[key], 1)
        self.assertEqual(m[("rrlb_node_errors_total", (("node", dead), ("pool", "default")))], 2)
        self.assertEqual(
            m[
                (
                    "rrlb_health_checks_total",
                    (("node", dead), ("pool", "default"), ("result", "fail")),
                )
            ],
            1,
        )

    async def test_gateway_timeout_counted(self) -> None:
        """
        A node too slow to answer gives rrlb's 504, counted as such.
        """
        await self.start("--timeout", "0.2", names=("slow",))
        self.backends[0].delay = 5.0
        self.assertEqual((await self.proxied("GET", "/")).code, 504)
        m = await self.metrics()
        self.assertEqual(m[("rrlb_proxy_errors_total", (("code", "504"),))], 1)

    def test_status_class(self) -> None:
        """
        Codes map to their class; anything outside 100-599 is 5xx.
        """
        self.assertEqual(
            [status_class(c) for c in (101, 200, 304, 499, 503, 999)],
            ["1xx", "2xx", "3xx", "4xx", "5xx", "5xx"],
        )


class DrainTests(AdminCase):
    """
    POST /nodes/<id>/drain and /enable.
    """

    async def test_drain_and_enable(self) -> None:
        """
        Draining a node by id takes it out of rotation, shows it as draining
        in /status, /metrics and the page; enabling puts it back.
        """
        await self.start()
        a, b = self.backends
        reply = await self.post("/nodes/0/drain")
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.header(b"Content-Type"), b"application/json")
        node = json.loads(reply.body)
        self.assertEqual((node["id"], node["url"], node["state"]), (0, a.url, "draining"))
        self.assertTrue(node["drained"])

        bodies = [(await self.proxied("GET", "/")).body for _ in range(4)]
        self.assertEqual(bodies, [b"b"] * 4)
        status = await self.status()
        self.assertEqual(
            [(n["state"], n["drained"]) for n in status["nodes"]],
            [("draining", True), ("up", False)],
        )
        m = await self.metrics()
        self.assertEqual(
            m[("rrlb_node_state", (("node", a.url), ("pool", "default"), ("state", "draining")))], 1
        )
        self.assertEqual(m[("rrlb_node_in_rotation", (("node", a.url), ("pool", "default")))], 0)
        page = (await self.get("/")).body.decode("utf-8")
        self.assertIn('data-node-id="0" data-state="draining"', page)
        self.assertIn("DRAINING", page)

        reply = await self.post("/nodes/0/enable")
        self.assertEqual(reply.code, 200)
        self.assertEqual(json.loads(reply.body)["state"], "up")
        bodies = [(await self.proxied("GET", "/")).body for _ in range(4)]
        self.assertEqual(sorted(bodies), [b"a", b"a", b"b", b"b"])
        m = await self.metrics()
        self.assertEqual(
            m[("rrlb_node_state", (("node", a.url), ("pool", "default"), ("state", "up")))], 1
        )

    async def test_in_flight_finishes(self) -> None:
        """
        A request in flight on a node that is drained still completes.
        """
        await self.start()
        a = self.backends[0]
        a.delay = 0.3
        node = self.pool.nodes[0]
        pending = defer.Deferred.fromCoroutine(self.proxied("GET", "/slow"))
        await wait_until(lambda: node.in_flight == 1, what="the request to reach a")
        self.assertEqual((await self.post("/nodes/0/drain")).code, 200)
        reply = await pending
        self.assertEqual((reply.code, reply.body), (200, b"a"))
        self.assertEqual(node.in_flight, 0)

    async def test_ids(self) -> None:
        """
        A node is found by its position, its name (host:port) or its URL.
        """
        await self.start()
        a, b = self.backends
        name = f"127.0.0.1:{b.port_number}"
        reply = await self.post(f"/nodes/{name}/drain")
        self.assertEqual(json.loads(reply.body)["url"], b.url)
        encoded = a.url.replace(":", "%3A").replace("/", "%2F")
        reply = await self.post(f"/nodes/{encoded}/drain")
        self.assertEqual(json.loads(reply.body)["url"], a.url)
        self.assertEqual([n.drained for n in self.pool.nodes], [True, True])
        reply = await self.get("/nodes/1")
        self.assertEqual(json.loads(reply.body)["name"], name)

    async def test_errors(self) -> None:
        """
        Unknown nodes and paths are 404, a wrong method 405 with Allow, all
        with a JSON error; nothing changes.
        """
        await self.start()
        for path, method, code in [
            ("/nodes/2/drain", "POST", 404),
            ("/nodes/nope/enable", "POST", 404),
            ("/nodes/0/reboot", "POST", 404),
            ("/nowhere", "GET", 404),
            ("/nodes/0/drain", "GET", 405),
            ("/status", "POST", 405),
            ("/metrics", "DELETE", 405),
        ]:
            reply = await http_request(self, method, self.admin + path)
            self.assertEqual(reply.code, code, path)
            self.assertEqual(reply.header(b"Content-Type"), b"application/json", path)
            self.assertIn("error", json.loads(reply.body), path)
            if code == 405:
                self.assertIsNotNone(reply.header(b"Allow"), path)
        self.assertEqual([n.drained for n in self.pool.nodes], [False, False])

    async def test_cross_site_refused(self) -> None:
        """
        A browser request from another site's page cannot drain a node.
        """
        await self.start()
        reply = await self.post("/nodes/0/drain", {b"Origin": [b"http://evil.example"]})
        self.assertEqual(reply.code, 403)
        reply = await self.post("/nodes/0/drain", {b"Sec-Fetch-Site": [b"cross-site"]})
        self.assertEqual(reply.code, 403)
        self.assertFalse(self.pool.nodes[0].drained)
        same = self.admin.split("//", 1)[1]
        origin = {b"Origin": [self.admin.encode("ascii")], b"Host": [same.encode("ascii")]}
        self.assertEqual((await self.post("/nodes/0/drain", origin)).code, 200)

    async def test_form_post_redirects(self) -> None:
        """
        The page's forms (a browser without script) get sent back to the
        page after the change.
        """
        await self.start()
        reply = await self.post("/nodes/1/drain", {b"Accept": [b"text/html,*/*"]})
        self.assertEqual(reply.code, 303)
        self.assertEqual(reply.header(b"Location"), b"/")
        self.assertTrue(self.pool.nodes[1].drained)


class PageTests(AdminCase):
    """
    GET / and its stylesheet (in a real browser: L{tests.test_page}).
    """

    async def test_page(self) -> None:
        """
        The page is HTML with one row per node, its state and buttons, and
        a stylesheet served by rrlb; nothing external.
        """
        await self.start()
        self.pool.set_drained(self.pool.nodes[1], True)
        reply = await self.get("/")
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.header(b"Content-Type"), b"text/html; charset=utf-8")
        self.assertIn(b"default-src 'none'", reply.header(b"Content-Security-Policy") or b"")
        page = reply.body.decode("utf-8")
        self.assertEqual(page.count('<tr class="node '), 2)
        self.assertIn(f'<span class="full">{self.backends[0].url}</span>', page)
        self.assertIn('action="/nodes/default/1/enable"', page)
        self.assertIn('action="/nodes/default/0/drain"', page)
        self.assertNotIn("{{", page)
        self.assertNotIn(
            "http://", page.replace(self.backends[0].url, "").replace(self.backends[1].url, "")
        )
        css = await self.get("/status.css")
        self.assertEqual(css.code, 200)
        self.assertEqual(css.header(b"Content-Type"), b"text/css; charset=utf-8")
        self.assertIn(b".state.draining", css.body)

    async def test_escaped(self) -> None:
        """
        Error text from a node is escaped in the page.
        """
        await self.start("--health-interval", "3600")
        # Let the first probe round land first, or it clears the error below.
        await wait_until(lambda: all(n.last_check for n in self.pool.nodes))
        self.pool.nodes[0].last_error = "<script>alert(1)</script>"
        page = (await self.get("/")).body.decode("utf-8")
        self.assertNotIn("<script>alert", page)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", page)


class AdminOptionsTests(unittest.TestCase):
    """
    --admin itself.
    """

    def test_bad_endpoint(self) -> None:
        """
        A bad endpoint description is refused with a line naming --admin.
        """
        message = parse_error("--nodes", "http://127.0.0.1:9", "--admin", "carrier-pigeon:1")
        self.assertTrue(message.startswith("--admin: bad endpoint description"), message)

    async def test_off_by_default(self) -> None:
        """
        Without --admin there is no admin listener.
        """
        backends = await start_backends(self, "a")
        balancer = await start_balancer(self, [backends[0].url], "--health-path", "/health")
        self.assertIsNone(balancer.service.admin_listener)
        self.assertEqual(len(balancer.service.traffic.listeners), 1)

    async def test_port_in_use(self) -> None:
        """
        An admin port that cannot be bound stops start-up with one line
        naming --admin, not a traceback.
        """
        taken = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
        self.addCleanup(taken.stopListening)
        description = f"tcp:{taken.getHost().port}:interface=127.0.0.1"
        service = makeService(
            balancer_options("--nodes", "http://127.0.0.1:9", "--admin", description)
        )
        with self.assertRaises(SystemExit) as caught:
            service.privilegedStartService()
        self.assertTrue(str(caught.exception.code).startswith("--admin: cannot listen on"))
        for listener in service.traffic.listeners:
            await listener.stopService()
