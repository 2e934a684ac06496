"""
Tests for L{rrlb.accesslog}: the line formats, the batching, and real
requests through rrlb over loopback ending up as lines in both formats.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from types import SimpleNamespace
from typing import Any

from twisted.internet import task
from twisted.trial import unittest
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET

from rrlb.accesslog import BATCH_SIZE, AccessLog, format_combined, format_json
from rrlb.filters import ACCESS_LOG_FIELDS, FilterRequest
from rrlb.tap import makeService
from tests.support import (
    LogCapture,
    balancer_options,
    closed_port_url,
    http_request,
    parse_error,
    raw_connect,
    raw_request,
    start_backend,
    start_balancer,
    wait_until,
)

# 2025-10-10 13:55:36.250 UTC
WHEN = 1760104536.25

ENTRY: Any = (
    WHEN,
    "192.0.2.7",
    b"GET",
    b"/x?y=1",
    b"HTTP/1.1",
    200,
    123,
    b"http://example.com/",
    b"curl/8.5.0",
    "http://10.0.0.1:8080",
    200,
    0.0034,
)

NO_NODE: Any = (WHEN, "192.0.2.7", b"GET", b"/", b"HTTP/1.1", 503, 52, None, None, None, None, None)

COMBINED = re.compile(
    r'^(?P<host>\S+) - - \[(?P<time>[^\]]+)\] "(?P<request>[^"]*)" (?P<status>\d{3}) '
    r'(?P<bytes>\d+) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)" node="(?P<node>[^"]*)" '
    r"upstream_status=(?P<upstream_status>\S+) upstream_time=(?P<upstream_time>\S+)$"
)


class FormatTests(unittest.TestCase):
    """
    One entry as a line.
    """

    def test_combined(self) -> None:
        """
        The combined format is Apache/nginx's, then the node, the upstream
        status and the upstream time.
        """
        self.assertEqual(
            format_combined(ENTRY).decode(),
            '192.0.2.7 - - [10/Oct/2025:13:55:36 +0000] "GET /x?y=1 HTTP/1.1" 200 123'
            ' "http://example.com/" "curl/8.5.0" node="http://10.0.0.1:8080"'
            " upstream_status=200 upstream_time=0.003\n",
        )

    def test_combined_without_node(self) -> None:
        """
        A response rrlb made itself has C{-} for the referer, agent and the
        three upstream fields.
        """
        self.assertEqual(
            format_combined(NO_NODE).decode(),
            '192.0.2.7 - - [10/Oct/2025:13:55:36 +0000] "GET / HTTP/1.1" 503 52 "-" "-"'
            ' node="-" upstream_status=- upstream_time=-\n',
        )

    def test_combined_escapes(self) -> None:
        """
        Quotes, backslashes, control bytes and non-ASCII bytes from the
        client are written as \\xHH, so a line can never be split or faked.
        """
        entry = list(ENTRY)
        entry[3] = b'/a"b\\c\xc3\xa9'
        entry[8] = b'evil"\n127.0.0.1 - - [x] "GET'
        line = format_combined(tuple(entry)).decode()  # type: ignore[arg-type]
        self.assertEqual(line.count("\n"), 1)
        self.assertIn('"GET /a\\x22b\\x5Cc\\xC3\\xA9 HTTP/1.1"', line)
        self.assertIn('"evil\\x22\\x0A127.0.0.1 - - [x] \\x22GET"', line)
        self.assertIsNotNone(COMBINED.match(line.rstrip("\n")))

    def test_combined_note_cannot_fake_a_field(self) -> None:
        """
        A filter's note is written unquoted, so a space in its value (from a
        client's header, say) is escaped too: it can never add a field such
        as a second request_id= to the line.
        """
        entry = (*ENTRY, None, {"tenant": 'a b" request_id=forged', "request_id": "abc"})
        line = format_combined(entry).decode()  # type: ignore[arg-type]
        self.assertTrue(
            line.endswith(" tenant=a\\x20b\\x22\\x20request_id=forged request_id=abc\n")
        )
        self.assertEqual(line.count(" request_id="), 1)

    def test_notes_cannot_take_a_field_name(self) -> None:
        """
        A note named after a field the log writes itself (any key of a JSON
        line with a tunnel and a client certificate, or a combined field) is
        refused, so that no line carries a field twice.
        """
        tunnel = (*ENTRY, (1, 2, 0.5))
        fields = set(json.loads(format_json(tunnel)))
        fields |= {"client_cert_subject"}
        combined = format_combined(tunnel).decode()
        fields |= set(re.findall(r" ([a-z_]+)=", combined))
        self.assertEqual(fields, ACCESS_LOG_FIELDS)
        view = FilterRequest(SimpleNamespace(log_notes=None, requestHeaders=Headers()))
        for name in sorted(fields):
            self.assertRaises(ValueError, view.note, name, "x")
        view.note("tenant", "x")

    def test_json(self) -> None:
        """
        The json format is one object per line with the same fields.
        """
        line = format_json(ENTRY).decode()
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(
            json.loads(line),
            {
                "time": "2025-10-10T13:55:36.250Z",
                "remote_addr": "192.0.2.7",
                "method": "GET",
                "uri": "/x?y=1",
                "protocol": "HTTP/1.1",
                "status": 200,
                "bytes": 123,
                "referer": "http://example.com/",
                "user_agent": "curl/8.5.0",
                "node": "http://10.0.0.1:8080",
                "upstream_status": 200,
                "upstream_time": 0.0034,
            },
        )

    def test_json_without_node(self) -> None:
        """
        Fields that do not apply are null in JSON.
        """
        record = json.loads(format_json(NO_NODE))
        self.assertEqual(record["status"], 503)
        self.assertIsNone(record["node"])
        self.assertIsNone(record["upstream_status"])
        self.assertIsNone(record["upstream_time"])
        self.assertIsNone(record["referer"])

    def test_json_bytes(self) -> None:
        """
        UTF-8 from the client stays readable in JSON; other bytes become
        \\xHH text; nothing breaks the line.
        """
        entry = list(ENTRY)
        entry[3] = "/caf\u00e9".encode() + b"\xff"
        entry[8] = b"a\nb"
        line = format_json(tuple(entry)).decode()  # type: ignore[arg-type]
        self.assertEqual(line.count("\n"), 1)
        record = json.loads(line)
        self.assertEqual(record["uri"], "/caf\u00e9\\xff")
        self.assertEqual(record["user_agent"], "a\nb")


class BatchingTests(unittest.TestCase):
    """
    Lines are written in batches: every second, when enough are pending,
    and at stop.
    """

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.clock = task.Clock()
        self.log = AccessLog(self.path, "combined", self.clock)
        self.log.startService()
        self.addCleanup(lambda: self.log.running and self.log.stopService())

    def lines(self) -> list[str]:
        with open(self.path, encoding="utf-8") as f:
            return f.read().splitlines()

    def test_written_each_second(self) -> None:
        """
        Appending writes nothing; the next flush a second later writes all
        pending lines in order.
        """
        for i in range(3):
            self.log.append(ENTRY[:3] + (b"/%d" % i,) + ENTRY[4:])
        self.assertEqual(self.lines(), [])
        self.clock.advance(1.0)
        self.assertEqual(
            [COMBINED.match(line)["request"] for line in self.lines()],  # type: ignore[index]
            ["GET /0 HTTP/1.1", "GET /1 HTTP/1.1", "GET /2 HTTP/1.1"],
        )

    def test_full_batch_written_at_once(self) -> None:
        """
        A full batch is written without waiting for the timer.
        """
        for _ in range(BATCH_SIZE - 1):
            self.log.append(ENTRY)
        self.assertEqual(self.lines(), [])
        self.log.append(ENTRY)
        self.assertEqual(len(self.lines()), BATCH_SIZE)

    def test_stop_flushes(self) -> None:
        """
        Stopping writes what is pending; a request that ends afterwards (while
        the balancer drains) is still written.
        """
        self.log.append(ENTRY)
        self.log.stopService()
        self.assertEqual(len(self.lines()), 1)
        self.log.append(NO_NODE)
        self.assertEqual(len(self.lines()), 2)
        self.assertIn(" 503 ", self.lines()[1])

    def test_reopen(self) -> None:
        """
        Reopening (after logrotate moved the file, or with a new path and
        format on reload) writes what was pending to the old file and goes
        on in the new one.
        """
        self.log.append(ENTRY)
        moved = self.path + ".1"
        os.rename(self.path, moved)
        self.log.reopen(format="json")
        self.log.append(ENTRY)
        self.clock.advance(1.0)
        with open(moved, encoding="utf-8") as f:
            self.assertEqual(len(f.read().splitlines()), 1)
        self.assertEqual(json.loads(self.lines()[0])["status"], 200)

    def test_note_with_lone_surrogate(self) -> None:
        """
        A note whose value has a lone surrogate (a C{str} that is no
        Unicode, which C{note} accepts) is written escaped, and the other
        lines of its batch are written too, in both formats.
        """
        raw = SimpleNamespace(requestHeaders=Headers(), log_notes=None)
        FilterRequest(raw).note("tenant", "a\udc80\ud800b")
        self.log.append(ENTRY)
        self.log.append((*ENTRY, None, raw.log_notes))
        self.log.append(NO_NODE)
        self.clock.advance(1.0)
        lines = self.lines()
        self.assertEqual(len(lines), 3, lines)
        self.assertTrue(lines[1].endswith(" tenant=a\\x5Cudc80\\x5Cud800b"), lines[1])
        self.assertEqual(format_json((*ENTRY, None, raw.log_notes))[-1:], b"\n")

    def test_write_error_logged_not_raised(self) -> None:
        """
        A log that cannot be opened or written never raises into the request
        path; the error is logged once.
        """
        logs = LogCapture.install(self)
        path = os.path.join(self.mktemp(), "missing", "x.log")
        broken = AccessLog(path, "json", self.clock)
        broken.startService()
        for _ in range(BATCH_SIZE + 1):
            broken.append(ENTRY)
        self.clock.advance(1.0)
        broken.stopService()
        broken.append(ENTRY)
        messages = [m for m in logs.messages() if path in m]
        self.assertEqual(len(messages), 2, messages)
        self.assertIn("cannot open", messages[0])
        self.assertIn("cannot write", messages[1])
        self.assertEqual(self.flushLoggedErrors(), [])


def _read(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


class AccessLogOverLoopbackTests(unittest.TestCase):
    """
    Real requests through rrlb end up in the access log, one line each,
    written when the response ended.
    """

    async def balancer(self, nodes: list[str], fmt: str, *args: str) -> tuple[Any, str]:
        path = self.mktemp()
        balancer = await start_balancer(
            self,
            nodes,
            "--health-path",
            "/health",
            "--access-log",
            path,
            "--access-log-format",
            fmt,
            *args,
        )
        return balancer, path

    async def test_combined_lines(self) -> None:
        """
        A proxied request is logged in the combined format with the node
        that served it, its status and its time.
        """
        backend = await start_backend(self, "a")
        balancer, path = await self.balancer([backend.url], "combined")
        reply = await http_request(
            self,
            "GET",
            balancer.url + "/page?x=1",
            {b"Referer": [b"http://ref.example/"], b"User-Agent": [b"tester/1.0"]},
        )
        self.assertEqual(reply.code, 200)
        await balancer.stop()
        lines = _read(path)
        self.assertEqual(len(lines), 1)
        match = COMBINED.match(lines[0])
        self.assertIsNotNone(match, lines[0])
        assert match is not None
        self.assertEqual(match["host"], "127.0.0.1")
        self.assertEqual(match["request"], "GET /page?x=1 HTTP/1.1")
        self.assertEqual(match["status"], "200")
        self.assertEqual(match["bytes"], "1")
        self.assertEqual(match["referer"], "http://ref.example/")
        self.assertEqual(match["agent"], "tester/1.0")
        self.assertEqual(match["node"], backend.url)
        self.assertEqual(match["upstream_status"], "200")
        self.assertRegex(match["upstream_time"], r"^\d+\.\d{3}$")
        self.assertRegex(match["time"], r"^\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000$")

    async def test_json_lines(self) -> None:
        """
        In json, each request is one object per line: a proxied one with its
        node, and rrlb's own 503 (no node in rotation) with nulls.
        """
        backend = await start_backend(self, "a")
        backend.status = 404
        balancer, path = await self.balancer([backend.url], "json")
        self.assertEqual((await http_request(self, "GET", balancer.url + "/a")).code, 404)
        pool = balancer.service.pool
        pool.set_drained(pool.nodes[0], True)
        self.assertEqual(
            (await http_request(self, "POST", balancer.url + "/b", body=b"x")).code, 503
        )
        await balancer.stop()
        records = [json.loads(line) for line in _read(path)]
        self.assertEqual(len(records), 2)
        first, second = records
        self.assertEqual(
            {
                k: first[k]
                for k in ("method", "uri", "protocol", "status", "node", "upstream_status")
            },
            {
                "method": "GET",
                "uri": "/a",
                "protocol": "HTTP/1.1",
                "status": 404,
                "node": backend.url,
                "upstream_status": 404,
            },
        )
        self.assertIsInstance(first["upstream_time"], float)
        self.assertEqual(first["remote_addr"], "127.0.0.1")
        self.assertEqual(second["status"], 503)
        self.assertEqual(second["method"], "POST")
        self.assertIsNone(second["node"])
        self.assertIsNone(second["upstream_status"])
        self.assertIsNone(second["upstream_time"])

    async def test_bad_gateway_logged(self) -> None:
        """
        A request the node refused is logged as rrlb's 502 with the node it
        tried and no upstream status.
        """
        dead = await closed_port_url()
        balancer, path = await self.balancer([dead], "json", "--health-interval", "60")
        self.assertEqual(
            (await http_request(self, "POST", balancer.url + "/", body=b"x")).code, 502
        )
        await balancer.stop()
        (record,) = [json.loads(line) for line in _read(path)]
        self.assertEqual(record["status"], 502)
        self.assertEqual(record["node"], dead)
        self.assertIsNone(record["upstream_status"])

    async def test_client_gone_logged_as_499(self) -> None:
        """
        A client that leaves before any response came is logged (and
        counted) as 499 with the node it was waiting for, and the node's
        in-flight count goes back to zero.
        """
        backend = await start_backend(self, "slow")
        backend.delay = 5.0
        balancer, path = await self.balancer([backend.url], "json")
        client = await raw_connect(self, balancer.port)
        client.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        node = balancer.service.pool.nodes[0]
        await wait_until(lambda: node.in_flight == 1, what="the request to reach the node")
        await client.close()
        await wait_until(lambda: node.in_flight == 0, what="the request to end")
        balancer.service.traffic.access_log.flush()
        (record,) = [json.loads(line) for line in _read(path)]
        self.assertEqual(record["status"], 499)
        self.assertEqual(record["uri"], "/slow")
        self.assertEqual(record["node"], backend.url)
        self.assertIsNone(record["upstream_status"])
        self.assertEqual(
            balancer.service.metrics.requests, {(("default", backend.url), "GET", 499): 1}
        )

    async def test_written_while_running(self) -> None:
        """
        Lines reach the file within about a second, without a stop.
        """
        backend = await start_backend(self, "a")
        balancer, path = await self.balancer([backend.url], "combined")
        await http_request(self, "GET", balancer.url + "/")
        await wait_until(lambda: len(_read(path)) == 1, what="the line to be written")


class AccessLogOptionsTests(unittest.TestCase):
    """
    The options that turn the access log on.
    """

    def test_bad_format(self) -> None:
        """
        An unknown format is refused with a line naming the option.
        """
        message = parse_error("--nodes", "http://127.0.0.1:9", "--access-log-format", "xml")
        self.assertIn("--access-log-format must be one of combined, json", message)

    def test_unwritable_path(self) -> None:
        """
        A path that cannot be opened stops start-up with one clear line.
        """
        path = os.path.join(self.mktemp(), "no", "such", "dir.log")
        message = parse_error("--nodes", "http://127.0.0.1:9", "--access-log", path)
        self.assertTrue(message.startswith("--access-log: cannot open"), message)

    def test_off_by_default(self) -> None:
        """
        Without --access-log (or --admin) nothing is recorded per request.
        """
        service = makeService(balancer_options("--nodes", "http://127.0.0.1:9"))
        self.assertIsNone(service.traffic.access_log)
        self.assertIsNone(service.traffic.site.access_log)

    def test_yaml(self) -> None:
        """
        access_log and access_log_format come from YAML too.
        """
        log_path = self.mktemp()
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(
                f"nodes: [http://127.0.0.1:9]\naccess_log: {log_path}\naccess_log_format: json\n"
            )
        service = makeService(balancer_options("--config", config))
        assert service.traffic.access_log is not None
        self.assertEqual(service.traffic.access_log.path, log_path)
        self.assertEqual(service.traffic.access_log.format, "json")


class CutResponseTests(unittest.TestCase):
    """
    A response cut off mid-body never reaches finish(); it is still logged.
    """

    async def test_node_drops_mid_body(self) -> None:
        """
        A node that drops its connection mid-body is logged with the status
        the client was sent and the body bytes it got.
        """
        backend = await start_backend(self, "cut")

        def cut(request: Any) -> Any:
            request.setHeader(b"Content-Length", b"100")
            request.write(b"x" * 10)
            request.channel.transport.loseConnection()
            return NOT_DONE_YET

        backend.handler = cut
        path = self.mktemp()
        balancer = await start_balancer(
            self,
            [backend.url],
            "--health-path",
            "/health",
            "--access-log",
            path,
            "--access-log-format",
            "json",
        )
        data = await raw_request(
            self, balancer.port, b"GET /cut HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)
        await balancer.stop()
        (record,) = [json.loads(line) for line in _read(path)]
        self.assertEqual(record["status"], 200)
        self.assertEqual(record["bytes"], 10)
        self.assertEqual(record["upstream_status"], 200)
        self.assertEqual(record["node"], backend.url)


class AccessLogReloadTests(unittest.TestCase):
    """
    A new configuration (reload) switches the access log in place.
    """

    async def test_switch_and_stop(self) -> None:
        """
        Applying a configuration with another path and format moves the log
        there; one without an access log stops it (the admin counters stay).
        """
        backend = await start_backend(self, "a")
        first, second = self.mktemp(), self.mktemp()
        balancer = await start_balancer(
            self, [backend.url], "--health-path", "/health", "--access-log", first
        )
        service = balancer.service
        await http_request(self, "GET", balancer.url + "/one")
        service.apply(
            dataclasses.replace(service.config, access_log=second, access_log_format="json")
        )
        await http_request(self, "GET", balancer.url + "/two")
        service.apply(dataclasses.replace(service.config, access_log=None))
        self.assertIsNone(service.traffic.access_log)
        self.assertIsNone(service.traffic.site.access_log)
        await http_request(self, "GET", balancer.url + "/three")
        await balancer.stop()
        (line,) = _read(first)
        self.assertIn('"GET /one HTTP/1.1"', line)
        (record,) = [json.loads(line) for line in _read(second)]
        self.assertEqual(record["uri"], "/two")


class LinePiecesTests(unittest.TestCase):
    """
    Batches for standard output are written in whole lines of at most
    C{PIPE_BUF} bytes, so worker processes sharing the pipe never split
    each other's lines.
    """

    def test_pieces(self) -> None:
        """
        Every piece ends a line and fits; together they are the batch.
        """
        from rrlb.accesslog import line_pieces

        data = b"".join(b"x" * (i % 50) + b"\n" for i in range(300))
        pieces = line_pieces(data, 100)
        self.assertEqual(b"".join(pieces), data)
        self.assertTrue(all(len(p) <= 100 and p.endswith(b"\n") for p in pieces))
        self.assertGreater(len(pieces), 70)

    def test_long_line(self) -> None:
        """
        A line longer than the size is a piece of its own.
        """
        from rrlb.accesslog import line_pieces

        self.assertEqual(line_pieces(b"a" * 300 + b"\nb\n", 100), [b"a" * 300 + b"\n", b"b\n"])
