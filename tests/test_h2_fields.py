"""
rrlb's HPACK encoder for responses (L{rrlb.h2fields.FieldEncoder}) against
the C{hpack} library's decoder, and the HTTP/2 spelling of response
headers.
"""

from __future__ import annotations

from hpack import Decoder
from twisted.trial import unittest

from rrlb.h2fields import FieldEncoder, encode_integer, h2_fields


class FieldEncoderTests(unittest.TestCase):
    """
    What FieldEncoder writes decodes to the fields it was given.
    """

    def roundtrip(self, blocks: list[list[tuple[bytes, bytes]]], table: int = 4096) -> None:
        encoder = FieldEncoder()
        decoder = Decoder()
        decoder.header_table_size = table
        for fields in blocks:
            decoded = decoder.decode(encoder.encode(fields), raw=True)
            self.assertEqual(decoded, fields)

    def test_static_and_literal_fields(self) -> None:
        """
        Full static-table entries (:status 200, 404), static names with
        other values, and new names, over several blocks on one connection.
        """
        block = [
            (b":status", b"200"),
            (b"content-type", b"text/plain"),
            (b"x-node", b"a"),
            (b"date", b"Mon, 07 Dec 2026 03:00:00 GMT"),
        ]
        self.roundtrip([block, [(b":status", b"404"), (b"x-node", b"b")], block])

    def test_long_names_and_values(self) -> None:
        """
        Lengths past the 7-bit prefix (127, 128, 202, 20,000) and an empty
        value.
        """
        fields = [
            (b":status", b"502"),
            (b"x-" + b"n" * 200, b"v" * 127),
            (b"x-a", b"v" * 128),
            (b"x-b", b"v" * 20000),
            (b"x-empty", b""),
        ]
        self.roundtrip([fields])

    def test_table_size_update_first(self) -> None:
        """
        The first block starts with a dynamic table size update to 0, which
        a decoder that allows no table at all accepts; later blocks do not
        repeat it.
        """
        encoder = FieldEncoder()
        first = encoder.encode([(b":status", b"200")])
        self.assertEqual(first, b"\x20\x88")
        self.assertEqual(encoder.encode([(b":status", b"200")]), b"\x88")
        decoder = Decoder()
        decoder.header_table_size = 0
        self.assertEqual(decoder.decode(first, raw=True), [(b":status", b"200")])

    def test_integers(self) -> None:
        """
        RFC 7541's examples of integer encoding (C.1).
        """
        self.assertEqual(encode_integer(10, 5), b"\x0a")
        self.assertEqual(encode_integer(1337, 5), b"\x1f\x9a\x0a")
        self.assertEqual(encode_integer(42, 8), b"\x2a")


class FieldsTests(unittest.TestCase):
    """
    Response headers spelled for HTTP/2.
    """

    def test_lower_case_no_connection_specific(self) -> None:
        """
        Names are lower-cased, every value kept, and connection-specific
        fields dropped.
        """
        raw = {
            b"Content-Type": [b"text/plain"],
            b"Set-Cookie": [b"a=1", b"b=2"],
            b"Connection": [b"close"],
            b"Keep-Alive": [b"timeout=5"],
            b"Transfer-Encoding": [b"chunked"],
        }
        self.assertEqual(
            h2_fields(raw),
            [(b"content-type", b"text/plain"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")],
        )
