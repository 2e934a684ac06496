# -*- test-case-name: tests.test_tls -*-
"""
The TLS files: reading PEM certificates and keys, checking that a key pair
belongs together, and describing a certificate or a chain error in words.
Both sides of the balancer use them: L{rrlb.nodetls} (node side) and
L{rrlb.tls} (listeners), with the ciphers and the lowest TLS version rrlb
accepts.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Optional

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)
from OpenSSL import crypto
from twisted.internet.ssl import (
    AcceptableCiphers,
    TLSVersion,
)

from rrlb.values import ConfigError

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


def cert_names(cert: x509.Certificate) -> str:
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


def not_after(cert: x509.Certificate) -> datetime.datetime:
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
        return f"{what}{which} (not valid after {not_after(leaf):%Y-%m-%d %H:%M:%S} UTC)"
    if errno in _UNKNOWN_CA:
        return f"unknown CA: {what}{which} (issuer {leaf.issuer.rfc4514_string()})"
    return f"{what}{which} ({_describe_cert(leaf)})"
