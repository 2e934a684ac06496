#!/usr/bin/env python3
"""A node for the upload benchmark: it reads each request's body (by
Content-Length or chunked), at most RATE bytes a second if given, and answers
with the body's sha256 in hex.

    upload_sink.py PORT [RATE]

Listens on 127.0.0.1 only. Standard library only (asyncio), so it runs
under the system Python of bench/run.
"""

import asyncio
import hashlib
import sys
import time

READ = 1 << 16


class Limiter:
    """Sleeps so that reading keeps to `rate` bytes a second (0: no limit)."""

    def __init__(self, rate):
        self.rate = rate
        self.start = time.monotonic()
        self.taken = 0

    async def took(self, n):
        if not self.rate:
            return
        self.taken += n
        ahead = self.taken / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            await asyncio.sleep(ahead)


async def body_chunks(reader, headers):
    length = headers.get(b"content-length")
    if length is not None:
        left = int(length)
        while left:
            data = await reader.read(min(READ, left))
            if not data:
                raise ConnectionError("body cut short")
            left -= len(data)
            yield data
        return
    if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
        return
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return
        left = size
        while left:
            data = await reader.read(min(READ, left))
            if not data:
                raise ConnectionError("body cut short")
            left -= len(data)
            yield data
        await reader.readexactly(2)


async def serve(reader, writer, rate):
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.split(b"\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name:
                    headers[name.strip().lower()] = value.strip()
            if headers.get(b"expect", b"").lower() == b"100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            digest, limiter = hashlib.sha256(), Limiter(rate)
            async for data in body_chunks(reader, headers):
                digest.update(data)
                await limiter.took(len(data))
            answer = digest.hexdigest().encode() + b"\n"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
            )
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()


async def main(port, rate):
    server = await asyncio.start_server(
        lambda r, w: serve(r, w, rate), "127.0.0.1", port, limit=1 << 16
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0))
