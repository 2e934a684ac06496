"""A small backend node for bench/soak and bench/fuzz: twisted.web on 127.0.0.1 only.

    python bench/node.py PORT [NAME]

GET  /            a 100-byte body
GET  /big?n=N     N bytes (at most 64 MiB), streamed with a producer
POST /echo        the request body back
GET  /health      "ok"
anything else     "<name>: <method> <path>"
"""

import sys

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import resource, server

# Close idle keep-alive connections after this long, as most servers do:
# the soak checks that rrlb lets go of them (its file descriptors come back).
IDLE_TIMEOUT_S = 5
MAX_BIG = 64 << 20
BLOCK = b"b" * 65536
SMALL = b"x" * 99 + b"\n"


class Big:
    """Writes n bytes to a request, pausing when the client is slow."""

    def __init__(self, request, n):
        self.request = request
        self.left = n
        self.paused = False
        self.stopped = False
        request.registerProducer(self, True)
        request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self.resumeProducing()

    def resumeProducing(self):
        self.paused = False
        while not self.paused and not self.stopped and self.left > 0:
            piece = BLOCK[: self.left]
            self.left -= len(piece)
            self.request.write(piece)
        if self.left <= 0 and not self.stopped:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        self.stopped = True


class Node(resource.Resource):
    isLeaf = True

    def __init__(self, name):
        super().__init__()
        self.name = name.encode()

    def render(self, request):
        request.setHeader(b"X-Node", self.name)
        path = request.path
        if path == b"/":
            return SMALL
        if path == b"/health":
            return b"ok"
        if path == b"/echo":
            return request.content.read()
        if path == b"/big":
            try:
                n = min(int(request.args.get(b"n", [b"0"])[0]), MAX_BIG)
            except ValueError:
                n = 0
            request.setHeader(b"Content-Length", b"%d" % n)
            Big(request, n)
            return server.NOT_DONE_YET
        return self.name + b": " + request.method + b" " + request.uri


def main():
    port = int(sys.argv[1])
    name = sys.argv[2] if len(sys.argv) > 2 else f"node-{port}"
    site = server.Site(Node(name), timeout=IDLE_TIMEOUT_S)
    site.log = lambda request: None
    TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(site).addErrback(
        lambda f: (print(f"cannot listen on {port}: {f.value}", file=sys.stderr), reactor.stop())
    )
    reactor.run()


if __name__ == "__main__":
    main()
