# -*- test-case-name: tests.test_filters -*-
"""
Headers as filters see and change them (L{FilterHeaders}, part of the
public interface of L{rrlb.filters}, which names it again), and the two
checks every header a filter or an action writes passes: L{header_name}
(no hop-by-hop or framing header) and L{header_value} (no CR, LF or NUL).

Pure: no reactor, no I/O.
"""

from __future__ import annotations

from typing import Iterator, Optional

from twisted.web.http_headers import Headers

from rrlb._twisted import RAW_HEADERS_SLOT, HeaderNameError, canonical_name, raw_headers
from rrlb.http1 import HOP_BY_HOP_NAMES

__all__ = ["FORBIDDEN_NAMES", "FilterHeaders", "filter_headers", "header_name", "header_value"]

# Headers no filter may set, add or remove: the hop-by-hop ones and the
# framing (rrlb frames each message itself).
FORBIDDEN_NAMES = HOP_BY_HOP_NAMES | {b"Content-Length"}


# Names filters used, as they spelt them -> the key (those they may change).
# Names filters used, as they spelt them -> the key: those they may change
# (_KEYS), and every name they read by (_READ_KEYS). Bounded: past the size,
# names are worked out each time.
_KEYS: dict[str, bytes] = {}
_READ_KEYS: dict[str, bytes] = {}
_KEYS_SIZE = 1024


def header_name(name: str) -> bytes:
    """
    C{name} as L{Headers} keys it.

    @raise ValueError: it is not a header name, or one no filter may touch.
    """
    key = _KEYS.get(name) if type(name) is str else None
    if key is not None:
        return key
    if not isinstance(name, str):
        raise ValueError(f"a header name must be a str, not {name!r}")
    try:
        key = canonical_name(name.encode("ascii"))
    except (UnicodeEncodeError, HeaderNameError):
        raise ValueError(f"{name!r} is not a header name") from None
    if key in FORBIDDEN_NAMES:
        raise ValueError(f"{name} is a hop-by-hop or framing header; filters cannot change it")
    if len(_KEYS) < _KEYS_SIZE:
        _KEYS[name] = key
    return key


def _lookup_key(name: str) -> Optional[bytes]:
    # A name to read by: any header, hop-by-hop ones too; None if not a name.
    key = _READ_KEYS.get(name) if type(name) is str else None
    if key is None:
        try:
            key = canonical_name(name.encode("ascii"))
        except (AttributeError, UnicodeEncodeError, HeaderNameError):
            return None
        if len(_READ_KEYS) < _KEYS_SIZE:
            _READ_KEYS[name] = key
    return key


def header_value(name: str, value: str) -> bytes:
    """
    C{value} as it goes on the wire.

    @raise ValueError: it is not a C{str} of Latin-1 characters without CR,
        LF or NUL.
    """
    if not isinstance(value, str):
        raise ValueError(f"the value of {name} must be a str, not {type(value).__name__}")
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"the value of {name} has characters outside Latin-1") from None
    if b"\r" in raw or b"\n" in raw or b"\0" in raw:
        raise ValueError(f"the value of {name} has a CR, LF or NUL")
    return raw


class FilterHeaders(Headers):
    """
    A message's headers as a filter changes them: C{str} names (any case)
    and values. Hop-by-hop and framing headers cannot be changed, and a
    value with CR, LF or NUL is refused (L{ValueError}).

    Every request of the proxy keeps its request and response headers in
    one of these from the start (L{rrlb.proxy.ProxyRequest}), so that a
    filter reads and changes them with no object made for it. It is a
    L{Headers}, whose C{bytes} methods stay for the code that serves the
    request; filters use the methods below.
    """

    __slots__ = ()

    # The name -> values dict the Headers keeps: read and changed in place.
    _raw = RAW_HEADERS_SLOT

    def get(self, name: str) -> Optional[str]:
        """
        The header's values joined by C{", "}, or L{None} without one.
        """
        # (The names seen before, without a call; a name of another type,
        # unhashable or not, goes the long way.)
        key: Optional[bytes]
        try:
            key = _READ_KEYS[name]
        except (KeyError, TypeError):
            key = _lookup_key(name)
            if key is None:
                return None
        values = self._raw.get(key)
        if not values:
            return None
        if len(values) == 1:
            return values[0].decode("latin-1")
        return b", ".join(values).decode("latin-1")

    def get_all(self, name: str) -> list[str]:
        """
        Each line of the header, in order (none: an empty list).
        """
        key = _lookup_key(name)
        if key is None:
            return []
        return [v.decode("latin-1") for v in self._raw.get(key, ())]

    def set(self, name: str, value: str) -> None:
        """
        Make C{value} the header's only value.
        """
        try:
            key = _KEYS[name]
        except (KeyError, TypeError):
            key = header_name(name)
        if type(value) is str:
            try:
                raw = value.encode("latin-1")
            except UnicodeEncodeError:
                raw = header_value(name, value)  # raises
            # (An int needle: a bytes one costs more than the search.)
            if 13 in raw or 10 in raw or 0 in raw:  # CR, LF, NUL
                raw = header_value(name, value)  # raises
            self._raw[key] = [raw]
        else:
            self._raw[key] = [header_value(name, value)]

    def add(self, name: str, value: str) -> None:
        """
        Add C{value} as one more line of the header.
        """
        key = header_name(name)
        self._raw.setdefault(key, []).append(header_value(name, value))

    def remove(self, name: str) -> None:
        """
        Remove the header (nothing happens without one).
        """
        self._raw.pop(header_name(name), None)

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for key, values in list(self._raw.items()):
            for value in values:
                yield key.decode("ascii"), value.decode("latin-1")


def filter_headers(headers: Headers) -> FilterHeaders:
    """
    C{headers} as a L{FilterHeaders}: itself if it is one (every request of
    the proxy), else one that reads and changes the same dict.
    """
    if isinstance(headers, FilterHeaders):
        return headers
    view = FilterHeaders()
    view._raw = raw_headers(headers)
    return view
