"""
Filters end to end, over loopback: the built-in filters and the Python
filter package in tests/filterpkg (answering, rewriting, re-pooling,
failing), on nodes' responses and on rrlb's own answers; filter errors
(500, one log event, the metric); a client that leaves while a filter
holds its request; a reload that adds and removes filters; the access
log's fields. Each node's record shows what it received, or that it
received nothing.
"""

from __future__ import annotations

import json
from typing import Any

from rrlb.metrics import exposition
from tests.support import (
    LogCapture,
    YamlCase,
    parse_error,
    raw_connect,
    start_backends,
    wait_until,
)


class FilterCase(YamlCase):
    """
    Start backends and rrlb from a YAML text.
    """

    def filter_errors(self) -> str:
        text = exposition(self.balancer.service.traffic.metrics).decode()
        return "\n".join(line for line in text.splitlines() if "filter_errors" in line)


EDGE = """\
filters:
  - request_id: {}
  - traceparent: {}
  - response_headers:
      set: {Strict-Transport-Security: max-age=31536000}
      remove: [Server]
  - request_headers: {set: {X-Edge: "1"}, add: {X-Added: two}, remove: [X-Secret]}
routes:
  - {path_prefix: /admin, filters: [{allow: [10.0.0.0/8]}], pool: default}
  - {path_prefix: /blocked, filters: [{deny: [127.0.0.0/8]}], pool: default}
  - {path_prefix: /moved, redirect: {path: /new}}
  - {path_prefix: /fixed, respond: {status: 202, body: fixed}}
  - {path_prefix: /nowhere, forward: [{pool: default}], filters: []}
  - {path_prefix: /, pool: default}
"""


class BuiltinFilterTests(FilterCase):
    """
    request_id, traceparent, request_headers, response_headers, allow, deny.
    """

    async def test_edge(self) -> None:
        """
        The node gets the request ID, a traceparent, the set and added
        headers and not the removed one; the client gets the ID back, HSTS
        and no Server header, on node answers and on rrlb's own alike.
        """
        (n,) = await start_backends(self, "n")
        n.headers = [(b"Server", b"node/1")]
        log_path = self.mktemp()
        await self.start(f"nodes: [{n.url}]\naccess_log: {log_path}\n" + EDGE)
        reply = await self.get("/x", x_secret=b"s", x_added=b"one")
        seen = n.requests[-1]
        rid = seen.header(b"X-Request-Id")
        assert rid is not None
        self.assertRegex(rid.decode(), "^[0-9a-f]{32}$")
        self.assertEqual(reply.header(b"X-Request-Id"), rid)
        self.assertRegex(
            (seen.header(b"Traceparent") or b"").decode(), "^00-[0-9a-f]{32}-[0-9a-f]{16}-00$"
        )
        self.assertEqual(seen.header(b"X-Edge"), b"1")
        self.assertEqual([v for k, v in seen.headers if k == b"X-Added"], [b"one", b"two"])
        self.assertIsNone(seen.header(b"X-Secret"))
        self.assertEqual(reply.header(b"Strict-Transport-Security"), b"max-age=31536000")
        self.assertIsNone(reply.header(b"Server"))
        # A client's valid ID and traceparent are kept.
        parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        reply = await self.get("/y", x_request_id=b"client-id-1", traceparent=parent)
        self.assertEqual(n.requests[-1].header(b"X-Request-Id"), b"client-id-1")
        self.assertEqual(n.requests[-1].header(b"Traceparent"), parent)
        self.assertEqual(reply.header(b"X-Request-Id"), b"client-id-1")
        before = len(n.requests)
        for path, code in [("/moved", 301), ("/fixed", 202), ("/admin/x", 403)]:
            reply = await self.get(path)
            self.assertEqual(reply.code, code, path)
            self.assertEqual(reply.header(b"Strict-Transport-Security"), b"max-age=31536000")
            self.assertRegex((reply.header(b"X-Request-Id") or b"").decode(), "^[0-9a-f]{32}$")
        self.assertEqual(len(n.requests), before)
        self.balancer.service.traffic.access_log.flush()  # type: ignore[union-attr]
        with open(log_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 5)
        self.assertIn(f"request_id={rid.decode()} trace_id=", lines[0])
        self.assertIn("request_id=client-id-1 trace_id=4bf92f3577b34da6a3ce929d0e0e4736", lines[1])

    async def test_no_route(self) -> None:
        """
        A request no route matches gets its 404 through the top-level
        response filters; a route's index is what its filters see.
        """
        (n,) = await start_backends(self, "n")
        await self.start(
            f"nodes: [{n.url}]\n"
            "filters: [{response_headers: {set: {X-Frame-Options: DENY}}}]\n"
            "routes:\n"
            "  - {host: a.example, pool: default}\n"
            "  - {host: b.example, pool: default, filters: [{use: tests.filterpkg:Rewrite}]}\n"
        )
        reply = await self.get("/", host=b"c.example")
        self.assertEqual(reply.code, 404)
        self.assertEqual(reply.header(b"X-Frame-Options"), b"DENY")
        await self.get("/", host=b"b.example")
        self.assertIn(b" route=1 ", n.requests[-1].header(b"X-Seen") or b"")

    async def test_json_log_and_no_node(self) -> None:
        """
        The JSON access log has request_id and trace_id keys; a 503 with no
        node in rotation gets the response filters too.
        """
        log_path = self.mktemp()
        await self.start(
            "nodes: [http://127.0.0.1:1]\n"
            f"access_log: {log_path}\naccess_log_format: json\n"
            "filters: [{request_id: {header: X-Trace-Me}}, {traceparent: {}}]\n"
        )
        pool = self.balancer.service.traffic.pools.by_name["default"]
        for node in pool.nodes:
            for _ in range(3):
                pool.mark(node, False, "test")
        reply = await self.get("/")
        self.assertEqual(reply.code, 503)
        rid = reply.header(b"X-Trace-Me")
        assert rid is not None
        self.balancer.service.traffic.access_log.flush()  # type: ignore[union-attr]
        with open(log_path, encoding="utf-8") as f:
            record = json.loads(f.readline())
        self.assertEqual(record["request_id"], rid.decode())
        self.assertRegex(record["trace_id"], "^[0-9a-f]{32}$")

    async def test_untrusted_request_id(self) -> None:
        """
        With --trusted-proxies, a request ID from a peer outside them is
        replaced; from one inside, it is kept.
        """
        (n,) = await start_backends(self, "n")
        await self.start(
            f"nodes: [{n.url}]\ntrusted_proxies: [10.0.0.0/8]\nfilters: [{{request_id: {{}}}}]\n"
        )
        await self.get("/", x_request_id=b"mine")
        self.assertNotEqual(n.requests[-1].header(b"X-Request-Id"), b"mine")

    async def test_allow_deny(self) -> None:
        """
        allow and deny answer 403 without contacting a node; behind
        --trusted-proxies they judge the real client.
        """
        (n,) = await start_backends(self, "n")
        await self.start(
            f"nodes: [{n.url}]\ntrusted_proxies: [127.0.0.1/32]\n"
            "routes:\n"
            "  - {path_prefix: /in, filters: [{allow: [10.0.0.0/8]}], pool: default}\n"
            "  - {path_prefix: /out, filters: [{deny: [10.0.0.0/8]}], pool: default}\n"
        )
        self.assertEqual((await self.get("/in", x_forwarded_for=b"10.1.1.1")).code, 200)
        self.assertEqual((await self.get("/in", x_forwarded_for=b"11.1.1.1")).code, 403)
        self.assertEqual((await self.get("/in")).code, 403)
        self.assertEqual((await self.get("/out", x_forwarded_for=b"10.1.1.1")).code, 403)
        self.assertEqual((await self.get("/out")).code, 200)
        self.assertEqual([r.path for r in n.requests], [b"/in", b"/out"])

    async def test_hostile_values(self) -> None:
        """
        An 8 KiB header value set by a filter reaches the node and the
        client whole; a CR/LF in one is refused at load, naming the filter.
        """
        (n,) = await start_backends(self, "n")
        big = "v" * 8192
        await self.start(
            f"nodes: [{n.url}]\nfilters:\n"
            f"  - request_headers: {{set: {{X-Big: {big}}}}}\n"
            f"  - response_headers: {{set: {{X-Big: {big}}}}}\n"
        )
        reply = await self.get("/")
        self.assertEqual(n.requests[-1].header(b"X-Big"), big.encode())
        self.assertEqual(reply.header(b"X-Big"), big.encode())
        message = parse_error(
            "--config",
            self.write(
                "nodes: [http://127.0.0.1:1]\nroutes:\n  - pool: default\n    filters:\n"
                '      - response_headers: {set: {X-A: "a\\r\\nSet-Cookie: x=1"}}\n'
            ),
        )
        self.assertIn("routes[0].filters[0].response_headers.set", message)
        self.assertIn("CR, LF or NUL", message)


PY = """\
pools:
  main: {nodes: [%(main)s]}
  gold: {nodes: [%(gold)s]}
routes:
  - path_prefix: /tenant
    name: tenants
    pool: main
    filters:
      - use: tests.filterpkg:TenantFilter
        with: {header: X-Tenant, pools: {acme: gold}}
  - path_prefix: /rewrite
    name: rw
    pool: main
    filters: [{use: tests.filterpkg:Rewrite}]
  - path_prefix: /answer
    pool: main
    filters: [{use: tests.filterpkg:Rewrite}, {use: tests.filterpkg:Answers}]
  - {path_prefix: /raise, pool: main, filters: [{use: tests.filterpkg:Raises}]}
  - path_prefix: /late
    pool: main
    filters: [{use: tests.filterpkg:Raises, with: {where: response}}]
  - {path_prefix: /fails, pool: main, filters: [{use: tests.filterpkg:FailsLater}]}
  - {path_prefix: /garbage, pool: main, filters: [{use: tests.filterpkg:Garbage}]}
  - {path_prefix: /auth, pool: main, filters: [{use: tests.filterpkg:AsksLater}]}
  - path_prefix: /deny
    pool: main
    filters: [{use: tests.filterpkg:AsksLater, with: {allow: false}}]
  - {path_prefix: /hold, pool: main, filters: [{use: tests.filterpkg:NeverFires}]}
  - {path_prefix: /crlf, pool: main, filters: [{use: tests.filterpkg:Hostile}]}
  - path_prefix: /status
    pool: main
    filters: [{use: tests.filterpkg:Hostile, with: {what: status}}]
"""


class PythonFilterTests(FilterCase):
    """
    The filters of tests/filterpkg, loaded with use: and with:.
    """

    async def start_py(self) -> tuple[Any, Any]:
        main, gold = await start_backends(self, "main", "gold")
        await self.start(PY % {"main": main.url, "gold": gold.url})
        return main, gold

    async def test_answers_rewrites_repools(self) -> None:
        """
        A filter re-pools by a header, or answers itself (the response
        filters still run on its answer); a filter sees the method, path as
        sent, query, route and client, and rewrites request and response
        headers.
        """
        main, gold = await self.start_py()
        self.assertEqual((await self.get("/tenant/a", x_tenant=b"acme")).body, b"gold")
        self.assertEqual((await self.get("/tenant/a", x_tenant=b"other")).body, b"main")
        reply = await self.get("/tenant/a")
        self.assertEqual((reply.code, reply.body), (400, b"no tenant\n"))
        self.assertEqual(reply.header(b"X-Why"), b"tenant")
        main.headers = [(b"Server", b"node")]
        reply = await self.get("/rewrite/./x?a=1", method="POST", x_drop=b"1")
        seen = main.requests[-1]
        self.assertEqual(
            seen.header(b"X-Seen"), b"POST /rewrite/./x q=a=1 route=rw client=127.0.0.1"
        )
        self.assertIsNone(seen.header(b"X-Drop"))
        self.assertEqual(reply.header(b"X-Status-Seen"), b"200")
        self.assertIsNone(reply.header(b"Server"))
        count = len(main.requests)
        reply = await self.get("/answer")
        self.assertEqual((reply.code, reply.body), (418, b"short and stout\n"))
        self.assertEqual(reply.header(b"X-Seen"), None)
        self.assertEqual(reply.header(b"X-Answered"), b"yes")
        self.assertEqual(reply.header(b"X-Status-Seen"), b"418")
        self.assertEqual(reply.header(b"Content-Type"), b"text/plain; charset=utf-8")
        self.assertEqual(len(main.requests), count)
        self.assertEqual((await self.get("/auth")).body, b"main")
        reply = await self.get("/deny")
        self.assertEqual((reply.code, reply.body), (401, b"who are you?\n"))
        self.assertEqual(self.filter_errors().count("} "), 0)

    async def test_failures(self) -> None:
        """
        A filter that raises (on the request or on the response), returns
        garbage or whose Deferred fails gives a plain 500 without a
        traceback, one log event with the traceback, a count by its use:
        string, and the daemon goes on serving.
        """
        main, _ = await self.start_py()
        logs = LogCapture.install(self)
        for path in ("/raise", "/late", "/fails", "/garbage", "/crlf", "/status"):
            reply = await self.get(path)
            self.assertEqual(reply.code, 500, path)
            self.assertEqual(reply.body, b"500 Internal Server Error: a filter failed\n")
            self.assertNotIn(b"Traceback", reply.body)
        failures = logs.matching(log_format="filter {filter} failed on {method} {uri}")
        self.assertEqual(
            [(e["filter"], e["uri"]) for e in failures],
            [
                ("tests.filterpkg:Raises", "/raise"),
                ("tests.filterpkg:Raises", "/late"),
                ("tests.filterpkg:FailsLater", "/fails"),
                ("tests.filterpkg:Garbage", "/garbage"),
                ("tests.filterpkg:Hostile", "/crlf"),
                ("tests.filterpkg:Hostile", "/status"),
            ],
        )
        self.assertTrue(all("log_failure" in e for e in failures))
        self.assertEqual([r.path for r in main.requests], [b"/late"])
        errors = self.filter_errors()
        self.assertIn('rrlb_filter_errors_total{filter="tests.filterpkg:Raises"} 2.0', errors)
        self.assertIn('rrlb_filter_errors_total{filter="tests.filterpkg:FailsLater"} 1.0', errors)
        self.assertIn('rrlb_filter_errors_total{filter="tests.filterpkg:Garbage"} 1.0', errors)
        self.assertEqual((await self.get("/rewrite")).code, 200)
        self.assertIn('rrlb_filter_errors_total{filter="tests.filterpkg:Hostile"} 2.0', errors)
        self.flushLoggedErrors(RuntimeError, TypeError, ValueError)

    async def test_client_leaves_while_held(self) -> None:
        """
        A Deferred that never fires holds only its request: a client that
        leaves cancels it, the filter's done() runs, nothing is logged as an
        error, no node is contacted, and others are served meanwhile.
        """
        main, _ = await self.start_py()
        router = self.balancer.service.traffic.proxy.router
        NeverFires = type(router.routes[9].filters[0].filter)
        cancelled, finished = NeverFires.cancelled, NeverFires.finished
        logs = LogCapture.install(self)
        client = await raw_connect(self, self.balancer.port)
        client.send(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_until(lambda: self.balancer.service.traffic.site.channels, what="the request")
        self.assertEqual((await self.get("/rewrite")).code, 200)
        await client.close()
        await wait_until(lambda: NeverFires.cancelled > cancelled, what="the cancel")
        self.assertEqual(NeverFires.finished, finished + 1)
        self.assertEqual([r.path for r in main.requests], [b"/rewrite"])
        self.assertEqual([e for e in logs.events if e.get("log_failure")], [])

    def test_load_errors(self) -> None:
        """
        An import error or a bad argument is one line naming the route and
        the filter.
        """
        base = "nodes: [http://127.0.0.1:1]\nroutes:\n  - pool: default\n    filters: [%s]\n"
        for entry, wanted in [
            ("{use: 'tests.nothere:F'}", "routes[0].filters[0] (use: tests.nothere:F): cannot"),
            ("{use: 'tests.filterpkg:Answers', with: {colour: 1}}", "unexpected keyword"),
        ]:
            message = parse_error("--config", self.write(base % entry))
            self.assertIn(wanted, message)
            self.assertNotIn("\n", message)


class ReloadTests(FilterCase):
    """
    A reload adds and removes filters; a bad one refuses the reload.
    """

    async def test_add_and_remove(self) -> None:
        """
        Filters a reload adds apply to the next request; those it removes
        no longer do; one that cannot be loaded leaves the running ones.
        """
        (n,) = await start_backends(self, "n")
        await self.start(f"nodes: [{n.url}]\n")
        service = self.balancer.service
        self.assertIsNone((await self.get("/")).header(b"X-Request-Id"))
        self.write(
            f"nodes: [{n.url}]\nfilters: [{{request_id: {{}}}}]\n"
            "routes: [{path_prefix: /t, respond: {body: t}}, {pool: default}]\n",
            self.config_path,
        )
        self.assertTrue(service.reload())
        self.assertIsNotNone((await self.get("/")).header(b"X-Request-Id"))
        self.assertEqual((await self.get("/t")).body, b"t")
        self.write(f"nodes: [{n.url}]\nfilters: [{{use: 'tests.nothere:X'}}]\n", self.config_path)
        logs = LogCapture.install(self)
        self.assertFalse(service.reload())
        self.assertIn("filters[0] (use: tests.nothere:X)", "\n".join(logs.messages()))
        self.assertIsNotNone((await self.get("/")).header(b"X-Request-Id"))
        self.write(f"nodes: [{n.url}]\n", self.config_path)
        self.assertTrue(service.reload())
        reply = await self.get("/t")
        self.assertIsNone(reply.header(b"X-Request-Id"))
        self.assertEqual(reply.body, b"n")
        self.assertIsNone(service.traffic.proxy.chains)
