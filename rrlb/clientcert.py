# -*- test-case-name: tests.test_clientcert -*-
"""
What rrlb tells the nodes and the access log of a client certificate
(C{tls.client_auth}): the C{X-Forwarded-Client-Cert} value in Envoy's
format and the certificate's subject, worked out once per connection, when
its TLS handshake is over (L{rrlb.connection.ClientConnection}), never per
request.

OpenSSL has verified the certificate by then (the chain to
C{tls.client_auth.ca_file}, its dates); this module only describes it, and
never raises on what a client's certificate holds: a field it cannot read
is left out, and control or non-ASCII characters are escaped, so that the
header and the log line stay one well-formed line.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Optional

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import crypto
from twisted.logger import Logger

log = Logger()

# The header's name, as Twisted canonicalizes it.
XFCC = b"X-Forwarded-Client-Cert"

# SAN entries of each kind passed on at most, and the longest value kept: a
# certificate with thousands of names must not make a header nodes refuse.
MAX_NAMES = 16
MAX_VALUE = 1024

# Bytes RFC 4514 lets stand in a string rrlb writes into a header: printable
# ASCII. Everything else is written as \XX (RFC 4514 section 2.4 hexpairs).
_UNSAFE = re.compile(rb"[^\x20-\x7e]")
# Values Envoy double-quotes: those holding a separator of the header.
_NEEDS_QUOTES = re.compile(rb'[,;="]')


@dataclass(frozen=True)
class ClientCertificate:
    """
    A verified client certificate as rrlb passes it on.

    @ivar xfcc: the C{X-Forwarded-Client-Cert} element for it.
    @ivar subject: its subject, an RFC 4514 string (for the access log).
    """

    xfcc: bytes
    subject: str


def _hexpair(match: re.Match[bytes]) -> bytes:
    return b"\\%02X" % match.group()[0]


def _safe(text: str) -> bytes:
    """
    C{text} as printable ASCII: any other byte of its UTF-8 as C{\\XX}.
    """
    data = text.encode("utf-8", "backslashreplace")
    if _UNSAFE.search(data) is not None:
        data = _UNSAFE.sub(_hexpair, data)
    return data[:MAX_VALUE]


def _quoted(value: bytes) -> bytes:
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _field(key: bytes, value: bytes) -> bytes:
    return key + b"=" + (_quoted(value) if _NEEDS_QUOTES.search(value) else value)


def _subject(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except Exception:
        # An attribute cryptography cannot write (a malformed string type).
        return ""


def _names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
        dns = [str(d) for d in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [], []
    except Exception:
        # A malformed extension in a certificate that verified anyway.
        return [], []
    return uris[:MAX_NAMES], dns[:MAX_NAMES]


def describe(cert: x509.Certificate) -> ClientCertificate:
    """
    The C{X-Forwarded-Client-Cert} element and subject for C{cert}, as
    Envoy writes them: C{Hash=<sha256 of the DER, lowercase
    hex>;Subject="<RFC 4514>";URI=...;DNS=...}, a C{URI} and a C{DNS} field
    for each such subjectAltName; the subject is always quoted, other values
    when they hold C{, ; = "}.
    """
    return describe_der(cert.public_bytes(Encoding.DER), cert)


def describe_der(der: bytes, cert: Optional[x509.Certificate] = None) -> ClientCertificate:
    """
    L{describe} from the certificate's DER. One that C{cryptography} cannot
    read (OpenSSL verified it, but is more lenient) gets its hash alone.
    """
    parts = [b"Hash=" + hashlib.sha256(der).hexdigest().encode("ascii")]
    try:
        if cert is None:
            cert = x509.load_der_x509_certificate(der)
        subject = _subject(cert)
        uris, dns = _names(cert)
    except Exception:
        return ClientCertificate(parts[0], "")
    parts.append(b"Subject=" + _quoted(_safe(subject)))
    parts += [_field(b"URI", _safe(u)) for u in uris]
    parts += [_field(b"DNS", _safe(d)) for d in dns]
    return ClientCertificate(b";".join(parts), _safe(subject).decode("ascii"))


def peer_certificate(transport: Any) -> Optional[ClientCertificate]:
    """
    The client certificate of a TLS connection whose handshake is over, or
    L{None} when the client sent none (or C{transport} is not TLS). Never
    raises.
    """
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        peer = get()
        if peer is None:
            return None
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, peer)
    except Exception as e:
        log.warn("cannot read a client certificate: {error}", error=e)
        return None
    return describe_der(der)
