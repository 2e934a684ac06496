# -*- test-case-name: tests.test_proxy,tests.test_settings -*-
"""
What the proxy is set up with: its settings from the configuration
(L{ProxySettings}, swapped whole on reload) and, per pool, the
L{Destination} its requests go to (the pool, its queue, its upstream
settings and what carries its requests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from rrlb.pool import Pool
from rrlb.queue import RequestQueue
from rrlb.settings import Config, values_for


@dataclass(frozen=True)
class ProxySettings:
    """
    What the proxy needs of the configuration; swapped whole on reload.

    @ivar node_host: send each node its own host:port as C{Host} instead of
        the client's.
    @ivar retries: other nodes an idempotent request is tried on at most.
    """

    node_host: bool = Config.node_host
    retry_after: int = 1
    retries: int = Config.retries
    tunnel_timeout: float = Config.tunnel_timeout

    @classmethod
    def from_config(cls, config: Config) -> ProxySettings:
        """
        The settings of C{config} that feed C{proxy}, and C{Retry-After}
        (a 503's) as the health check interval in whole seconds.
        """
        retry_after = max(1, int(config.health.interval + 0.999))
        return cls(retry_after=retry_after, **values_for("proxy", config))


class Destination:
    """
    One pool as the proxy uses it: the pool (nodes and policy), the queue
    of its requests waiting for a node with room (a full pool queues only
    its own), and its upstream settings.

    @ivar timeout: its response timeout, or L{None} for the upstream
        client's.
    @ivar exchange: what carries its requests: L{rrlb.exchange.ProxyExchange}
        (HTTP/1.1), or with C{protocol: h2} L{rrlb.h2exchange.H2Exchange}.
    """

    __slots__ = ("name", "pool", "queue", "node_host", "timeout", "exchange")

    def __init__(
        self,
        pool: Pool,
        queue: RequestQueue,
        node_host: bool = False,
        timeout: Optional[float] = None,
        *,
        exchange: Callable[..., Any],
    ) -> None:
        self.name = pool.name
        self.pool = pool
        self.queue = queue
        self.node_host = node_host
        self.timeout = timeout
        self.exchange = exchange
