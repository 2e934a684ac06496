# -*- test-case-name: tests.test_tap -*-
"""
Demo backends for trying rrlb out: small twisted.web sites on loopback
ports, each answering every request with its own name.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import Logger
from twisted.web import resource, server


class DemoBackend(resource.Resource):
    """
    Answers every request with C{"<name>: <method> <path>"}.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def render(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"X-Demo-Backend", self.name.encode("ascii"))
        method = request.method.decode("ascii", "replace")
        uri = request.uri.decode("ascii", "replace")
        return f"{self.name}: {method} {uri}\n".encode()


class DemoSite(server.Site):
    """
    A demo backend's site: quiet, so rrlb's own log stays readable.
    """

    noisy = False

    def log(self, request: Any) -> None:
        pass


class DemoBackends(Service):
    """
    Listens on C{count} free loopback ports and reports their URLs to
    C{ready} once all are bound.
    """

    log = Logger()

    def __init__(self, reactor: Any, count: int, ready: Callable[[list[str]], None]) -> None:
        self.reactor = reactor
        self.count = count
        self.ready = ready
        self.ports: list[Any] = []

    def startService(self) -> defer.Deferred[Any]:
        super().startService()
        listening = [
            TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(
                DemoSite(DemoBackend(f"demo-{i + 1}"))
            )
            for i in range(self.count)
        ]
        d = defer.gatherResults(listening, consumeErrors=True)

        def bound(ports: list[Any]) -> None:
            self.ports = ports
            urls = [f"http://127.0.0.1:{p.getHost().port}" for p in ports]
            self.log.info("demo backends listening: {urls}", urls=", ".join(urls))
            self.ready(urls)

        d.addCallback(bound)
        return d

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        ports, self.ports = self.ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
