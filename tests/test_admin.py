"""
Tests for the admin endpoint (L{rrlb.admin}) and the counters behind it
(L{rrlb.metrics}): /status, /metrics, the page and drain/enable, after real
requests through rrlb over loopback.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from typing import Any, Optional

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXClientEndpoint
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from rrlb import __version__
from rrlb.metrics import status_class
from rrlb.tap import makeService
from tests.support import (
    ADMIN,
    WAIT_TIMEOUT,
    LogCapture,
    RawClient,
    Reply,
    admin_url,
    balancer_options,
    closed_port_url,
    http_request,
    parse_error,
    raw_connect,
    raw_request,
    samples,
    split_response,
    start_backends,
    start_balancer,
    wait_until,
)

reactor: Any = _reactor


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


def answer(data: bytes) -> tuple[int, dict[bytes, bytes], Any]:
    """
    The status code, headers (lower-cased names) and JSON body of one raw
    admin response.
    """
    status, headers, body = split_response(data)
    code = int(status.split(b" ")[1])
    named = {n.lower(): v for n, v in headers}
    is_json = named.get(b"content-type") == b"application/json"
    return code, named, json.loads(body) if is_json else body


class AccessCase(AdminCase):
    """
    Raw requests to the admin endpoint, with any Host or none.
    """

    async def raw(self, head: bytes) -> tuple[int, dict[bytes, bytes], Any]:
        """
        Send C{head} (a request head without its final blank line; the
        connection is closed after the answer) to the admin port.
        """
        port = int(self.admin.rsplit(":", 1)[1])
        data = await raw_request(self, port, head + b"\r\nConnection: close\r\n\r\n")
        return answer(data)

    async def get_as(self, host: bytes, path: bytes = b"/status", *lines: bytes) -> int:
        head = b"GET " + path + b" HTTP/1.1\r\nHost: " + host
        return (await self.raw(b"\r\n".join((head,) + lines)))[0]


class HostTests(AccessCase):
    """
    DNS rebinding: the admin endpoint answers only to the names it is
    reached by (localhost, IP literals, admin_hosts); any other Host gets
    421 and nothing happens.
    """

    async def test_rebinding_drain_refused(self) -> None:
        """
        A page on attacker.example whose name was rebound to 127.0.0.1
        sends Host and Origin of its own site, which agree: its drain gets
        421 with a JSON error, and the node stays in rotation. Reading
        /status (client addresses) is refused the same way.
        """
        await self.start()
        port = self.admin.rsplit(":", 1)[1].encode()
        code, headers, body = await self.raw(
            b"POST /nodes/0/drain HTTP/1.1\r\nHost: attacker.example:"
            + port
            + b"\r\nOrigin: http://attacker.example:"
            + port
            + b"\r\nSec-Fetch-Site: same-origin\r\nContent-Length: 0"
        )
        self.assertEqual(code, 421)
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertEqual(headers[b"cache-control"], b"no-store")
        self.assertIn("admin_hosts", body["error"])
        self.assertFalse(self.pool.nodes[0].drained)
        for path in (b"/status", b"/metrics", b"/", b"/nodes/0"):
            self.assertEqual(await self.get_as(b"attacker.example:" + port, path), 421, path)
        self.assertEqual((await self.raw(b"GET /status HTTP/1.1\r\nHost: x"))[0], 421)

    async def test_own_names(self) -> None:
        """
        localhost and IP literals, with a port or without (any port: an SSH
        tunnel's local one), in any case, with a trailing dot; and a request
        without Host (HTTP/1.0 tools, never a browser) are answered.
        """
        await self.start()
        port = self.admin.rsplit(":", 1)[1].encode()
        for host in (
            b"127.0.0.1:" + port,
            b"127.0.0.1",
            b"localhost",
            b"localhost:9000",
            b"LocalHost:" + port,
            b"localhost.",
            b"[::1]:" + port,
            b"[::ffff:127.0.0.1]",
            b"10.1.2.3:8081",
        ):
            self.assertEqual(await self.get_as(host), 200, host)
        code, _, body = answer(await raw_request(self, int(port), b"GET /status HTTP/1.0\r\n\r\n"))
        self.assertEqual(code, 200)
        self.assertIn("nodes", body)
        reply = await self.post("/nodes/0/drain")  # treq/Agent: Host 127.0.0.1:PORT
        self.assertEqual(reply.code, 200)

    async def test_other_names_refused(self) -> None:
        """
        Every other name, lookalikes of the allowed ones, malformed values
        and two Host headers get 421.
        """
        await self.start()
        for host in (
            b"localhost.attacker.example",
            b"127.0.0.1.nip.io",
            b"attacker-localhost",
            b"localhost:",
            b"localhost:http",
            b"localhost..",
            b"[::1",
            b"[::1]x",
            b"::1",
            b"",
            b"localhost\xff",
        ):
            self.assertEqual(await self.get_as(host), 421, host)
        self.assertEqual(
            await self.get_as(b"localhost", b"/status", b"Host: attacker.example"), 421
        )

    async def test_admin_hosts(self) -> None:
        """
        --admin-hosts adds names (any case, a trailing dot ignored); others
        are still refused.
        """
        await self.start("--admin-hosts", "admin.internal, Ops.Example.")
        for host in (b"admin.internal:8081", b"ADMIN.internal", b"ops.example", b"localhost"):
            self.assertEqual(await self.get_as(host), 200, host)
        self.assertEqual(await self.get_as(b"other.internal"), 421)
        self.assertEqual(await self.get_as(b"admin.internal.attacker.example"), 421)

    async def test_admin_hosts_reload(self) -> None:
        """
        admin_hosts: in YAML, applied again on reload.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("admin_hosts: [a.internal]\n")
        await self.start("--config", path)
        self.assertEqual(await self.get_as(b"a.internal"), 200)
        self.assertEqual(await self.get_as(b"b.internal"), 421)
        with open(path, "w") as f:
            f.write("admin_hosts: [b.internal]\n")
        self.assertTrue(self.balancer.service.reload())
        self.assertEqual(await self.get_as(b"a.internal"), 421)
        self.assertEqual(await self.get_as(b"b.internal"), 200)

    def test_admin_hosts_values(self) -> None:
        """
        --admin-hosts and admin_hosts: take names only; anything else is
        refused with a line naming the setting.
        """
        nodes = ("--nodes", "http://127.0.0.1:9")
        self.assertEqual(
            balancer_options(*nodes, "--admin-hosts", "A.example,b_c.internal").config.admin_hosts,
            ("a.example", "b_c.internal"),
        )
        self.assertEqual(balancer_options(*nodes).config.admin_hosts, ())
        for bad in ("a.example:8081", "a b", "http://a.example", "", "a..b"):
            message = parse_error(*nodes, "--admin-hosts", bad)
            self.assertIn("--admin-hosts: ", message)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("nodes: [http://127.0.0.1:9]\nadmin_hosts: 5\n")
        self.assertTrue(parse_error("--config", path).startswith("admin_hosts"))


class UnixHostTests(unittest.TestCase):
    """
    On a unix: admin socket the same Host rule holds: curl --unix-socket
    and nginx's unix: upstreams send localhost.
    """

    async def test_unix_socket(self) -> None:
        """
        localhost, an admin_hosts name and no Host are answered; another
        name gets 421.
        """
        directory = tempfile.mkdtemp(prefix="rrlb-admin-")  # short: sun_path is 108 bytes
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "admin.sock")
        backends = await start_backends(self, "a")
        balancer = await start_balancer(
            self, [backends[0].url], "--admin", f"unix:{path}", "--admin-hosts", "ops.internal"
        )
        self.assertIsNotNone(balancer.service.admin_listener)
        await wait_until(lambda: os.path.exists(path), what="the admin socket")

        async def ask(head: bytes) -> int:
            endpoint = UNIXClientEndpoint(reactor, path, timeout=WAIT_TIMEOUT)
            client: RawClient = await endpoint.connect(Factory.forProtocol(RawClient))  # type: ignore[assignment]
            self.addCleanup(lambda: defer.Deferred.fromCoroutine(client.close()))
            client.send(head + b"\r\n\r\n")
            return answer(await client.closed)[0]

        close = b"\r\nConnection: close"
        self.assertEqual(await ask(b"GET /status HTTP/1.1\r\nHost: localhost" + close), 200)
        self.assertEqual(await ask(b"GET /status HTTP/1.1\r\nHost: ops.internal" + close), 200)
        self.assertEqual(await ask(b"GET /status HTTP/1.0"), 200)
        self.assertEqual(await ask(b"GET /status HTTP/1.1\r\nHost: attacker.example" + close), 421)
        code = await ask(
            b"POST /nodes/0/drain HTTP/1.1\r\nHost: attacker.example\r\n"
            b"Origin: http://attacker.example\r\nContent-Length: 0" + close
        )
        self.assertEqual(code, 421)
        self.assertFalse(balancer.service.pool.nodes[0].drained)


TOKEN = b"0123456789abcdef0123456789abcdef"


class TokenTests(AccessCase):
    """
    admin_token_file: every admin request needs Authorization: Bearer with
    the token in the file, read at start-up and on reload.
    """

    async def start_with_token(self, *args: str, token: bytes = TOKEN) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(token + b"\n")
        await self.start("--admin-token-file", path, *args)
        return path

    async def test_required_everywhere(self) -> None:
        """
        Without the header every path, the page and /metrics included,
        gets 401 with WWW-Authenticate: Bearer and a JSON error, and a
        drain does nothing; with it, they are answered.
        """
        await self.start_with_token()
        auth = b"Authorization: Bearer " + TOKEN
        for path in (b"/", b"/status.css", b"/status", b"/metrics", b"/nodes", b"/nodes/0"):
            code, headers, body = await self.raw(b"GET " + path + b" HTTP/1.1\r\nHost: localhost")
            self.assertEqual(code, 401, path)
            self.assertEqual(headers[b"www-authenticate"], b'Bearer realm="rrlb admin"', path)
            self.assertIn("admin_token_file", body["error"])
            self.assertEqual(await self.get_as(b"localhost", path, auth), 200, path)
        self.assertEqual(await self.get_as(b"localhost", b"/nowhere", auth), 404)
        drain = b"POST /nodes/0/drain HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0"
        self.assertEqual((await self.raw(drain))[0], 401)
        self.assertFalse(self.pool.nodes[0].drained)
        self.assertEqual((await self.raw(drain + b"\r\n" + auth))[0], 200)
        self.assertTrue(self.pool.nodes[0].drained)
        # Prometheus's authorization: {credentials_file: ...} and curl
        # --oauth2-bearer send this; the scheme is case-insensitive.
        reply = await self.get("/metrics", {b"Authorization": [b"bearer " + TOKEN]})
        self.assertEqual(reply.code, 200)
        self.assertIn(b"rrlb_info", reply.body)

    async def test_wrong_credentials(self) -> None:
        """
        A wrong token, the token as a Basic password, a prefix or an
        extension of it, an empty one or two headers get 401 with
        error="invalid_token".
        """
        await self.start_with_token()
        basic = b"Basic " + base64.b64encode(b"admin:" + TOKEN)
        for value in (
            b"Bearer " + TOKEN[:-1],
            b"Bearer " + TOKEN + b"0",
            b"Bearer " + TOKEN.upper(),
            b"Bearer",
            b"Bearer ",
            basic,
            TOKEN,
        ):
            code, headers, _ = await self.raw(
                b"GET /status HTTP/1.1\r\nHost: localhost\r\nAuthorization: " + value
            )
            self.assertEqual(code, 401, value)
            self.assertIn(b'error="invalid_token"', headers[b"www-authenticate"], value)
        good = b"Authorization: Bearer " + TOKEN
        self.assertEqual(await self.get_as(b"localhost", b"/status", good, good), 401)

    async def test_host_checked_first(self) -> None:
        """
        A rebinding request that somehow holds the token still gets 421.
        """
        await self.start_with_token()
        auth = b"Authorization: Bearer " + TOKEN
        self.assertEqual(await self.get_as(b"attacker.example", b"/status", auth), 421)

    async def test_reload(self) -> None:
        """
        A reload reads the file again: the new token works and the old one
        no longer does. An empty or missing file is a rejected reload, one
        line naming the setting, and the running token stays.
        """
        path = await self.start_with_token()
        logs = LogCapture.install(self)
        service = self.balancer.service
        new = b"n3w-t0ken.with~all+the/chars=="
        with open(path, "wb") as f:
            f.write(new)
        self.assertTrue(service.reload())
        self.assertEqual(
            await self.get_as(b"localhost", b"/status", b"Authorization: Bearer " + TOKEN), 401
        )
        self.assertEqual(
            await self.get_as(b"localhost", b"/status", b"Authorization: Bearer " + new), 200
        )

        for broken in ("empty", "missing"):
            if broken == "empty":
                open(path, "wb").close()
            else:
                os.remove(path)
            self.assertFalse(service.reload())
            (line,) = [m for m in logs.messages() if "reload rejected" in m]
            self.assertIn("--admin-token-file: ", line)
            self.assertIn("is empty" if broken == "empty" else "cannot read", line)
            self.assertEqual(
                await self.get_as(b"localhost", b"/status", b"Authorization: Bearer " + new), 200
            )
            logs.events.clear()

    async def test_not_printed(self) -> None:
        """
        The token is not in the configuration's repr (a log line or a
        traceback that shows it), and it stays in the main process.
        """
        await self.start_with_token()
        config = self.balancer.service.config
        self.assertEqual(config.admin_token, TOKEN)
        self.assertNotIn(TOKEN.decode(), repr(config))

    def test_bad_file_at_start(self) -> None:
        """
        A missing or empty file, or one holding something other than one
        token, stops start-up with one line naming the setting.
        """
        nodes = ("--nodes", "http://127.0.0.1:9", "--admin", ADMIN)
        missing = self.mktemp()
        message = parse_error(*nodes, "--admin-token-file", missing)
        self.assertEqual(
            message, f"--admin-token-file: cannot read {missing!r}: No such file or directory"
        )
        for content, words in ((b"", "is empty"), (b" \n\n", "is empty"), (b"a b\n", "one token")):
            path = self.mktemp()
            with open(path, "wb") as f:
                f.write(content)
            message = parse_error(*nodes, "--admin-token-file", path)
            self.assertTrue(message.startswith("--admin-token-file: "), message)
            self.assertIn(words, message)
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(f"nodes: [http://127.0.0.1:9]\nadmin_token_file: {missing}\n")
        self.assertTrue(parse_error("--config", config).startswith("admin_token_file: cannot read"))
