# -*- test-case-name: tests.test_http1 -*-
"""
The HTTP/1.1 rules the proxy, the upstream client, tunnels and HTTP/2
share, each defined once: the hop-by-hop headers, C{Connection} tokens,
canonical header names, the short error answers, and how a client's
request head is rewritten for a node.

Bottom layer: it knows nothing of the proxy, the pool or the channel.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.web import http

from rrlb._twisted import HeaderNameError, canonical_name, client_gone, set_raw_headers
from rrlb.grpcwire import CONTENT_TYPE, grpc_request, message_value, status_for

# Hop-by-hop headers (RFC 9110 7.6.1), lower-cased.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)

# The same, as Twisted's Headers (and rrlb's parsers) key them: C{TE}, not
# C{Te}.
HOP_BY_HOP_NAMES = frozenset(canonical_name(name) for name in HOP_BY_HOP)

# Connection tokens that never remove a header: its own options, and the
# framing, which is read before the hop-by-hop headers go.
NOT_DROPPED_BY_CONNECTION = frozenset(
    {b"close", b"keep-alive", b"transfer-encoding", b"content-length"}
)

# Response headers that never go to an HTTP/2 client (RFC 9113 8.2.2),
# lower-cased as HTTP/2 spells them.
H2_CONNECTION_SPECIFIC = HOP_BY_HOP - {
    b"te",
    b"trailer",
    b"proxy-authorization",
    b"proxy-authenticate",
}

# The headers of a node's 101 that are not passed on: the hop-by-hop ones
# but Upgrade and Connection (they say what the connection switched to),
# and the framing, which a tunnel has none of.
SWITCHING_DROP = (HOP_BY_HOP_NAMES - {b"Connection", b"Upgrade"}) | {b"Content-Length"}

# Request headers never forwarded as they came: hop-by-hop ones, the
# framing ones (the body is re-sent with its own length), and the ones the
# proxy sets itself. Names as Twisted canonicalizes them.
SKIP_REQUEST = HOP_BY_HOP_NAMES | {
    b"Content-Length",
    b"Expect",
    b"Host",
    b"X-Forwarded-For",
    b"X-Forwarded-Proto",
    b"X-Forwarded-Host",
    b"X-Forwarded-Client-Cert",
    b"Via",
}

# What only a proxy in front may say of the client or of the request it
# received (the client's address, scheme, host, port, original URL), as
# CDNs, balancers and frameworks spell it, lower-cased with "_" as "-". From
# an untrusted peer under --trusted-proxies these are dropped: a node that
# believes one would take the client's word for who it is or where it came
# in (docs/security.md, "Client addresses").
CLIENT_CLAIMS = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-server",
        b"x-forwarded-scheme",
        b"x-forwarded-ssl",
        b"x-forwarded-prefix",
        b"x-forwarded-client-cert",
        b"x-forwarded",
        b"forwarded-for",
        b"x-real-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"client-ip",
        b"x-originating-ip",
        b"x-remote-ip",
        b"x-remote-addr",
        b"x-url-scheme",
        b"front-end-https",
        b"x-original-url",
        b"x-rewrite-url",
    }
)

# How a client's peer stands under --trusted-proxies (its channel's C{edge}).
EDGE_OFF = 0  # --trusted-proxies unset: append to X-Forwarded-For
EDGE_UNTRUSTED = 1  # a peer outside them: drop and replace
EDGE_TRUSTED = 2  # a peer inside them: keep and append

# Upgrade tokens rrlb forwards; any other (h2c, TLS/1.0) is dropped as the
# hop-by-hop header it is.
TUNNEL_TOKENS = frozenset({b"websocket"})

# RFC 9110's reason phrases where twisted.web still has RFC 2616's.
_PHRASES = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    504: b"Gateway Timeout",
}


def canonical(name: bytes) -> bytes:
    """
    A header name as Twisted's L{Headers} keys it (C{name} itself if it is
    not a valid token, so that it matches nothing).
    """
    try:
        return canonical_name(name)
    except HeaderNameError:
        return name


def connection_tokens(values: list[bytes]) -> set[bytes]:
    """
    The lower-cased option names of C{Connection} header values.
    """
    tokens = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def upgrade_token(values: Optional[list[bytes]]) -> Optional[bytes]:
    """
    The token of an C{Upgrade} request header rrlb tunnels (as the client
    spelt it), or L{None}.
    """
    if not values:
        return None
    for value in values:
        for token in value.split(b","):
            token = token.strip()
            if token.lower() in TUNNEL_TOKENS:
                return token
    return None


def switching_head(reason: bytes, headers: dict[bytes, list[bytes]]) -> bytes:
    """
    The C{101} response head a client gets: the node's, less the
    hop-by-hop headers other than Upgrade and Connection.
    """
    parts = [b"HTTP/1.1 101 ", reason or b"Switching Protocols", b"\r\n"]
    for name, values in headers.items():
        if name in SWITCHING_DROP:
            continue
        for value in values:
            parts.extend((name, b": ", value, b"\r\n"))
    parts.append(b"\r\n")
    return b"".join(parts)


def error_response(
    request: Any, code: int, text: str, headers: Any = (), grpc_status: Optional[int] = None
) -> None:
    """
    Answer C{request} with a short plain-text error, unless its client is gone.
    A gRPC call gets it gRPC-shaped instead (see L{answer}): C{grpc_status},
    or the status gRPC maps C{code} to, with C{text} as its message.
    """
    phrase = _PHRASES.get(code) or http.RESPONSES.get(code, b"Error")
    answer(
        request,
        code,
        b"%d %s: %s\n" % (code, phrase, text.encode()),
        headers,
        grpc_status=grpc_status,
        grpc_message=text,
    )


PLAIN_TEXT = b"text/plain; charset=utf-8"


def answer(
    request: Any,
    code: int,
    body: bytes,
    headers: Any = (),
    content_type: Optional[bytes] = PLAIN_TEXT,
    filtered: bool = True,
    date: Optional[bytes] = None,
    grpc_status: Optional[int] = None,
    grpc_message: Optional[str] = None,
) -> None:
    """
    Every answer rrlb makes itself, not a node (its errors, redirects, fixed
    answers, a filter's L{rrlb.filters.Answer}), goes out here, unless the
    client is gone: C{code}, C{headers} (name, value pairs), a
    C{Content-Type} if C{content_type} is given, then the request's response
    filters (C{request.response_hook}, unless not C{filtered}), then
    C{body} with its length. C{date} is the C{Date} value if the caller
    has it formatted already.

    An error (4xx, 5xx) to a gRPC call is gRPC-shaped instead, as gRPC
    clients read rrlb's own errors (never a plain-text 502 they would report
    as a protocol error): HTTP 200, C{application/grpc}, and C{grpc_status}
    (or the status gRPC maps C{code} to) with C{grpc_message} (or the body)
    in trailers-only form, the response's only HEADERS frame ending the
    stream.
    """
    if client_gone(request) or request.finished:
        return
    shaped = code >= 400 and grpc_request(request)
    if shaped:
        status = status_for(code) if grpc_status is None else grpc_status
        if grpc_message is None:
            grpc_message = body.decode("utf-8", "replace").strip()
        code = 200
        request.setResponseCode(200)
        # (The headers object stays: the proxy's is the one filters change.)
        response_headers = request.responseHeaders
        set_raw_headers(
            response_headers,
            {
                b"Content-Type": [CONTENT_TYPE],
                b"Grpc-Status": [b"%d" % status],
                b"Grpc-Message": [message_value(grpc_message)],
            },
        )
    else:
        request.setResponseCode(code, _PHRASES.get(code) or http.RESPONSES.get(code, b"Unknown"))
        response_headers = request.responseHeaders
        set_raw_headers(response_headers, {})
        for name, value in headers:
            response_headers.addRawHeader(name, value)
        if content_type is not None:
            response_headers.setRawHeaders(b"Content-Type", [content_type])
        response_headers.setRawHeaders(b"Date", [date or http.datetimeToString()])
    hook = getattr(request, "response_hook", None) if filtered else None
    if hook is not None and not hook(request, code):
        return  # a response filter failed, and the hook answered 500 instead
    if code in http.NO_BODY_CODES:
        # RFC 9110 8.6 and 15.4.5: a 204 never has a Content-Length, and
        # neither has a 304 of ours (it would claim the size of a
        # representation rrlb does not have); neither has a body.
        request.finish()
        return
    if not shaped:
        response_headers.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        request.write(body)
    request.finish()


def split_target(uri: bytes) -> tuple[Optional[bytes], bytes]:
    """
    Split a request target into the authority of an absolute-form target
    (or L{None}) and the origin-form part that is forwarded.

    @raise ValueError: for a target that is neither.
    """
    if uri[:1] == b"/":
        return None, uri
    if uri == b"*":
        return None, uri
    lower = uri[:8].lower()
    if lower.startswith(b"http://"):
        rest = uri[7:]
    elif lower.startswith(b"https://"):
        rest = uri[8:]
    else:
        raise ValueError("bad request target")
    cut = len(rest)
    for sep in (b"/", b"?"):
        i = rest.find(sep)
        if 0 <= i < cut:
            cut = i
    authority, path = rest[:cut], rest[cut:]
    if b"@" in authority:
        authority = authority.rsplit(b"@", 1)[1]
    if not authority:
        raise ValueError("absolute-form target without a host")
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path


def rewrite_request_head(
    raw: dict[bytes, list[bytes]],
    method: bytes,
    body: Any,
    host: Optional[bytes],
    forwarded: tuple[bytes, bytes],
    edge: int,
    clientproto: bytes,
    client_cert: Any = None,
) -> tuple[bytes, Optional[bytes], bool]:
    """
    The node-independent part of the head a node gets for a client's
    request: its headers less the hop-by-hop ones (and those its
    C{Connection} names), the client claims an untrusted peer made, the
    C{X-Forwarded-*} and C{Via} headers, the upgrade of a WebSocket, and the
    body's framing.

    @param raw: the request's headers, canonical name -> values.
    @param body: the request's L{rrlb.body.StreamedBody}, or L{None}; a
        chunked body still coming is marked to go chunked to the node.
    @param host: the request's host (absolute-form authority or C{Host}).
    @param forwarded: the channel's (scheme, client address) pair.
    @param edge: the channel's C{EDGE_*} standing.
    @param client_cert: the client's verified certificate (its C{xfcc}
        element goes to the node as C{X-Forwarded-Client-Cert}); a client's
        own header of that name is dropped unless its peer is trusted.
    @return: the head from after the C{Host} line to its end, the C{Upgrade}
        token forwarded (or L{None}), and whether the head asks the node
        C{Expect: 100-continue}.
    """
    proto, ip = forwarded
    drop = SKIP_REQUEST
    connection = raw.get(b"Connection")
    upgrade = None
    if connection:
        extra = connection_tokens(connection)
        if b"upgrade" in extra and method == b"GET" and body is None:
            # WebSocket: Connection: Upgrade and its Upgrade go to the
            # node (rrlb.tunnel); other upgrade tokens (h2c) do not.
            upgrade = upgrade_token(raw.get(b"Upgrade"))
        if extra:
            drop = drop | {canonical(t) for t in extra}
    parts: list[bytes] = []
    append = parts.append
    if edge == EDGE_UNTRUSTED:
        # --trusted-proxies, and the peer is not one: what it says of the
        # client goes, in any spelling a node might read as the same
        # (Forwarded, X_Forwarded_For, which CGI-style servers fold into
        # the same variable).
        for name, values in raw.items():
            if name in drop or name.replace(b"_", b"-").lower() in CLIENT_CLAIMS:
                continue
            for value in values:
                append(name + b": " + value + b"\r\n")
    else:
        for name, values in raw.items():
            if name in drop:
                continue
            for value in values:
                append(name + b": " + value + b"\r\n")
    xff = raw.get(b"X-Forwarded-For")
    forwarded_host = host
    if edge:
        if edge == EDGE_UNTRUSTED:
            xff = None
        else:
            # A trusted peer's own claims are kept, and rrlb's appended
            # (each proxy of a chain adds its hop, as X-Forwarded-For).
            claimed = raw.get(b"X-Forwarded-Proto")
            if claimed:
                proto = b", ".join(claimed + [proto])
            claimed = raw.get(b"X-Forwarded-Host")
            if claimed and forwarded_host is not None:
                forwarded_host = b", ".join(claimed + [forwarded_host])
            claimed = raw.get(b"X-Forwarded-Client-Cert")
            if claimed:
                # Envoy's APPEND_FORWARD: the proxy's elements, then rrlb's.
                own = [client_cert.xfcc] if client_cert is not None else []
                append(b"X-Forwarded-Client-Cert: " + b",".join(claimed + own) + b"\r\n")
                client_cert = None
    xff_value: Optional[bytes]
    if ip:
        xff_value = b", ".join(xff + [ip]) if xff else ip
    else:
        xff_value = b", ".join(xff) if xff else None
    if xff_value is not None:
        append(b"X-Forwarded-For: " + xff_value + b"\r\n")
    append(b"X-Forwarded-Proto: " + proto + b"\r\n")
    if forwarded_host is not None:
        append(b"X-Forwarded-Host: " + forwarded_host + b"\r\n")
    if client_cert is not None:
        append(b"X-Forwarded-Client-Cert: " + client_cert.xfcc + b"\r\n")
    version = clientproto[5:] or b"1.1"
    via = raw.get(b"Via")
    via_self = version + b" rrlb"
    append(b"Via: " + (b", ".join(via + [via_self]) if via else via_self) + b"\r\n")

    if upgrade is not None:
        append(b"Connection: Upgrade\r\nUpgrade: " + upgrade + b"\r\n")
    expect = False
    if body is None:
        if b"Content-Length" in raw or b"Transfer-Encoding" in raw:
            append(b"Content-Length: 0\r\n")
    elif body.length is not None:
        append(b"Content-Length: %d\r\n" % body.length)
        if body.expect_continue:
            # The node answers the Expect (rrlb.body.go_on/no_continue).
            append(b"Expect: 100-continue\r\n")
            expect = True
    elif body.complete:
        # A chunked body that came whole with the head: its length.
        append(b"Content-Length: %d\r\n" % body.received)
    else:
        # A chunked body still coming: chunked to the node too.
        body.chunked = True
        append(b"Transfer-Encoding: chunked\r\n")
        if body.expect_continue:
            append(b"Expect: 100-continue\r\n")
            expect = True
    append(b"\r\n")
    return b"".join(parts), upgrade, expect
