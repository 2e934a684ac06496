"""
TLS session resumption on rrlb's listeners, with C{openssl s_client}: a
session saved with C{-sess_out} is C{Reused} with C{-sess_in}, over TLS 1.2
and TLS 1.3, for a certificate chosen by SNI too, and with client
certificates (whose header still reaches the node on the resumed
connection); a reload starts new session caches.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from twisted.internet import threads

from tests.support import Backend, TLSCase, issue, make_ca, start_backend
from tests.support import s_client as openssl_s_client

REQUEST = b"GET /s HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"


def s_client(
    port: int,
    ca_file: str,
    version: str,
    session: str,
    resume: bool,
    name: str = "a.test",
    cert: Optional[str] = None,
) -> str:
    """
    One request with C{openssl s_client}, saving its session to C{session}
    or (C{resume}) offering the one saved there; returns what it printed.
    """
    options = [version, "-ign_eof", "-sess_in" if resume else "-sess_out", session]
    if cert is not None:
        options += ["-cert", cert, "-key", cert]
    return openssl_s_client(port, ca_file, *options, name=name, stdin=REQUEST)


def handshake(out: str) -> str:
    """
    C{New} or C{Reused}, as s_client's summary line says.
    """
    for line in out.splitlines():
        if line.startswith(("New, ", "Reused, ")):
            return line.split(",", 1)[0]
    raise AssertionError(f"no handshake line in {out!r}")


class ResumptionTests(TLSCase):
    """
    Returning clients skip the full handshake.
    """

    timeout = 60

    async def balancer(self, **tls: Any) -> tuple[Any, Backend]:
        backend = await start_backend(self, "node")
        cert, key = self.write_pair("a", self.certs.site_a)
        b_cert, b_key = self.write_pair("b", self.certs.site_b)
        balancer = await self.balancer_yaml(
            {
                "listen": ["ssl:0:interface=127.0.0.1"],
                "nodes": [backend.url],
                "health": {"path": "/health"},
                "tls": {
                    "cert": cert,
                    "key": key,
                    "certificates": [{"cert": b_cert, "key": b_key}],
                    **tls,
                },
            }
        )
        return balancer, backend

    async def twice(self, port: int, version: str, **kwargs: Any) -> tuple[str, str]:
        """
        A full handshake, then one offering its session: both summaries.
        """
        session = os.path.join(self.dir, f"session{version}.pem")
        first = await threads.deferToThread(
            s_client, port, self.ca_file, version, session, False, **kwargs
        )
        self.assertIn("HTTP/1.1 200 ", first)
        second = await threads.deferToThread(
            s_client, port, self.ca_file, version, session, True, **kwargs
        )
        self.assertIn("HTTP/1.1 200 ", second)
        return handshake(first), handshake(second)

    async def test_tls12_and_tls13(self) -> None:
        """
        A session from a full handshake is reused, over TLS 1.2 (session
        IDs) and TLS 1.3 (tickets naming the server's cache entry).
        """
        balancer, _ = await self.balancer()
        for version in ("-tls1_2", "-tls1_3"):
            self.assertEqual(await self.twice(balancer.port, version), ("New", "Reused"), version)

    async def test_sni_certificate(self) -> None:
        """
        A session with a certificate chosen by SNI is reused too.
        """
        balancer, _ = await self.balancer()
        for version in ("-tls1_2", "-tls1_3"):
            self.assertEqual(
                await self.twice(balancer.port, version, name="b.test"), ("New", "Reused"), version
            )

    async def test_client_certificate(self) -> None:
        """
        With client_auth, a resumed connection still tells the node the
        client's certificate (kept in the session).
        """
        clients = make_ca("resumption clients CA")
        alice = issue(clients, names=["alice.example"], ips=[])
        ca = self.write("clients.pem", clients.cert_pem)
        pem = self.write("alice.pem", alice.cert_pem + alice.key_pem)
        balancer, backend = await self.balancer(client_auth={"ca_file": ca, "mode": "require"})
        for version in ("-tls1_2", "-tls1_3"):
            self.assertEqual(
                await self.twice(balancer.port, version, cert=pem), ("New", "Reused"), version
            )
        headers = [r.header(b"X-Forwarded-Client-Cert") for r in backend.requests]
        self.assertEqual(len(headers), 4)
        self.assertEqual(len(set(headers)), 1)
        assert headers[0] is not None
        self.assertTrue(headers[0].startswith(b"Hash="))

    async def test_reload_new_cache(self) -> None:
        """
        A reload builds new contexts: a session from before it is not
        resumed (a full handshake, then resumption as usual).
        """
        balancer, _ = await self.balancer()
        session = os.path.join(self.dir, "before.pem")
        await threads.deferToThread(
            s_client, balancer.port, self.ca_file, "-tls1_2", session, False
        )
        service = balancer.service
        assert service.load_config is not None
        service.apply(service.load_config())
        out = await threads.deferToThread(
            s_client, balancer.port, self.ca_file, "-tls1_2", session, True
        )
        self.assertEqual(handshake(out), "New")
