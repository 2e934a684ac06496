"""
The pieces of gRPC's wire format rrlb writes and reads by hand
(L{rrlb.grpcwire}): which requests are gRPC, grpc-timeout values, statuses
for rrlb's own answers, and grpc.health.v1 messages, checked against
grpcio's own protobuf classes.
"""

from __future__ import annotations

from twisted.trial import unittest

from rrlb import grpcwire


class ContentTypeTests(unittest.TestCase):
    """
    C{is_grpc} knows gRPC's content types.
    """

    def test_grpc_types(self) -> None:
        """
        application/grpc and its +proto, +json and parameter forms are gRPC,
        in any case; other types and none are not.
        """
        for value in (b"application/grpc", b"application/grpc+proto", b"Application/GRPC+json",
                      b"application/grpc;charset=utf-8"):  # fmt: skip
            self.assertTrue(grpcwire.is_grpc([value]), value)
        for value in (b"application/grpcx", b"application/json", b"text/grpc"):
            self.assertFalse(grpcwire.is_grpc([value]), value)
        self.assertFalse(grpcwire.is_grpc(None))


class TimeoutTests(unittest.TestCase):
    """
    grpc-timeout values: up to 8 digits and a unit.
    """

    def test_units(self) -> None:
        """
        Each unit converts to seconds.
        """
        cases = {b"1H": 3600.0, b"2M": 120.0, b"3S": 3.0, b"250m": 0.25, b"5000u": 0.005,
                 b"7000000n": 0.007}  # fmt: skip
        for value, seconds in cases.items():
            self.assertAlmostEqual(grpcwire.parse_timeout(value), seconds)

    def test_bad_values(self) -> None:
        """
        No unit, a bad unit, no digits, more than 8 digits or a sign: not a
        timeout.
        """
        for value in (b"", b"100", b"100x", b"S", b"123456789S", b"-1S", b"1.5S"):
            self.assertIsNone(grpcwire.parse_timeout(value), value)


class StatusTests(unittest.TestCase):
    """
    The statuses rrlb answers gRPC calls with.
    """

    def test_issue_statuses(self) -> None:
        """
        No node or a failed connection (502, 503): UNAVAILABLE; a timeout
        (504): DEADLINE_EXCEEDED; a rate limit (429): RESOURCE_EXHAUSTED.
        """
        self.assertEqual(grpcwire.status_for(502), grpcwire.UNAVAILABLE)
        self.assertEqual(grpcwire.status_for(503), grpcwire.UNAVAILABLE)
        self.assertEqual(grpcwire.status_for(504), grpcwire.DEADLINE_EXCEEDED)
        self.assertEqual(grpcwire.status_for(429), grpcwire.RESOURCE_EXHAUSTED)
        self.assertEqual(grpcwire.status_for(418), grpcwire.UNKNOWN)

    def test_message_encoding(self) -> None:
        """
        grpc-message is percent-encoded UTF-8: no CR, LF or non-ASCII byte
        goes out raw.
        """
        self.assertEqual(grpcwire.message_value("a b\r\n\u00e9%"), b"a b%0D%0A%C3%A9%25")


class HealthMessageTests(unittest.TestCase):
    """
    grpc.health.v1 messages by hand agree with grpcio's protobuf classes.
    """

    def setUp(self) -> None:
        try:
            from grpc_health.v1 import health_pb2
        except ImportError:
            raise unittest.SkipTest("grpcio-health-checking is not installed") from None
        self.pb = health_pb2

    def test_request(self) -> None:
        """
        The request for a service, and for the whole server, parses as
        HealthCheckRequest with that service.
        """
        for service in ("", "my.Service", "x" * 300):
            framed = grpcwire.health_request(service)
            self.assertEqual(framed[0], 0)
            self.assertEqual(int.from_bytes(framed[1:5], "big"), len(framed) - 5)
            message = self.pb.HealthCheckRequest.FromString(framed[5:])
            self.assertEqual(message.service, service)

    def test_response(self) -> None:
        """
        Each status grpcio writes reads back; a body that is not one framed
        message reads as L{None}.
        """
        for status in (0, 1, 2, 3):
            message = self.pb.HealthCheckResponse(status=status).SerializeToString()
            self.assertEqual(grpcwire.health_status(grpcwire.frame(message)), status)
        serving = grpcwire.frame(self.pb.HealthCheckResponse(status=1).SerializeToString())
        truncated = b"\x00\x00\x00\x00\x01\x08"
        for bad in (b"", serving[:-1], serving + b"x", b"\x01" + serving[1:], truncated):
            self.assertIsNone(grpcwire.health_status(bad), bad)
