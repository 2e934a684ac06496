# -*- test-case-name: tests.test_acme -*-
"""
The traffic side of ACME (L{rrlb.acme} is the control side): what a
traffic side serves of it, an L{AcmeState}, served by L{AcmeServing}. Its
L{ChallengeResource} answers C{/.well-known/acme-challenge/TOKEN} on plain
listeners ahead of the router; its TLS contexts are chosen by SNI for the
certificate's names (L{rrlb.tls.ServerTLS.set_hook}), and answer a
ClientHello offering C{acme-tls/1} for a pending name with the RFC 8737
challenge certificate. Also the certificates served, described for
C{/metrics} and the status page.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL, crypto
from twisted.logger import Logger
from twisted.web.resource import Resource

from rrlb.settings import Config
from rrlb.tls import (
    ClientAuthCAs,
    bare_context,
    listen_endpoint,
    listen_kind,
    listener_context,
    tls_on_tcp,
)
from rrlb.tlsfiles import LoadedKeyPair, not_after

log = Logger()

ACME_TLS_ALPN = b"acme-tls/1"
CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"


# -- what the listeners serve --------------------------------------------------------


@dataclass(frozen=True)
class AcmeState:
    """
    What a traffic side serves for ACME, sent to each worker as JSON.

    @ivar names: the certificate's configured names, whose handshakes the
        ACME contexts answer (and fail before the first certificate).
    @ivar chain: the PEM certificate chain, leaf first (empty before the
        first certificate).
    @ivar key: the PEM key of C{chain}.
    @ivar tokens: http-01 tokens pending and their key authorizations.
    @ivar alpn: tls-alpn-01 challenges pending: name, certificate, key (PEM).
    """

    names: tuple[str, ...] = ()
    chain: bytes = b""
    key: bytes = b""
    tokens: tuple[tuple[str, str], ...] = ()
    alpn: tuple[tuple[str, bytes, bytes], ...] = ()

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "names": list(self.names),
                "chain": self.chain.decode("ascii"),
                "key": self.key.decode("ascii"),
                "tokens": [list(t) for t in self.tokens],
                "alpn": [[n, c.decode("ascii"), k.decode("ascii")] for n, c, k in self.alpn],
            }
        ).encode("ascii")

    @classmethod
    def from_json(cls, data: bytes) -> AcmeState:
        raw = json.loads(data)
        return cls(
            names=tuple(raw["names"]),
            chain=raw["chain"].encode("ascii"),
            key=raw["key"].encode("ascii"),
            tokens=tuple((t, a) for t, a in raw["tokens"]),
            alpn=tuple((n, c.encode("ascii"), k.encode("ascii")) for n, c, k in raw["alpn"]),
        )


def key_pair(chain: bytes, key: bytes) -> LoadedKeyPair:
    """
    A certificate chain and key in PEM, as L{rrlb.tls.server_options} takes them.

    @raise ValueError: they cannot be read, or do not belong together.
    """
    certs = x509.load_pem_x509_certificates(chain)
    private = serialization.load_pem_private_key(key, password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if certs[0].public_key().public_bytes(der, spki) != private.public_key().public_bytes(
        der, spki
    ):
        raise ValueError("the key does not match the certificate")
    return LoadedKeyPair(
        certificate=crypto.X509.from_cryptography(certs[0]),
        key=crypto.PKey.from_cryptography_key(private),  # type: ignore[arg-type]
        chain=tuple(crypto.X509.from_cryptography(c) for c in certs[1:]),
        leaf=certs[0],
    )


class AcmeServing:
    """
    The ACME side of one traffic side's listeners: the current
    L{AcmeState}, as TLS contexts chosen by SNI and http-01 answers.

    @ivar tokens: http-01 token (bytes) -> its key authorization.
    """

    def __init__(self, client_auth: Optional[ClientAuthCAs] = None) -> None:
        # Client certificates (tls.client_auth) as on the files' contexts.
        self.client_auth = client_auth
        self.state = AcmeState()
        self.names: frozenset[str] = frozenset()
        self.tokens: dict[bytes, bytes] = {}
        self.alpn: dict[str, tuple[crypto.X509, crypto.PKey]] = {}
        self.leaf: Optional[x509.Certificate] = None
        # Before the first certificate: no certificate at all, so a
        # handshake for one of the names fails with handshake_failure
        # unless it is a tls-alpn-01 validation.
        self.fallback = self._with_callbacks(bare_context())
        self.context: Optional[SSL.Context] = None

    def set_client_auth(self, client_auth: Optional[ClientAuthCAs]) -> None:
        """
        Ask for client certificates as C{client_auth} says (a reload read
        it again), on the certificate served now too.
        """
        self.client_auth = client_auth
        state, self.state = self.state, AcmeState()
        self.update(state)

    def update(self, state: AcmeState) -> None:
        """
        Serve C{state} from now on; open connections keep what they have.
        A certificate that cannot be used leaves the one served before.
        """
        context = self.context
        leaf = self.leaf
        if state.chain and (state.chain, state.key) != (self.state.chain, self.state.key):
            try:
                pair = key_pair(state.chain, state.key)
                context = listener_context(pair, client_auth=self.client_auth)
                context = self._with_callbacks(context)
                leaf = pair.leaf
            except Exception as e:  # a certificate cryptography or OpenSSL refuses
                log.error("ACME certificate not served: {error}", error=str(e))
        alpn = {}
        for name, cert, key in state.alpn:
            try:
                alpn[name] = (
                    crypto.load_certificate(crypto.FILETYPE_PEM, cert),
                    crypto.load_privatekey(crypto.FILETYPE_PEM, key),
                )
            except Exception as e:
                log.error("ACME challenge for {name} not served: {error}", name=name, error=e)
        self.state = state
        self.names = frozenset(state.names)
        self.tokens = {t.encode("ascii"): a.encode("ascii") for t, a in state.tokens}
        self.alpn = alpn
        self.context, self.leaf = context, leaf

    # -- TLS (rrlb.tls.CertificateHook) ------------------------------------------

    def context_for(self, name: str) -> Optional[SSL.Context]:
        """
        The context for a ClientHello naming C{name}: the certificate's (or,
        before it, one with none), or L{None} for a name not ours.
        """
        if name in self.names or name in self.alpn:
            return self.context or self.fallback
        return None

    def _with_callbacks(self, context: SSL.Context) -> SSL.Context:
        context.set_alpn_select_callback(self._select_protocol)
        context.set_info_callback(self._handshake_info)
        return context

    def _select_protocol(self, connection: SSL.Connection, offered: list[bytes]) -> Any:
        if ACME_TLS_ALPN in offered:
            raw = connection.get_servername() or b""
            challenge = self.alpn.get(raw.decode("ascii", "replace").lower().rstrip("."))
            if challenge is not None:
                # RFC 8737: the challenge certificate, and nothing else on
                # this connection. The certificate is picked after ALPN in
                # TLS 1.3; in TLS 1.2 this replaces the one of the same key
                # type (both are P-256).
                connection.use_certificate(challenge[0])
                connection.use_privatekey(challenge[1])
                # A validator has no client certificate to give.
                connection.set_verify(SSL.VERIFY_NONE, None)
                return ACME_TLS_ALPN
        # The site's own protocols, as Twisted offers them on the first
        # context (which SNI replaced with this one).
        tls_protocol = connection.get_app_data()
        factory = getattr(getattr(tls_protocol, "factory", None), "wrappedFactory", None)
        ours = factory.acceptableProtocols() if factory is not None else [b"http/1.1"]
        for protocol in ours:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    def _handshake_info(self, connection: SSL.Connection, where: int, ret: int) -> None:
        if not where & SSL.SSL_CB_HANDSHAKE_DONE:
            return
        try:
            if connection.get_alpn_proto_negotiated() == ACME_TLS_ALPN:
                # A validation connection: the validator has its
                # certificate. Close without reading anything more from it.
                transport = getattr(connection.get_app_data(), "transport", None)
                if transport is not None:
                    transport.loseConnection()
        except Exception:
            # pyOpenSSL would only print it: say it in the log instead.
            log.failure("closing an acme-tls/1 connection")

    # -- http-01 --------------------------------------------------------------

    def answer(self, request: Any) -> Optional[bytes]:
        """
        The key authorization for a plain request of a pending token's
        path, or L{None}: route it as usual.
        """
        path = request.path
        if not path.startswith(CHALLENGE_PREFIX) or request.isSecure():
            return None
        return self.tokens.get(path[len(CHALLENGE_PREFIX) :])


class ChallengeResource(Resource):
    """
    The site's root when ACME is on: answers the http-01 tokens pending,
    and hands every other request to the proxy (C{resource}).
    """

    isLeaf = True

    def __init__(self, serving: AcmeServing, resource: Any) -> None:
        super().__init__()
        self.serving = serving
        self.resource = resource

    def getChild(self, path: bytes, request: Any) -> ChallengeResource:
        return self

    def render(self, request: Any) -> Any:
        answer = self.serving.answer(request)
        if answer is None:
            return self.resource.render(request)
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/plain")
        return answer


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """
    The DNS names of a certificate's subjectAltName, lower-cased.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(n).lower() for n in san.get_values_for_type(x509.DNSName))


# -- what is served, for /metrics and the status page --------------------------------


def listener_certificates(config: Config) -> list[x509.Certificate]:
    """
    The certificates of the files of the listeners rrlb serves TLS on
    itself, each once (read again: a reload calls this).
    """
    on_tcp = tls_on_tcp(config.listen, config.tls)
    found: dict[bytes, x509.Certificate] = {}
    for description in config.listen:
        kind = listen_kind(description)[1]
        if kind != "ssl" and not (kind == "tcp" and on_tcp):
            continue
        try:
            # Endpoints are only built here, never listened on: no reactor.
            server = listen_endpoint(None, description, config.tls, on_tcp)[1]
        except Exception:
            # check_tls has said what is wrong with it at start or reload.
            continue
        for leaf in server.certificates if server is not None else ():
            found.setdefault(leaf.fingerprint(hashes.SHA256()), leaf)
    return list(found.values())


def certificate_status(cert: x509.Certificate, source: str) -> dict[str, Any]:
    """
    What C{/status} says of a certificate served: its names, issuer,
    expiry (Unix time of its notAfter), and where it comes from (C{acme}
    or C{file}).
    """
    names = list(certificate_names(cert)) or [
        str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    ]
    return {
        "names": names,
        "issuer": cert.issuer.rfc4514_string(),
        "not_after": not_after(cert).timestamp(),
        "source": source,
    }
