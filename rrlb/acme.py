# -*- test-case-name: tests.test_acme -*-
"""
Certificates from an ACME CA (RFC 8555), configured under C{tls: acme:}.

This is the control side: L{AcmeManager} (the main process only, with
C{--workers}) keeps the account, places the orders, stores the certificate
and checks for renewal (at start, every 12 hours and on C{SIGHUP}). It
publishes what the listeners need as an L{rrlb.acmetls.AcmeState} (the
certificate and key, the http-01 tokens and the tls-alpn-01 challenge
certificates pending), which each traffic side serves
(L{rrlb.acmetls.AcmeServing}).

The ACME protocol is the C{acme} package's (certbot's) synchronous client,
its steps in L{rrlb.acmeorder}, each run in a daemon thread of its own
(L{in_thread}) so the reactor never blocks and a CA that hangs holds up
neither the traffic nor the shutdown.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from rrlb.acmeorder import (
    MAX_ANSWER,
    AcmeError,
    Order,
    challenge_certificate,
    describe,
    finish_order,
    new_key,
    place_order,
)
from rrlb.acmetls import AcmeState, certificate_names, key_pair
from rrlb.settings import AcmeConfig
from rrlb.tlsfiles import not_after

T = TypeVar("T")
log = Logger()

# Renewal checks: this often, and a failed order again after FIRST_RETRY,
# doubling up to MAX_RETRY.
CHECK_INTERVAL = 12 * 3600.0
FIRST_RETRY = 60.0
MAX_RETRY = 3600.0

ACCOUNT_FILE = "account.key"
# The certificate chain and its key in one file, so that they are replaced
# together (one atomic rename).
CERTIFICATE_FILE = "certificate.pem"


# -- storage --------------------------------------------------------------------


class Storage:
    """
    The C{storage} directory: mode 0700, files 0600, written atomically.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def prepare(self) -> None:
        """
        Create the directory (0700), or make an existing one 0700.

        @raise AcmeError: it cannot be made or used.
        """
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            mode = os.stat(self.path).st_mode & 0o777
            if mode & 0o077:
                os.chmod(self.path, 0o700)
                log.warn(
                    "tls.acme.storage {path} was mode {mode:o}; made it 0700",
                    path=self.path,
                    mode=mode,
                )
        except OSError as e:
            raise AcmeError(f"tls.acme.storage {self.path!r}: {e.strerror or e}") from None

    def read(self, name: str) -> Optional[bytes]:
        """
        A file's bytes, or L{None} if it is missing (or cannot be read:
        said in the log).
        """
        try:
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read(MAX_ANSWER)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.error(
                "tls.acme.storage: cannot read {name}: {error}", name=name, error=e.strerror or e
            )
            return None

    def write(self, name: str, data: bytes) -> None:
        """
        Replace a file with C{data} in one rename, mode 0600.

        @raise AcmeError: it cannot be written.
        """
        final = os.path.join(self.path, name)
        temporary = f"{final}.{os.getpid()}.tmp"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, final)
        except OSError as e:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise AcmeError(f"tls.acme.storage: cannot write {name}: {e.strerror or e}") from None


@dataclass(frozen=True)
class Stored:
    """
    The certificate in storage: its chain, key and leaf.
    """

    chain: bytes
    key: bytes
    leaf: x509.Certificate


def split_certificate_file(data: bytes) -> Stored:
    """
    The chain and key of a L{CERTIFICATE_FILE}.

    @raise ValueError: it is not a chain and its key.
    """
    marker = data.find(b"-----BEGIN PRIVATE KEY-----")
    if marker < 0:
        raise ValueError("no private key")
    chain, key = data[:marker], data[marker:]
    return Stored(chain, key, key_pair(chain, key).leaf)


# -- the steps, in threads ----------------------------------------------------------


def in_thread(reactor: Any, work: Callable[[], T]) -> defer.Deferred[T]:
    """
    Run C{work} in a daemon thread of its own; its result fires the
    Deferred on the reactor's thread.

    Not the reactor's thread pool: that one is joined at shutdown, and a
    step of an order can wait on the CA for minutes (polling, or a CA that
    hangs), which would hold the shutdown up.
    """
    d: defer.Deferred[T] = defer.Deferred()

    def run() -> None:
        try:
            result = work()
        except BaseException:
            failure = Failure()
            reactor.callFromThread(d.errback, failure)
        else:
            reactor.callFromThread(d.callback, result)

    threading.Thread(target=run, name="rrlb-acme", daemon=True).start()
    return d


# -- the control side ------------------------------------------------------------------


class AcmeManager(Service):
    """
    Keeps a certificate from the CA for C{acme.domains}: loads it from
    storage, orders one when there is none or it is due, and publishes
    every change (L{AcmeState}) to the traffic side.

    @param publish: hands each new L{AcmeState} to the traffic side.
    @param place: the order's first step (account, order, challenges), and
        C{finish} its second (answers, validation, the certificate); each
        is run by C{run} (default: in a thread of its own, L{in_thread}).
        Tests give their own.
    @ivar orders: orders finished, by result (C{ok}, C{error}).
    @ivar current: the certificate served, if any.
    @ivar ordering: the order under way, if any (one at a time).
    """

    log = log

    def __init__(
        self,
        acme: AcmeConfig,
        reactor: Any,
        publish: Callable[[AcmeState], Any],
        place: Callable[[AcmeConfig, bytes], Order] = place_order,
        finish: Callable[[Order], bytes] = finish_order,
        run: Optional[Callable[[Callable[[], Any]], defer.Deferred[Any]]] = None,
    ) -> None:
        self.acme = acme
        self.reactor = reactor
        self.publish = publish
        self.place = place
        self.finish = finish
        self.run = run or (lambda work: in_thread(reactor, work))
        self.storage = Storage(acme.storage or "")
        self.orders = {"ok": 0, "error": 0}
        self.current: Optional[Stored] = None
        self.ordering: Optional[defer.Deferred[Any]] = None
        self.retry_in = FIRST_RETRY
        self._retry: Any = None
        self._tokens: tuple[tuple[str, str], ...] = ()
        self._alpn: tuple[tuple[str, bytes, bytes], ...] = ()
        self._timer = task.LoopingCall(self.check)
        self._timer.clock = reactor

    # -- state ------------------------------------------------------------------

    def state(self) -> AcmeState:
        current = self.current
        return AcmeState(
            names=self.acme.domains,
            chain=current.chain if current else b"",
            key=current.key if current else b"",
            tokens=self._tokens,
            alpn=self._alpn,
        )

    def _publish(self) -> None:
        try:
            self.publish(self.state())
        except Exception:
            self.log.failure("serving the ACME state")

    def configure(self, acme: AcmeConfig) -> None:
        """
        Run with new C{tls.acme} settings (a reload), and check now.
        """
        self.acme = acme
        self.storage = Storage(acme.storage or "")
        self._load()
        self._publish()
        self.check()

    # -- start and stop ------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._load()
        self._publish()
        # The first check at start, then every 12 hours.
        self._timer.start(CHECK_INTERVAL, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._timer.running:
            self._timer.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _load(self) -> None:
        """
        Take the stored certificate, if there is a usable one.
        """
        try:
            self.storage.prepare()
        except AcmeError as e:
            self.log.error("{error}", error=str(e))
            return
        data = self.storage.read(CERTIFICATE_FILE)
        if data is None:
            return
        try:
            stored = split_certificate_file(data)
        except Exception as e:  # cryptography raises more than ValueError
            self.log.error(
                "tls.acme.storage: {name} is not a certificate and its key ({error});"
                " ordering a new one",
                name=CERTIFICATE_FILE,
                error=str(e),
            )
            return
        if self.current is None or stored.chain != self.current.chain:
            self.current = stored

    # -- the checks -------------------------------------------------------------

    def due(self) -> Optional[str]:
        """
        Why a new certificate is needed now, or L{None}.
        """
        current = self.current
        if current is None:
            return "no certificate yet"
        names = set(certificate_names(current.leaf))
        if not set(self.acme.domains) <= names:
            return "the certificate lacks some names"
        now = self.reactor.seconds()
        end = not_after(current.leaf).timestamp()
        renew_before = self.acme.renew_before
        if renew_before is None:
            start = current.leaf.not_valid_before_utc.timestamp()
            renew_before = (end - start) / 3
        if end - now < renew_before:
            return f"it expires in {max(0.0, end - now) / 86400:.1f} days"
        return None

    def check(self) -> Optional[defer.Deferred[Any]]:
        """
        Order a certificate if one is due and no order is under way.

        @return: the order's Deferred (it never fails), if one was placed.
        """
        if not self.running or self.ordering is not None:
            return None
        reason = self.due()
        if reason is None:
            return None
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self.log.info(
            "ACME: ordering a certificate for {names} ({reason})",
            names=", ".join(self.acme.domains),
            reason=reason,
        )
        d = self.ordering = defer.Deferred.fromCoroutine(self._order(self.acme))
        d.addBoth(self._ordered)
        return d

    async def _order(self, acme: AcmeConfig) -> None:
        account = self.storage.read(ACCOUNT_FILE)
        if account is not None:
            try:
                serialization.load_pem_private_key(account, password=None)
            except Exception:  # not a key, or one cryptography cannot use
                self.log.error(
                    "tls.acme.storage: {name} holds no usable key; making a new account key",
                    name=ACCOUNT_FILE,
                )
                account = None
        if account is None:
            account = new_key()
            self.storage.write(ACCOUNT_FILE, account)
        order = await self.run(lambda: self.place(acme, account))
        tokens = []
        alpn = []
        for challenge in order.challenges:
            if challenge.kind == "http-01":
                tokens.append((challenge.token, challenge.key_authorization))
            else:
                cert, key = challenge_certificate(challenge.name, challenge.key_authorization)
                alpn.append((challenge.name, cert, key))
        self._tokens, self._alpn = tuple(tokens), tuple(alpn)
        for challenge in order.challenges:
            self.log.info(
                "ACME: answering {kind} for {name}", kind=challenge.kind, name=challenge.name
            )
        self._publish()
        try:
            chain = await self.run(lambda: self.finish(order))
        finally:
            self._tokens, self._alpn = (), ()
            self._publish()
        try:
            stored = Stored(chain, order.key, key_pair(chain, order.key).leaf)
        except Exception as e:  # cryptography raises more than ValueError
            raise AcmeError(f"the CA's certificate cannot be used: {e}") from None
        names = certificate_names(stored.leaf)
        if set(names) != set(acme.domains):
            raise AcmeError(
                f"the CA's certificate is for {', '.join(names) or 'no name'},"
                f" not {', '.join(acme.domains)}"
            )
        self.storage.write(CERTIFICATE_FILE, chain + order.key)
        self.current = stored
        self._publish()

    def _ordered(self, result: Any) -> None:
        self.ordering = None
        names = ", ".join(self.acme.domains)
        if isinstance(result, Failure) and not self.running:
            # An order cut short by the shutdown (its thread ran on until
            # the CA answered or the connection went): nothing to retry.
            return
        if not isinstance(result, Failure):
            self.orders["ok"] += 1
            self.retry_in = FIRST_RETRY
            leaf = self.current.leaf if self.current else None
            self.log.info(
                "ACME: new certificate for {names}, valid until {end}",
                names=names,
                end=f"{not_after(leaf):%Y-%m-%d %H:%M:%S} UTC" if leaf else "?",
            )
            return
        self.orders["error"] += 1
        delay = self.retry_in
        self.retry_in = min(self.retry_in * 2, MAX_RETRY)
        self.log.error(
            "ACME order for {names} failed: {error}; retrying in {delay:g}s{still}",
            names=names,
            error=describe(result.value or Exception("?")),
            delay=delay,
            still="; the current certificate keeps serving" if self.current else "",
        )
        if self.running:
            self._retry = self.reactor.callLater(delay, self.check)
