"""
The Redis store of rate limits (rrlb.redisstore) against a real
redis-server on a free loopback port per test case, and against servers
that hang, answer garbage or drop mid-reply.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate
from twisted.trial import unittest

from rrlb.redisstore import (
    DECISION_TIMEOUT,
    RedisAddress,
    RedisStore,
    StoreError,
    parse_redis_url,
    redis_key,
    store_endpoint,
)
from rrlb.values import ConfigError
from tests.support import (
    LOOPBACK,
    LogCapture,
    RedisServer,
    certs,
    reactor,
    start_redis,
    wait_for,
)

# 1 request a minute, burst 3: one token's time and the burst tolerance in µs.
INTERVAL = 60_000_000.0
TOLERANCE = 2 * INTERVAL


class ParseTests(unittest.TestCase):
    """
    The store's URL.
    """

    def test_forms(self) -> None:
        """
        Host, port, database, TLS and credentials are read from the URL; the
        printed form has no password.
        """
        self.assertEqual(parse_redis_url("x", "redis://r1"), RedisAddress("r1"))
        address = parse_redis_url("x", "rediss://u:p%40ss@10.0.0.5:6380/3")
        self.assertEqual(address, RedisAddress("10.0.0.5", 6380, 3, True, "u", "p@ss"))
        self.assertEqual(str(address), "rediss://10.0.0.5:6380/3")

    def test_bad(self) -> None:
        """
        Anything else names the filter's store.
        """
        for url in ("redis://", "redis://h:port/0", "redis://h/x", "http://h/0", "redis://h/0?a=1"):
            e = self.assertRaises(ConfigError, parse_redis_url, "routes[0].filters[1]", url)
            self.assertIn("routes[0].filters[1].store", str(e))


async def connected(testcase: unittest.TestCase, url: str) -> RedisStore:
    store = RedisStore(parse_redis_url("x", url), reactor)
    store.start()
    testcase.addCleanup(store.stop)
    await wait_for(lambda: store._ready is not None, "the store's connection")
    return store


async def takes(store: RedisStore, key: bytes, count: int) -> list[Any]:
    results: list[Any] = []
    for _ in range(count):
        try:
            results.append(await store.take(key, INTERVAL, TOLERANCE))
        except StoreError:
            results.append("error")
    return results


class RedisTests(unittest.TestCase):
    """
    Decisions on a real redis-server.
    """

    async def test_bucket(self) -> None:
        """
        burst requests go on, the next gets its Retry-After (a token a
        minute: 60 s at most, at least 1); another key has its own bucket;
        a script the server forgot is loaded again.
        """
        server = await start_redis(self)
        store = await connected(self, server.url)
        results = await takes(store, redis_key(b"t", b"client"), 4)
        self.assertEqual(results[:3], [0, 0, 0])
        self.assertTrue(55 <= results[3] <= 60, results)
        self.assertEqual(await takes(store, redis_key(b"t", b"other"), 1), [0])
        # The server forgets its scripts (a restart, SCRIPT FLUSH from
        # another client): the next decision loads it again.
        other = await connected(self, server.url)
        await other._ready.script_flush()
        self.assertEqual(await takes(store, redis_key(b"t", b"third"), 1), [0])
        self.assertEqual(store.errors, 0)

    async def test_one_step_on_the_server(self) -> None:
        """
        Three stores (three instances) deciding at once over one bucket let
        exactly burst requests through: the script decides atomically.
        """
        server = await start_redis(self)
        stores = [await connected(self, server.url) for _ in range(3)]
        for store in stores:
            # Every decision answered, however loaded the machine: this is
            # about the server's arithmetic, not the timeout.
            store.timeout = 10.0
        key = redis_key(b"t", b"shared")
        # burst 50, no refill to speak of during the test.
        tolerance = 49 * INTERVAL
        results = await defer.gatherResults(
            [s.take(key, INTERVAL, tolerance) for _ in range(40) for s in stores]
        )
        self.assertEqual(results.count(0), 50)

    async def test_password_and_database(self) -> None:
        """
        A password in the URL is sent with AUTH and the database chosen
        with SELECT; a wrong password keeps the store away (logged once)
        without a traceback.
        """
        logged = LogCapture.install(self)
        server = await start_redis(self, "--requirepass", "s3cret")
        url = server.url.replace("redis://", "redis://:s3cret@").replace("/0", "/2")
        store = await connected(self, url)
        self.assertEqual(await takes(store, b"k", 1), [0])
        wrong = RedisStore(parse_redis_url("x", server.url.replace("//", "//:nope@")), reactor)
        wrong.start()
        self.addCleanup(wrong.stop)
        await wait_for(lambda: not wrong.up, "the refused connection")
        self.assertFailure(wrong.take(b"k", INTERVAL, TOLERANCE), StoreError)
        lines = [m for m in logged.messages() if "rate-limit store" in m]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("could not auth", lines[0])

    async def test_tls(self) -> None:
        """
        rediss:// speaks TLS, verifying the server's certificate for the
        URL's host: against a trust root that knows its CA it works, against
        the system's trust store it is refused.
        """
        tls = certs()
        directory = self.mktemp()
        os.makedirs(directory)
        files = []
        for name, data in (
            ("cert.pem", tls.node.cert_pem),
            ("key.pem", tls.node.key_pem),
            ("ca.pem", tls.ca.cert_pem),
        ):
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(data)
            files.append(path)
        server = RedisServer(tls=(files[0], files[1], files[2]))
        self.addCleanup(lambda: defer.ensureDeferred(server.kill()))
        await server.start()
        address = parse_redis_url("x", server.url)
        self.assertTrue(address.tls)
        trust = Certificate.loadPEM(tls.ca.cert_pem)
        store = RedisStore(address, reactor, store_endpoint(reactor, address, trust))
        store.start()
        self.addCleanup(store.stop)
        await wait_for(lambda: store._ready is not None, "the TLS connection")
        self.assertEqual(await takes(store, b"k", 1), [0])
        # The system's trust store does not know the test CA: refused.
        untrusted = RedisStore(address, reactor)
        untrusted.start()
        self.addCleanup(untrusted.stop)
        await wait_for(lambda: not untrusted.up, "the refused certificate")
        self.assertIsNone(untrusted._ready)

    async def test_killed_and_restarted(self) -> None:
        """
        While redis-server is down each decision fails at once and is
        counted; one line says the store went away and one that it is
        back; decisions work again once it restarts, without a hand.
        """
        logged = LogCapture.install(self)
        server = await start_redis(self)
        store = await connected(self, server.url)
        await server.kill()
        await wait_for(lambda: store._ready is None, "the lost connection")
        started = reactor.seconds()
        for _ in range(5):
            self.assertFailure(store.take(b"k", INTERVAL, TOLERANCE), StoreError)
        self.assertLess(reactor.seconds() - started, DECISION_TIMEOUT)
        self.assertEqual(store.errors, 5)
        await server.start()
        await wait_for(lambda: store._ready is not None, "the reconnect", timeout=15)
        self.assertEqual(await takes(store, b"k", 1), [0])
        lines = [m for m in logged.messages() if "rate-limit store" in m]
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("is away", lines[0])
        self.assertIn("is back", lines[1])

    async def test_unreachable_at_start(self) -> None:
        """
        A store that cannot be reached from the start fails each decision at
        once, and is logged away once however many times it is retried.
        """
        logged = LogCapture.install(self)
        server = RedisServer()
        await server.start()
        port = server.port
        await server.kill()
        store = RedisStore(RedisAddress(LOOPBACK, port), reactor)
        store.start()
        self.addCleanup(store.stop)
        await wait_for(lambda: not store.up, "the failed connection")
        await wait_for(lambda: store._delay >= 0.4, "a few attempts")
        self.assertFailure(store.take(b"k", INTERVAL, TOLERANCE), StoreError)
        lines = [m for m in logged.messages() if "rate-limit store" in m]
        self.assertEqual(len(lines), 1, lines)


class _Hostile(Protocol):
    """
    A "Redis" that answers every command with C{reply}, once (none: hangs),
    then closes if C{close}.
    """

    reply = b""
    close = False

    def dataReceived(self, data: bytes) -> None:
        if self.reply:
            self.transport.write(self.reply)
        if self.close:
            self.transport.loseConnection()


async def hostile(testcase: unittest.TestCase, reply: bytes, close: bool = False) -> RedisStore:
    cls = type("Server", (_Hostile,), {"reply": reply, "close": close})
    connections: list[Protocol] = []

    def build(addr: Any) -> Protocol:
        p = cls()
        connections.append(p)
        return p

    factory = Factory()
    factory.buildProtocol = build  # type: ignore[method-assign]
    port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(factory)
    testcase.addCleanup(port.stopListening)

    def close_all() -> None:
        for p in connections:
            if p.transport is not None:
                p.transport.abortConnection()

    store = RedisStore(RedisAddress(LOOPBACK, port.getHost().port), reactor)
    store.start()
    testcase.addCleanup(close_all)
    testcase.addCleanup(store.stop)
    await wait_for(lambda: store._ready is not None, "the store's connection")
    return store


class HostileTests(unittest.TestCase):
    """
    A Redis that hangs, answers garbage or drops mid-reply costs a store
    error per decision, never a traceback or a stuck request.
    """

    async def test_hangs(self) -> None:
        """
        No answer within 50 ms is a store error; a connection silent for
        STALL_TIMEOUT with decisions waiting is dropped and made again.
        """
        store = await hostile(self, b"")
        started = reactor.seconds()
        with self.assertRaises(StoreError):
            await store.take(b"k", INTERVAL, TOLERANCE)
        self.assertLess(reactor.seconds() - started, 0.5)
        self.assertEqual(store.errors, 1)
        first = store._ready
        while store._ready is first:
            # Keep asking: the silent connection goes once a second passed.
            with self.assertRaises(StoreError):
                await store.take(b"k", INTERVAL, TOLERANCE)
        self.assertFalse(store.up)

    async def test_garbage(self) -> None:
        """
        Bytes that are no Redis reply (binary, a string where the script
        returns an integer) are store errors and drop the connection.
        """
        for reply in (b"\xff\xfe\x00garbage\r\n", b"+OK\r\n", b":-5\r\n", b"$3\r\nabc\r\n"):
            store = await hostile(self, reply)
            with self.assertRaises(StoreError):
                await store.take(b"k", INTERVAL, TOLERANCE)
            await wait_for(lambda s=store: s._ready is None, "the dropped connection")

    async def test_drops_mid_reply(self) -> None:
        """
        A connection closed in the middle of a reply is a store error.
        """
        store = await hostile(self, b"$10\r\nabc", close=True)
        with self.assertRaises(StoreError):
            await store.take(b"k", INTERVAL, TOLERANCE)
        self.assertEqual(store.errors, 1)
