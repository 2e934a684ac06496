"""The node behind rrlb in bench/fuzz: it checks every request it gets against rrlb's own rules.

    python bench/fuzz_node.py PORT REPORT

An asyncio server on 127.0.0.1:PORT that reads HTTP/1.1 requests, runs each
head through rrlb.parser.parse_request_head (the rules rrlb holds clients
to) and each chunked body through rrlb.parser.ChunkedDecoder, and answers
200. A request that fails them is one rrlb should never have forwarded: it
is counted as a violation and the connection is closed. On SIGTERM it
writes its counts to REPORT (JSON) and exits.
"""

import asyncio
import json
import signal
import sys

from rrlb.parser import BadChunk, BadRequest, ChunkedDecoder, parse_request_head

# rrlb adds a few fields of its own to what a client may send (--max-headers
# is 100 by default), and its head may pass --max-header-size by as much.
MAX_HEADERS = 1000
MAX_HEAD = 1 << 20
# The most violations kept as examples (all are counted).
KEPT = 20


class FuzzNode:
    """
    @ivar requests: requests received that passed the rules.
    @ivar violations: how many failed them; C{examples} keeps the first few.
    """

    def __init__(self):
        self.requests = 0
        self.violations = 0
        self.examples = []
        self.server = None
        self._open = {}

    async def start(self, port=0):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self):
        """Stop listening, and close the connections still open."""
        if self.server is not None:
            self.server.close()
        for writer in list(self._open):
            writer.transport.abort()
        await asyncio.gather(*self._open.values(), return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    def _violation(self, why, data):
        self.violations += 1
        if len(self.examples) < KEPT:
            self.examples.append(f"{why}: {bytes(data[:300])!r}")

    async def _serve(self, reader, writer):
        self._open[writer] = asyncio.current_task()
        buffer = b""
        try:
            while True:
                end = buffer.find(b"\r\n\r\n")
                while end < 0:
                    if len(buffer) > MAX_HEAD:
                        self._violation("a head without an end", buffer)
                        return
                    data = await reader.read(65536)
                    if not data:
                        if buffer.strip(b"\r\n"):
                            self._violation("bytes that are not a whole request", buffer)
                        return
                    buffer += data
                    end = buffer.find(b"\r\n\r\n")
                head, buffer = buffer[:end], buffer[end + 4 :]
                try:
                    request = parse_request_head(head, MAX_HEADERS)
                except BadRequest as e:
                    self._violation(f"head refused ({e.code} {e.text})", head)
                    return
                if request.expect_continue:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                buffer = await self._body(reader, request.length, buffer, head)
                if buffer is None:
                    return
                self.requests += 1
                if request.method == b"HEAD":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                if not request.persistent:
                    return
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            del self._open[writer]
            writer.close()

    async def _body(self, reader, length, buffer, head):
        """
        Read a body of C{length} bytes (None: chunked) after C{buffer}; the
        bytes that follow it, or None if the connection is done.
        """
        if length is not None:
            while len(buffer) < length:
                data = await reader.read(65536)
                if not data:
                    return None
                buffer += data
            return buffer[length:]
        rest = []
        decoder = ChunkedDecoder(lambda data: None, rest.append)
        data = buffer
        while True:
            try:
                decoder.feed(data)
            except BadChunk as e:
                self._violation(f"chunked body refused ({e})", head)
                return None
            if decoder.done:
                return rest[0]
            data = await reader.read(65536)
            if not data:
                return None


async def serve(port, report):
    node = FuzzNode()
    await node.start(port)
    stopped = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set_result, None)
    await stopped
    await node.stop()
    counts = {"requests": node.requests, "violations": node.violations}
    with open(report, "w") as f:
        json.dump(dict(counts, examples=node.examples), f)


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2]))
