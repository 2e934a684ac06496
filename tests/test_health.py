"""
Tests for L{rrlb.health.HealthChecker}, driven by L{task.Clock} and a fake
L{IAgent} whose answers each test controls: probes at start-up and every
interval, what counts as a pass or a failure, timeouts, no overlapping probes
of one node, slow nodes not delaying others, and the transition log lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from twisted.internet import defer, error, task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import client as webclient
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from zope.interface import implementer

from rrlb.config import parse_node
from rrlb.failures import describe_failure
from rrlb.health import HealthChecker
from rrlb.pool import Node, Pool
from rrlb.settings import HealthConfig
from tests.support import LogCapture


@implementer(IResponse)
class FakeResponse:
    """
    A complete response with a small body, delivered at once.
    """

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(self, code: int, body: bytes = b"ok") -> None:
        self.code = code
        self.phrase = b"Whatever"
        self.headers = Headers()
        self.body = body
        self.length = UNKNOWN_LENGTH

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(None)
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(webclient.ResponseDone()))

    def setPreviousResponse(self, response: Any) -> None:
        self.previousResponse = response


# What the fake agent does with a probe of a host: answer with a status,
# fail with an exception, or (None) leave it pending for the test to settle.
Answer = Union[int, Exception, None]


@dataclass
class Probe:
    """
    One request the health checker made.
    """

    method: bytes
    uri: bytes
    headers: Headers
    deferred: Deferred[Any]
    started: float
    cancelled: bool = False

    @property
    def pending(self) -> bool:
        return not self.deferred.called

    def answer(self, code: int) -> None:
        self.deferred.callback(FakeResponse(code))

    def fail(self, exc: Exception) -> None:
        self.deferred.errback(Failure(exc))


@implementer(IAgent)
@dataclass
class FakeAgent:
    """
    Answers each probe as C{answers[host]} says (200 by default).
    """

    clock: task.Clock
    answers: dict[str, Answer] = field(default_factory=dict)
    probes: list[Probe] = field(default_factory=list)

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Any = None,
    ) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            probe.cancelled = True

        d: Deferred[Any] = Deferred(cancel)
        probe = Probe(method, uri, headers or Headers(), d, self.clock.seconds())
        self.probes.append(probe)
        answer = self.answers.get(host_of(uri), 200)
        if isinstance(answer, int):
            probe.answer(answer)
        elif isinstance(answer, Exception):
            probe.fail(answer)
        return d

    def of(self, host: str) -> list[Probe]:
        """
        The probes of C{host} so far.
        """
        return [p for p in self.probes if host_of(p.uri) == host]


def host_of(uri: bytes) -> str:
    return webclient.URI.fromBytes(uri).host.decode("ascii")


class CheckerFixture:
    """
    A pool of nodes C{a}, C{b}, C{c} with a checker on a clock.
    """

    def build(
        self,
        interval: float = 5.0,
        timeout: float = 2.0,
        rise: int = 2,
        fall: int = 3,
        path: str = "/health",
        urls: tuple[str, ...] = ("http://a:8001", "http://b:8002", "http://c:8003"),
    ) -> None:
        tc: Any = self
        self.clock = task.Clock()
        self.agent = FakeAgent(self.clock)
        self.pool = Pool([parse_node(u) for u in urls], rise=rise, fall=fall)
        self.health = HealthConfig(path, interval, timeout, rise, fall)
        self.checker = HealthChecker(self.pool, self.health, self.clock, self.agent)
        tc.addCleanup(self.stop)

    def stop(self) -> None:
        if self.checker.running:
            self.checker.stopService()

    def node(self, host: str) -> Node:
        for node in self.pool.nodes:
            if node.host == host:
                return node
        raise KeyError(host)


class ScheduleTests(unittest.TestCase, CheckerFixture):
    """
    When probes run.
    """

    def test_first_round_at_start(self) -> None:
        """
        Starting the checker probes every node at once with C{GET} of the
        health path, before any time passes.
        """
        self.build()
        self.assertEqual(self.agent.probes, [])
        self.checker.startService()
        self.assertEqual(
            sorted((p.method, p.uri) for p in self.agent.probes),
            [
                (b"GET", b"http://a:8001/health"),
                (b"GET", b"http://b:8002/health"),
                (b"GET", b"http://c:8003/health"),
            ],
        )

    def test_every_interval(self) -> None:
        """
        Each node is probed again every interval, not sooner.
        """
        self.build(interval=5)
        self.checker.startService()
        self.clock.advance(4.9)
        self.assertEqual(len(self.agent.of("a")), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.agent.of("a")), 2)
        self.clock.pump([5] * 4)
        self.assertEqual([len(self.agent.of(h)) for h in "abc"], [6, 6, 6])
        self.assertEqual([p.started for p in self.agent.of("b")], [0, 5, 10, 15, 20, 25])

    def test_base_path_and_user_agent(self) -> None:
        """
        The health path follows a node's base path, and probes say who they
        are.
        """
        self.build(urls=("http://a:8001/app/",), path="/status?full=1")
        self.checker.startService()
        (probe,) = self.agent.probes
        self.assertEqual(probe.uri, b"http://a:8001/app/status?full=1")
        (agent,) = probe.headers.getRawHeaders(b"User-Agent") or [b""]
        self.assertTrue(agent.startswith(b"rrlb-health/"))

    def test_any_host_name(self) -> None:
        """
        Host names the URL libraries are strict about (an underscore, as
        container names have), IPv6 literals and international names are
        probed like any other, and default ports are left out.
        """
        self.build(urls=("http://web_1:8080", "http://[::1]:81/x", "https://b\u00fccher.example"))
        self.checker.startService()
        self.assertEqual(
            [p.uri for p in self.agent.probes],
            [
                b"http://web_1:8080/health",
                b"http://[::1]:81/x/health",
                b"https://xn--bcher-kva.example/health",
            ],
        )

    def test_no_overlap(self) -> None:
        """
        While a probe of a node is unanswered, that node gets no other
        probe, however many intervals pass; the next one follows its answer.
        """
        self.build(interval=1, timeout=10)
        self.agent.answers["b"] = None
        self.checker.startService()
        self.clock.pump([1] * 5)
        self.assertEqual(len(self.agent.of("b")), 1)
        self.agent.of("b")[0].answer(200)
        self.clock.advance(1)
        self.assertEqual(len(self.agent.of("b")), 2)

    def test_slow_node_does_not_delay_others(self) -> None:
        """
        A node that does not answer does not hold up the probes of the
        others: they keep their own schedule.
        """
        self.build(interval=1, timeout=10)
        self.agent.answers["b"] = None
        self.checker.startService()
        self.clock.pump([1] * 5)
        self.assertEqual(len(self.agent.of("a")), 6)
        self.assertEqual(len(self.agent.of("c")), 6)
        self.assertEqual([p.started for p in self.agent.of("c")], [0, 1, 2, 3, 4, 5])

    def test_stop(self) -> None:
        """
        Stopping the checker cancels unanswered probes and stops every
        timer: no probe after that, no timer left on the clock.
        """
        self.build(interval=1, timeout=10)
        self.agent.answers["a"] = None
        self.checker.startService()
        self.checker.stopService()
        self.assertTrue(self.agent.of("a")[0].cancelled)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.pump([1] * 3)
        self.assertEqual(len(self.agent.probes), 3)

    def test_stop_does_not_mark(self) -> None:
        """
        A probe cancelled because the checker stops does not count against
        its node.
        """
        self.build(fall=1)
        self.agent.answers["a"] = None
        self.checker.startService()
        self.checker.stopService()
        self.assertTrue(self.node("a").healthy)
        self.assertEqual(self.node("a").failures, 0)

    def test_nodes_added_and_removed(self) -> None:
        """
        A node the pool gains is probed at once after C{sync}; a node it
        loses is probed no more, and the late answer to its last probe is
        ignored.
        """
        self.build(interval=5)
        self.agent.answers["c"] = None
        self.checker.startService()
        self.pool.update([parse_node("http://a:8001"), parse_node("http://d:8004")])
        self.checker.sync()
        self.assertEqual(len(self.agent.of("d")), 1)
        removed_c = self.agent.of("c")[0]
        removed_c.fail(error.ConnectionRefusedError())
        self.clock.advance(5)
        self.assertEqual([len(self.agent.of(h)) for h in "abcd"], [2, 1, 1, 2])

    def test_update_interval(self) -> None:
        """
        New health settings apply: a new interval restarts the timers.
        """
        self.build(interval=5)
        self.checker.startService()
        self.checker.update(HealthConfig("/health", 1.0, 0.5, 2, 3))
        self.assertEqual(len(self.agent.of("a")), 2)
        self.clock.pump([1] * 3)
        self.assertEqual(len(self.agent.of("a")), 5)

    def test_update_interval_no_overlap(self) -> None:
        """
        Restarting the timers does not start a second probe of a node whose
        probe is still unanswered.
        """
        self.build(interval=5, timeout=30)
        self.agent.answers["a"] = None
        self.checker.startService()
        self.checker.update(HealthConfig("/health", 1.0, 30, 2, 3))
        self.clock.pump([1] * 3)
        self.assertEqual(len(self.agent.of("a")), 1)
        self.agent.answers["a"] = 200
        self.agent.of("a")[0].answer(200)
        self.clock.pump([1] * 2)
        self.assertEqual([p.started for p in self.agent.of("a")], [0, 4, 5])


class OutcomeTests(unittest.TestCase, CheckerFixture):
    """
    What counts as a passed probe and what as a failed one.
    """

    def outcome(self, answer: Answer) -> tuple[bool, Optional[str]]:
        """
        Whether node C{a} passes a probe answered so, and its last error.
        """
        self.build(rise=1, fall=1)
        self.agent.answers["a"] = answer
        self.checker.startService()
        node = self.node("a")
        result = (node.successes == 1, node.last_error)
        self.checker.stopService()
        return result

    def test_2xx_3xx_pass(self) -> None:
        """
        Any 2xx or 3xx status passes (redirects are not followed).
        """
        for code in (200, 201, 204, 299, 301, 302, 304, 307, 399):
            self.assertEqual(self.outcome(code), (True, None), code)

    def test_other_status_fails(self) -> None:
        """
        Any other status fails, and the reason names it.
        """
        for code in (100, 199, 400, 404, 429, 500, 502, 503, 599):
            self.assertEqual(self.outcome(code), (False, f"HTTP {code}"), code)

    def test_refused(self) -> None:
        """
        A refused connection fails.
        """
        self.assertEqual(
            self.outcome(error.ConnectionRefusedError()), (False, "connection refused")
        )

    def test_reset(self) -> None:
        """
        A connection dropped before the response fails, as a reset.
        """
        lost = webclient.ResponseNeverReceived([Failure(error.ConnectionLost())])
        self.assertEqual(self.outcome(lost), (False, "connection reset"))

    def test_connect_timeout(self) -> None:
        """
        A connection that could not be made in time fails as timed out.
        """
        self.assertEqual(self.outcome(error.TimeoutError()), (False, "timed out"))

    def test_other_error(self) -> None:
        """
        Any other error fails too, with a one-line reason.
        """
        ok, reason = self.outcome(ValueError("strange\nthings"))
        self.assertFalse(ok)
        self.assertEqual(reason, "ValueError: strange things")

    def test_timeout(self) -> None:
        """
        A probe unanswered after the health timeout is cancelled and fails.
        """
        self.build(interval=5, timeout=2, fall=1)
        self.agent.answers["a"] = None
        self.checker.startService()
        self.clock.advance(1.9)
        self.assertTrue(self.node("a").healthy)
        self.clock.advance(0.1)
        probe = self.agent.of("a")[0]
        self.assertTrue(probe.cancelled)
        self.assertFalse(self.node("a").healthy)
        self.assertEqual(self.node("a").last_error, "timed out after 2s")
        self.assertEqual(self.node("a").last_latency, 2)

    def test_fall_and_rise_over_time(self) -> None:
        """
        A node failing its probes leaves the rotation after C{fall}
        intervals and comes back C{rise} intervals after it recovers; the
        others stay in throughout.
        """
        self.build(interval=5, rise=2, fall=3)
        self.agent.answers["b"] = 500
        self.checker.startService()
        self.clock.advance(5)
        self.assertTrue(self.node("b").in_rotation)
        self.clock.advance(5)
        self.assertFalse(self.node("b").in_rotation)
        self.assertEqual([n.host for n in self.pool.in_rotation], ["a", "c"])
        self.agent.answers["b"] = 200
        self.clock.advance(5)
        self.assertFalse(self.node("b").in_rotation)
        self.clock.advance(5)
        self.assertTrue(self.node("b").in_rotation)
        self.assertEqual(self.node("b").last_check, 20)

    def test_checker_survives_errors(self) -> None:
        """
        Probes keep coming after failures of every kind: the timers never
        stop on their own.
        """
        self.build(interval=1, timeout=0.5)
        self.agent.answers.update(a=error.ConnectionRefusedError(), b=None, c=RuntimeError("x"))
        self.checker.startService()
        self.clock.pump([0.5, 0.5] * 4)
        self.assertEqual([len(self.agent.of(h)) for h in "abc"], [5, 5, 5])


class LogTests(unittest.TestCase, CheckerFixture):
    """
    Every transition is logged with the node, the reason and the counts.
    """

    def test_down_and_up_logged(self) -> None:
        """
        A node going down and coming back gives one line each, naming the
        node, the reason and the count of checks in a row.
        """
        logs = LogCapture.install(self)
        self.build(interval=1, rise=2, fall=3)
        self.agent.answers["a"] = error.ConnectionRefusedError()
        self.checker.startService()
        self.clock.pump([1] * 4)
        self.agent.answers["a"] = 204
        self.clock.pump([1] * 3)
        lines = [m for m in logs.messages() if "http://a:8001" in m]
        self.assertEqual(len(lines), 2, lines)
        down, up = lines
        self.assertIn("down", down)
        self.assertIn("connection refused", down)
        self.assertIn("3", down)
        self.assertIn("up", up)
        self.assertIn("HTTP 204", up)
        self.assertIn("2", up)
        (event,) = logs.matching(node="http://a:8001", failures=3)
        self.assertEqual(event["reason"], "connection refused")

    def test_steady_state_quiet(self) -> None:
        """
        Probes that change nothing log nothing about nodes.
        """
        logs = LogCapture.install(self)
        self.build(interval=1)
        self.checker.startService()
        self.clock.pump([1] * 5)
        self.assertEqual([m for m in logs.messages() if "node" in m], [])


class DescribeFailureTests(unittest.TestCase):
    """
    L{describe_failure} gives short single-line reasons.
    """

    def test_reasons(self) -> None:
        """
        Common failures get plain words.
        """
        cases = [
            (error.ConnectionRefusedError(), "connection refused"),
            (error.ConnectionLost(), "connection reset"),
            (defer.TimeoutError(), "timed out"),
            (error.DNSLookupError("x"), "host name lookup failed"),
            (
                webclient.ResponseNeverReceived([Failure(error.ConnectionRefusedError())]),
                "connection refused",
            ),
        ]
        for exc, text in cases:
            self.assertEqual(describe_failure(Failure(exc)), text)

    def test_long_reason(self) -> None:
        """
        An unknown error's text is kept on one line and bounded.
        """
        text = describe_failure(Failure(RuntimeError("x\n" * 1000)))
        self.assertNotIn("\n", text)
        self.assertLessEqual(len(text), 300)
