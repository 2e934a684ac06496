# -*- test-case-name: tests.test_acme -*-
"""
An ACME order (RFC 8555), step by step: the account, the order and its
challenges (RFC 8737's tls-alpn-01 certificate among them), the answers and
the finalization, and an order's failure in one line.

Each step is a blocking call of the C{acme} package's (certbot's)
synchronous client, bounded in time and size; L{rrlb.acme.AcmeManager}
runs each in a thread of its own and keeps the results.
"""

from __future__ import annotations

import datetime
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from rrlb.settings import AcmeConfig

# RFC 8737's id-pe-acmeIdentifier extension of a challenge certificate.
ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")

# One request to the CA may take this long (seconds between bytes), an
# answer this many bytes, and an order (challenges and finalization) this
# long in all.
NETWORK_TIMEOUT = 30.0
MAX_ANSWER = 1 << 20
ORDER_DEADLINE = 300.0


class AcmeError(Exception):
    """
    An order failed; C{str()} is one line naming the CA's error.
    """


def new_key() -> bytes:
    """
    A new P-256 private key in PEM (PKCS#8).
    """
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def challenge_certificate(name: str, key_authorization: str) -> tuple[bytes, bytes]:
    """
    RFC 8737's self-signed certificate for C{name}: its SAN is the name, and
    the critical acmeIdentifier extension holds the SHA-256 of the key
    authorization. Certificate and key in PEM.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        # DER OCTET STRING of the 32-byte digest.
        .add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER, b"\x04\x20" + digest), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


# -- the steps of an order -----------------------------------------------------------


def describe(error: BaseException) -> str:
    """
    An order's failure in one line, naming the CA's error where it gave one.
    """
    import requests
    from acme import errors, messages

    if isinstance(error, AcmeError):
        text = str(error)
    elif isinstance(error, messages.Error):
        text = f"{error.typ}: {error.detail or error.title or ''}"
    elif isinstance(error, errors.ValidationError):
        problems = []
        for authzr in error.failed_authzrs:
            for challb in authzr.body.challenges:
                if challb.error is not None:
                    problems.append(
                        f"{authzr.body.identifier.value}: {challb.error.typ}:"
                        f" {challb.error.detail or ''}"
                    )
        text = "validation failed: " + "; ".join(problems)
    elif isinstance(error, errors.ClientError) and isinstance(
        next(iter(error.args), None), requests.Response
    ):
        # The package raises the bare response when it is not JSON.
        response = error.args[0]
        text = f"HTTP {response.status_code} from {response.url} without a problem document"
    else:
        text = f"{type(error).__name__}: {error}"
    text = " ".join(text.split())
    return text if len(text) <= 400 else text[:400] + "..."


def _network(key_pem: bytes, ca_file: Optional[str], timeout: float = NETWORK_TIMEOUT) -> Any:
    """
    The C{acme} package's network client with an account key, whose
    answers are bounded in size and time.
    """
    import josepy as jose
    import requests
    from acme import client

    class BoundedNetwork(client.ClientNetwork):
        def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            kwargs["verify"] = self.verify_ssl
            kwargs.setdefault("headers", {}).setdefault("User-Agent", self.user_agent)
            kwargs.setdefault("timeout", timeout)
            kwargs["stream"] = True
            response = self.session.request(method, url, *args, **kwargs)
            try:
                body = b""
                deadline = time.monotonic() + timeout
                for chunk in response.iter_content(65536):
                    body += chunk
                    if len(body) > MAX_ANSWER:
                        raise AcmeError(f"{url}: an answer over {MAX_ANSWER} bytes")
                    if time.monotonic() > deadline:
                        raise AcmeError(f"{url}: the answer took over {timeout:g}s")
            except requests.RequestException as e:
                raise AcmeError(f"{url}: {type(e).__name__}: {e}") from None
            finally:
                response.close()
            response._content = body
            response.encoding = "utf-8"
            return response

    private = serialization.load_pem_private_key(key_pem, password=None)
    return BoundedNetwork(
        jose.JWKEC(key=private),
        alg=jose.ES256,
        verify_ssl=ca_file or True,  # type: ignore[arg-type]
        user_agent="rrlb",
    )


@dataclass
class Challenge:
    """
    One challenge to answer: for C{name}, its token and key authorization.
    """

    name: str
    kind: str
    token: str
    key_authorization: str
    body: Any


@dataclass
class Order:
    """
    An order under way: its client, the order, and its challenges.
    """

    client: Any
    order: Any
    key: bytes
    challenges: list[Challenge] = field(default_factory=list)


def place_order(acme: AcmeConfig, account_key: bytes, timeout: float = NETWORK_TIMEOUT) -> Order:
    """
    Register (or find) the account and place an order for the names,
    picking each authorization's challenge of the configured kind. Runs in
    a thread.
    """
    import josepy as jose
    from acme import client, crypto_util, errors, messages

    assert acme.directory is not None
    net = _network(account_key, acme.ca_file, timeout)
    directory = client.ClientV2.get_directory(acme.directory, net)
    acme_client = client.ClientV2(directory, net)
    registration = messages.NewRegistration.from_data(
        email=acme.email, terms_of_service_agreed=True
    )
    try:
        acme_client.new_account(registration)
    except errors.ConflictError as e:
        # The key's account exists already: use it.
        net.account = messages.RegistrationResource(uri=e.location, body=messages.Registration())
    key = new_key()
    csr = crypto_util.make_csr(key, list(acme.domains))
    order = acme_client.new_order(csr)
    thumbprint = jose.b64encode(net.key.thumbprint(hash_function=hashes.SHA256)).decode()
    found = []
    for authzr in order.authorizations:
        name = authzr.body.identifier.value
        if authzr.body.status == messages.STATUS_VALID:
            continue
        for challb in authzr.body.challenges:
            # As JSON: acme 5 has no class of its own for tls-alpn-01.
            jobj = challb.chall.to_partial_json()
            typ = jobj.get("type")
            if typ == acme.challenge and isinstance(jobj.get("token"), str):
                token = jobj["token"]
                found.append(Challenge(name, typ, token, f"{token}.{thumbprint}", challb))
                break
        else:
            raise AcmeError(f"the CA offers no {acme.challenge} challenge for {name}")
    return Order(acme_client, order, key, found)


def finish_order(order: Order) -> bytes:
    """
    Answer the challenges (now served), wait for the CA to validate them,
    finalize, and return the full chain. Runs in a thread.
    """
    from acme import challenges

    class EmptyResponse(challenges.KeyAuthorizationChallengeResponse):
        # Every challenge's response is {} (RFC 8555 7.5.1); acme 5 knows
        # no tls-alpn-01 class of its own.
        typ = "response"

    for challenge in order.challenges:
        order.client.answer_challenge(
            challenge.body, EmptyResponse(key_authorization=challenge.key_authorization)
        )
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_DEADLINE)
    done = order.client.poll_and_finalize(order.order, deadline)
    return str(done.fullchain_pem).encode("ascii")
