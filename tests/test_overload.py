"""
Issue 11 over real loopback sockets: per-node connection limits and the
queue (a request waits for a full node, times out with 503, leaves when
its client does), bounded retries and the retry budget, what /status,
/metrics and the status page show of them, and reloads that change them.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from twisted.internet import defer
from twisted.trial import unittest
from twisted.web import server

from rrlb.pool import Node
from tests.support import (
    ADMIN,
    Backend,
    Balancer,
    HTTPClient,
    RawClient,
    Reply,
    admin_url,
    closed_port_url,
    http_request,
    raw_connect,
    reactor,
    samples,
    start_backend,
    start_backends,
    start_balancer,
    wait_until,
)

# Health checks that never get in the way: a failed request or probe must
# not take a dead node out of rotation during a test.
QUIET_HEALTH = ("--health-interval", "60", "--fall", "100")

GET = b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"


def write(testcase: unittest.TestCase, text: str) -> str:
    path = testcase.mktemp()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class Held:
    """
    Makes a backend hold every request until the test releases it, oldest
    first, so no test depends on how fast a loaded machine runs.
    """

    def __init__(self, backend: Backend) -> None:
        self.requests: list[Any] = []
        backend.handler = self.handle

    def handle(self, request: Any) -> Any:
        self.requests.append(request)
        return server.NOT_DONE_YET

    def release(self) -> None:
        request = self.requests.pop(0)
        if not request._disconnected:
            request.write(b"a")
            request.finish()


class OverloadCase(unittest.TestCase):
    async def client(self) -> HTTPClient:
        client = HTTPClient(persistent=False)
        self.addCleanup(client.close)
        return client

    async def hold(self, balancer: Balancer) -> RawClient:
        """
        Send one GET on a raw connection and leave it waiting for its answer.
        """
        client = await raw_connect(self, balancer.port)
        client.send(GET)
        return client

    def node(self, balancer: Balancer, backend: Backend) -> Node:
        node = balancer.service.pool.get(backend.url)
        assert node is not None
        return node

    def assert503(self, reply: Reply) -> None:
        self.assertEqual(reply.code, 503, reply.body)
        retry_after = reply.header(b"retry-after")
        assert retry_after is not None
        self.assertGreaterEqual(int(retry_after), 1)
        self.assertTrue((reply.header(b"content-type") or b"").startswith(b"text/plain"))
        self.assertNotIn(b"Traceback", reply.body)


class QueueTests(OverloadCase):
    """
    A node with C{max_connections} never has more requests in flight; the
    rest wait in the queue.
    """

    async def test_second_request_waits_then_succeeds(self) -> None:
        """
        With C{max_connections: 1} and a slow node, a second concurrent
        request waits in the queue (the node sees one request at a time)
        and is answered once the first is done.
        """
        backend = await start_backend(self, "a")
        held = Held(backend)
        path = write(self, f"nodes:\n  - {{url: '{backend.url}', max_connections: 1}}\n")
        balancer = await start_balancer(self, (), "--config", path)
        queue = balancer.service.traffic.proxy.queue
        node = self.node(balancer, backend)
        self.assertEqual(node.limit, 1)
        client = await self.client()
        first = defer.Deferred.fromCoroutine(client.request("GET", balancer.url + "/1"))
        await wait_until(lambda: node.in_flight == 1, what="the first request to reach a")
        second = defer.Deferred.fromCoroutine(client.request("GET", balancer.url + "/2"))
        await wait_until(lambda: len(queue) == 1, what="the second request to queue")
        self.assertEqual([r.uri for r in backend.requests], [b"/1"])
        self.assertEqual(node.in_flight, 1)
        held.release()
        await wait_until(lambda: len(held.requests) == 1, what="the second to reach a")
        self.assertEqual((len(queue), node.in_flight), (0, 1))
        held.release()
        replies = [await first, await second]
        self.assertEqual([(r.code, r.body) for r in replies], [(200, b"a"), (200, b"a")])
        self.assertEqual([r.uri for r in backend.requests], [b"/1", b"/2"])
        self.assertEqual((len(queue), node.in_flight, queue.timeouts), (0, 0, 0))

    async def test_full_node_skipped(self) -> None:
        """
        While a node is full the rotation skips it: requests go to the node
        with room instead of queueing.
        """
        a, b = await start_backends(self, "a", "b")
        a.delay = 5.0
        balancer = await start_balancer(self, [a.url, b.url], "--max-conns-per-node", "1")
        await self.hold(balancer)
        await wait_until(lambda: self.node(balancer, a).in_flight == 1, what="a to be full")
        client = await self.client()
        bodies = [(await client.request("GET", balancer.url + "/")).body for _ in range(3)]
        self.assertEqual(bodies, [b"b"] * 3)
        self.assertEqual(len(balancer.service.traffic.proxy.queue), 0)

    async def test_queue_timeout(self) -> None:
        """
        A request that waits the whole C{--queue-timeout} gets 503 with
        C{Retry-After}, about when the timeout ends, and is counted.
        """
        backend = await start_backend(self, "a")
        backend.delay = 5.0
        balancer = await start_balancer(
            self, [backend.url], "--max-conns-per-node", "1", "--queue-timeout", "0.3"
        )
        await self.hold(balancer)
        await wait_until(lambda: self.node(balancer, backend).in_flight == 1, what="a full")
        started = reactor.seconds()
        reply = await http_request(self, "GET", balancer.url + "/queued")
        elapsed = reactor.seconds() - started
        self.assert503(reply)
        self.assertGreaterEqual(elapsed, 0.3)
        self.assertLess(elapsed, 3.0)
        queue = balancer.service.traffic.proxy.queue
        self.assertEqual((len(queue), queue.timeouts), (0, 1))
        self.assertEqual([r.uri for r in backend.requests], [b"/slow"])

    async def test_zero_queue_timeout(self) -> None:
        """
        With C{--queue-timeout 0} a request finding every node full gets 503
        at once.
        """
        backend = await start_backend(self, "a")
        backend.delay = 5.0
        balancer = await start_balancer(
            self, [backend.url], "--max-conns-per-node", "1", "--queue-timeout", "0"
        )
        await self.hold(balancer)
        await wait_until(lambda: self.node(balancer, backend).in_flight == 1, what="a full")
        self.assert503(await http_request(self, "GET", balancer.url + "/"))

    async def test_client_leaves_queue(self) -> None:
        """
        A client that closes its connection while queued is out of the queue
        at once; its request never reaches the node, and the next queued
        request takes the freed slot.
        """
        backend = await start_backend(self, "a")
        held = Held(backend)
        balancer = await start_balancer(self, [backend.url], "--max-conns-per-node", "1")
        queue = balancer.service.traffic.proxy.queue
        await self.hold(balancer)
        await wait_until(lambda: self.node(balancer, backend).in_flight == 1, what="a full")
        leaving = await raw_connect(self, balancer.port)
        leaving.send(b"GET /leaving HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_until(lambda: len(queue) == 1, what="the request to queue")
        client = await self.client()
        staying = defer.Deferred.fromCoroutine(client.request("GET", balancer.url + "/staying"))
        await wait_until(lambda: len(queue) == 2, what="a second request to queue")
        await leaving.close()
        await wait_until(lambda: len(queue) == 1, timeout=0.5, what="the leaver to be removed")
        held.release()
        await wait_until(lambda: len(held.requests) == 1, what="the next to reach a")
        held.release()
        self.assertEqual((await staying).code, 200)
        self.assertEqual([r.uri for r in backend.requests], [b"/slow", b"/staying"])
        self.assertEqual(queue.timeouts, 0)

    async def test_fifo_one_at_a_time(self) -> None:
        """
        Requests queued while the only node is full go out in the order they
        came, and the node never has more than its limit in flight.
        """
        backend = await start_backend(self, "a")
        active = peak = 0
        # The first request is held until the others are queued behind it.
        gate: defer.Deferred[None] = defer.Deferred()

        def slow(request: Any) -> Any:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)

            def answer(_: Any = None) -> None:
                nonlocal active
                active -= 1
                if not request._disconnected:
                    request.write(b"a")
                    request.finish()

            if request.uri == b"/0":
                gate.addCallback(answer)
            else:
                reactor.callLater(0.05, answer)
            return server.NOT_DONE_YET

        backend.handler = slow
        balancer = await start_balancer(self, [backend.url], "--max-conns-per-node", "1")
        queue = balancer.service.traffic.proxy.queue
        node = self.node(balancer, backend)
        clients = []
        for i in range(4):
            client = await raw_connect(self, balancer.port)
            client.send(b"GET /%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % i)
            clients.append(client)
            # Each one in before the next is sent: the first in flight, the
            # others queued behind it.
            await wait_until(
                lambda i=i: node.in_flight == 1 and len(queue) == i, what=f"{i} queued"
            )
        gate.callback(None)
        responses = [await c.closed for c in clients]
        self.assertTrue(all(r.startswith(b"HTTP/1.1 200 ") for r in responses), responses)
        self.assertEqual([r.uri for r in backend.requests], [b"/0", b"/1", b"/2", b"/3"])
        self.assertEqual(peak, 1)
        self.assertEqual(self.node(balancer, backend).in_flight, 0)


class RetryTests(OverloadCase):
    """
    C{--retries} and C{--retry-budget}.
    """

    async def dead_and_live(self, dead: int, *args: str) -> tuple[Balancer, Backend, list[str]]:
        """
        A balancer over C{dead} refusing nodes, then one live node.
        """
        urls = [await closed_port_url() for _ in range(dead)]
        live = await start_backend(self, "live")
        balancer = await start_balancer(self, urls + [live.url], *QUIET_HEALTH, *args)
        return balancer, live, urls

    def errors(self, balancer: Balancer, urls: Sequence[str]) -> list[int]:
        return [n.errors for n in balancer.service.pool.nodes if n.key in urls]

    async def test_retries_bounded(self) -> None:
        """
        A GET is tried on at most C{--retries} other nodes, each once: with
        three refusing nodes ahead of a live one and the default of 2, the
        client gets 502 and the live node sees nothing.
        """
        balancer, live, urls = await self.dead_and_live(3)
        reply = await http_request(self, "GET", balancer.url + "/")
        self.assertEqual(reply.code, 502, reply.body)
        self.assertEqual(live.requests, [])
        self.assertEqual(self.errors(balancer, urls), [1, 1, 1])
        self.assertEqual(balancer.service.traffic.proxy.stats.retries, 2)

    async def test_retry_reaches_live_node(self) -> None:
        """
        Within the limit a retry reaches the live node: two refusing nodes
        and C{--retries 2} give 200.
        """
        balancer, live, urls = await self.dead_and_live(2)
        reply = await http_request(self, "GET", balancer.url + "/")
        self.assertEqual((reply.code, reply.body), (200, b"live"))
        self.assertEqual(self.errors(balancer, urls), [1, 1])

    async def test_no_retries(self) -> None:
        """
        C{--retries 0} answers 502 after the first failure.
        """
        balancer, live, urls = await self.dead_and_live(1, "--retries", "0")
        reply = await http_request(self, "GET", balancer.url + "/")
        self.assertEqual(reply.code, 502, reply.body)
        self.assertEqual(live.requests, [])
        self.assertEqual(balancer.service.traffic.proxy.stats.retries, 0)

    async def test_budget_spent(self) -> None:
        """
        With the budget spent (as many retries in flight as the floor
        allows) a failed GET is not retried: 502, counted as refused.
        """
        balancer, live, urls = await self.dead_and_live(1, "--retry-budget", "0")
        budget = balancer.service.traffic.proxy.budget
        budget.active = 3
        self.addCleanup(setattr, budget, "active", 0)
        reply = await http_request(self, "GET", balancer.url + "/")
        self.assertEqual(reply.code, 502, reply.body)
        self.assertEqual(live.requests, [])
        self.assertEqual(budget.refused, 1)
        budget.active = 2
        reply = await http_request(self, "GET", balancer.url + "/")
        self.assertEqual((reply.code, reply.body), (200, b"live"))
        # The retry's place is given back when its request ends.
        self.assertEqual(budget.active, 2)


class VisibilityTests(OverloadCase):
    """
    The queue and the in-flight counts in /status, /metrics and the page.
    """

    async def test_status_metrics_page(self) -> None:
        """
        While one request is in flight and another is queued, /status shows
        the queue length and each node's in-flight count and limit, /metrics
        has rrlb_queue_length, rrlb_queue_timeouts_total,
        rrlb_node_in_flight, rrlb_retries_total and
        rrlb_retries_refused_total, and the page shows the queue.
        """
        backend = await start_backend(self, "a")
        backend.delay = 5.0
        balancer = await start_balancer(
            self, [backend.url], "--max-conns-per-node", "1", "--admin", ADMIN
        )
        admin = await admin_url(balancer)
        await self.hold(balancer)
        await self.hold(balancer)
        await wait_until(lambda: len(balancer.service.traffic.proxy.queue) == 1, what="one queued")
        status = json.loads((await http_request(self, "GET", admin + "/status")).body)
        self.assertEqual(status["process"]["queue_length"], 1)
        self.assertEqual(status["process"]["queue_timeouts"], 0)
        self.assertEqual(status["process"]["retries_refused"], 0)
        self.assertEqual(status["nodes"][0]["in_flight"], 1)
        self.assertEqual(status["nodes"][0]["max_connections"], 1)
        m = samples((await http_request(self, "GET", admin + "/metrics")).body.decode())
        self.assertEqual(m[("rrlb_queue_length", ())], 1)
        self.assertEqual(m[("rrlb_queue_timeouts_total", ())], 0)
        self.assertEqual(
            m[("rrlb_node_in_flight", (("node", backend.url), ("pool", "default")))], 1
        )
        self.assertEqual(m[("rrlb_retries_total", ())], 0)
        self.assertEqual(m[("rrlb_retries_refused_total", ())], 0)
        page = (await http_request(self, "GET", admin + "/")).body.decode()
        self.assertIn('<dd id="queue-length">1</dd>', page)
        self.assertIn('<td class="num">1 / 1</td>', page)

    async def test_counters(self) -> None:
        """
        A retry and a retry the budget refused show in /metrics and /status,
        and so does a queue timeout.
        """
        dead = await closed_port_url()
        (live,) = await start_backends(self, "live")
        balancer = await start_balancer(self, [dead, live.url], *QUIET_HEALTH, "--admin", ADMIN)
        admin = await admin_url(balancer)
        client = await self.client()
        # The first GET goes to the dead node and is retried on live.
        self.assertEqual((await client.request("GET", balancer.url + "/")).code, 200)
        # The next one also starts at the dead node; with the budget spent
        # it is not retried.
        budget = balancer.service.traffic.proxy.budget
        budget.active = 3
        self.addCleanup(setattr, budget, "active", 0)
        self.assertEqual((await client.request("GET", balancer.url + "/")).code, 502)
        m = samples((await http_request(self, "GET", admin + "/metrics")).body.decode())
        self.assertEqual(m[("rrlb_retries_total", ())], 1)
        self.assertEqual(m[("rrlb_retries_refused_total", ())], 1)
        status = json.loads((await http_request(self, "GET", admin + "/status")).body)
        process = status["process"]
        self.assertEqual((process["retries"], process["retries_refused"]), (1, 1))

        (slow,) = await start_backends(self, "slow")
        slow.delay = 5.0
        full = await start_balancer(
            self, [slow.url], "--max-conns-per-node", "1", "--queue-timeout", "0", "--admin", ADMIN
        )
        full_admin = await admin_url(full)
        await self.hold(full)
        await wait_until(lambda: self.node(full, slow).in_flight == 1, what="slow full")
        self.assert503(await client.request("GET", full.url + "/"))
        m = samples((await http_request(self, "GET", full_admin + "/metrics")).body.decode())
        self.assertEqual(m[("rrlb_queue_timeouts_total", ())], 1)
        self.assertEqual(m[("rrlb_queue_length", ())], 0)
        status = json.loads((await http_request(self, "GET", full_admin + "/status")).body)
        self.assertEqual(status["process"]["queue_timeouts"], 1)


class ReloadTests(OverloadCase):
    """
    A reload applies changed limits, queue timeout, retries and budget.
    """

    async def test_reload(self) -> None:
        """
        After a reload that raises C{max_conns_per_node}, a queued request
        goes out at once; the other new values are in force.
        """
        backend = await start_backend(self, "a")
        held = Held(backend)
        path = write(self, f"nodes: ['{backend.url}']\nmax_conns_per_node: 1\n")
        balancer = await start_balancer(self, (), "--config", path)
        service = balancer.service
        node = self.node(balancer, backend)
        await self.hold(balancer)
        await wait_until(lambda: node.in_flight == 1, what="a full")
        client = await self.client()
        queued = defer.Deferred.fromCoroutine(client.request("GET", balancer.url + "/queued"))
        await wait_until(lambda: len(service.traffic.proxy.queue) == 1, what="one queued")
        with open(path, "w") as f:
            f.write(
                f"nodes: [{{url: '{backend.url}', max_connections: 2}}]\n"
                "max_conns_per_node: 1\nqueue_timeout: 1.5\nretries: 1\nretry_budget: 50\n"
            )
        self.assertTrue(service.reload())
        self.assertEqual(node.limit, 2)
        self.assertEqual(len(service.traffic.proxy.queue), 0)
        self.assertEqual(node.in_flight, 2)
        self.assertEqual(service.traffic.proxy.queue.timeout, 1.5)
        self.assertEqual(service.traffic.proxy.settings.retries, 1)
        self.assertEqual(service.traffic.proxy.budget.percent, 50)
        await wait_until(lambda: len(held.requests) == 2, what="the queued one to reach a")
        held.release()
        held.release()
        self.assertEqual((await queued).code, 200)

    async def test_reload_removes_limit(self) -> None:
        """
        A reload back to no limit ends the skipping: in-flight counts no
        longer matter.
        """
        a, b = await start_backends(self, "a", "b")
        a.delay = 5.0
        path = write(self, f"nodes: ['{a.url}', '{b.url}']\nmax_conns_per_node: 1\n")
        balancer = await start_balancer(self, (), "--config", path)
        await self.hold(balancer)
        await wait_until(lambda: self.node(balancer, a).in_flight == 1, what="a full")
        with open(path, "w") as f:
            f.write(f"nodes: ['{a.url}', '{b.url}']\n")
        self.assertTrue(balancer.service.reload())
        self.assertEqual([n.limit for n in balancer.service.pool.nodes], [0, 0])
        self.assertFalse(balancer.service.pool._limited)
