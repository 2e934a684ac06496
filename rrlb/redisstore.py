# -*- test-case-name: tests.test_redisstore -*-
"""
The Redis store of rate limits (C{store: redis://HOST:PORT/DB}, or
C{rediss://} with TLS): one count across every rrlb instance that uses that
Redis.

Each decision is one atomic step on the server, L{TOKEN_BUCKET}: a Lua
script that reads a key's bucket, decides and writes it back, on the
server's clock (instances whose clocks disagree still share one bucket).
Nothing is read and then written from here.

The RESP protocol, C{AUTH}/C{SELECT} on connect and the script cache
(C{EVALSHA}, C{EVAL} again after C{NOSCRIPT}) are txredisapi's
C{RedisProtocol}. The connection around it is this module's, on the
injected reactor: its backoff, its one log line when the store goes away
and one when it comes back, and the decision timeout. While the store is
away a decision fails at once (no request waits for a reconnect); a
decision Redis has not answered within L{DECISION_TIMEOUT} fails too; a
connection that answers nothing for L{STALL_TIMEOUT}, or answers what the
script cannot return, is dropped and made again.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Optional, Union
from urllib.parse import unquote, urlsplit

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from rrlb.values import ConfigError

log = Logger()

# A decision Redis has not answered within this many seconds is a store
# error (the request is let through or refused as on_store_error says).
DECISION_TIMEOUT = 0.05
# A connection with decisions waiting that has answered nothing for this
# long is dropped and made again.
STALL_TIMEOUT = 1.0
# Reconnects: the first after BACKOFF_FIRST seconds, doubled after each
# failed attempt up to BACKOFF_MAX.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
CONNECT_TIMEOUT = 2.0

# KEYS[1]: the key's bucket. ARGV[1]: one token's time in microseconds,
# ARGV[2]: the burst tolerance ((burst - 1) tokens' time). The bucket is
# its GCRA "theoretical arrival time" in microseconds of the server's
# clock, expiring once the bucket is full again. Returns 0 when the
# request takes a token, else its Retry-After in whole seconds (>= 1).
TOKEN_BUCKET = b"""
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0) or 0
if tat < now then tat = now end
local wait = tat - now - tolerance
if wait > 0.001 then
  return math.max(1, math.ceil(wait / 1000000))
end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX',
           math.ceil((tat - now) / 1000) + 1000)
return 0
"""

TOKEN_BUCKET_SHA = hashlib.sha1(TOKEN_BUCKET).hexdigest()

_KEY_PREFIX = b"rrlb:rl:"


class StoreError(Exception):
    """
    The store could not decide: it is away, too slow, or answered nonsense.
    """


@dataclasses.dataclass(frozen=True)
class RedisAddress:
    """
    Where a Redis store is: C{redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]},
    or C{rediss://} for TLS (verified against the system's trust store).
    """

    host: str
    port: int = 6379
    db: int = 0
    tls: bool = False
    username: Optional[str] = None
    password: Optional[str] = None

    def __str__(self) -> str:
        # What the log shows: never the password.
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}/{self.db}"


def parse_redis_url(where: str, url: str) -> RedisAddress:
    """
    The address in C{url}; a mistake is a L{ConfigError} naming C{where}.
    """
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError:
        parts, port = None, 0
    path = parts.path.lstrip("/") if parts is not None else ""
    if (
        parts is None
        or parts.scheme not in ("redis", "rediss")
        or not parts.hostname
        or (path and not path.isdigit())
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(
            f"{where}.store must be redis://HOST:PORT/DB or rediss://HOST:PORT/DB, not {url!r}"
        )
    return RedisAddress(
        host=parts.hostname,
        port=port,
        db=int(path or 0),
        tls=parts.scheme == "rediss",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def redis_key(namespace: bytes, key: Union[str, bytes]) -> bytes:
    """
    The Redis key of C{key}'s bucket in a filter's C{namespace}: a digest,
    so any header value is a short key.
    """
    if isinstance(key, str):
        key = key.encode("utf-8")
    return _KEY_PREFIX + namespace + b":" + hashlib.blake2b(key, digest_size=16).digest()


def store_endpoint(reactor: Any, address: RedisAddress, trust_root: Any = None) -> Any:
    """
    The client endpoint of C{address}: TCP, with TLS for C{rediss://}
    (verified for the URL's host against the system's trust store, or
    C{trust_root}).
    """
    endpoint: Any = HostnameEndpoint(reactor, address.host, address.port, timeout=CONNECT_TIMEOUT)
    if address.tls:
        from twisted.internet.ssl import optionsForClientTLS

        endpoint = wrapClientTLS(optionsForClientTLS(address.host, trust_root), endpoint)
    return endpoint


def _protocol_class() -> Any:
    # txredisapi imports the global reactor when it is imported (installing
    # the default one if none is yet): only import it once rrlb's reactor is
    # in place, when a store is started.
    import txredisapi

    class Protocol(txredisapi.RedisProtocol):
        def dataReceived(self, data: bytes, unpause: bool = False) -> Any:
            # txredisapi decodes each line as UTF-8 and raises on anything
            # else: bytes that are not a Redis reply drop the connection
            # (made again), not a traceback in the log.
            try:
                return super().dataReceived(data, unpause)
            except Exception:
                if self.transport is not None:
                    self.transport.abortConnection()
                return None

    return Protocol


class _Factory(Factory):
    noisy = False
    # What txredisapi's protocol asks of its factory when AUTH or SELECT
    # fails.
    isLazy = False

    def __init__(self, store: RedisStore) -> None:
        self.store = store

    def buildProtocol(self, addr: Any) -> Any:
        address = self.store.address
        protocol = self.store.protocol_class(
            charset=None,
            password=address.password,
            dbid=address.db or None,
            convertNumbers=False,
            username=address.username,
        )
        protocol.factory = self
        return protocol

    def stopTrying(self) -> None:
        pass

    def connectionError(self, why: str) -> None:
        self.store.refused = why


class RedisStore:
    """
    One Redis server's connection, shared by every filter of the process
    that counts there.

    @ivar errors: decisions that failed (the store away, too slow, or
        answering nonsense): C{rrlb_rate_limit_store_errors_total}.
    @ivar up: whether the last news of the store was good.
    """

    def __init__(
        self,
        address: RedisAddress,
        reactor: Any,
        endpoint: Optional[Any] = None,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self.address = address
        self.reactor = reactor
        self.on_error = on_error
        self.endpoint = store_endpoint(reactor, address) if endpoint is None else endpoint
        self.protocol_class: Any = None
        self.timeout = DECISION_TIMEOUT
        self.errors = 0
        self.up = True
        self.refused: Optional[str] = None
        self._ready: Any = None
        self._connecting: Optional[defer.Deferred[Any]] = None
        self._protocol: Any = None
        self._retry: Any = None
        self._delay = BACKOFF_FIRST
        self._running = False
        self._pending = 0
        self._progress = 0.0
        self._closed: Optional[defer.Deferred[None]] = None

    def __str__(self) -> str:
        return str(self.address)

    # -- the connection --------------------------------------------------------------

    def start(self) -> None:
        """
        Connect, and stay connected until L{stop}.
        """
        if self._running:
            return
        self._running = True
        if self.protocol_class is None:
            self.protocol_class = _protocol_class()
        self._connect()

    def stop(self) -> defer.Deferred[None]:
        """
        Close the connection and stop reconnecting; fires once it is closed.
        """
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._connecting is not None:
            self._connecting.cancel()
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            return defer.succeed(None)
        closed = self._closed = defer.Deferred()
        protocol.transport.abortConnection()
        return closed

    def _connect(self) -> None:
        self._retry = None
        if not self._running:
            return
        self.refused = None
        d = self._connecting = self.endpoint.connect(_Factory(self))
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, protocol: Any) -> None:
        self._connecting = None
        self._protocol = protocol
        protocol.whenDisconnected().addCallback(self._lost)
        protocol.whenConnected().addCallback(self._usable)

    def _usable(self, protocol: Any) -> None:
        if protocol is not self._protocol:
            return
        self._ready = protocol
        self._delay = BACKOFF_FIRST
        self._pending = 0
        if not self.up:
            self.up = True
            log.info("rate-limit store {store} is back", store=str(self))

    def _failed(self, reason: Failure) -> None:
        self._connecting = None
        if reason.check(defer.CancelledError):
            return
        self._went_away(reason.getErrorMessage())
        self._schedule()

    def _lost(self, protocol: Any) -> None:
        self._protocol = None
        self._ready = None
        closed, self._closed = self._closed, None
        if closed is not None:
            closed.callback(None)
        if not self._running:
            return
        self._went_away(self.refused or "connection lost")
        self._schedule()

    def _went_away(self, why: str) -> None:
        if self.up:
            self.up = False
            log.warn(
                "rate-limit store {store} is away ({why}); its limits answer as"
                " their on_store_error says until it is back",
                store=str(self),
                why=why,
            )

    def _schedule(self) -> None:
        if not self._running or self._retry is not None:
            return
        delay = self._delay
        self._delay = min(BACKOFF_MAX, delay * 2)
        self._retry = self.reactor.callLater(delay, self._connect)

    def _drop(self) -> None:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()

    # -- decisions -------------------------------------------------------------------

    def failed(self) -> None:
        """
        Count one decision the store could not make.
        """
        self.errors += 1
        self.on_error()

    def take(self, key: bytes, interval_us: float, tolerance_us: float) -> defer.Deferred[int]:
        """
        One request of C{key} (a L{redis_key}) on a bucket whose token takes
        C{interval_us} and whose burst tolerance is C{tolerance_us}: 0 if it
        may go on, else its C{Retry-After}. Fails with L{StoreError} (at
        once while the store is away, or after C{timeout}: the issue's
        L{DECISION_TIMEOUT}).
        """
        protocol = self._ready
        if protocol is None:
            self.failed()
            return defer.fail(StoreError("the store is away"))
        reactor = self.reactor
        if self._pending == 0:
            self._progress = reactor.seconds()
        self._pending += 1
        result: defer.Deferred[int] = defer.Deferred()
        args = [b"%.6f" % interval_us, b"%.6f" % tolerance_us]
        try:
            if TOKEN_BUCKET_SHA in protocol.script_hashes:
                # Loaded on this connection: by its hash, without hashing
                # the script again per call (txredisapi's eval does); a
                # NOSCRIPT (the server restarted) makes it EVAL again.
                reply = protocol.evalsha(TOKEN_BUCKET_SHA, [key], args)
                reply.addErrback(self._reload_script, protocol, key, args)
            else:
                reply = protocol.eval(TOKEN_BUCKET, [key], args)
        except Exception:
            self._pending -= 1
            self.failed()
            self._drop()
            return defer.fail(StoreError("the store could not be asked"))

        def timed_out() -> None:
            if not result.called:
                self.failed()
                result.errback(StoreError("no answer within the decision timeout"))
            if reactor.seconds() - self._progress >= STALL_TIMEOUT:
                self._drop()

        timer = reactor.callLater(self.timeout, timed_out)

        def answered(value: Any) -> None:
            if protocol is self._ready:
                self._pending -= 1
                self._progress = reactor.seconds()
            if timer.active():
                timer.cancel()
            if result.called:
                return
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                result.callback(value)
                return
            self.failed()
            if not isinstance(value, Failure) or not _server_error(value):
                # Not what the script returns: the replies may be out of
                # step with the requests; start over.
                self._drop()
            result.errback(StoreError("the store answered nonsense"))

        reply.addBoth(answered)
        return result


    @staticmethod
    def _reload_script(reason: Failure, protocol: Any, key: bytes, args: list[bytes]) -> Any:
        import txredisapi

        reason.trap(txredisapi.ScriptDoesNotExist)
        return protocol.eval(TOKEN_BUCKET, [key], args)


def _server_error(reason: Failure) -> bool:
    import txredisapi

    return bool(reason.check(txredisapi.ResponseError))
