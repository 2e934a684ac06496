"""
Run rrlb as a real process the way systemd does, for the systemd, reload
and drain tests: C{python -m twisted rrlb ...} from the repository root,
handed a listening socket on 127.0.0.1 through C{LISTEN_FDS}/C{LISTEN_PID}
(socket activation, so there is no race for a free port) and told to notify
a datagram socket the test binds itself (C{NOTIFY_SOCKET}).

Typical use in an C{async def} test::

    daemon = await start_daemon(self, "--nodes", backend.url)
    await daemon.wait_for_message("READY=1")
    reply = await http_request(self, "GET", daemon.url + "/")
    daemon.signal("TERM")
    self.assertEqual(await daemon.exit_code(), 0)
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from typing import Any, Optional, Sequence

from twisted.internet import defer, error
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import DatagramProtocol, ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.helpers import LOOPBACK, WAIT_TIMEOUT, wait_until

reactor: Any = _reactor
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launcher(listen_fds: bool, fdnames: Optional[str], nofile: Optional[int] = None) -> str:
    """
    Python code that sets C{LISTEN_PID} to its own pid (exec keeps it), as
    systemd does, then becomes rrlb; the listening socket is already fd 3.
    With C{nofile}, C{RLIMIT_NOFILE} is that, soft and hard (systemd's
    C{LimitNOFILE=}, or C{prlimit --nofile=N:N}).
    """
    # systemd starts services with default signal dispositions; a test
    # runner in the background may have SIGINT ignored, which exec keeps.
    lines = ["import os, signal, sys", "signal.signal(signal.SIGINT, signal.SIG_DFL)"]
    if nofile is not None:
        lines.append(
            f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile}))"
        )
    if listen_fds:
        lines.append("os.environ['LISTEN_PID'] = str(os.getpid())")
        lines.append("os.environ['LISTEN_FDS'] = '1'")
    if fdnames is not None:
        lines.append(f"os.environ['LISTEN_FDNAMES'] = {fdnames!r}")
    lines.append(
        "os.execv(sys.executable, [sys.executable, '-m', 'twisted', '--log-format', 'text',"
        " 'rrlb'] + sys.argv[1:])"
    )
    return "\n".join(lines) + "\n"


class _NotifyReceiver(DatagramProtocol):
    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.messages.append(datagram)


class Daemon(ProcessProtocol):
    """
    One rrlb process.

    @ivar messages: the sd_notify datagrams it sent, in order.
    @ivar output: its stdout and stderr together.
    @ivar port: the TCP port of the socket handed to it.
    """

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.output = b""
        self.port = 0
        self.ended: defer.Deferred[Optional[int]] = defer.Deferred()
        self.exit_signal: Optional[int] = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        self.exit_signal = getattr(value, "signal", None)
        self.ended.callback(getattr(value, "exitCode", None))

    @property
    def running(self) -> bool:
        return not self.ended.called

    def signal(self, name: str) -> None:
        self.transport.signalProcess(name)

    def lines(self) -> list[str]:
        return self.output.decode("utf-8", "replace").splitlines()

    async def wait_for_message(self, message: str, timeout: float = WAIT_TIMEOUT) -> None:
        wanted = message.encode("utf-8")
        await wait_until(
            lambda: wanted in self.messages or not self.running,
            timeout,
            f"{message} from rrlb; its output:\n{self.output.decode('utf-8', 'replace')}",
        )
        if wanted not in self.messages:
            raise AssertionError(
                f"rrlb exited before sending {message}; its output:\n"
                + self.output.decode("utf-8", "replace")
            )

    async def wait_for_output(self, text: str, timeout: float = WAIT_TIMEOUT) -> None:
        await wait_until(
            lambda: text.encode("utf-8") in self.output,
            timeout,
            f"{text!r} in rrlb's output:\n{self.output.decode('utf-8', 'replace')}",
        )

    async def exit_code(self, timeout: float = WAIT_TIMEOUT) -> Optional[int]:
        """
        Wait for the process to end and return its exit code (L{None} when a
        signal killed it; see C{exit_signal}).
        """
        await wait_until(lambda: not self.running, timeout, "rrlb to exit")
        return await self.ended


async def start_daemon(
    testcase: TestCase,
    *args: str,
    environ: Optional[dict[str, str]] = None,
    listen_fds: bool = True,
    fdnames: Optional[str] = None,
    wrapper: Sequence[str] = (),
    nofile: Optional[int] = None,
) -> Daemon:
    """
    Start rrlb with C{args} (C{--listen systemd:domain=INET:index=0} unless
    they have a C{--listen}), a listening socket on 127.0.0.1 handed to it
    as fd 3, and C{NOTIFY_SOCKET} pointing at a socket this test reads.
    Killed (if still running) and cleaned up at the end of the test.

    @param listen_fds: set C{LISTEN_FDS}/C{LISTEN_PID} for the socket.
    @param fdnames: the C{LISTEN_FDNAMES} value, if any.
    @param wrapper: a command that runs rrlb in its own process, C{exec}ing
        it (C{("prlimit", "--nofile=300:300")}).
    @param nofile: its C{RLIMIT_NOFILE}, soft and hard, if not this process's.
    """
    directory = tempfile.mkdtemp(prefix="rrlb-test-")
    testcase.addCleanup(shutil.rmtree, directory, True)
    daemon = Daemon()
    notify_path = os.path.join(directory, "notify")
    notify_port = reactor.listenUNIXDatagram(notify_path, _NotifyReceiver(daemon.messages))
    testcase.addCleanup(notify_port.stopListening)

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, 0))
    listener.listen(64)
    daemon.port = listener.getsockname()[1]

    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))
    }
    env["NOTIFY_SOCKET"] = notify_path
    env["PYTHONUNBUFFERED"] = "1"
    env.update(environ or {})
    listen = [] if "--listen" in args else ["--listen", "systemd:domain=INET:index=0"]
    argv: Sequence[str] = [
        *wrapper,
        sys.executable,
        "-c",
        launcher(listen_fds, fdnames, nofile),
        *listen,
        *args,
    ]
    try:
        reactor.spawnProcess(
            daemon,
            argv[0] if wrapper else sys.executable,
            list(argv),
            env=env,
            path=ROOT,
            childFDs={0: "w", 1: "r", 2: "r", 3: listener.fileno()},
        )
    finally:
        # Only the daemon holds the socket now, so when it stops listening
        # new connections are refused rather than queued here.
        listener.close()

    async def stop() -> None:
        if daemon.running:
            try:
                daemon.signal("KILL")
            except error.ProcessExitedAlready:
                pass
            await daemon.ended

    testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
    return daemon
