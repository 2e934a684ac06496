# -*- test-case-name: tests.test_workers -*-
"""
The worker processes of C{--workers N}: L{WorkerSupervisor} starts them on
the main process's listening sockets, keeps them configured and told of
every node state change, gathers their counts, restarts those that die
(after a backoff if they die young) and stops them all at shutdown.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from typing import Any, Optional, Protocol

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from rrlb.acmetls import AcmeState
from rrlb.clients import MAX_LISTED_CLIENTS
from rrlb.config import Config, PoolConfig
from rrlb.pool import Node, Pools
from rrlb.workers.limitlink import MainLimits
from rrlb.workers.totals import Counters
from rrlb.workers.wire import (
    CHANNEL_FD,
    FIRST_LISTEN_FD,
    AcmeUpdate,
    Configure,
    Decide,
    GetCounters,
    NodeFailed,
    NodeStates,
    OneProtocol,
    QuietAMP,
    Release,
    Stop,
    node_states,
)

log = Logger()

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


class Main(Protocol):
    """
    What the supervisor needs of the main process
    (L{rrlb.workers.main.WorkersTraffic}).
    """

    @property
    def config(self) -> Config:
        """The running configuration (for its drain timeout)."""

    @property
    def pools(self) -> Pools:
        """The pools the control side's checkers mark."""

    @property
    def counts_requests(self) -> bool:
        """Whether the workers count every request."""

    def listen_fds(self, index: int) -> list[int]:
        """The listening sockets of worker C{index}, in C{--listen} order."""

    def worker_gone(self, index: int) -> None:
        """Worker C{index} died: give up its sockets."""

    def worker_config(self) -> Config:
        """The configuration a worker runs."""

    def worker_pools(self) -> tuple[PoolConfig, ...]:
        """The pools a worker runs, each with its node set."""

    @property
    def acme_state(self) -> Optional[AcmeState]:
        """What the workers serve of ACME, if it is on."""


STARTING = "starting"
SERVING = "serving"
RESTARTING = "restarting"
STOPPED = "stopped"


class MainChannel(QuietAMP):
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

    # The store: local rate limits of every worker, decided here.

    @Decide.responder
    def decide(self, decisions: list[Any]) -> dict[str, Any]:
        return {"answers": self.supervisor.limits.decide(decisions, self.slot.index)}

    @Release.responder
    def release(self, releases: list[Any]) -> dict[str, Any]:
        self.supervisor.limits.release_all(releases, self.slot.index)
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
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


class WorkerSupervisor(Service):
    """
    Starts C{count} workers on the listening sockets of the main process,
    keeps them configured and told of node state, restarts those that die,
    and stops them all at shutdown.
    """

    def __init__(self, main: Main, reactor: Any, count: int) -> None:
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
        # The instance's one count of the store: local rate limits.
        self.limits = MainLimits(reactor)

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
        argv = [sys.executable, "-m", "rrlb.workers.child", str(slot.index), str(len(fds))]
        # Its log in the main process's format (log_format).
        argv.append(self.main.config.log_format)
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
        self.reactor.adoptStreamConnection(parent.fileno(), socket.AF_UNIX, OneProtocol(channel))
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
        state = self.main.acme_state
        if state is not None:
            # After its configuration: the worker serves it from the start.
            channel.callRemote(AcmeUpdate, state=state).addErrback(self._configure_failed, slot)

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
        # Its requests in flight are gone with it.
        self.limits.forget(slot.index)
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

    def send_acme(self, state: AcmeState) -> defer.Deferred[Any]:
        """
        Send every worker the ACME certificate and challenges to serve.

        @return: a Deferred that fires once every worker answered (or
            L{GATHER_TIMEOUT} seconds passed); it never fails.
        """
        answers = []
        for slot in self.slots:
            if slot.channel is not None:
                d = slot.channel.callRemote(AcmeUpdate, state=state)
                d.addTimeout(GATHER_TIMEOUT, self.reactor)
                d.addErrback(self._configure_failed, slot)
                answers.append(d)
        return defer.DeferredList(answers)

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

    def limit_keys(self) -> int:
        """
        The keys of the instance's local rate-limit tables (held here).
        """
        return self.limits.keys()

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
