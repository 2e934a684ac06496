"""
The client limits and timeouts (issue 10): each with C{task.Clock} on an
in-memory transport where time matters, and over real loopback sockets
where the wire does: the status, C{Connection: close}, no node contacted,
a normal request still served, and the refusal counted and logged.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from rrlb.admin import ADMIN_IDLE_TIMEOUT, ADMIN_MAX_CONNECTIONS, AdminSite
from rrlb.body import NODE_FULL
from rrlb.channel import READ_AHEAD
from rrlb.clients import (
    CLOSE_TIMEOUT,
    ClientLimits,
    ClientSite,
    connections_that_fit,
    is_trusted,
    raise_fd_limit,
    real_client,
)
from rrlb.parser import MAX_REQUEST_LINE
from rrlb.proxy import ProxyChannel
from rrlb.settings import DEFAULT_MAX_CONNECTIONS
from rrlb.values import ConfigError, byte_size, trusted_networks
from tests.support import (
    Harness,
    LogCapture,
    Swallow,
    admin_url,
    balancer_options,
    http_request,
    parse_error,
    raw_connect,
    raw_request,
    samples,
    split_response,
    start_backend,
    start_balancer,
    start_daemon,
    wait_until,
)

reactor: Any = _reactor

GOOD = b"GET /ok HTTP/1.1\r\nHost: good\r\nConnection: close\r\n\r\n"


class ClockTimeoutTests(unittest.TestCase):
    """
    The header, body and keep-alive timeouts, driven by a L{Clock}.
    """

    def test_silent_connection_closed_quietly(self) -> None:
        """
        A connection that sends nothing is closed after the header timeout,
        with no response.
        """
        harness = Harness(header_timeout=10)
        channel, transport = harness.connect()
        harness.clock.advance(9)
        self.assertFalse(transport.disconnecting)
        harness.clock.advance(1.5)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        harness.lose(channel)
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_header_timeout(self) -> None:
        """
        A head not complete within the header timeout of its first byte
        gets 408 with Connection: close, is logged and counted, and the
        connection closes.
        """
        harness = Harness(header_timeout=10)
        channel, transport = harness.connect()
        harness.clock.advance(5)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHo")
        harness.clock.advance(9)
        self.assertEqual(transport.value(), b"")
        harness.clock.advance(2)
        status, headers, body = split_response(transport.value())
        self.assertEqual(status, b"HTTP/1.1 408 Request Timeout")
        self.assertIn((b"Connection", b"close"), headers)
        self.assertTrue(body.startswith(b"408 Request Timeout: "))
        self.assertTrue(transport.disconnecting)
        (request,) = harness.logged
        self.assertEqual(request.client_error, "header_timeout")

    def test_slow_head_on_keepalive(self) -> None:
        """
        On a keep-alive connection the header timeout of each request counts
        from that request's first byte, not from the connection's start.
        """
        harness = Harness(header_timeout=10, keepalive_timeout=60)
        channel, transport = harness.connect()
        channel.dataReceived(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        transport.clear()
        harness.clock.advance(30)
        channel.dataReceived(b"GET /2 HTTP/1.1\r\n")
        harness.clock.advance(9)
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"Host: x\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        transport.clear()
        channel.dataReceived(b"G")
        harness.clock.advance(11)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))

    def test_body_timeout(self) -> None:
        """
        No body byte for the body timeout: 408, counted as body_timeout.
        Every byte that arrives starts the wait again.
        """
        harness = Harness(Swallow(), body_timeout=60)
        channel, transport = harness.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        harness.clock.advance(59)
        channel.dataReceived(b"6")
        harness.clock.advance(59)
        self.assertEqual(transport.value(), b"")
        harness.clock.advance(2)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertEqual(harness.logged[0].client_error, "body_timeout")
        self.assertEqual(harness.logged[0].method, b"POST")

    def test_keepalive_timeout(self) -> None:
        """
        An idle keep-alive connection is closed quietly after the
        keep-alive timeout.
        """
        harness = Harness(keepalive_timeout=60, header_timeout=10)
        channel, transport = harness.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        transport.clear()
        harness.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        harness.clock.advance(2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(harness.logged), 1)

    def test_sweep_stops_with_the_last_connection(self) -> None:
        """
        No timer is left once every connection is gone.
        """
        harness = Harness()
        channels = [harness.connect()[0] for _ in range(3)]
        self.assertEqual(len(harness.clock.getDelayedCalls()), 1)
        for channel in channels:
            harness.lose(channel)
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_head_byte_by_byte(self) -> None:
        """
        A head that arrives one byte at a time is read as if it came whole,
        and a bare LF split across reads is still caught.
        """
        harness = Harness()
        channel, transport = harness.connect()
        for byte in b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\n":
            channel.dataReceived(bytes([byte]))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"), transport.value())
        self.assertEqual(harness.logged[0].uri, b"/a")
        channel, transport = harness.connect()
        for byte in b"GET /b HTTP/1.1\nHost: x\n\n":
            channel.dataReceived(bytes([byte]))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "), transport.value())

    def test_pipelined_requests(self) -> None:
        """
        Requests sent together are answered in order on one connection.
        """
        harness = Harness()
        channel, transport = harness.connect()
        channel.dataReceived(
            b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 3)
        self.assertEqual([r.uri for r in harness.logged], [b"/1", b"/2", b"/3"])
        self.assertTrue(transport.disconnecting)


class Held(Resource):
    """
    Keeps each request unanswered until the test answers it with
    L{answer}.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []

    def render(self, request: Any) -> Any:
        self.requests.append(request)
        return NOT_DONE_YET

    def answer(self, count: int = 1) -> None:
        for _ in range(count):
            request = self.requests.pop(0)
            request.write(b"ok")
            request.finish()


PIPELINED = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


class ReadAheadTests(unittest.TestCase):
    """
    Pipelined requests read while one is in progress (issue 17): no more
    than READ_AHEAD bytes of them, whatever the state of the writes, and no
    reason to stop reading lifted by another.
    """

    def start(self) -> tuple[Held, ProxyChannel, StringTransport]:
        held = Held()
        harness = self.harness = Harness(held)
        channel, transport = harness.connect()
        channel.dataReceived(PIPELINED)
        self.assertEqual(len(held.requests), 1)
        return held, channel, transport

    def test_read_ahead_while_the_client_does_not_read(self) -> None:
        """
        A client whose responses fill rrlb's write buffer is still read no
        further than READ_AHEAD bytes of pipelined requests.
        """
        held, channel, transport = self.start()
        channel.pauseProducing()  # the client's write buffer is full
        self.assertEqual(transport.producerState, "producing")
        channel.dataReceived(PIPELINED * (READ_AHEAD // len(PIPELINED)))
        self.assertEqual(transport.producerState, "producing")
        channel.dataReceived(PIPELINED)
        self.assertEqual(transport.producerState, "paused")

    def test_writes_resuming_do_not_resume_read_ahead(self) -> None:
        """
        The write buffer draining does not resume reading stopped at
        READ_AHEAD; answering a request resumes it only once less than
        READ_AHEAD is left.
        """
        held, channel, transport = self.start()
        count = READ_AHEAD // len(PIPELINED) + 3
        channel.pauseProducing()
        channel.dataReceived(PIPELINED * count)
        self.assertEqual(transport.producerState, "paused")
        channel.resumeProducing()
        self.assertEqual(transport.producerState, "paused")
        held.answer()
        # The next one is in progress, and more than READ_AHEAD still waits.
        self.assertEqual(len(held.requests), 1)
        self.assertEqual(transport.producerState, "paused")
        held.answer(3)
        self.assertEqual(transport.producerState, "producing")
        held.answer(count - 3)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), count + 1)
        self.assertEqual(held.requests, [])

    def test_next_request_waits_for_the_response_before(self) -> None:
        """
        A response left unsent when its request ends stops reading, and the
        next request (already read) starts only once the client took it.
        """
        held, channel, transport = self.start()
        channel.dataReceived(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\nGET /3 HTTP/1.1\r\nHo")
        channel.pauseProducing()
        held.answer()
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(held.requests, [])
        # What a TLS transport still hands on from a record after the pause.
        channel.dataReceived(b"st: x\r\n\r\nGET /4 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(held.requests, [])
        channel.resumeProducing()
        self.assertEqual([r.uri for r in held.requests], [b"/2"])
        self.assertEqual(transport.producerState, "producing")
        held.answer(3)
        self.assertEqual([r.uri for r in self.harness.logged], [b"/", b"/2", b"/3", b"/4"])

    def test_read_ahead_does_not_resume_paused_writes(self) -> None:
        """
        Serving the read-ahead does not resume reading that a response left
        unsent stopped, nor does the write side resume reading stopped for
        the read-ahead.
        """
        held, channel, transport = self.start()
        channel.dataReceived(PIPELINED * (READ_AHEAD // len(PIPELINED) + 1))
        self.assertEqual(transport.producerState, "paused")
        held.answer()
        channel.pauseProducing()
        held.answer()
        self.assertEqual(transport.producerState, "paused")
        channel.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_reads_while_busy_are_kept_whole(self) -> None:
        """
        Pipelined requests that arrive in many small reads, heads split
        across them, are all served in order.
        """
        held, channel, transport = self.start()
        data = b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(200))
        for i in range(0, len(data), 7):
            channel.dataReceived(data[i : i + 7])
        held.answer(201)
        self.assertEqual(
            [r.uri for r in self.harness.logged], [b"/"] + [b"/%d" % i for i in range(200)]
        )

    def test_many_pipelined_requests_answered_at_once(self) -> None:
        """
        Thousands of pipelined requests that rrlb answers at once (a 404, a
        503) are answered in a loop, not by recursion that would run out of
        stack.
        """
        harness = Harness()
        logs = LogCapture.install(self)
        channel, transport = harness.connect()
        channel.dataReceived(PIPELINED * 3000)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 3000)
        self.assertEqual(len(harness.logged), 3000)
        self.assertEqual([e for e in logs.events if e.get("log_failure")], [])
        self.assertFalse(transport.disconnecting)

    def test_tunnel_hold_and_writes(self) -> None:
        """
        In a tunnel, the node's full buffer (rrlb.tunnel holds the client)
        and the client's full buffer are two reasons not to read: neither
        resumes reading the other stopped.
        """
        held, channel, transport = self.start()
        channel.dataReceived(PIPELINED * (READ_AHEAD // len(PIPELINED) + 1))
        self.assertEqual(transport.producerState, "paused")
        buffered = channel.start_tunnel(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        self.assertEqual(len(buffered), len(PIPELINED) * (READ_AHEAD // len(PIPELINED) + 1))
        self.assertEqual(transport.producerState, "producing")
        channel.hold(NODE_FULL)
        self.assertEqual(transport.producerState, "paused")
        channel.pauseProducing()
        channel.resumeProducing()
        self.assertEqual(transport.producerState, "paused")
        channel.release(NODE_FULL)
        self.assertEqual(transport.producerState, "producing")

    def test_close_timeout(self) -> None:
        """
        A connection rrlb closes after a response is cut off if its client
        takes none of what is left for the close timeout.
        """
        harness = Harness()
        channel, transport = harness.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        harness.clock.advance(CLOSE_TIMEOUT - 1)
        self.assertFalse(transport.disconnected)
        harness.clock.advance(2)
        self.assertTrue(transport.disconnected)

    def test_close_timeout_after_a_refusal(self) -> None:
        """
        On a transport that cannot half-close (TLS, a haproxy: listener;
        here an in-memory one), a refused client is closed at once, and cut
        off if it takes none of its answer for the close timeout.
        """
        harness = Harness()
        channel, transport = harness.connect()
        channel.dataReceived(b"GET / HTTP/1.1\nHost: x\n\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))
        self.assertTrue(transport.disconnecting)
        harness.clock.advance(CLOSE_TIMEOUT - 1)
        self.assertFalse(transport.disconnected)
        harness.clock.advance(2)
        self.assertTrue(transport.disconnected)

    def test_close_timeout_when_idle(self) -> None:
        """
        So is a keep-alive connection closed when it was idle too long.
        """
        harness = Harness(keepalive_timeout=10)
        channel, transport = harness.connect()
        channel.dataReceived(PIPELINED)
        harness.clock.advance(11)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        harness.clock.advance(CLOSE_TIMEOUT)
        self.assertTrue(transport.disconnected)


class SizeLimitTests(unittest.TestCase):
    """
    Head and body limits over real loopback sockets.
    """

    async def start(self, *args: str) -> Any:
        self.backend = await start_backend(self, "a")
        self.balancer = await start_balancer(self, [self.backend.url], *args)
        return self.balancer

    async def refused(self, data: bytes, code: int, phrase: bytes) -> list[tuple[bytes, bytes]]:
        received = await raw_request(self, self.balancer.port, data)
        status, headers, body = split_response(received)
        self.assertEqual(status, b"HTTP/1.1 %d %s" % (code, phrase), received[:200])
        self.assertIn((b"Connection", b"close"), headers)
        self.assertTrue(body.startswith(b"%d %s: " % (code, phrase)), body)
        self.assertEqual(self.backend.requests, [])
        good = await raw_request(self, self.balancer.port, GOOD)
        self.assertTrue(good.startswith(b"HTTP/1.1 200 "), good)
        self.backend.requests.clear()
        return headers

    async def test_huge_header_line(self) -> None:
        """
        One 64 KiB header line gets 431 (not a dropped connection).
        """
        await self.start()
        await self.refused(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n",
            431,
            b"Request Header Fields Too Large",
        )

    async def test_max_header_size(self) -> None:
        """
        The request line and header lines may be --max-header-size bytes in
        all; one more gets 431.
        """
        await self.start("--max-header-size", "200")
        line = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: "
        fits = line + b"a" * (200 - len(line)) + b"\r\n\r\n"
        received = await raw_request(self, self.balancer.port, fits)
        self.assertTrue(received.startswith(b"HTTP/1.1 200 "), received)
        self.backend.requests.clear()
        await self.refused(
            line + b"a" * (201 - len(line)) + b"\r\n\r\n", 431, b"Request Header Fields Too Large"
        )

    async def test_long_request_line(self) -> None:
        """
        A request line over 8192 bytes gets 414, whether or not its head
        has ended.
        """
        await self.start()
        target = b"/" + b"a" * MAX_REQUEST_LINE
        await self.refused(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, b"URI Too Long")
        await self.refused(b"GET " + target, 414, b"URI Too Long")

    async def test_max_headers(self) -> None:
        """
        More than --max-headers header lines gets 431.
        """
        await self.start("--max-headers", "5")
        head = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"X-A: 1\r\n" * 3
        received = await raw_request(self, self.balancer.port, head + b"\r\n")
        self.assertTrue(received.startswith(b"HTTP/1.1 200 "), received)
        self.backend.requests.clear()
        await self.refused(head + b"X-B: 2\r\n\r\n", 431, b"Request Header Fields Too Large")

    async def test_body_length_over_limit(self) -> None:
        """
        A Content-Length over --max-body-size gets 413 up front: no 100
        Continue, no node contacted, even if the body never comes.
        """
        await self.start("--max-body-size", "1K")
        await self.refused(
            b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 1025\r\nExpect: 100-continue\r\n\r\n",
            413,
            b"Content Too Large",
        )

    async def test_body_at_limit(self) -> None:
        """
        A body of exactly --max-body-size bytes goes through.
        """
        await self.start("--max-body-size", "1K")
        received = await raw_request(
            self,
            self.balancer.port,
            b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 1024\r\nConnection: close\r\n\r\n"
            + b"b" * 1024,
        )
        self.assertTrue(received.startswith(b"HTTP/1.1 200 "), received)
        self.assertEqual(self.backend.requests[0].body, b"b" * 1024)

    async def test_chunked_body_over_limit(self) -> None:
        """
        A chunked body gets 413 as soon as it passes --max-body-size, while
        the client is still sending, and the client reads the answer.
        """
        await self.start("--max-body-size", "1K")
        client = await raw_connect(self, self.balancer.port)
        client.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        client.send(b"200\r\n" + b"c" * 512 + b"\r\n")
        client.send(b"201\r\n" + b"c" * 513 + b"\r\n")
        received = await client.wait_for(lambda r: b"\r\n\r\n" in r)
        self.assertTrue(received.startswith(b"HTTP/1.1 413 Content Too Large"), received)
        for _ in range(10):  # still sending: the answer is not lost to a reset
            client.send(b"400\r\n" + b"c" * 1024 + b"\r\n")
        await client.closed
        self.assertEqual(self.backend.requests, [])


class ClientErrorRecordTests(unittest.TestCase):
    """
    Refused requests are counted in /metrics by reason and written to the
    access log.
    """

    async def test_counted_and_logged(self) -> None:
        """
        rrlb_client_errors_total counts each reason (every reason exported,
        zero until seen) and the access log has a line per refusal.
        """
        backend = await start_backend(self, "a")
        log_path = self.mktemp()
        balancer = await start_balancer(
            self,
            [backend.url],
            "--admin",
            "tcp:0:interface=127.0.0.1",
            "--access-log",
            log_path,
            "--access-log-format",
            "json",
            "--max-body-size",
            "10",
        )
        await raw_request(self, balancer.port, b"GET / HTTP/1.1\r\nHost : x\r\n\r\n")
        await raw_request(
            self, balancer.port, b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n"
        )
        await raw_request(
            self, balancer.port, b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: x\r\n\r\n"
        )
        admin = await admin_url(balancer)
        text = (await http_request(self, "GET", admin + "/metrics")).body.decode()
        found = samples(text)

        def count(reason: str) -> float:
            return found[("rrlb_client_errors_total", (("reason", reason),))]

        self.assertEqual(count("bad_request"), 1)
        self.assertEqual(count("body_too_large"), 1)
        self.assertEqual(count("unknown_coding"), 1)
        self.assertEqual(count("header_timeout"), 0)
        balancer.service.traffic.access_log.flush()
        with open(log_path) as f:
            records = [json.loads(line) for line in f]
        self.assertEqual(sorted(r["status"] for r in records), [400, 413, 501])
        bad = [r for r in records if r["status"] == 400][0]
        self.assertEqual((bad["method"], bad["uri"], bad["protocol"]), ("GET", "/", "HTTP/1.1"))
        upload = [r for r in records if r["status"] == 413][0]
        self.assertEqual((upload["method"], upload["uri"]), ("POST", "/up"))
        self.assertEqual(upload["remote_addr"], "127.0.0.1")
        self.assertIsNone(upload["node"])


class HeaderTimeoutWireTests(unittest.TestCase):
    """
    The header timeout over real sockets, and slowloris.
    """

    async def test_slow_head_gets_408(self) -> None:
        """
        A head that does not complete in time gets 408 and the connection
        closes; no node sees anything.
        """
        backend = await start_backend(self, "a")
        balancer = await start_balancer(self, [backend.url], "--client-header-timeout", "0.3")
        client = await raw_connect(self, balancer.port)
        client.send(b"GET / HTTP/1.1\r\n")
        received = await client.closed
        self.assertTrue(received.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), received)
        self.assertEqual(backend.requests, [])

    async def test_slowloris(self) -> None:
        """
        500 connections dribbling their heads a byte at a time are all
        closed by the header timeout, while a normal client's requests keep
        succeeding.
        """
        backend = await start_backend(self, "a")
        balancer = await start_balancer(self, [backend.url], "--client-header-timeout", "1.5")
        head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
        clients = []
        for _ in range(500):
            # Each starts its head at once: a connection that has sent
            # nothing is idle, and closed without a 408 (on a loaded machine
            # connecting 500 can take longer than the timeout).
            client = await raw_connect(self, balancer.port)
            client.send(head[:1])
            clients.append(client)
        started = reactor.seconds()
        served = 0
        step = 1
        while not all(c.closed.called for c in clients):
            self.assertLess(reactor.seconds() - started, 10, "slowloris connections still open")
            for client in clients:
                if not client.closed.called:
                    client.send(head[step : step + 1])
            step += 1
            # The normal client's answer paces the rounds: one byte per
            # slow connection per request served.
            reply = await raw_request(self, balancer.port, GOOD)
            self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
            served += 1
        elapsed = reactor.seconds() - started
        self.assertGreater(elapsed, 1.4)
        self.assertGreater(served, 5)
        for client in clients:
            self.assertTrue(client.received.startswith(b"HTTP/1.1 408 "), client.received)
        self.assertEqual({r.uri for r in backend.requests}, {b"/ok"})
        await wait_until(lambda: not balancer.service.traffic.site.channels, what="channels to go")


def unread(site: Any) -> list[Any]:
    """
    The listening ports and parked client connections of C{site} that the
    reactor still reads: none while it is at its connection cap.
    """
    readers = reactor.getReaders()
    waiting = list(site.ports) + [channel.transport for channel in site.parked]
    return [r for r in waiting if r in readers]


class ConnectionCapTests(unittest.TestCase):
    """
    --max-connections: rrlb stops accepting at the cap and starts again
    below it.
    """

    async def test_cap(self) -> None:
        """
        With more clients than the cap, the extra ones wait unaccepted (in
        the kernel's backlog) until others close; then they are served, and
        the process idles once everything has closed.
        """
        backend = await start_backend(self, "a")
        logs = LogCapture.install(self)
        balancer = await start_balancer(self, [backend.url], "--max-connections", "5")
        site = balancer.service.traffic.site
        clients = [await raw_connect(self, balancer.port) for _ in range(8)]
        await wait_until(lambda: len(site.channels) == 5, what="five accepted")
        # Nothing can let another one in: the listening port is out of the
        # reactor's readers, and a client accepted past the cap in the same
        # wake-up is parked with its reading paused.
        self.assertTrue(site.paused)
        self.assertEqual(unread(site), [])
        self.assertEqual(len(site.channels), 5)
        for client in clients[5:]:
            client.send(GOOD)
        # A keep-alive request sent after theirs on an accepted connection is
        # answered while they still have nothing.
        clients[0].send(b"GET /first HTTP/1.1\r\nHost: good\r\n\r\n")
        await clients[0].wait_for(lambda data: data.endswith(b"\r\n\r\na"))
        self.assertTrue(clients[0].received.startswith(b"HTTP/1.1 200 "), clients[0].received)
        self.assertEqual(unread(site), [])
        self.assertEqual([c.received for c in clients[5:]], [b""] * 3)
        for client in clients[:5]:
            client.send(GOOD)

        # The first five got their answers and closed; the last three were
        # let in as places came free.
        for client in clients:
            received = await client.closed
            self.assertTrue(received.startswith(b"HTTP/1.1 200 "), received)
        self.assertEqual([r.uri for r in backend.requests if r.uri == b"/ok"], [b"/ok"] * 8)
        await wait_until(lambda: not site.channels, what="every channel closed")
        self.assertFalse(site.paused)
        self.assertTrue(any("not accepting more" in m for m in logs.messages()))
        # The reactor is not kept busy with nothing: the site has no
        # connection, parked or open, and no sweep timer left, and its port
        # is back among the readers, accepting.
        self.assertEqual(site.parked, [])
        self.assertIsNone(site._sweep_call)
        self.assertEqual([p for p in site.ports if p not in reactor.getReaders()], [])
        good = await raw_request(self, balancer.port, GOOD)
        self.assertTrue(good.startswith(b"HTTP/1.1 200 "), good)

    async def test_burst_waits_in_the_backlog(self) -> None:
        """
        Of 200 clients that connect at once, rrlb takes no more from the
        kernel than the cap: the rest wait in the backlog, not in rrlb's
        descriptors (Twisted would accept up to a hundred per wake-up).
        """
        backend = await start_backend(self, "a")
        balancer = await start_balancer(self, [backend.url], "--max-connections", "5")
        site = balancer.service.traffic.site
        clients = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(raw_connect(self, balancer.port)) for _ in range(200)]
        )
        self.assertEqual(len(clients), 200)
        # A round trip elsewhere: rrlb has had its turns at the backlog.
        self.assertEqual((await http_request(self, "GET", backend.url + "/")).body, b"a")
        self.assertEqual(site.open_count, 5)
        self.assertTrue(site.paused)
        self.assertLessEqual(len(site.parked), 1)

    def test_streams_take_places_not_connections(self) -> None:
        """
        HTTP/2 streams beyond the first of their connection take places
        under the cap, but are not client connections: what
        C{rrlb_client_connections} and C{/status} count is unchanged.
        """
        site = ClientSite(Resource(), Clock(), ClientLimits(max_connections=3))
        for _ in range(3):
            self.assertTrue(site.stream_opened())
        self.assertEqual((site.open_count, site.taken), (0, 3))
        self.assertTrue(site.paused)
        self.assertFalse(site.stream_opened())
        site.stream_closed()
        self.assertEqual((site.open_count, site.taken), (0, 2))
        self.assertFalse(site.paused)

    async def test_lower_cap_on_reload(self) -> None:
        """
        Lowering the cap below the open connections stops accepting until
        enough have closed.
        """
        backend = await start_backend(self, "a")
        balancer = await start_balancer(self, [backend.url])
        site = balancer.service.traffic.site
        clients = [await raw_connect(self, balancer.port) for _ in range(3)]
        await wait_until(lambda: len(site.channels) == 3, what="three accepted")
        site.set_limits(ClientLimits(max_connections=2))
        self.assertTrue(site.paused)
        await clients[0].close()
        await clients[1].close()
        await wait_until(lambda: not site.paused, what="accepting again")


class AcceptsPerWakeupTests(unittest.TestCase):
    """
    C{ClientSite.accepts_per_wakeup}: a worker's port accepts one client
    per wake-up (nginx's C{multi_accept off}), through the port's own
    C{numberAccepts}, set before each wake-up.
    """

    async def accepted_per_wakeup(self, cap: Any) -> list[int]:
        """
        The channels a site with C{accepts_per_wakeup} C{cap} has after
        each of three wake-ups of its port, with three clients waiting in
        the backlog from the start.
        """
        clock = Clock()
        site = ClientSite(Resource(), clock, ClientLimits())
        site.protocol = ProxyChannel  # type: ignore[assignment]
        site.linger = False
        site.accepts_per_wakeup = cap
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = await endpoint.listen(site)
        self.addCleanup(port.stopListening)
        # The test wakes the port itself.
        port.stopReading()
        site.add_port(port)
        clients = [await raw_connect(self, port.getHost().port) for _ in range(3)]
        self.addCleanup(lambda: wait_until(lambda: not site.channels, what="channels closed"))
        counts = []
        for _ in range(3):
            port.doRead()
            counts.append(len(site.channels))
            # The reactor's turn after the wake-up.
            clock.advance(0)
        for client in clients:
            await client.close()
        return counts

    async def test_one_per_wakeup(self) -> None:
        """
        With C{accepts_per_wakeup} 1, each wake-up takes one client of
        those waiting, although Twisted raises the port's count after a
        full wake-up.
        """
        self.assertEqual(await self.accepted_per_wakeup(1), [1, 2, 3])

    async def test_no_cap(self) -> None:
        """
        Without it, one wake-up takes every client waiting.
        """
        self.assertEqual(await self.accepted_per_wakeup(None), [3, 3, 3])


class AdminConnectionTests(unittest.TestCase):
    """
    The admin endpoint is not under C{--max-connections}: it keeps at most
    L{ADMIN_MAX_CONNECTIONS} open, each idle at most L{ADMIN_IDLE_TIMEOUT}.
    """

    async def test_capped(self) -> None:
        """
        At the cap a new connection takes the place of the oldest idle one;
        when every one is in the middle of a request, it is closed at once.
        """
        balancer = await start_balancer(
            self, ["http://127.0.0.1:9"], "--admin", "tcp:0:interface=127.0.0.1"
        )
        url = await admin_url(balancer)
        port = int(url.rsplit(":", 1)[1])
        listener = balancer.service.admin_listener
        assert listener is not None
        site = listener.factory
        held = [await raw_connect(self, port) for _ in range(ADMIN_MAX_CONNECTIONS)]
        await wait_until(lambda: site.open_connections == ADMIN_MAX_CONNECTIONS, what="all open")
        reply = await http_request(self, "GET", url + "/status")
        self.assertEqual(reply.code, 200)
        self.assertEqual(await held[0].closed, b"")
        # Every one busy, half a request head each (the last one in the
        # place of the idle connection the request above left).
        def busy() -> int:
            return sum(1 for c in site.channels if c.requests)

        for client in held[1:]:
            client.send(b"GET /status HTTP/1.1\r\n")
        await wait_until(lambda: busy() == ADMIN_MAX_CONNECTIONS - 1, what="fifteen busy")
        (await raw_connect(self, port)).send(b"GET /status HTTP/1.1\r\n")
        await wait_until(lambda: busy() == ADMIN_MAX_CONNECTIONS, what="every one busy")
        extra = await raw_connect(self, port)
        extra.send(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertEqual(await extra.closed, b"")
        self.assertEqual(site.open_connections, ADMIN_MAX_CONNECTIONS)

    async def test_idle_timeout(self) -> None:
        """
        An admin connection that sends nothing is closed after
        L{ADMIN_IDLE_TIMEOUT}.
        """
        balancer = await start_balancer(self, ["http://127.0.0.1:9"])
        clock = Clock()
        site = AdminSite(balancer.service.pools, balancer.service.metrics, reactor=clock)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        client = await raw_connect(self, port.getHost().port)
        await wait_until(lambda: site.open_connections == 1, what="the connection")
        clock.advance(ADMIN_IDLE_TIMEOUT - 1)
        self.assertFalse(client.closed.called)
        clock.advance(1)
        await client.closed
        await wait_until(lambda: site.open_connections == 0, what="the count to drop")


class TrustedProxiesTests(unittest.TestCase):
    """
    --trusted-proxies: X-Forwarded-* from untrusted peers are replaced, from
    trusted ones kept and appended to.
    """

    FORWARDED = (
        b"GET / HTTP/1.1\r\nHost: edge.example\r\nConnection: close\r\n"
        b"X-Forwarded-For: 203.0.113.9, 10.1.2.3\r\nX-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: www.example\r\nForwarded: for=198.51.100.1\r\n"
        b"X_Forwarded_For: 198.51.100.2\r\n\r\n"
    )

    async def forwarded(self, *args: str) -> Any:
        backend = await start_backend(self, "a")
        log_path = self.mktemp()
        balancer = await start_balancer(
            self,
            [backend.url],
            "--access-log",
            log_path,
            "--access-log-format",
            "json",
            *args,
        )
        reply = await raw_request(self, balancer.port, self.FORWARDED)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        balancer.service.traffic.access_log.flush()
        with open(log_path) as f:
            (record,) = [json.loads(line) for line in f]
        return backend.requests[0], record

    async def test_unset_appends(self) -> None:
        """
        Without the option, X-Forwarded-For is appended to as before.
        """
        request, record = await self.forwarded()
        self.assertEqual(request.header(b"x-forwarded-for"), b"203.0.113.9, 10.1.2.3, 127.0.0.1")
        self.assertEqual(request.header(b"x-forwarded-proto"), b"http")
        self.assertEqual(record["remote_addr"], "127.0.0.1")

    async def test_untrusted_peer_replaced(self) -> None:
        """
        From a peer outside the trusted networks, what it says of the client
        is dropped and replaced by what rrlb saw.
        """
        request, record = await self.forwarded("--trusted-proxies", "10.0.0.0/8,192.168.0.0/16")
        self.assertEqual(request.header(b"x-forwarded-for"), b"127.0.0.1")
        self.assertIsNone(request.header(b"forwarded"))
        self.assertIsNone(request.header(b"x_forwarded_for"))
        self.assertEqual(request.header(b"x-forwarded-proto"), b"http")
        self.assertEqual(request.header(b"x-forwarded-host"), b"edge.example")
        self.assertEqual(record["remote_addr"], "127.0.0.1")

    async def test_trusted_peer_kept(self) -> None:
        """
        From a trusted peer they are kept and appended to, and the access log
        shows the first untrusted address from the right.
        """
        request, record = await self.forwarded("--trusted-proxies", "127.0.0.0/8, 10.0.0.0/8")
        self.assertEqual(request.header(b"x-forwarded-for"), b"203.0.113.9, 10.1.2.3, 127.0.0.1")
        self.assertEqual(request.header(b"x-forwarded-proto"), b"https, http")
        self.assertEqual(request.header(b"x-forwarded-host"), b"www.example, edge.example")
        self.assertEqual(record["remote_addr"], "203.0.113.9")

    # Every other header that claims who the client is or how it came in,
    # as CDNs, balancers and frameworks spell them (one with "_").
    CLAIMS = (
        (b"X-Real-IP", b"198.51.100.3"),
        (b"True-Client-IP", b"198.51.100.4"),
        (b"CF-Connecting-IP", b"198.51.100.5"),
        (b"Fastly-Client-IP", b"198.51.100.6"),
        (b"X-Client-IP", b"198.51.100.7"),
        (b"X-Cluster-Client-IP", b"198.51.100.8"),
        (b"Client-IP", b"198.51.100.9"),
        (b"X-Originating-IP", b"198.51.100.10"),
        (b"X-Remote-IP", b"198.51.100.11"),
        (b"X-Remote-Addr", b"198.51.100.12"),
        (b"X_Real_IP", b"198.51.100.13"),
        (b"X-Forwarded", b"for=198.51.100.14"),
        (b"Forwarded-For", b"198.51.100.15"),
        (b"X-Forwarded-Port", b"443"),
        (b"X-Forwarded-Server", b"edge"),
        (b"X-Forwarded-Scheme", b"https"),
        (b"X-Forwarded-Ssl", b"on"),
        (b"X-Forwarded-Prefix", b"/admin"),
        (b"X-Url-Scheme", b"https"),
        (b"Front-End-Https", b"on"),
        (b"X-Original-URL", b"/admin"),
        (b"X-Rewrite-URL", b"/admin"),
    )

    async def claimed(self, *args: str) -> list[tuple[bytes, bytes]]:
        """
        The claims of L{CLAIMS} that reached a node recording headers, sent
        by a raw client over loopback with C{args} given to rrlb.
        """
        backend = await start_backend(self, "a")
        balancer = await start_balancer(self, [backend.url], *args)
        head = b"GET / HTTP/1.1\r\nHost: edge.example\r\nConnection: close\r\n"
        head += b"".join(name + b": " + value + b"\r\n" for name, value in self.CLAIMS)
        reply = await raw_request(self, balancer.port, head + b"X-Other: kept\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        (request,) = backend.requests
        self.assertEqual(request.header(b"x-other"), b"kept")
        return [(n, v) for n, v in self.CLAIMS if request.header(n) == v]

    async def test_identity_headers_dropped(self) -> None:
        """
        From an untrusted peer, X-Real-IP, True-Client-IP, CF-Connecting-IP
        and every other header claiming the client's address, scheme, port
        or original URL are dropped like X-Forwarded-For.
        """
        reached = await self.claimed("--trusted-proxies", "10.0.0.0/8")
        self.assertEqual(reached, [])

    async def test_identity_headers_kept_from_trusted(self) -> None:
        """
        From a trusted peer, and without --trusted-proxies, they are kept.
        """
        self.assertEqual(await self.claimed("--trusted-proxies", "127.0.0.0/8"), list(self.CLAIMS))
        self.assertEqual(await self.claimed(), list(self.CLAIMS))

    async def test_status_shows_real_client(self) -> None:
        """
        /status lists open client connections with the real client behind
        trusted proxies, its peer, its state and its answered requests.
        """
        backend = await start_backend(self, "a")
        balancer = await start_balancer(
            self,
            [backend.url],
            "--admin",
            "tcp:0:interface=127.0.0.1",
            "--trusted-proxies",
            "127.0.0.0/8",
        )
        client = await raw_connect(self, balancer.port)
        client.send(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9, 127.0.0.5\r\n\r\n"
        )
        await client.wait_for(lambda r: r.endswith(b"a"))
        admin = await admin_url(balancer)
        status = json.loads((await http_request(self, "GET", admin + "/status")).body)
        (listed,) = [c for c in status["clients"] if c["client"] == "203.0.113.9"]
        self.assertEqual(listed["peer"], "127.0.0.1")
        self.assertEqual(listed["state"], "idle")
        self.assertEqual(listed["requests"], 1)

    def test_real_client(self) -> None:
        """
        The real client is the first untrusted hop from the right, or the
        leftmost if all are trusted.
        """
        nets = trusted_networks("t", "10.0.0.0/8, ::1")
        self.assertEqual(real_client(b"10.0.0.1", [b"1.2.3.4, 10.9.9.9"], nets), b"1.2.3.4")
        self.assertEqual(real_client(b"10.0.0.1", [b"1.2.3.4", b"5.6.7.8"], nets), b"5.6.7.8")
        self.assertEqual(real_client(b"10.0.0.1", [b"10.1.1.1, 10.2.2.2"], nets), b"10.1.1.1")
        self.assertEqual(real_client(b"10.0.0.1", [b" , "], nets), b"10.0.0.1")
        # The walk stops at a hop that is not an address: never log one.
        self.assertEqual(real_client(b"10.0.0.1", [b"1.2.3.4, junk, 10.9.9.9"], nets), b"10.9.9.9")
        self.assertEqual(real_client(b"10.0.0.1", [b'9.9.9.9 - - [01/Jan"'], nets), b"10.0.0.1")
        self.assertEqual(real_client(b"10.0.0.1", [b"1.1.1.1:1234"], nets), b"10.0.0.1")
        self.assertEqual(real_client(b"10.0.0.1", [b"2001:DB8::1"], nets), b"2001:db8::1")
        self.assertTrue(is_trusted("::ffff:10.1.2.3", nets))
        self.assertTrue(is_trusted("::1", nets))
        self.assertFalse(is_trusted("garbage", nets))


class LimitSettingsTests(unittest.TestCase):
    """
    The options, their YAML keys and their defaults.
    """

    def test_defaults(self) -> None:
        """
        The defaults are the issue's.
        """
        config = balancer_options("--nodes", "http://127.0.0.1:9").config
        self.assertEqual(
            (
                config.max_header_size,
                config.max_headers,
                config.max_body_size,
                config.client_header_timeout,
                config.client_body_timeout,
                config.keepalive_timeout,
                config.max_connections,
                config.trusted_proxies,
            ),
            (32768, 100, 0, 10.0, 60.0, 60.0, None, ()),
        )

    def test_yaml_keys(self) -> None:
        """
        Every option is also the YAML key with underscores; flags win.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                "nodes: [http://127.0.0.1:9]\nmax_header_size: 1000\nmax_headers: 7\n"
                "max_body_size: 2M\nclient_header_timeout: 1.5\nclient_body_timeout: 2\n"
                "keepalive_timeout: 3\nmax_connections: 50\n"
                "trusted_proxies: [10.0.0.0/8, '::1']\n"
            )
        config = balancer_options("--config", path, "--max-headers", "9").config
        self.assertEqual(config.max_header_size, 1000)
        self.assertEqual(config.max_headers, 9)
        self.assertEqual(config.max_body_size, 2 * 1024 * 1024)
        self.assertEqual(
            (config.client_header_timeout, config.client_body_timeout, config.keepalive_timeout),
            (1.5, 2.0, 3.0),
        )
        self.assertEqual(config.max_connections, 50)
        self.assertEqual([str(n) for n in config.trusted_proxies], ["10.0.0.0/8", "::1/128"])

    def test_sizes(self) -> None:
        """
        Sizes take K, M and G (powers of 1024), any case, and plain bytes.
        """
        self.assertEqual(byte_size("s", "0"), 0)
        self.assertEqual(byte_size("s", "512"), 512)
        self.assertEqual(byte_size("s", "10k"), 10240)
        self.assertEqual(byte_size("s", "10M"), 10 * 1024**2)
        self.assertEqual(byte_size("s", "1G"), 1024**3)
        self.assertEqual(byte_size("s", "2MB"), 2 * 1024**2)
        self.assertEqual(byte_size("s", 7), 7)
        for bad in ("", "M", "-1", "1.5M", "10T", "ten", True, None):
            self.assertRaises(ConfigError, byte_size, "s", bad)

    def test_bad_values_name_the_setting(self) -> None:
        """
        A bad value is one line naming the option (or YAML key).
        """
        node = ("--nodes", "http://127.0.0.1:9")
        self.assertIn("--max-body-size", parse_error(*node, "--max-body-size", "lots"))
        self.assertIn("--max-headers", parse_error(*node, "--max-headers", "0"))
        self.assertIn("--max-connections", parse_error(*node, "--max-connections", "-3"))
        self.assertIn("--keepalive-timeout", parse_error(*node, "--keepalive-timeout", "0"))
        self.assertIn(
            "--client-header-timeout", parse_error(*node, "--client-header-timeout", "x")
        )
        self.assertIn("--trusted-proxies", parse_error(*node, "--trusted-proxies", "10.0.0/33"))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("nodes: [http://127.0.0.1:9]\nmax_body_size: huge\n")
        self.assertIn("max_body_size", parse_error("--config", path))


class FileLimitTests(unittest.TestCase):
    """
    RLIMIT_NOFILE at start-up.
    """

    def test_raised_to_hard(self) -> None:
        """
        The soft limit is raised to the hard one.
        """
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        if hard != resource.RLIM_INFINITY and hard > 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        raise_fd_limit(10)
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)

    def test_warns_when_too_small(self) -> None:
        """
        One warning when --max-connections cannot fit in the limit.
        """
        import resource

        logs = LogCapture.install(self)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard == resource.RLIM_INFINITY:
            raise unittest.SkipTest("no file descriptor limit here")
        raise_fd_limit(hard)
        warnings = [m for m in logs.messages() if "--max-connections" in m]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("accepting at most", warnings[0])
        raise_fd_limit(10)
        self.assertEqual(len([m for m in logs.messages() if "--max-connections" in m]), 1)

    def test_cap_fits_the_limit(self) -> None:
        """
        A --max-connections that cannot fit is lowered to what can: two
        descriptors per connection and a reserve.
        """
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (1064, hard))
        self.assertEqual(connections_that_fit(10000), 500)
        self.assertEqual(connections_that_fit(300), 300)
        config = balancer_options("--nodes", "http://127.0.0.1:9", "--max-connections", "900")
        self.assertEqual(ClientLimits.from_config(config.config).max_connections, 500)

    def test_default_is_what_fits(self) -> None:
        """
        Without C{--max-connections}, the cap is what the limit fits, at
        most L{DEFAULT_MAX_CONNECTIONS}; and nothing is said about it.
        """
        import resource

        logs = LogCapture.install(self)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (1064, hard))
        self.assertEqual(connections_that_fit(None), 500)
        config = balancer_options("--nodes", "http://127.0.0.1:9").config
        self.assertIsNone(config.max_connections)
        self.assertEqual(ClientLimits.from_config(config).max_connections, 500)
        if hard == resource.RLIM_INFINITY or hard >= 2 * DEFAULT_MAX_CONNECTIONS + 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (2 * DEFAULT_MAX_CONNECTIONS + 64, hard))
            self.assertEqual(connections_that_fit(None), DEFAULT_MAX_CONNECTIONS)
        raise_fd_limit(None)
        self.assertEqual([m for m in logs.messages() if "RLIMIT_NOFILE" in m], [])

    async def test_default_quiet_at_start(self) -> None:
        """
        rrlb started under a descriptor limit of 1000 without
        C{--max-connections} says nothing about the limit; with a
        C{--max-connections} that does not fit, it says so once, with the
        cap it uses instead.
        """
        backend = await start_backend(self, "a")
        quiet = await start_daemon(self, "--nodes", backend.url, nofile=1000)
        await quiet.wait_for_message("READY=1")
        self.assertNotIn(b"RLIMIT_NOFILE", quiet.output)
        reply = await http_request(self, "GET", quiet.url + "/")
        self.assertEqual(reply.body, b"a")
        loud = await start_daemon(
            self, "--nodes", backend.url, "--max-connections", "1000", nofile=1000
        )
        await loud.wait_for_message("READY=1")
        self.assertEqual(loud.output.count(b"RLIMIT_NOFILE"), 1, loud.output)
        self.assertIn(b"--max-connections 1000 needs up to 2064", loud.output)
        self.assertIn(b"accepting at most 468 client connections", loud.output)

