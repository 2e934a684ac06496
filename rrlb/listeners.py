# -*- test-case-name: tests.test_tap,tests.test_tuning,tests.test_twisted_private -*-
"""
Listening services, shared by both sides: the traffic side's C{--listen}
listeners, the main process's held sockets under C{--workers}, and the
control side's admin endpoint.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer

from rrlb._twisted import bind_synchronously, port_waiting

# nginx's listen backlog. Twisted's default of 50 overflows when a few
# hundred clients connect at once, and each overflow costs a client a
# retransmitted SYN (a second or more of latency).
DEFAULT_BACKLOG = 511


def with_default_backlog(description: str) -> str:
    """
    A TCP or TLS listen description with C{backlog=511} unless it names one.
    """
    kind, _, rest = description.partition(":")
    kind = kind.strip().lower()
    if kind == "haproxy":
        # The PROXY protocol wrapper: the backlog belongs to what it wraps.
        return f"{kind}:{with_default_backlog(rest)}"
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


class Listener(StreamServerEndpointService):
    """
    A listener whose failure to listen at start-up (port in use, no
    permission, no such directory) stops rrlb with one line naming the
    setting, rather than a traceback from the service machinery.

    @param setting: the start of that line, e.g. C{"--listen: cannot listen
        on 'tcp:80'"}.
    @param on_port: called with the listening port once there is one.
    """

    def __init__(
        self,
        endpoint: Any,
        factory: Any,
        setting: str = "cannot listen",
        on_port: Optional[Callable[[Any], Any]] = None,
    ) -> None:
        super().__init__(endpoint, factory)
        self.setting = setting
        self.on_port = on_port
        # Bind in privilegedStartService, so a failure is seen there.
        bind_synchronously(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            # SystemExit prints its message and exits 1, under twistd and twist.
            raise SystemExit(f"{self.setting}: {e}") from None
        waiting = port_waiting(self)
        if self.on_port is not None and waiting is not None:
            waiting.addCallback(self.on_port)

    def listening(self) -> list[defer.Deferred[Any]]:
        """
        What fires once this listener is bound: nothing to wait for before
        it started, or after it stopped.
        """
        waiting = port_waiting(self)
        return [] if waiting is None else [waiting]
