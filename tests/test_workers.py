"""
Tests for L{rrlb.workers}: the restart backoff on a L{task.Clock}, counters
adding up, the AMP arguments, a worker's pool, and real rrlb processes with
C{--workers 2} (a main process and two workers) over loopback.

Which worker accepts a connection is the kernel's choice; to send requests
through one worker, the tests stop the others with C{SIGSTOP} for a moment
(a stopped process accepts nothing, so the one left takes every connection)
and continue them with C{SIGCONT}.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
from typing import Any, Optional, Sequence
from urllib.parse import quote

from twisted.internet import defer, task
from twisted.internet.error import ConnectionLost
from twisted.protocols import amp
from twisted.trial import unittest

from rrlb.config import Config, ConfigError, PoolConfig, build_config, parse_node
from rrlb.metrics import Metrics, exposition
from rrlb.pool import Node, Pool, Pools
from rrlb.queue import RequestQueue
from rrlb.tap import check_listeners
from rrlb.values import parse_workers
from rrlb.workers.child import WorkerPool, apply_states
from rrlb.workers.sockets import SocketGroup
from rrlb.workers.supervisor import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    STABLE_AFTER,
    RestartBackoff,
    WorkerSupervisor,
    worker_environ,
)
from rrlb.workers.totals import Counters, WorkersHistory, WorkersMetrics
from rrlb.workers.wire import Configure
from tests.support import (
    CLIENT_IP,
    GET_CLOSE,
    LOOPBACK,
    SRV_NAME,
    START_TIMEOUT,
    V1_IN,
    Daemon,
    LogCapture,
    balancer_options,
    certs,
    closed_port_url,
    http_request,
    https_get,
    parse_error,
    raw_connect,
    raw_request,
    samples,
    srv,
    start_backends,
    start_balancer,
    start_daemon,
    start_server,
    wait_for_value,
    wait_until,
)
from tests.support import a as a_record


class RestartBackoffTests(unittest.TestCase):
    """
    A worker that dies after serving a while is restarted at once; early
    deaths wait longer each time, up to a cap.
    """

    def test_stable_worker_restarts_at_once(self) -> None:
        """
        A death L{STABLE_AFTER} seconds or more after the start: no delay.
        """
        clock = task.Clock()
        backoff = RestartBackoff(clock)
        clock.advance(STABLE_AFTER)
        self.assertEqual(backoff.delay(), 0.0)

    def test_early_deaths_back_off(self) -> None:
        """
        Each death soon after a start doubles the delay, from
        L{BACKOFF_FIRST} to L{BACKOFF_MAX}.
        """
        clock = task.Clock()
        backoff = RestartBackoff(clock)
        delays = []
        for _ in range(8):
            clock.advance(0.5)
            delay = backoff.delay()
            delays.append(delay)
            clock.advance(delay)
            backoff.started()
        self.assertEqual(delays[:4], [BACKOFF_FIRST * 2**i for i in range(4)])
        self.assertEqual(delays[-1], BACKOFF_MAX)
        self.assertEqual(sorted(delays), delays)

    def test_stable_run_resets(self) -> None:
        """
        After a run that lasted, the next death restarts at once again and
        a following early one waits L{BACKOFF_FIRST}.
        """
        clock = task.Clock()
        backoff = RestartBackoff(clock)
        for _ in range(3):
            clock.advance(1)
            backoff.delay()
            backoff.started()
        clock.advance(STABLE_AFTER)
        self.assertEqual(backoff.delay(), 0.0)
        backoff.started()
        clock.advance(1)
        self.assertEqual(backoff.delay(), BACKOFF_FIRST)


class CountersTests(unittest.TestCase):
    """
    Workers' counters survive JSON and add up with their pool dimension;
    the counts of a worker that died are kept without its gauges.
    """

    def sample(self, n: int) -> Counters:
        return Counters(
            requests={
                (("api", "http://a"), "GET", 200): n,
                (("web", "http://a"), "GET", 200): 1,
                (("none", "none"), "GET", 404): 1,
            },
            latency={("api", "http://a"): [float(n)] * 15, ("web", "http://a"): [1.0] * 15},
            proxy_errors={502: n, 503: 1, 504: 0},
            client_errors={"header_timeout": n},
            retries=n,
            retries_refused=1,
            queues={"api": [3, 2], "web": [0, 1]},
            connections=4,
            upstream_connections=5,
            nodes={("api", "http://a"): [1, n, 2], ("web", "http://a"): [0, 1, 0]},
            clients=[{"client": "127.0.0.1", "since": float(n)}],
            tunnels_open=1,
            tunnel_bytes={"to_node": n, "to_client": 10 * n},
        )

    def test_json_round_trip(self) -> None:
        """
        C{to_json} then C{from_json} through real JSON gives the same counts.
        """
        counters = self.sample(7)
        again = Counters.from_json(json.loads(json.dumps(counters.to_json())))
        self.assertEqual(again, counters)

    def test_add(self) -> None:
        """
        Counts and gauges of two workers add up, each node of each pool on
        its own (one URL in two pools is two nodes).
        """
        total = Counters()
        total.add(self.sample(1))
        total.add(self.sample(2))
        self.assertEqual(total.requests[(("api", "http://a"), "GET", 200)], 3)
        self.assertEqual(total.requests[(("web", "http://a"), "GET", 200)], 2)
        self.assertEqual(total.requests[(("none", "none"), "GET", 404)], 2)
        self.assertEqual(total.latency[("api", "http://a")], [3.0] * 15)
        self.assertEqual(total.latency[("web", "http://a")], [2.0] * 15)
        self.assertEqual(total.proxy_errors, {502: 3, 503: 2, 504: 0})
        self.assertEqual(total.client_errors, {"header_timeout": 3})
        self.assertEqual((total.retries, total.retries_refused), (3, 2))
        self.assertEqual(total.queues, {"api": [6, 4], "web": [0, 2]})
        self.assertEqual((total.connections, total.upstream_connections), (8, 10))
        self.assertEqual(
            total.nodes, {("api", "http://a"): [2, 3, 4], ("web", "http://a"): [0, 2, 0]}
        )
        self.assertEqual(len(total.clients), 2)
        self.assertEqual(total.tunnels_open, 2)
        self.assertEqual(total.tunnel_bytes, {"to_node": 3, "to_client": 30})

    def test_add_without_gauges(self) -> None:
        """
        The counts of a worker that died stay; its gauges (connections,
        queue lengths, requests in flight, clients) do not.
        """
        total = Counters()
        total.add(self.sample(5), gauges=False)
        self.assertEqual(total.requests[(("api", "http://a"), "GET", 200)], 5)
        self.assertEqual((total.connections, total.upstream_connections), (0, 0))
        self.assertEqual(total.queues, {"api": [0, 2], "web": [0, 1]})
        self.assertEqual(total.nodes[("api", "http://a")], [0, 5, 2])
        self.assertEqual(total.clients, [])
        self.assertEqual(total.tunnels_open, 0)
        self.assertEqual(total.tunnel_bytes, {"to_node": 5, "to_client": 50})

    def test_of_metrics(self) -> None:
        """
        A worker's L{Metrics}, pools and queues become L{Counters}.
        """
        pool = WorkerPool([parse_node("http://127.0.0.1:1")], name="api")
        pools = Pools([pool])
        metrics = Metrics(pools, task.Clock(), connections=lambda: 3)
        metrics.requests[(("api", "http://127.0.0.1:1"), "GET", 200)] = 4
        pool.nodes[0].requests = 4
        queue = RequestQueue(pool, task.Clock())
        queue.timeouts = 2
        counters = Counters.of(metrics, pools, {"api": queue}, [{"client": "x"}])
        self.assertEqual(counters.requests, {(("api", "http://127.0.0.1:1"), "GET", 200): 4})
        self.assertEqual(counters.connections, 3)
        self.assertEqual(counters.queues, {"api": [0, 2]})
        self.assertEqual(counters.nodes, {("api", "http://127.0.0.1:1"): [0, 4, 0]})
        self.assertEqual(counters.clients, [{"client": "x"}])


class _FakeSupervisor:
    """
    Answers L{WorkerSupervisor.gather} with counts that grow by C{step}
    requests to every node each time (or, with C{hold}, not yet).
    """

    def __init__(self, totals: Counters, step: int = 0) -> None:
        self.totals = totals
        self.step = step
        self.asked: list[bool] = []
        self.hold: Optional[defer.Deferred[Counters]] = None

    def limit_keys(self) -> int:
        return 0

    def gather(self, clients: bool = True) -> defer.Deferred[Counters]:
        self.asked.append(clients)
        for counts in self.totals.nodes.values():
            counts[1] += self.step
        if self.hold is not None:
            return self.hold
        return defer.succeed(self.totals)

    def describe(self) -> list[dict[str, Any]]:
        return [{"index": 0, "state": "serving"}]


def two_pools() -> Pools:
    a, b = parse_node("http://127.0.0.1:1"), parse_node("http://127.0.0.1:2")
    return Pools([Pool([a, b], name="api"), Pool([b], name="web")])


class MainMetricsTests(unittest.TestCase):
    """
    The main process's C{/status}, C{/metrics} and charts read the workers'
    counts, added up, by pool.
    """

    def totals(self) -> Counters:
        a, b = "http://127.0.0.1:1", "http://127.0.0.1:2"
        return Counters(
            requests={(("api", b), "GET", 200): 5, (("web", b), "GET", 200): 7},
            latency={("web", b): [1.0] + [0.0] * 13 + [0.001]},
            proxy_errors={503: 2},
            client_errors={"bad_request": 3},
            retries=4,
            retries_refused=1,
            queues={"api": [2, 1], "web": [1, 3]},
            connections=6,
            nodes={("api", a): [0, 0, 0], ("api", b): [1, 5, 1], ("web", b): [2, 7, 0]},
            clients=[{"client": "127.0.0.1", "worker": 1}],
        )

    def test_status_and_metrics(self) -> None:
        """
        C{/status} has each pool's nodes with their own counts (one URL in
        two pools twice), the process totals, the workers' clients and the
        workers; C{/metrics} has the same by pool label.
        """
        pools = two_pools()
        metrics = WorkersMetrics(pools, task.Clock(), lambda: [], _FakeSupervisor(Counters()))  # type: ignore[arg-type]
        metrics.load(self.totals())
        status = metrics.status()
        self.assertEqual(
            [
                [(n["pool"], n["requests"], n["in_flight"]) for n in p["nodes"]]
                for p in status["pools"]
            ],
            [[("api", 0, 0), ("api", 5, 1)], [("web", 7, 2)]],
        )
        process = status["process"]
        self.assertEqual(
            (process["requests"], process["retries"], process["retries_refused"]), (12, 4, 1)
        )
        self.assertEqual((process["queue_length"], process["queue_timeouts"]), (3, 4))
        self.assertEqual(process["connections"], 6)
        self.assertEqual(status["clients"], [{"client": "127.0.0.1", "worker": 1}])
        self.assertEqual(status["workers"], [{"index": 0, "state": "serving"}])
        # A node as the admin API finds it (the main process's own node).
        web_b = pools.by_name["web"].nodes[0]
        self.assertEqual(metrics.node_status(0, web_b)["requests"], 7)

        text = exposition(metrics).decode()
        self.assertIn(
            'rrlb_requests_total{method="GET",node="http://127.0.0.1:2",pool="web",'
            'status="2xx"} 7.0',
            text,
        )
        self.assertIn('rrlb_node_errors_total{node="http://127.0.0.1:2",pool="api"} 1.0', text)
        self.assertIn(
            'rrlb_upstream_latency_seconds_count{node="http://127.0.0.1:2",pool="web"} 1.0', text
        )
        self.assertIn('rrlb_client_errors_total{reason="bad_request"} 3.0', text)
        self.assertIn('rrlb_client_errors_total{reason="header_timeout"} 0.0', text)
        self.assertIn('rrlb_proxy_errors_total{code="503"} 2.0', text)
        self.assertIn("rrlb_queue_timeouts_total 4.0", text)
        self.assertIn("rrlb_queue_length 3.0", text)
        self.assertIn("rrlb_retries_refused_total 1.0", text)

    def test_history_gathers(self) -> None:
        """
        The charts' sampler gathers the workers' counts (without their
        clients) for each sample: the requests per second are the workers'
        summed; a sample waiting for a worker holds back the next.
        """
        clock = task.Clock()
        supervisor = _FakeSupervisor(self.totals(), step=10)
        pools = two_pools()
        metrics = WorkersMetrics(pools, clock, lambda: [], supervisor)  # type: ignore[arg-type]
        history = WorkersHistory(pools, metrics, clock)
        history.startService()
        self.addCleanup(history.stopService)
        clock.advance(1)
        clock.advance(1)
        web_b = history.get(("web", "http://127.0.0.1:2"))
        assert web_b is not None
        self.assertEqual(list(web_b.rps), [0.0, 10.0, 10.0])
        self.assertEqual(supervisor.asked, [False] * 3)

        supervisor.hold = defer.Deferred()
        clock.advance(1)
        clock.advance(1)
        self.assertEqual(len(supervisor.asked), 4)
        self.assertEqual(len(web_b.rps), 3)
        supervisor.hold.callback(supervisor.totals)
        self.assertEqual(list(web_b.rps), [0.0, 10.0, 10.0, 10.0])


class WireTests(unittest.TestCase):
    """
    The AMP arguments carry values larger than AMP's 64 KiB per value.
    """

    def test_large_configuration(self) -> None:
        """
        A configuration of 3000 nodes (well over 64 KiB pickled), its pools
        and the nodes' states go through L{Configure}'s box and come back
        equal.
        """
        nodes = tuple(parse_node(f"http://10.0.{i // 250}.{i % 250}:8080") for i in range(3000))
        config = Config(nodes=nodes)
        pools = (PoolConfig(name="default", nodes=nodes), PoolConfig(name="api", nodes=nodes[:10]))
        states = [["default", n.key, True, i % 2 == 0] for i, n in enumerate(nodes)]
        proto = amp.AMP()
        box = Configure.makeArguments(
            {"config": config, "pools": pools, "states": states, "reload": True, "count": False},
            proto,
        )
        self.assertGreater(sum(len(v) for v in box.values()), amp.MAX_VALUE_LENGTH)
        self.assertTrue(all(len(v) <= amp.MAX_VALUE_LENGTH for v in box.values()))
        # Through the bytes of the wire, as AMP parses them.
        (parsed,) = amp.parseString(box.serialize())
        arguments = Configure.parseArguments(parsed, proto)
        self.assertEqual(arguments["config"], config)
        self.assertEqual(arguments["pools"], pools)
        self.assertEqual(arguments["states"], states)
        self.assertIs(arguments["reload"], True)


class WorkerPoolTests(unittest.TestCase):
    """
    A worker's pools take their health from the main process and report
    failures there instead of counting them.
    """

    def setUp(self) -> None:
        specs = [parse_node("http://127.0.0.1:1"), parse_node("http://127.0.0.1:2")]
        self.clock = task.Clock()
        self.pool = WorkerPool(specs, name="api", clock=self.clock)
        # The same URLs in another pool: other nodes.
        self.other = WorkerPool(specs, name="web", clock=self.clock)
        self.pools = Pools([self.pool, self.other])
        self.reports: list[tuple[str, str, str]] = []
        for pool in self.pools:
            assert isinstance(pool, WorkerPool)
            pool.report = lambda node, reason: self.reports.append(
                (node.pool_name, node.key, reason)
            )
        self.changed: list[Node] = []
        self.pools.add_listener(self.changed.append)

    def test_failures_reported(self) -> None:
        """
        A failure is reported with its node's pool, not counted: the node
        stays in rotation however many there are; successes are not
        reported.
        """
        a = self.pool.nodes[0]
        for _ in range(5):
            self.pool.mark(a, False, "request failed: connection refused")
        self.pool.mark(a, True)
        self.assertEqual(self.reports, [("api", a.key, "request failed: connection refused")] * 5)
        self.assertTrue(a.in_rotation)
        self.assertEqual(a.failures, 0)

    def test_states_applied(self) -> None:
        """
        States from the main process change the rotation of the pool they
        name, not of another pool with the same URL, and tell the pools'
        listeners (the queue, for one); unknown pools and keys are ignored.
        """
        a, b = self.pool.nodes
        apply_states(
            self.pools,
            [["api", b.key, False, False], ["api", "http://gone", False, True], ["x", b.key, 0, 1]],
        )
        self.assertEqual([self.pool.pick() for _ in range(3)], [a, a, a])
        self.assertEqual(len({self.other.pick() for _ in range(2)}), 2)
        self.assertEqual(self.changed, [b])
        apply_states(self.pools, [["api", b.key, True, False], ["api", a.key, True, True]])
        self.assertEqual([self.pool.pick() for _ in range(2)], [b, b])
        self.assertTrue(a.drained)
        self.assertFalse(self.other.nodes[0].drained)
        # The same states again change nothing.
        apply_states(self.pools, [["api", b.key, True, False]])
        self.assertEqual(self.changed, [b, b, a])

    def test_slow_start_after_state(self) -> None:
        """
        With slow start, a node the main process says is back (healthy, or
        enabled after a drain) ramps up from then, as in one process.
        """
        self.pool.configure(slow_start=10)
        a, b = self.pool.nodes
        self.clock.advance(100)
        apply_states(self.pools, [["api", b.key, False, False], ["api", a.key, True, True]])
        self.assertIsNone(b.up_since)
        apply_states(self.pools, [["api", b.key, True, False]])
        self.assertEqual(b.up_since, 100)
        self.clock.advance(5)
        apply_states(self.pools, [["api", a.key, True, False]])
        self.assertEqual(a.up_since, 105)


class _FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class _FakeReactor(task.Clock):
    """
    A clock that records the processes it is asked to start and connects
    their channels to in-memory transports.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, _FakeProcess]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: Any, **kw: Any) -> Any:
        process = _FakeProcess(1000 + len(self.spawned))
        protocol.transport = process
        self.spawned.append((protocol, process))
        return process

    def adoptStreamConnection(self, fd: int, family: int, factory: Any) -> None:
        from twisted.internet.testing import StringTransport

        factory.buildProtocol(None).makeConnection(StringTransport())


class _FakeMain:
    def __init__(self) -> None:
        self.config = Config(drain_timeout=3)
        self.pools = Pools([WorkerPool([parse_node("http://127.0.0.1:1")])])
        self.counts_requests = False
        self.gone: list[int] = []
        self.acme_state = None

    def listen_fds(self, index: int) -> list[int]:
        return []

    def worker_config(self) -> Config:
        return self.config

    def worker_pools(self) -> tuple[PoolConfig, ...]:
        return (PoolConfig(name="default", nodes=self.config.nodes),)

    def worker_gone(self, index: int) -> None:
        self.gone.append(index)


def _ended(protocol: Any, code: Optional[int] = None, sig: Optional[int] = None) -> None:
    from twisted.internet.error import ProcessTerminated
    from twisted.python.failure import Failure

    protocol.processEnded(Failure(ProcessTerminated(code, sig)))


class SupervisorTests(unittest.TestCase):
    """
    L{WorkerSupervisor} on a clock: READY once every worker serves, a dead
    worker restarted after its backoff, none at shutdown, and workers that
    do not stop are killed.
    """

    def setUp(self) -> None:
        self.reactor = _FakeReactor()
        self.main = _FakeMain()
        self.supervisor = WorkerSupervisor(self.main, self.reactor, 2)  # type: ignore[arg-type]
        self.supervisor.startService()
        self.addCleanup(self.cleanup)

    def cleanup(self) -> None:
        if self.supervisor.running:
            self.supervisor.stopService()
            for protocol, _ in self.reactor.spawned:
                if not protocol.ended:
                    _ended(protocol, 0)

    def serve(self, index: int) -> None:
        slot = self.supervisor.slots[index]
        assert slot.process is not None
        self.supervisor._serving({"pid": slot.process.pid}, slot, slot.process)

    def test_ready_when_every_worker_serves(self) -> None:
        """
        L{WorkerSupervisor.serving} fires once both workers answered their
        first configuration, not before.
        """
        self.assertEqual(len(self.reactor.spawned), 2)
        ready = self.supervisor.serving()
        self.serve(0)
        self.assertNoResult(ready)
        self.serve(1)
        self.assertIs(self.successResultOf(ready), True)
        self.assertIs(self.successResultOf(self.supervisor.serving()), True)

    def test_restart_after_backoff(self) -> None:
        """
        A worker that dies soon after its start is started again after
        L{BACKOFF_FIRST} seconds; its socket is given up at once, and its
        counts stay in the totals.
        """
        self.serve(0)
        self.serve(1)
        slot = self.supervisor.slots[0]
        slot.counters = Counters(requests={(("p", "k"), "GET", 200): 5}, connections=2)
        self.reactor.advance(1)
        _ended(self.reactor.spawned[0][0], sig=9)
        self.assertEqual(self.main.gone, [0])
        self.assertEqual(slot.state, "restarting")
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(BACKOFF_FIRST - 0.01)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(0.01)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual((slot.state, slot.restarts), ("starting", 1))
        totals = self.supervisor.totals()
        self.assertEqual(totals.requests, {(("p", "k"), "GET", 200): 5})
        self.assertEqual(totals.connections, 0)
        # Dying at once again waits twice as long.
        _ended(self.reactor.spawned[2][0], code=1)
        self.reactor.advance(2 * BACKOFF_FIRST - 0.01)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.reactor.advance(0.01)
        self.assertEqual(len(self.reactor.spawned), 4)

    def test_gather(self) -> None:
        """
        L{WorkerSupervisor.gather} adds up the serving workers' answers and
        asks for their clients only when told to; a worker whose channel
        closes meanwhile (it ended) counts with what it said last, quietly.
        """
        self.serve(0)
        self.serve(1)
        asked: list[tuple[int, Any]] = []
        answers: list[defer.Deferred[dict[str, Any]]] = []
        for slot in self.supervisor.slots:
            assert slot.channel is not None

            def call(command: Any, index: int = slot.index, **kw: Any) -> Any:
                asked.append((index, kw.get("clients")))
                answers.append(defer.Deferred())
                return answers[-1]

            slot.channel.callRemote = call  # type: ignore[method-assign]
        self.supervisor.slots[1].counters = Counters(requests={(("p", "k"), "GET", 200): 2})
        logs = LogCapture.install(self)
        gathered = self.supervisor.gather(clients=False)
        self.assertEqual(asked, [(0, False), (1, False)])
        counters = Counters(
            requests={(("p", "k"), "GET", 200): 3}, clients=[{"client": "a", "since": 1.0}]
        )
        answers[0].callback({"counters": counters.to_json()})
        answers[1].errback(ConnectionLost())
        totals = self.successResultOf(gathered)
        self.assertEqual(totals.requests, {(("p", "k"), "GET", 200): 5})
        self.assertEqual(totals.clients, [])
        self.assertEqual(logs.messages(), [])
        # Asked for them, the clients come with their worker's index.
        gathered = self.supervisor.gather()
        answers[2].callback({"counters": counters.to_json()})
        answers[3].callback({"counters": Counters().to_json()})
        totals = self.successResultOf(gathered)
        self.assertEqual(totals.clients, [{"client": "a", "since": 1.0, "worker": 0}])

    def test_stop(self) -> None:
        """
        At shutdown no worker is restarted; the stop waits for every worker
        and kills those still running after drain_timeout + L{STOP_GRACE}.
        """
        self.serve(0)
        self.serve(1)
        stopped = self.supervisor.stopService()
        _ended(self.reactor.spawned[0][0], 0)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertNoResult(stopped)
        self.assertEqual(self.reactor.spawned[1][1].signals, ["KILL"])
        self.assertEqual(self.reactor.spawned[0][1].signals, [])
        _ended(self.reactor.spawned[1][0], sig=9)
        self.successResultOf(stopped)

    def test_stop_while_restarting(self) -> None:
        """
        A restart pending at shutdown is cancelled; a worker not serving yet
        gets SIGTERM.
        """
        self.serve(0)
        _ended(self.reactor.spawned[0][0], sig=9)
        stopped = self.supervisor.stopService()
        self.assertEqual(self.reactor.spawned[1][1].signals, ["TERM"])
        _ended(self.reactor.spawned[1][0], 0)
        self.successResultOf(stopped)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class SocketGroupTests(unittest.TestCase):
    """
    A TCP listener of the main process: a socket per worker on one port.
    """

    def test_sockets(self) -> None:
        """
        Each worker's socket listens on the same port (port 0 chose it);
        that of a worker gone is closed and bound again for its successor;
        if that fails, the successor shares another worker's socket.
        """
        group = SocketGroup(socket.AF_INET, LOOPBACK, 0, 16, 2)
        self.addCleanup(group.stopListening)
        first = [group.fileno_for(i) for i in range(2)]
        ports = {s.getsockname()[1] for s in group.sockets if s is not None}
        self.assertEqual(ports, {group.port})
        self.assertNotEqual(group.port, 0)
        self.assertEqual(group.getHost().port, group.port)

        old = group.sockets[0]
        assert old is not None
        group.worker_gone(0)
        self.assertEqual(old.fileno(), -1)
        again = group.fileno_for(0)
        self.assertEqual(group.sockets[0].getsockname()[1], group.port)  # type: ignore[union-attr]
        self.assertNotIn(again, first[1:])

        def refuse() -> socket.socket:
            raise OSError(13, "Permission denied")

        group.worker_gone(0)
        group._bind = refuse  # type: ignore[method-assign]
        logs = LogCapture.install(self)
        self.assertEqual(group.fileno_for(0), first[1])
        self.assertIn("shares another worker's socket", logs.messages()[0])
        group.stopListening()
        self.assertEqual(group.sockets, [None, None])


class OptionTests(unittest.TestCase):
    """
    C{--workers N}, YAML C{workers}, C{auto}, and the listeners workers can
    share.
    """

    def test_parse(self) -> None:
        """
        A whole number from 1, or C{auto} for one per CPU.
        """
        self.assertEqual(parse_workers("--workers", "4"), 4)
        self.assertEqual(parse_workers("workers", 2), 2)
        self.assertEqual(parse_workers("--workers", "auto"), max(1, os.cpu_count() or 1))
        for bad in ("0", "-1", "x", "1.5", True, 100000):
            with self.assertRaises(ConfigError) as e:
                parse_workers("--workers", bad)
            self.assertIn("--workers", str(e.exception))

    def test_default_and_yaml(self) -> None:
        """
        One by default; the YAML key and the flag set it, the flag winning.
        """
        self.assertEqual(build_config(None, {"nodes": (parse_node("http://a"),)}).workers, 1)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("nodes: [http://a]\nworkers: 3\n")
        self.assertEqual(build_config(path).workers, 3)
        self.assertEqual(build_config(path, {"workers": 2}).workers, 2)
        with open(path, "w") as f:
            f.write("nodes: [http://a]\nworkers: none\n")
        with self.assertRaises(ConfigError) as e:
            build_config(path)
        self.assertIn("workers", str(e.exception))

    def test_bad_flag(self) -> None:
        """
        A bad C{--workers} is a usage error naming it.
        """
        self.assertIn("--workers", parse_error("--nodes", "http://a", "--workers", "zero"))
        message = parse_error("--nodes", "http://a", "--workers", "2", "--listen", "stdio:")
        self.assertIn("--workers: the listener 'stdio:' cannot be shared", message)

    def test_unshared_listener(self) -> None:
        """
        Listeners of kinds the workers cannot adopt are refused, naming them.
        """
        check_listeners(Config(listen=("tcp:80", "haproxy:tcp:81", "unix:/tmp/x", "tcp6:82")))
        with self.assertRaises(ConfigError) as e:
            check_listeners(Config(listen=("tcp:80", "stdio:")))
        self.assertIn("'stdio:'", str(e.exception))

    def test_token_stays_in_the_main_process(self) -> None:
        """
        The configuration sent to the workers carries no admin token: only
        the main process answers the admin API.
        """
        token = self.mktemp()
        with open(token, "w") as f:
            f.write("main-only-token-0123456789\n")
        options = balancer_options(
            "--nodes", "http://127.0.0.1:9", "--workers", "2", "--admin-token-file", token
        )
        from rrlb.workers.main import WorkersTraffic

        main = WorkersTraffic(options.config, task.Clock(), Pools())
        self.assertEqual(main.config.admin_token, b"main-only-token-0123456789")
        self.assertIsNone(main.worker_config().admin_token)

    def test_one_worker_is_one_process(self) -> None:
        """
        The default composes the control side with one L{Traffic} side,
        and rrlb.workers is not even imported.
        """
        import subprocess
        import sys

        code = (
            "import sys\n"
            "from rrlb.tap import Options, makeService\n"
            "options = Options()\n"
            "options.parseOptions(['--nodes', 'http://127.0.0.1:1', '--listen', 'tcp:0'])\n"
            "service = makeService(options)\n"
            "print(type(service).__name__, type(service.traffic).__name__,"
            " 'rrlb.workers' in sys.modules)\n"
        )
        import rrlb

        root = os.path.dirname(os.path.dirname(os.path.abspath(rrlb.__file__)))
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60
        )
        self.assertEqual(out.stdout.split(), ["ControlService", "Traffic", "False"], out.stderr)

    def test_main_process_builds_no_proxy(self) -> None:
        """
        With C{--workers 2} the control side is composed with the workers'
        stand-in for a traffic side, whose checkers mark the same pools;
        nothing in the main process's service tree is a proxy, an upstream
        client or a site to serve traffic.
        """
        from rrlb.proxy import ProxySite, RotatingProxy
        from rrlb.tap import compose
        from rrlb.upstream import UpstreamPool
        from rrlb.workers.main import WorkersTraffic

        config = Config(
            nodes=(parse_node("http://127.0.0.1:1"),),
            listen=(f"tcp:0:interface={LOOPBACK}",),
            workers=2,
        )
        service = compose(config, task.Clock())
        self.assertIsInstance(service.traffic, WorkersTraffic)
        assert service.checker is not None
        self.assertIs(service.checker.pool, service.traffic.pools.get("default"))

        def parts(value: Any, depth: int = 0) -> list[Any]:
            found = [value]
            if depth < 3 and hasattr(value, "__dict__"):
                for child in vars(value).values():
                    found += parts(child, depth + 1)
            elif depth < 3 and isinstance(value, (list, tuple, dict)):
                for child in value.values() if isinstance(value, dict) else value:
                    found += parts(child, depth + 1)
            return found

        kinds = (RotatingProxy, UpstreamPool, ProxySite)
        self.assertEqual([p for p in parts(service) if isinstance(p, kinds)], [])

    async def test_reload_keeps_worker_count(self) -> None:
        """
        A reload that changes C{workers} says it needs a restart and keeps
        the running count (here one process, which stays one).
        """
        (a,) = await start_backends(self, "a")
        path = self.mktemp()
        write_config(path, [a.url])
        balancer = await start_balancer(self, (), "--config", path)
        logs = LogCapture.install(self)
        write_config(path, [a.url], "workers: 4\n")
        self.assertTrue(balancer.service.reload())
        self.assertEqual(balancer.service.config.workers, 1)
        self.assertIn("reload: workers changed (1 -> 4); restart rrlb to apply it", logs.messages())

    def test_worker_environment(self) -> None:
        """
        Workers do not get systemd's variables and can import rrlb.
        """
        env = worker_environ(
            {"NOTIFY_SOCKET": "/x", "LISTEN_FDS": "1", "WATCHDOG_USEC": "1", "PATH": "/bin"}
        )
        self.assertEqual(env["PATH"], "/bin")
        self.assertNotIn("NOTIFY_SOCKET", env)
        self.assertNotIn("LISTEN_FDS", env)
        self.assertNotIn("WATCHDOG_USEC", env)
        import rrlb

        root = os.path.dirname(os.path.dirname(os.path.abspath(rrlb.__file__)))
        self.assertEqual(env["PYTHONPATH"].split(os.pathsep)[0], root)


# -- real processes -------------------------------------------------------------------


def write_config(path: str, nodes: Sequence[str], extra: str = "") -> None:
    with open(path, "w") as f:
        f.write("nodes:\n")
        for url in nodes:
            f.write(f"  - {url}\n")
        f.write("health: {path: /health}\n")
        f.write(extra)


class WorkersTestCase(unittest.TestCase):
    """
    Starts rrlb with C{--workers 2} and an admin endpoint, and reads its
    C{/status}.
    """

    daemon: Daemon
    admin: str

    async def start(self, *args: str) -> Daemon:
        self.admin = (await closed_port_url()).replace("http", "tcp", 1)
        port = self.admin.rsplit(":", 1)[1]
        self.admin_url = f"http://{LOOPBACK}:{port}"
        self.daemon = await start_daemon(
            self,
            "--workers",
            "2",
            "--admin",
            f"tcp:{port}:interface={LOOPBACK}",
            "--drain-timeout",
            "3",
            *args,
        )
        self.addCleanup(self.kill_workers)
        self.worker_pids: set[int] = set()
        await self.daemon.wait_for_message("READY=1")
        return self.daemon

    def kill_workers(self) -> None:
        # Workers end when the main process does; this is for a test that
        # failed with one of them stopped, or the main process killed.
        for pid in self.worker_pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)

    async def status(self) -> dict[str, Any]:
        reply = await http_request(self, "GET", self.admin_url + "/status")
        self.assertEqual(reply.code, 200)
        status: dict[str, Any] = json.loads(reply.body)
        self.worker_pids.update(w["pid"] for w in status["workers"] if w["pid"])
        return status

    async def pids(self) -> list[int]:
        workers = (await self.status())["workers"]
        self.assertEqual([w["state"] for w in workers], ["serving", "serving"])
        return [w["pid"] for w in workers]

    async def via(self, index: int, count: int, path: str = "/") -> list[bytes]:
        """
        The bodies of C{count} requests on fresh connections, all accepted
        by worker C{index} (the other one is stopped meanwhile).
        """
        return [body for _, body in await self.via_replies(index, count, path)]

    async def via_replies(self, index: int, count: int, path: str = "/") -> list[tuple[int, bytes]]:
        """
        The status codes and bodies of L{via}'s requests.
        """
        pids = await self.pids()
        others = [pid for i, pid in enumerate(pids) if i != index]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        try:
            replies = [
                await http_request(self, "GET", self.daemon.url + path) for _ in range(count)
            ]
        finally:
            for pid in others:
                os.kill(pid, signal.SIGCONT)
        return [(r.code, r.body) for r in replies]

    async def every_worker(self, count: int = 4, path: str = "/") -> list[set[bytes]]:
        return [set(await self.via(i, count, path)) for i in range(2)]


class WorkerProcessTests(WorkersTestCase):
    """
    With C{--workers 2}: both workers serve, the main process counts for
    them and tells them of health, drains and reloads; it stops them and
    restarts those that die.
    """

    async def test_both_serve_and_counts_add_up(self) -> None:
        """
        At C{READY=1} both workers serve. Requests through each are counted
        by it, and C{/status}, C{/nodes} and C{/metrics} of the main process
        add them up.
        """
        (a,) = await start_backends(self, "a")
        access_log = os.path.abspath(self.mktemp())
        daemon = await self.start(
            "--nodes", a.url, "--health-path", "/health", "--access-log", access_log
        )
        # The main process logs each worker serving before it says READY=1.
        self.assertEqual(daemon.output.count(b"is serving"), 2)
        status = await self.status()
        self.assertEqual([w["state"] for w in status["workers"]], ["serving", "serving"])
        pids = [w["pid"] for w in status["workers"]]
        self.assertEqual(len(set(pids)), 2)
        self.assertNotIn(None, pids)

        self.assertEqual(await self.via(0, 3), [b"a"] * 3)
        self.assertEqual(await self.via(1, 5), [b"a"] * 5)

        status = await self.status()
        self.assertEqual([w["requests"] for w in status["workers"]], [3, 5])
        self.assertEqual(status["process"]["requests"], 8)
        self.assertEqual(status["nodes"][0]["requests"], 8)
        self.assertEqual(len(a.requests), 8)
        node = json.loads((await http_request(self, "GET", self.admin_url + "/nodes/0")).body)
        self.assertEqual(node["requests"], 8)
        metrics = (await http_request(self, "GET", self.admin_url + "/metrics")).body.decode()
        self.assertIn(
            f'rrlb_requests_total{{method="GET",node="{a.url}",pool="default",status="2xx"}} 8.0',
            metrics,
        )
        self.assertIn(
            f'rrlb_upstream_latency_seconds_count{{node="{a.url}",pool="default"}} 8.0', metrics
        )
        page = (await http_request(self, "GET", self.admin_url + "/")).body
        self.assertIn(b"127.0.0.1", page)

        # Both workers append to the access log, whole lines each.
        def lines() -> list[str]:
            with open(access_log) as f:
                return f.read().splitlines()

        await wait_until(lambda: len(lines()) == 8, what="eight access log lines")
        for line in lines():
            self.assertTrue(line.startswith("127.0.0.1 - - ["), line)
            self.assertIn(f'node="{a.url}" upstream_status=200', line)
        self.assertEqual(sum('"GET / HTTP/1.1" 200' in line for line in lines()), 8)

    async def test_health_and_passive_failures(self) -> None:
        """
        A node failing its checks (made by the main process) leaves the
        rotation of every worker; a node whose requests fail in a worker is
        reported to the main process, which takes it out, in every worker.
        """
        a, b, c = await start_backends(self, "a", "b", "c")
        await self.start(
            "--nodes",
            f"{a.url},{b.url},{c.url}",
            "--health-path",
            "/health",
            "--health-interval",
            "0.2",
            "--fall",
            "2",
            # c keeps passing its probes while its requests fail: a node
            # taken out must not come back within the test.
            "--rise",
            "1000",
        )
        self.assertEqual(await self.every_worker(6), [{b"a", b"b", b"c"}] * 2)

        async def checks_of_b() -> float:
            text = (await http_request(self, "GET", self.admin_url + "/metrics")).body.decode()
            labels = (("node", b.url), ("pool", "default"), ("result", "pass"))
            return samples(text).get(("rrlb_health_checks_total", labels), 0.0)

        first = await checks_of_b()

        async def five_more_rounds() -> bool:
            return await checks_of_b() >= first + 5

        await wait_for_value(five_more_rounds, "five more rounds of health checks")
        # One checker, the main process's: after five more of its rounds, b
        # has had no probe but the ones it counts (and one on its way).
        probes = b.probes
        self.assertLessEqual(probes - await checks_of_b(), 1)

        b.healthy = False

        async def b_down() -> bool:
            return (await self.status())["nodes"][1]["state"] == "down"

        await wait_for_value(b_down, "b down")
        self.assertEqual(await self.every_worker(6), [{b"a", b"c"}] * 2)

        # c now resets every request: passive failures, seen by the workers.
        def reset(request: Any) -> Any:
            request.transport.abortConnection()
            from twisted.web import server

            return server.NOT_DONE_YET

        c.handler = reset
        # GETs are retried on a: the clients see no failure.
        self.assertEqual(set(await self.via(0, 3)) | set(await self.via(1, 3)), {b"a"})

        async def c_down() -> bool:
            node = (await self.status())["nodes"][2]
            # c's probes pass every 0.2 s, and each clears its last_error:
            # the main process's log says why it went down.
            said = [line for line in self.daemon.lines() if f"node {c.url} is down" in line]
            return node["state"] == "down" and any("last: request failed" in s for s in said)

        await wait_for_value(c_down, "c taken out by passive failures")

        # The main process tells the workers over AMP: wait until both act
        # on it (a request in between may still try c and be retried on a).
        async def c_out_everywhere() -> bool:
            before = len(c.requests)
            await self.every_worker(2)
            return len(c.requests) == before

        await wait_for_value(c_out_everywhere, "every worker to take c out")
        reached = len(c.requests)
        self.assertEqual(await self.every_worker(4), [{b"a"}] * 2)
        self.assertEqual(len(c.requests), reached)
        status = await self.status()
        self.assertGreaterEqual(status["nodes"][2]["errors"], 2)

    async def test_drain_api_reaches_every_worker(self) -> None:
        """
        C{POST /nodes/<id>/drain} takes the node out in every worker and
        C{enable} puts it back.
        """
        a, b = await start_backends(self, "a", "b")
        await self.start("--nodes", f"{a.url},{b.url}", "--health-path", "/health")
        reply = await http_request(self, "POST", self.admin_url + "/nodes/1/drain")
        self.assertEqual(reply.code, 200)
        self.assertEqual(json.loads(reply.body)["state"], "draining")
        self.assertEqual(await self.every_worker(), [{b"a"}] * 2)
        reply = await http_request(self, "POST", self.admin_url + "/nodes/1/enable")
        self.assertEqual(json.loads(reply.body)["state"], "up")
        self.assertEqual(await self.every_worker(), [{b"a", b"b"}] * 2)

    async def test_sighup(self) -> None:
        """
        SIGHUP: the main process reads the file once and every worker runs
        it; a bad file changes nothing anywhere.
        """
        a, b = await start_backends(self, "a", "b")
        path = os.path.abspath(self.mktemp())
        write_config(path, [a.url])
        daemon = await self.start("--config", path)
        self.assertEqual(await self.every_worker(), [{b"a"}] * 2)

        write_config(path, [b.url], "timeout: 7\n")
        daemon.signal("HUP")
        await wait_until(lambda: daemon.messages.count(b"READY=1") == 2, what="the reload")
        self.assertEqual(await self.every_worker(), [{b"b"}] * 2)
        self.assertEqual(daemon.output.count(b"configuration reloaded"), 1)

        with open(path, "w") as f:
            f.write(f"nodes: [{a.url}]\ntimeout: -1\n")
        daemon.signal("HUP")
        await wait_until(lambda: daemon.messages.count(b"READY=1") == 3, what="the rejection")
        self.assertEqual(daemon.output.count(b"reload rejected"), 1)
        self.assertEqual(await self.every_worker(), [{b"b"}] * 2)
        status = await self.status()
        self.assertEqual([n["url"] for n in status["nodes"]], [b.url])
        self.assertEqual([w["restarts"] for w in status["workers"]], [0, 0])

    async def test_admin_access_and_sighup(self) -> None:
        """
        The main process's admin endpoint checks Host and the bearer token
        before it asks the workers for anything, and SIGHUP reads the token
        file again (a real process, a real signal).
        """
        (a,) = await start_backends(self, "a")
        token, path = self.mktemp(), os.path.abspath(self.mktemp())
        with open(token, "w") as f:
            f.write("first-token-0123456789\n")
        write_config(path, [a.url], f"admin_token_file: {os.path.abspath(token)}\n")
        daemon = await self.start("--config", path, "--admin-hosts", "ops.internal")

        async def code(host: bytes, value: bytes) -> int:
            headers = {b"Host": [host], b"Authorization": [b"Bearer " + value]}
            return (await http_request(self, "GET", self.admin_url + "/status", headers)).code

        self.assertEqual(await code(b"ops.internal", b"first-token-0123456789"), 200)
        self.assertEqual(await code(b"localhost", b"wrong"), 401)
        self.assertEqual(await code(b"attacker.example", b"first-token-0123456789"), 421)
        with open(token, "w") as f:
            f.write("second-token-0123456789\n")
        daemon.signal("HUP")
        await wait_until(lambda: daemon.messages.count(b"READY=1") == 2, what="the reload")
        self.assertEqual(await code(b"localhost", b"first-token-0123456789"), 401)
        self.assertEqual(await code(b"localhost", b"second-token-0123456789"), 200)
        self.assertNotIn(b"second-token", daemon.output)

    async def test_sigterm_drains_and_exits_0(self) -> None:
        """
        SIGTERM: the request in flight in a worker finishes, every worker
        exits, then the main process, with 0.
        """
        (a,) = await start_backends(self, "a")
        a.delay = 0.5
        daemon = await self.start("--nodes", a.url, "--health-path", "/health")
        pids = await self.pids()
        from twisted.internet.defer import Deferred

        slow = Deferred.fromCoroutine(http_request(self, "GET", daemon.url + "/slow"))
        await wait_until(lambda: a.requests, what="the request at a")
        daemon.signal("TERM")
        reply = await slow
        self.assertEqual((reply.code, reply.body), (200, b"a"))
        self.assertEqual(await daemon.exit_code(), 0)
        for pid in pids:
            with self.assertRaises(ProcessLookupError):
                os.kill(pid, 0)
        self.assertEqual(daemon.output.count(b"exited with code 0"), 2)
        self.assertNotIn(b"Traceback", daemon.output)
        states = [m for m in daemon.messages if not m.startswith((b"STATUS=", b"WATCHDOG="))]
        self.assertEqual(states, [b"READY=1", b"STOPPING=1"])
        self.assertIn(
            b"STATUS=stopping: 2 workers draining their connections for up to 3s",
            daemon.messages,
        )

    async def test_dead_worker_restarted(self) -> None:
        """
        A killed worker is logged and restarted (later each time it dies
        soon after a start) while the other serves on; nothing else is lost.
        """
        (a,) = await start_backends(self, "a")
        daemon = await self.start("--nodes", a.url, "--health-path", "/health")
        first = (await self.pids())[0]
        os.kill(first, signal.SIGKILL)
        # Meanwhile the other worker serves every request.
        for _ in range(3):
            self.assertEqual((await http_request(self, "GET", daemon.url + "/")).body, b"a")

        async def restarted(old: int) -> Optional[int]:
            workers = (await self.status())["workers"]
            w = workers[0]
            if w["state"] == "serving" and w["pid"] not in (None, old):
                return int(w["pid"])
            return None

        second = await wait_for_value(lambda: restarted(first), "worker 0 restarted", START_TIMEOUT)
        self.assertIn(f"worker 0 (pid {first}) killed by signal 9".encode(), daemon.output)
        self.assertIn(b"restarting it in 1s", daemon.output)
        os.kill(second, signal.SIGKILL)
        third = await wait_for_value(
            lambda: restarted(second), "worker 0 restarted again", START_TIMEOUT
        )
        self.assertIn(b"restarting it in 2s", daemon.output)
        status = await self.status()
        self.assertEqual([w["restarts"] for w in status["workers"]], [2, 0])
        self.assertNotIn(third, (first, second))
        self.assertEqual(await self.every_worker(2), [{b"a"}] * 2)
        self.assertEqual(self.daemon.messages.count(b"READY=1"), 1)

    async def test_tcp_listener_socket_per_worker(self) -> None:
        """
        A C{tcp:} listener gets one socket per worker (C{SO_REUSEPORT}): the
        kernel spreads clients over both. The socket of a worker that died
        is closed at once, so clients go to the other until it is back.
        """
        (a,) = await start_backends(self, "a")
        port = int((await closed_port_url()).rsplit(":", 1)[1])
        daemon = await self.start(
            "--nodes",
            a.url,
            "--health-path",
            "/health",
            "--listen",
            f"tcp:{port}:interface={LOOPBACK}",
        )
        daemon.port = port

        async def requests(count: int) -> set[bytes]:
            return {(await http_request(self, "GET", daemon.url + "/")).body for _ in range(count)}

        self.assertEqual(await requests(40), {b"a"})
        workers = (await self.status())["workers"]
        self.assertEqual(sum(w["requests"] for w in workers), 40)
        # Two sockets hashed over forty source ports: all on one is 2**-39.
        self.assertTrue(all(w["requests"] > 0 for w in workers), workers)

        os.kill(workers[0]["pid"], signal.SIGKILL)
        await daemon.wait_for_output("killed by signal 9")
        self.assertEqual(await requests(20), {b"a"})

        async def back() -> bool:
            w = (await self.status())["workers"][0]
            return bool(w["state"] == "serving" and w["pid"] != workers[0]["pid"])

        await wait_for_value(back, "worker 0 back")
        before = (await self.status())["workers"][0]["requests"]
        self.assertEqual(await requests(40), {b"a"})
        self.assertGreater((await self.status())["workers"][0]["requests"], before)

    async def test_tls_and_proxy_listeners(self) -> None:
        """
        Workers serve rrlb's TLS on an C{ssl:} listener and read the PROXY
        header on a C{haproxy:} one, each adopted from the main process.
        """

        (a,) = await start_backends(self, "a")
        issued = certs().node
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        with open(cert, "wb") as f:
            f.write(issued.cert_pem)
        with open(key, "wb") as f:
            f.write(issued.key_pem)
        tls_port = int((await closed_port_url()).rsplit(":", 1)[1])
        proxied_port = int((await closed_port_url()).rsplit(":", 1)[1])
        await self.start(
            "--nodes", a.url, "--health-path", "/health",
            "--listen", f"ssl:{tls_port}:interface={LOOPBACK}",
            "--listen", f"haproxy:tcp:{proxied_port}:interface={LOOPBACK}",
            "--tls-cert", cert, "--tls-key", key,
        )  # fmt: skip
        for _ in range(6):
            code, body, _ = await https_get(self, f"https://{LOOPBACK}:{tls_port}/", certs().ca)
            self.assertEqual((code, body), (200, b"a"))
        reply = await raw_request(self, proxied_port, V1_IN + GET_CLOSE)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        self.assertEqual(a.requests[-1].header(b"X-Forwarded-For"), CLIENT_IP.encode())
        self.assertEqual(a.requests[0].header(b"X-Forwarded-Proto"), b"https")

    async def test_nodes_from_dns(self) -> None:
        """
        The main process looks the names up; the nodes it finds, and the
        changes, reach every worker.
        """

        a, b, c = await start_backends(self, "a", "b", "c")
        dns_server = start_server(self)
        auth = dns_server.authority
        for name in ("a", "b", "c"):
            auth.set(f"{name}.rrlb.test", a_record("127.0.0.1", 1))
        auth.set(
            SRV_NAME,
            srv("a.rrlb.test", a.port_number, ttl=1),
            srv("b.rrlb.test", b.port_number, ttl=1),
        )
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(f"nodes:\n  - {{srv: {SRV_NAME}}}\nresolvers: ['{dns_server.address}']\n")
        await self.start("--config", path, "--health-path", "/health")

        async def nodes(urls: set[str]) -> bool:
            return {n["url"] for n in (await self.status())["nodes"]} == urls

        await wait_for_value(lambda: nodes({a.url, b.url}), "a and b from DNS")
        self.assertEqual(await self.every_worker(), [{b"a", b"b"}] * 2)
        auth.set(
            SRV_NAME,
            srv("b.rrlb.test", b.port_number, ttl=1),
            srv("c.rrlb.test", c.port_number, ttl=1),
        )
        await wait_for_value(lambda: nodes({b.url, c.url}), "b and c from DNS")
        self.assertEqual(await self.every_worker(), [{b"b", b"c"}] * 2)

    async def test_workers_end_with_the_main_process(self) -> None:
        """
        When the main process dies (SIGKILL, no drain), its workers notice
        their channel closing and exit rather than serve on unsupervised.
        """
        (a,) = await start_backends(self, "a")
        daemon = await self.start("--nodes", a.url, "--health-path", "/health")
        pids = await self.pids()
        daemon.signal("KILL")
        await daemon.exit_code()
        await wait_until(lambda: not any(alive(pid) for pid in pids), what="the workers to exit")


def pools_yaml(api: Sequence[str], web: Sequence[str], extra: str = "") -> str:
    """
    Two pools, C{api} (for C{/api/}) and C{web} (everything else).
    """
    return (
        "pools:\n"
        f"  api: {{nodes: [{', '.join(api)}]}}\n"
        f"  web: {{nodes: [{', '.join(web)}]}}\n"
        "routes:\n"
        "  - {path_prefix: /api/, pool: api}\n"
        "  - {pool: web}\n" + extra
    )


def metric(text: str, name: str, **labels: str) -> float:
    """
    The sum of the samples of C{name} whose labels include C{labels}.
    """
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        names, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in names for k, v in labels.items()):
            total += float(value)
    return total


def chart_peak(page: str, pool: str, index: int) -> Optional[float]:
    """
    The highest req/s the status page's chart shows for node C{index} of
    C{pool}, or L{None} while it has none.
    """
    row = re.search(
        rf'<tr class="node[^"]*" data-node-id="{index}" data-state="\w+"'
        rf' data-pool="{pool}">(.*?)</tr>',
        page,
        re.S,
    )
    assert row is not None, page
    peak = re.search(r'aria-label="req/s, last 5 minutes: now [^,]*, highest ([0-9.]+)', row[1])
    return float(peak[1]) if peak else None


class WorkerPoolsTests(WorkersTestCase):
    """
    Pools and routes with C{--workers 2}: every worker routes to every
    pool; health, passive failures and drains of one pool's node reach
    every worker and leave the same URL in another pool alone; the admin
    endpoint adds the workers' counts up by pool; a reload of pools and
    routes reaches every worker.
    """

    async def start_pools(self, yaml: str, *args: str) -> Daemon:
        self.config_path = os.path.abspath(self.mktemp())
        with open(self.config_path, "w") as f:
            f.write(yaml)
        return await self.start("--config", self.config_path, *args)

    async def node(self, pool: str, index: int) -> dict[str, Any]:
        reply = await http_request(self, "GET", f"{self.admin_url}/nodes/{pool}/{index}")
        self.assertEqual(reply.code, 200, reply.body)
        node: dict[str, Any] = json.loads(reply.body)
        return node

    async def test_pools_health_metrics_and_drain(self) -> None:
        """
        Both pools are served by both workers. A node failing its checks in
        one pool (made once, by the main process) is out of that pool in
        every worker. C{/metrics} and C{/status} count by pool, summed over
        the workers, and the status page charts them. C{POST
        /nodes/POOL/ID/drain} takes that pool's node out in every worker,
        not the same URL in the other pool.
        """
        a, b, c = await start_backends(self, "a", "b", "c")
        await self.start_pools(
            pools_yaml([a.url, b.url], [b.url, c.url]),
            "--health-path", "/health", "--health-interval", "0.2", "--fall", "2", "--rise", "1",
        )  # fmt: skip
        status = await self.status()
        self.assertEqual([p["name"] for p in status["pools"]], ["api", "web"])
        self.assertEqual(
            [(n["pool"], n["url"]) for n in status["nodes"]],
            [("api", a.url), ("api", b.url), ("web", b.url), ("web", c.url)],
        )
        sent = {"api": 0, "web": 0}

        async def every_worker(count: int, path: str) -> list[set[bytes]]:
            sent["api" if path.startswith("/api/") else "web"] += 2 * count
            return await self.every_worker(count, path)

        self.assertEqual(await every_worker(4, "/api/x"), [{b"a", b"b"}] * 2)
        self.assertEqual(await every_worker(4, "/x"), [{b"b", b"c"}] * 2)

        # The counts of both workers, by pool.
        text = (await http_request(self, "GET", self.admin_url + "/metrics")).body.decode()
        self.assertEqual(metric(text, "rrlb_requests_total", pool="api", status="2xx"), 8)
        self.assertEqual(metric(text, "rrlb_requests_total", pool="web", status="2xx"), 8)
        for pool in ("api", "web"):
            self.assertEqual(
                metric(text, "rrlb_requests_total", pool=pool, node=b.url, status="2xx"), 4
            )
            self.assertEqual(
                metric(text, "rrlb_upstream_latency_seconds_count", pool=pool, node=b.url), 4
            )
        status = await self.status()
        self.assertEqual([w["requests"] for w in status["workers"]], [8, 8])
        self.assertEqual(status["process"]["requests"], 16)
        self.assertEqual([n["requests"] for n in status["nodes"]], [4, 4, 4, 4])
        self.assertEqual([n["requests"] for n in status["pools"][1]["nodes"]], [4, 4])

        # The status page's charts: the main process samples the summed
        # counts once a second.
        await every_worker(4, "/x")

        async def charted() -> bool:
            page = (await http_request(self, "GET", self.admin_url + "/")).body.decode()
            peak = chart_peak(page, "web", 0)
            return peak is not None and peak > 0

        await wait_for_value(charted, "web's first node charted")

        # a fails its checks: out of api in every worker.
        a.healthy = False

        async def a_down() -> bool:
            return (await self.node("api", 0))["state"] == "down"

        await wait_for_value(a_down, "a down")
        self.assertEqual(await every_worker(4, "/api/x"), [{b"b"}] * 2)
        self.assertEqual(await every_worker(4, "/x"), [{b"b", b"c"}] * 2)

        # b drained in web only: api keeps it, in every worker.
        reply = await http_request(self, "POST", self.admin_url + "/nodes/web/0/drain")
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(json.loads(reply.body)["state"], "draining")
        self.assertEqual((await self.node("api", 1))["state"], "up")
        self.assertEqual(await every_worker(4, "/x"), [{b"c"}] * 2)
        self.assertEqual(await every_worker(4, "/api/x"), [{b"b"}] * 2)
        # By its URL, percent-encoded, this time.
        ident = quote(b.url, safe="")
        reply = await http_request(self, "POST", self.admin_url + f"/nodes/web/{ident}/enable")
        self.assertEqual(json.loads(reply.body)["state"], "up")
        self.assertEqual(await every_worker(4, "/x"), [{b"b", b"c"}] * 2)

        text = (await http_request(self, "GET", self.admin_url + "/metrics")).body.decode()
        for pool, count in sent.items():
            self.assertEqual(metric(text, "rrlb_requests_total", pool=pool), count)
        self.assertEqual(metric(text, "rrlb_node_healthy", pool="api", node=a.url), 0)
        self.assertEqual(metric(text, "rrlb_node_healthy", pool="api", node=b.url), 1)

    async def test_passive_failures_mark_their_pool(self) -> None:
        """
        Requests to b through pool api fail in the workers: the main process
        takes api's b out (in every worker), and web's b, the same URL,
        stays in rotation.
        """
        a, b, c = await start_backends(self, "a", "b", "c")

        def reset_api(request: Any) -> Any:
            from twisted.web import server

            if request.path.startswith(b"/api/"):
                request.transport.abortConnection()
                return server.NOT_DONE_YET
            return b"b"

        b.handler = reset_api
        # Checks far apart: the passing checks of b do not bring it back
        # during the test.
        await self.start_pools(
            pools_yaml([a.url, b.url], [b.url, c.url]),
            "--health-path", "/health", "--health-interval", "5", "--fall", "2", "--rise", "3",
        )  # fmt: skip
        # GETs are retried on a: the clients see no failure.
        self.assertEqual(set(await self.via(0, 4, "/api/x")) | set(await self.via(1, 4, "/api/x")),
                         {b"a"})  # fmt: skip

        async def b_down() -> bool:
            node = await self.node("api", 1)
            return node["state"] == "down" and "request failed" in (node["last_error"] or "")

        await wait_for_value(b_down, "api's b taken out by passive failures")
        web_b = await self.node("web", 0)
        self.assertEqual((web_b["state"], web_b["errors"]), ("up", 0))
        self.assertGreaterEqual((await self.node("api", 1))["errors"], 2)
        reached = len(b.requests)
        self.assertEqual(await self.every_worker(4, "/api/x"), [{b"a"}] * 2)
        self.assertEqual(len(b.requests), reached)
        self.assertEqual(await self.every_worker(4, "/x"), [{b"b", b"c"}] * 2)

    async def test_reload_pools_and_routes(self) -> None:
        """
        SIGHUP with other pools and routes: every worker routes by the new
        ones; a pool the reload added reports its nodes' state changes to
        every worker (its drain takes effect everywhere).
        """
        a, b, c = await start_backends(self, "a", "b", "c")
        daemon = await self.start_pools(pools_yaml([a.url], [b.url]), "--health-path", "/health")
        self.assertEqual(await self.every_worker(2, "/api/x"), [{b"a"}] * 2)
        self.assertEqual(await self.every_worker(2, "/static/x"), [{b"b"}] * 2)

        with open(self.config_path, "w") as f:
            f.write(
                "pools:\n"
                f"  web: {{nodes: [{b.url}, {c.url}]}}\n"
                f"  static: {{nodes: [{a.url}]}}\n"
                "routes:\n"
                "  - {path_prefix: /static/, pool: static}\n"
                "  - {pool: web}\n"
            )
        daemon.signal("HUP")
        await wait_until(lambda: daemon.messages.count(b"READY=1") == 2, what="the reload")
        self.assertEqual(await self.every_worker(2, "/static/x"), [{b"a"}] * 2)
        self.assertEqual(await self.every_worker(4, "/api/x"), [{b"b", b"c"}] * 2)
        status = await self.status()
        self.assertEqual([p["name"] for p in status["pools"]], ["web", "static"])

        reply = await http_request(self, "POST", self.admin_url + "/nodes/static/0/drain")
        self.assertEqual(reply.code, 200, reply.body)
        for index in range(2):
            self.assertEqual(
                [r[0] for r in await self.via_replies(index, 2, "/static/x")], [503, 503]
            )

    async def test_clients_of_every_worker(self) -> None:
        """
        C{/status} lists the client connections of every worker, each with
        the worker that has it.
        """
        (a,) = await start_backends(self, "a")
        daemon = await self.start_pools(pools_yaml([a.url], [a.url]), "--health-path", "/health")
        pids = await self.pids()
        clients = []
        for index in range(2):
            others = [pid for i, pid in enumerate(pids) if i != index]
            for pid in others:
                os.kill(pid, signal.SIGSTOP)
            try:
                client = await raw_connect(self, daemon.port)
                client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                await client.wait_for(lambda data: data.endswith(b"a"))
            finally:
                for pid in others:
                    os.kill(pid, signal.SIGCONT)
            clients.append(client)
        listed = (await self.status())["clients"]
        self.assertEqual(sorted(c["worker"] for c in listed), [0, 1])
        self.assertEqual({(c["peer"], c["requests"]) for c in listed}, {(LOOPBACK, 1)})
        self.assertEqual(sorted(c["since"] for c in listed), [c["since"] for c in listed])


def alive(pid: int) -> bool:
    """
    Whether process C{pid} runs (a zombie nobody reaped yet does not).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
