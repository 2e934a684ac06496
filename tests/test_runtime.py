"""
The admin endpoint's runtime API (L{rrlb.runtime}) over real loopback
sockets: the running configuration read and replaced, nodes added, removed
and changed, with traffic following; bad bodies refused with nothing
changed; and in a real process, a concurrent PUT and SIGHUP, and every
worker of C{--workers 2} applying a change.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any, Optional

import yaml
from twisted.internet import defer
from twisted.trial import unittest

from rrlb.config import build_config
from rrlb.configdump import document
from tests.support import (
    ADMIN,
    LOOPBACK,
    Backend,
    Balancer,
    HTTPClient,
    LogCapture,
    Reply,
    admin_url,
    closed_port_url,
    raw_request,
    samples,
    start_backends,
    start_balancer,
    start_daemon,
    wait_until,
)


def write_config(path: str, nodes: list[str], extra: str = "") -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("nodes:\n" + "".join(f"  - {url}\n" for url in nodes))
        f.write("health: {path: /health}\n" + extra)


class RuntimeCase(unittest.TestCase):
    """
    rrlb in this process with an admin endpoint, and a client for both.
    """

    async def start(self, nodes: list[Backend], *args: str) -> Balancer:
        self.file = os.path.abspath(self.mktemp())
        write_config(self.file, [n.url for n in nodes])
        self.balancer = await start_balancer(
            self, (), "--config", self.file, "--admin", ADMIN, *args
        )
        self.admin = await admin_url(self.balancer)
        self.client = HTTPClient()
        self.addCleanup(self.client.close)
        return self.balancer

    async def call(
        self,
        method: str,
        path: str,
        body: Optional[Any] = None,
        kind: bytes = b"application/json",
        headers: Optional[dict[bytes, list[bytes]]] = None,
    ) -> tuple[int, Any]:
        """
        An admin API call; its status and JSON answer.
        """
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        all_headers = {b"Content-Type": [kind], **(headers or {})}
        reply = await self.client.request(method, self.admin + path, all_headers, data)
        self.assertEqual(reply.header(b"Content-Type"), b"application/json", reply.body)
        return reply.code, json.loads(reply.body)

    async def bodies(self, count: int, path: str = "/") -> list[bytes]:
        replies = [await self.client.request("GET", self.balancer.url + path) for _ in range(count)]
        return [r.body for r in replies]

    def changes(self) -> dict[str, int]:
        return dict(self.balancer.service.config_changes)


class ConfigTests(RuntimeCase):
    """
    C{GET /config} and C{PUT /config}.
    """

    async def test_get_config(self) -> None:
        """
        The running configuration, as JSON in the layout of a config file,
        without the admin token.
        """
        (a,) = await start_backends(self, "a")
        token = os.path.abspath(self.mktemp())
        with open(token, "w") as f:
            f.write("config-token-0123456789\n")
        await self.start([a], "--admin-token-file", token)
        auth = {b"Authorization": [b"Bearer config-token-0123456789"]}
        code, value = await self.call("GET", "/config", headers=auth)
        self.assertEqual(code, 200)
        self.assertEqual(value, json.loads(json.dumps(document(self.balancer.service.config))))
        self.assertEqual(value["nodes"], [{"url": a.url, "weight": 1}])
        self.assertNotIn("config-token", json.dumps(value))

    async def test_put_then_sighup(self) -> None:
        """
        A YAML body is applied as a reload from a file holding it (flags
        still win): traffic follows, the change is logged with the peer and
        counted; the next reload from the file undoes it.
        """
        a, b = await start_backends(self, "a", "b")
        await self.start([a])
        logs = LogCapture.install(self)
        body = yaml.safe_dump({"nodes": [b.url], "retries": 1}).encode()
        code, value = await self.call("PUT", "/config", body, b"application/yaml")
        self.assertEqual(
            (code, value), (200, {"applied": True, "summary": "1 pools, 1 nodes, 0 routes"})
        )
        self.assertEqual(await self.bodies(2), [b"b", b"b"])
        config = self.balancer.service.config
        self.assertEqual((config.retries, config.health.path), (1, "/health"))
        (line,) = logs.matching(source="api")
        self.assertTrue(line["peer"].startswith(f"{LOOPBACK}:"), line)
        self.assertEqual(
            line["what"], "the configuration (PUT /config; settings changed: nodes, retries)"
        )
        self.assertEqual((line["before"], line["after"]), ("1 pools, 1 nodes, 0 routes",) * 2)
        self.assertEqual(self.changes(), {"sighup": 0, "api": 1})
        metrics = (await self.client.request("GET", self.admin + "/metrics")).body.decode()
        self.assertEqual(samples(metrics)[("rrlb_config_changes_total", (("source", "api"),))], 1)

        self.assertTrue(self.balancer.service.reload())
        self.assertEqual(await self.bodies(2), [b"a", b"a"])
        self.assertEqual(self.balancer.service.config.retries, 2)
        self.assertEqual(self.changes(), {"sighup": 1, "api": 1})

    async def test_put_json(self) -> None:
        """
        A JSON body is taken too.
        """
        a, b = await start_backends(self, "a", "b")
        await self.start([a])
        code, _ = await self.call("PUT", "/config", {"nodes": [a.url, b.url]})
        self.assertEqual(code, 200)
        self.assertEqual(sorted(await self.bodies(2)), [b"a", b"b"])


class NodeTests(RuntimeCase):
    """
    Nodes added, removed and changed by API, and traffic following.
    """

    async def test_add(self) -> None:
        """
        C{POST /nodes/<pool>} adds a node, answers its JSON with its id, and
        it takes its turn.
        """
        a, b = await start_backends(self, "a", "b")
        await self.start([a])
        logs = LogCapture.install(self)
        code, node = await self.call("POST", "/nodes/default", {"url": b.url, "weight": 2})
        self.assertEqual(code, 201)
        self.assertEqual((node["id"], node["url"], node["weight"]), (1, b.url, 2))
        self.assertEqual(sorted(await self.bodies(3)), [b"a", b"b", b"b"])
        (line,) = logs.matching(source="api")
        self.assertEqual(line["what"], f"pool default: node {b.url}")
        self.assertEqual(
            (line["before"], line["after"]), ("absent", "added, weight 2, max_connections default")
        )
        self.assertEqual(self.changes()["api"], 1)

    async def test_remove_lets_in_flight_finish(self) -> None:
        """
        C{DELETE /nodes/<pool>/<id>} takes the node out at once; its request
        in flight finishes, and every later one goes elsewhere.
        """
        a, b = await start_backends(self, "a", "b")
        await self.start([a, b])
        a.delay = 0.5
        slow = defer.Deferred.fromCoroutine(self.client.request("GET", self.balancer.url + "/slow"))
        await wait_until(lambda: a.requests, what="the request at a")
        code, node = await self.call("DELETE", f"/nodes/default/{a.url.split('//')[1]}")
        self.assertEqual((code, node["url"], node["state"]), (200, a.url, "draining"))
        self.assertEqual(await self.bodies(3), [b"b"] * 3)
        reply: Reply = await slow
        self.assertEqual((reply.code, reply.body), (200, b"a"))
        self.assertEqual([n.url for n in self.balancer.service.pool.nodes], [b.url])

    async def test_patch(self) -> None:
        """
        C{PATCH} changes a node's weight or limit at once.
        """
        a, b = await start_backends(self, "a", "b")
        await self.start([a, b])
        code, node = await self.call("PATCH", "/nodes/default/0", {"weight": 3})
        self.assertEqual((code, node["weight"]), (200, 3))
        self.assertEqual(sorted(await self.bodies(4)), [b"a", b"a", b"a", b"b"])
        code, node = await self.call("PATCH", "/nodes/default/1", {"max_connections": 1})
        self.assertEqual((code, node["max_connections"]), (200, 1))
        self.assertEqual(self.balancer.service.pool.nodes[1].limit, 1)
        self.assertEqual(self.changes()["api"], 2)


class BadRequestTests(RuntimeCase):
    """
    Whatever comes, a 4xx with a JSON error, no traceback, and nothing
    changed.
    """

    async def test_bad_bodies(self) -> None:
        """
        Bodies that are not JSON or YAML, wrong types, bad values, unknown
        pools and nodes, a PUT that makes a bad configuration, deep nesting:
        each gets its 4xx and the running configuration stays.
        """
        a, b = await start_backends(self, "a", "b")
        await self.start([a, b])
        service = self.balancer.service
        before = service.config
        logs = LogCapture.install(self)
        deep = b"[" * 100000 + b"]" * 100000
        cases: list[tuple[str, str, Any, bytes, int]] = [
            ("POST", "/nodes/default", b"{not json", b"application/json", 400),
            ("POST", "/nodes/default", b"\xff\xfe", b"application/json", 400),
            ("POST", "/nodes/default", [b.url], b"application/json", 400),
            ("POST", "/nodes/default", {"url": "ftp://x"}, b"application/json", 400),
            ("POST", "/nodes/default", {"url": 7}, b"application/json", 400),
            ("POST", "/nodes/default", {"weight": 2}, b"application/json", 400),
            ("POST", "/nodes/default", {"url": "http://c:1", "weight": 0}, b"", 400),
            ("POST", "/nodes/default", {"url": "http://c:1", "weight": 257}, b"", 400),
            ("POST", "/nodes/default", {"url": "http://c:1", "max_connections": -1}, b"", 400),
            ("POST", "/nodes/default", {"url": "http://c:1", "colour": "red"}, b"", 400),
            ("POST", "/nodes/default", {"url": a.url}, b"application/json", 409),
            ("POST", "/nodes/default", {"url": "http://c:1", "send_proxy": "v3"}, b"", 400),
            ("POST", "/nodes/default", {"url": "https://c:1", "tls": {"verify": "no"}}, b"", 400),
            (
                "POST",
                "/nodes/default",
                {"url": "https://c:1", "tls": {"ca_file": "/nonexistent/ca.pem"}},
                b"application/json",
                400,
            ),
            ("POST", "/nodes/default/%FF", {"url": "http://c:1"}, b"application/json", 404),
            ("PATCH", "/nodes/default/%FF", {"weight": 2}, b"application/json", 404),
            ("POST", "/nodes/nopool", {"url": "http://c:1"}, b"application/json", 404),
            ("POST", "/nodes/default", deep, b"application/json", 400),
            ("PATCH", "/nodes/default/0", {"weight": "3"}, b"application/json", 400),
            ("PATCH", "/nodes/default/0", {"weight": True}, b"application/json", 400),
            ("PATCH", "/nodes/default/0", {"weight": 2.5}, b"application/json", 400),
            ("PATCH", "/nodes/default/0", {"weight": 300}, b"application/json", 400),
            ("PATCH", "/nodes/default/0", {"max_connections": -1}, b"application/json", 400),
            ("PATCH", "/nodes/default/0", {"url": "http://c:1"}, b"application/json", 400),
            ("PATCH", "/nodes/default/0", {}, b"application/json", 400),
            ("PATCH", "/nodes/default/0", "weight", b"application/json", 400),
            ("PATCH", "/nodes/default/9", {"weight": 2}, b"application/json", 404),
            ("PATCH", "/nodes/nopool/0", {"weight": 2}, b"application/json", 404),
            ("DELETE", "/nodes/default/9", None, b"application/json", 404),
            ("DELETE", "/nodes/default/x:1", None, b"application/json", 404),
            ("PUT", "/config", b"nodes: [http://a", b"application/yaml", 400),
            ("PUT", "/config", b"a: &x [1]\nb: *x\n", b"application/yaml", 400),
            ("PUT", "/config", b"- 1\n", b"application/yaml", 400),
            ("PUT", "/config", b"nodes: [ftp://x]\n", b"application/yaml", 400),
            ("PUT", "/config", b"timeuot: 3\n", b"application/yaml", 400),
            ("PUT", "/config", b"routes: [{pool: web}]\n", b"application/yaml", 400),
            ("PUT", "/config", {"retries": [[[[1]]]]}, b"application/json", 400),
            ("PUT", "/config", {"tls": {"ca_file": "/nonexistent"}}, b"application/json", 400),
            ("PUT", "/config", b"nodes: [x]", b"text/plain", 415),
            ("PUT", "/config", deep, b"application/json", 400),
            ("PUT", "/config", b"retries: " + deep, b"application/yaml", 400),
            ("GET", "/config/x", None, b"application/json", 404),
            ("POST", "/config", None, b"application/json", 405),
        ]
        for method, path, body, kind, expected in cases:
            code, value = await self.call(method, path, body, kind or b"application/json")
            self.assertEqual(code, expected, (method, path, body if len(str(body)) < 99 else "..."))
            self.assertIsInstance(value["error"], str)
            self.assertLess(len(value["error"]), 400)
        self.assertIs(service.config, before)
        self.assertEqual(self.changes(), {"sighup": 0, "api": 0})
        self.assertEqual([n.url for n in service.pool.nodes], [a.url, b.url])
        self.assertEqual([n.weight for n in service.pool.nodes], [1, 1])
        self.assertEqual(logs.matching(log_failure=None, source="api"), [])
        self.assertEqual([e for e in logs.events if "log_failure" in e], [])
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_huge_body(self) -> None:
        """
        A body over 1 MiB is refused with 413 and the connection closed,
        by its Content-Length before it is sent, and as it arrives when
        chunked.
        """
        (a,) = await start_backends(self, "a")
        await self.start([a])
        port = int(self.admin.rsplit(":", 1)[1])
        head = b"PUT /config HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        answer = await raw_request(self, port, head + b"Content-Length: 2000000\r\n\r\n{")
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        chunk = b"100000\r\n" + b" " * 0x100000 + b"\r\n"
        answer = await raw_request(
            self, port, head + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 2 + b"0\r\n\r\n"
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertEqual(self.changes(), {"sighup": 0, "api": 0})

    async def test_guarded(self) -> None:
        """
        The Host check, the bearer token and the cross-site check come
        before any change.
        """
        a, b = await start_backends(self, "a", "b")
        token = os.path.abspath(self.mktemp())
        with open(token, "w") as f:
            f.write("guard-token-0123456789\n")
        await self.start([a], "--admin-token-file", token)
        good = b"Bearer guard-token-0123456789"
        add = {"url": b.url}
        for headers, expected in [
            ({}, 401),
            ({b"Authorization": [b"Bearer nope"]}, 401),
            ({b"Authorization": [good], b"Host": [b"evil.example"]}, 421),
            ({b"Authorization": [good], b"Origin": [b"http://evil.example"]}, 403),
        ]:
            for method, path in [("POST", "/nodes/default"), ("PATCH", "/nodes/default/0"),
                                 ("DELETE", "/nodes/default/0"), ("PUT", "/config"),
                                 ("GET", "/config")]:  # fmt: skip
                code, _ = await self.call(method, path, add, headers=headers)
                # A read is not a cross-site write (and a browser cannot read it).
                wanted = 200 if expected == 403 and method == "GET" else expected
                self.assertEqual(code, wanted, (method, path, headers))
        self.assertEqual(self.changes(), {"sighup": 0, "api": 0})
        code, _ = await self.call("POST", "/nodes/default", add, headers={b"Authorization": [good]})
        self.assertEqual(code, 201)


class ProcessTests(unittest.TestCase):
    """
    The API of a real rrlb process: with a real SIGHUP, and with workers.
    """

    async def start(self, *args: str) -> Any:
        admin = (await closed_port_url()).rsplit(":", 1)[1]
        self.admin = f"http://{LOOPBACK}:{admin}"
        daemon = await start_daemon(
            self, "--admin", f"tcp:{admin}:interface={LOOPBACK}", "--drain-timeout", "2", *args
        )
        await daemon.wait_for_message("READY=1")
        self.client = HTTPClient()
        self.addCleanup(self.client.close)
        return daemon

    async def call(
        self, method: str, path: str, body: Any = None, kind: bytes = b"application/json"
    ) -> tuple[int, Any]:
        data = (
            None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        )
        reply = await self.client.request(
            method, self.admin + path, {b"Content-Type": [kind]}, data
        )
        return reply.code, json.loads(reply.body)

    async def changes(self) -> dict[str, float]:
        text = (await self.client.request("GET", self.admin + "/metrics")).body.decode()
        found = samples(text)
        return {
            s: found[("rrlb_config_changes_total", (("source", s),))] for s in ("sighup", "api")
        }

    async def test_put_and_sighup_at_once(self) -> None:
        """
        A PUT and a SIGHUP that arrive together are both applied, one after
        the other, each whole: both are counted, and what runs is one of
        the two configurations, the same in /config and in the pool.
        """
        a, b = await start_backends(self, "a", "b")
        path = os.path.abspath(self.mktemp())
        write_config(path, [a.url])
        daemon = await self.start("--config", path)
        body = yaml.safe_dump({"nodes": [b.url], "health": {"path": "/health"}}).encode()
        put = defer.Deferred.fromCoroutine(self.call("PUT", "/config", body, b"application/yaml"))
        daemon.signal("HUP")
        code, _ = await put
        self.assertEqual(code, 200)
        await wait_until(lambda: daemon.messages.count(b"READY=1") == 2, what="the reload")
        self.assertEqual(await self.changes(), {"sighup": 1.0, "api": 1.0})
        _, config = await self.call("GET", "/config")
        _, nodes = await self.call("GET", "/nodes/default")
        self.assertIn([n["url"] for n in config["nodes"]], ([a.url], [b.url]))
        self.assertEqual([n["url"] for n in nodes], [n["url"] for n in config["nodes"]])
        self.assertEqual(build_config(path).nodes[0].url, a.url)
        self.assertNotIn(b"Traceback", daemon.output)

    async def test_every_worker_applies(self) -> None:
        """
        With C{--workers 2}, a node added by API serves requests from each
        worker, and one removed gets none from either.
        """
        a, b = await start_backends(self, "a", "b")
        daemon = await self.start("--workers", "2", "--nodes", a.url, "--health-path", "/health")
        code, node = await self.call("POST", "/nodes/default", {"url": b.url})
        self.assertEqual((code, node["id"]), (201, 1))
        _, status = await self.call("GET", "/status")
        pids = [w["pid"] for w in status["workers"]]

        async def via(index: int, count: int) -> set[bytes]:
            # Requests accepted by worker index alone: the other is stopped.
            others = [pid for i, pid in enumerate(pids) if i != index]
            for pid in others:
                os.kill(pid, signal.SIGSTOP)
            try:
                replies = [await self.client.request("GET", daemon.url + "/") for _ in range(count)]
            finally:
                for pid in others:
                    os.kill(pid, signal.SIGCONT)
            return {r.body for r in replies}

        # Fresh connections each time, so the stopped worker holds none.
        self.client = HTTPClient(persistent=False)
        self.addCleanup(self.client.close)
        self.assertEqual([await via(0, 4), await via(1, 4)], [{b"a", b"b"}] * 2)
        code, _ = await self.call("DELETE", "/nodes/default/0")
        self.assertEqual(code, 200)
        self.assertEqual([await via(0, 3), await via(1, 3)], [{b"b"}] * 2)
        self.assertEqual((await self.changes())["api"], 2.0)
        self.assertNotIn(b"Traceback", daemon.output)


class RaceTests(RuntimeCase):
    """
    Calls that race each other.
    """

    async def test_racing_calls(self) -> None:
        """
        Five POSTs of one node at once add it once (the others get 409);
        a DELETE racing a PATCH of one node: whichever comes second finds
        it gone (404 or 409), never a 500; the pool and /config agree.
        """
        a, b, c = await start_backends(self, "a", "b", "c")
        await self.start([a, b])
        posts = [
            defer.Deferred.fromCoroutine(self.call("POST", "/nodes/default", {"url": c.url}))
            for _ in range(5)
        ]
        codes = sorted([code for code, _ in await defer.gatherResults(posts)])
        self.assertEqual(codes, [201, 409, 409, 409, 409])
        delete = defer.Deferred.fromCoroutine(self.call("DELETE", "/nodes/default/1"))
        patch = defer.Deferred.fromCoroutine(
            self.call("PATCH", f"/nodes/default/{b.url.split('//')[1]}", {"weight": 5})
        )
        (deleted, _), (patched, _) = await defer.gatherResults([delete, patch])
        self.assertEqual(deleted, 200)
        self.assertIn(patched, (200, 404, 409))
        _, config = await self.call("GET", "/config")
        self.assertEqual(
            [n["url"] for n in config["nodes"]],
            [n.url for n in self.balancer.service.pool.nodes],
        )
        self.assertEqual(self.flushLoggedErrors(), [])
