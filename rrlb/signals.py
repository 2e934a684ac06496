# -*- test-case-name: tests.test_reload,tests.test_drain -*-
"""
The control side's process signals: C{SIGHUP} reloads while rrlb runs, and
while it drains a second C{SIGTERM} or C{SIGINT} is only logged.

Only the real process installs them (L{rrlb.tap.makeService}); a handler
runs between two bytecodes of whatever the reactor was doing, so each one
hands its work to the reactor's own turn.
"""

from __future__ import annotations

import signal
from typing import Any, Callable

from twisted.logger import Logger


class ProcessSignals:
    """
    The signal handlers of a L{rrlb.service.ControlService}.

    @param reactor: runs the handlers' work on its own thread.
    @param reload: called (on the reactor's thread) on C{SIGHUP}.
    @param connections: the client connections open, for the log line of a
        signal while draining.
    @param enabled: install handlers at all (the real process only);
        otherwise every method does nothing.
    @param log: where to say so (the service's, so its lines keep their
        namespace).
    """

    def __init__(
        self,
        reactor: Any,
        reload: Callable[[], Any],
        connections: Callable[[], int],
        enabled: bool,
        log: Logger,
    ) -> None:
        self.log = log
        self.reactor = reactor
        self.reload = reload
        self.connections = connections
        self.enabled = enabled
        self._previous_sighup: Any = None
        self._held: dict[int, Any] = {}

    def sighup(self, signum: int, frame: Any) -> None:
        """
        The C{SIGHUP} handler: a reload on the reactor's next turn.
        """
        self.reactor.callFromThread(self.reload)

    def install(self) -> None:
        """
        Reload on C{SIGHUP} from now on.
        """
        if not self.enabled or self._previous_sighup is not None:
            return
        try:
            previous = signal.signal(signal.SIGHUP, self.sighup)
        except (ValueError, OSError, AttributeError) as e:
            self.log.warn("cannot handle SIGHUP, so no reload on it: {error}", error=e)
            return
        self._previous_sighup = signal.SIG_DFL if previous is None else previous

    def restore(self) -> None:
        """
        Put back the C{SIGHUP} handler L{install} replaced.
        """
        previous, self._previous_sighup = self._previous_sighup, None
        if previous is not None:
            signal.signal(signal.SIGHUP, previous)

    def hold(self) -> None:
        """
        While draining, a second SIGTERM or SIGINT only says so: Twisted's
        own handler would try to stop the stopping reactor and log a
        traceback.
        """
        if not self.enabled:
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                previous = signal.signal(signum, self._while_draining)
            except (ValueError, OSError):
                continue
            self._held[signum] = signal.SIG_DFL if previous is None else previous

    def release(self) -> None:
        """
        Put back the handlers L{hold} replaced.
        """
        held, self._held = self._held, {}
        for signum, previous in held.items():
            signal.signal(signum, previous)

    def _while_draining(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._log_while_draining, signum)

    def _log_while_draining(self, signum: int) -> None:
        self.log.warn(
            "received {signal} while draining {connections} connections;"
            " still waiting (SIGKILL stops at once)",
            signal=signal.Signals(signum).name,
            connections=self.connections(),
        )
