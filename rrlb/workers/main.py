# -*- test-case-name: tests.test_workers -*-
"""
The main process of C{--workers N}: L{WorkersTraffic} stands in for the
traffic side of a single process. It binds every listener (or takes them
from systemd) without serving it, runs the pools the control side's
checkers mark, and has a L{WorkerSupervisor} run the worker processes on
those sockets. Each worker serves the traffic with its own
L{rrlb.traffic.Traffic} (L{rrlb.workers.child}); this process builds no
proxy, upstream client or site.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from rrlb.acmetls import AcmeState
from rrlb.config import Config, PoolConfig, all_pools
from rrlb.listeners import Listener
from rrlb.nodetls import NodeTLSClients
from rrlb.pool import Pool, Pools
from rrlb.traffic import unique_nodes, update_pools
from rrlb.workers.sockets import HeldForWorkers, SocketGroup, bind_endpoint
from rrlb.workers.supervisor import WorkerSupervisor
from rrlb.workers.totals import WorkersMetrics

log = Logger()


class WorkersTraffic(MultiService):
    """
    The traffic side of the main process of C{--workers N}: the listeners
    bound without being served, the pools (whose node states go to every
    worker as they change), the nodes' TLS for the health probes, and the
    L{WorkerSupervisor} of the worker processes, which serve the traffic.

    @ivar metrics: the workers' counts, added up when read.
    """

    log = log

    def __init__(
        self,
        config: Config,
        reactor: Any,
        pools: Pools,
        pool_configs: Optional[Sequence[PoolConfig]] = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.pools = pools
        self.pool_configs: tuple[PoolConfig, ...] = ()
        self.acme_state: Optional[AcmeState] = None
        self.node_tls = NodeTLSClients()
        self.ports: list[Any] = []
        self.supervisor = WorkerSupervisor(self, reactor, config.workers)
        self.metrics = WorkersMetrics(pools, reactor, lambda: [], self.supervisor)
        self.listeners: list[Listener] = []
        for description in config.listen:
            listener = Listener(
                bind_endpoint(reactor, description, config.workers),
                HeldForWorkers(),
                setting=f"--listen: cannot listen on {description!r}",
                on_port=self.port_listening,
            )
            listener.setServiceParent(self)
            self.listeners.append(listener)
        # No worker runs yet: nothing to send.
        self.apply(config, all_pools(config) if pool_configs is None else pool_configs)
        self.supervisor.setServiceParent(self)
        # Every pool's nodes, those of pools a reload adds included.
        self.pools.add_listener(self.supervisor.node_changed)

    @property
    def tls_policy(self) -> Any:
        return self.node_tls.policy

    def acme_update(self, state: AcmeState) -> defer.Deferred[Any]:
        """
        Send C{state} (the ACME certificate and challenges) to every worker,
        and to each worker started later.
        """
        self.acme_state = state
        return self.supervisor.send_acme(state)

    @property
    def counts_requests(self) -> bool:
        """
        Whether the workers count every request (for the admin endpoint).
        """
        return self.config.admin is not None

    def apply(
        self, config: Config, pool_configs: Sequence[PoolConfig], reload: bool = True
    ) -> defer.Deferred[Any]:
        """
        Run C{config} with these pools here and in every worker.

        @return: a Deferred that fires once every worker answered (or
            did not in time); it never fails.
        @raise ConfigError: a node TLS file cannot be used; nothing changed.
        """
        self.node_tls.commit(self.node_tls.prepare(unique_nodes(pool_configs)))
        removed = update_pools(
            self.pools,
            config,
            pool_configs,
            lambda name: Pool((), name=name, clock=self.reactor),
        )
        # The workers let removed nodes finish their requests.
        for node in removed:
            self.log.info("node {node} removed", node=node.url)
        self.config = config
        self.pool_configs = tuple(pool_configs)
        return self.supervisor.configure_all(reload)

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
        return tuple(dataclasses.replace(pc, dns_nodes=()) for pc in self.pool_configs)

    # -- the listening sockets ------------------------------------------------------

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

    # -- start and stop ---------------------------------------------------------------

    def ready(self) -> list[defer.Deferred[Any]]:
        """
        What fires once the traffic is served: every listener bound, every
        worker serving.
        """
        bound = [d for listener in self.listeners for d in listener.listening()]
        return bound + [self.supervisor.serving()]

    def stopping_status(self) -> str:
        # The main process has no connections of its own to count.
        return (
            f"stopping: {self.config.workers} workers draining their connections"
            f" for up to {self.config.drain_timeout:g}s"
        )

    def stopService(self) -> defer.Deferred[Any]:
        """
        Close the listening sockets here, then stop the workers (they drain
        their connections).
        """
        stops = [defer.maybeDeferred(listener.stopService) for listener in self.listeners]
        d: defer.Deferred[Any] = defer.DeferredList(stops, consumeErrors=True)
        d.addBoth(lambda _: super(WorkersTraffic, self).stopService())
        return d
