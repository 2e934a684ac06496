"""
Tests for L{rrlb.notify}: sd_notify messages to a datagram socket each test
binds itself, the watchdog on a L{task.Clock}, the messages of a real
L{rrlb.service.ControlService} in order, and socket activation of a real rrlb process.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any, Optional

from twisted.internet import defer, task
from twisted.trial import unittest

from rrlb._twisted import adopt_systemd_descriptors, systemd_descriptors
from rrlb.config import parse_node
from rrlb.notify import (
    Notifier,
    SystemdNotify,
    initial_environ,
    notify_address,
    pool_status,
    recover_listen_fds,
    watchdog_interval,
)
from rrlb.pool import Pool
from rrlb.service import ControlService
from rrlb.tap import compose
from tests.support import (
    LogCapture,
    balancer_options,
    http_request,
    reactor,
    start_backend,
    start_daemon,
    wait_until,
)


class NotifySocket:
    """
    An C{AF_UNIX} datagram socket bound in a fresh directory (or to an
    abstract name), read without blocking.
    """

    def __init__(self, testcase: unittest.TestCase, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        testcase.addCleanup(self.sock.close)
        if abstract:
            name = f"rrlb-test-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            directory = tempfile.mkdtemp(prefix="rrlb-notify-")
            testcase.addCleanup(shutil.rmtree, directory, True)
            path = os.path.join(directory, "notify")
            self.sock.bind(path)
            self.env_value = path
        self.received: list[str] = []

    @property
    def environ(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value}

    def read(self) -> list[str]:
        """
        Every message received so far, in order.
        """
        while True:
            try:
                self.received.append(self.sock.recv(4096).decode("utf-8"))
            except BlockingIOError:
                return self.received

    def states(self) -> list[str]:
        """
        The messages without C{STATUS=} and C{WATCHDOG=1} lines.
        """
        return [m for m in self.read() if not m.startswith(("STATUS=", "WATCHDOG="))]


def make_pool(*urls: str) -> Pool:
    return Pool([parse_node(u) for u in urls], rise=1, fall=1)


class NotifyAddressTests(unittest.TestCase):
    """
    L{notify_address} and L{watchdog_interval} read the environment as
    sd_notify(3) and sd_watchdog_enabled(3) describe it.
    """

    def test_path(self) -> None:
        """
        An absolute path is a filesystem socket.
        """
        self.assertEqual(notify_address({"NOTIFY_SOCKET": "/run/x"}), "/run/x")

    def test_abstract(self) -> None:
        """
        A leading C{@} names an abstract socket: a NUL byte, then the name.
        """
        self.assertEqual(notify_address({"NOTIFY_SOCKET": "@sd/x"}), b"\0sd/x")

    def test_unset_or_unknown(self) -> None:
        """
        Unset, empty or unsupported values mean no notifications.
        """
        for environ in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1"}):
            self.assertIsNone(notify_address(environ))

    def test_watchdog(self) -> None:
        """
        The watchdog is pinged twice per C{WATCHDOG_USEC}, only by the
        process C{WATCHDOG_PID} names (when it names one).
        """
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "4000000"}, 7), 2.0)
        self.assertEqual(
            watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "7"}, 7), 2.0
        )
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "8"}, 7))
        self.assertIsNone(watchdog_interval({}, 7))
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "0"}, 7))
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "soon"}, 7))


class NotifierTests(unittest.TestCase):
    """
    L{Notifier} sends datagrams, and nothing at all without C{NOTIFY_SOCKET}.
    """

    def test_send_to_path(self) -> None:
        """
        Each message arrives as one datagram on the socket C{NOTIFY_SOCKET}
        names.
        """
        listener = NotifySocket(self)
        notifier = Notifier(listener.environ)
        self.addCleanup(notifier.close)
        self.assertTrue(notifier.send("READY=1"))
        self.assertTrue(notifier.send("STATUS=1/1 nodes healthy"))
        self.assertEqual(listener.read(), ["READY=1", "STATUS=1/1 nodes healthy"])

    def test_send_to_abstract(self) -> None:
        """
        An C{@name} in C{NOTIFY_SOCKET} reaches the abstract socket C{name}.
        """
        listener = NotifySocket(self, abstract=True)
        notifier = Notifier(listener.environ)
        self.addCleanup(notifier.close)
        notifier.send("READY=1")
        self.assertEqual(listener.read(), ["READY=1"])

    def test_unset(self) -> None:
        """
        Without C{NOTIFY_SOCKET} nothing is sent and no socket is made.
        """
        notifier = Notifier({})
        self.assertFalse(notifier.enabled)
        self.assertFalse(notifier.send("READY=1"))
        self.assertIsNone(notifier._socket)

    def test_unreachable(self) -> None:
        """
        A socket that is not there is logged once and never raised.
        """
        logs = LogCapture.install(self)
        notifier = Notifier({"NOTIFY_SOCKET": "/nonexistent/rrlb/notify"})
        self.addCleanup(notifier.close)
        self.assertFalse(notifier.send("READY=1"))
        self.assertFalse(notifier.send("STATUS=x"))
        warnings = [m for m in logs.messages() if "cannot notify systemd" in m]
        self.assertEqual(len(warnings), 1, warnings)


class SystemdNotifyTests(unittest.TestCase):
    """
    L{SystemdNotify}: the state messages, the status line and the watchdog,
    driven by a L{task.Clock}.
    """

    def make(self, environ: dict[str, str], pool: Optional[Pool] = None) -> tuple[Any, ...]:
        listener = NotifySocket(self)
        clock = task.Clock()
        pool = pool or make_pool("http://a:1", "http://b:2")
        service = SystemdNotify(clock, pool, {**listener.environ, **environ}, pid=42)
        service.startService()
        self.addCleanup(service.stopService)
        return listener, clock, pool, service

    def test_ready_after_listeners(self) -> None:
        """
        C{READY=1} waits until every listener is bound, then comes with the
        first status line.
        """
        listener, clock, pool, service = self.make({})
        first: defer.Deferred[Any] = defer.Deferred()
        second: defer.Deferred[Any] = defer.Deferred()
        service.ready_when([first, second])
        first.callback(object())
        self.assertEqual(listener.read(), [])
        second.callback(object())
        self.assertEqual(listener.read(), ["READY=1", "STATUS=2/2 nodes healthy"])

    def test_listener_results_untouched(self) -> None:
        """
        Waiting for the listeners leaves their ports for their other users
        (a listener's C{stopService} needs its port).
        """
        listener, clock, pool, service = self.make({})
        port = object()
        waiting: defer.Deferred[Any] = defer.Deferred()
        service.ready_when([waiting])
        waiting.callback(port)
        seen = []
        waiting.addCallback(seen.append)
        self.assertEqual(seen, [port])

    def test_no_ready_without_port(self) -> None:
        """
        A listener that could not be bound means no C{READY=1}.
        """
        listener, clock, pool, service = self.make({})
        service.ready_when([defer.succeed(None)])
        self.assertEqual(listener.read(), [])

    def test_order(self) -> None:
        """
        Start, reload and stop give C{READY=1}, C{RELOADING=1}, C{READY=1},
        C{STOPPING=1}, in that order, each in its own datagram.
        """
        listener, clock, pool, service = self.make({})
        service.ready_when([defer.succeed(object())])
        service.reloading()
        service.reloaded()
        service.stopping()
        self.assertEqual(listener.states(), ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"])

    def test_status_follows_health(self) -> None:
        """
        Every time a node enters or leaves the rotation the status line is
        sent again.
        """
        listener, clock, pool, service = self.make({})
        service.ready_when([defer.succeed(object())])
        pool.mark(pool.nodes[0], False, "refused")
        pool.set_drained(pool.nodes[1], True)
        pool.mark(pool.nodes[0], True, "ok")
        statuses = [m for m in listener.read() if m.startswith("STATUS=")]
        self.assertEqual(
            statuses,
            [
                "STATUS=2/2 nodes healthy",
                "STATUS=1/2 nodes healthy",
                "STATUS=1/2 nodes healthy, 1 drained",
                "STATUS=2/2 nodes healthy, 1 drained",
            ],
        )

    def test_no_status_before_ready_or_after_stopping(self) -> None:
        """
        Health changes before C{READY=1} or after C{STOPPING=1} send nothing.
        """
        listener, clock, pool, service = self.make({})
        pool.mark(pool.nodes[0], False, "refused")
        self.assertEqual(listener.read(), [])
        service.ready_when([defer.succeed(object())])
        service.stopping()
        listener.read()
        listener.received.clear()
        pool.mark(pool.nodes[0], True, "ok")
        self.assertEqual(listener.read(), [])

    def test_watchdog(self) -> None:
        """
        With C{WATCHDOG_USEC} set, C{WATCHDOG=1} goes out from C{READY=1} on,
        every half of it, until the service stops.
        """
        listener, clock, pool, service = self.make({"WATCHDOG_USEC": "2000000"})
        clock.advance(5)
        self.assertEqual(listener.read(), [])
        service.ready_when([defer.succeed(object())])
        self.assertEqual(listener.read()[-1], "WATCHDOG=1")
        for _ in range(3):
            clock.advance(1.0)
        pings = [m for m in listener.read() if m == "WATCHDOG=1"]
        self.assertEqual(len(pings), 4)
        service.stopService()
        clock.advance(10)
        self.assertEqual(len([m for m in listener.read() if m == "WATCHDOG=1"]), 4)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_watchdog_other_pid(self) -> None:
        """
        A watchdog meant for another process is left alone.
        """
        listener, clock, pool, service = self.make(
            {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}
        )
        service.ready_when([defer.succeed(object())])
        clock.advance(5)
        self.assertNotIn("WATCHDOG=1", listener.read())

    def test_status_line(self) -> None:
        """
        The status line counts healthy nodes out of all nodes.
        """
        pool = make_pool("http://a:1", "http://b:2", "http://c:3")
        pool.mark(pool.nodes[2], False, "x")
        self.assertEqual(pool_status(pool), "2/3 nodes healthy")


class BalancerNotifyTests(unittest.TestCase):
    """
    The messages of a real L{ControlService} on a loopback port.
    """

    async def start(self, *args: str) -> tuple[NotifySocket, ControlService, str]:
        listener = NotifySocket(self)
        backend = await start_backend(self, "a")
        config_path = self.mktemp()
        with open(config_path, "w") as f:
            f.write(f"nodes: [{backend.url}]\nhealth: {{path: /health}}\n")
        options = balancer_options("--config", config_path, *args)
        service = compose(
            options.config, reactor, options.load, environ=listener.environ, pid=os.getpid()
        )
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        self.config_path = config_path
        return listener, service, backend.url

    async def test_messages_in_order(self) -> None:
        """
        A start, a reload and a stop of the balancer tell systemd READY=1,
        RELOADING=1, READY=1 and STOPPING=1, in that order, with status
        lines after each READY=1.
        """
        listener, service, url = await self.start()
        await wait_until(lambda: "READY=1" in listener.read(), what="READY=1")
        self.assertTrue(service.reload())
        await service.stopService()
        self.assertEqual(listener.states(), ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"])
        messages = listener.read()
        self.assertTrue(messages[messages.index("READY=1") + 1].startswith("STATUS=1/1 nodes"))

    async def test_rejected_reload_status(self) -> None:
        """
        A rejected reload still ends with READY=1 (rrlb keeps running) and the
        status line says so.
        """
        listener, service, url = await self.start()
        await wait_until(lambda: "READY=1" in listener.read(), what="READY=1")
        with open(self.config_path, "w") as f:
            f.write("nodes: [ftp://x]\n")
        self.assertFalse(service.reload())
        self.assertEqual(listener.states(), ["READY=1", "RELOADING=1", "READY=1"])
        self.assertIn("reload rejected", listener.read()[-1])

    async def test_no_socket_no_messages(self) -> None:
        """
        Built without C{NOTIFY_SOCKET} the balancer sends nothing and runs.
        """
        backend = await start_backend(self, "a")
        options = balancer_options("--nodes", backend.url)
        service = compose(options.config, reactor, options.load, environ={}, pid=os.getpid())
        service.startService()
        self.assertFalse(service.notify.enabled)
        self.assertIsNone(service.notify.notifier._socket)
        await service.stopService()


class SocketActivationTests(unittest.TestCase):
    """
    C{--listen systemd:domain=INET:index=0} with a listening socket handed
    to a real rrlb process as systemd does (fd 3, C{LISTEN_FDS},
    C{LISTEN_PID}).
    """

    async def test_request_through_inherited_socket(self) -> None:
        """
        rrlb serves on the socket it inherited, tells systemd READY=1, and a
        SIGTERM ends it with exit code 0 and STOPPING=1.
        """
        backend = await start_backend(self, "a")
        daemon = await start_daemon(self, "--nodes", backend.url, "--health-path", "/health")
        await daemon.wait_for_message("READY=1")
        reply = await http_request(self, "GET", daemon.url + "/hello")
        self.assertEqual((reply.code, reply.body), (200, b"a"))
        self.assertEqual(backend.requests[-1].uri, b"/hello")
        daemon.signal("TERM")
        self.assertEqual(await daemon.exit_code(), 0)
        states = [m for m in daemon.messages if not m.startswith((b"STATUS=", b"WATCHDOG="))]
        self.assertEqual(states, [b"READY=1", b"STOPPING=1"])
        self.assertIn(b"STATUS=1/1 nodes healthy", daemon.messages)

    async def test_named_socket(self) -> None:
        """
        With C{LISTEN_FDNAMES} (systemd 227 and later) the socket can also
        be chosen by name.
        """
        backend = await start_backend(self, "a")
        daemon = await start_daemon(
            self,
            "--listen",
            "systemd:domain=INET:name=rrlb.socket",
            "--nodes",
            backend.url,
            fdnames="rrlb.socket",
        )
        await daemon.wait_for_message("READY=1")
        reply = await http_request(self, "GET", daemon.url + "/")
        self.assertEqual(reply.code, 200)

    async def test_no_socket_passed(self) -> None:
        """
        C{systemd:} without a socket from systemd stops rrlb at start-up with
        one line saying so, not a traceback.
        """
        daemon = await start_daemon(self, "--nodes", "http://127.0.0.1:9", listen_fds=False)
        code = await daemon.exit_code()
        self.assertNotEqual(code, 0)
        self.assertIn(b"no socket from systemd", daemon.output)
        self.assertNotIn(b"Traceback", daemon.output)


class RecoverListenFDsTests(unittest.TestCase):
    """
    L{recover_listen_fds} gives Twisted the sockets of a launcher that set
    C{LISTEN_FDS} and C{LISTEN_PID} but not C{LISTEN_FDNAMES}.
    """

    def setUp(self) -> None:
        saved = systemd_descriptors()
        self.addCleanup(adopt_systemd_descriptors, saved)

    def test_other_pid(self) -> None:
        """
        Descriptors meant for another process are not taken.
        """
        environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
        self.assertEqual(recover_listen_fds(os.getpid(), environ), 0)

    def test_recovered(self) -> None:
        """
        Open descriptors from fd 3 on, named C{unknown}, become available to
        C{systemd:domain=INET:index=N}.
        """
        environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
        try:
            os.fstat(3)
        except OSError:
            # Make fd 3 an open descriptor for the length of the test.
            fd = os.open(os.devnull, os.O_RDONLY)
            if fd != 3:
                os.dup2(fd, 3)
                os.close(fd)
            self.addCleanup(os.close, 3)
        self.assertEqual(recover_listen_fds(os.getpid(), environ), 1)
        self.assertEqual(systemd_descriptors().inheritedDescriptors(), [3])
        self.assertEqual(systemd_descriptors().inheritedNamedDescriptors(), {"unknown": 3})

    def test_initial_environ(self) -> None:
        """
        L{initial_environ} reads a NUL-separated environment block.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"A=1\0LISTEN_FDS=2\0junk\0")
        self.assertEqual(initial_environ(path), {"A": "1", "LISTEN_FDS": "2"})
        self.assertEqual(initial_environ(path + ".missing"), {})
