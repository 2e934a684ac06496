"""
OCSP stapling with a responder built on C{cryptography}'s OCSP support,
listening on loopback: the staple as C{openssl s_client -status} sees it, a
responder that is down, a refresh halfway to nextUpdate, and responders
that hang, answer garbage, a response for another certificate, one signed
by a stranger or out of date: none of those is ever stapled.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, threads
from twisted.internet import reactor as _global_reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web import server
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from rrlb.ocsp import (
    FETCH_TIMEOUT,
    MAX_RESPONSE,
    NO_NEXT_UPDATE,
    OCSPError,
    Stapler,
    fingerprint,
    ocsp_request,
    treq_fetch,
    verify_response,
)
from tests.support import (
    LOOPBACK,
    Issued,
    LogCapture,
    TLSCase,
    issue,
    make_ca,
    s_client,
    start_backend,
    wait_until,
)

reactor: Any = _global_reactor
MINUTE = datetime.timedelta(minutes=1)
HOUR = datetime.timedelta(hours=1)


def now_utc() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def build_response(
    leaf: Issued,
    ca: Issued,
    status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
    this_update: Optional[datetime.datetime] = None,
    next_update: Optional[datetime.datetime] = None,
    signer: Optional[Issued] = None,
    include: tuple[x509.Certificate, ...] = (),
) -> bytes:
    """
    An OCSP response about C{leaf}, issued by C{ca}, signed by C{signer}
    (default: the CA itself).
    """
    this_update = this_update or now_utc() - MINUTE
    signer = signer or ca
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=leaf.cert,
        issuer=ca.cert,
        algorithm=hashes.SHA1(),
        cert_status=status,
        this_update=this_update,
        next_update=next_update,
        revocation_time=this_update if status == ocsp.OCSPCertStatus.REVOKED else None,
        revocation_reason=None,
    )
    builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, signer.cert)
    if include:
        builder = builder.certificates(list(include))
    response = builder.sign(signer.key, hashes.SHA256())
    return response.public_bytes(Encoding.DER)


class Responder(Resource):
    """
    An OCSP responder on loopback whose answers the test chooses.

    @ivar mode: C{good}, C{garbage}, C{other} (about another certificate),
        C{hang} (never answers), C{huge} (more than L{MAX_RESPONSE} bytes),
        C{status} (HTTP 500).
    @ivar lifetime: the good responses' time to nextUpdate.
    """

    isLeaf = True

    def __init__(self, ca: Issued) -> None:
        super().__init__()
        self.ca = ca
        self.known: dict[int, Issued] = {}
        self.mode = "good"
        self.lifetime = HOUR
        self.requests = 0
        self.hanging: list[Any] = []
        self.port: Any = None

    def render_POST(self, request: Any) -> Any:
        self.requests += 1
        body = request.content.read()
        asked = ocsp.load_der_ocsp_request(body)
        leaf = self.known[asked.serial_number]
        request.setHeader(b"Content-Type", b"application/ocsp-response")
        if self.mode == "hang":
            self.hanging.append(request)
            return NOT_DONE_YET
        if self.mode == "garbage":
            return os.urandom(300)
        if self.mode == "huge":
            return b"\0" * (MAX_RESPONSE + 1)
        if self.mode == "status":
            request.setResponseCode(500)
            return b"oops"
        if self.mode == "other":
            return build_response(issue(self.ca), self.ca, next_update=now_utc() + self.lifetime)
        return build_response(leaf, self.ca, next_update=now_utc() + self.lifetime)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port.getHost().port}/ocsp"

    async def start(self, testcase: unittest.TestCase) -> None:
        site = server.Site(self)
        site.noisy = False
        self.port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(site)

        async def stop() -> None:
            for request in self.hanging:
                if not request.finished and not request._disconnected:
                    request.finish()
            if self.port.connected:
                await self.port.stopListening()

        testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))


def s_client_status(port: int, ca_file: str, name: str = "a.test") -> str:
    """
    What C{openssl s_client -status} prints of the server's staple.
    """
    return s_client(port, ca_file, "-status", name=name)


class StapledCase(TLSCase):
    """
    A CA, its responder on loopback and a site certificate naming it.
    """

    timeout = 60

    async def responder_and_site(self) -> tuple[Responder, Issued, Issued]:
        ca = make_ca("rrlb OCSP CA")
        responder = Responder(ca)
        await responder.start(self)
        site = issue(ca, names=["a.test"], ips=[LOOPBACK], ocsp_url=responder.url)
        responder.known[site.cert.serial_number] = site
        return responder, ca, site

    def stapling(self, site: Issued, ca: Issued) -> tuple[Clock, Stapler, Any]:
        """
        A started L{Stapler} on a L{Clock} at the real time, fetching over
        treq and tracking C{site}'s certificate; and the log capture.
        """
        clock = Clock()
        clock.advance(time.time())
        stapler = Stapler(clock, fetch=treq_fetch(reactor))
        logs = LogCapture.install(self)
        stapler.track([(site.cert, ca.cert)])
        stapler.startService()
        self.addCleanup(stapler.stopService)
        return clock, stapler, logs


class ListenerTests(StapledCase):
    """
    rrlb staples in real handshakes, as openssl s_client -status sees it.
    """

    async def balancer(self, ca: Issued, site: Issued, with_issuer: bool = True) -> Any:
        backend = await start_backend(self, "node")
        chain = site.cert_pem + (ca.cert_pem if with_issuer else b"")
        cert = self.write("site.pem", chain)
        key = self.write("site.key", site.key_pem)
        self.write("ocsp-ca.pem", ca.cert_pem)
        return await self.balancer_yaml(
            {
                "listen": ["ssl:0:interface=127.0.0.1"],
                "nodes": [backend.url],
                "health": {"path": "/health"},
                "tls": {"cert": cert, "key": key},
            }
        )

    async def test_staple_seen_by_openssl(self) -> None:
        """
        The responder's answer is stapled: s_client -status shows a
        successful response with the certificate good.
        """
        responder, ca, site = await self.responder_and_site()
        balancer = await self.balancer(ca, site)
        stapler = balancer.service.traffic.tls.stapler
        await wait_until(lambda: stapler.state()[0]["stapled"], what="a staple")
        out = await threads.deferToThread(
            s_client_status, balancer.port, os.path.join(self.dir, "ocsp-ca.pem")
        )
        self.assertIn("OCSP Response Status: successful", out)
        self.assertIn("Cert Status: good", out)
        self.assertEqual(responder.requests, 1)

    async def test_sni_certificate(self) -> None:
        """
        A certificate chosen by SNI gets its own staple: s_client asking for
        b.test sees a good response about that certificate.
        """
        responder, ca, site = await self.responder_and_site()
        other = issue(ca, names=["b.test"], ips=[], ocsp_url=responder.url)
        responder.known[other.cert.serial_number] = other
        backend = await start_backend(self, "node")
        cert = self.write("a.pem", site.cert_pem + ca.cert_pem)
        key = self.write("a.key", site.key_pem)
        b_cert = self.write("b.pem", other.cert_pem + ca.cert_pem)
        b_key = self.write("b.key", other.key_pem)
        ca_file = self.write("ocsp-ca.pem", ca.cert_pem)
        balancer = await self.balancer_yaml(
            {
                "nodes": [backend.url],
                "health": {"path": "/health"},
                "tls": {
                    "cert": cert,
                    "key": key,
                    "certificates": [{"cert": b_cert, "key": b_key}],
                },
            },
            "--listen",
            "ssl:0:interface=127.0.0.1",
        )
        stapler = balancer.service.traffic.tls.stapler
        await wait_until(
            lambda: [e["stapled"] for e in stapler.state()] == [True, True], what="two staples"
        )
        out = await threads.deferToThread(s_client_status, balancer.port, ca_file, "b.test")
        self.assertIn("Cert Status: good", out)
        # openssl writes the serial in whole bytes: a leading 0 nibble stays.
        serial = f"{other.cert.serial_number:X}"
        self.assertIn(f"Serial Number: {serial.zfill(len(serial) + len(serial) % 2)}", out)

    async def test_responder_down(self) -> None:
        """
        With the responder down, handshakes work without a staple and the
        failure is logged once.
        """
        responder, ca, site = await self.responder_and_site()
        await responder.port.stopListening()
        logs = LogCapture.install(self)
        balancer = await self.balancer(ca, site)
        await wait_until(
            lambda: any("OCSP: cannot staple" in m for m in logs.messages()), what="the log line"
        )
        out = await threads.deferToThread(
            s_client_status, balancer.port, os.path.join(self.dir, "ocsp-ca.pem")
        )
        self.assertIn("OCSP response: no response sent", out)
        self.assertIn("Verify return code: 0 (ok)", out)
        self.assertEqual(len([m for m in logs.messages() if "OCSP: cannot staple" in m]), 1)

    async def test_no_issuer_in_file(self) -> None:
        """
        A certificate naming a responder whose file lacks the issuer is
        served without a staple, and that is said once; nothing is fetched.
        """
        responder, ca, site = await self.responder_and_site()
        logs = LogCapture.install(self)
        balancer = await self.balancer(ca, site, with_issuer=False)
        self.assertEqual(len([m for m in logs.messages() if "holds no issuer" in m]), 1)
        # Nothing to fetch for: no entry, so no timer and no request, ever.
        self.assertEqual(balancer.service.traffic.tls.stapler.state(), [])


class StaplerTests(StapledCase):
    """
    The stapler on a task.Clock, fetching from the real responder.
    """

    async def stapler(self) -> tuple[Stapler, Clock, Responder, Issued, Issued]:
        responder, ca, site = await self.responder_and_site()
        clock = Clock()
        clock.advance(time.time())
        fetch = treq_fetch(reactor)
        # Fetches started, counted when they start (a request would reach
        # the responder only later).
        self.fetches: list[str] = []

        def counted(url: str, body: bytes) -> defer.Deferred[bytes]:
            self.fetches.append(url)
            return fetch(url, body)

        stapler = Stapler(clock, fetch=counted)
        stapler.track([(site.cert, ca.cert)])
        stapler.startService()
        self.addCleanup(stapler.stopService)
        return stapler, clock, responder, ca, site

    async def test_refresh_halfway(self) -> None:
        """
        A response valid for an hour is fetched again after half an hour,
        not before; the new one is stapled.
        """
        stapler, clock, responder, _, site = await self.stapler()
        key = fingerprint(site.cert)
        await wait_until(lambda: stapler.staple(key) != b"", what="the first staple")
        first = stapler.staple(key)
        clock.advance(HOUR.total_seconds() / 2 - 120)
        self.assertEqual(len(self.fetches), 1)
        # (a minute's slack: the response's times are the responder's clock)
        clock.advance(180)
        await wait_until(lambda: stapler.state()[0]["fetched"] == 2, what="the refresh")
        self.assertEqual(responder.requests, 2)
        self.assertNotEqual(stapler.staple(key), first)

    async def test_never_stale(self) -> None:
        """
        When the responder goes down, the last response is stapled until
        its nextUpdate and not a second longer; retries are not logged again.
        """
        stapler, clock, responder, _, site = await self.stapler()
        key = fingerprint(site.cert)
        await wait_until(lambda: stapler.staple(key) != b"", what="the first staple")
        logs = LogCapture.install(self)
        await responder.port.stopListening()
        clock.advance(HOUR.total_seconds() / 2 + 60)
        await wait_until(lambda: len(ocsp_lines(logs)) == 1, what="the failure")
        self.assertIn("the last response is stapled until its nextUpdate", ocsp_lines(logs)[0])
        self.assertNotEqual(stapler.staple(key), b"")
        expires = stapler.state()[0]["expires"]
        clock.advance(expires - clock.seconds() - 1)
        self.assertNotEqual(stapler.staple(key), b"")
        clock.advance(1)
        self.assertEqual(stapler.staple(key), b"")
        # Let the retries the clock passed run and fail.
        await wait_until(lambda: not _fetching(stapler), what="the retries to end")
        self.assertEqual(len(ocsp_lines(logs)), 1)

    async def test_hanging_responder(self) -> None:
        """
        A responder that never answers is given up on after the fetch
        timeout, its connection dropped, and nothing stapled.
        """
        responder, ca, site = await self.responder_and_site()
        responder.mode = "hang"
        clock, stapler, logs = self.stapling(site, ca)
        await wait_until(lambda: responder.hanging, what="the request to hang")
        clock.advance(FETCH_TIMEOUT)
        await wait_until(
            lambda: responder.hanging[0]._disconnected, what="the connection to be dropped"
        )
        self.assertIn("no answer within", ocsp_lines(logs)[0])
        self.assertEqual(stapler.staple(fingerprint(site.cert)), b"")

    async def test_bad_answers_not_stapled(self) -> None:
        """
        Garbage, a response about another certificate, one too large and an
        HTTP error are each refused with the reason, and nothing is stapled.
        """
        for mode, reason in [
            ("garbage", "not an OCSP response"),
            ("other", "about another certificate"),
            ("huge", "larger than"),
            ("status", "HTTP 500"),
        ]:
            responder, ca, site = await self.responder_and_site()
            responder.mode = mode
            _, stapler, logs = self.stapling(site, ca)
            await wait_until(lambda logs=logs: ocsp_lines(logs), what=f"the {mode} failure")
            self.assertIn(reason, ocsp_lines(logs)[0], mode)
            self.assertEqual(stapler.staple(fingerprint(site.cert)), b"", mode)

    async def test_forget_on_reload(self) -> None:
        """
        A certificate no longer served is no longer fetched for.
        """
        stapler, clock, responder, _, site = await self.stapler()
        await wait_until(lambda: stapler.state()[0]["fetched"] == 1, what="the first staple")
        stapler.track([])
        clock.advance(HOUR.total_seconds())
        self.assertEqual(len(self.fetches), 1)
        self.assertEqual(stapler.state(), [])


def ocsp_lines(logs: LogCapture) -> list[str]:
    return [m for m in logs.messages() if m.startswith("OCSP")]


def _fetching(stapler: Stapler) -> bool:
    return any(e.fetching is not None for e in stapler._entries.values())


class VerifyTests(unittest.TestCase):
    """
    What verify_response lets through.
    """

    def setUp(self) -> None:
        self.ca = make_ca("verify CA")
        self.leaf = issue(self.ca, ocsp_url="http://127.0.0.1:1/")
        self.now = time.time()

    def verify(self, der: bytes) -> Any:
        return verify_response(der, self.leaf.cert, self.ca.cert, self.now)

    def refused(self, der: bytes) -> str:
        with self.assertRaises(OCSPError) as caught:
            self.verify(der)
        return str(caught.exception)

    def test_good(self) -> None:
        """
        A response signed by the issuer, in date, is taken until its
        nextUpdate.
        """
        next_update = now_utc() + HOUR
        staple = self.verify(build_response(self.leaf, self.ca, next_update=next_update))
        self.assertLess(abs(staple.expires - next_update.timestamp()), 1.5)
        self.assertFalse(staple.revoked)

    def test_no_next_update(self) -> None:
        """
        Without nextUpdate a response is stapled for NO_NEXT_UPDATE seconds.
        """
        staple = self.verify(build_response(self.leaf, self.ca))
        self.assertLess(abs(staple.expires - (self.now + NO_NEXT_UPDATE)), 1.5)

    def test_revoked(self) -> None:
        """
        A verified revocation is stapled, marked as such.
        """
        staple = self.verify(
            build_response(
                self.leaf, self.ca, ocsp.OCSPCertStatus.REVOKED, next_update=now_utc() + HOUR
            )
        )
        self.assertTrue(staple.revoked)

    def test_refused(self) -> None:
        """
        Out of date, not yet valid, unknown, signed by a stranger, about
        another certificate, or garbage: each refused with its reason.
        """
        stranger = make_ca("stranger")
        past = now_utc() - 2 * HOUR
        cases = [
            (build_response(self.leaf, self.ca, this_update=past, next_update=past + HOUR),
             "out of date"),
            (build_response(self.leaf, self.ca, this_update=now_utc() + HOUR), "not valid yet"),
            (build_response(self.leaf, self.ca, ocsp.OCSPCertStatus.UNKNOWN),
             "does not know"),
            (build_response(self.leaf, self.ca, signer=stranger), "unknown responder"),
            (build_response(issue(self.ca), self.ca), "another certificate"),
            (b"\x30\x03\x0a\x01\x00", "not an OCSP response"),
            (ocsp.OCSPResponseBuilder.build_unsuccessful(
                ocsp.OCSPResponseStatus.TRY_LATER).public_bytes(Encoding.DER),
             "TRY_LATER"),
        ]  # fmt: skip
        for der, reason in cases:
            self.assertIn(reason, self.refused(der))

    def test_forged_signature(self) -> None:
        """
        A response naming the issuer as its responder but signed with
        another key does not verify.
        """
        der = bytearray(build_response(self.leaf, self.ca, next_update=now_utc() + HOUR))
        der[-1] ^= 1  # the last byte of the signature
        self.assertIn("signature does not verify", self.refused(bytes(der)))

    def test_delegated_responder(self) -> None:
        """
        A responder certificate the issuer made for OCSP signing may sign;
        one without that extended key usage, or from another CA, may not.
        """
        delegated = _responder_cert(self.ca, ocsp_signing=True)
        der = build_response(self.leaf, self.ca, signer=delegated, include=(delegated.cert,))
        self.assertFalse(self.verify(der).revoked)
        plain = _responder_cert(self.ca, ocsp_signing=False)
        der = build_response(self.leaf, self.ca, signer=plain, include=(plain.cert,))
        self.assertIn("did not delegate", self.refused(der))
        elsewhere = _responder_cert(make_ca("other"), ocsp_signing=True)
        der = build_response(self.leaf, self.ca, signer=elsewhere, include=(elsewhere.cert,))
        self.assertIn("did not delegate", self.refused(der))

    def test_request(self) -> None:
        """
        The request rrlb sends names the certificate's serial.
        """
        request = ocsp.load_der_ocsp_request(ocsp_request(self.leaf.cert, self.ca.cert))
        self.assertEqual(request.serial_number, self.leaf.cert.serial_number)


def _responder_cert(ca: Issued, ocsp_signing: bool) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "responder")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now_utc() - HOUR)
        .not_valid_after(now_utc() + 24 * HOUR)
    )
    if ocsp_signing:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False
        )
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))
