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

import os
import stat
from typing import Any, Optional

import yaml
from cryptography import x509

from tests.support import (
    ACME_NAME,
    LOOPBACK,
    Balancer,
    LogCapture,
    TLSCase,
    free_port,
    http_request,
    served_certificate,
    start_backend,
    start_daemon,
    start_balancer,
    start_pebble,
    start_server,
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
        await self.start(self.settings(pebble, challenge="http-01"))
        cert = await self.certificate()
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), [ACME_NAME])
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
        [line] = [m for m in logs.messages() if "failed" in m]
        self.assertIn("rejectedIdentifier", line)
        self.assertIn("retrying in 60s", line)
        self.assertNotIn("\n", line)
        cert, _ = await served_certificate(self.tls_port, ACME_NAME)
        assert cert is not None
        self.assertEqual(cert.serial_number, first.serial_number)
        self.assertTrue(acme._retry is not None and acme._retry.active())


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
        settings = {
            "listen": [f"tcp:0:interface={LOOPBACK}", f"ssl:{tls_port}:interface={LOOPBACK}"],
            "tls": {
                "acme": {
                    "directory": f"https://{LOOPBACK}:{free_port()}/dir",
                    "domains": [ACME_NAME],
                    "storage": os.path.join(self.dir, "acme"),
                }
            },
        }
        backend = await start_backend(self, "a")
        path = self.write("rrlb.yaml", yaml.safe_dump(settings).encode("utf-8"))
        balancer = await start_balancer(
            self,
            [backend.url],
            "--config",
            path,
            "--listen",
            settings["listen"][0],
            "--listen",
            settings["listen"][1],
        )
        acme = balancer.service.acme
        assert acme is not None
        await wait_until(lambda: acme.orders["error"], what="the failed order")
        response = await http_request(self, "GET", balancer.url + "/")
        self.assertEqual(response.code, 200)
        cert, _ = await served_certificate(tls_port, ACME_NAME)
        self.assertIsNone(cert)
        [line] = [m for m in logs.messages() if "ACME order" in m]
        self.assertIn("retrying in 60s", line)


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
        # Connections land on either worker: each one serves it.
        for _ in range(8):
            cert, _ = await served_certificate(self.tls_port, ACME_NAME)
            assert cert is not None
            self.assertEqual(cert.serial_number, first.serial_number)
        self.assertEqual(pebble.text.count("POST /order-plz"), 1)
        self.assertEqual(pebble.text.count("POST /sign-me-up"), 1)
