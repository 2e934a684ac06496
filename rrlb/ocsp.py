# -*- test-case-name: tests.test_ocsp -*-
"""
OCSP stapling for the certificates rrlb serves.

A certificate whose Authority Information Access names an OCSP responder
(and whose file holds its issuer right after it) gets a L{Stapler} entry:
the response is fetched with treq, checked (L{verify_response}: the
responder's signature, by the issuer or a responder it delegated to, and
that it is about this certificate's serial and issuer and in date), and
handed to OpenSSL by the listener's C{set_ocsp_server_callback}
(L{rrlb.tls.ServerTLS}) to every handshake that asks for it. It is fetched
again halfway to its C{nextUpdate}.

A responder that cannot be reached, hangs, or answers with something that
does not check out is logged once (until it answers well again) and asked
again with backoff; the last good response is stapled until its
C{nextUpdate}, never after it: then handshakes get no staple, which clients
treat as no answer, not as a revocation.

Each process that serves TLS (each worker, with C{--workers}) fetches for
itself: a few small requests a day per certificate.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from rrlb._twisted import quiet_connection_pool

log = Logger()

# Seconds a fetch may take, response body included.
FETCH_TIMEOUT = 10.0
# Bytes of a responder's answer at most (real ones are 1-4 KiB).
MAX_RESPONSE = 64 * 1024
# Backoff after a failed fetch: from RETRY_MIN, doubling, to RETRY_MAX.
RETRY_MIN = 60.0
RETRY_MAX = 3600.0
# A response is fetched again halfway to its nextUpdate, but no sooner than
# this after the last fetch (a responder whose answers are about to expire
# is not asked in a loop).
REFRESH_MIN = 60.0
# How long a response without a nextUpdate (RFC 6960 allows it: "newer
# information is always available") is stapled.
NO_NEXT_UPDATE = 3600.0
# Clocks differ: a response thisUpdate'd this far in the future is taken.
CLOCK_SKEW = 300.0


class OCSPError(Exception):
    """
    A response cannot be stapled; C{str()} says why.
    """


def responder_url(cert: x509.Certificate) -> Optional[str]:
    """
    The first http(s) OCSP responder C{cert}'s Authority Information Access
    names, or L{None}.
    """
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return None
    except Exception:
        return None
    for description in aia:
        if description.access_method != AuthorityInformationAccessOID.OCSP:
            continue
        location = description.access_location
        if isinstance(location, x509.UniformResourceIdentifier):
            url = str(location.value)
            if url.lower().startswith(("http://", "https://")) and url.isascii():
                return url
    return None


def ocsp_request(leaf: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """
    The DER of an OCSP request for C{leaf} (SHA-1 CertID, as responders
    expect; RFC 5019).
    """
    builder = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1())
    return builder.build().public_bytes(Encoding.DER)


def _key_hash(cert: x509.Certificate) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def _signer(response: ocsp.OCSPResponse, issuer: x509.Certificate, now: float) -> x509.Certificate:
    """
    The certificate that signed C{response}: the issuer itself, or one in
    the response that the issuer made for OCSP signing (RFC 6960 4.2.2.2).
    """

    def named(cert: x509.Certificate) -> bool:
        if response.responder_key_hash is not None:
            return _key_hash(cert) == response.responder_key_hash
        return cert.subject == response.responder_name

    if named(issuer):
        return issuer
    for cert in response.certificates:
        if not named(cert):
            continue
        try:
            cert.verify_directly_issued_by(issuer)
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            raise OCSPError("signed by a responder the issuer did not delegate to") from None
        if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
            raise OCSPError("signed by a responder the issuer did not delegate to")
        valid = (_utc(cert, "not_valid_before"), _utc(cert, "not_valid_after"))
        if not valid[0] <= now <= valid[1]:
            raise OCSPError("the responder's certificate is out of date")
        return cert
    raise OCSPError("signed by an unknown responder")


def _utc(obj: Any, name: str) -> float:
    """
    A time of a certificate or response as a Unix time (infinity for none).
    """
    # cryptography >= 42 has the *_utc attributes; older ones naive UTC.
    if hasattr(obj, name + "_utc"):
        value = getattr(obj, name + "_utc")
    else:
        value = getattr(obj, name)
        value = value and value.replace(tzinfo=datetime.timezone.utc)
    return float("inf") if value is None else float(value.timestamp())


def _timed_out(result: Any, timeout: float) -> None:
    # Whatever the fetch failed with once cancelled (treq's
    # ResponseNeverReceived, say), it ran out of time.
    raise defer.TimeoutError(timeout, "OCSP fetch")


def _check_signature(signer: x509.Certificate, response: ocsp.OCSPResponse) -> None:
    key = signer.public_key()
    data, signature = response.tbs_response_bytes, response.signature
    algorithm = response.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(signature, data)
        else:
            raise OCSPError("signed with a kind of key rrlb does not check")
    except InvalidSignature:
        raise OCSPError("its signature does not verify") from None


@dataclass(frozen=True)
class Staple:
    """
    A checked response: its DER, and until when it may be stapled.
    """

    der: bytes
    expires: float
    revoked: bool = False


def verify_response(
    der: bytes, leaf: x509.Certificate, issuer: x509.Certificate, now: float
) -> Staple:
    """
    Check an OCSP response for C{leaf} before it is stapled: a successful
    response, signed by the issuer or its delegated responder, with a
    single response for C{leaf}'s serial number and issuer that is in date
    at C{now} (a Unix time) and not C{unknown}.

    @raise OCSPError: saying what is wrong.
    """
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError:
        raise OCSPError("not an OCSP response") from None
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OCSPError(f"the responder answered {response.response_status.name}")
    try:
        singles = list(response.responses)
        ours = None
        for single in singles:
            if single.serial_number != leaf.serial_number:
                continue
            expected = (
                ocsp.OCSPRequestBuilder()
                .add_certificate(leaf, issuer, single.hash_algorithm)
                .build()
            )
            if (single.issuer_key_hash, single.issuer_name_hash) == (
                expected.issuer_key_hash,
                expected.issuer_name_hash,
            ):
                ours = single
                break
        if ours is None:
            raise OCSPError("the response is about another certificate")
        _check_signature(_signer(response, issuer, now), response)
        this_update = _utc(ours, "this_update")
        next_update = _utc(ours, "next_update")
    except OCSPError:
        raise
    except Exception as e:
        # A response cryptography parses but cannot answer about.
        raise OCSPError(f"unreadable response ({e.__class__.__name__})") from None
    if this_update > now + CLOCK_SKEW:
        raise OCSPError("the response is not valid yet (thisUpdate is in the future)")
    if next_update == float("inf"):
        next_update = max(this_update, now) + NO_NEXT_UPDATE
    if next_update <= now:
        raise OCSPError("the response is out of date (nextUpdate has passed)")
    status = ours.certificate_status
    if status == ocsp.OCSPCertStatus.UNKNOWN:
        raise OCSPError("the responder does not know the certificate")
    return Staple(der, next_update, revoked=status == ocsp.OCSPCertStatus.REVOKED)


# -- fetching ---------------------------------------------------------------------

Fetch = Callable[[str, bytes], "defer.Deferred[bytes]"]


class _Body(Protocol):
    """
    Reads a response body of at most L{MAX_RESPONSE} bytes; cancelling its
    Deferred drops the connection.
    """

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred(lambda d: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_RESPONSE:
            self._abort()
            if not self.done.called:
                self.done.errback(OCSPError(f"the response is larger than {MAX_RESPONSE} bytes"))
            return
        self.data.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.data))
        else:
            self.done.errback(OCSPError("the responder closed the connection mid-answer"))


def treq_fetch(reactor: Any) -> Fetch:
    """
    Fetches with treq: C{POST} the request as C{application/ocsp-request}
    (RFC 6960 A.1); a new connection each time.
    """
    from treq.client import HTTPClient
    from twisted.web.client import Agent

    client = HTTPClient(Agent(reactor, pool=quiet_connection_pool(reactor, persistent=False)))

    def fetch(url: str, body: bytes) -> defer.Deferred[bytes]:
        d = client.post(
            url,
            data=body,
            headers=Headers({b"Content-Type": [b"application/ocsp-request"]}),
            allow_redirects=False,
        )

        def got(response: Any) -> Any:
            if response.code != 200:
                dropped = _Body()
                dropped.done.addErrback(lambda _: None)
                response.deliverBody(dropped)  # read and drop
                raise OCSPError(f"the responder answered HTTP {response.code}")
            body = _Body()
            response.deliverBody(body)
            return body.done

        return d.addCallback(got)

    return fetch


# -- the stapler -----------------------------------------------------------------


class _Entry:
    """
    One certificate being stapled.
    """

    def __init__(self, leaf: x509.Certificate, issuer: x509.Certificate, url: str) -> None:
        self.leaf = leaf
        self.issuer = issuer
        self.url = url
        self.name = leaf.subject.rfc4514_string() or f"serial {leaf.serial_number:x}"
        self.request = ocsp_request(leaf, issuer)
        self.staple: Optional[Staple] = None
        self.call: Any = None
        self.fetching: Optional[defer.Deferred[Any]] = None
        self.failing = False
        self.delay = RETRY_MIN
        self.fetched = 0


def fingerprint(cert: x509.Certificate) -> bytes:
    """
    What identifies a certificate among those stapled: the SHA-256 of its DER.
    """
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()


class Stapler(Service):
    """
    Keeps an OCSP response for each certificate that names a responder.

    @param clock: time and timers.
    @param fetch: how a request is sent: C{fetch(url, der)} fires with the
        response body (L{treq_fetch} by default).
    """

    log = log

    def __init__(self, clock: IReactorTime, fetch: Optional[Fetch] = None) -> None:
        self.clock = clock
        # Made at the first fetch: most certificates name no responder.
        self._fetch = fetch
        self._entries: dict[bytes, _Entry] = {}
        self._unstapled: set[bytes] = set()

    def staple(self, key: bytes) -> bytes:
        """
        The response to staple for the certificate C{key} names, or C{b""}
        for none (none fetched yet, or the last one is out of date). Called
        by OpenSSL in handshakes: cheap, and never raises.
        """
        entry = self._entries.get(key)
        if entry is None:
            return b""
        staple = entry.staple
        if staple is None or self.clock.seconds() >= staple.expires:
            return b""
        return staple.der

    def track(
        self, certificates: Iterable[tuple[x509.Certificate, Optional[x509.Certificate]]]
    ) -> None:
        """
        Staple these certificates (leaf, issuer or L{None}) from now on, and
        no others. One that stays keeps its response.
        """
        wanted: dict[bytes, tuple[x509.Certificate, x509.Certificate, str]] = {}
        for leaf, issuer in certificates:
            url = responder_url(leaf)
            if url is None:
                continue
            key = fingerprint(leaf)
            if issuer is None:
                if key not in self._unstapled:
                    self._unstapled.add(key)
                    self.log.warn(
                        "OCSP: {name} names a responder but its file holds no issuer"
                        " certificate after it: served without a staple",
                        name=leaf.subject.rfc4514_string(),
                    )
                continue
            wanted[key] = (leaf, issuer, url)
        for key in list(self._entries):
            if key not in wanted:
                self._forget(self._entries.pop(key))
        for key, (leaf, issuer, url) in wanted.items():
            if key in self._entries or key in self._unstapled:
                continue
            try:
                entry = _Entry(leaf, issuer, url)
            except Exception as e:
                # An issuer whose key cannot name it in a request.
                self._unstapled.add(key)
                self.log.warn(
                    "OCSP: cannot ask about {name}: {error}; served without a staple",
                    name=leaf.subject.rfc4514_string(),
                    error=e,
                )
                continue
            self._entries[key] = entry
            if self.running:
                self._start(entry)

    def startService(self) -> None:
        super().startService()
        for entry in self._entries.values():
            self._start(entry)

    def stopService(self) -> None:
        super().stopService()
        for entry in self._entries.values():
            self._forget(entry)

    def _forget(self, entry: _Entry) -> None:
        if entry.call is not None and entry.call.active():
            entry.call.cancel()
        entry.call = None
        fetching, entry.fetching = entry.fetching, None
        if fetching is not None:
            fetching.cancel()

    def _start(self, entry: _Entry) -> None:
        if entry.fetching is None and entry.call is None:
            self._refresh(entry)

    def _refresh(self, entry: _Entry) -> None:
        """
        Fetch and check a response for C{entry} now; schedule the next.
        Never fails: every error is logged and retried later.
        """
        entry.call = None
        if self._fetch is None:
            self._fetch = treq_fetch(self.clock)
        d = self._fetch(entry.url, entry.request)
        d.addTimeout(FETCH_TIMEOUT, self.clock, onTimeoutCancel=_timed_out)
        entry.fetching = d
        d.addCallback(self._got, entry)
        d.addErrback(self._failed, entry)
        d.addErrback(lambda f: self.log.failure("OCSP stapling", f))

    def _got(self, der: bytes, entry: _Entry) -> None:
        if entry.fetching is None:
            return  # forgotten meanwhile
        entry.fetching = None
        now = self.clock.seconds()
        staple = verify_response(der, entry.leaf, entry.issuer, now)
        entry.staple = staple
        entry.fetched += 1
        entry.delay = RETRY_MIN
        if staple.revoked:
            self.log.error(
                "OCSP: {name} is REVOKED, says {url}; stapling that answer",
                name=entry.name,
                url=entry.url,
            )
        elif entry.failing:
            self.log.info(
                "OCSP: stapling {name} again ({url} answers)", name=entry.name, url=entry.url
            )
        entry.failing = False
        entry.call = self.clock.callLater(
            max(REFRESH_MIN, (staple.expires - now) / 2), self._refresh, entry
        )

    def _failed(self, failure: Failure, entry: _Entry) -> None:
        if failure.check(defer.CancelledError) and entry.fetching is None:
            return  # forgotten, or the service stopped
        entry.fetching = None
        if failure.check(defer.TimeoutError):
            why = f"no answer within {FETCH_TIMEOUT:g}s"
        elif failure.check(OCSPError):
            why = str(failure.value)
        else:
            why = str(failure.value) or repr(failure.value)
        if not entry.failing:
            entry.failing = True
            staple = entry.staple
            keeps = (
                "the last response is stapled until its nextUpdate"
                if staple is not None and staple.expires > self.clock.seconds()
                else "served without a staple"
            )
            self.log.warn(
                "OCSP: cannot staple {name}: {url}: {why}; {keeps}, and the responder is"
                " asked again with backoff (logged once until it answers)",
                name=entry.name,
                url=entry.url,
                why=why,
                keeps=keeps,
            )
        entry.call = self.clock.callLater(entry.delay, self._refresh, entry)
        entry.delay = min(RETRY_MAX, entry.delay * 2)

    def state(self) -> list[dict[str, Any]]:
        """
        Each certificate stapled, for tests and the status page.
        """
        now = self.clock.seconds()
        return [
            {
                "name": e.name,
                "url": e.url,
                "stapled": e.staple is not None and e.staple.expires > now,
                "expires": None if e.staple is None else e.staple.expires,
                "fetched": e.fetched,
            }
            for e in self._entries.values()
        ]
