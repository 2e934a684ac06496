"""
TLS on both sides of rrlb, over real loopback sockets with certificates the
tests make themselves (a trusted CA with node certificates for 127.0.0.1 and
localhost, a wrong-host one, an expired one, one from an unknown CA):

  - https nodes: verified chain and name, 502 and failed health checks with
    the reason in words, verify off, server_name, client certificates;
  - HTTPS listeners: Twisted's ssl: syntax, --tls-cert/--tls-key, YAML,
    X-Forwarded-Proto, TLS 1.2 minimum and no weak ciphers (checked with the
    standard library's ssl client in a thread), SNI, certificate reload.
"""

from __future__ import annotations

import os
import socket
import ssl
from typing import Any, Optional

import yaml
from cryptography import x509
from OpenSSL import crypto
from twisted.internet import defer, threads
from twisted.internet import reactor as _global_reactor
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.ssl import Certificate
from twisted.trial import unittest
from twisted.web import server
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from rrlb.config import ConfigError
from rrlb.tap import makeService
from rrlb.tls import split_description
from tests.support import (
    LOOPBACK,
    Backend,
    Balancer,
    Issued,
    LogCapture,
    TLSCase,
    balancer_options,
    https_get,
    issue,
    parse_error,
    start_backend,
    start_balancer,
    track_connections,
    wait_until,
)

reactor: Any = _global_reactor
WAIT = 10.0
# Health probes go to the recording backends' health path, not into their
# request lists.
PROBES = ("--health-path", "/health")


# -- certificates --------------------------------------------------------------


def stdlib_tls_get(
    port: int,
    ca_file: str,
    server_hostname: Optional[str] = None,
    maximum: Optional[ssl.TLSVersion] = None,
    minimum: Optional[ssl.TLSVersion] = None,
    ciphers: Optional[str] = None,
    check_name: bool = True,
) -> tuple[x509.Certificate, str, bytes]:
    """
    One request with the standard library's ssl client (run in a thread):
    returns the server's certificate, the TLS version and the response.
    """
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = check_name and server_hostname is not None
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    if ciphers is not None:
        context.set_ciphers(ciphers)
    with socket.create_connection((LOOPBACK, port), timeout=WAIT) as sock:
        with context.wrap_socket(sock, server_hostname=server_hostname) as tls:
            der = tls.getpeercert(binary_form=True)
            version = tls.version() or ""
            tls.sendall(b"GET /tls HTTP/1.1\r\nHost: rrlb.test\r\nConnection: close\r\n\r\n")
            response = b""
            while True:
                data = tls.recv(65536)
                if not data:
                    break
                response += data
    assert der is not None
    return x509.load_der_x509_certificate(der), version, response


def in_thread(*args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    return threads.deferToThread(stdlib_tls_get, *args, **kwargs)


# -- configuration ---------------------------------------------------------------


class TLSConfigTests(TLSCase):
    """
    The TLS settings on the command line and in YAML.
    """

    def yaml(self, settings: dict[str, Any]) -> str:
        return self.write("c.yaml", yaml.safe_dump(settings).encode("utf-8"))

    def test_yaml_settings(self) -> None:
        """
        Top-level tls: {cert, key, ca_file, certificates} and per node
        tls: {verify, ca_file, server_name, cert, key} are read; the top-level
        ca_file is the default of nodes without their own.
        """
        cert, key = self.write_pair("site", self.certs.site_a)
        b_cert, b_key = self.write_pair("b", self.certs.site_b)
        client_cert, client_key = self.write_pair("client", self.certs.client)
        other_ca = self.write("other-ca.pem", self.certs.other_ca.cert_pem)
        ca = self.ca_file
        path = self.yaml(
            {
                "listen": ["ssl:0:interface=127.0.0.1"],
                "tls": {
                    "cert": cert,
                    "key": key,
                    "ca_file": ca,
                    "certificates": [{"cert": b_cert, "key": b_key}],
                },
                "nodes": [
                    "https://127.0.0.1:9443",
                    {
                        "url": "https://127.0.0.1:9444",
                        "tls": {
                            "ca_file": other_ca,
                            "server_name": "node.test",
                            "cert": client_cert,
                            "key": client_key,
                        },
                    },
                    {"url": "https://127.0.0.1:9445", "tls": {"verify": False}},
                ],
            }
        )
        config = balancer_options("--config", path).config
        self.assertEqual((config.tls.cert, config.tls.key, config.tls.ca_file), (cert, key, ca))
        self.assertEqual(config.tls.certificates, ((b_cert, b_key),))
        first, second, third = config.nodes
        self.assertEqual(first.tls.ca_file, ca)
        self.assertTrue(first.tls.verify)
        self.assertEqual(second.tls.ca_file, other_ca)
        self.assertEqual(second.tls.server_name, "node.test")
        self.assertEqual((second.tls.cert, second.tls.key), (client_cert, client_key))
        self.assertFalse(third.tls.verify)

    def test_command_line_wins(self) -> None:
        """
        --tls-cert, --tls-key and --ca-file each override their YAML key, and
        --ca-file is the default CA of --nodes too, but a node's own ca_file wins.
        """
        cert, key = self.write_pair("site", self.certs.site_a)
        other_cert, other_key = self.write_pair("other", self.certs.site_b)
        ca = self.ca_file
        other_ca = self.write("other-ca.pem", self.certs.other_ca.cert_pem)
        path = self.yaml(
            {
                "tls": {"cert": other_cert, "key": other_key, "ca_file": other_ca},
                "nodes": [
                    "https://127.0.0.1:9443",
                    {"url": "https://127.0.0.1:9444", "tls": {"ca_file": other_ca}},
                ],
            }
        )
        config = balancer_options(
            "--config", path, "--tls-cert", cert, "--tls-key", key, "--ca-file", ca
        ).config
        self.assertEqual((config.tls.cert, config.tls.key, config.tls.ca_file), (cert, key, ca))
        self.assertEqual([n.tls.ca_file for n in config.nodes], [ca, other_ca])
        config = balancer_options("--nodes", "https://127.0.0.1:9443", "--ca-file", ca).config
        self.assertEqual(config.nodes[0].tls.ca_file, ca)

    def test_key_in_certificate_file(self) -> None:
        """
        --tls-cert alone works when the file holds the key as well.
        """
        both = self.write("both.pem", self.certs.site_a.cert_pem + self.certs.site_a.key_pem)
        options = balancer_options(
            "--listen", "ssl:0:interface=127.0.0.1", "--tls-cert", both, "--nodes", "http://x"
        )
        self.assertEqual(options.config.tls.key, None)

    def test_key_without_certificate(self) -> None:
        """
        --tls-key without --tls-cert is refused, naming both.
        """
        _, key = self.write_pair("site", self.certs.site_a)
        message = parse_error("--nodes", "http://x", "--tls-key", key)
        self.assertIn("--tls-key", message)
        self.assertIn("--tls-cert", message)

    def test_missing_files(self) -> None:
        """
        A certificate, key or CA file that cannot be read stops start-up with
        one line naming the setting and the file.
        """
        cert, key = self.write_pair("site", self.certs.site_a)
        missing = os.path.join(self.dir, "missing.pem")
        message = parse_error("--nodes", "http://x", "--tls-cert", missing, "--tls-key", key)
        self.assertIn("--tls-cert", message)
        self.assertIn("missing.pem", message)
        self.assertIn("No such file", message)
        message = parse_error("--nodes", "https://127.0.0.1:9443", "--ca-file", missing)
        self.assertIn("ca_file", message)
        self.assertIn("missing.pem", message)
        message = parse_error(
            "--nodes", "http://x", "--listen", f"ssl:0:privateKey={missing}:certKey={cert}"
        )
        self.assertIn("--listen", message)
        self.assertIn("missing.pem", message)
        self.assertNotIn("Traceback", message)
        message = parse_error("--nodes", "http://x", "--tls-cert", cert)
        self.assertIn("holds no private key", message)
        self.assertIn("--tls-key", message)

    def test_not_pem(self) -> None:
        """
        A file that holds no certificate is refused with a clear line.
        """
        junk = self.write("junk.pem", b"not a certificate\n")
        message = parse_error("--nodes", "https://127.0.0.1:9443", "--ca-file", junk)
        self.assertIn("holds no PEM certificate", message)

    def test_mismatched_key(self) -> None:
        """
        A key that does not belong to the certificate is refused.
        """
        cert, _ = self.write_pair("site", self.certs.site_a)
        _, other_key = self.write_pair("other", self.certs.site_b)
        message = parse_error("--nodes", "http://x", "--tls-cert", cert, "--tls-key", other_key)
        self.assertIn("does not match", message)

    def test_ssl_listener_needs_certificate(self) -> None:
        """
        An ssl: listener without privateKey= and without --tls-cert is
        refused with a line that says how to give one.
        """
        message = parse_error("--nodes", "http://x", "--listen", "ssl:8443")
        self.assertIn("--tls-cert", message)
        self.assertIn("privateKey=", message)

    def test_split_description(self) -> None:
        """
        Endpoint descriptions split the way Twisted splits them, escapes and all.
        """
        self.assertEqual(
            split_description(r"ssl:8443:privateKey=C\:\\k.pem:interface=\:\:1"),
            (["ssl", "8443"], {"privateKey": "C:\\k.pem", "interface": "::1"}),
        )
        self.assertEqual(split_description("tcp:port=80"), (["tcp"], {"port": "80"}))


# -- the node side ------------------------------------------------------------------


class NodeTLSTests(TLSCase):
    """
    https nodes: verified, and failing with the reason in words.
    """

    async def balancer_for(
        self, url: str, node_tls: Optional[dict[str, Any]] = None, **top: Any
    ) -> Balancer:
        node: Any = url if node_tls is None else {"url": url, "tls": node_tls}
        settings = {
            "listen": ["tcp:0:interface=127.0.0.1"],
            "nodes": [node],
            # The start-up probe and one request fail without taking the
            # node out, so the request sees the node's own failure (502).
            "health": {"path": "/health", "interval": 3600, "fall": 3, "rise": 1},
            **top,
        }
        return await self.balancer_yaml(settings)

    async def assert_refused(self, issued: Issued, reason: str) -> None:
        """
        A node presenting C{issued} gets 502 with C{reason} in the body and the
        log, and fails its health checks with C{reason}.
        """
        logs = LogCapture.install(self)
        backend, url, _ = await self.tls_backend(issued)
        balancer = await self.balancer_for(url, node_tls={"ca_file": self.ca_file})
        code, body, _ = await https_or_http_get(self, balancer.url + "/x")
        self.assertEqual(code, 502)
        self.assertIn(reason, body.decode())
        self.assertEqual(backend.requests, [])
        node = balancer.service.pool.nodes[0]
        await balancer.service.checker.probe(node)
        self.assertFalse(node.healthy)
        self.assertIn(reason, node.last_error or "")
        self.assertEqual(backend.probes, 0)
        down = [m for m in logs.messages() if "is down" in m]
        self.assertTrue(down, logs.messages())
        self.assertIn(reason, down[0])
        self.assertTrue(any(reason in m and "/x" in m for m in logs.messages()))

    async def test_trusted_node(self) -> None:
        """
        A node whose certificate chains to ca_file and names its address
        gets the request, over TLS, and passes its health checks.
        """
        backend, url, _ = await self.tls_backend(self.certs.node)
        balancer = await self.balancer_for(url, node_tls={"ca_file": self.ca_file})
        code, body, _ = await https_or_http_get(self, balancer.url + "/x")
        self.assertEqual((code, body), (200, b"node"))
        node = balancer.service.pool.nodes[0]
        await balancer.service.checker.probe(node)
        self.assertTrue(node.healthy)
        self.assertIsNone(node.last_error)
        self.assertGreaterEqual(backend.probes, 1)

    async def test_localhost_name(self) -> None:
        """
        A node addressed by DNS name is checked against the certificate's DNS names.
        """
        backend, _, _ = await self.tls_backend(self.certs.node)
        url = f"https://localhost:{backend.port_number}"
        balancer = await self.balancer_for(url, node_tls={"ca_file": self.ca_file})
        code, body, _ = await https_or_http_get(self, balancer.url + "/")
        self.assertEqual((code, body), (200, b"node"))

    async def test_ipv6_node(self) -> None:
        """
        A node at an IPv6 literal is checked against the certificate's IP
        addresses, for traffic and health checks.
        """
        issued = issue(self.certs.ca, names=["localhost"], ips=["::1"])
        backend = Backend("v6")
        site = server.Site(backend)
        site.noisy = False
        backend._tracker = track_connections(site)
        try:
            backend.port = await SSL4ServerEndpoint(
                reactor, 0, issued.options(), interface="::1"
            ).listen(site)
        except Exception as e:
            raise unittest.SkipTest(f"no IPv6 loopback here: {e}") from None
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(backend.stop()))
        url = f"https://[::1]:{backend.port_number}"
        balancer = await self.balancer_for(url, node_tls={"ca_file": self.ca_file})
        code, body, _ = await https_or_http_get(self, balancer.url + "/")
        self.assertEqual((code, body), (200, b"v6"))
        node = balancer.service.pool.nodes[0]
        await balancer.service.checker.probe(node)
        self.assertTrue(node.healthy, node.last_error)

    async def test_wrong_host(self) -> None:
        """
        A certificate for another name: 502, health down, "hostname mismatch".
        """
        await self.assert_refused(self.certs.wrong_host, "hostname mismatch")

    async def test_expired(self) -> None:
        """
        An expired certificate: 502, health down, "certificate has expired".
        """
        await self.assert_refused(self.certs.expired, "certificate has expired")

    async def test_unknown_ca(self) -> None:
        """
        A certificate from a CA not in ca_file: 502, health down, "unknown CA".
        """
        await self.assert_refused(self.certs.unknown, "unknown CA")

    async def test_system_trust_store_by_default(self) -> None:
        """
        Without a ca_file the system trust store is used, which does not
        know the test CA.
        """
        backend, url, _ = await self.tls_backend(self.certs.node)
        balancer = await self.balancer_for(url)
        code, body, _ = await https_or_http_get(self, balancer.url + "/")
        self.assertEqual(code, 502)
        self.assertIn("unknown CA", body.decode())

    async def test_global_ca_file(self) -> None:
        """
        The top-level tls.ca_file (--ca-file) verifies nodes without their own.
        """
        backend, url, _ = await self.tls_backend(self.certs.node)
        balancer = await self.balancer_for(url, tls={"ca_file": self.ca_file})
        code, _, _ = await https_or_http_get(self, balancer.url + "/")
        self.assertEqual(code, 200)
        other, other_url, _ = await self.tls_backend(self.certs.node, "other")
        balancer = await start_balancer(
            self, [other_url], "--ca-file", self.ca_file, "--health-interval", "3600"
        )
        code, body, _ = await https_or_http_get(self, balancer.url + "/")
        self.assertEqual((code, body), (200, b"other"))

    async def test_verify_off(self) -> None:
        """
        tls: {verify: false} reaches a node whose certificate would fail, and
        says so with a warning at start-up.
        """
        logs = LogCapture.install(self)
        backend, url, _ = await self.tls_backend(self.certs.unknown)
        balancer = await self.balancer_for(url, node_tls={"verify": False})
        code, body, _ = await https_or_http_get(self, balancer.url + "/")
        self.assertEqual((code, body), (200, b"node"))
        node = balancer.service.pool.nodes[0]
        await balancer.service.checker.probe(node)
        self.assertTrue(node.healthy)
        warnings = [m for m in logs.messages() if "verification is off" in m]
        self.assertEqual(len(warnings), 1, logs.messages())
        self.assertIn(url, warnings[0])

    async def test_server_name(self) -> None:
        """
        server_name is sent as SNI and is the name checked, for traffic and
        health checks alike; without it the same node fails the name check.
        """
        seen: list[Optional[bytes]] = []
        backend, url, tls = await self.tls_backend(self.certs.named)
        tls.getContext().set_tlsext_servername_callback(
            lambda connection: seen.append(connection.get_servername())
        )
        balancer = await self.balancer_for(
            url, node_tls={"ca_file": self.ca_file, "server_name": "node.test"}
        )
        code, body, _ = await https_or_http_get(self, balancer.url + "/")
        self.assertEqual((code, body), (200, b"node"))
        node = balancer.service.pool.nodes[0]
        await balancer.service.checker.probe(node)
        self.assertTrue(node.healthy)
        self.assertIn(b"node.test", seen)
        self.assertEqual(set(seen), {b"node.test"})

        other = await self.balancer_for(url, node_tls={"ca_file": self.ca_file})
        code, body, _ = await https_or_http_get(self, other.url + "/")
        self.assertEqual(code, 502)
        self.assertIn("hostname mismatch", body.decode())
        self.assertIn("node.test", body.decode())

    async def test_client_certificate(self) -> None:
        """
        A node that requires a client certificate refuses rrlb without one
        and serves it with tls: {cert, key}, seeing that certificate.
        """
        client_ca = Certificate(crypto.X509.from_cryptography(self.certs.client_ca.cert))
        backend, url, _ = await self.tls_backend(self.certs.node, trustRoot=client_ca)
        peers: list[Any] = []

        def handler(request: Any) -> bytes:
            peers.append(request.transport.getPeerCertificate())
            return b"mutual"

        backend.handler = handler
        without = await self.balancer_for(url, node_tls={"ca_file": self.ca_file})
        code, body, _ = await https_or_http_get(self, without.url + "/")
        self.assertEqual(code, 502)
        self.assertIn("TLS", body.decode())

        cert, key = self.write_pair("client", self.certs.client)
        balancer = await self.balancer_for(
            url, node_tls={"ca_file": self.ca_file, "cert": cert, "key": key}
        )
        code, body, _ = await https_or_http_get(self, balancer.url + "/")
        self.assertEqual((code, body), (200, b"mutual"))
        subject = peers[0].to_cryptography().subject
        self.assertEqual(subject, self.certs.client.cert.subject)
        node = balancer.service.pool.nodes[0]
        await balancer.service.checker.probe(node)
        self.assertTrue(node.healthy)

    async def test_creator_built_once(self) -> None:
        """
        A node's connection creator is built once and shared by traffic and
        the health checker's Agent; new connections reuse it.
        """
        backend, url, _ = await self.tls_backend(self.certs.node)
        balancer = await self.balancer_for(url, node_tls={"ca_file": self.ca_file})
        service = balancer.service
        node = service.pool.nodes[0]
        creator = service.traffic.tls.nodes(node)
        self.assertIs(service.traffic.tls.nodes(node), creator)
        self.assertIs(
            service.traffic.tls.nodes.policy.creatorForNetloc(
                LOOPBACK.encode("ascii"), backend.port_number
            ),
            creator,
        )
        for _ in range(3):
            code, _, _ = await https_or_http_get(self, balancer.url + "/")
            self.assertEqual(code, 200)
        self.assertIs(service.traffic.tls.nodes(node), creator)

    def test_context_shared_by_settings(self) -> None:
        """
        Nodes with the same CA and client settings share one OpenSSL context
        (read once); each still checks its own name.
        """
        from rrlb.config import parse_nodes
        from rrlb.nodetls import NodeTLSClients

        ca = self.ca_file
        specs = parse_nodes(
            [
                {"url": "https://127.0.0.1:9443", "tls": {"ca_file": ca}},
                {"url": "https://localhost:9444", "tls": {"ca_file": ca}},
                {"url": "https://127.0.0.1:9445", "tls": {"verify": False}},
            ]
        )
        clients = NodeTLSClients()
        clients.commit(clients.prepare(specs))
        first, second, third = (clients.for_netloc(s.host, s.port) for s in specs)
        assert first is not None and second is not None and third is not None
        self.assertEqual((first.name, second.name), ("127.0.0.1", "localhost"))
        self.assertIs(first._options, second._options)
        self.assertIsNot(first._options, third._options)

    async def test_ca_file_reload(self) -> None:
        """
        apply() re-reads ca_file: a node signed by a CA added to the file is
        trusted after a reload without a restart.
        """
        backend, url, _ = await self.tls_backend(self.certs.unknown)
        ca = self.ca_file
        balancer = await self.balancer_for(url, node_tls={"ca_file": ca})
        code, _, _ = await https_or_http_get(self, balancer.url + "/")
        self.assertEqual(code, 502)
        self.write("ca.pem", self.certs.ca.cert_pem + self.certs.other_ca.cert_pem)
        service = balancer.service
        assert service.load_config is not None
        service.apply(service.load_config())
        code, body, _ = await https_or_http_get(self, balancer.url + "/")
        self.assertEqual((code, body), (200, b"node"))


async def https_or_http_get(testcase: unittest.TestCase, url: str) -> tuple[int, bytes, Headers]:
    """
    A plain GET through twisted.web's Agent (to an http:// rrlb listener).
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    testcase.addCleanup(pool.closeCachedConnections)
    response = await Agent(reactor, pool=pool).request(b"GET", url.encode("ascii"))
    body = await readBody(response)
    return response.code, body, response.headers


# -- the listener side ----------------------------------------------------------------


class ListenerTLSTests(TLSCase):
    """
    HTTPS listeners: Twisted's ssl: syntax, the shortcuts, modern settings,
    SNI and certificate reload.
    """

    async def plain_backend(self) -> Backend:

        return await start_backend(self, "plain")

    async def site_a_balancer(self, backend: Backend, *listen: str) -> tuple[Any, str, str]:
        """
        rrlb in front of C{backend}, listening on each of C{listen} with the
        site_a certificate given as --tls-cert/--tls-key; returns the
        balancer and the certificate and key files.
        """
        cert, key = self.write_pair("site", self.certs.site_a)
        listeners = [arg for description in listen for arg in ("--listen", description)]
        balancer = await start_balancer(
            self, [backend.url], *PROBES, *listeners, "--tls-cert", cert, "--tls-key", key
        )
        return balancer, cert, key

    async def test_ssl_endpoint_syntax(self) -> None:
        """
        --listen ssl:PORT:privateKey=..:certKey=.. serves HTTPS, and the node
        is told X-Forwarded-Proto: https.
        """
        backend = await self.plain_backend()
        cert, key = self.write_pair("site", self.certs.site_a)
        balancer = await start_balancer(
            self,
            [backend.url],
            *PROBES,
            "--listen",
            f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        )
        code, body, _ = await https_get(
            self, f"https://{LOOPBACK}:{balancer.port}/p", self.certs.ca
        )
        self.assertEqual((code, body), (200, b"plain"))
        self.assertEqual(backend.requests[0].header(b"X-Forwarded-Proto"), b"https")

    async def test_tls_cert_shortcut(self) -> None:
        """
        --listen ssl:PORT with --tls-cert/--tls-key serves that certificate
        to a real TLS client (the standard library's), TLS 1.2 or newer.
        """
        backend = await self.plain_backend()
        balancer, cert, key = await self.site_a_balancer(backend, "ssl:0:interface=127.0.0.1")
        served, version, response = await in_thread(balancer.port, self.ca_file, "a.test")
        self.assertEqual(served.serial_number, self.certs.site_a.cert.serial_number)
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:100])
        self.assertTrue(response.endswith(b"plain"))
        self.assertEqual(backend.requests[0].header(b"X-Forwarded-Proto"), b"https")

    async def test_tcp_listener_with_certificate(self) -> None:
        """
        With --tls-cert and no ssl: listener, the tcp: listener serves TLS.
        """
        backend = await self.plain_backend()
        both = self.write("both.pem", self.certs.site_a.cert_pem + self.certs.site_a.key_pem)
        balancer = await start_balancer(
            self,
            [backend.url],
            *PROBES,
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--tls-cert",
            both,
        )
        code, body, _ = await https_get(self, f"https://{LOOPBACK}:{balancer.port}/", self.certs.ca)
        self.assertEqual((code, body), (200, b"plain"))
        self.assertEqual(backend.requests[0].header(b"X-Forwarded-Proto"), b"https")

    async def test_yaml_certificate(self) -> None:
        """
        YAML tls: {cert, key} gives ssl: listeners their certificate.
        """
        backend = await self.plain_backend()
        cert, key = self.write_pair("site", self.certs.site_a)
        balancer = await self.balancer_yaml(
            {
                "listen": ["ssl:0:interface=127.0.0.1"],
                "nodes": [backend.url],
                "health": {"path": "/health"},
                "tls": {"cert": cert, "key": key},
            }
        )
        code, body, _ = await https_get(self, f"https://{LOOPBACK}:{balancer.port}/", self.certs.ca)
        self.assertEqual((code, body), (200, b"plain"))

    async def test_plain_listener_beside_tls(self) -> None:
        """
        With both a tcp: and an ssl: listener, the tcp: one stays plain HTTP
        and says X-Forwarded-Proto: http.
        """
        backend = await self.plain_backend()
        balancer, _, _ = await self.site_a_balancer(
            backend, "tcp:0:interface=127.0.0.1", "ssl:0:interface=127.0.0.1"
        )
        code, _, _ = await https_or_http_get(self, balancer.url + "/")
        self.assertEqual(code, 200)
        self.assertEqual(backend.requests[0].header(b"X-Forwarded-Proto"), b"http")

    async def test_old_versions_and_weak_ciphers_refused(self) -> None:
        """
        TLS 1.1 and a CBC/SHA-1 cipher suite are refused; TLS 1.2 with an
        AEAD suite works.
        """
        backend = await self.plain_backend()
        balancer, _, _ = await self.site_a_balancer(backend, "ssl:0:interface=127.0.0.1")
        ca = self.ca_file
        _, version, _ = await in_thread(
            balancer.port,
            ca,
            maximum=ssl.TLSVersion.TLSv1_2,
            ciphers="ECDHE-ECDSA-AES128-GCM-SHA256",
        )
        self.assertEqual(version, "TLSv1.2")
        with self.assertRaises((ssl.SSLError, OSError)):
            await in_thread(
                balancer.port,
                ca,
                minimum=ssl.TLSVersion.TLSv1,
                maximum=ssl.TLSVersion.TLSv1_1,
                ciphers="ALL:@SECLEVEL=0",
            )
        with self.assertRaises((ssl.SSLError, OSError)):
            await in_thread(
                balancer.port,
                ca,
                maximum=ssl.TLSVersion.TLSv1_2,
                ciphers="ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA256",
            )

    async def test_sni(self) -> None:
        """
        With tls.certificates, a client asking for a name of another
        certificate (exact or wildcard) gets it; others get the default.
        """
        backend = await self.plain_backend()
        cert, key = self.write_pair("a", self.certs.site_a)
        b_cert, b_key = self.write_pair("b", self.certs.site_b)
        balancer = await self.balancer_yaml(
            {
                "listen": ["ssl:0:interface=127.0.0.1"],
                "nodes": [backend.url],
                "health": {"path": "/health"},
                "tls": {"cert": cert, "key": key, "certificates": [{"cert": b_cert, "key": b_key}]},
            }
        )
        ca = self.ca_file
        a = self.certs.site_a.cert.serial_number
        b = self.certs.site_b.cert.serial_number
        for name, serial in [
            ("b.test", b),
            ("x.b.test", b),
            ("a.test", a),
            ("c.test", a),
            (None, a),
        ]:
            # c.test has no certificate of its own: the default one is not
            # valid for it, which is what the client is shown.
            served, _, response = await in_thread(balancer.port, ca, name, check_name=False)
            self.assertEqual(served.serial_number, serial, name)
            if name in ("b.test", "x.b.test", "a.test"):
                self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:80])

    async def test_reload_shortcut_certificate(self) -> None:
        """
        After the certificate files are replaced, apply() (what SIGHUP runs)
        makes new handshakes serve the new certificate.
        """
        backend = await self.plain_backend()
        balancer, cert, key = await self.site_a_balancer(backend, "ssl:0:interface=127.0.0.1")
        ca = self.ca_file
        served, _, _ = await in_thread(balancer.port, ca)
        self.assertEqual(served.serial_number, self.certs.site_a.cert.serial_number)
        renewed = issue(self.certs.ca, names=["a.test"], ips=[LOOPBACK])
        self.write_pair("site", renewed)
        service = balancer.service
        assert service.load_config is not None
        service.apply(service.load_config())
        served, _, response = await in_thread(balancer.port, ca, "a.test")
        self.assertEqual(served.serial_number, renewed.cert.serial_number)
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "))

    async def test_reload_endpoint_syntax_certificate(self) -> None:
        """
        Certificates named in an ssl: description are re-read on apply() too.
        """
        backend = await self.plain_backend()
        cert, key = self.write_pair("site", self.certs.site_a)
        balancer = await start_balancer(
            self,
            [backend.url],
            *PROBES,
            "--listen",
            f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        )
        renewed = issue(self.certs.ca, names=["a.test"], ips=[LOOPBACK])
        self.write_pair("site", renewed)
        service = balancer.service
        assert service.load_config is not None
        service.apply(service.load_config())
        served, _, _ = await in_thread(balancer.port, self.ca_file)
        self.assertEqual(served.serial_number, renewed.cert.serial_number)

    async def test_reload_with_bad_file_keeps_certificate(self) -> None:
        """
        A reload that finds a broken certificate file is refused with a
        ConfigError and the running certificate stays.
        """
        backend = await self.plain_backend()
        balancer, cert, key = await self.site_a_balancer(backend, "ssl:0:interface=127.0.0.1")
        service = balancer.service
        assert service.load_config is not None
        config = service.load_config()
        self.write("site.crt", b"half a certificate")
        self.assertRaises(ConfigError, service.load_config)
        self.assertRaises(ConfigError, service.apply, config)
        served, _, _ = await in_thread(balancer.port, self.ca_file)
        self.assertEqual(served.serial_number, self.certs.site_a.cert.serial_number)

    async def test_make_service_end_to_end(self) -> None:
        """
        makeService over a TLS node and a TLS listener: HTTPS all the way,
        health checks passing.
        """
        node_backend, url, _ = await self.tls_backend(self.certs.node)
        cert, key = self.write_pair("site", self.certs.site_a)
        options = balancer_options(
            "--listen",
            "ssl:0:interface=127.0.0.1",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--ca-file",
            self.ca_file,
            "--nodes",
            url,
            "--health-path",
            "/health",
        )
        service = makeService(options)
        tracker = track_connections(service.traffic.site)
        service.startService()
        port = await _first_port(service)
        balancer = Balancer(service, port, f"https://{LOOPBACK}:{port}", tracker)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(balancer.stop()))
        code, body, _ = await https_get(self, balancer.url + "/e2e", self.certs.ca)
        self.assertEqual((code, body), (200, b"node"))
        self.assertEqual(node_backend.requests[0].header(b"X-Forwarded-Proto"), b"https")
        await wait_until(lambda: node_backend.probes >= 1, what="a health probe over TLS")
        self.assertTrue(service.pool.nodes[0].healthy)


def _first_port(service: Any) -> defer.Deferred[int]:
    d: defer.Deferred[int] = defer.Deferred()

    def got(port: Any) -> Any:
        d.callback(port.getHost().port)
        return port

    service.traffic.listeners[0]._waitingForPort.addCallback(got)
    return d
