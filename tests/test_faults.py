"""
Proof under faults (issue 11): rrlb in front of nodes that misbehave, over
real loopback sockets, each bounded in time.

Every misbehaving node is tried alone (what exactly a client sees) and as
one of three nodes under a bounded load of concurrent GETs (what the other
requests see while it misbehaves). The last test kills one of three nodes
and starts it again, twice, under load.

The nodes are L{tests.support.RawBackend}s with a handler that
misbehaves; the load is L{tests.support.HTTPClient} with automatic retries
off, so every failure rrlb lets through is seen.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint

from tests.support import (
    LOOPBACK,
    BackendConnection,
    HTTPClient,
    RawBackend,
    RecordedRequest,
    WireCase,
    get,
    post,
    reactor,
    response,
    wait_for,
)

MiB = 1024 * 1024
# The load: a bounded number of GETs from a few concurrent keep-alive clients.
LOAD_REQUESTS = 60
LOAD_CONCURRENCY = 6
# In the kill/restart test, each phase lasts this many answers.
CHAOS_STEP = 50
# A client never waits longer than this for one response.
CLIENT_TIMEOUT = 10.0
# Short response timeouts so slow-node tests take a second or two.
SHORT_TIMEOUT = "0.5"


# -- misbehaviours ----------------------------------------------------------------


def reset(transport: Any) -> None:
    """
    Close a connection with a TCP reset (RST), as a crashed process or a
    firewall would, rather than an orderly FIN.
    """
    sock = transport.getHandle()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abortConnection()


def garbage(request: RecordedRequest, conn: BackendConnection) -> bytes:
    """
    Answers bytes that are not HTTP, then closes.
    """
    conn.transport.loseConnection()
    return b"\x00\xffSSH-2.0-OpenSSH_9.2 garbage\r\n\r\n\x16\x03\x01"


def huge_head(request: RecordedRequest, conn: BackendConnection) -> bytes:
    """
    Answers a response whose header block is 1 MiB.
    """
    line = b"X-Padding: " + b"p" * 1000 + b"\r\n"
    return b"HTTP/1.1 200 OK\r\n" + line * (MiB // len(line)) + b"Content-Length: 2\r\n\r\nok"


def close_after_answer(request: RecordedRequest, conn: BackendConnection) -> None:
    """
    Answers keep-alive (no C{Connection: close}) and closes the connection
    at once: rrlb's pooled connection is dead before its next request.
    """
    conn.transport.write(response(body=b"closer"))
    conn.transport.loseConnection()


async def kill(backend: RawBackend) -> None:
    """
    What the kernel does when a node's process is killed: it stops
    listening (new connections are refused) and every connection closes.
    """
    if backend.port.connected:
        await backend.stop()


async def restart(backend: RawBackend, port: int) -> None:
    """
    Listen again, on the same port, after L{kill}.
    """
    backend.port = await TCP4ServerEndpoint(reactor, port, interface=LOOPBACK).listen(backend)


@dataclass
class Outcome:
    """
    What one client request got: C{code} and C{body}, or C{error} (the kind
    of failure) when no complete response came.
    """

    started: float
    ended: float
    code: Optional[int] = None
    body: bytes = b""
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.code == 200


class FaultCase(WireCase):
    """
    Helpers shared by the fault tests.
    """

    timeout = 30

    def setUp(self) -> None:
        self.calls: list[Any] = []
        self.addCleanup(self._cancel_calls)

    def _cancel_calls(self) -> None:
        for call in self.calls:
            if call.active():
                call.cancel()

    def later(self, delay: float, f: Any, *args: Any) -> None:
        """
        C{reactor.callLater}, cancelled at the end of the test.
        """
        self.calls.append(reactor.callLater(delay, f, *args))

    async def good_nodes(self, count: int = 2) -> list[RawBackend]:
        return [
            await self.backend(lambda r, c, n=i: response(body=b"good-%d" % n))
            for i in range(count)
        ]

    def http_client(self) -> HTTPClient:
        client = HTTPClient()
        # Agent would quietly send a GET again on a reused connection that
        # closed without an answer: that would hide what rrlb let through.
        client.pool.retryAutomatically = False
        client.pool.maxPersistentPerHost = LOAD_CONCURRENCY
        self.addCleanup(client.close)
        return client

    async def get(self, client: HTTPClient, url: str) -> Outcome:
        """
        One GET, bounded by C{CLIENT_TIMEOUT}; its L{Outcome}.
        """
        started = reactor.seconds()
        d = defer.Deferred.fromCoroutine(client.request("GET", url))
        d.addTimeout(CLIENT_TIMEOUT, reactor)
        try:
            reply = await d
        except Exception as e:
            reasons = getattr(e, "reasons", None)
            kind = type(e).__name__
            if reasons:
                kind += "(" + ",".join(type(r.value).__name__ for r in reasons) + ")"
            return Outcome(started, reactor.seconds(), error=kind)
        return Outcome(started, reactor.seconds(), reply.code, reply.body)

    async def load(
        self,
        port: int,
        count: int = LOAD_REQUESTS,
        concurrency: int = LOAD_CONCURRENCY,
        until: Optional[Callable[[], bool]] = None,
    ) -> list[Outcome]:
        """
        C{count} GETs from C{concurrency} keep-alive clients at once (fewer
        if C{until()} becomes true first); every outcome, in the order the
        requests were started.
        """
        client = self.http_client()
        outcomes: list[Optional[Outcome]] = [None] * count
        todo = iter(range(count))

        async def worker() -> None:
            for i in todo:
                if until is not None and until():
                    return
                outcomes[i] = await self.get(client, f"http://{LOOPBACK}:{port}/load/{i}")

        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(worker()) for _ in range(concurrency)]
        )
        return [o for o in outcomes if o is not None]

    def assertAllGood(self, outcomes: list[Outcome]) -> None:
        bad = [o for o in outcomes if not (o.ok and o.body.startswith(b"good-"))]
        self.assertEqual(bad, [])

    def pool_node(self, service: Any, backend: RawBackend) -> Any:
        return service.pool.get(backend.url)


class KilledMidResponseTests(FaultCase):
    """
    A node that dies (stops listening and drops every connection) in the
    middle of sending its first response.
    """

    async def dying_node(self) -> RawBackend:
        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            if len(backend.requests) > 1:
                return  # it is dying: no answer
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            conn.transport.write(b"x" * 1000)
            # Let the bytes written so far leave before everything is dropped.
            self.later(0.05, lambda: defer.Deferred.fromCoroutine(kill(backend)))

        backend = await self.backend(handler)
        return backend

    async def test_alone(self) -> None:
        """
        The client has the head and part of the body when its connection is
        closed: never a response that looks complete. The next requests
        find the node refusing: plain-text 502s until it has failed C{fall}
        times, then 503 at once.
        """
        backend = await self.dying_node()
        service, port = await self.balancer([backend.url], "--fall", "2")
        client = await self.client(port)
        client.send(get(b"/"))
        self.assertIsNone(await client.response())
        self.assertIn(b"Content-Length: 100000", client.data)
        self.assertLess(len(client.data), 100000)
        await wait_for(lambda: not backend.port.connected, "the node to die")
        self.assertPlainTextError(await self.exchange(port, get(b"/again")), 502)
        self.assertPlainTextError(await self.exchange(port, get(b"/again")), 502)
        self.assertPlainTextError(await self.exchange(port, get(b"/again")), 503)
        self.assertFalse(self.pool_node(service, backend).healthy)

    async def test_one_of_three_under_load(self) -> None:
        """
        Only the request the node was sending when it died fails (cut short);
        every other GET is answered 200 by the other nodes, and the dead
        node leaves the rotation.
        """
        backend = await self.dying_node()
        good = await self.good_nodes()
        # Every request to the dying node fails at once; with six clients the
        # retry budget's floor of 3 could refuse one of their retries (that is
        # tested in test_overload), so this test about failover lifts it.
        service, port = await self.balancer(
            [backend.url] + [g.url for g in good], "--fall", "2", "--retry-budget", "100"
        )
        outcomes = await self.load(port)
        failed = [o for o in outcomes if not o.ok]
        self.assertEqual(len(failed), 1, failed)
        self.assertIsNone(failed[0].code)
        self.assertAllGood([o for o in outcomes if o.ok])
        self.assertFalse(self.pool_node(service, backend).healthy)


class SilentNodeTests(FaultCase):
    """
    A node that accepts connections and requests and never answers.
    """

    async def test_alone(self) -> None:
        """
        GET and POST get a plain-text 504 once --timeout has passed.
        """
        backend = await self.backend(lambda request, conn: None)
        _, port = await self.balancer([backend.url], "--timeout", SHORT_TIMEOUT, "--fall", "9")
        for request in (get(b"/g"), post(b"/p", b"body")):
            started = reactor.seconds()
            self.assertPlainTextError(await self.exchange(port, request), 504)
            self.assertGreaterEqual(reactor.seconds() - started, float(SHORT_TIMEOUT))
            self.assertLess(reactor.seconds() - started, 3.0)

    async def test_one_of_three_under_load(self) -> None:
        """
        The requests it took get 504 after --timeout (at most C{fall} plus
        those already on their way to it); it then leaves the rotation and
        every other GET is answered 200.
        """
        backend = await self.backend(lambda request, conn: None)
        good = await self.good_nodes()
        service, port = await self.balancer(
            [backend.url] + [g.url for g in good], "--timeout", SHORT_TIMEOUT, "--fall", "2"
        )
        outcomes = await self.load(port)
        failed = [o for o in outcomes if not o.ok]
        self.assertEqual([o.code for o in failed], [504] * len(backend.requests))
        self.assertGreaterEqual(len(failed), 2)
        self.assertLessEqual(len(failed), 2 + LOAD_CONCURRENCY)
        self.assertAllGood([o for o in outcomes if o.ok])
        self.assertFalse(self.pool_node(service, backend).healthy)


class ResettingNodeTests(FaultCase):
    """
    A node that resets every second connection it accepts (after reading
    the request, so it may have acted on it).
    """

    async def resetting_node(self) -> RawBackend:
        def handler(request: RecordedRequest, conn: BackendConnection) -> Optional[bytes]:
            if backend.connections.index(conn) % 2 == 1:
                reset(conn.transport)
                return None
            return response(body=b"good-resetter")

        backend = await self.backend(handler)
        return backend

    async def test_alone(self) -> None:
        """
        With a new connection per request (--max-idle-per-node 0), GETs
        alternate between 200 and a plain-text 502 (there is no other node
        to retry on) and a POST on a reset connection gets 502. Each reset
        counts as a failed check: a successful request is not a check, so
        with no probe passing in between (none run here) the node leaves
        the rotation at its C{fall}th reset, here the fifth.
        """
        backend = await self.resetting_node()
        service, port = await self.balancer(
            [backend.url], "--max-idle-per-node", "0", "--fall", "5"
        )
        codes = []
        for _ in range(6):
            result = await self.exchange(port, get(b"/"))
            assert result is not None
            codes.append(result.code)
        self.assertEqual(codes, [200, 502] * 3)
        await self.exchange(port, get(b"/"))  # connection 7 answers, 8 resets
        self.assertPlainTextError(await self.exchange(port, post(b"/p", b"x")), 502)
        self.assertTrue(self.pool_node(service, backend).healthy)

    async def test_one_of_three_under_load(self) -> None:
        """
        Every GET is answered 200: those on a reset connection are sent to
        another node.
        """
        backend = await self.resetting_node()
        good = await self.good_nodes()
        _, port = await self.balancer(
            [backend.url] + [g.url for g in good], "--max-idle-per-node", "2", "--fall", "5"
        )
        outcomes = await self.load(port)
        self.assertAllGood(outcomes)
        self.assertGreater(len(backend.connections), 1)


class GarbageNodeTests(FaultCase):
    """
    A node that answers bytes that are not HTTP.
    """

    async def test_alone(self) -> None:
        """
        GET and POST get a plain-text 502 naming a bad response.
        """
        backend = await self.backend(garbage)
        _, port = await self.balancer([backend.url])
        for request in (get(b"/g"), post(b"/p", b"body")):
            result = await self.exchange(port, request)
            self.assertPlainTextError(result, 502)
            assert result is not None
            self.assertIn(b"bad response", result.body)

    async def test_one_of_three_under_load(self) -> None:
        """
        Exactly the requests it took get a 502; the rest are answered 200.
        A bad response is a failure of the node (passive health, as HAProxy's
        observe layer7 counts it), so after --fall of them it leaves the
        rotation and takes no more.
        """
        backend = await self.backend(garbage)
        good = await self.good_nodes()
        service, port = await self.balancer([backend.url] + [g.url for g in good])
        outcomes = await self.load(port)
        failed = [o for o in outcomes if not o.ok]
        self.assertEqual([o.code for o in failed], [502] * len(backend.requests))
        # --fall 3, and a few more that were on their way to it meanwhile.
        self.assertGreaterEqual(len(failed), 3)
        self.assertLess(len(failed), LOAD_REQUESTS // 3)
        self.assertFalse(self.pool_node(service, backend).healthy)
        self.assertAllGood([o for o in outcomes if o.ok])


class HugeHeadNodeTests(FaultCase):
    """
    A node that answers with a 1 MiB response header block.
    """

    async def test_alone(self) -> None:
        """
        A plain-text 502 (rrlb reads at most 64 KiB of a response head),
        and rrlb goes on serving.
        """
        backend = await self.backend(huge_head)
        service, port = await self.balancer([backend.url])
        for _ in range(3):
            result = await self.exchange(port, get(b"/"))
            self.assertPlainTextError(result, 502)
            assert result is not None
            self.assertIn(b"too large", result.body)
        upstream = service.traffic.upstream
        await wait_for(lambda: upstream.connection_count == 0, "node connections closed")

    async def test_complete_in_one_read(self) -> None:
        """
        A 100 KiB head that arrives whole in one read is refused like one
        that arrives in pieces: the 64 KiB limit does not depend on how
        the bytes came.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> bytes:
            line = b"X-Padding: " + b"p" * 1000 + b"\r\n"
            return b"HTTP/1.1 200 OK\r\n" + line * 100 + b"Content-Length: 2\r\n\r\nok"

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url])
        for _ in range(3):
            result = await self.exchange(port, get(b"/"))
            self.assertPlainTextError(result, 502)
            assert result is not None
            self.assertIn(b"too large", result.body)

    async def test_one_of_three_under_load(self) -> None:
        """
        Every GET is answered 200: a head that never ends within 64 KiB is
        no response at all, so the request is sent to another node and the
        failure counts against the node, which leaves the rotation.
        """
        backend = await self.backend(huge_head)
        good = await self.good_nodes()
        service, port = await self.balancer([backend.url] + [g.url for g in good], "--fall", "2")
        outcomes = await self.load(port)
        self.assertAllGood(outcomes)
        self.assertGreaterEqual(len(backend.requests), 2)
        self.assertFalse(self.pool_node(service, backend).healthy)


class ClosingNodeTests(FaultCase):
    """
    A node that answers keep-alive and then closes the connection, so every
    connection rrlb pooled is dead by the next request.
    """

    async def test_alone(self) -> None:
        """
        Every request, POSTs included, is answered 200, each on a new
        connection; the node sees each request exactly once.
        """
        backend = await self.backend(close_after_answer)
        service, port = await self.balancer([backend.url])
        client = await self.client(port)
        for i in range(6):
            client.send(post(b"/p%d" % i, b"x") if i % 2 else get(b"/g%d" % i))
            result = await client.response()
            assert result is not None
            self.assertEqual((result.code, result.body), (200, b"closer"))
            await wait_for(
                lambda: service.traffic.upstream.connection_count == 0,
                "rrlb to see the node close",
            )
        self.assertEqual(len(backend.connections), 6)
        self.assertEqual(len(backend.requests), 6)

    async def test_one_of_three_under_load(self) -> None:
        """
        Every GET is answered 200.
        """
        backend = await self.backend(close_after_answer)
        good = await self.good_nodes()
        _, port = await self.balancer([backend.url] + [g.url for g in good])
        outcomes = await self.load(port)
        self.assertEqual([o for o in outcomes if not o.ok], [])
        self.assertEqual(
            sum(o.body == b"closer" for o in outcomes), len({r.target for r in backend.requests})
        )


class OneBytePerSecondTests(FaultCase):
    """
    A node that sends its response one byte per second.
    """

    def dribble(self, data: bytes, conn: BackendConnection, interval: float = 1.0) -> None:
        """
        Send C{data} on C{conn} one byte every C{interval} seconds.
        """

        def send(i: int) -> None:
            if conn.closed or i >= len(data):
                return
            conn.transport.write(data[i : i + 1])
            self.later(interval, send, i + 1)

        send(0)

    async def test_head_alone(self) -> None:
        """
        A head that trickles in a byte a second never arrives in time: 504
        once --timeout has passed since the request went out, although a
        byte came every second (--timeout bounds the wait for the head, and
        only the silence between body chunks).
        """
        backend = await self.backend(lambda r, conn: self.dribble(response(), conn))
        _, port = await self.balancer([backend.url], "--timeout", "1.5", "--fall", "9")
        started = reactor.seconds()
        self.assertPlainTextError(await self.exchange(port, get(b"/")), 504)
        self.assertLess(reactor.seconds() - started, 4.0)

    async def test_body_alone(self) -> None:
        """
        A head sent at once and a body a byte a second, with --timeout
        above a second: the body keeps making progress, so the client gets
        all of it.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
            self.dribble(b"abc", conn)

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url], "--timeout", "1.5")
        result = await self.exchange(port, get(b"/"))
        assert result is not None
        self.assertEqual((result.code, result.body), (200, b"abc"))

    async def test_one_of_three_under_load(self) -> None:
        """
        With --timeout under a second, the requests it took get 504 (at most
        C{fall} plus those already on their way); it leaves the rotation and
        every other GET is answered 200.
        """
        backend = await self.backend(lambda r, conn: self.dribble(response(), conn))
        good = await self.good_nodes()
        service, port = await self.balancer(
            [backend.url] + [g.url for g in good], "--timeout", SHORT_TIMEOUT, "--fall", "2"
        )
        outcomes = await self.load(port)
        failed = [o for o in outcomes if not o.ok]
        self.assertEqual([o.code for o in failed], [504] * len(backend.requests))
        self.assertLessEqual(len(failed), 2 + LOAD_CONCURRENCY)
        self.assertAllGood([o for o in outcomes if o.ok])
        self.assertFalse(self.pool_node(service, backend).healthy)


class KillAndRestartTests(FaultCase):
    """
    One of three nodes killed and started again, twice, under load.
    """

    timeout = 45

    async def test_killed_and_restarted_twice(self) -> None:
        """
        Under a bounded load of GETs, one of three nodes is killed (stops
        listening, every connection dropped) and restarted on the same port
        twice, with health probes bringing it back. No GET that started
        after rrlb saw the first failure fails; the total of client-visible
        errors is printed.
        """
        nodes = [
            await self.backend(lambda r, c, n=i: response(body=b"good-%d" % n)) for i in range(3)
        ]
        victim = nodes[0]
        port_number = victim.port.getHost().port
        service, port = await self.balancer(
            [n.url for n in nodes],
            "--health-interval",
            "0.1",
            "--health-timeout",
            "0.5",
            "--rise",
            "2",
            "--fall",
            "2",
            probes=True,
        )
        node = self.pool_node(service, victim)
        events = self.capture_log()
        done = []

        def served() -> int:
            return sum(len(n.requests) for n in nodes)

        async def more_load(count: int, what: str) -> None:
            # The load runs on for COUNT more answers (or the victim's).
            mark = served()
            await wait_for(lambda: served() >= mark + count, what)

        async def victim_serves(count: int, what: str) -> None:
            mark = len(victim.requests)
            await wait_for(lambda: len(victim.requests) >= mark + count, what)

        async def chaos() -> None:
            for _ in range(2):
                await victim_serves(CHAOS_STEP, "the node to take its share of the load")
                await kill(victim)
                await wait_for(lambda: not node.healthy, "the node to leave", timeout=5)
                await more_load(CHAOS_STEP, "load over the other nodes")
                await restart(victim, port_number)
                await wait_for(lambda: node.healthy, "the node to come back", timeout=5)
            await victim_serves(CHAOS_STEP, "the node to serve again")
            done.append(True)

        load = defer.Deferred.fromCoroutine(
            self.load(port, count=20000, concurrency=4, until=lambda: bool(done))
        )
        await defer.Deferred.fromCoroutine(chaos())
        outcomes = await load
        # The first time rrlb said anything about the node failing.
        first_failure = min(e["log_time"] for e in events if e.get("node") == victim.url)
        failed = [o for o in outcomes if not o.ok]
        print(
            f"\n  kill/restart x2 under load: {len(outcomes)} GETs,"
            f" {len(failed)} client-visible errors"
            f" ({', '.join(sorted({str(o.code or o.error) for o in failed})) or 'none'})"
        )
        # Outcome times are the reactor's, log times the wall clock's.
        offset = reactor.seconds() - time.time()
        late = [o for o in failed if o.started >= first_failure + offset]
        self.assertEqual(late, [])
        self.assertTrue(all(o.body.startswith(b"good-") for o in outcomes if o.ok))
        self.assertGreater(node.errors, 0)
        self.assertTrue(node.healthy)
        self.assertGreater(len(victim.requests), 0)
