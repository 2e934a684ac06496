# -*- test-case-name: tests.test_workers -*-
"""
C{--workers N}: one main process and N worker processes.

The main process binds every listener (or takes them from systemd), stops
reading from them and hands them to the workers, which adopt them
(C{reactor.adoptStreamPort}; TLS and the PROXY header are wrapped in the
worker) and serve all the traffic. The main process serves none: it owns
the configuration, the health checker, DNS discovery, the admin endpoint
and systemd's notifications, and starts, restarts and stops the workers.

Each worker talks to the main process over its own socketpair with
L{twisted.protocols.amp}:

  - main -> worker: L{Configure} (the configuration and every pool with
    its node set, at start and after a reload or a change of the nodes
    found in DNS), L{NodeStates} (health and drain changes, as they
    happen), L{GetCounters} (on each admin scrape, and once a second for
    the status page's charts), L{Stop};
  - worker -> main: L{NodeFailed} (a passive failure the proxy saw).

A node is named on the wire by its pool and its key (its URL): one URL in
two pools is two nodes, with their own health, drain state and counts.

So the request path of a worker is the single-process one: routes pick one
of its own L{Pool}s, whose health state the main process sets, and it
counts in its own L{Metrics}, which the main process reads and adds up
(by pool and node) only when asked.

The configuration travels pickled: it goes only from the main process to
the children it started, on a socket nobody else holds, and both run the
same code. What workers send back (counters, failures) is JSON or plain AMP
values, so the main process never unpickles anything a worker sent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import socket
import sys
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, cast

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web import server
from zope.interface import implementer

from rrlb.admin import AdminResource, AdminSite
from rrlb.channel import MAX_LISTED_CLIENTS
from rrlb.config import Config, PoolConfig
from rrlb.history import History
from rrlb.metrics import PROXY_ERRORS, Metrics
from rrlb.parser import CLIENT_ERROR_REASONS
from rrlb.pool import Node, Pool, Pools
from rrlb.proxyproto import ProxyHeaderEndpoint
from rrlb.service import BalancerService, with_default_backlog
from rrlb.tls import listen_endpoint, listen_kind, split_description, tls_on_tcp

log = Logger()

# The worker's end of its channel, and its first listening socket (the
# others follow in --listen order).
CHANNEL_FD = 3
FIRST_LISTEN_FD = 4

# Restart backoff: a worker that dies after serving for STABLE_AFTER seconds
# is restarted at once; one that dies sooner waits BACKOFF_FIRST seconds,
# doubled on each further early death up to BACKOFF_MAX.
STABLE_AFTER = 10.0
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0

# How long an admin scrape waits for a worker's counters.
GATHER_TIMEOUT = 2.0
# At shutdown, how much longer than drain_timeout the workers get before
# they are killed.
STOP_GRACE = 5.0


# -- the wire ---------------------------------------------------------------------


class _Chunked(amp.Argument):
    """
    A value of any size: AMP limits one value to 64 KiB, so it is sent as
    C{name} (the number of chunks) and C{name.0}, C{name.1}, ...
    """

    def encode(self, value: Any) -> bytes:
        raise NotImplementedError()

    def decode(self, data: bytes) -> Any:
        raise NotImplementedError()

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        data = self.encode(objects[name.decode("ascii")])
        size = amp.MAX_VALUE_LENGTH
        chunks = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        strings[name] = b"%d" % len(chunks)
        for i, chunk in enumerate(chunks):
            strings[b"%s.%d" % (name, i)] = chunk

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        count = int(strings[name])
        data = b"".join(strings[b"%s.%d" % (name, i)] for i in range(count))
        objects[name.decode("ascii")] = self.decode(data)


class Pickled(_Chunked):
    """
    A Python value, pickled: only ever sent from the main process to its
    own workers.
    """

    def encode(self, value: Any) -> bytes:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    def decode(self, data: bytes) -> Any:
        return pickle.loads(data)


class Json(_Chunked):
    """
    A JSON value.
    """

    def encode(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode("utf-8")

    def decode(self, data: bytes) -> Any:
        return json.loads(data)


class ConfigRefused(Exception):
    """
    A worker could not apply a configuration (say, a TLS file went bad
    between the main process's check and the worker's read).
    """


class Configure(amp.Command):
    """
    Main -> worker: run this configuration (the first one starts serving).
    C{pools}: the pools to run as the main process runs them, each with its
    node set (the demo backends and the nodes found in DNS included: a
    worker neither starts backends nor looks up names). C{reload}: a reload
    (apply every setting) rather than a new node set. C{states}: every
    node's C{[pool, key, healthy, drained]}. C{count}: count requests for
    the admin endpoint.
    """

    arguments = [
        (b"config", Pickled()),
        (b"pools", Pickled()),
        (b"states", Json()),
        (b"reload", amp.Boolean()),
        (b"count", amp.Boolean()),
    ]
    response = [(b"pid", amp.Integer())]
    errors = {ConfigRefused: b"CONFIG_REFUSED"}


class NodeStates(amp.Command):
    """
    Main -> worker: nodes whose health or drain state changed, each
    C{[pool, key, healthy, drained]}.
    """

    arguments = [(b"states", Json())]
    requiresAnswer = False


class GetCounters(amp.Command):
    """
    Main -> worker: the worker's counters, for an admin scrape (with its
    client connections if C{clients}) or the status page's charts.
    """

    arguments = [(b"clients", amp.Boolean(optional=True))]
    response = [(b"counters", Json())]


class Stop(amp.Command):
    """
    Main -> worker: stop accepting, drain, exit.
    """

    requiresAnswer = False


class NodeFailed(amp.Command):
    """
    Worker -> main: a request to node C{key} of pool C{pool} failed
    (passive health).
    """

    arguments = [
        (b"pool", amp.Unicode()),
        (b"key", amp.Unicode()),
        (b"reason", amp.Unicode()),
    ]
    requiresAnswer = False


def node_states(nodes: Iterable[Node]) -> list[list[Any]]:
    """
    The states L{Configure} and L{NodeStates} carry: a node is named by its
    pool and key (one URL may be a node of two pools).
    """
    return [[n.pool_name, n.key, n.healthy, n.drained] for n in nodes]


# -- counters -----------------------------------------------------------------------

Label = tuple[str, str]


@dataclasses.dataclass
class Counters:
    """
    What a worker counted, in a form that adds up. Nodes are keyed by
    C{(pool, node key)} as L{Metrics} keys them. Gauges (open connections,
    queue lengths, requests in flight, the client list) are left out of the
    counts kept for workers that died.

    @ivar queues: pool -> C{[queue length, queue timeouts]}.
    @ivar nodes: C{(pool, node key)} -> C{[in flight, requests, errors]}.
    """

    requests: dict[tuple[Label, str, int], int] = dataclasses.field(default_factory=dict)
    latency: dict[Label, list[float]] = dataclasses.field(default_factory=dict)
    proxy_errors: dict[int, int] = dataclasses.field(default_factory=dict)
    client_errors: dict[str, int] = dataclasses.field(default_factory=dict)
    retries: int = 0
    retries_refused: int = 0
    queues: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    connections: int = 0
    upstream_connections: int = 0
    nodes: dict[Label, list[int]] = dataclasses.field(default_factory=dict)
    clients: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # WebSocket tunnels: open now (a gauge), bytes to nodes and to clients.
    tunnels_open: int = 0
    tunnel_bytes: dict[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(
        cls,
        metrics: Metrics,
        pools: Pools,
        queues: Mapping[str, Any],
        clients: Optional[list[dict[str, Any]]] = None,
    ) -> Counters:
        """
        The counters of a worker's L{Metrics}, its pools and their queues
        (pool name -> L{rrlb.queue.RequestQueue}).
        """
        return cls(
            requests=dict(metrics.requests),
            latency={k: list(v) for k, v in metrics.latency.items()},
            proxy_errors=dict(metrics.proxy_errors),
            client_errors=dict(metrics.client_errors),
            retries=metrics.retries(),
            retries_refused=metrics.retries_refused(),
            queues={name: [len(q), int(q.timeouts)] for name, q in queues.items()},
            connections=metrics.connections(),
            upstream_connections=metrics.upstream_connections(),
            nodes={n.label: [n.in_flight, n.requests, n.errors] for n in pools.nodes},
            clients=list(clients or ()),
            tunnels_open=metrics.tunnels_open(),
            tunnel_bytes=metrics.tunnel_bytes(),
        )

    def to_json(self) -> dict[str, Any]:
        # JSON has no tuple keys: the keyed counts travel as rows.
        return {
            "requests": [[p, k, m, c, n] for ((p, k), m, c), n in self.requests.items()],
            "latency": [[p, k, b] for (p, k), b in self.latency.items()],
            "proxy_errors": [[code, n] for code, n in self.proxy_errors.items()],
            "client_errors": self.client_errors,
            "retries": self.retries,
            "retries_refused": self.retries_refused,
            "queues": self.queues,
            "connections": self.connections,
            "upstream_connections": self.upstream_connections,
            "nodes": [[p, k, *counts] for (p, k), counts in self.nodes.items()],
            "clients": self.clients,
            "tunnels_open": self.tunnels_open,
            "tunnel_bytes": self.tunnel_bytes,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Counters:
        return cls(
            requests={((p, k), m, int(c)): int(n) for p, k, m, c, n in value["requests"]},
            latency={(p, k): [float(x) for x in b] for p, k, b in value["latency"]},
            proxy_errors={int(c): int(n) for c, n in value["proxy_errors"]},
            client_errors={str(r): int(n) for r, n in value["client_errors"].items()},
            retries=int(value["retries"]),
            retries_refused=int(value["retries_refused"]),
            queues={str(p): [int(x) for x in q] for p, q in value["queues"].items()},
            connections=int(value["connections"]),
            upstream_connections=int(value["upstream_connections"]),
            nodes={(p, k): [int(x) for x in counts] for p, k, *counts in value["nodes"]},
            clients=list(value["clients"]),
            tunnels_open=int(value.get("tunnels_open", 0)),
            tunnel_bytes={str(d): int(n) for d, n in value.get("tunnel_bytes", {}).items()},
        )

    def add(self, other: Counters, gauges: bool = True) -> None:
        for key, count in other.requests.items():
            self.requests[key] = self.requests.get(key, 0) + count
        for label, buckets in other.latency.items():
            mine = self.latency.get(label)
            if mine is None:
                self.latency[label] = list(buckets)
            else:
                self.latency[label] = [a + b for a, b in zip(mine, buckets)]
        for code, count in other.proxy_errors.items():
            self.proxy_errors[code] = self.proxy_errors.get(code, 0) + count
        for reason, count in other.client_errors.items():
            self.client_errors[reason] = self.client_errors.get(reason, 0) + count
        self.retries += other.retries
        self.retries_refused += other.retries_refused
        for pool, (length, timeouts) in other.queues.items():
            queue = self.queues.setdefault(pool, [0, 0])
            queue[1] += timeouts
            if gauges:
                queue[0] += length
        for label, (in_flight, requests, errors) in other.nodes.items():
            counts = self.nodes.setdefault(label, [0, 0, 0])
            counts[1] += requests
            counts[2] += errors
            if gauges:
                counts[0] += in_flight
        for direction, count in other.tunnel_bytes.items():
            self.tunnel_bytes[direction] = self.tunnel_bytes.get(direction, 0) + count
        if gauges:
            self.connections += other.connections
            self.upstream_connections += other.upstream_connections
            self.clients.extend(other.clients)
            self.tunnels_open += other.tunnels_open


class _NodeTotals:
    """
    A node of the main process's pools with the workers' counts.
    """

    def __init__(self, node: Node, counts: Sequence[int]) -> None:
        self.node = node
        self.in_flight, self.requests, self.errors = counts

    def __getattr__(self, name: str) -> Any:
        return getattr(self.node, name)


class _PoolTotals:
    """
    A pool of the main process whose nodes carry the workers' counts.
    """

    def __init__(self, pool: Pool, view: PoolsTotals) -> None:
        self.pool = pool
        self.view = view

    @property
    def nodes(self) -> list[_NodeTotals]:
        return [self.view.wrap(n) for n in self.pool.nodes]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


class PoolsTotals:
    """
    The main process's L{Pools} as L{Metrics} and L{History} read them:
    the health and drain state of its own nodes, with the requests, errors
    and requests in flight the workers counted (the main process's nodes
    serve nothing).
    """

    def __init__(self, pools: Pools) -> None:
        self.pools = pools
        self.totals = Counters()

    def wrap(self, node: Any) -> _NodeTotals:
        node = getattr(node, "node", node)
        return _NodeTotals(node, self.totals.nodes.get(node.label, (0, 0, 0)))

    def __iter__(self) -> Iterator[_PoolTotals]:
        return iter([_PoolTotals(pool, self) for pool in self.pools])

    def __len__(self) -> int:
        return len(self.pools)

    def get(self, name: str) -> Optional[_PoolTotals]:
        pool = self.pools.get(name)
        return None if pool is None else _PoolTotals(pool, self)

    @property
    def nodes(self) -> list[_NodeTotals]:
        return [self.wrap(n) for n in self.pools.nodes]


class WorkersMetrics(Metrics):
    """
    The main process's metrics: its pools' health and its checkers'
    results, with every worker's counts added up (L{load}, after
    L{WorkerSupervisor.gather}).
    """

    def __init__(
        self,
        pools: Pools,
        clock: Any,
        checkers: Callable[[], list[Any]],
        supervisor: WorkerSupervisor,
    ) -> None:
        self.supervisor = supervisor
        self.view = PoolsTotals(pools)
        super().__init__(
            self.view,  # type: ignore[arg-type]
            clock,
            checkers=checkers,
            connections=lambda: self.totals.connections,
            upstream_connections=lambda: self.totals.upstream_connections,
            clients=lambda: self.totals.clients,
        )

    @property
    def totals(self) -> Counters:
        return self.view.totals

    def refresh(self, clients: bool = True) -> defer.Deferred[None]:
        """
        Fresh counts from the workers (and their client lists if
        C{clients}), then L{load}ed.
        """
        return self.supervisor.gather(clients).addCallback(self.load)

    def load(self, totals: Counters) -> None:
        self.view.totals = totals
        self.requests = totals.requests
        self.latency = totals.latency
        self.proxy_errors = dict.fromkeys(PROXY_ERRORS, 0)
        self.proxy_errors.update(totals.proxy_errors)
        self.client_errors = dict.fromkeys(CLIENT_ERROR_REASONS, 0)
        self.client_errors.update(totals.client_errors)

    def retries(self) -> int:
        return self.totals.retries

    def retries_refused(self) -> int:
        return self.totals.retries_refused

    def queue_length(self) -> int:
        return sum(length for length, _ in self.totals.queues.values())

    def tunnels_open(self) -> int:
        return self.totals.tunnels_open

    def tunnel_bytes(self) -> dict[str, int]:
        return {"to_node": 0, "to_client": 0, **self.totals.tunnel_bytes}

    def queue_timeouts(self) -> int:
        return sum(timeouts for _, timeouts in self.totals.queues.values())

    def node_status(self, index: int, node: Any) -> dict[str, Any]:
        return super().node_status(index, self.view.wrap(node))

    def status(self) -> dict[str, Any]:
        document = super().status()
        document["workers"] = self.supervisor.describe()
        return document


class WorkersHistory(History):
    """
    The status page's charts in the main process: each sample first gathers
    the workers' counts (without their client lists), so the charts show
    what every worker served. A sample that waits for a slow worker delays
    the next one rather than overlapping it.
    """

    metrics: WorkersMetrics

    def __init__(self, metrics: WorkersMetrics, clock: IReactorTime) -> None:
        super().__init__(metrics.view, metrics, clock)  # type: ignore[arg-type]

    def sample(self) -> defer.Deferred[None]:  # type: ignore[override]
        d = self.metrics.refresh(clients=False)
        d.addCallback(lambda _: History.sample(self))
        d.addErrback(lambda f: self.log.failure("sampling the workers' counts", f))
        return d


class MainAdminResource(AdminResource):
    """
    The admin tree of the main process: every answer waits for fresh counts
    from the workers first. The drain API acts on the main process's pools,
    whose listener sends the change to every worker.
    """

    def __init__(
        self, pools: Pools, metrics: WorkersMetrics, history: Optional[History] = None
    ) -> None:
        super().__init__(pools, metrics, history)
        self.workers_metrics = metrics

    def render(self, request: Any) -> Any:
        if request.postpath == [b"status.css"]:
            return super().render(request)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(_: None) -> None:
            if gone:
                return
            body = AdminResource.render(self, request)
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()

        def failed(reason: Failure) -> None:
            log.failure("admin request", reason)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        self.workers_metrics.refresh().addCallback(answer).addErrback(failed)
        return server.NOT_DONE_YET


class MainAdminSite(AdminSite):
    def __init__(
        self,
        pools: Pools,
        metrics: WorkersMetrics,
        history: Optional[History] = None,
        **kw: Any,
    ) -> None:
        super().__init__(pools, metrics, history, MainAdminResource(pools, metrics, history), **kw)


# -- restarts -------------------------------------------------------------------------


class RestartBackoff:
    """
    When to restart a worker that died: at once if it had served for
    C{stable} seconds, else after C{first} seconds, doubled on each further
    early death, at most C{maximum}.
    """

    def __init__(
        self,
        clock: Any,
        first: float = BACKOFF_FIRST,
        maximum: float = BACKOFF_MAX,
        stable: float = STABLE_AFTER,
    ) -> None:
        self.clock = clock
        self.first = first
        self.maximum = maximum
        self.stable = stable
        self.early_deaths = 0
        self.last_start = clock.seconds()

    def started(self) -> None:
        self.last_start = self.clock.seconds()

    def delay(self) -> float:
        """
        The worker died now: seconds until it is started again.
        """
        if self.clock.seconds() - self.last_start >= self.stable:
            self.early_deaths = 0
            return 0.0
        self.early_deaths += 1
        return min(self.maximum, self.first * 2 ** (self.early_deaths - 1))


# -- the main process ----------------------------------------------------------------

STARTING = "starting"
SERVING = "serving"
RESTARTING = "restarting"
STOPPED = "stopped"


class _Single(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance


class _QuietAMP(amp.AMP):
    """
    AMP without its log lines for every connection made and lost (a worker
    restart would log four).
    """

    def makeConnection(self, transport: Any) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # type: ignore[assignment]
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class MainChannel(_QuietAMP):
    """
    The main process's end of one worker's channel.
    """

    def __init__(self, supervisor: WorkerSupervisor, slot: WorkerSlot) -> None:
        super().__init__()
        self.supervisor = supervisor
        self.slot = slot

    @NodeFailed.responder
    def node_failed(self, pool: str, key: str, reason: str) -> dict[str, Any]:
        self.supervisor.node_failed(pool, key, reason)
        return {}


class WorkerProcess(ProcessProtocol):
    """
    One run of a worker process.
    """

    def __init__(self, supervisor: WorkerSupervisor, slot: WorkerSlot) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.pid: Optional[int] = None
        self.ended = False

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        self.supervisor.ended(self.slot, self, reason)


@dataclasses.dataclass
class WorkerSlot:
    """
    Worker number C{index} across its restarts.
    """

    index: int
    backoff: RestartBackoff
    state: str = STARTING
    process: Optional[WorkerProcess] = None
    channel: Optional[MainChannel] = None
    restarts: int = 0
    started: Optional[float] = None
    counters: Counters = dataclasses.field(default_factory=Counters)
    # Its client connections as of the last scrape that asked for them.
    clients: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    call: Any = None


def worker_environ(environ: dict[str, str]) -> dict[str, str]:
    """
    A worker's environment: the main process's, without systemd's variables
    (only the main process talks to systemd), and with rrlb importable
    however the main process found it.
    """
    env = {
        k: v for k, v in environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))
    }
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


class WorkerSupervisor(Service):
    """
    Starts C{count} workers on the listening sockets of the main process,
    keeps them configured and told of node state, restarts those that die,
    and stops them all at shutdown.
    """

    def __init__(self, main: MainService, reactor: Any, count: int) -> None:
        self.main = main
        self.reactor = reactor
        self.slots = [WorkerSlot(i, RestartBackoff(reactor)) for i in range(count)]
        self.stopping = False
        # Counts of workers that died (so totals never go down).
        self.departed = Counters()
        self._ready: list[defer.Deferred[Any]] = []
        self._all_served = False
        self._stopped: Optional[defer.Deferred[None]] = None
        self._kill_call: Any = None

    # -- start ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.stopping = False
        for slot in self.slots:
            self.spawn(slot)

    def spawn(self, slot: WorkerSlot) -> None:
        slot.call = None
        if self.stopping:
            return
        try:
            fds = self.main.listen_fds(slot.index)
        except OSError as e:
            log.error("cannot listen for worker {index}: {error}", index=slot.index, error=e)
            self._restart_later(slot, slot.backoff.delay())
            return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds: dict[int, Any] = {0: 0, 1: 1, 2: 2, CHANNEL_FD: child.fileno()}
        for i, fd in enumerate(fds):
            child_fds[FIRST_LISTEN_FD + i] = fd
        argv = [sys.executable, "-m", "rrlb.workers", str(slot.index), str(len(fds))]
        process = WorkerProcess(self, slot)
        try:
            transport = self.reactor.spawnProcess(
                process,
                sys.executable,
                argv,
                env=worker_environ(dict(os.environ)),
                childFDs=child_fds,
            )
        except Exception:
            log.failure("cannot start worker {index}", index=slot.index)
            parent.close()
            self._restart_later(slot)
            return
        finally:
            child.close()
        process.pid = transport.pid
        slot.process = process
        slot.state = STARTING
        slot.started = self.reactor.seconds()
        slot.backoff.started()
        channel = MainChannel(self, slot)
        slot.channel = channel
        self.reactor.adoptStreamConnection(parent.fileno(), socket.AF_UNIX, _Single(channel))
        parent.close()
        d = channel.callRemote(
            Configure,
            config=self.main.worker_config(),
            pools=self.main.worker_pools(),
            states=node_states(self.main.pools.nodes),
            reload=False,
            count=self.main.counts_requests,
        )
        d.addCallbacks(self._serving, self._start_failed, (slot, process), None, (slot, process))

    def _serving(self, answer: dict[str, Any], slot: WorkerSlot, process: WorkerProcess) -> None:
        if slot.process is not process or process.ended:
            return
        slot.state = SERVING
        log.info("worker {index} (pid {pid}) is serving", index=slot.index, pid=answer.get("pid"))
        if all(s.state == SERVING for s in self.slots) and not self._all_served:
            self._all_served = True
            ready, self._ready = self._ready, []
            for d in ready:
                d.callback(True)

    def _start_failed(self, reason: Failure, slot: WorkerSlot, process: WorkerProcess) -> None:
        if slot.process is process and not process.ended:
            log.error(
                "worker {index} (pid {pid}) did not start: {error}",
                index=slot.index,
                pid=process.pid,
                error=reason.getErrorMessage(),
            )

    def serving(self) -> defer.Deferred[Any]:
        """
        A Deferred that fires once every worker serves (for C{READY=1}).
        """
        if self._all_served:
            return defer.succeed(True)
        d: defer.Deferred[Any] = defer.Deferred()
        self._ready.append(d)
        return d

    # -- a worker's end -------------------------------------------------------------

    def ended(self, slot: WorkerSlot, process: WorkerProcess, reason: Failure) -> None:
        if slot.process is not process:
            return
        slot.process = None
        channel, slot.channel = slot.channel, None
        if channel is not None and channel.transport is not None:
            channel.transport.loseConnection()
        self.departed.add(slot.counters, gauges=False)
        slot.counters = Counters()
        slot.clients = []
        if not self.stopping:
            self.main.worker_gone(slot.index)
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        how = f"killed by signal {sig}" if sig else f"exited with code {code}"
        if self.stopping:
            slot.state = STOPPED
            log.info("worker {index} (pid {pid}) {how}", index=slot.index, pid=process.pid, how=how)
            self._check_stopped()
            return
        delay = slot.backoff.delay()
        log.warn(
            "worker {index} (pid {pid}) {how}; its in-flight requests are lost;"
            " restarting it {when}",
            index=slot.index,
            pid=process.pid,
            how=how,
            when=f"in {delay:g}s" if delay else "now",
        )
        slot.restarts += 1
        self._restart_later(slot, delay)

    def _restart_later(self, slot: WorkerSlot, delay: float = BACKOFF_FIRST) -> None:
        slot.state = RESTARTING
        slot.call = self.reactor.callLater(delay, self.spawn, slot)

    # -- what the workers are told ------------------------------------------------------

    def channels(self) -> list[MainChannel]:
        return [s.channel for s in self.slots if s.channel is not None]

    def configure_all(self, reload: bool) -> defer.Deferred[Any]:
        """
        Send every worker the main process's configuration and node states.

        @return: a Deferred that fires once every worker answered (or
            L{GATHER_TIMEOUT} seconds passed); it never fails.
        """
        config = self.main.worker_config()
        pools = self.main.worker_pools()
        states = node_states(self.main.pools.nodes)
        answers = []
        for slot in self.slots:
            channel = slot.channel
            if channel is None:
                continue
            d = channel.callRemote(
                Configure,
                config=config,
                pools=pools,
                states=states,
                reload=reload,
                count=self.main.counts_requests,
            )
            d.addTimeout(GATHER_TIMEOUT, self.reactor)
            d.addErrback(self._configure_failed, slot)
            answers.append(d)
        return defer.DeferredList(answers)

    def _configure_failed(self, reason: Failure, slot: WorkerSlot) -> None:
        if reason.check(error.ConnectionDone, error.ConnectionLost):
            return
        log.error(
            "worker {index} kept its configuration: {error}",
            index=slot.index,
            error=reason.getErrorMessage(),
        )

    def node_changed(self, node: Node) -> None:
        states = node_states([node])
        for channel in self.channels():
            channel.callRemote(NodeStates, states=states)

    def node_failed(self, pool_name: str, key: str, reason: str) -> None:
        """
        A worker saw a request to node C{key} of pool C{pool_name} fail:
        that pool's node counts a failed check (the same URL in another pool
        is another node, with its own health).
        """
        pool = self.main.pools.get(pool_name)
        node = pool.get(key) if pool is not None else None
        if pool is not None and node is not None and not node.removed:
            pool.mark(node, False, reason)

    # -- counters -----------------------------------------------------------------------

    def gather(self, clients: bool = True) -> defer.Deferred[Counters]:
        """
        Ask every serving worker for its counters (and its client
        connections if C{clients}); the totals of all of them (a worker that
        does not answer in time counts with what it said last), plus those
        of workers that died.
        """
        calls = []
        for slot in self.slots:
            if slot.channel is None or slot.state != SERVING:
                continue
            d = slot.channel.callRemote(GetCounters, clients=clients)
            d.addTimeout(GATHER_TIMEOUT, self.reactor)
            d.addCallbacks(self._got_counters, self._no_counters, (slot, clients), None, (slot,))
            calls.append(d)
        return defer.DeferredList(calls).addCallback(lambda _: self.totals())

    def _got_counters(self, answer: dict[str, Any], slot: WorkerSlot, clients: bool) -> None:
        counters = Counters.from_json(answer["counters"])
        # The client list is kept apart: a gather for the charts (without
        # it) may answer between those of a scrape.
        if clients:
            slot.clients = counters.clients
        counters.clients = []
        slot.counters = counters

    def _no_counters(self, reason: Failure, slot: WorkerSlot) -> None:
        if reason.check(error.ConnectionDone, error.ConnectionLost):
            # The worker ended (a stop, or a death ended() reports).
            return
        log.warn(
            "worker {index} gave no counters: {error}",
            index=slot.index,
            error=reason.getErrorMessage(),
        )

    def totals(self) -> Counters:
        totals = Counters()
        totals.add(self.departed, gauges=False)
        for slot in self.slots:
            totals.add(slot.counters)
            totals.clients.extend({**client, "worker": slot.index} for client in slot.clients)
        # The longest-open first, as one process lists them, and as many.
        totals.clients.sort(key=lambda c: c.get("since") or 0.0)
        del totals.clients[MAX_LISTED_CLIENTS:]
        return totals

    def describe(self) -> list[dict[str, Any]]:
        """
        The workers as C{/status} shows them.
        """
        return [
            {
                "index": slot.index,
                "pid": slot.process.pid if slot.process is not None else None,
                "state": slot.state,
                "restarts": slot.restarts,
                "started": slot.started,
                "requests": sum(slot.counters.requests.values()),
                "connections": slot.counters.connections,
            }
            for slot in self.slots
        ]

    # -- stop -----------------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        """
        Tell every worker to drain and exit; wait for them (killing those
        still running C{drain_timeout} plus L{STOP_GRACE} seconds later).
        """
        super().stopService()
        self.stopping = True
        ready, self._ready = self._ready, []
        for d in ready:
            d.cancel()
        for slot in self.slots:
            if slot.call is not None and slot.call.active():
                slot.call.cancel()
            slot.call = None
            if slot.process is None:
                slot.state = STOPPED
        done: defer.Deferred[None] = defer.Deferred()
        self._stopped = done
        for slot in self.slots:
            if slot.process is None:
                continue
            if slot.channel is not None and slot.state == SERVING:
                slot.channel.callRemote(Stop)
            else:
                self._signal(slot, "TERM")
        self._kill_call = self.reactor.callLater(
            self.main.config.drain_timeout + STOP_GRACE, self._kill_remaining
        )
        self._check_stopped()
        return done

    def _signal(self, slot: WorkerSlot, name: str) -> None:
        process = slot.process
        if process is None or process.transport is None:
            return
        try:
            process.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    def _kill_remaining(self) -> None:
        self._kill_call = None
        for slot in self.slots:
            if slot.process is not None:
                log.warn("worker {index} still running: killing it", index=slot.index)
                self._signal(slot, "KILL")

    def _check_stopped(self) -> None:
        if self._stopped is None or any(s.process is not None for s in self.slots):
            return
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        done, self._stopped = self._stopped, None
        done.callback(None)


class SocketGroup:
    """
    The listening sockets of one TCP listener of the main process: one per
    worker, all bound to the same address with C{SO_REUSEPORT}, so the
    kernel spreads new connections evenly over the workers. (On one shared
    socket, whichever worker is awake first takes a whole burst of clients;
    on a small machine, where the other waits for a core, that was every one
    of wrk's connections.)

    Also the listening port L{Listener} sees: C{stopListening} closes them.
    """

    def __init__(self, family: int, interface: str, port: int, backlog: int, count: int) -> None:
        self.family = family
        self.interface = interface
        self.backlog = backlog
        self.sockets: list[Optional[socket.socket]] = []
        self.port = port
        for _ in range(count):
            self.sockets.append(self._bind())

    def _bind(self) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        # Port 0: the first socket chose the port, the others join it.
        self.port = sock.getsockname()[1]
        return sock

    def fileno_for(self, index: int) -> int:
        """
        The socket of worker C{index}: a new one after L{worker_gone}, or,
        if binding again fails (privileges dropped since start-up, for a
        port below 1024), another worker's, which they then share.
        """
        sock = self.sockets[index]
        if sock is None:
            try:
                sock = self.sockets[index] = self._bind()
            except OSError as e:
                shared = next((s for s in self.sockets if s is not None), None)
                if shared is None:
                    raise
                log.warn(
                    "cannot bind port {port} again for worker {index} ({error});"
                    " it shares another worker's socket",
                    port=self.port,
                    index=index,
                    error=e.strerror or e,
                )
                return shared.fileno()
        return sock.fileno()

    def worker_gone(self, index: int) -> None:
        """
        Close the socket of a worker that died, so that new connections go
        to the others until it is back (those it had queued are reset); its
        successor gets a new one.
        """
        sock, self.sockets[index] = self.sockets[index], None
        if sock is not None:
            sock.close()

    def stopReading(self) -> None:
        pass

    def stopListening(self) -> None:
        for i in range(len(self.sockets)):
            self.worker_gone(i)

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address, IPv6Address

        kind = IPv6Address if self.family == socket.AF_INET6 else IPv4Address
        return kind("TCP", self.interface, self.port)


@implementer(IStreamServerEndpoint)
class SocketGroupEndpoint:
    def __init__(self, family: int, interface: str, port: int, backlog: int, count: int) -> None:
        self.args = (family, interface, port, backlog, count)

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        return defer.execute(SocketGroup, *self.args)


def bind_endpoint(reactor: Any, description: str, workers: int) -> IStreamServerEndpoint:
    """
    The endpoint the main process binds for a C{--listen} description: the
    sockets only, without the TLS or PROXY header the workers wrap around
    them. TCP listeners get a L{SocketGroup}; the others (systemd's,
    UNIX sockets) one socket the workers share.
    """
    proxied, kind, inner = listen_kind(with_default_backlog(description))
    if kind in ("tcp", "tcp6", "ssl") and hasattr(socket, "SO_REUSEPORT"):
        args, kwargs = split_description(inner)
        port = args[1] if len(args) > 1 else kwargs.get("port", "")
        interface = kwargs.get("interface", "::" if kind == "tcp6" else "")
        family = socket.AF_INET6 if kind == "tcp6" or ":" in interface else socket.AF_INET
        return SocketGroupEndpoint(
            family, interface, int(port), int(kwargs.get("backlog", "50")), workers
        )
    from twisted.internet.endpoints import serverFromString

    return _Held(serverFromString(reactor, inner))


class HeldForWorkers(Factory):
    """
    The factory of a listening socket the main process only holds: it stops
    reading at once (see L{MainService.port_listening}), so it never builds
    a protocol; its name is what Twisted's "starting on" line shows.
    """

    noisy = False

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        return None


@implementer(IStreamServerEndpoint)
class _Held:
    def __init__(self, wrapped: IStreamServerEndpoint) -> None:
        self.wrapped = wrapped

    def listen(self, factory: Any) -> Any:
        return self.wrapped.listen(HeldForWorkers())


class MainService(BalancerService):
    """
    The main process of C{--workers N}: a L{BalancerService} that binds the
    listeners without serving them, checks the health of every pool's
    nodes, answers the admin endpoint and tells systemd, and runs a
    L{WorkerSupervisor}.
    """

    def __init__(self, config: Config, reactor: Any, *args: Any, **kw: Any) -> None:
        self.supervisor = WorkerSupervisor(self, reactor, config.workers)
        self.ports: list[Any] = []
        self._applied: defer.Deferred[Any] = defer.succeed(None)
        super().__init__(config, reactor, *args, **kw)
        self.supervisor.setServiceParent(self)
        # Every pool's nodes, those of pools a reload adds included.
        self.pools.add_listener(self.supervisor.node_changed)

    @property
    def counts_requests(self) -> bool:
        return self.config.admin is not None

    def make_metrics(self) -> Metrics:
        return WorkersMetrics(
            self.pools, self.reactor, lambda: list(self.checkers.values()), self.supervisor
        )

    def make_history(self) -> History:
        assert isinstance(self.metrics, WorkersMetrics)
        return WorkersHistory(self.metrics, self.reactor)

    def listen_endpoint(self, index: int, description: str) -> Any:
        return bind_endpoint(self.reactor, description, self.config.workers)

    def port_listening(self, port: Any) -> Any:
        # The workers accept; this process only holds the sockets.
        port.stopReading()
        self.ports.append(port)
        return port

    def listen_fds(self, index: int) -> list[int]:
        """
        The listening sockets of worker C{index}, in C{--listen} order.
        """
        return [
            port.fileno_for(index) if isinstance(port, SocketGroup) else port.fileno()
            for port in self.ports
        ]

    def worker_gone(self, index: int) -> None:
        for port in self.ports:
            if isinstance(port, SocketGroup):
                port.worker_gone(index)

    def admin_site(self, history: Optional[History]) -> Any:
        assert isinstance(self.metrics, WorkersMetrics)
        return MainAdminSite(self.pools, self.metrics, history, reactor=self.reactor)

    def readiness(self) -> list[defer.Deferred[Any]]:
        return super().readiness() + [self.supervisor.serving()]

    def _apply_access_log(self, config: Config) -> None:
        # The workers write the access log.
        pass

    def _retire(self, removed: list[Node]) -> None:
        # The workers let removed nodes finish their requests.
        for node in removed:
            self.log.info("node {node} removed", node=node.url)

    def worker_config(self) -> Config:
        """
        The configuration a worker runs: this one without DNS entries, demo
        backends or an admin endpoint (a worker neither looks up names nor
        starts backends nor answers the admin API). Its pools and their
        nodes come with it (L{worker_pools}).
        """
        return dataclasses.replace(
            self.config,
            dns_nodes=(),
            pools=tuple(dataclasses.replace(pc, dns_nodes=()) for pc in self.config.pools),
            demo=0,
            admin=None,
            admin_token=None,
        )

    def worker_pools(self) -> tuple[PoolConfig, ...]:
        """
        The pools the workers run: this process's, in order, each with the
        node set it runs now (configured, demo and found in DNS).
        """
        return tuple(
            dataclasses.replace(pc, dns_nodes=()) for pc in self._pool_configs(self.config)
        )

    def stopService(self) -> defer.Deferred[None]:
        # What systemd shows while the workers drain (the main process has
        # no connections of its own to count).
        self.notify.stopping(
            f"stopping: {self.config.workers} workers draining their connections"
            f" for up to {self.config.drain_timeout:g}s"
        )
        return super().stopService()

    def apply(self, config: Config) -> None:
        super().apply(config)
        self._applied = self.supervisor.configure_all(reload=True)

    def applied_everywhere(self) -> defer.Deferred[Any]:
        # The workers answered the last configuration.
        return self._applied

    def nodes_found(self) -> None:
        super().nodes_found()
        self.supervisor.configure_all(reload=False)


# -- a worker process -------------------------------------------------------------


class WorkerPool(Pool):
    """
    A worker's pool: its health state comes from the main process
    (L{apply_state}); a failure the proxy sees is reported there rather than
    counted here.

    @ivar report: called with the node and the reason of each failure.
    """

    report: Optional[Callable[[Node, str], None]] = None

    def mark(
        self,
        node: Node,
        ok: bool,
        reason: str = "",
        when: Optional[float] = None,
        latency: Optional[float] = None,
    ) -> None:
        if not ok and self.report is not None and not node.removed:
            self.report(node, reason)

    def apply_state(self, key: str, healthy: bool, drained: bool) -> None:
        """
        The main process says node C{key} is (or is not) healthy and
        drained; one that comes back into rotation slow-starts as
        L{Pool.mark} and L{Pool.set_drained} would start it.
        """
        node = self.get(key)
        if node is None or (node.healthy, node.drained) == (healthy, drained):
            return
        if (healthy and not node.healthy) or (node.drained and not drained):
            node.up_since = self._ramping_now()
        node.healthy = healthy
        node.drained = drained
        self._changed(node)


def apply_states(pools: Pools, states: Iterable[Sequence[Any]]) -> None:
    """
    Apply C{[pool, key, healthy, drained]} states to the pools they name;
    pools and nodes a worker does not have (yet) are skipped.
    """
    for pool_name, key, healthy, drained in states:
        pool = pools.get(pool_name)
        if isinstance(pool, WorkerPool):
            pool.apply_state(key, healthy, drained)


@implementer(IStreamServerEndpoint)
class _TLSEndpoint:
    def __init__(self, wrapped: IStreamServerEndpoint, tls: Any) -> None:
        self.wrapped = wrapped
        self.tls = tls

    def listen(self, factory: Any) -> Any:
        return self.wrapped.listen(TLSMemoryBIOFactory(self.tls, False, factory))


def adopted_endpoint(
    reactor: Any, description: str, fd: int, config: Config
) -> tuple[IStreamServerEndpoint, Any]:
    """
    The endpoint of a worker for the listening socket C{fd} the main process
    bound for C{description}, with its TLS (the L{rrlb.tls.ServerTLS}, also
    returned) and PROXY header as that description asks.
    """
    proxied, kind, _ = listen_kind(description)
    on_tcp = tls_on_tcp(config.listen, config.tls)
    tls = None
    if kind == "ssl" or (kind == "tcp" and on_tcp):
        # Only built, never listened on: the TLS side of the listener.
        tls = listen_endpoint(None, description, config.tls, on_tcp)[1]
    family = socket.socket(fileno=os.dup(fd))
    try:
        base: IStreamServerEndpoint = AdoptedStreamServerEndpoint(reactor, fd, family.family)
    finally:
        family.close()
    if proxied:
        return ProxyHeaderEndpoint(base, reactor, tls), tls
    if tls is not None:
        return _TLSEndpoint(base, tls), tls
    return base, None


def accept_one_at_a_time(port: Any) -> None:
    """
    Make C{port} accept one client per wake-up (nginx's C{multi_accept
    off}). Every worker is woken for each client on the listening socket
    they share; Twisted's port accepts up to a hundred in a loop, so the
    first worker awake took a whole burst (all of wrk's 64 connections).
    One at a time, the least busy worker takes the next client.
    """
    read = port.doRead

    def doRead() -> Any:
        port.numberAccepts = 1
        return read()

    port.doRead = doRead


class WorkerService(BalancerService):
    """
    A worker: the single-process service tree serving the listening sockets
    the main process passed (C{listen_fds}, in C{--listen} order), without
    health checkers, DNS lookups, an admin endpoint or systemd
    notifications of its own. It runs the pools the main process sends
    (C{pools}, with their node sets), whose nodes' health comes from there.

    @param report: called with a node and the reason when a request to it
        failed (passive health, decided by the main process).
    """

    checks_health = False

    def __init__(
        self,
        config: Config,
        reactor: Any,
        listen_fds: Sequence[int],
        pools: Sequence[PoolConfig],
        count: bool = False,
        handle_signals: bool = False,
        report: Optional[Callable[[Node, str], None]] = None,
    ) -> None:
        self.listen_fds = list(listen_fds)
        self.count_requests = count
        self.main_pools = tuple(pools)
        self.report = report
        super().__init__(config, reactor, handle_signals=handle_signals)

    def initial_pools(self, config: Config) -> tuple[PoolConfig, ...]:
        return self.main_pools

    def _pool_configs(self, config: Config) -> tuple[PoolConfig, ...]:
        return self.main_pools

    def new_pool(self, name: str) -> Pool:
        pool = WorkerPool((), name=name, clock=self.reactor)
        pool.report = self.report
        return pool

    def listen_endpoint(self, index: int, description: str) -> Any:
        endpoint, tls = adopted_endpoint(
            self.reactor, description, self.listen_fds[index], self.config
        )
        if tls is not None:
            # Re-read on reload, as BalancerTLS.listen_endpoint would.
            self.tls.listeners.append(tls)
        return endpoint

    def port_listening(self, port: Any) -> Any:
        accept_one_at_a_time(port)
        return super().port_listening(port)

    def _apply_access_log(self, config: Config) -> None:
        super()._apply_access_log(config)
        if self.count_requests:
            self.site.access_log = self.metrics.record

    def _sighup(self, signum: int, frame: Any) -> None:
        # The main process reloads and tells the workers.
        pass

    def configure(self, config: Config, pools: Sequence[PoolConfig], reload: bool) -> None:
        """
        Run C{pools}: with C{reload}, as a single process applies a reload
        of C{config}; without, as it applies nodes found in DNS.

        @raise ConfigError: a TLS file cannot be used; nothing changed.
        """
        previous, self.main_pools = self.main_pools, tuple(pools)
        try:
            if reload:
                self.apply(config)
            else:
                self.nodes_found()
        except Exception:
            self.main_pools = previous
            raise

    def apply_states(self, states: Iterable[Sequence[Any]]) -> None:
        apply_states(self.pools, states)

    def counters(self, clients: bool = False) -> Counters:
        return Counters.of(
            self.metrics,
            self.pools,
            {name: dest.queue for name, dest in self.proxy.destinations.items()},
            self.site.client_list() if clients else None,
        )


class WorkerChannel(_QuietAMP):
    """
    A worker's end of its channel: builds and runs its L{WorkerService} as
    the main process says.
    """

    def __init__(self, reactor: Any, listen_fds: Sequence[int]) -> None:
        super().__init__()
        self.reactor = reactor
        self.listen_fds = listen_fds
        self.service: Optional[WorkerService] = None
        self.exit_code = 0
        self._stopping = False

    @Configure.responder
    def configure(
        self,
        config: Config,
        pools: tuple[PoolConfig, ...],
        states: list[Any],
        reload: bool,
        count: bool,
    ) -> dict[str, Any]:
        service = self.service
        if service is None:
            try:
                service = WorkerService(
                    config,
                    self.reactor,
                    self.listen_fds,
                    pools,
                    count=count,
                    handle_signals=True,
                    report=self.report,
                )
                service.apply_states(states)
                service.startService()
            except (Exception, SystemExit) as e:
                log.failure("starting the worker")
                self.exit_code = 1
                self.stop()
                raise ConfigRefused(str(e)) from None
            self.service = service
            self.reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
            return {"pid": os.getpid()}
        service.count_requests = count
        try:
            service.configure(config, pools, reload)
        except Exception as e:
            log.error("configuration not applied: {error}", error=str(e))
            raise ConfigRefused(str(e)) from None
        service.apply_states(states)
        return {"pid": os.getpid()}

    @NodeStates.responder
    def node_states(self, states: list[Any]) -> dict[str, Any]:
        if self.service is not None:
            self.service.apply_states(states)
        return {}

    @GetCounters.responder
    def get_counters(self, clients: Optional[bool] = None) -> dict[str, Any]:
        service = self.service
        counters = service.counters(bool(clients)) if service is not None else Counters()
        return {"counters": counters.to_json()}

    @Stop.responder
    def stop_command(self) -> dict[str, Any]:
        self.stop()
        return {}

    def report(self, node: Node, reason: str) -> None:
        if self.transport is not None and not self._stopping:
            self.callRemote(NodeFailed, pool=node.pool_name, key=node.key, reason=reason)

    def stop(self) -> None:
        """
        Drain and exit (the reactor's shutdown stops the service).
        """
        if self._stopping:
            return
        self._stopping = True
        try:
            self.reactor.stop()
        except error.ReactorNotRunning:
            pass

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        # The main process is gone: nobody would restart or stop this one.
        self.reactor.callLater(0, self.stop)


def _log_observer(index: int) -> Any:
    from twisted.logger import (
        FilteringLogObserver,
        ILogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        textFileLogObserver,
    )

    text = textFileLogObserver(sys.stderr)

    def observe(event: dict[str, Any]) -> None:
        event = dict(event)
        event["log_system"] = f"rrlb worker {index}"
        text(event)

    return FilteringLogObserver(
        cast(ILogObserver, observe), [LogLevelFilterPredicate(LogLevel.info)]
    )


def run_worker(argv: Sequence[str]) -> int:
    """
    A worker process: C{python -m rrlb.workers INDEX LISTENERS}, with its
    channel on L{CHANNEL_FD} and the listening sockets from
    L{FIRST_LISTEN_FD} on, as L{WorkerSupervisor.spawn} starts it.
    """
    from twisted.internet import reactor as _reactor
    from twisted.logger import globalLogBeginner

    reactor: Any = _reactor

    index, listeners = int(argv[0]), int(argv[1])
    globalLogBeginner.beginLoggingTo([_log_observer(index)], redirectStandardIO=False)
    # A terminal's hangup or a SIGHUP to the process group: the main process
    # decides about reloads.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    fds = list(range(FIRST_LISTEN_FD, FIRST_LISTEN_FD + listeners))
    channel = WorkerChannel(reactor, fds)

    # SIGTERM or SIGINT (systemd signals every process of the unit, a
    # terminal the whole process group) stop the worker as the main
    # process's Stop does, once: Twisted's own handler would stop the
    # reactor a second time.
    def stop(signum: int, frame: Any) -> None:
        reactor.callFromThread(channel.stop)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    reactor.adoptStreamConnection(CHANNEL_FD, socket.AF_UNIX, _Single(channel))
    os.close(CHANNEL_FD)
    reactor.run(installSignalHandlers=False)
    return channel.exit_code


if __name__ == "__main__":
    from rrlb.workers import run_worker as _run

    raise SystemExit(_run(sys.argv[1:]))
