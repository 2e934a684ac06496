"""
The private Twisted names rrlb leans on (see L{rrlb._twisted}) still exist
and still mean what rrlb takes them to mean. A Twisted release that changes
one fails here, loudly, instead of in requests.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from rrlb import _twisted
from rrlb.proxy import ProxyRequest, ProxySite


class HeadersTests(unittest.TestCase):
    """
    L{Headers} keeps a dict of canonical name -> values in C{_rawHeaders},
    and spells names with C{_nameEncoder}.
    """

    def test_raw_headers_dict(self) -> None:
        """
        The dict is what the public methods read and write.
        """
        headers = Headers()
        headers.addRawHeader(b"x-thing", b"1")
        headers.addRawHeader(b"X-THING", b"2")
        self.assertEqual(_twisted.raw_headers(headers), {b"X-Thing": [b"1", b"2"]})
        _twisted.set_raw_headers(headers, {b"Content-Type": [b"a"], b"X-A": [b"1", b"2"]})
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"a"])
        self.assertEqual(headers.getRawHeaders("x-a"), ["1", "2"])
        self.assertEqual(
            sorted(headers.getAllRawHeaders()), [(b"Content-Type", [b"a"]), (b"X-A", [b"1", b"2"])]
        )

    def test_canonical_names(self) -> None:
        """
        Names are spelled as Headers spells them, and non-tokens refused.
        """
        for name, canonical in (
            (b"content-type", b"Content-Type"),
            (b"x-forwarded-for", b"X-Forwarded-For"),
            (b"te", b"TE"),
            (b"www-authenticate", b"WWW-Authenticate"),
            (b"etag", b"ETag"),
        ):
            self.assertEqual(_twisted.canonical_name(name), canonical)
            headers = Headers()
            headers.addRawHeader(name, b"v")
            self.assertEqual(list(_twisted.raw_headers(headers)), [canonical])
        for bad in (b"", b"a b", b"a:", b" a", b"a\t", b"\xc3\xa9"):
            self.assertRaises(_twisted.HeaderNameError, _twisted.canonical_name, bad)


class Answer(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"ok"


class ChannelTests(unittest.TestCase):
    """
    The L{HTTPChannel} and L{Request} state rrlb.channel and rrlb.proxy use.
    """

    def connect(self, site: Any) -> Any:
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        # server.Site wraps its channel in _GenericHTTPChannelProtocol.
        channel = getattr(channel, "_channel", channel)
        channel.makeConnection(StringTransport())
        self.addCleanup(channel.connectionLost, Failure(ConnectionDone()))
        return channel

    def test_channel_state(self) -> None:
        """
        A connected HTTPChannel has the producer state rrlb reads and sets.
        """
        channel = self.connect(server.Site(Answer()))
        for name in _twisted.CHANNEL_STATE:
            self.assertTrue(hasattr(channel, name), name)
        self.assertIs(channel._handlingRequest, False)
        self.assertIs(channel._waitingForTransport, False)
        self.assertIsNone(channel._requestProducer)

    def test_request_disconnected(self) -> None:
        """
        Request._disconnected turns true when the client goes away.
        """
        channel = self.connect(server.Site(Answer()))
        request = server.Request(channel)
        self.assertFalse(_twisted.client_gone(request))
        request.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(_twisted.client_gone(request))

    def test_proxy_request_attributes(self) -> None:
        """
        ProxyRequest's own constructor sets every attribute Twisted's sets.
        """
        site = ProxySite(Answer(), reactor=None)  # type: ignore[arg-type]
        channel = self.connect(site)
        twisted_own = server.Request(channel)
        ours = ProxyRequest(channel)
        missing = set(vars(twisted_own)) - set(vars(ours))
        # Only read by Request.requestReceived, which ProxyRequest overrides
        # (and never calls).
        self.assertEqual(missing, {"_parsePOSTFormSubmission"})
        self.assertIsNot(ProxyRequest.requestReceived, http.Request.requestReceived)
        self.assertEqual(set(vars(ours)) - set(vars(twisted_own)), set())
        self.assertEqual(ours.client, twisted_own.client)
        self.assertEqual(ours.host, twisted_own.host)

    def test_request_received_contract(self) -> None:
        """
        Request.requestReceived still takes (command, path, version), which
        ProxyRequest overrides.
        """
        import inspect

        parameters = list(inspect.signature(http.Request.requestReceived).parameters)
        self.assertEqual(parameters, ["self", "command", "path", "version"])


class EndpointServiceTests(unittest.TestCase):
    """
    StreamServerEndpointService's private state that rrlb.listeners uses.
    """

    def test_waiting_for_port(self) -> None:
        """
        _waitingForPort and _raiseSynchronously exist.
        """
        service = StreamServerEndpointService(None, None)
        self.assertIsNone(service._waitingForPort)
        self.assertIsNone(_twisted.port_waiting(service))
        self.assertFalse(service._raiseSynchronously)
        _twisted.bind_synchronously(service)
        self.assertIs(service._raiseSynchronously, True)


class ExitSignalTests(unittest.TestCase):
    """
    The signal twistd re-raises after the reactor stopped is the reactor's
    C{_exitSignal}.
    """

    def test_clear_exit_signal(self) -> None:
        """
        L{_twisted.clear_exit_signal} forgets SIGTERM and SIGINT only, on a
        real reactor class that has the attribute.
        """
        import signal

        from twisted.internet.base import ReactorBase

        self.assertIn("_exitSignal", vars(ReactorBase))
        self.assertIn("_exitSignal", ReactorBase.sigTerm.__code__.co_names)

        class Reactor:
            _exitSignal: object = signal.SIGTERM

        reactor = Reactor()
        _twisted.clear_exit_signal(reactor, (signal.SIGTERM, signal.SIGINT))
        self.assertIsNone(reactor._exitSignal)
        reactor._exitSignal = signal.SIGHUP
        _twisted.clear_exit_signal(reactor, (signal.SIGTERM, signal.SIGINT))
        self.assertEqual(reactor._exitSignal, signal.SIGHUP)


class HTTP2Tests(unittest.TestCase):
    """
    What rrlb.http2 leans on in Twisted's private HTTP/2 module.
    """

    def test_names(self) -> None:
        """
        Every method rrlb.http2 overrides and every attribute it uses is
        still there.
        """
        # h2 is a dependency (twisted[http2]): no skip when it is missing.
        import h2.config
        import h2.connection
        from twisted.web import _http2

        for cls, names in _twisted.H2_OVERRIDES.items():
            for name in names:
                self.assertTrue(callable(getattr(getattr(_http2, cls), name, None)), name)
        clock = Clock()
        connection = _http2.H2Connection(clock)
        connection.requestFactory = lambda channel, queued: http.Request(channel, queued)
        connection.makeConnection(StringTransport())
        for name in _twisted.H2_STATE["H2Connection"]:
            self.assertTrue(hasattr(connection, name), name)
        client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        client.initiate_connection()
        client.send_headers(
            1, [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"https"),
                (b":authority", b"x")],
        )  # fmt: skip
        connection.dataReceived(client.data_to_send())
        (stream,) = connection.streams.values()
        for name in _twisted.H2_STATE["H2Stream"]:
            self.assertTrue(hasattr(stream, name), name)
        connection.connectionLost(Failure(ConnectionDone()))
        clock.advance(1)


class ClientPoolTests(unittest.TestCase):
    """
    The private factory hook behind L{_twisted.quiet_connection_pool}.
    """

    def test_quiet_factory(self) -> None:
        """
        The pool still builds its connections' factory from C{_factory}, and
        the quiet pool's factory does not log.
        """
        from twisted.web import client

        self.assertTrue(issubclass(client.HTTPConnectionPool._factory, client._HTTP11ClientFactory))
        pool = _twisted.quiet_connection_pool(Clock(), persistent=False)
        self.assertIsInstance(pool, client.HTTPConnectionPool)
        self.assertFalse(pool.persistent)
        self.assertIs(pool._factory.noisy, False)


class SystemdTests(unittest.TestCase):
    """
    The descriptors C{systemd:} endpoints take live in
    C{_SystemdParser._sddaemon}.
    """

    def test_adopt(self) -> None:
        """
        Descriptors adopted through L{_twisted.adopt_systemd_descriptors} are
        what a C{systemd:} endpoint string finds.
        """
        from twisted.internet import endpoints
        from twisted.python.systemd import ListenFDs

        saved = _twisted.systemd_descriptors()
        self.addCleanup(_twisted.adopt_systemd_descriptors, saved)
        self.assertIsInstance(saved, ListenFDs)
        _twisted.adopt_systemd_descriptors(ListenFDs([3], ("web",)))
        self.assertEqual(endpoints._SystemdParser._sddaemon.inheritedDescriptors(), [3])
        self.assertEqual(_twisted.systemd_descriptors().inheritedNamedDescriptors(), {"web": 3})
