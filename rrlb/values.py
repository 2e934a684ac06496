# -*- test-case-name: tests.test_config,tests.test_settings -*-
"""
How a setting's value is read, from YAML or the command line: a parser per
kind of value, called with the setting's name (for the message) and the raw
value. Every mistake is a L{ConfigError} naming the setting and the value.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Parser = Callable[[str, Any], Any]


class ConfigError(ValueError):
    """
    A setting is missing or wrong; the message names it and its value.
    """


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _float(value: Any) -> float:
    try:
        return math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return math.nan


def _int(value: Any) -> Optional[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = value.strip().lstrip("+") if isinstance(value, str) else ""
    return int(text) if text.isdigit() else None


def _bounded(number: Callable[[Any], Any], ok: Callable[[Any], bool], what: str) -> Parser:
    def parse(name: str, value: Any) -> Any:
        n = number(value)
        _check(n is not None and ok(n), f"{name} must be {what}, not {value!r}")
        return n

    return parse


positive_float = _bounded(_float, lambda n: 0 < n < math.inf, "a positive number of seconds")
non_negative_float = _bounded(
    _float, lambda n: 0 <= n < math.inf, "a number of seconds of at least 0"
)
percent = _bounded(_float, lambda n: 0 <= n <= 100, "a percentage from 0 to 100")
non_negative_int = _bounded(_int, lambda n: n >= 0, "a whole number of at least 0")


def positive_int(name: str, value: Any, maximum: Optional[int] = None) -> int:
    """
    A whole number from 1 (to C{maximum}).
    """
    n = _int(value)
    bound = f"from 1 to {maximum}" if maximum else "of at least 1"
    _check(
        n is not None and 1 <= n <= (maximum or n),
        f"{name} must be a whole number {bound}, not {value!r}",
    )
    return n  # type: ignore[return-value]


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def byte_size(name: str, value: Any) -> int:
    """
    A number of bytes, with an optional C{K}, C{M} or C{G} suffix (powers of
    1024, as nginx reads them); 0 is allowed (no limit).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    text = value.strip().upper() if isinstance(value, str) else ""
    if text.endswith("B") and text[-2:-1] in ("K", "M", "G"):
        text = text[:-1]
    unit = text[-1:] if text[-1:] in ("K", "M", "G") else ""
    digits = text[: len(text) - len(unit)].strip()
    _check(
        digits.isdigit() and digits.isascii(),
        f"{name} must be a size in bytes, optionally with K, M or G (e.g. 10M), not {value!r}",
    )
    return int(digits) * _SIZE_UNITS[unit]


def boolean(name: str, value: Any) -> bool:
    _check(isinstance(value, bool), f"{name} must be true or false, not {value!r}")
    return bool(value)


def string(name: str, value: Any) -> str:
    _check(
        isinstance(value, str) and value != "", f"{name} must be a non-empty string, not {value!r}"
    )
    return str(value)


def parse_health_service(name: str, value: Any) -> str:
    """
    The service a grpc health check asks after: a string, empty for the
    server as a whole (grpc.health.v1's own meaning of an empty name).
    """
    _check(isinstance(value, str), f"{name} must be a service name, not {value!r}")
    return str(value)


def as_given(name: str, value: str) -> str:
    return value


def mapping(name: str, value: Any, allowed: frozenset[str]) -> Mapping[str, Any]:
    """
    A YAML mapping with no keys but C{allowed}.
    """
    _check(isinstance(value, dict), f"{name} must be a mapping, not {value!r}")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        known = ", ".join(sorted(allowed))
        raise ConfigError(f"unknown setting {name}.{unknown[0]} (known: {known})")
    return value


_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def token(name: str, value: Any, what: str) -> str:
    _check(
        isinstance(value, str) and value != "" and set(value) <= _TOKEN,
        f"{name} must be {what} (letters, digits and -._~ etc.), not {value!r}",
    )
    return str(value)


def _listed(value: Any) -> Any:
    """
    A list given as one string: the string as a list of one.
    """
    return [value] if isinstance(value, str) else value


def trusted_networks(name: str, value: Any) -> tuple[Network, ...]:
    """
    Networks in CIDR notation (a bare address is a /32 or /128): a list, or
    one comma-separated string.
    """
    value = value.split(",") if isinstance(value, str) else value
    _check(
        isinstance(value, list) and value != [],
        f"{name} must be a list of networks like 10.0.0.0/8, not {value!r}",
    )
    networks = []
    for item in value:
        try:
            text = item.strip() if isinstance(item, str) else item
            networks.append(ipaddress.ip_network(text, strict=False))
        except (TypeError, ValueError):
            raise ConfigError(
                f"{name}: {item!r} is not a network in CIDR notation (like 10.0.0.0/8)"
            ) from None
    return tuple(networks)


# A host name as an admin_hosts entry (underscores too: container and
# compose service names have them).
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


def admin_host_names(name: str, value: Any) -> tuple[str, ...]:
    """
    Host names the admin endpoint answers to (a list, or one comma-separated
    string), lower-cased, without a port or a trailing dot.
    """
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{name} must be a list of host names like admin.internal, not {value!r}")
    names = []
    for item in value:
        text = item.strip().lower().rstrip(".") if isinstance(item, str) else ""
        if not _HOST_NAME.fullmatch(text):
            raise ConfigError(
                f"{name}: {item!r} is not a host name (like admin.internal, without a port)"
            )
        names.append(text)
    return tuple(names)


# Most worker processes: far more than any machine has cores, so a typo
# (--workers 1000) is refused rather than forking a thousand processes.
MAX_WORKERS = 256


def parse_workers(name: str, value: Any) -> int:
    """
    The number of worker processes: a whole number, or C{auto} for one per
    CPU.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return max(1, os.cpu_count() or 1)
    n = _int(value)
    _check(
        n is not None and 1 <= n <= MAX_WORKERS,
        f"{name} must be auto or a whole number from 1 to {MAX_WORKERS}, not {value!r}",
    )
    return n  # type: ignore[return-value]


def one_of(*choices: str) -> Parser:
    def parse(name: str, value: Any) -> str:
        _check(value in choices, f"{name} must be one of {', '.join(choices)}, not {value!r}")
        return str(value)

    return parse


BALANCE_POLICIES = ("roundrobin", "leastconn", "p2c", "hash")
ACCESS_LOG_FORMATS = ("combined", "json")
NODE_PROTOCOLS = ("http1", "h2")
HEALTH_TYPES = ("http", "grpc", "tcp")
LOG_FORMATS = ("text", "json")
parse_balance = one_of(*BALANCE_POLICIES)
parse_access_log_format = one_of(*ACCESS_LOG_FORMATS)
parse_log_format = one_of(*LOG_FORMATS)
parse_node_protocol = one_of(*NODE_PROTOCOLS)
parse_health_type = one_of(*HEALTH_TYPES)


def parse_hash_key(name: str, value: Any) -> str:
    """
    What C{balance: hash} hashes: source, uri, header:NAME or cookie:NAME.
    """
    kind, _, key = value.partition(":") if isinstance(value, str) else ("", "", "")
    if kind in ("header", "cookie"):
        return f"{kind}:{token(name, key, f'{kind}:NAME with a valid {kind} name')}"
    _check(
        value in ("source", "uri"),
        f"{name} must be source, uri, header:NAME or cookie:NAME, not {value!r}",
    )
    return str(value)


def parse_sticky(name: str, value: Any) -> str:
    """
    C{sticky: {cookie: NAME}}, as the cookie name.
    """
    raw = mapping(name, value, frozenset({"cookie"}))
    _check("cookie" in raw, f"{name} needs a cookie name, like {{cookie: SERVERID}}")
    return token(f"{name}.cookie", raw["cookie"], "a cookie name")


def parse_health_path(name: str, value: Any) -> str:
    path = string(name, value)
    _check(path.startswith("/"), f"{name} must start with '/', not {value!r}")
    _check(
        path.isascii() and not any(c in path for c in " \r\n\t"),
        f"{name} must be a percent-encoded path, not {value!r}",
    )
    return path


def parse_listen(name: str, value: Any) -> tuple[str, ...]:
    value = _listed(value)
    _check(
        isinstance(value, list) and value != [],
        f"{name} must be a list of endpoint descriptions, not {value!r}",
    )
    return tuple(string(name, v) for v in value)


def parse_resolver(name: str, value: Any) -> tuple[str, int]:
    """
    A name server as C{HOST[:PORT]}: an IPv4 address, or an IPv6 one in
    brackets when a port follows (C{[::1]:53}); the port defaults to 53.
    """
    text = value.strip() if isinstance(value, str) else ""
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            host, port = (host, rest[1:]) if rest.startswith(":") else ("", "")
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{name} must be HOST[:PORT] with HOST an IP address, not {value!r}"
        ) from None
    number = _int(port)
    _check(number is not None and 0 < number < 65536, f"{name}: bad port in {value!r}")
    return str(address), number  # type: ignore[return-value]


def parse_resolvers(name: str, value: Any) -> tuple[tuple[str, int], ...]:
    value = _listed(value)
    _check(isinstance(value, list), f"{name} must be a list of HOST[:PORT], not {value!r}")
    return tuple(parse_resolver(f"{name}[{i}]", v) for i, v in enumerate(value))


def parse_certificates(name: str, value: Any) -> tuple[tuple[str, Optional[str]], ...]:
    """
    C{tls.certificates}: more certificates, chosen by SNI, as (cert, key).
    """
    _check(isinstance(value, list), f"{name} must be a list of {{cert, key}}, not {value!r}")
    pairs = []
    for i, entry in enumerate(value):
        where = f"{name}[{i}]"
        pair = mapping(where, entry, frozenset({"cert", "key"}))
        _check("cert" in pair, f"{where} needs a cert, got {entry!r}")
        key = string(f"{where}.key", pair["key"]) if "key" in pair else None
        pairs.append((string(f"{where}.cert", pair["cert"]), key))
    return tuple(pairs)


def parse_url(name: str, value: Any) -> str:
    """
    An C{http://} or C{https://} URL with a host.
    """
    text = string(name, value).strip()
    scheme, _, rest = text.partition("://")
    host = rest.split("/", 1)[0]
    _check(
        scheme.lower() in ("http", "https")
        and host != ""
        and text.isprintable()
        and " " not in text,
        f"{name} must be an https:// URL, not {value!r}",
    )
    return text


def parse_email(name: str, value: Any) -> str:
    text = string(name, value).strip()
    local, at, domain = text.rpartition("@")
    _check(
        bool(at and local and "." in domain and text.isprintable() and " " not in text),
        f"{name} must be an e-mail address, not {value!r}",
    )
    return text


# A DNS name a certificate may hold: labels of letters, digits and hyphens,
# and a leading "*." for a wildcard.
_DNS_NAME = re.compile(
    r"(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
)


def parse_domains(name: str, value: Any) -> tuple[str, ...]:
    """
    The DNS names of one certificate (a list, or one name), lower-cased,
    each once.
    """
    value = _listed(value)
    _check(
        isinstance(value, list) and value != [],
        f"{name} must be a list of DNS names like [example.com], not {value!r}",
    )
    names: list[str] = []
    for item in value:
        text = item.strip().lower().rstrip(".") if isinstance(item, str) else ""
        _check(
            len(text) <= 253 and bool(_DNS_NAME.fullmatch(text)),
            f"{name}: {item!r} is not a DNS name",
        )
        if text not in names:
            names.append(text)
    return tuple(names)


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(name: str, value: Any) -> float:
    """
    A positive time: seconds, or a number with C{s}, C{m}, C{h} or C{d}
    (C{30d}).
    """
    text = value.strip().lower() if isinstance(value, str) else ""
    unit = text[-1:] if text[-1:] in _DURATION_UNITS else ""
    n = _float(value) if not isinstance(value, str) else _float(text[: len(text) - len(unit)])
    _check(
        0 < n < math.inf,
        f"{name} must be a time like 30d, 12h or 3600 (seconds), not {value!r}",
    )
    return n * _DURATION_UNITS[unit]


@dataclass(frozen=True)
class ClientAuth:
    """
    C{tls.client_auth}: client certificates are asked for on TLS listeners
    and checked against C{ca_file}; with C{mode} C{require} a client
    without one fails the handshake, with C{optional} it gets through.
    """

    ca_file: str
    mode: str


CLIENT_AUTH_MODES = ("require", "optional")


def parse_client_auth(name: str, value: Any) -> ClientAuth:
    """
    C{tls.client_auth: {ca_file: PEM, mode: require|optional}}.
    """
    raw = mapping(name, value, frozenset({"ca_file", "mode"}))
    _check(
        "ca_file" in raw and "mode" in raw,
        f"{name} needs ca_file and mode, like {{ca_file: clients-ca.pem, mode: require}},"
        f" not {value!r}",
    )
    mode = raw["mode"]
    _check(
        mode in CLIENT_AUTH_MODES,
        f"{name}.mode must be one of {', '.join(CLIENT_AUTH_MODES)}, not {mode!r}",
    )
    return ClientAuth(string(f"{name}.ca_file", raw["ca_file"]), mode)
