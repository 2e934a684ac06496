# -*- test-case-name: tests.test_filters -*-
"""
The built-in filters, written against the public interface of
L{rrlb.filters} as any user's filter is: C{request_headers},
C{response_headers}, C{request_id}, C{traceparent}, C{allow} and C{deny}.
L{rrlb.filters.KINDS} names each kind here. Pure: no reactor, no I/O.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

from rrlb.filterheaders import header_name, header_value
from rrlb.filters import (
    Answer,
    FilterHeaders,
    FilterKind,
    FilterRequest,
    FilterResponse,
)
from rrlb.values import ConfigError, trusted_networks


def _header_pairs(where: str, value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where} must be a mapping of header names to values, not {value!r}")
    pairs = []
    for name, item in value.items():
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            item = str(item)
        try:
            header_name(name)
            header_value(name, item)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        pairs.append((name, item))
    return tuple(pairs)


@dataclass(frozen=True)
class HeaderRules:
    """
    C{request_headers} or C{response_headers}: headers to set, add and
    remove, in that order of YAML keys: remove, then set, then add.
    """

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    @classmethod
    def parse(cls, where: str, value: Any) -> HeaderRules:
        if not isinstance(value, dict) or not value:
            raise ConfigError(
                f"{where} must be a mapping with set, add or remove, like"
                f" {{set: {{Strict-Transport-Security: max-age=31536000}}}}, not {value!r}"
            )
        unknown = sorted(str(k) for k in value if k not in ("set", "add", "remove"))
        if unknown:
            raise ConfigError(f"unknown setting {where}.{unknown[0]} (known: add, remove, set)")
        remove = value.get("remove", [])
        if isinstance(remove, str):
            remove = [remove]
        if not isinstance(remove, list) or ("remove" in value and not remove):
            raise ConfigError(f"{where}.remove must be a list of header names, not {remove!r}")
        for name in remove:
            try:
                header_name(name)
            except ValueError as e:
                raise ConfigError(f"{where}.remove: {e}") from None
        return cls(
            set=_header_pairs(f"{where}.set", value["set"]) if "set" in value else (),
            add=_header_pairs(f"{where}.add", value["add"]) if "add" in value else (),
            remove=tuple(remove),
        )

    def apply(self, headers: FilterHeaders) -> None:
        for name in self.remove:
            headers.remove(name)
        for name, value in self.set:
            headers.set(name, value)
        for name, value in self.add:
            headers.add(name, value)


class RequestHeaders:
    """
    C{request_headers}: change the request's headers before it goes on.
    """

    def __init__(self, rules: HeaderRules) -> None:
        self.rules = rules
        if not rules.remove and not rules.add:
            self.request = self.set_only  # type: ignore[method-assign]

    def request(self, request: FilterRequest) -> None:
        self.rules.apply(request.headers)

    def set_only(self, request: FilterRequest) -> None:
        # The common rule (set, no remove or add), without apply's loops.
        headers = request.headers
        for name, value in self.rules.set:
            headers.set(name, value)


class ResponseHeaders:
    """
    C{response_headers}: change the headers of every response to the
    request, rrlb's own answers included.
    """

    def __init__(self, rules: HeaderRules) -> None:
        self.rules = rules
        if not rules.remove and not rules.add:
            self.response = self.set_only  # type: ignore[method-assign]

    def request(self, request: FilterRequest) -> None:
        return None

    def response(self, request: FilterRequest, response: FilterResponse) -> None:
        self.rules.apply(response.headers)

    def set_only(self, request: FilterRequest, response: FilterResponse) -> None:
        # The common rule (set: HSTS, CORS), without apply's loops.
        headers = response.headers
        for name, value in self.rules.set:
            headers.set(name, value)


def _options(where: str, value: Any, allowed: frozenset[str]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, not {value!r}")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise ConfigError(f"unknown setting {where}.{unknown[0]} (known: {', '.join(allowed)})")
    return value


def random_hex(digits: int, per_read: int = 256) -> Iterator[str]:
    """
    Random hex strings of C{digits} digits (4 bits each) from C{os.urandom},
    read C{per_read} strings at a time: one system call and one C{hex()}
    for 256 request IDs, a slice each, where a call per ID would cost more
    than the rest of its filter.
    """
    while True:
        block = os.urandom(digits * per_read // 2).hex()
        for start in range(0, len(block), digits):
            yield block[start : start + digits]


# The IDs request_id makes (128 bits) and the trace-id and parent-id
# traceparent makes (128 and 64 bits, the W3C sizes).
_request_ids = random_hex(32)
_trace_ids = random_hex(48)


def _reseed() -> None:
    # A forked child would draw the rest of its parent's block again.
    global _request_ids, _trace_ids
    _request_ids = random_hex(32)
    _trace_ids = random_hex(48)


os.register_at_fork(after_in_child=_reseed)


REQUEST_ID_HEADER = "X-Request-Id"
_VISIBLE = frozenset(range(0x21, 0x7F))
MAX_REQUEST_ID = 200


def valid_request_id(value: str) -> bool:
    """
    Whether a client's request ID is kept: 1 to 200 visible ASCII characters.
    """
    return (
        0 < len(value) <= MAX_REQUEST_ID
        and value.isascii()
        and value.isprintable()
        and (" " not in value)
    )


def parse_request_id(where: str, value: Any) -> str:
    options = _options(where, value, frozenset({"header"}))
    name = options.get("header", REQUEST_ID_HEADER)
    try:
        header_name(name)
    except ValueError as e:
        raise ConfigError(f"{where}.header: {e}") from None
    return str(name)


class RequestId:
    """
    C{request_id}: every request carries an ID, to the node and back on its
    response, and in the access log (C{request_id}). A client's is kept if
    it is 1 to 200 visible ASCII characters (and the peer is trusted, with
    C{--trusted-proxies}); otherwise it gets 128 random bits in hex, from
    C{os.urandom} (L{random_hex}).
    """

    def __init__(self, header: str = REQUEST_ID_HEADER) -> None:
        self.header = header

    def request(self, request: FilterRequest) -> None:
        headers = request.headers
        value = headers.get(self.header)
        if value is None or not request.peer_trusted or not valid_request_id(value):
            value = next(_request_ids)
            headers.set(self.header, value)
        request.note("request_id", value)

    def response(self, request: FilterRequest, response: FilterResponse) -> None:
        value = request.headers.get(self.header)
        if value is not None:
            response.headers.set(self.header, value)


_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_PARENT = "0" * 16


def valid_traceparent(value: str) -> bool:
    """
    Whether C{value} is a W3C Trace Context C{traceparent} rrlb passes on:
    version 00 exactly, or a later version (not ff) with possibly more
    fields; trace-id and parent-id not all zeros.
    """
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return False
    version, trace, parent, _, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return False
    return trace != _ZERO_TRACE and parent != _ZERO_PARENT


class Traceparent:
    """
    C{traceparent}: a valid W3C C{traceparent} goes on unchanged; any other
    request gets a new one (random trace-id and parent-id, flags 00). The
    trace-id is in the access log (C{trace_id}).
    """

    def request(self, request: FilterRequest) -> None:
        headers = request.headers
        value = headers.get("traceparent")
        if value is None or not valid_traceparent(value):
            ids = next(_trace_ids)
            while _ZERO_PARENT in ids and (ids[:32] == _ZERO_TRACE or ids[32:] == _ZERO_PARENT):
                ids = next(_trace_ids)  # all zeros is not an ID (1 in 2**64)
            value = f"00-{ids[:32]}-{ids[32:]}-00"
            headers.set("traceparent", value)
        request.note("trace_id", value[3:35])


def _no_options(where: str, value: Any) -> None:
    _options(where, value, frozenset())


# Distinct client addresses whose verdict an access list remembers.
_VERDICT_CACHE_SIZE = 4096


class AccessList:
    """
    C{allow} and C{deny}: a client address outside C{allow}, or inside
    C{deny}, is answered 403 without a node.
    """

    def __init__(self, networks: tuple[Any, ...], allow: bool) -> None:
        self.networks = networks
        self.allow = allow
        self._verdicts: dict[str, bool] = {}

    def permits(self, client: str) -> bool:
        verdict = self._verdicts.get(client)
        if verdict is None:
            try:
                address = ipaddress.ip_address(client)
            except ValueError:
                inside = False
            else:
                mapped = getattr(address, "ipv4_mapped", None)
                if mapped is not None:
                    address = mapped
                inside = any(address in network for network in self.networks)
            verdict = inside if self.allow else not inside
            if len(self._verdicts) >= _VERDICT_CACHE_SIZE:
                self._verdicts.clear()
            self._verdicts[client] = verdict
        return verdict

    def request(self, request: FilterRequest) -> Optional[Answer]:
        if self.permits(request.client):
            return None
        return Answer(403, b"403 Forbidden: this address may not use this resource\n")


# The kinds, as rrlb.filters.KINDS names them.
REQUEST_HEADERS = FilterKind(HeaderRules.parse, lambda rules, _: RequestHeaders(rules))
RESPONSE_HEADERS = FilterKind(HeaderRules.parse, lambda rules, _: ResponseHeaders(rules))
REQUEST_ID = FilterKind(parse_request_id, lambda header, _: RequestId(header))
TRACEPARENT = FilterKind(_no_options, lambda _, __: Traceparent())
ALLOW = FilterKind(trusted_networks, lambda networks, _: AccessList(networks, allow=True))
DENY = FilterKind(trusted_networks, lambda networks, _: AccessList(networks, allow=False))
