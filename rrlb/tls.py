# -*- test-case-name: tests.test_tls -*-
"""
TLS on both sides of the balancer.

Node side: L{rrlb.nodetls} (one checked client connection creator per node
and TLS settings); the files both sides read: L{rrlb.tlsfiles}. This module
puts them together (L{BalancerTLS}, L{check_tls}).

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
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, serverFromString
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import (
    CertificateOptions,
    DiffieHellmanParameters,
)
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from rrlb.nodetls import NodeTLSClients
from rrlb.ocsp import Stapler, fingerprint, responder_url
from rrlb.proxyproto import ProxyHeaderEndpoint
from rrlb.settings import Config, ListenTLS, NodeSpec
from rrlb.tlsfiles import (
    MINIMUM_TLS_VERSION,
    MODERN_CIPHERS,
    KeyPairFiles,
    LoadedKeyPair,
    load_certificates,
    load_key_pair,
)
from rrlb.values import ConfigError

log = Logger()

# -- the listener side ---------------------------------------------------------


# How long a TLS session may be resumed (seconds): an hour. Sessions live in
# each context's cache in memory only (no ticket keys: see
# docs/security.md, "Session resumption").
SESSION_TIMEOUT = 3600


def server_options(
    pair: LoadedKeyPair,
    dh: Optional[str] = None,
    client_auth: Optional[ClientAuthCAs] = None,
) -> CertificateOptions:
    """
    Modern server settings for one certificate: TLS 1.2 at least, forward
    secret AEAD ciphers only, sessions resumed from a server-side cache
    (TLS 1.2 session IDs, TLS 1.3 stateful tickets); with C{client_auth},
    client certificates checked against its CAs.
    """
    kwargs: dict[str, Any] = {}
    if dh:
        kwargs["dhParameters"] = DiffieHellmanParameters.fromFile(FilePath(dh))
    if client_auth is not None:
        kwargs.update(
            verify=True,
            caCerts=list(client_auth.cas),
            requireCertificate=client_auth.mode == "require",
        )
    return CertificateOptions(
        privateKey=pair.key,
        certificate=pair.certificate,
        extraCertChain=list(pair.chain),
        raiseMinimumTo=MINIMUM_TLS_VERSION,
        acceptableCiphers=MODERN_CIPHERS,
        # A session cache, not tickets: OpenSSL's ticket keys cannot be
        # rotated through pyOpenSSL (see SESSION_TIMEOUT).
        enableSessions=True,
        **kwargs,
    )


def bare_context() -> SSL.Context:
    """
    A server context with rrlb's settings and no certificate: a handshake
    that stays on it fails (C{handshake_failure}).
    """
    return CertificateOptions(
        raiseMinimumTo=MINIMUM_TLS_VERSION, acceptableCiphers=MODERN_CIPHERS
    ).getContext()


class CertificateHook(Protocol):
    """
    Certificates a listener serves by SNI beside its files (L{rrlb.acme}).
    """

    def context_for(self, name: str) -> Optional[SSL.Context]:
        """
        The context for a ClientHello naming C{name}, or L{None}: not one of
        the hook's names.
        """


@dataclass(frozen=True)
class ClientAuthCAs:
    """
    C{tls.client_auth} with its CA file read.
    """

    cas: tuple[crypto.X509, ...]
    mode: str
    # The same, for the names sent in the handshake's CertificateRequest.
    names: tuple[x509.Certificate, ...] = ()


def read_client_auth(listen_tls: ListenTLS) -> Optional[ClientAuthCAs]:
    """
    Read C{tls.client_auth.ca_file} (at start-up and on every reload).

    @raise ConfigError: the file cannot be read or holds no certificate.
    """
    client_auth = listen_tls.client_auth
    if client_auth is None:
        return None
    certs = load_certificates("tls.client_auth.ca_file", client_auth.ca_file)
    cas = tuple(crypto.X509.from_cryptography(c) for c in certs)
    return ClientAuthCAs(cas, client_auth.mode, tuple(certs))


def listener_context(
    pair: LoadedKeyPair, dh: Optional[str] = None, client_auth: Optional[ClientAuthCAs] = None
) -> SSL.Context:
    """
    A listener's context for one certificate (its files', or ACME's):
    L{server_options}, the session cache's timeout, and the client CAs.
    """
    context = server_options(pair, dh, client_auth).getContext()
    context.set_timeout(SESSION_TIMEOUT)
    for ca in client_auth.names if client_auth is not None else ():
        # Named in the certificate request: a browser then offers only the
        # user's certificates from these CAs.
        context.add_client_ca(ca)
    return context


@dataclass(frozen=True)
class ServerTLSState:
    """
    The contexts a listener serves: the default one and those chosen by SNI.
    """

    context: SSL.Context
    by_name: dict[str, SSL.Context]
    leaf: Optional[x509.Certificate]
    # The certificates that name an OCSP responder, and their issuers.
    ocsp: tuple[tuple[x509.Certificate, Optional[x509.Certificate]], ...] = ()
    # Every certificate of the files, the default first; and the settings
    # they were read by.
    leaves: tuple[x509.Certificate, ...] = ()
    listen_tls: ListenTLS = ListenTLS()


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ServerTLS:
    """
    The TLS side of one listener, whose certificates can be re-read.

    @ivar name: what the listener is called in messages.
    @ivar files: the certificates it serves (the first is the default), or
        L{None} to take them from the C{--tls-cert}/C{--tls-key} settings.
    @ivar stapler: the OCSP responses to staple (L{BalancerTLS.add_listener}).
    """

    stapler: Optional[Stapler] = None

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
        self.hook: Optional[CertificateHook] = None
        self._state = self.prepare(listen_tls or ListenTLS())

    def set_hook(self, hook: CertificateHook) -> None:
        """
        Serve C{hook}'s certificates too, chosen by SNI before the files'.
        """
        self.hook = hook
        self.commit(self.prepare(self._state.listen_tls))

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
        if not sources and (self.hook is not None or listen_tls.acme.enabled):
            # Only certificates from ACME, chosen by SNI; without SNI none.
            context = bare_context()
            context.set_tlsext_servername_callback(_sni_selector({}, context, self))
            return ServerTLSState(context, {}, None, (), (), listen_tls)
        if not sources:
            raise ConfigError(
                f"{self.name}: no certificate (give privateKey=/certKey= or --tls-cert/--tls-key)"
            )
        by_name: dict[str, SSL.Context] = {}
        contexts = []
        leaves = []
        client_auth = read_client_auth(listen_tls)
        stapled = []
        for files in sources:
            pair = load_key_pair(files)
            try:
                context = listener_context(pair, self.dh, client_auth)
                if responder_url(pair.leaf) is not None:
                    # Only certificates with a responder cost a callback.
                    context.set_ocsp_server_callback(self._staple, fingerprint(pair.leaf))
                    issuer = pair.chain[0].to_cryptography() if pair.chain else None
                    stapled.append((pair.leaf, issuer))
            except (ValueError, SSL.Error, OSError) as e:
                raise ConfigError(f"{self.name}: {files.cert!r}: {e}") from None
            contexts.append(context)
            leaves.append(pair.leaf)
            for name in pair.names():
                by_name.setdefault(name, context)
        default = contexts[0]
        if len(contexts) > 1 or self.hook is not None:
            default.set_tlsext_servername_callback(_sni_selector(by_name, default, self))
        return ServerTLSState(
            default, by_name, leaves[0], tuple(stapled), tuple(leaves), listen_tls
        )

    def _staple(self, connection: SSL.Connection, key: Optional[bytes]) -> bytes:
        stapler = self.stapler
        return stapler.staple(key) if stapler is not None and key else b""

    @property
    def stapled(self) -> tuple[tuple[x509.Certificate, Optional[x509.Certificate]], ...]:
        """
        The certificates served now that name an OCSP responder, with their
        issuers.
        """
        return self._state.ocsp

    def commit(self, state: ServerTLSState) -> None:
        """
        Serve C{state} to new connections; open ones keep what they have.
        """
        self._state = state

    def reload(self, listen_tls: ListenTLS) -> None:
        self.commit(self.prepare(listen_tls))

    @property
    def certificate(self) -> Optional[x509.Certificate]:
        """
        The default certificate served now (none: only ACME's, by SNI).
        """
        return self._state.leaf

    @property
    def certificates(self) -> list[x509.Certificate]:
        """
        Every certificate of the files served now, the default first.
        """
        return list(self._state.leaves)

    def getContext(self) -> SSL.Context:
        return self._state.context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._state.context, None)
        connection.set_app_data(tlsProtocol)
        return connection


def _sni_selector(
    by_name: dict[str, SSL.Context], default: SSL.Context, server: ServerTLS
) -> Callable[[SSL.Connection], None]:
    def select(connection: SSL.Connection) -> None:
        try:
            raw = connection.get_servername()
            if not raw:
                return
            name = raw.decode("ascii", "replace").lower().rstrip(".")
            hook = server.hook
            context = hook.context_for(name) if hook is not None else None
            if context is not None:
                connection.set_context(context)
                return
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
    elif not listen_tls.cert and not listen_tls.acme.enabled:
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
    stapler: Optional[Stapler] = None

    def listen_endpoint(
        self, reactor: Any, description: str, config: Config
    ) -> IStreamServerEndpoint:
        endpoint, server = listen_endpoint(
            reactor, description, config.tls, tls_on_tcp(config.listen, config.tls)
        )
        if server is not None:
            self.add_listener(server)
        return endpoint

    def add_listener(self, server: ServerTLS) -> None:
        """
        Reload C{server}'s certificates with the others, and staple theirs.
        """
        self.listeners.append(server)
        server.stapler = self.stapler
        self._track()

    def _track(self) -> None:
        if self.stapler is not None:
            self.stapler.track(c for server in self.listeners for c in server.stapled)

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
            self._track()
            return self.nodes.commit(node_state)

        return commit


def check_tls(config: Config) -> None:
    """
    Read every TLS file C{config} names, so a bad one is refused with one
    clear line (at start-up and on reload) before anything is built.

    @raise ConfigError: naming the setting and the file.
    """
    if config.tls.acme.ca_file:
        load_certificates("tls.acme.ca_file", config.tls.acme.ca_file)
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
    read_client_auth(config.tls)
    if config.tls.cert:
        ServerTLS("--tls-cert/tls.cert", None, None, config.tls)
    on_tcp = tls_on_tcp(config.listen, config.tls)
    served = 0
    for description in config.listen:
        kind = listen_kind(description)[1]
        if kind == "ssl" or (kind == "tcp" and on_tcp):
            try:
                # Endpoints are only built here, never listened on: no reactor.
                server = listen_endpoint(None, description, config.tls, on_tcp)[1]
            except ConfigError:
                raise
            except Exception as e:
                raise ConfigError(f"--listen {description!r}: {e}") from None
            if server is None and config.tls.client_auth is not None:
                # Twisted's own TLS (sslmethod=...) would not ask for one.
                raise ConfigError(
                    f"tls.client_auth: --listen {description!r} is served by Twisted as"
                    " given and would not check client certificates; drop its sslmethod="
                )
            served += server is not None
    if config.tls.client_auth is not None and not served:
        raise ConfigError(
            "tls.client_auth: no TLS listener to ask for client certificates"
            " (--listen ssl:..., or --tls-cert with a tcp: listener)"
        )
