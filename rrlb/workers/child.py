# -*- test-case-name: tests.test_workers -*-
"""
A worker process of C{--workers N}: C{python -m rrlb.workers.child INDEX
LISTENERS}, with its channel to the main process on L{CHANNEL_FD} and the
listening sockets from L{FIRST_LISTEN_FD} on.

It builds a L{Traffic} as a single process does, around the sockets the
main process passed and the pools it sends (L{Configure}), with
L{WorkerPool}s: their nodes' health comes from the main process, and a
failure the proxy sees goes there. No health checks, DNS lookups, admin
endpoint or systemd notifications of its own: those are the main
process's.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any, Callable, Iterable, Optional, Sequence, cast

from twisted.internet import error
from twisted.logger import Logger
from twisted.python.failure import Failure

from rrlb.acmetls import AcmeState
from rrlb.config import Config, ConfigError, PoolConfig
from rrlb.limits import SHARED, LimitStores
from rrlb.pool import Node, Pool, Pools
from rrlb.traffic import Traffic
from rrlb.workers.limitlink import LimitLink
from rrlb.workers.sockets import adopted_endpoint
from rrlb.workers.totals import Counters
from rrlb.workers.wire import (
    CHANNEL_FD,
    FIRST_LISTEN_FD,
    AcmeUpdate,
    ConfigRefused,
    Configure,
    GetCounters,
    NodeFailed,
    NodeStates,
    OneProtocol,
    QuietAMP,
    Stop,
)

log = Logger()


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


def counters(traffic: Traffic, clients: bool = False) -> Counters:
    """
    What C{traffic} counted (with its client connections if C{clients}).
    """
    return Counters.of(
        traffic.metrics,
        traffic.pools,
        {name: dest.queue for name, dest in traffic.proxy.destinations.items()},
        traffic.site.client_list() if clients else None,
    )


class WorkerChannel(QuietAMP):
    """
    A worker's end of its channel: builds and runs its L{Traffic} as the
    main process says.
    """

    def __init__(self, reactor: Any, listen_fds: Sequence[int]) -> None:
        super().__init__()
        self.reactor = reactor
        self.listen_fds = listen_fds
        self.pools = Pools()
        self.traffic: Optional[Traffic] = None
        self.exit_code = 0
        self._stopping = False
        # The store: local rate limits count in the main process.
        self.limits = LimitStores(reactor, LimitLink(self, reactor))

    def new_pool(self, name: str) -> Pool:
        pool = WorkerPool((), name=name, clock=self.reactor)
        pool.report = self.report
        return pool

    def endpoint(self, config: Config) -> Callable[[int, str], Any]:
        """
        The endpoints of the listening sockets the main process passed.
        """
        return lambda index, description: adopted_endpoint(
            self.reactor, description, self.listen_fds[index], config
        )

    @Configure.responder
    def configure(
        self,
        config: Config,
        pools: tuple[PoolConfig, ...],
        states: list[Any],
        reload: bool,
        count: bool,
    ) -> dict[str, Any]:
        traffic = self.traffic
        if traffic is None:
            try:
                traffic = Traffic(
                    config,
                    self.reactor,
                    self.pools,
                    pools,
                    new_pool=self.new_pool,
                    endpoints=self.endpoint(config),
                    count_requests=count,
                    filter_state={SHARED: self.limits},
                )
                apply_states(self.pools, states)
                # One client per wake-up: the least busy worker takes the
                # next (every worker is woken for each client).
                traffic.site.accepts_per_wakeup = 1
                traffic.startService()
            except (Exception, SystemExit) as e:
                log.failure("starting the worker")
                self.exit_code = 1
                self.stop()
                raise ConfigRefused(str(e)) from None
            self.traffic = traffic
            self.reactor.addSystemEventTrigger("before", "shutdown", traffic.stopService)
            return {"pid": os.getpid()}
        traffic.count_requests = count
        try:
            traffic.apply(config, pools, reload)
        except ConfigError as e:
            if reload:
                log.error("configuration not applied: {error}", error=str(e))
                raise ConfigRefused(str(e)) from None
            # A node TLS file went bad since the last reload: keep running.
            log.error("nodes from DNS not applied: {error}", error=str(e))
        except Exception as e:
            log.error("configuration not applied: {error}", error=str(e))
            raise ConfigRefused(str(e)) from None
        apply_states(self.pools, states)
        return {"pid": os.getpid()}

    @AcmeUpdate.responder
    def acme_update(self, state: AcmeState) -> dict[str, Any]:
        if self.traffic is not None:
            self.traffic.acme_update(state)
        return {"names": len(state.names)}

    @NodeStates.responder
    def node_states(self, states: list[Any]) -> dict[str, Any]:
        apply_states(self.pools, states)
        return {}

    @GetCounters.responder
    def get_counters(self, clients: Optional[bool] = None) -> dict[str, Any]:
        traffic = self.traffic
        found = counters(traffic, bool(clients)) if traffic is not None else Counters()
        return {"counters": found.to_json()}

    @Stop.responder
    def stop_command(self) -> dict[str, Any]:
        self.stop()
        return {}

    def report(self, node: Node, reason: str) -> None:
        if self.transport is not None and not self._stopping:
            self.callRemote(NodeFailed, pool=node.pool_name, key=node.key, reason=reason)

    def stop(self) -> None:
        """
        Drain and exit (the reactor's shutdown stops the traffic).
        """
        if self._stopping:
            return
        self._stopping = True
        try:
            self.reactor.stop()
        except error.ReactorNotRunning:
            pass

    def signalled(self, signum: int) -> None:
        """
        SIGTERM or SIGINT: stop as L{Stop} does, once; while draining, a
        second one only says so.
        """
        if not self._stopping:
            self.stop()
            return
        traffic = self.traffic
        log.warn(
            "received {signal} while draining {connections} connections;"
            " still waiting (SIGKILL stops at once)",
            signal=signal.Signals(signum).name,
            connections=len(traffic.site.channels) if traffic is not None else 0,
        )

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        # The main process is gone: nobody would restart or stop this one.
        self.reactor.callLater(0, self.stop)


def _log_observer(index: int, log_format: str = "text") -> Any:
    from twisted.logger import (
        FilteringLogObserver,
        ILogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        textFileLogObserver,
    )

    from rrlb.jsonlog import json_file_observer

    out = json_file_observer if log_format == "json" else textFileLogObserver
    text = out(sys.stderr)

    def observe(event: dict[str, Any]) -> None:
        event = dict(event)
        event["log_system"] = f"rrlb worker {index}"
        text(event)

    return FilteringLogObserver(
        cast(ILogObserver, observe), [LogLevelFilterPredicate(LogLevel.info)]
    )


def run_worker(argv: Sequence[str]) -> int:
    """
    A worker process, as L{rrlb.workers.supervisor.WorkerSupervisor.spawn}
    starts it.
    """
    from twisted.internet import reactor as _reactor
    from twisted.logger import globalLogBeginner

    reactor: Any = _reactor

    index, listeners = int(argv[0]), int(argv[1])
    log_format = argv[2] if len(argv) > 2 else "text"
    globalLogBeginner.beginLoggingTo([_log_observer(index, log_format)], redirectStandardIO=False)
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
        reactor.callFromThread(channel.signalled, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    reactor.adoptStreamConnection(CHANNEL_FD, socket.AF_UNIX, OneProtocol(channel))
    os.close(CHANNEL_FD)
    reactor.run(installSignalHandlers=False)
    return channel.exit_code


if __name__ == "__main__":
    # The module's one copy is rrlb.workers.child, not __main__.
    from rrlb.workers.child import run_worker as _run

    raise SystemExit(_run(sys.argv[1:]))
