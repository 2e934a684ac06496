# -*- test-case-name: tests.test_health -*-
"""
Active health checks: every node is probed on its own timer with
C{GET <health path>} through a twisted.web agent (the body is read with
treq), and the outcome is fed to the pool; a probe that could not connect
for want of a local resource (L{rrlb.failures}) feeds it nothing.
"""

from __future__ import annotations

from typing import Any, Optional

import treq
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from rrlb import __version__
from rrlb._twisted import quiet_connection_pool
from rrlb.failures import LocalErrors, describe_failure, exhausted_now, local_errno
from rrlb.pool import Node, Pool
from rrlb.settings import HealthConfig

USER_AGENT = f"rrlb-health/{__version__}".encode("ascii")


# A connection pool whose connections do not log their start and stop: with
# a probe every few seconds per node they would flood the log.
QuietConnectionPool = quiet_connection_pool


class HealthChecker(Service):
    """
    Probes each node of a L{Pool} every C{interval} seconds and marks it.

    Each node has its own L{LoopingCall}, so probes of one node never
    overlap (the loop waits for the probe's Deferred) and a slow node never
    delays the others. The first round runs at start-up.
    """

    log = Logger()

    def __init__(
        self,
        pool: Pool,
        health: HealthConfig,
        reactor: IReactorTime,
        agent: IAgent,
        local_errors: Optional[LocalErrors] = None,
    ) -> None:
        self.pool = pool
        self.health = health
        self.reactor = reactor
        self._agent = agent
        self.local_errors = LocalErrors(reactor) if local_errors is None else local_errors
        self._loops: dict[str, tuple[Node, LoopingCall]] = {}
        self._probes: dict[str, defer.Deferred[Any]] = {}
        # ((pool, node key), passed) -> probes, for the metrics.
        self.results: dict[tuple[tuple[str, str], bool], int] = {}

    def startService(self) -> None:
        super().startService()
        self.sync()

    def stopService(self) -> Optional[defer.Deferred[None]]:
        super().stopService()
        for _, loop in self._loops.values():
            if loop.running:
                loop.stop()
        self._loops.clear()
        for d in list(self._probes.values()):
            d.cancel()
        return None

    def update(self, health: HealthConfig) -> None:
        """
        Take new health settings; a changed interval restarts every timer.
        """
        restart = health.interval != self.health.interval
        self.health = health
        self.pool.set_thresholds(health.rise, health.fall)
        if restart:
            for _, loop in self._loops.values():
                if loop.running:
                    loop.stop()
            self._loops.clear()
        self.sync()

    def sync(self) -> None:
        """
        Start timers for nodes the pool has gained, stop those of nodes it lost.
        """
        if not self.running:
            return
        current = {n.key: n for n in self.pool.nodes}
        for key in list(self._loops):
            node, loop = self._loops[key]
            if current.get(key) is not node:
                if loop.running:
                    loop.stop()
                del self._loops[key]
        for key, node in current.items():
            if key not in self._loops:
                loop = LoopingCall(self.probe, node)
                loop.clock = self.reactor
                self._loops[key] = (node, loop)
                pending = self._probes.get(key)
                if pending is None:
                    self._start_loop(loop, node, now=True)
                else:
                    # A probe from before the timers restarted is still out:
                    # start the new timer when it ends, so probes never overlap.
                    pending.addBoth(self._start_after_probe, loop, node)

    def _start_loop(self, loop: LoopingCall, node: Node, now: bool) -> None:
        loop.start(self.health.interval, now=now).addErrback(self._loop_died, node)

    def _start_after_probe(self, result: Any, loop: LoopingCall, node: Node) -> Any:
        current = self._loops.get(node.key)
        if self.running and current is not None and current[1] is loop and not loop.running:
            self._start_loop(loop, node, now=False)
        return result

    def _loop_died(self, reason: Failure, node: Node) -> None:
        # probe() never fails, so this is a bug; say so rather than go quiet.
        self.log.failure("health check loop for {node} stopped", reason, node=node.url)

    def url_for(self, node: Node) -> bytes:
        # Built from the node's parts and sent through the agent as is:
        # treq's URL parsing (hyperlink) refuses host names that networks do
        # use, such as "web_1", and would raise out of the timer.
        return b"".join(
            (
                node.scheme.encode("ascii"),
                b"://",
                node.host_header,
                node.base_path,
                self.health.path.encode("ascii"),
            )
        )

    def probe(self, node: Node) -> defer.Deferred[Any]:
        """
        Probe C{node} once and mark it. The returned Deferred never fails.
        """
        started = self.reactor.seconds()
        health = self.health
        d = defer.maybeDeferred(
            self._agent.request,
            b"GET",
            self.url_for(node),
            Headers({b"User-Agent": [USER_AGENT]}),
            None,
        )

        def read(response: Any) -> defer.Deferred[int]:
            return treq.collect(response, lambda data: None).addCallback(lambda _: response.code)

        d.addCallback(read)
        d.addTimeout(health.timeout, self.reactor)
        self._probes[node.key] = d

        def done(result: Any) -> None:
            if self._probes.get(node.key) is d:
                del self._probes[node.key]
            if not self.running:
                # Cancelled by stopService: says nothing about the node.
                return
            now = self.reactor.seconds()
            latency = now - started
            if isinstance(result, Failure):
                # A probe that failed while rrlb cannot open a socket says
                # nothing of the node, whatever the failure looks like (a
                # name lookup that failed, or hung until the timeout): see
                # rrlb.failures.
                code = local_errno(result) or exhausted_now()
                if code is not None:
                    self.local_errors.failed(code, f"a health check of {node.url}")
                    return
                if result.check(defer.TimeoutError, defer.CancelledError):
                    reason = f"timed out after {health.timeout:g}s"
                else:
                    reason = describe_failure(result)
                ok = False
            elif 200 <= result < 400:
                ok, reason = True, f"HTTP {result}"
            else:
                ok, reason = False, f"HTTP {result}"
            if node.removed:
                return
            counted = (node.label, ok)
            self.results[counted] = self.results.get(counted, 0) + 1
            self.pool.mark(node, ok, reason, when=now, latency=latency)

        d.addBoth(done)
        d.addErrback(
            lambda f: self.log.failure("recording a health check of {node}", f, node=node.url)
        )
        return d
