"""
The HTTP/1.1 rules of L{rrlb.http1}, each defined once and derived from
the one hop-by-hop set.
"""

from __future__ import annotations

from twisted.trial import unittest

from rrlb import http1
from rrlb._twisted import canonical_name


class HopByHopTests(unittest.TestCase):
    """
    The sets derived from L{http1.HOP_BY_HOP} spell names as the parsers
    key them.
    """

    def test_canonical_spelling(self) -> None:
        """
        The canonical set is the lower-case one as Twisted spells it: C{TE},
        not C{Te}.
        """
        self.assertEqual(
            http1.HOP_BY_HOP_NAMES, {canonical_name(name) for name in http1.HOP_BY_HOP}
        )
        self.assertIn(b"TE", http1.HOP_BY_HOP_NAMES)
        self.assertNotIn(b"Te", http1.HOP_BY_HOP_NAMES)

    def test_switching_head(self) -> None:
        """
        A 101 keeps Upgrade, Connection and the node's own headers and
        loses every other hop-by-hop header and the framing.
        """
        headers = {name: [b"x"] for name in http1.HOP_BY_HOP_NAMES}
        headers[b"Content-Length"] = [b"0"]
        headers[b"Sec-Websocket-Accept"] = [b"abc"]
        head = http1.switching_head(b"", headers)
        self.assertEqual(
            head,
            b"HTTP/1.1 101 Switching Protocols\r\n"
            + b"".join(
                name + b": " + values[0] + b"\r\n"
                for name, values in headers.items()
                if name in (b"Connection", b"Upgrade", b"Sec-Websocket-Accept")
            )
            + b"\r\n",
        )

    def test_h2_connection_specific(self) -> None:
        """
        HTTP/2 drops the connection-specific headers of RFC 9113 8.2.2,
        lower-cased.
        """
        self.assertEqual(
            http1.H2_CONNECTION_SPECIFIC,
            {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"},
        )


class ConnectionTokenTests(unittest.TestCase):
    """
    C{Connection} values become lower-cased tokens.
    """

    def test_tokens(self) -> None:
        """
        Lists over several lines, blanks and case all fold.
        """
        self.assertEqual(
            http1.connection_tokens([b"Keep-Alive, X-Foo", b" ,close,"]),
            {b"keep-alive", b"x-foo", b"close"},
        )

    def test_canonical_of_bad_name(self) -> None:
        """
        A token that is no header name is kept as it is, matching nothing.
        """
        self.assertEqual(http1.canonical(b"x-foo"), b"X-Foo")
        self.assertEqual(http1.canonical(b"bad name"), b"bad name")


class RewriteRequestHeadTests(unittest.TestCase):
    """
    L{http1.rewrite_request_head} drops what is hop-by-hop and adds the
    forwarding headers.
    """

    def test_hop_by_hop_and_named_dropped(self) -> None:
        """
        Hop-by-hop headers and those C{Connection} names go; the others,
        X-Forwarded-* and Via are sent, with a zero length for a declared
        empty body.
        """
        raw = {
            b"Connection": [b"x-private"],
            b"X-Private": [b"1"],
            b"TE": [b"trailers"],
            b"Accept": [b"*/*"],
            b"Content-Length": [b"0"],
        }
        tail, upgrade, expect = http1.rewrite_request_head(
            raw, b"GET", None, b"example.com", (b"http", b"10.0.0.9"), http1.EDGE_OFF, b"HTTP/1.1"
        )
        self.assertEqual(
            tail,
            b"Accept: */*\r\nX-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: http\r\n"
            b"X-Forwarded-Host: example.com\r\nVia: 1.1 rrlb\r\nContent-Length: 0\r\n\r\n",
        )
        self.assertIsNone(upgrade)
        self.assertFalse(expect)

    def test_websocket_upgrade(self) -> None:
        """
        A WebSocket upgrade keeps its Upgrade token and asks the node for it.
        """
        raw = {b"Connection": [b"Upgrade"], b"Upgrade": [b"WebSocket"]}
        tail, upgrade, _ = http1.rewrite_request_head(
            raw, b"GET", None, None, (b"http", b""), http1.EDGE_OFF, b"HTTP/1.1"
        )
        self.assertEqual(upgrade, b"WebSocket")
        self.assertTrue(tail.endswith(b"Connection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n"))

    def test_untrusted_claims_dropped(self) -> None:
        """
        From an untrusted peer, client claims in any spelling are dropped
        and X-Forwarded-For is rrlb's alone.
        """
        raw = {b"X_forwarded_for": [b"1.2.3.4"], b"X-Forwarded-For": [b"5.6.7.8"]}
        tail, _, _ = http1.rewrite_request_head(
            raw, b"GET", None, None, (b"http", b"10.0.0.9"), http1.EDGE_UNTRUSTED, b"HTTP/1.0"
        )
        self.assertEqual(
            tail, b"X-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: http\r\nVia: 1.0 rrlb\r\n\r\n"
        )
