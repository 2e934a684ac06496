"""
Cleartext HTTP/2 with prior knowledge (h2c, issue 21): with C{--http2} a
plain C{tcp:} listener serves a client that opens with the HTTP/2 preface
over HTTP/2, and HTTP/1.1 clients on the same port as before. The clients
are Debian's curl (C{--http2-prior-knowledge}, C{--http1.1}), h2load and
the C{h2} library, over real loopback sockets.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from twisted.internet import utils
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from rrlb.http2 import PREFACE
from tests.support import (
    LOOPBACK,
    BackendConnection,
    H2Client,
    HTTP2Case,
    RecordedRequest,
    WireClient,
    reactor,
    response,
    start_balancer,
)


def answer(request: RecordedRequest, conn: BackendConnection) -> bytes:
    return response(body=b"node:" + request.target)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise unittest.SkipTest(f"{name} is not installed")
    return path


class H2CTests(HTTP2Case):
    """
    HTTP/2 with prior knowledge and HTTP/1.1 on one cleartext port.
    """

    async def balancer(self, *args: str) -> Any:
        node = await self.backend(answer)
        return node, await start_balancer(self, [node.url], "--http2", *args)

    async def tcp_h2(self, port: int) -> H2Client:
        endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, port)
        client = await connectProtocol(endpoint, H2Client())

        async def close() -> None:
            if client.transport.connected:
                client.transport.abortConnection()
                await client.lost

        self.addCleanup(close)
        return client

    async def curl(self, *args: str) -> bytes:
        out, err, code = await utils.getProcessOutputAndValue(
            tool("curl"), ["-sS", "--max-time", "10", "-w", "\n%{http_version}", *args],
            env=os.environ,
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        return out

    async def test_curl_both_protocols_one_port(self) -> None:
        """
        curl --http2-prior-knowledge gets HTTP/2 and curl --http1.1 gets
        HTTP/1.1 from the same tcp: listener, both answered by the node.
        """
        node, balancer = await self.balancer()
        out = await self.curl("--http2-prior-knowledge", f"{balancer.url}/two")
        self.assertEqual(out, b"node:/two\n2")
        out = await self.curl("--http1.1", f"{balancer.url}/one")
        self.assertEqual(out, b"node:/one\n1.1")
        self.assertEqual([r.target for r in node.requests], [b"/two", b"/one"])

    async def test_h2load(self) -> None:
        """
        h2load's 200 requests over 2 connections of 10 streams each, with
        prior knowledge, all succeed.
        """
        node, balancer = await self.balancer()
        out, err, code = await utils.getProcessOutputAndValue(
            tool("h2load"), ["-n", "200", "-c", "2", "-m", "10", f"{balancer.url}/load"],
            env=os.environ,
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        match = re.search(rb"requests: 200 total, 200 started, 200 done, (\d+) succeeded", out)
        self.assertIsNotNone(match, out)
        self.assertEqual(match.group(1), b"200", out)  # type: ignore[union-attr]
        self.assertIn(b"Application protocol: h2c", out)

    async def test_preface_in_pieces(self) -> None:
        """
        A preface that comes a byte at a time is still taken for one, and
        the connection's streams are served.
        """
        node, balancer = await self.balancer()
        client = H2Client()
        client.connectionMade = lambda: None  # type: ignore[method-assign]
        endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, balancer.port)
        await connectProtocol(endpoint, client)
        self.addCleanup(lambda: client.transport.abortConnection() or client.lost)
        client.conn.initiate_connection()
        opening = client.conn.data_to_send()
        self.assertTrue(opening.startswith(PREFACE))
        for i in range(len(PREFACE)):
            client.transport.write(opening[i : i + 1])
        client.transport.write(opening[len(PREFACE) :])
        _, first = client.request(b"GET", b"/pieces")
        await first.done
        self.assertEqual(bytes(first.body), b"node:/pieces")

    async def test_http11_starting_with_p(self) -> None:
        """
        HTTP/1.1 requests whose method starts like the preface (PUT, POST,
        and PRI sent a byte at a time) are read as HTTP/1.1.
        """
        node, balancer = await self.balancer()
        endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, balancer.port)
        for method in (b"PUT", b"POST"):
            client = await connectProtocol(endpoint, WireClient())
            self.addCleanup(client.close)
            client.send(method + b" /p HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
            got = await client.response()
            assert got is not None
            self.assertEqual(got.code, 200)
        client = await connectProtocol(endpoint, WireClient())
        self.addCleanup(client.close)
        for byte in b"PRI":
            client.send(bytes([byte]))
        client.send(b" /x HTTP/1.1\r\nHost: a\r\n\r\n")
        got = await client.response()
        assert got is not None
        self.assertEqual((got.version, got.code), (b"HTTP/1.1", 200))
        self.assertEqual(node.requests[-1].method, b"PRI")
