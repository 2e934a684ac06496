# -*- test-case-name: tests.test_h2_fields -*-
"""
Response header fields for HTTP/2 clients, made cheaply.

 - L{h2_fields}: a response's headers (as rrlb keeps them: canonical name
   -> values) as HTTP/2 fields: lower-case names, no connection-specific
   field (RFC 9113 8.2.2).
 - L{FieldEncoder}: HPACK (RFC 7541) for the fields rrlb sends, in place of
   the C{hpack} library's encoder on rrlb's server connections. It never
   uses the dynamic table (it tells the client so, once, with a table size
   update to 0), so encoding keeps no state and each field's bytes are
   cached: a full static-table match is one byte, a name's prefix is looked
   up, and a value is written as a plain literal (no Huffman coding). The
   C{hpack} encoder spent more of an HTTP/2 request's CPU than rrlb's whole
   HTTP/1.1 response head; the client's fields are still decoded by
   C{hpack}'s decoder (they may use the dynamic table).
"""

from __future__ import annotations

from hpack.table import HeaderTable

from rrlb.http1 import H2_CONNECTION_SPECIFIC

# Header names as HTTP/2 spells them (lower case), by the name the response
# headers are kept under; at most this many distinct names are cached.
_NAME_CACHE_SIZE = 4096
_lower: dict[bytes, bytes] = {}


def h2_fields(raw: dict[bytes, list[bytes]]) -> list[tuple[bytes, bytes]]:
    """
    The header fields of C{raw} (name -> values) for an HTTP/2 client:
    lower-case names, no connection-specific field.
    """
    fields = []
    lower = _lower
    for name, values in raw.items():
        key = lower.get(name)
        if key is None:
            key = name.lower()
            if len(lower) < _NAME_CACHE_SIZE:
                lower[name] = key
        if key in H2_CONNECTION_SPECIFIC:
            continue
        for value in values:
            fields.append((key, value))
    return fields


def encode_integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """
    C{value} as an HPACK integer with a C{prefix_bits}-bit prefix, OR-ed
    into the pattern bits C{first} of its first byte (RFC 7541 5.1).
    """
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _static() -> tuple[dict[tuple[bytes, bytes], bytes], dict[bytes, bytes]]:
    """
    The static table (RFC 7541 appendix A) as encodings: an indexed field
    (section 6.1) for each full entry, and for each name the prefix of a
    literal field without indexing with that indexed name (6.2.2).
    """
    pairs: dict[tuple[bytes, bytes], bytes] = {}
    names: dict[bytes, bytes] = {}
    for index, (name, value) in enumerate(HeaderTable.STATIC_TABLE, 1):
        if value:
            pairs.setdefault((name, value), encode_integer(index, 7, 0x80))
        names.setdefault(name, encode_integer(index, 4))
    return pairs, names


_STATIC_PAIRS, _STATIC_NAMES = _static()
# A literal's length when it is shorter than the 7-bit prefix: one byte.
_SHORT = [bytes((n,)) for n in range(127)]
# A dynamic table size update to 0 (RFC 7541 6.3).
_NO_TABLE = b"\x20"


class FieldEncoder:
    """
    An HPACK encoder that never indexes: what C{h2} needs of one (its
    C{encode} and C{header_table_size}).

    @ivar header_table_size: the client's SETTINGS_HEADER_TABLE_SIZE, as
        C{h2} sets it; the dynamic table stays empty whatever it is.
    """

    # Prefixes of names outside the static table, shared by every
    # connection (they depend on the name only); at most this many.
    _names: dict[bytes, bytes] = dict(_STATIC_NAMES)
    _NAMES_CACHED = 4096

    def __init__(self) -> None:
        self.header_table_size = 4096
        self._first = True

    def encode(self, headers: list[tuple[bytes, bytes]], huffman: bool = True) -> bytes:
        """
        The header block of C{headers} (names lower-case, as bytes).
        """
        out = []
        if self._first:
            # The table is never used: say so once, so that the client's
            # limits, whatever they become, are never exceeded.
            self._first = False
            out.append(_NO_TABLE)
        pairs = _STATIC_PAIRS
        names = self._names
        short = _SHORT
        for name, value in headers:
            code = pairs.get((name, value))
            if code is not None:
                out.append(code)
                continue
            prefix = names.get(name)
            if prefix is None:
                prefix = b"\x00" + encode_integer(len(name), 7) + name
                if len(names) < self._NAMES_CACHED + len(_STATIC_NAMES):
                    names[name] = prefix
            size = len(value)
            out.append(prefix)
            out.append(short[size] if size < 127 else encode_integer(size, 7))
            out.append(value)
        return b"".join(out)
