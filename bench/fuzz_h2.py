"""bench/fuzz --http2: mutated HTTP/2 header blocks and frames, sent over TLS (ALPN h2).

Each case is one connection: the client preface and SETTINGS, then the
frames of one or two requests built from valid ones and mutated: the
header block before it is HPACK-encoded (pseudo-header values, field names
and values, many fields, missing, repeated or connection-specific fields),
the body's DATA frames (empty, padding only, lengths that disagree), the
encoded header block, or the frames themselves (bytes flipped, frames
dropped, repeated or reordered, frames of every type inserted with odd
values). The frames are written with hyperframe and hpack directly, so
nothing checks them on the way out. What comes back is read as frames: the
first response's status, or the RST_STREAM or GOAWAY that ended it.
"""

import asyncio
import ssl
import time

from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ERRORS = {
    0: "NO_ERROR",
    1: "PROTOCOL_ERROR",
    2: "INTERNAL_ERROR",
    3: "FLOW_CONTROL_ERROR",
    5: "STREAM_CLOSED",
    6: "FRAME_SIZE_ERROR",
    7: "REFUSED_STREAM",
    8: "CANCEL",
    9: "COMPRESSION_ERROR",
    11: "ENHANCE_YOUR_CALM",
}
MAX_READ = 1 << 20
MAX_FRAME = 16384

CONTROLS = [b"\x00", b"\x01", b"\x08", b"\x0b", b"\x0c", b"\x1b", b"\x7f", b"\r", b"\n", b"\t"]
ODD_BYTES = CONTROLS + [b" ", b"\xff", b"\x80", b"(", b")", b":", b";", b",", b"@", b"/", b"\\"]
PSEUDO_VALUES = {
    b":method": [
        b"GET /admin",
        b"G(E)T",
        b"CONNECT",
        b"",
        b"get",
        b"PRI",
        b"OPTIONS",
        b"HEAD",
        b"GET\x00",
        b"X" * 300,
    ],
    b":path": [
        b"/a HTTP/1.1",
        b"*",
        b"",
        b"http://evil.example/x",
        b"//x",
        b"/a\x1bb",
        b"/a\x0bb",
        b"/a\x7f",
        b"/a\r\nX-Injected: 1",
        b"a",
        b"/" + b"a" * 9000,
        b"/caf\xc3\xa9",
        b"/%00",
    ],
    b":authority": [
        b"a b\x01\x7f;,@evil",
        b"",
        b"evil.example",
        b"x:99999999",
        b"[::1]:80",
        b"u@x",
        b"x/y",
        b"x\r\nHost: y",
        b"a" * 5000,
    ],
    b":scheme": [b"http", b"ftp", b"", b"https ", b"HTTPS"],
}
FIELD_NAMES = [
    b"x(y",
    b"X-Upper",
    b"x y",
    b"x:y",
    b"",
    b"x\x00",
    b"\xff",
    b":custom",
    b"x\ty",
    b"host ",
    b"content-length ",
    b"x\r\ny",
    b"a" * 300,
]
FIELD_VALUES = [
    b"v\x01\x1b[2J",
    b" lead",
    b"trail ",
    b"\tt",
    b"a\r\nX-Injected: 1",
    b"a\nb",
    b"a\rb",
    b"a\x00b",
    b"caf\xc3\xa9",
    b"\x7f",
    b"v" * 9000,
]
STRUCTURE = [
    "duplicate-path",
    "no-method",
    "no-path",
    "no-scheme",
    "no-authority",
    "pseudo-after-field",
    "connection",
    "transfer-encoding",
    "te-gzip",
    "te-trailers",
    "upgrade",
    "host-differs",
    "host-same",
    "two-hosts",
    "length-too-long",
    "length-too-short",
    "length-not-digits",
    "two-lengths",
    "connect",
    "extended-connect",
    "head-with-body",
    "expect-continue",
]


def base_cases(authority):
    """Valid cases to mutate: (name, [request, ...]); a request is a dict."""

    def head(method, path, *fields):
        pseudo = [(b":method", method), (b":scheme", b"https"), (b":path", path)]
        return pseudo + [(b":authority", authority), *fields]

    common = ((b"user-agent", b"fuzz/1"), (b"accept", b"*/*"))
    body = b"name=value&x=" + b"y" * 200
    return [
        ("get", [dict(headers=head(b"GET", b"/path/a%2Fb?q=1&r=%20", *common))]),
        (
            "post-length",
            [
                dict(
                    headers=head(
                        b"POST", b"/echo", (b"content-length", b"%d" % len(body)), *common
                    ),
                    body=[body],
                )
            ],
        ),
        (
            "post-streamed",
            [dict(headers=head(b"PUT", b"/up", *common), body=[b"hello", b", ", b"world", b""])],
        ),
        ("options", [dict(headers=head(b"OPTIONS", b"*"))]),
        (
            "two-streams",
            [
                dict(headers=head(b"GET", b"/a", (b"cookie", b"a=1"), (b"cookie", b"b=2"))),
                dict(headers=head(b"POST", b"/b"), body=[b"x" * 100]),
            ],
        ),
    ]


def _frames(requests, encoder, settings=True):
    """The frames of a connection carrying C{requests} (after the preface)."""
    frames = [SettingsFrame(0)] if settings else []
    if settings:
        frames.append(SettingsFrame(0, flags=["ACK"]))
    for i, request in enumerate(requests):
        stream = 2 * i + 1
        body = request.get("body")
        block = encoder.encode(request["headers"])
        # No frame over the default SETTINGS_MAX_FRAME_SIZE: a large block
        # goes on in CONTINUATION frames, a large body in several DATA.
        frame = HeadersFrame(stream, data=block[:MAX_FRAME])
        if body is None:
            frame.flags.add("END_STREAM")
        frames.append(frame)
        for start in range(MAX_FRAME, len(block), MAX_FRAME):
            frame = ContinuationFrame(stream, data=block[start : start + MAX_FRAME])
            frames.append(frame)
        frame.flags.add("END_HEADERS")
        pieces = [
            piece[i : i + MAX_FRAME]
            for piece in body or ()
            for i in range(0, len(piece) or 1, MAX_FRAME)
        ]
        for n, piece in enumerate(pieces):
            data = DataFrame(stream, data=piece)
            if n == len(pieces) - 1:
                data.flags.add("END_STREAM")
            frames.append(data)
    return frames


def _on_stream(frame, stream):
    """C{frame} serialized with its stream id replaced (hyperframe checks the id)."""
    data = bytearray(frame.serialize())
    data[5:9] = stream.to_bytes(4, "big")
    return bytes(data)


def _flag(frame, *flags):
    for flag in flags:
        frame.flags.add(flag)
    return frame


def _serialize(frames):
    return b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames)


# -- mutations of a request's header list, before it is encoded ----------------


def _pick(rng, requests):
    return rng.choice(requests)


def mutate_pseudo(rng, requests):
    request = _pick(rng, requests)
    headers = request["headers"]
    i = rng.randrange(4)
    name = headers[i][0]
    if rng.random() < 0.7:
        value = rng.choice(PSEUDO_VALUES[name])
    else:
        value = headers[i][1]
        cut = rng.randrange(len(value) + 1)
        value = value[:cut] + rng.choice(ODD_BYTES) + value[cut:]
    headers[i] = (name, value)


def mutate_name(rng, requests):
    request = _pick(rng, requests)
    headers = request["headers"]
    headers.insert(rng.randrange(4, len(headers) + 1), (rng.choice(FIELD_NAMES), b"1"))


def mutate_value(rng, requests):
    request = _pick(rng, requests)
    headers = request["headers"]
    name = rng.choice([b"x-fuzz", b"user-agent", b"cookie", b"accept", b"content-type"])
    headers.append((name, rng.choice(FIELD_VALUES)))


def mutate_many(rng, requests):
    request = _pick(rng, requests)
    headers = request["headers"]
    kind = rng.randrange(3)
    if kind == 0:
        headers += [(b"x-h%d" % i, b"%d" % i) for i in range(rng.choice([101, 200, 1500]))]
    elif kind == 1:
        headers += [(b"x-big%d" % i, b"v" * 8000) for i in range(rng.choice([3, 5, 7]))]
    else:
        headers += [(b"cookie", b"c%d=%d" % (i, i)) for i in range(rng.choice([50, 150, 400]))]


def mutate_structure(rng, requests):
    request = _pick(rng, requests)
    headers = request["headers"]
    kind = rng.choice(STRUCTURE)
    pseudo = {name: i for i, (name, _) in enumerate(headers) if name[:1] == b":"}
    body = request.get("body")
    if kind == "duplicate-path":
        headers.insert(3, (b":path", b"/other"))
    elif kind.startswith("no-"):
        del headers[pseudo[b":" + kind[3:].encode()]]
    elif kind == "pseudo-after-field":
        headers.append((b":path", b"/late"))
    elif kind == "connection":
        headers.append((b"connection", b"keep-alive"))
    elif kind == "transfer-encoding":
        headers.append((b"transfer-encoding", b"chunked"))
    elif kind == "te-gzip":
        headers.append((b"te", b"gzip"))
    elif kind == "te-trailers":
        headers.append((b"te", b"trailers"))
    elif kind == "upgrade":
        headers.append((b"upgrade", b"h2c"))
    elif kind == "host-differs":
        headers.append((b"host", b"other.example"))
    elif kind == "host-same":
        headers.append((b"host", headers[pseudo[b":authority"]][1]))
    elif kind == "two-hosts":
        del headers[pseudo[b":authority"]]
        headers += [(b"host", b"a.example"), (b"host", b"b.example")]
    elif kind in ("length-too-long", "length-too-short"):
        size = sum(len(p) for p in body or ()) + (5 if kind == "length-too-long" else -1)
        headers.append((b"content-length", b"%d" % max(size, 0)))
        if body is None:
            request["body"] = [b"abcd"]
    elif kind == "length-not-digits":
        headers.append((b"content-length", rng.choice([b"-1", b"0x10", b"1 2", b"", b"1e3"])))
    elif kind == "two-lengths":
        headers += [(b"content-length", b"3"), (b"content-length", b"4")]
        request["body"] = [b"abc"]
    elif kind in ("connect", "extended-connect"):
        headers[pseudo[b":method"]] = (b":method", b"CONNECT")
        if kind == "connect":
            for name in (b":path", b":scheme"):
                headers[:] = [h for h in headers if h[0] != name]
        else:
            headers.insert(1, (b":protocol", b"websocket"))
    elif kind == "head-with-body":
        headers[pseudo[b":method"]] = (b":method", b"HEAD")
        request["body"] = [b"body"]
    elif kind == "expect-continue":
        headers += [(b"expect", b"100-continue"), (b"content-length", b"5")]
        request["body"] = [b"12345"]


HEAD_MUTATIONS = {
    "pseudo": mutate_pseudo,
    "names": mutate_name,
    "values": mutate_value,
    "many-fields": mutate_many,
    "structure": mutate_structure,
}


# -- mutations of the frames -----------------------------------------------------


def body_frames(rng, frames):
    """Empty and padding-only DATA frames, trailers, DATA where none belongs."""
    data = [i for i, f in enumerate(frames) if isinstance(f, DataFrame)]
    heads = [f for f in frames if isinstance(f, HeadersFrame)]
    stream = heads[0].stream_id if heads else 1
    kind = rng.randrange(7)
    if kind == 0 and data:
        i = rng.choice(data)
        frames.insert(i, DataFrame(frames[i].stream_id, data=b""))
    elif kind == 1 and data:
        i = rng.choice(data)
        pad = DataFrame(frames[i].stream_id, data=b"", pad_length=rng.randrange(256))
        pad.flags.add("PADDED")
        frames.insert(i, pad)
    elif kind == 2:
        for head in heads:
            head.flags.discard("END_STREAM")
        last = DataFrame(stream, data=b"")
        last.flags.add("END_STREAM")
        frames.append(last)
    elif kind == 3:
        for head in heads:
            head.flags.discard("END_STREAM")
        frames.append(DataFrame(stream, data=b"more"))
        trailers = HeadersFrame(stream, data=Encoder().encode([(b"x-trailer", b"t")]))
        frames.append(_flag(trailers, "END_HEADERS", "END_STREAM"))
    elif kind == 4:
        frames.append(DataFrame(stream, data=b"after the end"))
    elif kind == 5:
        frames.append(_on_stream(DataFrame(1, data=b"stream zero"), 0))
    else:
        # More than the stream's window: FLOW_CONTROL_ERROR.
        for head in heads:
            head.flags.discard("END_STREAM")
        frames += [DataFrame(stream, data=b"w" * MAX_FRAME) for _ in range(5)]


def _odd_frame(rng):
    kind = rng.randrange(14)
    if kind == 0:
        update = WindowUpdateFrame(1, window_increment=rng.choice([0, 2**31 - 1]))
        return _on_stream(update, rng.choice([0, 1]))
    if kind == 1:
        settings = SettingsFrame(0)
        setting = rng.choice([0x2, 0x4, 0x5, 0x3, 0x1, 0x6, 0x99])
        value = rng.choice([0, 1, 2, 2**31, 2**32 - 1, 16383, 2**24])
        settings.settings[setting] = value
        return settings
    if kind == 2:
        return PingFrame(0, opaque_data=b"12345678")
    if kind == 3:
        return b"\x00\x00\x03\x06\x00\x00\x00\x00\x00abc"  # PING of 3 bytes
    if kind == 4:
        return PriorityFrame(1, depends_on=1, stream_weight=16)
    if kind == 5:
        return _on_stream(
            RstStreamFrame(1, error_code=rng.choice([0, 1, 8])), rng.choice([1, 7, 0])
        )
    if kind == 6:
        return GoAwayFrame(0, last_stream_id=0, error_code=0)
    if kind == 7:
        return ContinuationFrame(1, data=b"\x82")
    if kind == 8:
        return PushPromiseFrame(1, promised_stream_id=2, data=b"\x82")
    if kind == 9:
        return b"\x00\x00\x04\xfa\x00\x00\x00\x00\x01abcd"  # an unknown type
    if kind == 10:
        head = HeadersFrame(1, data=Encoder().encode([(b":method", b"GET")]))
        return _on_stream(_flag(head, "END_HEADERS", "END_STREAM"), rng.choice([0, 2, 4]))
    if kind == 11:
        return b"\x00\x40\x01\x00\x00\x00\x00\x00\x01"  # DATA longer than allowed, no body
    if kind == 12:
        return b"\x00\x00\x00\x09\x00\x00\x00\x00\x05"  # CONTINUATION, idle stream
    return SettingsFrame(0, flags=["ACK"])


def flip_frames(rng, frames):
    """Bytes flipped, frames dropped, repeated, reordered or inserted."""
    raw = [f if isinstance(f, bytes) else f.serialize() for f in frames]
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(6)
        i = rng.randrange(len(raw)) if raw else 0
        if kind == 0 and raw:
            frame = bytearray(raw[i])
            for _ in range(rng.randint(1, 3)):
                frame[rng.randrange(len(frame))] = rng.randrange(256)
            raw[i] = bytes(frame)
        elif kind == 1 and raw:
            frame = bytearray(raw[i])
            frame[rng.choice([3, 4, 5, 8])] = rng.randrange(256)  # type, flags, stream
            raw[i] = bytes(frame)
        elif kind == 2 and raw:
            del raw[i]
        elif kind == 3 and raw:
            raw.insert(i, raw[i])
        elif kind == 4 and len(raw) > 1:
            j = rng.randrange(len(raw))
            raw[i], raw[j] = raw[j], raw[i]
        else:
            odd = _odd_frame(rng)
            raw.insert(
                rng.randrange(len(raw) + 1), odd if isinstance(odd, bytes) else odd.serialize()
            )
    frames[:] = raw


def hpack_block(rng, frames):
    """The encoded header block itself: bytes flipped, cut, or odd representations."""
    heads = [f for f in frames if isinstance(f, HeadersFrame)]
    if not heads:
        return
    head = rng.choice(heads)
    block = bytearray(head.data)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 3)):
            block[rng.randrange(len(block))] = rng.randrange(256)
    elif kind == 1:
        del block[rng.randrange(1, len(block)) :]
    elif kind == 2:
        block[:0] = b"\x3f\xe1\xff\xff\xff\x0f"  # a table size update past the limit
    elif kind == 3:
        block += rng.choice([b"\x80", b"\xff\xff\xff\xff\x0f"])  # index 0, index out of range
    else:
        # The block split over a HEADERS and a CONTINUATION frame.
        cut = rng.randrange(1, len(block)) if len(block) > 1 else 1
        head.flags.discard("END_HEADERS")
        more = ContinuationFrame(head.stream_id, data=bytes(block[cut:]))
        more.flags.add("END_HEADERS")
        frames.insert(frames.index(head) + 1, more)
        del block[cut:]
    head.data = bytes(block)


def garbage(rng, frames):
    frames[:] = [bytes(rng.randrange(256) for _ in range(rng.randint(1, 2000)))]


FRAME_MUTATIONS = {
    "body-frames": body_frames,
    "frames": flip_frames,
    "hpack": hpack_block,
    "garbage": garbage,
}
MUTATIONS = ["valid", *HEAD_MUTATIONS, *FRAME_MUTATIONS]


def build(rng, kind, cases):
    """The bytes of one connection for mutation C{kind}."""
    _, requests = rng.choice(cases)
    requests = [dict(r, headers=list(r["headers"])) for r in requests]
    if kind in HEAD_MUTATIONS:
        HEAD_MUTATIONS[kind](rng, requests)
    frames = _frames(requests, Encoder())
    if kind in FRAME_MUTATIONS:
        FRAME_MUTATIONS[kind](rng, frames)
    preface = PREFACE if kind != "garbage" or rng.random() < 0.5 else b""
    return preface + _serialize(frames)


# -- one connection ---------------------------------------------------------------


def client_tls():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # rrlb's throwaway self-signed certificate
    context.set_alpn_protocols(["h2"])
    return context


class Responses:
    """
    The server's frames, as they come: the outcome of stream 1 (its status,
    or how it or the connection ended).
    """

    def __init__(self):
        self.buffer = b""
        self.decoder = Decoder()
        self.block = b""
        self.outcome = None
        self.done = False

    def feed(self, data):
        self.buffer += data
        while len(self.buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
            if len(self.buffer) < 9 + length:
                return
            body, self.buffer = self.buffer[9 : 9 + length], self.buffer[9 + length :]
            frame.parse_body(memoryview(body))
            self._frame(frame)

    def _frame(self, frame):
        if isinstance(frame, (HeadersFrame, ContinuationFrame)):
            self.block += frame.data
            if "END_HEADERS" not in frame.flags:
                return
            block, self.block = self.block, b""
            headers = dict(self.decoder.decode(block, raw=True))
            status = headers.get(b":status", b"")
            if frame.stream_id == 1 and not status.startswith(b"1") and self.outcome is None:
                self.outcome = status.decode("ascii", "replace")
            if frame.stream_id == 1 and "END_STREAM" in frame.flags:
                self.done = True
        elif isinstance(frame, DataFrame):
            if frame.stream_id == 1 and "END_STREAM" in frame.flags:
                self.done = True
        elif isinstance(frame, RstStreamFrame) and frame.stream_id == 1:
            if self.outcome is None:
                self.outcome = "RST_STREAM " + ERRORS.get(frame.error_code, str(frame.error_code))
            self.done = True
        elif isinstance(frame, GoAwayFrame):
            if self.outcome is None:
                self.outcome = "GOAWAY " + ERRORS.get(frame.error_code, str(frame.error_code))
            self.done = True


async def throw(port, data, rng, wait, tls=True):
    """Send data over a new h2 connection (TLS, or cleartext with prior
    knowledge); the outcome of its first stream."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_tls() if tls else None), wait * 5
        )
    except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
        return f"connect failed ({type(e).__name__})"
    responses = Responses()
    try:
        if tls and writer.get_extra_info("ssl_object").selected_alpn_protocol() != "h2":
            return "no h2 by ALPN"
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 2))))
        last = 0
        for cut in cuts + [len(data)]:
            writer.write(data[last:cut])
            await writer.drain()
            last = cut
        deadline = time.monotonic() + wait
        received = 0
        while not responses.done and received < MAX_READ:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            chunk = await asyncio.wait_for(reader.read(65536), left)
            if not chunk:
                return responses.outcome or "closed"
            received += len(chunk)
            try:
                responses.feed(chunk)
            except Exception as e:  # what the server sent is not HTTP/2
                return f"not HTTP/2 ({type(e).__name__})"
    except asyncio.TimeoutError:
        pass
    except (OSError, ssl.SSLError) as e:
        if responses.outcome is None:
            return f"reset ({type(e).__name__})"
    finally:
        writer.transport.abort()
    return responses.outcome or "no response"


def valid_exchange(port, authority, tls=True):
    """One valid GET over h2 (TLS, or h2c) with a blocking socket: its status, or None."""
    import socket

    data = PREFACE + _serialize(
        _frames(
            [
                dict(
                    headers=[
                        (b":method", b"GET"),
                        (b":scheme", b"https"),
                        (b":path", b"/"),
                        (b":authority", authority),
                    ]
                )
            ],
            Encoder(),
        )
    )
    responses = Responses()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            s = client_tls().wrap_socket(raw) if tls else raw
            s.sendall(data)
            while not responses.done:
                chunk = s.recv(65536)
                if not chunk:
                    break
                responses.feed(chunk)
    except OSError:
        return None
    return responses.outcome
