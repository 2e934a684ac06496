"""
Wire-exactness tests: rrlb between a raw client and raw backends over real
loopback sockets.

The backends here are plain Protocols that record the exact bytes of every
request they receive and answer with exact canned bytes; the clients send
exact request bytes and keep every response byte. That lets the tests assert
what a higher-level HTTP library would hide: header order, repeated headers,
reason phrases, chunked framing, bodies cut short, writes blocked.

The raw backend and client and L{WireCase} are in L{tests.support}.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

from twisted.internet.endpoints import connectProtocol

from rrlb import body as body_module
from tests.support import (
    LOOPBACK,
    BackendConnection,
    BulkProducer,
    RecordedRequest,
    WireCase,
    WireClient,
    by_name,
    chunked_body,
    get,
    post,
    reactor,
    read_then_pause,
    reads,
    response,
    rrlb_end,
    wait_for,
)

# -- a raw backend -------------------------------------------------------------


# -- a raw client --------------------------------------------------------------


# -- a test case with the three pieces -------------------------------------------


# -- requests ----------------------------------------------------------------------


class RequestForwardingTests(WireCase):
    """
    What a node receives for what a client sent.
    """

    async def test_encoded_target_forwarded_byte_for_byte(self) -> None:
        """
        The request target reaches the node exactly as received: percent
        escapes (even an encoded slash) and the query untouched.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        target = b"/a%2Fb/%7Euser?q=%20&x=1"
        result = await self.exchange(port, get(target))
        assert result is not None
        self.assertEqual(result.code, 200)
        self.assertEqual(backend.requests[0].target, target)
        self.assertTrue(backend.requests[0].raw.startswith(b"GET " + target + b" HTTP/1.1\r\n"))

    async def test_base_path_prefixed(self) -> None:
        """
        A node with a base path gets it in front of the target, which is
        otherwise byte for byte what the client sent.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url + "/base/app"])
        await self.exchange(port, get(b"/a%2Fb/%7Euser?q=%20&x=1"))
        self.assertEqual(backend.requests[0].target, b"/base/app/a%2Fb/%7Euser?q=%20&x=1")

    async def test_repeated_headers_keep_values_and_order(self) -> None:
        """
        Every end-to-end header reaches the node with all its values in
        order, repeated ones included; nothing is merged or dropped.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        sent = [
            (b"Accept", b"text/html"),
            (b"X-Multi", b"one"),
            (b"Cookie", b"a=1"),
            (b"X-Multi", b"two, three"),
            (b"x-lower-case", b"Mixed Case Value"),
            (b"Cookie", b"b=2"),
            (b"X-Multi", b"four"),
            (b"Authorization", b"Bearer abc=="),
        ]
        lines = [b"%s: %s" % pair for pair in sent]
        await self.exchange(port, get(b"/h", b"client.example", *lines))
        got = backend.requests[0].headers
        expected = by_name(sent)
        received = by_name(got)
        for name, vals in expected.items():
            self.assertEqual(received.get(name), vals, name)
        # The names keep the order in which they first appeared.
        first = [n for n in dict.fromkeys(n.lower() for n, _ in got) if n in expected]
        self.assertEqual(first, list(expected))

    async def test_hop_by_hop_request_headers_dropped(self) -> None:
        """
        Hop-by-hop headers (RFC 9110 7.6.1) and every header named in
        Connection stop at rrlb; the end-to-end ones around them pass.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        request = get(
            b"/",
            b"client.example",
            b"Connection: keep-alive, X-Hop-One,x-hop-two",
            b"Keep-Alive: timeout=5",
            b"Proxy-Connection: keep-alive",
            b"TE: trailers",
            b"Trailer: X-Checksum",
            b"Proxy-Authorization: Basic cHJveHk6c2VjcmV0",
            b"Proxy-Authenticate: Basic realm=x",
            b"X-Hop-One: secret",
            b"X-Hop-Two: secret",
            b"X-Keep: kept",
        )
        result = await self.exchange(port, request)
        assert result is not None
        self.assertEqual(result.code, 200)
        names = {n.lower() for n, _ in backend.requests[0].headers}
        for hop in (
            b"connection",
            b"keep-alive",
            b"proxy-connection",
            b"te",
            b"trailer",
            b"transfer-encoding",
            b"upgrade",
            b"proxy-authorization",
            b"proxy-authenticate",
            b"x-hop-one",
            b"x-hop-two",
        ):
            self.assertNotIn(hop, names)
        self.assertEqual(backend.requests[0].header(b"x-keep"), [b"kept"])

    async def test_upgrade_request_header_dropped(self) -> None:
        """
        Upgrade (with Connection: upgrade) to anything but WebSocket is
        hop-by-hop: the node sees neither, and gets an ordinary request.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        result = await self.exchange(
            port, get(b"/ws", b"client.example", b"Connection: Upgrade", b"Upgrade: TLS/1.2")
        )
        assert result is not None
        self.assertEqual(result.code, 200)
        names = {n.lower() for n, _ in backend.requests[0].headers}
        self.assertNotIn(b"upgrade", names)
        self.assertNotIn(b"connection", names)

    async def test_client_host_by_default(self) -> None:
        """
        By default the node gets the client's Host, once.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        await self.exchange(port, get(b"/", b"Client.Example:8080"))
        self.assertEqual(backend.requests[0].header(b"host"), [b"Client.Example:8080"])

    async def test_node_host_option(self) -> None:
        """
        With --node-host each node gets its own host:port as Host.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url], "--node-host")
        await self.exchange(port, get(b"/", b"client.example"))
        node_port = backend.port.getHost().port
        self.assertEqual(backend.requests[0].header(b"host"), [b"127.0.0.1:%d" % node_port])

    async def test_node_host_yaml(self) -> None:
        """
        YAML C{node_host: true} does what --node-host does.
        """
        backend = await self.backend()
        fd, path = tempfile.mkstemp(suffix=".yaml")
        self.addCleanup(os.remove, path)
        with os.fdopen(fd, "w") as f:
            f.write(f"nodes:\n  - {backend.url}\nnode_host: true\n")
        _, port = await self.balancer([], "--config", path)
        await self.exchange(port, get(b"/", b"client.example"))
        node_port = backend.port.getHost().port
        self.assertEqual(backend.requests[0].header(b"host"), [b"127.0.0.1:%d" % node_port])

    async def test_no_client_host(self) -> None:
        """
        An HTTP/1.0 request without Host still reaches the node with a Host
        (the node's own), as HTTP/1.1 requires.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        await self.exchange(port, b"GET /old HTTP/1.0\r\n\r\n")
        node_port = backend.port.getHost().port
        self.assertEqual(backend.requests[0].header(b"host"), [b"127.0.0.1:%d" % node_port])
        self.assertEqual(backend.requests[0].version, b"HTTP/1.1")

    async def test_forwarded_headers_set(self) -> None:
        """
        X-Forwarded-For is the client address, X-Forwarded-Proto http,
        X-Forwarded-Host the client's Host, Via 1.1 rrlb: one of each.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        await self.exchange(port, get(b"/", b"client.example:8080"))
        request = backend.requests[0]
        self.assertEqual(request.header(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(request.header(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(request.header(b"x-forwarded-host"), [b"client.example:8080"])
        self.assertEqual(request.header(b"via"), [b"1.1 rrlb"])

    async def test_forwarded_for_appended(self) -> None:
        """
        Existing X-Forwarded-For values are kept, in order, with the client
        address appended, ", " separated; a client's own X-Forwarded-Proto
        and X-Forwarded-Host are replaced, an existing Via is extended.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        await self.exchange(
            port,
            get(
                b"/",
                b"client.example",
                b"X-Forwarded-For: 10.0.0.1",
                b"X-Forwarded-Proto: https",
                b"X-Forwarded-For: 10.0.0.2, 10.0.0.3",
                b"X-Forwarded-Host: spoofed.example",
                b"Via: 1.0 fred",
            ),
        )
        request = backend.requests[0]
        self.assertEqual(
            request.header(b"x-forwarded-for"), [b"10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"]
        )
        self.assertEqual(request.header(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(request.header(b"x-forwarded-host"), [b"client.example"])
        self.assertEqual(request.header(b"via"), [b"1.0 fred, 1.1 rrlb"])

    async def test_forwarded_proto_https(self) -> None:
        """
        A request that came in over TLS is forwarded with
        X-Forwarded-Proto: https.
        """
        from twisted.internet import ssl
        from twisted.internet.endpoints import SSL4ClientEndpoint
        from twisted.test import __file__ as twisted_test

        pem = os.path.join(os.path.dirname(twisted_test), "server.pem")
        backend = await self.backend()
        _, port = await self.balancer(
            [backend.url],
            listen=f"ssl:0:interface={LOOPBACK}:privateKey={pem}:certKey={pem}",
        )
        client = WireClient()
        options = ssl.CertificateOptions(verify=False)
        await connectProtocol(SSL4ClientEndpoint(reactor, LOOPBACK, port, options), client)
        self.addCleanup(client.close)
        client.send(get(b"/tls", b"secure.example"))
        result = await client.response()
        assert result is not None
        self.assertEqual(result.code, 200)
        self.assertEqual(backend.requests[0].header(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(backend.requests[0].header(b"x-forwarded-host"), [b"secure.example"])

    async def test_large_post_body(self) -> None:
        """
        A 5 MB POST body reaches the node whole, with its length, its
        sha256 intact, and no chunked framing.
        """

        def digest(request: RecordedRequest, conn: BackendConnection) -> bytes:
            return response(body=hashlib.sha256(request.body).hexdigest().encode())

        backend = await self.backend(digest)
        _, port = await self.balancer([backend.url])
        body = os.urandom(5 * 1024 * 1024)
        head = (
            b"POST /upload HTTP/1.1\r\nHost: client.example\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        result = await self.exchange(port, head + body)
        assert result is not None
        self.assertEqual(result.code, 200)
        self.assertEqual(result.body, hashlib.sha256(body).hexdigest().encode())
        request = backend.requests[0]
        self.assertEqual(request.header(b"content-length"), [b"%d" % len(body)])
        self.assertEqual(request.header(b"transfer-encoding"), [])
        self.assertEqual(request.header(b"content-type"), [b"application/octet-stream"])

    async def test_chunked_request_body(self) -> None:
        """
        A chunked request body is forwarded with its Content-Length instead
        of the chunked framing, byte for byte.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        await self.exchange(
            port,
            b"PUT /c HTTP/1.1\r\nHost: client.example\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked_body(b"hello ", b"chunked ", b"world"),
        )
        request = backend.requests[0]
        self.assertEqual(request.body, b"hello chunked world")
        self.assertEqual(request.header(b"content-length"), [b"19"])
        self.assertEqual(request.header(b"transfer-encoding"), [])

    async def test_bodiless_get_has_no_length(self) -> None:
        """
        A GET without a body is forwarded without Content-Length or
        Transfer-Encoding.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        await self.exchange(port, get(b"/"))
        request = backend.requests[0]
        self.assertEqual(request.header(b"content-length"), [])
        self.assertEqual(request.header(b"transfer-encoding"), [])
        self.assertEqual(request.body, b"")

    async def test_expect_100_continue(self) -> None:
        """
        A client that sends Expect: 100-continue gets 100 Continue (here
        from rrlb, as this node never answers the Expect itself), then its
        body reaches the node and the node's answer comes back.
        """
        backend = await self.backend(lambda request, conn: response(body=b"got " + request.body))
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(
            b"POST /e HTTP/1.1\r\nHost: client.example\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\n\r\n"
        )
        await wait_for(lambda: b"\r\n\r\n" in client.data, "100 Continue")
        self.assertTrue(bytes(client.data).startswith(b"HTTP/1.1 100 Continue\r\n"), client.data)
        self.assertEqual(backend.requests, [])
        client.send(b"hello")
        result = await client.response()
        assert result is not None
        self.assertEqual(result.code, 200)
        self.assertEqual(result.body, b"got hello")
        self.assertEqual(backend.requests[0].body, b"hello")
        self.assertEqual(backend.requests[0].header(b"expect"), [b"100-continue"])

    async def test_expect_100_continue_from_the_node(self) -> None:
        """
        A node that answers Expect: 100-continue with its own 100 Continue
        has it passed on to the client at once, once only.
        """
        # rrlb's own 100 after a silent node would come too late to count.
        self.patch(body_module, "CONTINUE_WAIT", 60.0)
        backend = await self.backend(
            lambda request, conn: response(body=b"got " + request.body),
            interim=b"HTTP/1.1 100 Continue\r\n\r\n",
        )
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(
            b"POST /e HTTP/1.1\r\nHost: client.example\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\n\r\n"
        )
        await wait_for(lambda: b"\r\n\r\n" in client.data, "100 Continue")
        client.send(b"hello")
        result = await client.response()
        assert result is not None
        self.assertEqual(result.body, b"got hello")
        self.assertEqual(bytes(client.data).count(b"100 Continue"), 1)

    async def test_absolute_form_target(self) -> None:
        """
        An absolute-form target goes to a configured node, never to the
        host it names: the node gets its path and query, and the target's
        authority as Host (RFC 9112 3.2.2).
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        result = await self.exchange(
            port,
            b"GET http://other.example:81/x/%7Ey?q=%20 HTTP/1.1\r\nHost: ignored.example\r\n\r\n",
        )
        assert result is not None
        self.assertEqual(result.code, 200)
        request = backend.requests[0]
        self.assertEqual(request.target, b"/x/%7Ey?q=%20")
        self.assertEqual(request.header(b"host"), [b"other.example:81"])

    async def test_absolute_form_without_path(self) -> None:
        """
        An absolute-form target with no path is forwarded as "/" (with its
        query), under the node's base path.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url + "/base"])
        await self.exchange(port, b"GET http://other.example?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(backend.requests[0].target, b"/base/?q=1")
        self.assertEqual(backend.requests[0].header(b"host"), [b"other.example"])

    async def test_connect_refused(self) -> None:
        """
        CONNECT gets a plain-text 405 and never reaches a node: rrlb is not
        an open proxy.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        result = await self.exchange(
            port, b"CONNECT other.example:443 HTTP/1.1\r\nHost: other.example:443\r\n\r\n"
        )
        self.assertPlainTextError(result, 405)
        self.assertEqual(backend.requests, [])

    async def test_bad_target(self) -> None:
        """
        A target that is neither origin- nor absolute-form gets a
        plain-text 400 and never reaches a node.
        """
        backend = await self.backend()
        _, port = await self.balancer([backend.url])
        result = await self.exchange(port, b"GET ftp://x/y HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertPlainTextError(result, 400)
        self.assertEqual(backend.requests, [])


# -- responses ---------------------------------------------------------------------


class ResponseForwardingTests(WireCase):
    """
    What a client receives for what a node sent.
    """

    async def test_status_and_reason(self) -> None:
        """
        Status code and reason phrase reach the client as the node sent
        them, standard or not, on one keep-alive connection.
        """
        statuses = [
            b"201 Created",
            b"302 Found",
            b"404 Not Found",
            b"500 Internal Server Error",
            b"200 Fine By Me",
            b"418 I'm a teapot",
            b"599 Custom Failure",
            b"404 ",
        ]
        answers = iter(statuses)

        def handler(request: RecordedRequest, conn: BackendConnection) -> bytes:
            return response(next(answers), b"x", (b"Location: /elsewhere",))

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        for status in statuses:
            client.send(get(b"/s"))
            result = await client.response()
            assert result is not None
            self.assertEqual(result.status_line, b"HTTP/1.1 " + status)
            self.assertEqual(result.body, b"x")

    async def test_no_content(self) -> None:
        """
        A 204 reaches the client with its reason and no body, and the
        connection stays usable.
        """
        answers = iter([b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", response()])
        backend = await self.backend(lambda request, conn: next(answers))
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/one") + get(b"/two"))
        first = await client.response()
        second = await client.response()
        assert first is not None and second is not None
        self.assertEqual(first.status_line, b"HTTP/1.1 204 No Content")
        self.assertEqual(first.header(b"x-a"), [b"1"])
        self.assertEqual(first.header(b"transfer-encoding"), [])
        self.assertEqual((second.code, second.body), (200, b"ok"))

    async def test_not_modified(self) -> None:
        """
        A 304 reaches the client with its validators and no body, and the
        connection stays usable.
        """
        answers = iter(
            [b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 50\r\n\r\n', response()]
        )
        backend = await self.backend(lambda request, conn: next(answers))
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/one", b"h", b'If-None-Match: "v1"') + get(b"/two"))
        first = await client.response()
        second = await client.response()
        assert first is not None and second is not None
        self.assertEqual(first.status_line, b"HTTP/1.1 304 Not Modified")
        self.assertEqual(first.header(b"etag"), [b'"v1"'])
        self.assertEqual((second.code, second.body), (200, b"ok"))

    async def test_response_headers_pass_through(self) -> None:
        """
        Every end-to-end response header arrives with all its values in
        order (repeated Set-Cookie included); the node's Server, Date and
        Content-Type are neither replaced nor duplicated; hop-by-hop ones
        and those named in Connection are dropped.
        """
        node_headers = (
            b"Server: node-server/1.0",
            b"Date: Tue, 01 Jan 2030 00:00:00 GMT",
            b"Content-Type: application/x-node; charset=latin-1",
            b"Set-Cookie: a=1; Path=/",
            b"X-Multi: one",
            b"Set-Cookie: b=2; Expires=Wed, 09 Jun 2031 10:18:14 GMT",
            b"X-Multi: two, three",
            b"Connection: X-Secret",
            b"X-Secret: hidden",
            b"Keep-Alive: timeout=5",
            b"Proxy-Authenticate: Basic realm=x",
            b"Trailer: X-Sum",
            b"Upgrade: h2c",
            b"Set-Cookie: c=3",
            b"Cache-Control: no-store",
        )
        backend = await self.backend(
            lambda request, conn: response(b"200 OK", b"body", node_headers)
        )
        _, port = await self.balancer([backend.url])
        result = await self.exchange(port, get(b"/"))
        assert result is not None
        self.assertEqual(result.header(b"server"), [b"node-server/1.0"])
        self.assertEqual(result.header(b"date"), [b"Tue, 01 Jan 2030 00:00:00 GMT"])
        self.assertEqual(result.header(b"content-type"), [b"application/x-node; charset=latin-1"])
        self.assertEqual(
            result.header(b"set-cookie"),
            [b"a=1; Path=/", b"b=2; Expires=Wed, 09 Jun 2031 10:18:14 GMT", b"c=3"],
        )
        self.assertEqual(result.header(b"x-multi"), [b"one", b"two, three"])
        self.assertEqual(result.header(b"cache-control"), [b"no-store"])
        self.assertEqual(result.header(b"content-length"), [b"4"])
        names = {n.lower() for n, _ in result.headers}
        for hop in (b"x-secret", b"keep-alive", b"proxy-authenticate", b"trailer", b"upgrade"):
            self.assertNotIn(hop, names)
        self.assertEqual(result.body, b"body")

    async def test_no_defaults_added(self) -> None:
        """
        A node that sends no Server or Content-Type gets none added by
        rrlb, and exactly one Date.
        """
        backend = await self.backend(lambda request, conn: response(b"200 OK", b"bare"))
        _, port = await self.balancer([backend.url])
        result = await self.exchange(port, get(b"/"))
        assert result is not None
        self.assertEqual(result.header(b"server"), [])
        self.assertEqual(result.header(b"content-type"), [])
        self.assertEqual(len(result.header(b"date")), 1)

    async def test_content_length_kept(self) -> None:
        """
        A node's Content-Length reaches the client and the body is not
        re-framed as chunked.
        """
        backend = await self.backend(lambda request, conn: response(body=b"x" * 100000))
        _, port = await self.balancer([backend.url])
        result = await self.exchange(port, get(b"/"))
        assert result is not None
        self.assertEqual(result.header(b"content-length"), [b"100000"])
        self.assertFalse(result.chunked)
        self.assertEqual(result.body, b"x" * 100000)

    async def test_chunked_upstream_response(self) -> None:
        """
        A chunked response from the node reaches an HTTP/1.1 client chunked
        (no Content-Length), with the same body; chunk extensions and
        trailers of the node do not leak.
        """
        body = b"5;ext=1\r\nhello\r\n7\r\n chunky\r\n0\r\nX-Sum: 1\r\n\r\n"
        backend = await self.backend(
            lambda request, conn: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
        )
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/one") + get(b"/two"))
        for _ in range(2):
            result = await client.response()
            assert result is not None
            self.assertTrue(result.chunked)
            self.assertEqual(result.header(b"content-length"), [])
            self.assertEqual(result.body, b"hello chunky")
            self.assertNotIn(b"ext=1", result.raw)
            self.assertNotIn(b"X-Sum", result.raw)

    async def test_connection_cannot_remove_framing(self) -> None:
        """
        A response whose Connection header names Transfer-Encoding (or
        Content-Length) is still read by its chunked framing: the chunk
        syntax is never taken for the body, and what follows it is never
        served as another client's response.
        """
        body = b"5\r\nhello\r\n0\r\n\r\n"
        backend = await self.backend(
            lambda request, conn: (
                b"HTTP/1.1 200 OK\r\nConnection: Transfer-Encoding, Content-Length"
                b"\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n" + body
            )
        )
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/one") + get(b"/two"))
        for _ in range(2):
            result = await client.response()
            assert result is not None
            self.assertEqual(result.body, b"hello")
        self.assertEqual(len(backend.connections), 1)

    async def test_http10_response_with_coding_not_reused(self) -> None:
        """
        An HTTP/1.0 response with Transfer-Encoding has faulty framing (RFC
        9112 6.1): it is read, and its connection is never used again.
        """
        backend = await self.backend(
            lambda request, conn: (
                b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
            )
        )
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/one") + get(b"/two"))
        for _ in range(2):
            result = await client.response()
            assert result is not None
            self.assertEqual(result.body, b"hi")
        self.assertEqual(len(backend.connections), 2)

    async def test_chunked_upstream_response_to_http10_client(self) -> None:
        """
        An HTTP/1.0 client gets a chunked node response unchunked, ended by
        the connection closing.
        """
        backend = await self.backend(
            lambda request, conn: (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                + chunked_body(b"hello", b" old", b" client")
            )
        )
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        await wait_for(lambda: client.closed, "rrlb to close the HTTP/1.0 connection")
        result = await client.response()
        assert result is not None
        self.assertFalse(result.chunked)
        self.assertEqual(result.body, b"hello old client")

    async def test_body_until_close(self) -> None:
        """
        A node response framed by closing the connection (no length, not
        chunked) reaches an HTTP/1.1 client chunked and complete.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nX-Close: 1\r\n\r\nuntil ")
            conn.transport.write(b"close")
            conn.transport.loseConnection()

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url])
        result = await self.exchange(port, get(b"/"))
        assert result is not None
        self.assertTrue(result.chunked)
        self.assertEqual(result.body, b"until close")
        self.assertTrue(result.raw.endswith(b"0\r\n\r\n"))

    async def test_body_streamed_as_it_arrives(self) -> None:
        """
        Body bytes reach the client as the node sends them, before the
        node has finished (Content-Length and chunked alike).
        """
        held: list[BackendConnection] = []

        def handler(request: RecordedRequest, conn: BackendConnection) -> bytes:
            held.append(conn)
            if request.target == b"/length":
                return b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst"
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/length"))
        await wait_for(lambda: bytes(client.data).endswith(b"first"), "the first bytes")
        held[0].transport.write(b"after")
        result = await client.response()
        assert result is not None
        self.assertEqual(result.body, b"firstafter")
        client.send(get(b"/chunked"))
        await wait_for(lambda: bytes(client.data).endswith(b"first\r\n"), "the first chunk")
        held[1].transport.write(b"5\r\nafter\r\n0\r\n\r\n")
        result = await client.response()
        assert result is not None
        self.assertEqual(result.body, b"firstafter")

    async def test_head(self) -> None:
        """
        HEAD gets the node's headers (Content-Length included) and no body,
        and the client connection stays usable. The node's connection is not
        reused: a node that sends a body for HEAD anyway would have it read
        as the next response (tests/test_late_bytes.py).
        """
        answers = iter(
            [
                b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/x\r\n\r\n",
                response(body=b"after head"),
            ]
        )
        backend = await self.backend(lambda request, conn: next(answers))
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await client.response(head_request=True)
        client.send(get(b"/g"))
        second = await client.response()
        assert first is not None and second is not None
        self.assertEqual(first.code, 200)
        self.assertEqual(first.header(b"content-length"), [b"1234"])
        self.assertEqual(first.header(b"transfer-encoding"), [])
        self.assertEqual(second.body, b"after head")
        self.assertEqual(backend.requests[0].method, b"HEAD")
        self.assertEqual(len(backend.connections), 2)


# -- failures ------------------------------------------------------------------------


class FailureTests(WireCase):
    """
    Nodes and clients that fail, and what each side then sees.
    """

    async def test_node_drops_mid_body(self) -> None:
        """
        A node that closes the connection mid-body (Content-Length not
        reached): the client's connection is closed without a complete
        response, and it is logged.
        """
        events = self.capture_log()

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            conn.transport.write(b"x" * 1000)
            reactor.callLater(0.05, conn.transport.loseConnection)

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/"))
        result = await client.response()
        self.assertIsNone(result)
        self.assertTrue(client.closed)
        self.assertIn(b"Content-Length: 100000", client.data)
        self.assertLess(len(client.data), 100000)
        self.assertTrue(
            any("dropped" in (e.get("log_format") or "") for e in events),
            [e.get("log_format") for e in events],
        )

    async def test_node_drops_mid_chunked_body(self) -> None:
        """
        A node that closes mid-way through a chunked body: the client never
        gets the final chunk, and its connection is closed.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
            )
            reactor.callLater(0.05, conn.transport.loseConnection)

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/"))
        result = await client.response()
        self.assertIsNone(result)
        self.assertTrue(client.closed)
        self.assertIn(b"hello", client.data)
        self.assertNotIn(b"0\r\n\r\n", client.data)

    async def test_node_drops_mid_body_to_slow_reader(self) -> None:
        """
        A node that closes mid-body while the client is reading slowly (so
        rrlb has paused it): once the client has read what was sent, its
        connection is closed rather than left hanging.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 << 20))
            producer = BulkProducer(conn.transport, b"d" * 65536, 16 << 20)
            producer.start()
            conn.transport.loseConnection()  # once the 16 MB are written

        backend = await self.backend(handler)
        service, port = await self.balancer([backend.url])
        client = await self.client(port)
        received = read_then_pause(client)
        client.send(get(b"/"))
        await wait_for(lambda: received["n"], "the start of the response")
        # rrlb's buffer to this client fills up, and it pauses the node.
        await wait_for(
            lambda: backend.connections
            and not reads(rrlb_end(service, backend.connections[0].transport)),
            "rrlb to stop reading from the node",
        )
        client.transport.resumeProducing()
        await wait_for(lambda: client.closed, "rrlb to close the client connection")
        self.assertLess(received["n"], 64 << 20)
        self.assertGreater(received["n"], 16 << 20)

    async def test_client_drops_mid_body(self) -> None:
        """
        A client that goes away mid-response: the upstream connection is
        closed (the node sees it go), nothing stays in flight or pooled.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
            conn.transport.write(b"x" * 5000)

        backend = await self.backend(handler)
        service, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/"))
        await wait_for(lambda: len(client.data) > 5000, "the start of the body")
        client.transport.abortConnection()
        await wait_for(lambda: backend.connections[0].closed, "the upstream connection to close")
        upstream = service.traffic.upstream
        await wait_for(lambda: upstream.connection_count == 0, "no upstream connections")
        node = service.pool.nodes[0]
        self.assertEqual(node.in_flight, 0)
        self.assertEqual(service.traffic.upstream.idle_count(node.key), 0)

    async def test_client_drops_before_response(self) -> None:
        """
        A client that goes away while the node has not answered yet: the
        upstream request is cancelled and its connection closed.
        """
        backend = await self.backend(lambda request, conn: None)
        service, port = await self.balancer([backend.url])
        client = await self.client(port)
        client.send(get(b"/slow"))
        await wait_for(lambda: backend.requests, "the request to reach the node")
        await client.close()
        await wait_for(lambda: backend.connections[0].closed, "the upstream connection to close")
        self.assertEqual(service.pool.nodes[0].in_flight, 0)

    async def test_get_retried_on_refused_node(self) -> None:
        """
        A GET whose node refuses the connection is retried on the next
        node, and the client gets that node's answer.
        """
        backend = await self.backend(lambda request, conn: response(body=b"second"))
        service, port = await self.balancer([self.dead_url(), backend.url])
        result = await self.exchange(port, get(b"/r"))
        assert result is not None
        self.assertEqual((result.code, result.body), (200, b"second"))
        self.assertEqual(len(backend.requests), 1)
        self.assertEqual(service.pool.nodes[0].failures, 1)

    async def test_post_not_retried_on_refused_node(self) -> None:
        """
        A POST whose node refuses the connection is not retried: the client
        gets a plain-text 502 and the other node never sees it.
        """
        backend = await self.backend()
        _, port = await self.balancer([self.dead_url(), backend.url])
        result = await self.exchange(
            port, b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        )
        self.assertPlainTextError(result, 502)
        self.assertEqual(backend.requests, [])

    async def test_reset_before_response(self) -> None:
        """
        A node that accepts a request on a fresh connection and resets it
        before any byte of a response: a GET is retried on the next node, a
        POST gets a plain-text 502 (the node may have acted on it).
        """

        def reset(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.abortConnection()

        bad = await self.backend(reset)
        good = await self.backend(lambda request, conn: response(body=b"good"))
        service, port = await self.balancer([bad.url, good.url], "--max-idle-per-node", "0")
        result = await self.exchange(port, get(b"/g"))
        assert result is not None
        self.assertEqual((result.code, result.body), (200, b"good"))
        self.assertEqual(service.pool.nodes[0].failures, 1)
        # The retry moved the rotation on: the bad node's turn again.
        result = await self.exchange(port, post(b"/p", b"x"))
        self.assertPlainTextError(result, 502)
        self.assertEqual([r.method for r in bad.requests], [b"GET", b"POST"])
        self.assertEqual([r.method for r in good.requests], [b"GET"])

    async def test_retry_at_most_once_per_node(self) -> None:
        """
        When every node refuses, an idempotent request tries each once and
        then gets a 502.
        """
        service, port = await self.balancer([self.dead_url(), self.dead_url(), self.dead_url()])
        result = await self.exchange(port, get(b"/"))
        self.assertPlainTextError(result, 502)
        self.assertEqual([n.errors for n in service.pool.nodes], [1, 1, 1])

    async def test_passive_ejection(self) -> None:
        """
        Refused connections count as failed checks at once: after C{fall}
        of them the dead node leaves the rotation and real traffic no longer
        tries it, with no probe involved.
        """
        backend = await self.backend()
        service, port = await self.balancer([self.dead_url(), backend.url], "--fall", "2")
        dead = service.pool.nodes[0]
        for _ in range(6):
            result = await self.exchange(port, get(b"/"))
            assert result is not None
            self.assertEqual(result.code, 200)
        self.assertFalse(dead.healthy)
        self.assertNotIn(dead, service.pool.in_rotation)
        self.assertEqual(dead.errors, 2)
        self.assertEqual(len(backend.requests), 6)

    async def test_response_timeout(self) -> None:
        """
        A node that does not answer within --timeout: the client gets a
        plain-text 504.
        """
        backend = await self.backend(lambda request, conn: None)
        _, port = await self.balancer([backend.url], "--timeout", "0.3")
        result = await self.exchange(port, get(b"/"))
        self.assertPlainTextError(result, 504)

    async def test_timeout_between_body_chunks(self) -> None:
        """
        A node that goes silent mid-body for longer than --timeout: the
        client's connection is closed, never a fake complete response.
        """

        def handler(request: RecordedRequest, conn: BackendConnection) -> None:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

        backend = await self.backend(handler)
        _, port = await self.balancer([backend.url], "--timeout", "0.3")
        client = await self.client(port)
        client.send(get(b"/"))
        result = await client.response()
        self.assertIsNone(result)
        self.assertTrue(bytes(client.data).endswith(b"abc"))

    async def test_bad_response_502(self) -> None:
        """
        A node that answers with something that is not HTTP: plain-text 502.
        """
        backend = await self.backend(lambda request, conn: b"SPAM\r\n\r\n")
        _, port = await self.balancer([backend.url])
        result = await self.exchange(port, get(b"/"))
        self.assertPlainTextError(result, 502)
