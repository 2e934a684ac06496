"""
Tests for L{rrlb.acme}: certificates from an ACME CA.

The protocol runs against a real CA, Debian's C{pebble} (Let's Encrypt's
test CA), started on loopback by each test: it validates on rrlb's listener
ports, and asks a twisted.names server on loopback where the names are
(127.0.0.1). The rest (renewal timing, backoff, storage, bad answers) runs
on a L{task.Clock} with the order's steps given by the test, or against a
misbehaving CA served by the test itself.
"""

from __future__ import annotations

import datetime
import hashlib
import html
import json
import os
import stat
from functools import partial
from typing import Any, Optional, Sequence

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from rrlb.acme import (
    ACME_IDENTIFIER,
    CHECK_INTERVAL,
    FIRST_RETRY,
    AcmeError,
    AcmeManager,
    Challenge,
    Order,
    challenge_certificate,
    new_key,
    place_order,
)
from rrlb.acmetls import ACME_TLS_ALPN, AcmeServing, AcmeState
from rrlb.config import build_config
from rrlb.settings import AcmeConfig
from rrlb.values import ConfigError
from tests.support import (
    ACME_NAME,
    ACME_WWW,
    ADMIN,
    LOOPBACK,
    AnyCertificate,
    Balancer,
    LogCapture,
    TLSCase,
    WireClient,
    admin_url,
    certs,
    free_port,
    http_request,
    reactor,
    samples,
    served_certificate,
    start_backend,
    start_balancer,
    start_daemon,
    start_pebble,
    start_server,
    track_connections,
    wait_for_value,
    wait_until,
)

# An order against pebble: account, order, validation, finalization.
ISSUE_TIMEOUT = 60.0


def issuer_name(cert: x509.Certificate) -> str:
    return cert.issuer.rfc4514_string()


class PebbleCase(TLSCase):
    """
    rrlb in this process, with C{tls: acme:} against a pebble of its own.
    """

    def setUp(self) -> None:
        super().setUp()
        # Absolute: rrlb as a process runs elsewhere.
        self.dir = os.path.abspath(self.dir)
        self.dns = start_server(self)
        self.http_port = free_port()
        self.tls_port = free_port()
        self.storage = os.path.join(self.dir, "acme")

    async def pebble(self, **kwargs: Any) -> Any:
        return await start_pebble(self, self.dns, self.http_port, self.tls_port, **kwargs)

    def settings(self, pebble: Any, **acme: Any) -> dict[str, Any]:
        return {
            "listen": [
                f"tcp:{self.http_port}:interface={LOOPBACK}",
                f"ssl:{self.tls_port}:interface={LOOPBACK}",
            ],
            "nodes": ["http://127.0.0.1:9"],
            "tls": {
                "acme": {
                    "directory": pebble.directory,
                    "email": "ops@rrlb.test",
                    "domains": [ACME_NAME],
                    "storage": self.storage,
                    "ca_file": pebble.ca_file,
                    **acme,
                }
            },
        }

    async def start(self, settings: dict[str, Any], *args: str) -> Balancer:
        path = self.write("rrlb.yaml", yaml.safe_dump(settings).encode("utf-8"))
        # The listeners on the command line too (start_balancer's default
        # would win over the file): the validation ports are fixed.
        listen = [arg for d in settings["listen"] for arg in ("--listen", d)]
        return await start_balancer(self, (), "--config", path, *listen, *args)

    async def certificate(self, name: str = ACME_NAME, serial: Optional[int] = None) -> Any:
        """
        Wait until the TLS listener serves a certificate for C{name} (other
        than the one with C{serial}), and return it.
        """

        async def served() -> Any:
            cert, _ = await served_certificate(self.tls_port, name)
            if cert is None or cert.serial_number == serial:
                return None
            return cert

        return await wait_for_value(served, f"a certificate for {name}", ISSUE_TIMEOUT)

    async def check_reported(self, balancer: Balancer, cert: x509.Certificate) -> None:
        """
        C{/metrics}, C{/status} and the status page tell of C{cert}.
        """
        acme = balancer.service.acme
        assert acme is not None
        await wait_until(lambda: acme.ordering is None, what="the order to finish")
        admin = await admin_url(balancer)
        metrics = await http_request(self, "GET", admin + "/metrics")
        found = samples(metrics.body.decode("utf-8"))
        end = cert.not_valid_after_utc.timestamp()
        expiry = ("rrlb_tls_certificate_expiry_seconds", (("name", ACME_NAME),))
        self.assertEqual(found[expiry], end)
        self.assertEqual(found[("rrlb_acme_orders_total", (("result", "ok"),))], 1)
        self.assertEqual(found[("rrlb_acme_orders_total", (("result", "error"),))], 0)
        status = await http_request(self, "GET", admin + "/status")
        [described] = json.loads(status.body)["certificates"]
        self.assertEqual(
            described,
            {
                "names": [ACME_NAME],
                "issuer": issuer_name(cert),
                "not_after": end,
                "source": "acme",
            },
        )
        page = await http_request(self, "GET", admin + "/", {b"Accept": [b"text/html"]})
        text = page.body.decode("utf-8")
        self.assertIn(f'<td class="names">{ACME_NAME}</td>', text)
        self.assertIn(html.escape(issuer_name(cert)), text)
        self.assertIn(f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC", text)

    async def everywhere(self, cert: x509.Certificate, count: int = 8) -> None:
        """
        Wait until C{count} handshakes in a row get C{cert}: connections
        land on either worker, and each one serves it.
        """

        async def all_of_them() -> bool:
            for _ in range(count):
                served, _ = await served_certificate(self.tls_port, ACME_NAME)
                if served is None or served.serial_number != cert.serial_number:
                    return False
            return True

        await wait_for_value(all_of_them, "every worker to serve the certificate")


class IssuanceTests(PebbleCase):
    """
    Certificates from pebble, with each challenge.
    """

    async def test_http01(self) -> None:
        """
        With C{challenge: http-01}, rrlb answers pebble's validation on its
        plain listener, and then serves the certificate by SNI on its TLS
        listener; the key and certificate are stored 0600 in a 0700
        directory it made.
        """
        pebble = await self.pebble()
        balancer = await self.start(self.settings(pebble, challenge="http-01"), "--admin", ADMIN)
        cert = await self.certificate()
        await self.check_reported(balancer, cert)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), [ACME_NAME])

    async def test_two_names(self) -> None:
        """
        C{domains} with two names: one order, each name validated, one
        certificate with both, served for either.
        """
        pebble = await self.pebble()
        await self.start(self.settings(pebble, domains=[ACME_NAME, ACME_WWW]))
        cert = await self.certificate()
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(sorted(names.get_values_for_type(x509.DNSName)), [ACME_NAME, ACME_WWW])
        other, _ = await served_certificate(self.tls_port, ACME_WWW)
        assert other is not None
        self.assertEqual(other.serial_number, cert.serial_number)
        self.assertEqual(pebble.text.count("POST /order-plz"), 1)
        self.assertIn("Pebble", issuer_name(cert))
        self.assertEqual(stat.S_IMODE(os.stat(self.storage).st_mode), 0o700)
        files = sorted(os.listdir(self.storage))
        self.assertEqual(files, ["account.key", "certificate.pem"])
        for name in files:
            mode = os.stat(os.path.join(self.storage, name)).st_mode
            self.assertEqual(stat.S_IMODE(mode), 0o600, name)

    async def test_tls_alpn01(self) -> None:
        """
        With C{challenge: tls-alpn-01}, rrlb answers pebble's validation
        handshake (ALPN C{acme-tls/1}) on its TLS listener with the RFC 8737
        challenge certificate, then serves the certificate.
        """
        logs = LogCapture.install(self)
        pebble = await self.pebble()
        await self.start(self.settings(pebble, challenge="tls-alpn-01"))
        cert = await self.certificate()
        self.assertIn("Pebble", issuer_name(cert))
        self.assertIn(f"ACME: answering tls-alpn-01 for {ACME_NAME}", logs.messages())


class RenewalTests(PebbleCase):
    """
    The stored certificate across restarts, renewal, and a CA that refuses.
    """

    async def issued(self, settings: dict[str, Any]) -> tuple[Balancer, Any]:
        balancer = await self.start(settings)
        cert = await self.certificate()
        acme = balancer.service.acme
        assert acme is not None
        await wait_until(lambda: acme.ordering is None, ISSUE_TIMEOUT, "the order to finish")
        return balancer, cert

    async def test_restart_reuses(self) -> None:
        """
        A restart with a valid certificate in storage serves it and places
        no new order.
        """
        pebble = await self.pebble()
        settings = self.settings(pebble)
        balancer, first = await self.issued(settings)
        await balancer.stop()
        logs = LogCapture.install(self)
        again = await self.start(settings)
        cert = await self.certificate()
        self.assertEqual(cert.serial_number, first.serial_number)
        acme = again.service.acme
        assert acme is not None
        # The check at start has run (it is synchronous) and found nothing due.
        self.assertIsNone(acme.ordering)
        self.assertEqual(acme.orders, {"ok": 0, "error": 0})
        self.assertFalse([m for m in logs.messages() if "ordering" in m])

    async def test_renew_before(self) -> None:
        """
        With C{renew_before} longer than the certificate's life, each check
        (here a reload, as on SIGHUP) renews it once: the new certificate is
        served, and no other order follows until the next check.
        """
        pebble = await self.pebble(validity=3600)
        balancer, first = await self.issued(self.settings(pebble, renew_before="2h"))
        acme = balancer.service.acme
        assert acme is not None
        self.assertEqual(acme.orders, {"ok": 1, "error": 0})
        self.assertTrue(balancer.service.reload())
        cert = await self.certificate(serial=first.serial_number)
        await wait_until(lambda: acme.ordering is None, ISSUE_TIMEOUT, "the order to finish")
        self.assertEqual(acme.orders, {"ok": 2, "error": 0})
        self.assertIsNone(acme.ordering)
        self.assertNotEqual(cert.serial_number, first.serial_number)
        # Still due, but only the next check (the 12-hour timer) orders.
        self.assertIsNotNone(acme.due())
        self.assertTrue(acme._retry is None or not acme._retry.active())

    async def test_refused(self) -> None:
        """
        An order the CA refuses is logged in one line naming the CA's error,
        with the retry; the stored certificate keeps serving.
        """
        pebble = await self.pebble()
        balancer, first = await self.issued(self.settings(pebble))
        await balancer.stop()
        logs = LogCapture.install(self)
        refusing = await start_pebble(self, self.dns, free_port(), free_port(), blocked=[ACME_NAME])
        settings = self.settings(refusing, renew_before="3650d")
        again = await self.start(settings)
        acme = again.service.acme
        assert acme is not None
        await wait_until(lambda: acme.orders["error"] == 1, ISSUE_TIMEOUT, "the refused order")
        [line] = [m for m in logs.messages() if "ACME order" in m]
        self.assertIn("rejectedIdentifier", line)
        self.assertIn("retrying in 60s", line)
        self.assertNotIn("\n", line)
        cert, _ = await served_certificate(self.tls_port, ACME_NAME)
        assert cert is not None
        self.assertEqual(cert.serial_number, first.serial_number)
        self.assertTrue(acme._retry is not None and acme._retry.active())


def out_of_reach(case: TLSCase, **tls: Any) -> str:
    """
    Write a YAML file whose C{tls: acme:} names a CA that cannot be reached
    (nothing listens on its port), with more C{tls} settings; its path.
    """
    acme = {
        "directory": f"https://{LOOPBACK}:{free_port()}/dir",
        "domains": [ACME_NAME],
        "storage": os.path.abspath(os.path.join(case.dir, "acme")),
    }
    data = yaml.safe_dump({"tls": {"acme": acme, **tls}}).encode("utf-8")
    return os.path.abspath(case.write("rrlb.yaml", data))


async def start_out_of_reach(case: TLSCase, tls_port: int, *args: str) -> Balancer:
    """
    rrlb in this process with L{out_of_reach}'s settings, a plain listener
    on port 0 and a TLS one on C{tls_port}, in front of a backend C{a}.
    """
    backend = await start_backend(case, "a")
    case.backend = backend  # type: ignore[attr-defined]
    return await start_balancer(
        case,
        [backend.url],
        "--config",
        out_of_reach(case),
        "--listen",
        f"tcp:0:interface={LOOPBACK}",
        "--listen",
        f"ssl:{tls_port}:interface={LOOPBACK}",
        *args,
    )


class BeforeTheFirstTests(TLSCase):
    """
    While no certificate has come (the CA cannot be reached at all).
    """

    async def test_plain_serves_tls_fails(self) -> None:
        """
        Plain listeners serve as usual; a handshake for one of the names
        fails; the failed order is logged and retried.
        """
        logs = LogCapture.install(self)
        tls_port = free_port()
        balancer = await start_out_of_reach(self, tls_port)
        acme = balancer.service.acme
        assert acme is not None
        await wait_until(lambda: acme.orders["error"], what="the failed order")
        response = await http_request(self, "GET", balancer.url + "/")
        self.assertEqual(response.code, 200)
        cert, _ = await served_certificate(tls_port, ACME_NAME)
        self.assertIsNone(cert)
        [line] = [m for m in logs.messages() if "ACME order" in m]
        self.assertIn("retrying in 60s", line)
        # A reload (SIGHUP) is a check, even one whose file is refused.
        with open(os.path.join(self.dir, "rrlb.yaml"), "w", encoding="utf-8") as f:
            f.write("tls: [")
        self.assertFalse(balancer.service.reload())
        await wait_until(lambda: acme.orders["error"] == 2, what="the order at the reload")

    async def test_ready(self) -> None:
        """
        rrlb as a process says C{READY=1} and serves while the CA cannot be
        reached.
        """
        backend = await start_backend(self, "a")
        path = out_of_reach(self)
        daemon = await start_daemon(self, "--config", path, "--nodes", backend.url)
        await daemon.wait_for_message("READY=1")
        response = await http_request(self, "GET", daemon.url + "/")
        self.assertEqual(response.code, 200)
        await daemon.wait_for_output("ACME order for site.rrlb.test failed")


class WorkersTests(PebbleCase):
    """
    ACME with C{--workers}.
    """

    async def test_two_workers(self) -> None:
        """
        With C{--workers 2} the main process places the one order (the
        http-01 token reaches the workers, which serve the plain listener),
        and every worker serves the certificate.
        """
        pebble = await self.pebble()
        settings = self.settings(pebble)
        path = self.write("rrlb.yaml", yaml.safe_dump(settings).encode("utf-8"))
        listen = [arg for d in settings["listen"] for arg in ("--listen", d)]
        daemon = await start_daemon(self, "--config", path, *listen, "--workers", "2")
        await daemon.wait_for_message("READY=1")
        first = await self.certificate()
        await self.everywhere(first)
        self.assertEqual(pebble.text.count("POST /order-plz"), 1)
        self.assertEqual(pebble.text.count("POST /sign-me-up"), 1)


# -- the manager on a clock, with the order's steps given by the test ------------------


def fake_chain(key_pem: bytes, names: Sequence[str], days: float = 90) -> bytes:
    """
    A chain for the key C{key_pem}: a leaf for C{names} valid for C{days}
    from now, issued by the test CA, and the CA.
    """
    key = serialization.load_pem_private_key(key_pem, password=None)
    ca = certs().ca
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return leaf.public_bytes(serialization.Encoding.PEM) + ca.cert_pem


class FakeCA:
    """
    The steps of an order, answered here: each call to C{place} or
    C{finish} is recorded and waits for the test (C{answer}), or answers
    at once with what the test set.
    """

    def __init__(self, challenge: str = "http-01") -> None:
        self.challenge = challenge
        self.placed: list[AcmeConfig] = []
        self.finished: list[Order] = []
        self.names: Optional[Sequence[str]] = None
        self.days = 90.0
        self.error: Optional[Exception] = None
        self.chain: Optional[bytes] = None

    def place(self, acme: AcmeConfig, account: bytes) -> Order:
        self.placed.append(acme)
        if self.error is not None:
            raise self.error
        challenge = Challenge(acme.domains[0], self.challenge, "tok", "tok.thumb", None)
        return Order(None, None, new_key(), [challenge])

    def finish(self, order: Order) -> bytes:
        self.finished.append(order)
        if self.chain is not None:
            return self.chain
        return fake_chain(order.key, list(self.names or ["a.test"]), self.days)


class ManagerTests(TLSCase):
    """
    L{AcmeManager} on a L{Clock}, its order's steps run at once.
    """

    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        # The certificates are made now; the clock starts there too.
        self.clock.advance(datetime.datetime.now(datetime.timezone.utc).timestamp())
        self.ca = FakeCA()
        self.states: list[AcmeState] = []
        self.storage = os.path.join(self.dir, "acme")
        self.logs = LogCapture.install(self)

    def manager(self, **acme: Any) -> AcmeManager:
        settings = AcmeConfig(
            **{
                "directory": "https://ca.test/dir",
                "domains": ("a.test",),
                "storage": self.storage,
                **acme,
            }
        )
        manager = AcmeManager(
            settings,
            self.clock,
            self.states.append,
            place=self.ca.place,
            finish=self.ca.finish,
            run=lambda work: defer.maybeDeferred(work),
        )
        self.addCleanup(lambda: manager.running and manager.stopService())
        return manager

    def errors(self) -> list[str]:
        return [m for m in self.logs.messages() if "ACME order" in m]

    def test_first_order(self) -> None:
        """
        At start with nothing stored, one order: its http-01 token is
        served while it runs, then the certificate, stored 0600 in a 0700
        directory; the next check finds nothing to do.
        """
        manager = self.manager()
        manager.startService()
        self.assertEqual(len(self.ca.placed), 1)
        self.assertIn((("tok", "tok.thumb"),), [s.tokens for s in self.states])
        state = self.states[-1]
        self.assertEqual(state.tokens, ())
        self.assertEqual(state.names, ("a.test",))
        self.assertTrue(state.chain.startswith(b"-----BEGIN CERTIFICATE-----"))
        self.assertEqual(manager.orders, {"ok": 1, "error": 0})
        self.assertEqual(stat.S_IMODE(os.stat(self.storage).st_mode), 0o700)
        for name in ("account.key", "certificate.pem"):
            mode = os.stat(os.path.join(self.storage, name)).st_mode
            self.assertEqual(stat.S_IMODE(mode), 0o600)
        self.assertEqual(sorted(os.listdir(self.storage)), ["account.key", "certificate.pem"])
        self.clock.advance(CHECK_INTERVAL)
        self.assertEqual(len(self.ca.placed), 1)

    def test_restart(self) -> None:
        """
        A new manager on the same storage serves the stored certificate
        and orders nothing.
        """
        first = self.manager()
        first.startService()
        first.stopService()
        chain = self.states[-1].chain
        self.states.clear()
        second = self.manager()
        second.startService()
        self.assertEqual(len(self.ca.placed), 1)
        self.assertEqual(self.states[0].chain, chain)

    def test_renewal_once_per_check(self) -> None:
        """
        With less than C{renew_before} left, the check at start and each
        12-hour check renew once; nothing orders between checks.
        """
        self.ca.days = 1
        manager = self.manager(renew_before=2 * 86400.0)
        manager.startService()
        self.assertEqual(len(self.ca.placed), 1)
        # Due again at once, but nothing happens until the next check.
        self.assertIsNotNone(manager.due())
        self.clock.advance(CHECK_INTERVAL - 1)
        self.assertEqual(len(self.ca.placed), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.ca.placed), 2)

    def test_default_renew_before(self) -> None:
        """
        Without C{renew_before}, a certificate is renewed with less than a
        third of its life left.
        """
        self.ca.days = 90
        manager = self.manager()
        manager.startService()
        self.assertIsNone(manager.due())
        self.clock.advance(59 * 86400)
        self.assertIsNone(manager.due())
        self.clock.advance(86400 + 3600)
        self.assertIsNotNone(manager.due())

    def test_backoff(self) -> None:
        """
        A failed order is logged in one line with the CA's error and
        retried after 60 s, then twice as long each time up to an hour; a
        success starts again from 60 s.
        """
        self.ca.error = AcmeError("urn:ietf:params:acme:error:serverInternal: down")
        manager = self.manager()
        manager.startService()
        delays = []
        for _ in range(8):
            call = manager._retry
            assert call is not None
            delays.append(call.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [60, 120, 240, 480, 960, 1920, 3600, 3600])
        self.assertEqual(manager.orders["error"], 9)
        line = self.errors()[0]
        self.assertIn("serverInternal: down; retrying in 60s", line)
        self.ca.error = None
        self.clock.advance(3600)
        self.assertEqual(manager.orders["ok"], 1)
        self.assertEqual(manager.retry_in, FIRST_RETRY)

    def test_one_order_at_a_time(self) -> None:
        """
        A check while an order is under way places no second one.
        """
        waiting: defer.Deferred[Any] = defer.Deferred()
        manager = self.manager()
        manager.run = lambda work: waiting.addCallback(lambda _: work())
        manager.startService()
        manager.check()
        manager.configure(manager.acme)
        self.assertEqual(self.ca.placed, [])
        waiting.callback(None)
        self.assertEqual(len(self.ca.placed), 1)

    def test_wrong_names(self) -> None:
        """
        A certificate for other names than those ordered is refused, the
        order counts as failed, and nothing is stored.
        """
        self.ca.names = ["evil.test"]
        manager = self.manager()
        manager.startService()
        self.assertEqual(manager.orders, {"ok": 0, "error": 1})
        self.assertIn("is for evil.test, not a.test", self.errors()[0])
        self.assertEqual(self.states[-1].chain, b"")
        self.assertFalse(os.path.exists(os.path.join(self.storage, "certificate.pem")))

    def test_garbage_certificate(self) -> None:
        """
        A chain that is not a certificate for the key is refused.
        """
        self.ca.chain = b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n"
        manager = self.manager()
        manager.startService()
        self.assertEqual(manager.orders, {"ok": 0, "error": 1})
        self.assertIn("cannot be used", self.errors()[0])

    def test_corrupt_storage(self) -> None:
        """
        A corrupt certificate file and account key are said in the log and
        replaced by a new order.
        """
        os.makedirs(self.storage, mode=0o700)
        for name in ("certificate.pem", "account.key"):
            with open(os.path.join(self.storage, name), "wb") as f:
                f.write(b"\x00garbage")
        manager = self.manager()
        manager.startService()
        self.assertEqual(manager.orders, {"ok": 1, "error": 0})
        messages = "\n".join(self.logs.messages())
        self.assertIn("certificate.pem is not a certificate and its key", messages)
        self.assertIn("account.key holds no usable key", messages)

    def test_storage_permissions(self) -> None:
        """
        A storage directory open to others is made 0700 (and said).
        """
        os.makedirs(self.storage)
        os.chmod(self.storage, 0o755)
        manager = self.manager()
        manager.startService()
        self.assertEqual(stat.S_IMODE(os.stat(self.storage).st_mode), 0o700)
        self.assertTrue([m for m in self.logs.messages() if "was mode 755" in m])

    def test_storage_unusable(self) -> None:
        """
        A storage path that cannot be a directory fails each order with one
        line, retried; nothing raises.
        """
        with open(os.path.join(self.dir, "file"), "wb"):
            pass
        self.storage = os.path.join(self.dir, "file", "acme")
        manager = self.manager()
        manager.startService()
        self.assertEqual(manager.orders, {"ok": 0, "error": 1})
        self.assertIn("tls.acme.storage", self.errors()[0])
        self.assertIn("retrying in 60s", self.errors()[0])


class SettingsTests(TLSCase):
    """
    C{tls: acme:} in the YAML file.
    """

    def load(self, acme: Any) -> Any:
        settings = {"nodes": ["http://127.0.0.1:9"], "tls": {"acme": acme}}
        path = self.write("rrlb.yaml", yaml.safe_dump(settings).encode("utf-8"))
        return build_config(path)

    def test_read(self) -> None:
        """
        Every key is read as the issue writes it; names are lower-cased.
        """
        config = self.load(
            {
                "directory": "https://acme.example/directory",
                "email": "ops@example.com",
                "domains": ["Example.com", "www.example.com"],
                "storage": "/var/lib/rrlb/acme",
                "challenge": "tls-alpn-01",
                "ca_file": "/etc/rrlb/acme-server-ca.pem",
                "renew_before": "30d",
            }
        )
        self.assertEqual(
            config.tls.acme,
            AcmeConfig(
                directory="https://acme.example/directory",
                email="ops@example.com",
                domains=("example.com", "www.example.com"),
                storage="/var/lib/rrlb/acme",
                challenge="tls-alpn-01",
                ca_file="/etc/rrlb/acme-server-ca.pem",
                renew_before=30 * 86400.0,
            ),
        )
        self.assertFalse(self.load({}).tls.acme.enabled)

    def test_errors(self) -> None:
        """
        A bad or missing value is one line naming the key.
        """
        good = {"directory": "https://ca.test/dir", "domains": ["a.test"], "storage": "/s"}
        cases = [
            ({**good, "directory": "ftp://x"}, "tls.acme.directory must be an https:// URL"),
            ({**good, "domains": []}, "tls.acme.domains: the names of the certificate"),
            ({**good, "domains": {"a": 1}}, "tls.acme.domains must be a list of DNS names"),
            ({**good, "domains": ["a b"]}, "tls.acme.domains: 'a b' is not a DNS name"),
            ({**good, "domains": ["*.a.test"]}, "tls.acme.domains: wildcard names need dns-01"),
            ({**good, "challenge": "dns-01"}, "tls.acme.challenge must be one of http-01"),
            ({**good, "renew_before": "soon"}, "tls.acme.renew_before must be a time"),
            ({**good, "renew_before": 0}, "tls.acme.renew_before must be a time"),
            ({**good, "email": "nobody"}, "tls.acme.email must be an e-mail address"),
            ({**good, "color": "red"}, "unknown setting tls.acme.color"),
            ({"domains": ["a.test"]}, "tls.acme.directory: "),
            ({**good, "domains": None}, "tls.acme.domains"),
            ({k: v for k, v in good.items() if k != "storage"}, "tls.acme.storage: "),
            ({k: v for k, v in good.items() if k != "domains"}, "tls.acme.domains: "),
            ("yes", "tls.acme must be a mapping"),
        ]
        for acme, message in cases:
            with self.assertRaises(ConfigError) as caught:
                self.load(acme)
            self.assertIn(message, str(caught.exception), acme)
            self.assertNotIn("\n", str(caught.exception))

    def test_printed(self) -> None:
        """
        C{--print-config}'s document (and C{GET /config}'s) holds C{tls.acme},
        and reads back as the same settings; without ACME too.
        """
        from rrlb.configdump import document

        acme = {
            "directory": "https://ca.test/dir",
            "email": "ops@example.com",
            "domains": ["a.test", "b.test"],
            "storage": "/var/lib/rrlb/acme",
            "challenge": "tls-alpn-01",
            "renew_before": "30d",
        }
        for config in (self.load(acme), self.load({})):
            printed = document(config)
            path = self.write("again.yaml", yaml.safe_dump(printed).encode("utf-8"))
            self.assertEqual(build_config(path).tls.acme, config.tls.acme)
        self.assertEqual(document(self.load(acme))["tls"]["acme"]["renew_before"], 30 * 86400.0)

    def test_ca_file_checked(self) -> None:
        """
        C{ca_file} is read at start-up (and reload), like every TLS file.
        """
        from rrlb.tls import check_tls

        config = self.load(
            {
                "directory": "https://ca.test/dir",
                "domains": ["a.test"],
                "storage": "/s",
                "ca_file": os.path.join(self.dir, "missing.pem"),
            }
        )
        with self.assertRaises(ConfigError) as caught:
            check_tls(config)
        self.assertIn("tls.acme.ca_file: cannot read", str(caught.exception))


class ServingTests(TLSCase):
    """
    L{AcmeServing} behind real listeners, fed states by the test (the CA
    cannot be reached: nothing else changes them).
    """

    async def balancer(self, *args: str) -> tuple[Balancer, int]:
        tls_port = free_port()
        return await start_out_of_reach(self, tls_port, *args), tls_port

    async def test_http01_paths(self) -> None:
        """
        A pending token's path gets its key authorization from rrlb on a
        plain listener; on a TLS one, any other path under the prefix, and
        the path after the token is gone, it goes to the nodes as usual.
        """
        balancer, port = await self.balancer()
        traffic = balancer.service.traffic
        key = new_key()
        chain = fake_chain(key, [ACME_NAME])
        pending = AcmeState(
            names=(ACME_NAME,), chain=chain, key=key, tokens=(("tok", "tok.thumb"),)
        )
        traffic.acme_update(pending)
        prefix = balancer.url + "/.well-known/acme-challenge/"
        answer = await http_request(self, "GET", prefix + "tok")
        self.assertEqual((answer.code, answer.body), (200, b"tok.thumb"))
        self.assertEqual(self.backend.requests, [])
        endpoint = wrapClientTLS(
            AnyCertificate(ACME_NAME), TCP4ClientEndpoint(reactor, LOOPBACK, port)
        )
        secure = await connectProtocol(endpoint, WireClient())
        self.addCleanup(secure.close)
        secure.send(b"GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: a\r\n\r\n")
        over_tls = await secure.response()
        assert over_tls is not None
        self.assertEqual(over_tls.body, b"a")
        other = await http_request(self, "GET", prefix + "other")
        self.assertEqual(other.body, b"a")
        traffic.acme_update(AcmeState(names=(ACME_NAME,)))
        gone = await http_request(self, "GET", prefix + "tok")
        self.assertEqual(gone.body, b"a")
        self.assertEqual(
            [r.path for r in self.backend.requests],
            [
                b"/.well-known/acme-challenge/tok",
                b"/.well-known/acme-challenge/other",
                b"/.well-known/acme-challenge/tok",
            ],
        )

    async def test_tls_alpn01_challenge(self) -> None:
        """
        A ClientHello for a pending name offering C{acme-tls/1} gets the
        RFC 8737 challenge certificate (the name in its SAN, the critical
        acmeIdentifier extension with the key authorization's SHA-256);
        without C{acme-tls/1} the handshake fails (no certificate yet), as
        it does for a name with no challenge pending.
        """
        balancer, port = await self.balancer()
        cert_pem, key_pem = challenge_certificate(ACME_NAME, "tok.thumb")
        balancer.service.traffic.acme_update(
            AcmeState(names=(ACME_NAME,), alpn=((ACME_NAME, cert_pem, key_pem),))
        )
        cert, protocol = await served_certificate(port, ACME_NAME, [ACME_TLS_ALPN])
        assert cert is not None
        self.assertEqual(protocol, ACME_TLS_ALPN)
        extension = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER)
        self.assertTrue(extension.critical)
        digest = hashlib.sha256(b"tok.thumb").digest()
        self.assertEqual(extension.value.value, b"\x04\x20" + digest)
        self.assertEqual(
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value,
            x509.SubjectAlternativeName([x509.DNSName(ACME_NAME)]),
        )
        self.assertEqual(await served_certificate(port, ACME_NAME), (None, None))
        self.assertEqual(
            await served_certificate(port, "other.rrlb.test", [ACME_TLS_ALPN]), (None, None)
        )
        # Nothing else is served on a validation connection: rrlb closes it.
        endpoint = wrapClientTLS(
            AnyCertificate(ACME_NAME, [ACME_TLS_ALPN]), TCP4ClientEndpoint(reactor, LOOPBACK, port)
        )
        client = await connectProtocol(endpoint, WireClient())
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        await wait_until(lambda: client.closed, what="rrlb to close the validation connection")
        self.assertEqual(bytes(client.data), b"")
        self.assertEqual(self.backend.requests, [])

    async def test_alpn(self) -> None:
        """
        On the ACME certificate, ALPN offers what the site offers: h2 with
        C{--http2}.
        """
        balancer, port = await self.balancer("--http2")
        key = new_key()
        chain = fake_chain(key, [ACME_NAME])
        balancer.service.traffic.acme_update(AcmeState(names=(ACME_NAME,), chain=chain, key=key))
        cert, protocol = await served_certificate(port, ACME_NAME, [b"h2", b"http/1.1"])
        self.assertIsNotNone(cert)
        self.assertEqual(protocol, b"h2")

    async def test_swap(self) -> None:
        """
        A new certificate is served to new handshakes at once; a connection
        open before keeps working.
        """
        balancer, port = await self.balancer()
        traffic = balancer.service.traffic
        key = new_key()
        chain = fake_chain(key, [ACME_NAME])
        traffic.acme_update(AcmeState(names=(ACME_NAME,), chain=chain, key=key))
        first, _ = await served_certificate(port, ACME_NAME)
        assert first is not None
        endpoint = wrapClientTLS(
            AnyCertificate(ACME_NAME), TCP4ClientEndpoint(reactor, LOOPBACK, port)
        )
        open_before = await connectProtocol(endpoint, WireClient())
        self.addCleanup(open_before.close)
        open_before.send(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
        before = await open_before.response()
        assert before is not None
        key2 = new_key()
        traffic.acme_update(
            AcmeState(names=(ACME_NAME,), chain=fake_chain(key2, [ACME_NAME]), key=key2)
        )
        second, _ = await served_certificate(port, ACME_NAME)
        assert second is not None
        self.assertNotEqual(first.serial_number, second.serial_number)
        open_before.send(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        after = await open_before.response()
        assert after is not None
        self.assertEqual((after.code, after.body), (200, b"a"))


# -- a CA that misbehaves ---------------------------------------------------------------


class BadCA(Resource):
    """
    An "ACME server" on plain HTTP that answers every request the way
    C{mode} says: C{hang} (never), C{garbage} (JSON that is not),
    C{huge} (a 2 MiB body) or C{problem} (a directory, then a problem
    document for everything else).
    """

    isLeaf = True

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.requests = 0
        self.port: Any = None

    def render(self, request: Any) -> Any:
        self.requests += 1
        if self.mode == "hang":
            return NOT_DONE_YET
        request.setHeader(b"Content-Type", b"application/json")
        if self.mode == "garbage":
            return b'{"newNonce": [1, 2, {'
        if self.mode == "huge":
            return b"[" + b"1," * (1 << 20) + b"1]"
        base = f"http://{LOOPBACK}:{self.port.getHost().port}"
        if request.path == b"/dir":
            return json.dumps(
                {k: f"{base}/{k}" for k in ("newNonce", "newAccount", "newOrder", "revokeCert")}
            ).encode("ascii")
        request.setHeader(b"Replay-Nonce", b"bm9uY2U")
        if request.path == b"/newNonce":
            return b""
        request.setResponseCode(500)
        request.setHeader(b"Content-Type", b"application/problem+json")
        return b'{"type": "urn:ietf:params:acme:error:serverInternal", "detail": "on fire"}'


class BadCATests(TLSCase):
    """
    The real client against CAs that misbehave: every order fails with one
    line, and is retried; nothing raises, and nothing else stops.
    """

    async def order(self, mode: str) -> tuple[AcmeManager, str]:
        ca = BadCA(mode)
        site = Site(ca)
        tracker = track_connections(site)
        ca.port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(site)
        self.addCleanup(ca.port.stopListening)
        self.addCleanup(tracker.close_all)
        logs = LogCapture.install(self)
        settings = AcmeConfig(
            directory=f"http://{LOOPBACK}:{ca.port.getHost().port}/dir",
            domains=("a.test",),
            storage=os.path.join(self.dir, "acme"),
        )
        states: list[AcmeState] = []
        manager = AcmeManager(
            settings, reactor, states.append, place=partial(place_order, timeout=1.0)
        )
        manager.startService()
        self.addCleanup(manager.stopService)
        await wait_until(lambda: manager.orders["error"], 15.0, "the order to fail")
        [line] = [m for m in logs.messages() if "ACME order" in m]
        self.assertNotIn("\n", line)
        self.assertIn("retrying in 60s", line)
        self.assertTrue(manager._retry is not None and manager._retry.active())
        self.assertEqual(states[-1].chain, b"")
        return manager, line

    async def test_hang(self) -> None:
        """
        A CA that never answers: the order gives up after the timeout.
        """
        _, line = await self.order("hang")
        self.assertIn("timed out", line)

    async def test_garbage(self) -> None:
        """
        A CA that answers broken JSON.
        """
        _, line = await self.order("garbage")
        self.assertIn("ACME order for a.test failed", line)

    async def test_huge(self) -> None:
        """
        A CA whose answer is too big: it is not read past 1 MiB.
        """
        _, line = await self.order("huge")
        self.assertIn("an answer over 1048576 bytes", line)

    async def test_problem(self) -> None:
        """
        A CA's problem document is named in the line.
        """
        _, line = await self.order("problem")
        self.assertIn("serverInternal: on fire", line)

    async def test_serving_while_it_hangs(self) -> None:
        """
        While an order hangs on the CA, rrlb serves its plain listener.
        """
        ca = BadCA("hang")
        site = Site(ca)
        tracker = track_connections(site)
        ca.port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(site)
        self.addCleanup(ca.port.stopListening)
        self.addCleanup(tracker.close_all)
        backend = await start_backend(self, "a")
        settings = {
            "tls": {
                "acme": {
                    "directory": f"http://{LOOPBACK}:{ca.port.getHost().port}/dir",
                    "domains": [ACME_NAME],
                    "storage": os.path.join(self.dir, "acme"),
                }
            }
        }
        balancer = await self.balancer_yaml(settings, "--nodes", backend.url)
        await wait_until(lambda: ca.requests, what="the order to reach the CA")
        acme = balancer.service.acme
        assert acme is not None
        self.assertIsNotNone(acme.ordering)
        for _ in range(3):
            response = await http_request(self, "GET", balancer.url + "/")
            self.assertEqual(response.code, 200)
        self.assertIsNotNone(acme.ordering)


class ReportTests(TLSCase):
    """
    C{/metrics} and C{/status} on the certificates of files, without ACME.
    """

    async def test_file_certificates(self) -> None:
        """
        Every certificate a listener serves from a file has its names'
        expiry in C{rrlb_tls_certificate_expiry_seconds}; without ACME there
        is no C{rrlb_acme_orders_total}.
        """
        cert, key = self.write_pair("site", self.certs.node)
        other_cert, other_key = self.write_pair("b", self.certs.site_b)
        settings = {
            "listen": [f"ssl:0:interface={LOOPBACK}"],
            "tls": {
                "cert": cert,
                "key": key,
                "certificates": [{"cert": other_cert, "key": other_key}],
            },
        }
        backend = await start_backend(self, "a")
        balancer = await self.balancer_yaml(settings, "--nodes", backend.url, "--admin", ADMIN)
        admin = await admin_url(balancer)
        found = samples((await http_request(self, "GET", admin + "/metrics")).body.decode())
        expiry = {
            labels[0][1]: value
            for (name, labels), value in found.items()
            if name == "rrlb_tls_certificate_expiry_seconds"
        }
        node_end = self.certs.node.cert.not_valid_after_utc.timestamp()
        b_end = self.certs.site_b.cert.not_valid_after_utc.timestamp()
        self.assertEqual(expiry, {"localhost": node_end, "b.test": b_end, "*.b.test": b_end})
        self.assertFalse([k for k in found if k[0].startswith("rrlb_acme")])
        status = json.loads((await http_request(self, "GET", admin + "/status")).body)
        self.assertEqual(
            [(c["names"], c["source"]) for c in status["certificates"]],
            [(["localhost"], "file"), (["b.test", "*.b.test"], "file")],
        )


class ServingStateTests(TLSCase):
    """
    L{AcmeServing} given states that cannot be used.
    """

    def test_bad_state(self) -> None:
        """
        A certificate or challenge that cannot be read is said in the log;
        the certificate served before stays, and nothing raises.
        """
        logs = LogCapture.install(self)
        serving = AcmeServing()
        key = new_key()
        serving.update(AcmeState(names=("a.test",), chain=fake_chain(key, ["a.test"]), key=key))
        context = serving.context
        self.assertIsNotNone(context)
        self.assertIs(serving.context_for("a.test"), context)
        serving.update(
            AcmeState(
                names=("a.test",),
                chain=b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                key=key,
                alpn=(("a.test", b"not a certificate", b"not a key"),),
            )
        )
        self.assertIs(serving.context, context)
        self.assertEqual(serving.alpn, {})
        errors = [m for m in logs.messages() if "not served" in m]
        self.assertEqual(len(errors), 2)
        self.assertIsNone(serving.context_for("b.test"))


class SighupTests(PebbleCase):
    """
    C{SIGHUP} to rrlb as a process with workers is a renewal check.
    """

    async def test_sighup_renews(self) -> None:
        """
        With C{renew_before} longer than the certificate's life, C{SIGHUP}
        renews it once, and every worker serves the new one.
        """
        pebble = await self.pebble(validity=3600)
        settings = self.settings(pebble, renew_before="2h", challenge="tls-alpn-01")
        path = self.write("rrlb.yaml", yaml.safe_dump(settings).encode("utf-8"))
        listen = [arg for d in settings["listen"] for arg in ("--listen", d)]
        daemon = await start_daemon(self, "--config", path, *listen, "--workers", "2")
        await daemon.wait_for_message("READY=1")
        first = await self.certificate()
        await daemon.wait_for_output("ACME: new certificate")
        daemon.signal("HUP")
        second = await self.certificate(serial=first.serial_number)
        await self.everywhere(second)
        self.assertEqual(pebble.text.count("POST /order-plz"), 2)


class ShutdownTests(TLSCase):
    """
    An order under way when rrlb stops.
    """

    def test_failure_after_stop(self) -> None:
        """
        An order that fails once its manager has stopped (its thread ran on)
        is neither logged as a failure nor retried.
        """
        logs = LogCapture.install(self)
        waiting: defer.Deferred[Any] = defer.Deferred()
        clock = Clock()
        manager = AcmeManager(
            AcmeConfig(
                directory="https://ca.test/dir",
                domains=("a.test",),
                storage=os.path.join(self.dir, "acme"),
            ),
            clock,
            lambda state: None,
            run=lambda work: waiting,
        )
        manager.startService()
        self.assertIsNotNone(manager.ordering)
        manager.stopService()
        waiting.errback(AcmeError("connection closed"))
        self.assertIsNone(manager.ordering)
        self.assertEqual(manager.orders, {"ok": 0, "error": 0})
        self.assertEqual([m for m in logs.messages() if "ACME order" in m], [])
        self.assertEqual(clock.getDelayedCalls(), [])


class ClientAuthTests(TLSCase):
    """
    ACME's certificate with C{tls.client_auth} (issue 22's mTLS).
    """

    async def test_require(self) -> None:
        """
        The ACME certificate's context asks for client certificates as the
        files' do; a tls-alpn-01 validation (which has none) still gets its
        challenge certificate.
        """
        ca_file = self.write("clients-ca.pem", self.certs.client_ca.cert_pem)
        path = out_of_reach(self, client_auth={"ca_file": ca_file, "mode": "require"})
        tls_port = free_port()
        backend = await start_backend(self, "a")
        balancer = await start_balancer(
            self,
            [backend.url],
            "--config",
            path,
            "--listen",
            f"ssl:{tls_port}:interface={LOOPBACK}",
        )
        traffic = balancer.service.traffic
        key = new_key()
        cert_pem, key_pem = challenge_certificate(ACME_NAME, "tok.thumb")
        state = AcmeState(
            names=(ACME_NAME,),
            chain=fake_chain(key, [ACME_NAME]),
            key=key,
            alpn=((ACME_NAME, cert_pem, key_pem),),
        )
        traffic.acme_update(state)
        assert traffic.acme is not None and traffic.acme.context is not None
        required = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        self.assertEqual(traffic.acme.context.get_verify_mode() & required, required)
        cert, protocol = await served_certificate(tls_port, ACME_NAME, [ACME_TLS_ALPN])
        assert cert is not None
        self.assertEqual(protocol, ACME_TLS_ALPN)
        self.assertTrue(cert.extensions.get_extension_for_oid(ACME_IDENTIFIER).critical)
