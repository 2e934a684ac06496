# -*- test-case-name: tests.test_tls -*-
"""
TLS on both sides of the balancer.

Node side: one client connection creator per (host, L{NodeTLS}), built once
and reused for every connection (traffic and health probes alike). It checks
the node's chain against C{ca_file} or the system trust store and its name
through service-identity, and when a check fails it says why in words
(L{NodeCertificateError}: expired, unknown CA, hostname mismatch) instead of
OpenSSL's bare "certificate verify failed".

Client side: L{ServerTLS} serves a listener's certificate (several, chosen by
SNI) with TLS 1.2 at least and forward-secret AEAD ciphers only, and re-reads
its files on L{BalancerTLS.prepare}/commit, so a renewed certificate is served
after a reload without a restart.

Which listeners rrlb serves itself (so that their certificates reload):

 - C{ssl:PORT[:interface=..][:backlog=..]} uses C{--tls-cert}/C{--tls-key};
 - C{ssl:PORT:privateKey=KEY:certKey=CERT[:extraCertChain=..][:dhParameters=..]}
   uses its own files, parsed the way Twisted parses them;
 - when C{--tls-cert} is given and no listener is an C{ssl:} one, every
   C{tcp:} listener serves TLS with it.

Anything else (C{sslmethod=}, other endpoint types) goes to Twisted's
C{serverFromString} unchanged.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)
from OpenSSL import SSL, crypto
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, serverFromString
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    DiffieHellmanParameters,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from rrlb.proxyproto import ProxyHeaderEndpoint
from rrlb.settings import Config, ListenTLS, NodeSpec, NodeTLS
from rrlb.values import ConfigError

log = Logger()

# Forward secrecy and AEAD only (Mozilla's "intermediate" list): no RSA key
# exchange, no CBC, no SHA-1 MACs. TLS 1.3 suites are all strong and are not
# affected by this string.
MODERN_CIPHERS = AcceptableCiphers.fromOpenSSLCipherString(
    "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"
)
MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2

# X509_V_ERR_* codes (stable across OpenSSL versions) and what they mean.
_EXPIRED = 10
_NOT_YET_VALID = 9
_UNKNOWN_CA = frozenset({2, 18, 19, 20, 21})
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    4: "unable to decrypt certificate's signature",
    6: "unable to decode issuer public key",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    13: "format error in certificate's notBefore field",
    14: "format error in certificate's notAfter field",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    22: "certificate chain too long",
    23: "certificate revoked",
    24: "invalid CA certificate",
    25: "path length constraint exceeded",
    26: "unsupported certificate purpose",
    27: "certificate not trusted",
    28: "certificate rejected",
    32: "key usage does not include certificate signing",
}


class NodeCertificateError(Exception):
    """
    A node's certificate failed verification; C{str()} says why in words.
    """


# -- reading PEM files --------------------------------------------------------


def _read(name: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{name}: cannot read {path!r}: {e.strerror or e}") from None


def load_certificates(name: str, path: str) -> list[x509.Certificate]:
    """
    Every certificate in a PEM file, in order (a leaf first, then its chain).
    """
    data = _read(name, path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"{name}: {path!r} holds no PEM certificate")
    return certs


def load_private_key(name: str, path: str) -> Any:
    data = _read(name, path)
    try:
        return load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{name}: the private key in {path!r} is encrypted") from None
    except (ValueError, crypto.Error):
        raise ConfigError(f"{name}: {path!r} holds no PEM private key") from None


@dataclass(frozen=True)
class KeyPairFiles:
    """
    Where one certificate lives: its PEM file (leaf first, then any
    intermediates), its key (the same file when L{None}) and an optional
    extra chain file.
    """

    cert: str
    key: Optional[str] = None
    chain: Optional[str] = None
    # What the three settings are called in messages.
    names: tuple[str, str, str] = ("cert", "key", "chain")


@dataclass(frozen=True)
class LoadedKeyPair:
    """
    A certificate and key read from disk, as pyOpenSSL objects.
    """

    certificate: crypto.X509
    key: crypto.PKey
    chain: tuple[crypto.X509, ...]
    leaf: x509.Certificate

    def names(self) -> list[str]:
        """
        The DNS names the certificate is for (its SAN, else its CN), lower-cased.
        """
        try:
            san = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = san.value.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            names = [
                str(a.value)
                for a in self.leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            ]
        return [n.lower() for n in names]


def _spki(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


def load_key_pair(files: KeyPairFiles) -> LoadedKeyPair:
    """
    Read a certificate and its key, checking that they belong together.
    """
    cert_name, key_name, chain_name = files.names
    certs = load_certificates(cert_name, files.cert)
    key_path = files.key or files.cert
    if files.key:
        key = load_private_key(key_name, key_path)
    else:
        data = _read(cert_name, key_path)
        if b"PRIVATE KEY-----" not in data:
            raise ConfigError(
                f"{cert_name}: {key_path!r} holds no private key; give it with {key_name}"
            )
        key = load_private_key(cert_name, key_path)
        key_name = cert_name
    if _spki(certs[0].public_key()) != _spki(key.public_key()):
        raise ConfigError(
            f"{key_name}: the key in {key_path!r} does not match the certificate in {files.cert!r}"
        )
    chain = certs[1:]
    if files.chain:
        chain += load_certificates(chain_name, files.chain)
    return LoadedKeyPair(
        certificate=crypto.X509.from_cryptography(certs[0]),
        key=crypto.PKey.from_cryptography_key(key),
        chain=tuple(crypto.X509.from_cryptography(c) for c in chain),
        leaf=certs[0],
    )


def _describe_cert(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(no subject)"


def _cert_names(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        return f"{_describe_cert(cert)} (no subjectAltName)"
    if len(names) > 5:
        names = names[:5] + ["..."]
    return ", ".join(names)


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    try:
        return cert.not_valid_after_utc
    except AttributeError:  # cryptography < 42
        return cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)


def chain_error(errno: int, cert: Optional[crypto.X509], depth: int) -> str:
    """
    What an OpenSSL chain verification error means, in words, with the
    certificate it is about.
    """
    what = _VERIFY_ERRORS.get(errno, f"certificate verify error {errno}")
    leaf = cert.to_cryptography() if cert is not None else None
    which = "" if depth == 0 else f" at depth {depth}"
    if leaf is None:
        return what
    if errno == _EXPIRED:
        return f"{what}{which} (not valid after {_not_after(leaf):%Y-%m-%d %H:%M:%S} UTC)"
    if errno in _UNKNOWN_CA:
        return f"unknown CA: {what}{which} (issuer {leaf.issuer.rfc4514_string()})"
    return f"{what}{which} ({_describe_cert(leaf)})"


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
                f"hostname mismatch (wrong host): the certificate is for {_cert_names(cert)},"
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


# -- the listener side ---------------------------------------------------------


def server_options(pair: LoadedKeyPair, dh: Optional[str] = None) -> CertificateOptions:
    """
    Modern server settings for one certificate: TLS 1.2 at least, forward
    secret AEAD ciphers only.
    """
    kwargs: dict[str, Any] = {}
    if dh:
        kwargs["dhParameters"] = DiffieHellmanParameters.fromFile(FilePath(dh))
    return CertificateOptions(
        privateKey=pair.key,
        certificate=pair.certificate,
        extraCertChain=list(pair.chain),
        raiseMinimumTo=MINIMUM_TLS_VERSION,
        acceptableCiphers=MODERN_CIPHERS,
        **kwargs,
    )


@dataclass(frozen=True)
class ServerTLSState:
    """
    The contexts a listener serves: the default one and those chosen by SNI.
    """

    context: SSL.Context
    by_name: dict[str, SSL.Context]
    leaf: x509.Certificate


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ServerTLS:
    """
    The TLS side of one listener, whose certificates can be re-read.

    @ivar name: what the listener is called in messages.
    @ivar files: the certificates it serves (the first is the default), or
        L{None} to take them from the C{--tls-cert}/C{--tls-key} settings.
    """

    def __init__(
        self,
        name: str,
        files: Optional[tuple[KeyPairFiles, ...]] = None,
        dh: Optional[str] = None,
        listen_tls: Optional[ListenTLS] = None,
    ) -> None:
        self.name = name
        self.files = files
        self.dh = dh
        self._state = self.prepare(listen_tls or ListenTLS())

    def sources(self, listen_tls: ListenTLS) -> tuple[KeyPairFiles, ...]:
        if self.files is not None:
            return self.files
        return shortcut_files(listen_tls)

    def prepare(self, listen_tls: ListenTLS) -> ServerTLSState:
        """
        Read the certificate files now; nothing changes until L{commit}.

        @raise ConfigError: a file cannot be used.
        """
        sources = self.sources(listen_tls)
        if not sources:
            raise ConfigError(
                f"{self.name}: no certificate (give privateKey=/certKey= or --tls-cert/--tls-key)"
            )
        by_name: dict[str, SSL.Context] = {}
        contexts = []
        leaf = None
        for files in sources:
            pair = load_key_pair(files)
            try:
                context = server_options(pair, self.dh).getContext()
            except (ValueError, SSL.Error, OSError) as e:
                raise ConfigError(f"{self.name}: {files.cert!r}: {e}") from None
            contexts.append(context)
            leaf = leaf or pair.leaf
            for name in pair.names():
                by_name.setdefault(name, context)
        default = contexts[0]
        if len(contexts) > 1:
            default.set_tlsext_servername_callback(_sni_selector(by_name, default))
        assert leaf is not None
        return ServerTLSState(default, by_name, leaf)

    def commit(self, state: ServerTLSState) -> None:
        """
        Serve C{state} to new connections; open ones keep what they have.
        """
        self._state = state

    def reload(self, listen_tls: ListenTLS) -> None:
        self.commit(self.prepare(listen_tls))

    @property
    def certificate(self) -> x509.Certificate:
        """
        The default certificate served now.
        """
        return self._state.leaf

    def getContext(self) -> SSL.Context:
        return self._state.context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._state.context, None)
        connection.set_app_data(tlsProtocol)
        return connection


def _sni_selector(
    by_name: dict[str, SSL.Context], default: SSL.Context
) -> Callable[[SSL.Connection], None]:
    def select(connection: SSL.Connection) -> None:
        try:
            raw = connection.get_servername()
            if not raw:
                return
            name = raw.decode("ascii", "replace").lower().rstrip(".")
            context = by_name.get(name)
            if context is None and "." in name:
                context = by_name.get("*." + name.split(".", 1)[1])
            if context is not None and context is not default:
                connection.set_context(context)
        except Exception:
            log.failure("choosing a certificate by SNI")

    return select


def shortcut_files(listen_tls: ListenTLS) -> tuple[KeyPairFiles, ...]:
    """
    The certificates of C{--tls-cert}/C{--tls-key} (YAML C{tls: {cert, key,
    certificates}}), the default first.
    """
    if not listen_tls.cert:
        return ()
    files = [
        KeyPairFiles(
            listen_tls.cert, listen_tls.key, names=("--tls-cert/tls.cert", "--tls-key/tls.key", "")
        )
    ]
    for i, (cert, key) in enumerate(listen_tls.certificates):
        where = f"tls.certificates[{i}]"
        files.append(KeyPairFiles(cert, key, names=(f"{where}.cert", f"{where}.key", "")))
    return tuple(files)


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint description the way Twisted does: C{:} separates
    parameters, the first C{=} makes a keyword one, C{\\} escapes.
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    parts: list[str] = []
    current = ""
    seen_equals = False
    chars = iter(description)
    for c in chars:
        if c == "\\":
            current += next(chars, "")
        elif c == ":":
            parts.append(current)
            if len(parts) == 1:
                args.append(parts[0])
            else:
                kwargs[parts[0]] = parts[1]
            parts, current, seen_equals = [], "", False
        elif c == "=" and not seen_equals:
            parts.append(current)
            current, seen_equals = "", True
        else:
            current += c
    parts.append(current)
    if len(parts) == 1:
        args.append(parts[0])
    else:
        kwargs[parts[0]] = parts[1]
    return args, kwargs


_SSL_KEYS = frozenset(
    {"port", "interface", "backlog", "privateKey", "certKey", "extraCertChain", "dhParameters"}
)
_TCP_KEYS = frozenset({"port", "interface", "backlog"})


def listen_kind(description: str) -> tuple[bool, str, str]:
    """
    Whether a listen description starts with the PROXY protocol's
    C{haproxy:}, the kind of endpoint under it (C{tcp}, C{ssl}, ...), and its
    description without the prefix.
    """
    kind, _, rest = description.partition(":")
    if kind.strip().lower() == "haproxy":
        return True, rest.split(":", 1)[0].strip().lower(), rest
    return False, kind.strip().lower(), description


def tls_on_tcp(listen: Sequence[str], listen_tls: ListenTLS) -> bool:
    """
    Whether C{tcp:} listeners serve TLS: a certificate is given and no
    listener is an C{ssl:} one to use it.
    """
    if not listen_tls.cert:
        return False
    return not any(listen_kind(d)[1] == "ssl" for d in listen)


def listen_endpoint(
    reactor: Any, description: str, listen_tls: ListenTLS, on_tcp: bool = False
) -> tuple[IStreamServerEndpoint, Optional[ServerTLS]]:
    """
    The endpoint for a C{--listen} description, and its L{ServerTLS} when
    rrlb serves its TLS itself (see the module docstring).

    @raise ConfigError: a TLS setting or file of the listener is wrong.
    """
    proxied, kind, inner = listen_kind(description)
    if kind == "ssl" or (kind == "tcp" and on_tcp):
        args, kwargs = split_description(inner)
        known = _SSL_KEYS if kind == "ssl" else _TCP_KEYS
        if set(kwargs) <= known and len(args) <= 2:
            endpoint, server = _tls_endpoint(
                reactor, description, args[1:], kwargs, listen_tls, proxied
            )
            if proxied:
                # The PROXY header comes in the clear, before the TLS handshake.
                return ProxyHeaderEndpoint(endpoint, reactor, server), server
            return endpoint, server
        if proxied:
            unknown = ", ".join(sorted(set(kwargs) - known)) or "more than a port"
            raise ConfigError(
                f"--listen {description!r}: a TLS listener behind haproxy: takes"
                f" only {', '.join(sorted(known))} (not {unknown})"
            )
    if proxied:
        return ProxyHeaderEndpoint(serverFromString(reactor, inner), reactor), None
    return serverFromString(reactor, description), None


def _tls_endpoint(
    reactor: Any,
    description: str,
    args: list[str],
    kwargs: dict[str, str],
    listen_tls: ListenTLS,
    plain: bool = False,
) -> tuple[IStreamServerEndpoint, ServerTLS]:
    """
    A TLS listener serving rrlb's L{ServerTLS}; with C{plain}, the TCP
    endpoint under it, for a caller that adds TLS itself.
    """
    name = f"--listen {description!r}"
    port_text = args[0] if args else kwargs.get("port", "")
    try:
        port = int(port_text)
        backlog = int(kwargs.get("backlog", "50"))
    except ValueError:
        raise ConfigError(f"{name}: bad port or backlog") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name}: bad port {port_text!r}")
    files: Optional[tuple[KeyPairFiles, ...]] = None
    if "privateKey" in kwargs:
        files = (
            KeyPairFiles(
                kwargs.get("certKey") or kwargs["privateKey"],
                kwargs["privateKey"],
                kwargs.get("extraCertChain"),
                names=(f"{name} certKey", f"{name} privateKey", f"{name} extraCertChain"),
            ),
        )
    elif "certKey" in kwargs:
        raise ConfigError(f"{name}: certKey= needs privateKey=")
    elif not listen_tls.cert:
        raise ConfigError(
            f"{name}: no certificate: give privateKey=KEY.pem:certKey=CERT.pem"
            " or --tls-cert/--tls-key (tls: {cert, key} in the YAML file)"
        )
    server = ServerTLS(name, files, kwargs.get("dhParameters"), listen_tls)
    interface = kwargs.get("interface", "")
    if plain:
        return TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=interface), server
    endpoint = SSL4ServerEndpoint(reactor, port, server, backlog=backlog, interface=interface)
    return endpoint, server


@dataclass
class BalancerTLS:
    """
    All of a traffic side's TLS in one place (L{rrlb.traffic.Traffic}): the
    node creators and the listeners whose certificates it reloads.
    """

    nodes: NodeTLSClients = dataclasses.field(default_factory=NodeTLSClients)
    listeners: list[ServerTLS] = dataclasses.field(default_factory=list)

    def listen_endpoint(
        self, reactor: Any, description: str, config: Config
    ) -> IStreamServerEndpoint:
        endpoint, server = listen_endpoint(
            reactor, description, config.tls, tls_on_tcp(config.listen, config.tls)
        )
        if server is not None:
            self.listeners.append(server)
        return endpoint

    def prepare(self, config: Config, nodes: Sequence[NodeSpec]) -> Callable[[], list[str]]:
        """
        Re-read every certificate, key and CA file of C{config} (nodes and
        listeners) now; nothing changes until the returned function is called.

        @return: a function that switches to what was read and returns the
            keys of nodes whose TLS settings changed.
        @raise ConfigError: a file cannot be used; nothing changed.
        """
        node_state = self.nodes.prepare(nodes)
        listener_states = [(s, s.prepare(config.tls)) for s in self.listeners]

        def commit() -> list[str]:
            for server, state in listener_states:
                server.commit(state)
            return self.nodes.commit(node_state)

        return commit


def check_tls(config: Config) -> None:
    """
    Read every TLS file C{config} names, so a bad one is refused with one
    clear line (at start-up and on reload) before anything is built.

    @raise ConfigError: naming the setting and the file.
    """
    if config.tls.ca_file:
        # Read even when no node is https now: a reload may add one, and a
        # wrong path should be caught where it was typed.
        load_certificates("--ca-file/tls.ca_file", config.tls.ca_file)
    # Each group of nodes on its own, so an error names where the node is
    # configured (pools.api: node https://...: tls.ca_file: ...). Nodes found
    # in DNS use their entry's files: read them now too.
    groups = [("", config.nodes, config.dns_nodes)]
    groups += [(f"pools.{p.name}: ", p.nodes, p.dns_nodes) for p in config.pools]
    for where, nodes, dns_nodes in groups:
        try:
            NodeTLSClients().prepare(tuple(nodes) + tuple(d.template for d in dns_nodes))
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None
    if config.tls.cert:
        ServerTLS("--tls-cert/tls.cert", None, None, config.tls)
    on_tcp = tls_on_tcp(config.listen, config.tls)
    for description in config.listen:
        kind = listen_kind(description)[1]
        if kind == "ssl" or (kind == "tcp" and on_tcp):
            try:
                # Endpoints are only built here, never listened on: no reactor.
                listen_endpoint(None, description, config.tls, on_tcp)
            except ConfigError:
                raise
            except Exception as e:
                raise ConfigError(f"--listen {description!r}: {e}") from None
