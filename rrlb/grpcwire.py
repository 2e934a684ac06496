# -*- test-case-name: tests.test_grpcwire -*-
"""
The few pieces of gRPC's wire format rrlb needs, without grpcio: which
requests are gRPC, C{grpc-timeout} values, the status rrlb answers with
when it cannot reach a node (HTTP 200, trailers-only), and the health
check's messages (C{grpc.health.v1.Health/Check}), whose protobuf is a
few bytes written and read by hand.

Bottom layer: it imports nothing of rrlb.
"""

from __future__ import annotations

from typing import Any, Optional
from urllib.parse import quote

# Status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html).
OK = 0
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

# rrlb's own HTTP answers as gRPC statuses: the three (no node or
# a failed connection, a timeout, the queue or a rate limit), and the
# mapping gRPC's HTTP/2 document gives for the rest.
_STATUS_FOR_CODE = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    408: DEADLINE_EXCEEDED,
    413: RESOURCE_EXHAUSTED,
    429: RESOURCE_EXHAUSTED,
    431: RESOURCE_EXHAUSTED,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}

CONTENT_TYPE = b"application/grpc"

# grpc-timeout units (gRPC's PROTOCOL-HTTP2 document), in seconds.
_UNITS = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}

HEALTH_CHECK_PATH = b"/grpc.health.v1.Health/Check"
# HealthCheckResponse.ServingStatus.SERVING
SERVING = 1


def is_grpc(content_type: Optional[list[bytes]]) -> bool:
    """
    Whether C{Content-Type} values say gRPC: C{application/grpc}, or
    C{application/grpc+proto} and the like.
    """
    if not content_type:
        return False
    value = content_type[0][:17].lower()
    return value[:16] == CONTENT_TYPE and value[16:17] in (b"", b"+", b";")


def grpc_request(request: Any) -> bool:
    """
    Whether C{request} is a gRPC call from an HTTP/2 client (the only kind
    that can read trailers).
    """
    if request.clientproto != b"HTTP/2":
        return False
    return is_grpc(request.requestHeaders.getRawHeaders(b"content-type"))


def parse_timeout(value: bytes) -> Optional[float]:
    """
    Seconds of a C{grpc-timeout} value (C{100m}, C{5S}: at most 8 digits
    and a unit), or L{None} if it is not one.
    """
    digits = value[:-1]
    unit = _UNITS.get(value[-1]) if value else None
    if unit is None or not 0 < len(digits) <= 8 or not digits.isdigit():
        return None
    return int(digits) * unit


def status_for(code: int) -> int:
    """
    The gRPC status rrlb answers with in place of HTTP status C{code}.
    """
    return _STATUS_FOR_CODE.get(code, UNKNOWN)


def message_value(text: str) -> bytes:
    """
    A C{grpc-message} value: percent-encoded UTF-8, as the protocol says.
    """
    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")


# -- grpc.health.v1, by hand -------------------------------------------------------


def frame(message: bytes) -> bytes:
    """
    One gRPC message on the wire: uncompressed, its 4-byte length, itself.
    """
    return b"\x00" + len(message).to_bytes(4, "big") + message


def health_request(service: str) -> bytes:
    """
    A framed C{HealthCheckRequest} asking after C{service} ("" for the
    server as a whole): field 1, a string.
    """
    name = service.encode("utf-8")
    if not name:
        return frame(b"")
    return frame(b"\x0a" + _varint(len(name)) + name)


def health_status(body: bytes) -> Optional[int]:
    """
    The C{status} of the framed C{HealthCheckResponse} in C{body}
    (C{UNKNOWN}, 0, when the field is absent), or L{None} if C{body} is
    not one message.
    """
    if len(body) < 5 or body[0] != 0:
        return None
    length = int.from_bytes(body[1:5], "big")
    message = body[5:]
    if len(message) != length:
        return None
    status = 0
    pos = 0
    try:
        while pos < len(message):
            key, pos = _read_varint(message, pos)
            kind = key & 7
            if kind == 0:
                value, pos = _read_varint(message, pos)
                if key >> 3 == 1:
                    status = value
            elif kind == 2:
                size, pos = _read_varint(message, pos)
                pos += size
            elif kind == 1:
                pos += 8
            elif kind == 5:
                pos += 4
            else:
                return None
    except IndexError:
        return None
    if pos != len(message):
        return None
    return status


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")
