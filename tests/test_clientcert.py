"""
Client certificates (C{tls.client_auth}) over real loopback TLS, with
certificates issued here from CAs made with C{cryptography}: C{require} and
C{optional}, an expired certificate and one from another CA, the
C{X-Forwarded-Client-Cert} header the nodes get (and a client's own, which
is dropped), the subject in the access log, the CA file re-read on reload,
HTTP/2, and certificates holding what a header must not.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
from typing import Any, Optional

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import reactor as _global_reactor
from twisted.internet import threads
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS

from rrlb.clientcert import describe, describe_der
from rrlb.config import ConfigError, build_config
from tests.support import (
    DAY,
    LOOPBACK,
    NOW,
    Backend,
    H2Client,
    Issued,
    TLSCase,
    closed_port_url,
    issue,
    make_ca,
    start_backend,
    start_daemon,
    wait_until,
)

reactor: Any = _global_reactor
WAIT = 10.0


class HandshakeRefused(Exception):
    """
    The server ended the TLS connection before answering.
    """


def mtls_get(
    port: int,
    ca_file: str,
    cert_file: Optional[str] = None,
    head: bytes = b"",
    maximum: Optional[ssl.TLSVersion] = None,
    before_tls: bytes = b"",
) -> bytes:
    """
    One request with the standard library's TLS client, showing the
    certificate (and key) in C{cert_file} if given; returns the response.

    @raise HandshakeRefused: the server refused the handshake (under TLS
        1.3 the client learns it on its first read).
    """
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = False
    if maximum is not None:
        context.maximum_version = maximum
    if cert_file is not None:
        context.load_cert_chain(cert_file)
    try:
        with socket.create_connection((LOOPBACK, port), timeout=WAIT) as sock:
            sock.sendall(before_tls)
            with context.wrap_socket(sock, server_hostname="a.test") as tls:
                tls.sendall(
                    b"GET /mtls HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n" + head + b"\r\n"
                )
                response = b""
                while True:
                    data = tls.recv(65536)
                    if not data:
                        break
                    response += data
    except (ssl.SSLError, ConnectionError) as e:
        raise HandshakeRefused(str(e)) from None
    if not response:
        raise HandshakeRefused("closed without a response")
    return response


class ClientCertCase(TLSCase):
    """
    rrlb serving HTTPS with the site_a certificate and client_auth.
    """

    def setUp(self) -> None:
        super().setUp()
        self.clients_ca = make_ca("rrlb clients CA")
        self.alice = issue(
            self.clients_ca,
            names=["alice.example"],
            ips=[],
            uris=["spiffe://example.org/alice"],
            subject=x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example, Inc"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "alice"),
                ]
            ),
        )

    def client_file(self, name: str, issued: Issued) -> str:
        """
        A PEM file with C{issued}'s certificate and key, for a client.
        """
        return self.write(f"{name}.pem", issued.cert_pem + issued.key_pem)

    async def mtls_balancer(
        self, mode: str, *args: str, http2: bool = False, **extra: Any
    ) -> tuple[Any, Backend]:
        backend = await start_backend(self, "node")
        cert, key = self.write_pair("site", self.certs.site_a)
        ca = self.write("clients-ca.pem", self.clients_ca.cert_pem)
        settings = {
            "listen": ["ssl:0:interface=127.0.0.1"],
            "nodes": [backend.url],
            "health": {"path": "/health"},
            "tls": {"cert": cert, "key": key, "client_auth": {"ca_file": ca, "mode": mode}},
            **extra,
        }
        if http2:
            settings["http2"] = True
        balancer = await self.balancer_yaml(settings, *args)
        return balancer, backend

    def get(self, port: int, client: Optional[Issued] = None, **kwargs: Any) -> Any:
        cert_file = self.client_file("client", client) if client is not None else None
        return threads.deferToThread(mtls_get, port, self.ca_file, cert_file, **kwargs)


def expected_xfcc(issued: Issued) -> bytes:
    digest = hashlib.sha256(issued.cert.public_bytes(Encoding.DER)).hexdigest()
    return (
        b"Hash=" + digest.encode() + b';Subject="CN=alice,O=Example\\\\, Inc"'
        b";URI=spiffe://example.org/alice;DNS=alice.example"
    )


class RequireTests(ClientCertCase):
    """
    C{mode: require}: no handshake without a good certificate.
    """

    async def test_verified_certificate_reaches_node(self) -> None:
        """
        A client showing a certificate from the clients' CA is served, and
        the node gets X-Forwarded-Client-Cert in Envoy's format: the SHA-256
        of the DER in lowercase hex, the RFC 4514 subject quoted (its own
        escapes kept), the URI and DNS names.
        """
        balancer, backend = await self.mtls_balancer("require")
        response = await self.get(balancer.port, self.alice)
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:80])
        self.assertEqual(
            backend.requests[0].header(b"X-Forwarded-Client-Cert"), expected_xfcc(self.alice)
        )

    async def test_acceptable_ca_names(self) -> None:
        """
        The certificate request names the CAs of ca_file, as openssl
        s_client shows them.
        """
        balancer, _ = await self.mtls_balancer("require")
        client = self.client_file("client", self.alice)
        args = ["openssl", "s_client", "-connect", f"{LOOPBACK}:{balancer.port}"]
        args += ["-CAfile", self.ca_file, "-cert", client, "-key", client]
        done = await threads.deferToThread(
            subprocess.run, args, input=b"", capture_output=True, timeout=20
        )
        out = done.stdout.decode()
        self.assertIn("Acceptable client certificate CA names\nCN = rrlb clients CA\n", out)

    async def test_no_certificate_refused(self) -> None:
        """
        A client without a certificate fails the handshake; no node is asked.
        """
        balancer, backend = await self.mtls_balancer("require")
        for maximum in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            with self.assertRaises(HandshakeRefused):
                await self.get(balancer.port, maximum=maximum)
        self.assertEqual(backend.requests, [])

    async def test_expired_certificate_refused(self) -> None:
        """
        A certificate from the right CA that has expired fails the handshake.
        """
        balancer, backend = await self.mtls_balancer("require")
        expired = issue(self.clients_ca, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
        with self.assertRaises(HandshakeRefused) as caught:
            await self.get(balancer.port, expired)
        self.assertIn("expired", str(caught.exception))
        self.assertEqual(backend.requests, [])

    async def test_other_ca_refused(self) -> None:
        """
        A certificate from another CA (the one the site's own certificate
        comes from) fails the handshake.
        """
        balancer, backend = await self.mtls_balancer("require")
        stranger = issue(self.certs.ca, names=["mallory.example"], ips=[])
        with self.assertRaises(HandshakeRefused) as caught:
            await self.get(balancer.port, stranger)
        self.assertIn("unknown ca", str(caught.exception).lower())
        self.assertEqual(backend.requests, [])

    async def test_forged_header_replaced(self) -> None:
        """
        A client's own X-Forwarded-Client-Cert never reaches the node: rrlb
        sends its own instead.
        """
        balancer, backend = await self.mtls_balancer("require")
        forged = b'X-Forwarded-Client-Cert: Hash=00;Subject="CN=admin"\r\n'
        response = await self.get(balancer.port, self.alice, head=forged)
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:80])
        self.assertEqual(
            [v for n, v in backend.requests[0].headers if n.lower() == b"x-forwarded-client-cert"],
            [expected_xfcc(self.alice)],
        )

    async def test_trusted_proxy_header_kept(self) -> None:
        """
        From a peer in --trusted-proxies, its X-Forwarded-Client-Cert is kept
        and rrlb's element is appended after a comma (Envoy's
        APPEND_FORWARD).
        """
        balancer, backend = await self.mtls_balancer("require", "--trusted-proxies", "127.0.0.0/8")
        proxy_says = b'Hash=aa;Subject="CN=edge client"'
        await self.get(
            balancer.port, self.alice, head=b"X-Forwarded-Client-Cert: " + proxy_says + b"\r\n"
        )
        self.assertEqual(
            backend.requests[0].header(b"X-Forwarded-Client-Cert"),
            proxy_says + b"," + expected_xfcc(self.alice),
        )

    async def test_access_log_subject(self) -> None:
        """
        The access log gains the client's subject: client_cert_subject in
        both formats; a request without a certificate has none.
        """
        for fmt in ("combined", "json"):
            path = os.path.join(self.dir, f"access-{fmt}.log")
            balancer, _ = await self.mtls_balancer(
                "require", "--access-log", path, "--access-log-format", fmt
            )
            await self.get(balancer.port, self.alice)
            await balancer.stop()
            with open(path, "rb") as f:
                line = f.read()
            if fmt == "json":
                record = json.loads(line)
                self.assertEqual(record["client_cert_subject"], "CN=alice,O=Example\\, Inc")
            else:
                self.assertTrue(
                    line.endswith(b" client_cert_subject=CN=alice,O=Example\\x5C,\\x20Inc\n"), line
                )

    async def test_reload_rereads_ca_file(self) -> None:
        """
        A reload (what SIGHUP runs) reads ca_file again: after it names
        another CA, that CA's clients get in and the old one's do not.
        """
        balancer, backend = await self.mtls_balancer("require")
        await self.get(balancer.port, self.alice)
        new_ca = make_ca("rrlb next clients CA")
        bob = issue(new_ca, names=["bob.example"], ips=[])
        self.write("clients-ca.pem", new_ca.cert_pem)
        service = balancer.service
        assert service.load_config is not None
        service.apply(service.load_config())
        with self.assertRaises(HandshakeRefused):
            await self.get(balancer.port, self.alice)
        response = await self.get(balancer.port, bob)
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:80])
        self.assertEqual(len(backend.requests), 2)

    async def test_behind_proxy_protocol(self) -> None:
        """
        On a haproxy:ssl: listener, where the channel is made after the
        handshake (once the PROXY header is read), the certificate still
        reaches the node.
        """
        balancer, backend = await self.mtls_balancer(
            "require", "--listen", "haproxy:ssl:0:interface=127.0.0.1"
        )
        header = b"PROXY TCP4 127.8.9.10 127.0.0.1 5555 8080\r\n"
        response = await self.get(balancer.port, self.alice, before_tls=header)
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:80])
        self.assertEqual(
            backend.requests[0].header(b"X-Forwarded-Client-Cert"), expected_xfcc(self.alice)
        )
        self.assertEqual(backend.requests[0].header(b"X-Forwarded-For"), b"127.8.9.10")

    async def test_http2(self) -> None:
        """
        Over an HTTP/2 connection (ALPN h2) each stream's request carries
        the connection's X-Forwarded-Client-Cert, and a forged one is
        dropped.
        """
        balancer, backend = await self.mtls_balancer("require", http2=True)
        trust = Certificate(crypto.X509.from_cryptography(self.certs.ca.cert))
        mine = PrivateCertificate.loadPEM(self.alice.cert_pem + self.alice.key_pem)
        options = optionsForClientTLS(
            "a.test", trustRoot=trust, clientCertificate=mine, acceptableProtocols=[b"h2"]
        )
        endpoint = SSL4ClientEndpoint(reactor, LOOPBACK, balancer.port, options)
        client = await connectProtocol(endpoint, H2Client())
        self.addCleanup(client.transport.abortConnection)
        for _ in range(2):
            _, answer = client.request(
                b"GET", b"/h2", headers=((b"x-forwarded-client-cert", b"Hash=00"),)
            )
            await answer.done
            self.assertEqual(answer.headers[b":status"], b"200")
        self.assertEqual(
            [r.header(b"X-Forwarded-Client-Cert") for r in backend.requests],
            [expected_xfcc(self.alice)] * 2,
        )


class OptionalTests(ClientCertCase):
    """
    C{mode: optional}: a client may show no certificate.
    """

    async def test_without_certificate(self) -> None:
        """
        The handshake succeeds without a certificate; the node gets no
        X-Forwarded-Client-Cert, even one the client made up.
        """
        balancer, backend = await self.mtls_balancer("optional")
        response = await self.get(
            balancer.port, head=b'X-Forwarded-Client-Cert: Hash=00;Subject="CN=root"\r\n'
        )
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:80])
        self.assertIsNone(backend.requests[0].header(b"X-Forwarded-Client-Cert"))

    async def test_with_certificate(self) -> None:
        """
        A verified certificate is passed on as with require.
        """
        balancer, backend = await self.mtls_balancer("optional")
        await self.get(balancer.port, self.alice)
        self.assertEqual(
            backend.requests[0].header(b"X-Forwarded-Client-Cert"), expected_xfcc(self.alice)
        )

    async def test_bad_certificate_refused(self) -> None:
        """
        A certificate that is shown must verify: one from another CA fails
        the handshake even when certificates are optional.
        """
        balancer, backend = await self.mtls_balancer("optional")
        with self.assertRaises(HandshakeRefused):
            await self.get(balancer.port, issue(self.certs.ca))
        self.assertEqual(backend.requests, [])


class RouteTests(ClientCertCase):
    """
    The route condition client_cert.
    """

    async def test_route_by_certificate(self) -> None:
        """
        With optional client certificates, a route with client_cert: true
        takes the clients that showed one, client_cert: false those that did
        not.
        """
        certs = await start_backend(self, "certs")
        anon = await start_backend(self, "anon")
        balancer, _ = await self.mtls_balancer(
            "optional",
            pools={"certs": {"nodes": [certs.url]}, "anon": {"nodes": [anon.url]}},
            routes=[
                {"client_cert": True, "pool": "certs"},
                {"client_cert": False, "path_prefix": "/mtls", "pool": "anon"},
            ],
        )
        with_cert = await self.get(balancer.port, self.alice)
        without = await self.get(balancer.port)
        self.assertTrue(with_cert.endswith(b"certs"), with_cert[-80:])
        self.assertTrue(without.endswith(b"anon"), without[-80:])
        self.assertEqual((len(certs.requests), len(anon.requests)), (1, 1))

    def test_parse(self) -> None:
        """
        client_cert takes true or false, nothing else.
        """
        from rrlb.routeconfig import parse_routes

        routes = parse_routes([{"client_cert": True, "pool": "p"}])
        self.assertIs(routes[0].client_cert, True)
        with self.assertRaises(ConfigError) as caught:
            parse_routes([{"client_cert": "yes", "pool": "p"}])
        self.assertIn("routes[0].client_cert must be true or false", str(caught.exception))


class WorkersTests(ClientCertCase):
    """
    With --workers 2, each worker checks client certificates.
    """

    timeout = 120

    async def test_workers(self) -> None:
        """
        rrlb as a daemon with two workers: clients with a certificate are
        served and their header reaches the node; one without is refused.
        """
        backend = await start_backend(self, "node")
        # The daemon runs in the repository: absolute paths.
        cert, key = (os.path.abspath(p) for p in self.write_pair("site", self.certs.site_a))
        ca = os.path.abspath(self.write("clients-ca.pem", self.clients_ca.cert_pem))
        client_auth = {"ca_file": ca, "mode": "require"}
        settings = {
            "nodes": [backend.url],
            "health": {"path": "/health"},
            "tls": {"cert": cert, "key": key, "client_auth": client_auth},
        }
        config = os.path.abspath(self.write("workers.yaml", json.dumps(settings).encode()))
        port = int((await closed_port_url()).rsplit(":", 1)[1])
        listen = f"ssl:{port}:interface=127.0.0.1"
        daemon = await start_daemon(self, "--workers", "2", "--listen", listen, "--config", config)
        await daemon.wait_for_message("READY=1")
        for _ in range(4):
            response = await self.get(port, self.alice)
            self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:80])
        with self.assertRaises(HandshakeRefused):
            await self.get(port)
        self.assertEqual(
            [r.header(b"X-Forwarded-Client-Cert") for r in backend.requests],
            [expected_xfcc(self.alice)] * 4,
        )


class PlainTLSTests(ClientCertCase):
    """
    Without client_auth.
    """

    async def test_header_dropped_without_client_auth(self) -> None:
        """
        A client's X-Forwarded-Client-Cert is dropped when rrlb asks for no
        certificate at all, on TLS and plain listeners.
        """
        backend = await start_backend(self, "node")
        cert, key = self.write_pair("site", self.certs.site_a)
        balancer = await self.balancer_yaml(
            {
                "listen": ["ssl:0:interface=127.0.0.1"],
                "nodes": [backend.url],
                "health": {"path": "/health"},
                "tls": {"cert": cert, "key": key},
            }
        )
        await self.get(balancer.port, head=b"X-Forwarded-Client-Cert: Hash=00\r\n")
        self.assertIsNone(backend.requests[0].header(b"X-Forwarded-Client-Cert"))


class ConfigTests(TLSCase):
    """
    The setting, as the issue spells it, and its mistakes.
    """

    def config(self, client_auth: Any) -> Any:
        cert, key = self.write_pair("site", self.certs.site_a)
        text = json.dumps(
            {
                "nodes": ["http://127.0.0.1:9"],
                "listen": ["ssl:8443"],
                "tls": {"cert": cert, "key": key, "client_auth": client_auth},
            }
        )
        return build_config(self.write("c.yaml", text.encode()))

    def test_read(self) -> None:
        """
        tls.client_auth: {ca_file, mode} is read as given.
        """
        ca = self.write("ca.pem", self.certs.ca.cert_pem)
        config = self.config({"ca_file": ca, "mode": "optional"})
        assert config.tls.client_auth is not None
        self.assertEqual(
            (config.tls.client_auth.ca_file, config.tls.client_auth.mode), (ca, "optional")
        )

    def test_printed_back(self) -> None:
        """
        --print-config and GET /config write client_auth back as the file
        gave it, and reading that back gives the same configuration.
        """
        import yaml

        from rrlb.configdump import document

        ca = self.write("ca.pem", self.certs.ca.cert_pem)
        config = self.config({"ca_file": ca, "mode": "optional"})
        doc = document(config)
        self.assertEqual(doc["tls"]["client_auth"], {"ca_file": ca, "mode": "optional"})
        again = build_config(self.write("again.yaml", yaml.safe_dump(doc).encode()))
        self.assertEqual(again.tls, config.tls)

    def test_mistakes(self) -> None:
        """
        A wrong mode, a missing key or an unknown one is refused naming the
        setting.
        """
        for value, message in [
            ({"ca_file": "x.pem", "mode": "sometimes"}, "tls.client_auth.mode must be one of"),
            ({"ca_file": "x.pem"}, "tls.client_auth needs ca_file and mode"),
            ({"ca_file": "x.pem", "mode": "require", "depth": 2}, "tls.client_auth.depth"),
            ("require", "tls.client_auth must be a mapping"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                self.config(value)
            self.assertIn(message, str(caught.exception))

    def test_without_tls_listener(self) -> None:
        """
        client_auth with no listener rrlb serves TLS on (only plain ones, or
        one Twisted serves as given with sslmethod=) is refused: clients
        would get in without a certificate.
        """
        from rrlb.tls import check_tls

        ca = self.write("ca.pem", self.certs.ca.cert_pem)
        client_auth = {"ca_file": ca, "mode": "require"}
        plain = build_config(
            self.write(
                "plain.yaml",
                json.dumps(
                    {
                        "nodes": ["http://127.0.0.1:9"],
                        "listen": ["tcp:8080"],
                        "tls": {"client_auth": client_auth},
                    }
                ).encode(),
            )
        )
        with self.assertRaises(ConfigError) as caught:
            check_tls(plain)
        self.assertIn("tls.client_auth: no TLS listener", str(caught.exception))
        cert, key = self.write_pair("site", self.certs.site_a)
        twisted_tls = build_config(
            self.write(
                "twisted.yaml",
                json.dumps(
                    {
                        "nodes": ["http://127.0.0.1:9"],
                        "listen": [
                            f"ssl:8443:privateKey={key}:certKey={cert}:sslmethod=TLS_METHOD"
                        ],
                        "tls": {"client_auth": client_auth},
                    }
                ).encode(),
            )
        )
        with self.assertRaises(ConfigError) as caught:
            check_tls(twisted_tls)
        self.assertIn("would not check client certificates", str(caught.exception))

    def test_unreadable_ca_file(self) -> None:
        """
        A ca_file that cannot be read or holds no certificate stops rrlb at
        start-up with one line naming it.
        """
        from rrlb.tls import check_tls

        missing = os.path.join(self.dir, "missing.pem")
        config = self.config({"ca_file": missing, "mode": "require"})
        with self.assertRaises(ConfigError) as caught:
            check_tls(config)
        self.assertIn("tls.client_auth.ca_file: cannot read", str(caught.exception))
        config = self.config({"ca_file": self.write("junk.pem", b"junk"), "mode": "require"})
        with self.assertRaises(ConfigError) as caught:
            check_tls(config)
        self.assertIn("holds no PEM certificate", str(caught.exception))


class DescribeTests(TLSCase):
    """
    What a certificate that verified may still hold, written so that the
    header stays one well-formed line.
    """

    def test_hostile_names(self) -> None:
        """
        Control characters, quotes, separators and non-ASCII in the subject
        and names are escaped: the value is printable ASCII, the subject
        stays inside its quotes, and separators in a name are quoted.
        """
        ca = make_ca("hostile CA")
        hostile = issue(
            ca,
            names=["x;DNS=evil.example"],
            ips=[],
            uris=['spiffe://a/"b",c'],
            subject=x509.Name(
                [x509.NameAttribute(NameOID.COMMON_NAME, 'eve"\r\nX-Admin: 1;Hash=\u00e9')]
            ),
        )
        described = describe(hostile.cert)
        value = described.xfcc
        self.assertTrue(all(0x20 <= b < 0x7F for b in value), value)
        self.assertNotIn(b"\r", value)
        self.assertIn(b'DNS="x;DNS=evil.example"', value)
        self.assertIn(b'URI="spiffe://a/\\"b\\",c"', value)
        # The subject's quote is escaped (RFC 4514, then for the header).
        subject = value.split(b";Subject=", 1)[1]
        # (each RFC 4514 backslash escaped once more inside the quotes)
        self.assertTrue(subject.startswith(rb'"CN=eve\\\"\\0D\\0AX-Admin: 1\\;Hash=\\C3\\A9"'))
        self.assertTrue(described.subject.isprintable())

    def test_unreadable(self) -> None:
        """
        A certificate OpenSSL took but cryptography cannot read is passed on
        by its hash alone, with no subject.
        """
        der = b"\x30\x03\x02\x01\x00"
        described = describe_der(der)
        self.assertEqual(described.xfcc, b"Hash=" + hashlib.sha256(der).hexdigest().encode())
        self.assertEqual(described.subject, "")

    def test_many_names(self) -> None:
        """
        A certificate with thousands of names passes on the first 16 of each
        kind.
        """
        ca = make_ca("many names CA")
        many = issue(ca, names=[f"n{i}.example" for i in range(2000)], ips=[])
        value = describe(many.cert).xfcc
        self.assertEqual(value.count(b";DNS="), 16)


class HostileClientTests(ClientCertCase):
    """
    Clients that try to upset the handshake: the daemon serves on.
    """

    async def test_huge_chain_and_garbage(self) -> None:
        """
        A client sending a chain of 200 certificates, then one sending
        garbage where its certificate should be: each fails or is served,
        nothing is logged as an unhandled error, and a good client is
        served after them.
        """
        balancer, backend = await self.mtls_balancer("require")
        chain = [issue(self.clients_ca) for _ in range(200)]
        pem = self.alice.cert_pem + b"".join(c.cert_pem for c in chain) + self.alice.key_pem
        path = self.write("huge.pem", pem)
        try:
            await threads.deferToThread(mtls_get, balancer.port, self.ca_file, path)
        except HandshakeRefused:
            pass
        # A Certificate message of garbage: a TLS 1.2 record after the hello.
        sock = socket.create_connection((LOOPBACK, balancer.port), timeout=WAIT)
        self.addCleanup(sock.close)
        sock.sendall(b"\x16\x03\x03\x00\x10" + os.urandom(16))
        await threads.deferToThread(_read_until_closed, sock)
        response = await self.get(balancer.port, self.alice)
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:80])
        await wait_until(lambda: len(backend.requests) >= 1, what="the good request")
        # (trial fails the test if anything was logged as an unhandled error)


def _read_until_closed(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
