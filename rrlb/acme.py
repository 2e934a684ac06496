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
run in a daemon thread per step (L{in_thread}) so the reactor never blocks
and a CA that hangs holds up neither the traffic nor the shutdown.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from rrlb.acmetls import AcmeState, certificate_names, key_pair
from rrlb.settings import AcmeConfig
from rrlb.tlsfiles import not_after

T = TypeVar("T")
log = Logger()

# RFC 8737's id-pe-acmeIdentifier extension of a challenge certificate.
ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")

# Renewal checks: this often, and a failed order again after FIRST_RETRY,
# doubling up to MAX_RETRY.
CHECK_INTERVAL = 12 * 3600.0
FIRST_RETRY = 60.0
MAX_RETRY = 3600.0
# One request to the CA may take this long (seconds between bytes), an
# answer this many bytes, and an order (challenges and finalization) this
# long in all.
NETWORK_TIMEOUT = 30.0
MAX_ANSWER = 1 << 20
ORDER_DEADLINE = 300.0

ACCOUNT_FILE = "account.key"
# The certificate chain and its key in one file, so that they are replaced
# together (one atomic rename).
CERTIFICATE_FILE = "certificate.pem"


class AcmeError(Exception):
    """
    An order failed; C{str()} is one line naming the CA's error.
    """


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


def new_key() -> bytes:
    """
    A new P-256 private key in PEM (PKCS#8).
    """
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


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


def challenge_certificate(name: str, key_authorization: str) -> tuple[bytes, bytes]:
    """
    RFC 8737's self-signed certificate for C{name}: its SAN is the name, and
    the critical acmeIdentifier extension holds the SHA-256 of the key
    authorization. Certificate and key in PEM.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        # DER OCTET STRING of the 32-byte digest.
        .add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER, b"\x04\x20" + digest), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


# -- the ACME protocol, in threads ----------------------------------------------------


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


def describe(error: BaseException) -> str:
    """
    An order's failure in one line, naming the CA's error where it gave one.
    """
    import requests
    from acme import errors, messages

    if isinstance(error, AcmeError):
        text = str(error)
    elif isinstance(error, messages.Error):
        text = f"{error.typ}: {error.detail or error.title or ''}"
    elif isinstance(error, errors.ValidationError):
        problems = []
        for authzr in error.failed_authzrs:
            for challb in authzr.body.challenges:
                if challb.error is not None:
                    problems.append(
                        f"{authzr.body.identifier.value}: {challb.error.typ}:"
                        f" {challb.error.detail or ''}"
                    )
        text = "validation failed: " + "; ".join(problems)
    elif isinstance(error, errors.ClientError) and isinstance(
        next(iter(error.args), None), requests.Response
    ):
        # The package raises the bare response when it is not JSON.
        response = error.args[0]
        text = f"HTTP {response.status_code} from {response.url} without a problem document"
    else:
        text = f"{type(error).__name__}: {error}"
    text = " ".join(text.split())
    return text if len(text) <= 400 else text[:400] + "..."


def _network(key_pem: bytes, ca_file: Optional[str], timeout: float = NETWORK_TIMEOUT) -> Any:
    """
    The C{acme} package's network client with an account key, whose
    answers are bounded in size and time.
    """
    import josepy as jose
    import requests
    from acme import client

    class BoundedNetwork(client.ClientNetwork):
        def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            kwargs["verify"] = self.verify_ssl
            kwargs.setdefault("headers", {}).setdefault("User-Agent", self.user_agent)
            kwargs.setdefault("timeout", timeout)
            kwargs["stream"] = True
            response = self.session.request(method, url, *args, **kwargs)
            try:
                body = b""
                deadline = time.monotonic() + timeout
                for chunk in response.iter_content(65536):
                    body += chunk
                    if len(body) > MAX_ANSWER:
                        raise AcmeError(f"{url}: an answer over {MAX_ANSWER} bytes")
                    if time.monotonic() > deadline:
                        raise AcmeError(f"{url}: the answer took over {timeout:g}s")
            except requests.RequestException as e:
                raise AcmeError(f"{url}: {type(e).__name__}: {e}") from None
            finally:
                response.close()
            response._content = body
            response.encoding = "utf-8"
            return response

    private = serialization.load_pem_private_key(key_pem, password=None)
    return BoundedNetwork(
        jose.JWKEC(key=private),
        alg=jose.ES256,
        verify_ssl=ca_file or True,  # type: ignore[arg-type]
        user_agent="rrlb",
    )


@dataclass
class Challenge:
    """
    One challenge to answer: for C{name}, its token and key authorization.
    """

    name: str
    kind: str
    token: str
    key_authorization: str
    body: Any


@dataclass
class Order:
    """
    An order under way: its client, the order, and its challenges.
    """

    client: Any
    order: Any
    key: bytes
    challenges: list[Challenge] = field(default_factory=list)


def place_order(acme: AcmeConfig, account_key: bytes, timeout: float = NETWORK_TIMEOUT) -> Order:
    """
    Register (or find) the account and place an order for the names,
    picking each authorization's challenge of the configured kind. Runs in
    a thread.
    """
    import josepy as jose
    from acme import client, crypto_util, errors, messages

    assert acme.directory is not None
    net = _network(account_key, acme.ca_file, timeout)
    directory = client.ClientV2.get_directory(acme.directory, net)
    acme_client = client.ClientV2(directory, net)
    registration = messages.NewRegistration.from_data(
        email=acme.email, terms_of_service_agreed=True
    )
    try:
        acme_client.new_account(registration)
    except errors.ConflictError as e:
        # The key's account exists already: use it.
        net.account = messages.RegistrationResource(uri=e.location, body=messages.Registration())
    key = new_key()
    csr = crypto_util.make_csr(key, list(acme.domains))
    order = acme_client.new_order(csr)
    thumbprint = jose.b64encode(net.key.thumbprint(hash_function=hashes.SHA256)).decode()
    found = []
    for authzr in order.authorizations:
        name = authzr.body.identifier.value
        if authzr.body.status == messages.STATUS_VALID:
            continue
        for challb in authzr.body.challenges:
            # As JSON: acme 5 has no class of its own for tls-alpn-01.
            jobj = challb.chall.to_partial_json()
            typ = jobj.get("type")
            if typ == acme.challenge and isinstance(jobj.get("token"), str):
                token = jobj["token"]
                found.append(Challenge(name, typ, token, f"{token}.{thumbprint}", challb))
                break
        else:
            raise AcmeError(f"the CA offers no {acme.challenge} challenge for {name}")
    return Order(acme_client, order, key, found)


def finish_order(order: Order) -> bytes:
    """
    Answer the challenges (now served), wait for the CA to validate them,
    finalize, and return the full chain. Runs in a thread.
    """
    from acme import challenges

    class EmptyResponse(challenges.KeyAuthorizationChallengeResponse):
        # Every challenge's response is {} (RFC 8555 7.5.1); acme 5 knows
        # no tls-alpn-01 class of its own.
        typ = "response"

    for challenge in order.challenges:
        order.client.answer_challenge(
            challenge.body, EmptyResponse(key_authorization=challenge.key_authorization)
        )
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_DEADLINE)
    done = order.client.poll_and_finalize(order.order, deadline)
    return str(done.fullchain_pem).encode("ascii")


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
