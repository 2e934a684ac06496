# -*- test-case-name: tests.test_tls -*-
"""
TLS to the nodes: one client connection creator per (host, L{NodeTLS}),
built once and reused for every connection (traffic and health probes
alike). It checks the node's chain against C{ca_file} or the system trust
store and its name through service-identity, and when a check fails it says
why in words (L{NodeCertificateError}: expired, unknown CA, hostname
mismatch) instead of OpenSSL's bare "certificate verify failed".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from rrlb.settings import NodeSpec, NodeTLS
from rrlb.tlsfiles import (
    KeyPairFiles,
    NodeCertificateError,
    cert_names,
    chain_error,
    load_certificates,
    load_key_pair,
)
from rrlb.values import ConfigError

log = Logger()


# -- the node side -------------------------------------------------------------


def _idna_bytes(name: str) -> bytes:
    try:
        return name.encode("ascii")
    except UnicodeEncodeError:
        try:
            import idna

            return bytes(idna.encode(name))
        except ImportError:  # pragma: no cover - idna comes with service-identity
            return name.encode("idna")


@implementer(IOpenSSLClientConnectionCreator)
class NodeTLSCreator:
    """
    Makes the TLS connections to one node name: SNI, the chain checked by
    OpenSSL against the trust root, the name checked by service-identity, and
    on failure L{TLSMemoryBIOProtocol.failVerification} with a
    L{NodeCertificateError} saying why.

    @ivar name: the name sent as SNI and checked (C{server_name} or the host).
    @ivar verify: whether the node's certificate is checked at all.
    """

    def __init__(self, name: str, options: CertificateOptions, verify: bool) -> None:
        self.name = name
        self.verify = verify
        self._options = options
        self._is_ip = bool(isIPAddress(name) or isIPv6Address(name))
        # Literal addresses are not sent as SNI (RFC 6066 section 3).
        self._sni = None if self._is_ip else _idna_bytes(name)
        self._check_name = _name_checker(name, self._is_ip)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        # getContext() builds the options' context once and caches it; this is
        # what CertificateOptions.clientConnectionForTLS does on Twisted 26,
        # spelled so that older Twisted (PyPy's) works too.
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        if self.verify:
            connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        return connection

    def _verify(
        self, connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        # An exception raised in an OpenSSL callback is lost: catch everything.
        try:
            if not ok:
                why: Optional[str] = chain_error(errno, cert, depth)
            elif depth == 0:
                why = self._check_name(cert.to_cryptography())
            else:
                return True
            if why is None:
                return True
            protocol = connection.get_app_data()
            if protocol is not None:
                protocol.failVerification(Failure(NodeCertificateError(why)))
            return False
        except Exception:
            log.failure("verifying the certificate of {name}", name=self.name)
            return False

    def __repr__(self) -> str:
        return f"<NodeTLSCreator {self.name} verify={self.verify}>"


def _name_checker(name: str, is_ip: bool) -> Callable[[x509.Certificate], Optional[str]]:
    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import (
        verify_certificate_hostname,
        verify_certificate_ip_address,
    )

    def check(cert: x509.Certificate) -> Optional[str]:
        try:
            if is_ip:
                verify_certificate_ip_address(cert, name)
            else:
                verify_certificate_hostname(cert, name)
        except (VerificationError, CertificateError):
            return (
                f"hostname mismatch (wrong host): the certificate is for {cert_names(cert)},"
                f" not {name}"
            )
        return None

    return check


def node_creator(
    host: str,
    tls: NodeTLS,
    where: str = "node",
    shared: Optional[dict[tuple[Any, ...], CertificateOptions]] = None,
) -> NodeTLSCreator:
    """
    Build the connection creator for a node at C{host} with settings C{tls},
    reading its files now.

    @param shared: options already built for other nodes, by the settings
        they depend on: nodes with the same CA and client certificate share
        one OpenSSL context (only the name differs between them).
    @raise ConfigError: a file cannot be read or is not what it should be.
    """
    key = (tls.verify, tls.ca_file, tls.cert, tls.key)
    options = None if shared is None else shared.get(key)
    if options is None:
        options = node_options(tls, where)
        if shared is not None:
            shared[key] = options
    return NodeTLSCreator(tls.server_name or host, options, tls.verify)


def node_options(tls: NodeTLS, where: str = "node") -> CertificateOptions:
    """
    The OpenSSL settings for nodes with settings C{tls}: trust root and
    client certificate.
    """
    kwargs: dict[str, Any] = {}
    if tls.cert:
        pair = load_key_pair(
            KeyPairFiles(tls.cert, tls.key, names=(f"{where} tls.cert", f"{where} tls.key", ""))
        )
        kwargs.update(
            privateKey=pair.key, certificate=pair.certificate, extraCertChain=list(pair.chain)
        )
    if tls.verify:
        if tls.ca_file:
            cas = load_certificates(f"{where} tls.ca_file", tls.ca_file)
            kwargs["trustRoot"] = trustRootFromCertificates(
                [Certificate(crypto.X509.from_cryptography(c)) for c in cas]
            )
        else:
            kwargs["trustRoot"] = platformTrust()
    try:
        return CertificateOptions(**kwargs)
    except (ValueError, SSL.Error) as e:
        raise ConfigError(f"{where} tls: {e}") from None


def _netloc_key(host: str) -> str:
    return host.strip("[]").lower()


@dataclass(frozen=True)
class NodeTLSState:
    """
    Creators for a set of nodes, read from disk by L{NodeTLSClients.prepare}.
    """

    creators: dict[tuple[str, NodeTLS], NodeTLSCreator]
    by_key: dict[str, tuple[str, NodeTLS]]
    by_netloc: dict[tuple[str, int], NodeTLSCreator]


class NodeTLSClients:
    """
    The TLS client side for every https node: one L{NodeTLSCreator} per
    (host, L{NodeTLS}), built once. Called with a node, it is the
    C{tls_creator} of L{rrlb.upstream.UpstreamPool}; L{policy} gives the
    health checker's L{Agent} the same creators.
    """

    def __init__(self) -> None:
        self._state = NodeTLSState({}, {}, {})
        self.policy = NodeTLSPolicy(self)

    def __call__(self, node: Any) -> NodeTLSCreator:
        # Once per new connection (not per request): one dict lookup.
        spec = node.spec
        creator = self._state.creators.get((spec.host, spec.tls))
        if creator is None:
            # Not prepared (a node that left the configuration still
            # finishing a request): build it now, failing closed.
            try:
                creator = node_creator(spec.host, spec.tls, f"node {spec.url}")
            except ConfigError as e:
                log.error("{error}; verifying with the system trust store", error=str(e))
                creator = node_creator(spec.host, NodeTLS(server_name=spec.tls.server_name))
            self._state.creators[(spec.host, spec.tls)] = creator
        return creator

    def for_netloc(self, host: str, port: int) -> Optional[NodeTLSCreator]:
        return self._state.by_netloc.get((_netloc_key(host), port))

    def prepare(self, specs: Iterable[NodeSpec]) -> NodeTLSState:
        """
        Read every https node's files now; nothing changes until L{commit}.

        @raise ConfigError: a node's file cannot be used.
        """
        creators: dict[tuple[str, NodeTLS], NodeTLSCreator] = {}
        by_key: dict[str, tuple[str, NodeTLS]] = {}
        by_netloc: dict[tuple[str, int], NodeTLSCreator] = {}
        shared: dict[tuple[Any, ...], CertificateOptions] = {}
        for spec in specs:
            if spec.scheme != "https":
                continue
            ident = (spec.host, spec.tls)
            creator = creators.get(ident)
            if creator is None:
                creator = creators[ident] = node_creator(
                    spec.host, spec.tls, f"node {spec.url}", shared
                )
            by_key[spec.key] = ident
            netloc = (_netloc_key(spec.host), spec.port)
            other = by_netloc.get(netloc)
            if other is not None and other is not creator:
                log.warn(
                    "nodes on {host}:{port} have different tls settings; health checks"
                    " use those of the first",
                    host=spec.host,
                    port=spec.port,
                )
                continue
            by_netloc[netloc] = creator
        return NodeTLSState(creators, by_key, by_netloc)

    def commit(self, state: NodeTLSState) -> list[str]:
        """
        Use C{state} from now on; warn about nodes that newly skip
        verification.

        @return: the keys of nodes whose TLS settings changed (their pooled
            connections were made with the old ones).
        """
        old = self._state
        self._state = state
        for key, ident in state.by_key.items():
            if not ident[1].verify and old.by_key.get(key) != ident:
                log.warn(
                    "node {node}: TLS certificate verification is off (tls.verify: false),"
                    " which is insecure: rrlb does not check who it is talking to",
                    node=key,
                )
        return [k for k, ident in old.by_key.items() if state.by_key.get(k) != ident]


@implementer(IPolicyForHTTPS)
class NodeTLSPolicy:
    """
    The health checker's TLS policy: the same creator as traffic for each node.
    """

    def __init__(self, clients: NodeTLSClients) -> None:
        self.clients = clients
        self._fallback: dict[tuple[str, int], IOpenSSLClientConnectionCreator] = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        host = hostname.decode("ascii", "replace") if isinstance(hostname, bytes) else hostname
        creator = self.clients.for_netloc(host, port)
        if creator is not None:
            return creator
        # A URL no node has (should not happen): verify it the default way.
        key = (_netloc_key(host), port)
        fallback = self._fallback.get(key)
        if fallback is None:
            fallback = self._fallback[key] = optionsForClientTLS(_netloc_key(host))
        return fallback


def describe_tls_error(exc: Optional[BaseException]) -> Optional[str]:
    """
    Words for a TLS failure talking to a node, or L{None} if C{exc} is not one.
    """
    if isinstance(exc, NodeCertificateError):
        return f"TLS certificate check failed: {exc}"
    if isinstance(exc, SSL.Error):
        reasons = []
        args = exc.args[0] if exc.args else None
        if isinstance(args, list):
            for item in args:
                if isinstance(item, tuple) and item:
                    reasons.append(str(item[-1]))
        text = "; ".join(r for r in reasons if r) or str(exc) or "handshake failed"
        return f"TLS error: {text}"
    try:
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, VerificationError):
        return "TLS certificate check failed: hostname mismatch"
    return None
