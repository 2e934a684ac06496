# -*- test-case-name: tests.test_accesslog -*-
"""
The access log: one line per request, written when its response ended.

The request path only appends a tuple of raw fields (see
L{rrlb.metrics.Metrics.record}); lines are formatted and written in
batches, every L{FLUSH_INTERVAL} seconds or as soon as L{BATCH_SIZE} are
pending, and at shutdown.

Formats:

  - C{combined}: Apache/nginx's combined format followed by three fields of
    rrlb's own::

      127.0.0.1 - - [10/Oct/2025:13:55:36 +0000] "GET /x HTTP/1.1" 200 123 "-" "curl/8.5.0" \
node="http://10.0.0.1:8080" upstream_status=200 upstream_time=0.003

    C{node} is the URL of the node that served the request (after any
    retry), C{upstream_status} the status that node answered with and
    C{upstream_time} the seconds until its response head arrived; each is
    C{-} (C{node="-"}) when no node answered: rrlb's own 503/502/504/405/400.
    The time is when the response ended, in UTC. Bytes are the body bytes
    sent to the client. A status of 499 means the client went away before
    any response head was sent to it (as nginx logs it). Quotes, backslashes
    and bytes outside printable ASCII in the request line, referer and user
    agent are written as C{\\xHH}, so a line can never be split or forged.

  - C{json}: one JSON object per line with the same fields: C{time} (ISO
    8601, UTC), C{remote_addr}, C{method}, C{uri}, C{protocol}, C{status},
    C{bytes}, C{referer}, C{user_agent}, C{node}, C{upstream_status},
    C{upstream_time} (L{None} as C{null}).

  - With C{tls.client_auth}, a request whose client showed a certificate
    ends with its subject (RFC 4514), after any fields filters added:
    C{client_cert_subject=CN=alice,O=Example} in C{combined},
    C{"client_cert_subject"} in C{json}.
"""

from __future__ import annotations

import json
import os
import re
import select
import time
from typing import Any, BinaryIO, Callable, Optional

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

FLUSH_INTERVAL = 1.0
BATCH_SIZE = 256
STDOUT = "-"

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_UNSAFE = re.compile(rb"[^\x20\x21\x23-\x5b\x5d-\x7e]")

# One entry per request, as Metrics.record builds it.
Entry = tuple[
    float,  # time the response ended
    Optional[str],  # client address
    Optional[bytes],  # method (None: a refused head without a readable request line)
    Optional[bytes],  # request target (likewise)
    bytes,  # protocol
    int,  # status sent (499: client gone first)
    int,  # body bytes sent
    Optional[bytes],  # Referer
    Optional[bytes],  # User-Agent
    Optional[str],  # node URL
    Optional[int],  # upstream status
    Optional[float],  # upstream time
]
# A WebSocket tunnel's entry has one more field: (bytes to the node, bytes
# to the client, seconds open), or None; then, if filters added fields to
# the line (request_id, trace_id: rrlb.filters.FilterRequest.note), a dict
# of them, written as name=value (combined, a space escaped too) or as keys
# (JSON).


def _hex(match: re.Match[bytes]) -> bytes:
    return b"\\x%02X" % match.group()[0]


def _escape(value: bytes) -> bytes:
    if _UNSAFE.search(value) is None:
        return value
    return _UNSAFE.sub(_hex, value)


def _text(value: Optional[bytes]) -> Optional[str]:
    # For JSON: keep UTF-8 as it is, show other bytes as \xHH.
    if value is None:
        return None
    return value.decode("utf-8", "backslashreplace")


class _Clock:
    """
    Formats a Unix time once per second, in the two styles the log uses.
    """

    def __init__(self) -> None:
        self.second = -1
        self.combined = b""
        self.iso = ""
        self._ascii: dict[Optional[str], bytes] = {None: b"-"}

    def set(self, when: float) -> None:
        second = int(when)
        if second != self.second:
            self.second = second
            t = time.gmtime(second)
            self.combined = (
                f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:"
                f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
            ).encode("ascii")
            self.iso = time.strftime("%Y-%m-%dT%H:%M:%S", t)

    def ascii(self, text: Optional[str]) -> bytes:
        """
        An address or node URL as bytes (C{-} for L{None}); the few distinct
        ones are cached.
        """
        value = self._ascii.get(text)
        if value is None:
            if len(self._ascii) > 4096:
                self._ascii = {None: b"-"}
            assert text is not None
            value = self._ascii[text] = _escape(text.encode("utf-8"))
        return value


_COMBINED = (
    b'%s - - [%s] "%s %s %s" %d %d "%s" "%s" node="%s" upstream_status=%s upstream_time=%s%s'
)


def format_combined(entry: Entry, clock: Optional[_Clock] = None) -> bytes:
    """
    One entry as a combined-format line with rrlb's fields, with its newline.
    """
    when, host, method, uri, proto, code, size, referer, agent, node, ustatus, utime = entry[:12]
    if clock is None:
        clock = _Clock()
    clock.set(when)
    return _COMBINED % (
        clock.ascii(host),
        clock.combined,
        _escape(method) if method is not None else b"-",
        _escape(uri) if uri is not None else b"-",
        _escape(proto),
        code,
        size,
        b"-" if referer is None else _escape(referer),
        b"-" if agent is None else _escape(agent),
        clock.ascii(node),
        b"-" if ustatus is None else b"%d" % ustatus,
        b"-" if utime is None else b"%.3f" % utime,
        b"\n" if len(entry) == 12 else _combined_tail(entry),
    )


def _combined_tail(entry: Entry) -> bytes:
    """
    The end of a combined line after C{upstream_time}: a tunnel's fields,
    then the filters', then the newline.
    """
    tunnel = entry[12]  # type: ignore[misc]
    tail = b""
    if tunnel is not None:
        tail = b" tunnel_bytes_to_node=%d tunnel_bytes_to_client=%d tunnel_time=%.3f" % tunnel
    if len(entry) > 13:
        notes = entry[13]  # type: ignore[misc]
        ready = getattr(notes, "line", None)
        if ready is not None:
            # Made as the fields were added (rrlb.filters.LogNotes), with
            # nothing to escape: the common case.
            return tail + ready + b"\n"
        # Unquoted, so a space in a value is escaped too: it would start a
        # new field. Names are a-z and _ (FilterRequest.note).
        # (A lone surrogate, which a str may hold, as its escape: it has no
        # UTF-8, and one such value would drop the whole batch.)
        for name, value in notes.items():
            raw = value.encode("utf-8", "backslashreplace")
            value_bytes = _escape(raw).replace(b" ", b"\\x20")
            tail += b" %s=%s" % (name.encode("ascii"), value_bytes)
    return tail + b"\n"


def format_json(entry: Entry, clock: Optional[_Clock] = None) -> bytes:
    """
    One entry as a JSON object on one line, with its newline.
    """
    when, host, method, uri, proto, code, size, referer, agent, node, ustatus, utime = entry[:12]
    if clock is None:
        clock = _Clock()
    clock.set(when)
    fraction = int((when - int(when)) * 1000)
    record = {
        "time": f"{clock.iso}.{fraction:03d}Z",
        "remote_addr": host,
        "method": _text(method),
        "uri": _text(uri),
        "protocol": _text(proto),
        "status": code,
        "bytes": size,
        "referer": _text(referer),
        "user_agent": _text(agent),
        "node": node,
        "upstream_status": ustatus,
        "upstream_time": None if utime is None else round(utime, 6),
    }
    if len(entry) > 12 and entry[12] is not None:  # type: ignore[misc]
        to_node, to_client, duration = entry[12]  # type: ignore[misc]
        record["tunnel_bytes_to_node"] = to_node
        record["tunnel_bytes_to_client"] = to_client
        record["tunnel_time"] = round(duration, 6)
    if len(entry) > 13:
        for name, value in entry[13].items():  # type: ignore[misc]
            record.setdefault(name, value)
    return json.dumps(record, separators=(",", ":")).encode("ascii") + b"\n"


FORMATTERS: dict[str, Callable[[Entry, Optional[_Clock]], bytes]] = {
    "combined": format_combined,
    "json": format_json,
}


PIPE_BUF = getattr(select, "PIPE_BUF", 512)


def line_pieces(data: bytes, size: int) -> list[bytes]:
    """
    C{data} cut after newlines into pieces of at most C{size} bytes (a line
    longer than that is a piece of its own).
    """
    pieces = []
    start = 0
    while len(data) - start > size:
        end = data.rfind(b"\n", start, start + size)
        end = data.find(b"\n", start + size) if end < 0 else end
        if end < 0:
            break
        pieces.append(data[start : end + 1])
        start = end + 1
    if start < len(data):
        pieces.append(data[start:])
    return pieces


def open_log(path: str) -> BinaryIO:
    """
    Open C{path} for appending, or a duplicate of standard output for C{-}:
    the file descriptor itself, since twistd redirects C{sys.stdout} into
    its own log.

    @raise OSError: if it cannot be opened.
    """
    if path == STDOUT:
        return os.fdopen(os.dup(1), "ab")
    return open(path, "ab")


class AccessLog(Service):
    """
    Collects entries and writes them in batches.

    @ivar pending: entries not yet written.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        format: str,
        clock: Any,
        flush_interval: float = FLUSH_INTERVAL,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self.path = path
        self.format = format
        self.clock = clock
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.pending: list[Entry] = []
        self._file: Optional[BinaryIO] = None
        self._loop: Optional[LoopingCall] = None
        self._time = _Clock()
        self._failed = False
        self._stopped = False
        self._limit = batch_size

    def append(self, entry: Entry) -> None:
        """
        Queue one request's entry; write the batch if it is full.
        """
        pending = self.pending
        pending.append(entry)
        if len(pending) >= self._limit:
            self.flush()

    def flush(self) -> None:
        """
        Format and write everything pending. Never raises: a write error is
        logged once (until a write works again) and the lines are dropped.
        """
        pending = self.pending
        if not pending:
            return
        self.pending = []
        out = self._file
        once = False
        if out is None:
            if not self._stopped:
                # Not started yet: startService writes them.
                self.pending = pending
                return
            # Requests that ended after the log stopped (while the balancer
            # drains at shutdown): rare, so open the file for each write.
            once = True
        fmt = FORMATTERS[self.format]
        clock = self._time
        try:
            data = b"".join([fmt(entry, clock) for entry in pending])
            if once:
                with open_log(self.path) as out:
                    out.write(data)
            else:
                assert out is not None
                if self.path == STDOUT and len(data) > PIPE_BUF:
                    # Standard output is a pipe that worker processes share
                    # (--workers): a write of up to PIPE_BUF bytes is never
                    # interleaved with another's, so write whole lines in
                    # pieces that size.
                    for piece in line_pieces(data, PIPE_BUF):
                        out.write(piece)
                        out.flush()
                else:
                    out.write(data)
                    out.flush()
        except Exception as e:
            if not self._failed:
                self._failed = True
                self.log.error(
                    "access log {path}: cannot write ({error}); dropping lines",
                    path=self.path,
                    error=getattr(e, "strerror", None) or e,
                )
            return
        self._failed = False

    def _open(self) -> None:
        try:
            self._file = open_log(self.path)
        except OSError as e:
            self._file = None
            self.log.error(
                "access log {path}: cannot open: {error}", path=self.path, error=e.strerror or e
            )

    def _close(self) -> None:
        out, self._file = self._file, None
        if out is not None:
            try:
                out.close()
            except OSError:
                pass

    def reopen(self, path: Optional[str] = None, format: Optional[str] = None) -> None:
        """
        Write what is pending, then reopen the file (after log rotation, or
        with a new path or format on reload).
        """
        self.flush()
        if path is not None:
            self.path = path
        if format is not None:
            self.format = format
        if self.running:
            self._close()
            self._open()

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        self._limit = self.batch_size
        self._open()
        self.flush()
        loop = self._loop = LoopingCall(self.flush)
        loop.clock = self.clock
        loop.start(self.flush_interval, now=False)

    def stopService(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        self.flush()
        self._close()
        self._stopped = True
        # From now on every entry is written at once (see flush).
        self._limit = 1
        super().stopService()
