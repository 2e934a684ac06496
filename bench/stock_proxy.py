"""Baseline for bench/run: stock twisted.web.proxy, rotated per request.

Usage: python stock_proxy.py PORT HOST:PORT,HOST:PORT [ACCESS_LOG]

Nothing here improves on Twisted: each request opens a new upstream
connection and the body is written to the client without backpressure,
which is what the benchmark wants to show next to rrlb.
"""

import itertools
import sys

from twisted.internet import endpoints, reactor
from twisted.web import proxy, server


class RotatingProxy(proxy.ReverseProxyResource):
    # A leaf gets every path; the stock getChild builds a resource per path segment.
    isLeaf = True

    def __init__(self, nodes):
        super().__init__("", 0, b"")
        self.nodes = itertools.cycle(nodes)

    def render(self, request):
        # render() reads these once to build the upstream request: safe per call.
        self.host, self.port = next(self.nodes)
        self.path = request.path
        return super().render(request)


def main(port, nodes, access_log=None):
    pairs = [(h, int(p)) for h, p in (n.rsplit(":", 1) for n in nodes.split(","))]
    site = server.Site(RotatingProxy(pairs), logPath=access_log)
    endpoints.serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1").listen(site)
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
