"""
The daemon's own log as JSON lines (L{rrlb.jsonlog}): the fields of one
event, and every line of real runs parsed, under twistd and twist, with
C{--workers 2} too.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest

from rrlb.jsonlog import event_fields, json_file_observer, use_json_log
from tests.support import (
    LOOPBACK,
    HTTPClient,
    closed_port_url,
    start_backends,
    start_daemon,
)

FIELDS = ("time", "level", "system", "message")


class EventTests(unittest.TestCase):
    """
    What one event's line holds.
    """

    def emit(self, level: LogLevel, text: str, **fields: Any) -> dict[str, Any]:
        out = io.StringIO()
        log = Logger(namespace="rrlb.pool", observer=json_file_observer(out))
        log.emit(level, text, **fields)
        line = out.getvalue()
        self.assertEqual(line.count("\n"), 1, line)
        value: dict[str, Any] = json.loads(line)
        return value

    def test_fields(self) -> None:
        """
        time (UTC, milliseconds), level, system and the formatted message
        first, then the event's own fields.
        """
        line = self.emit(
            LogLevel.warn,
            "node {node} is down: {reason}",
            node="http://10.0.0.1:8080",
            pool="api",
            reason="HTTP 503\nsecond line",
            failures=3,
        )
        self.assertEqual(list(line)[:4], list(FIELDS))
        self.assertRegex(line["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(line["level"], "warn")
        self.assertEqual(line["system"], "rrlb.pool")
        self.assertEqual(
            line["message"], "node http://10.0.0.1:8080 is down: HTTP 503\nsecond line"
        )
        self.assertEqual(
            (line["node"], line["pool"], line["reason"], line["failures"]),
            ("http://10.0.0.1:8080", "api", "HTTP 503\nsecond line", 3),
        )

    def test_odd_values(self) -> None:
        """
        Values JSON has no type for are written as text; a failure gives
        its error and traceback.
        """
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            failure = Failure()
        line = self.emit(
            LogLevel.error, "oops {thing}", thing=object(), nan=float("nan"), log_failure=failure
        )
        self.assertTrue(line["thing"].startswith("<object object"), line)
        self.assertEqual(line["nan"], "nan")
        self.assertIn("division by zero", line["error"])
        self.assertIn("ZeroDivisionError", line["traceback"])
        self.assertEqual(line["level"], "error")

    def test_legacy_event(self) -> None:
        """
        An event of the legacy log system keeps only its own fields.
        """
        fields = event_fields(
            {
                "message": ("hello",),
                "isError": 0,
                "system": "-",
                "log_format": "{log_text}",
                "log_text": "hello",
                "log_time": 0.0,
            }
        )
        self.assertEqual(
            fields,
            {
                "time": "1970-01-01T00:00:00.000Z",
                "level": "info",
                "system": "-",
                "message": "hello",
            },
        )
        self.assertEqual(formatEvent({"log_format": "{log_text}", "log_text": "hello"}), "hello")

    def test_runner_options(self) -> None:
        """
        twist's observer factory is replaced; twistd is given a --logger
        that writes where it would (stdout with -n); with --syslog, or
        without a runner, nothing changes.
        """
        twist: dict[str, Any] = {"fileLogObserverFactory": None}
        use_json_log(twist)
        self.assertIs(twist["fileLogObserverFactory"], json_file_observer)
        twistd: dict[str, Any] = {"logger": None, "logfile": "", "nodaemon": True}
        use_json_log(twistd)
        self.assertEqual(twistd["logger"], "rrlb.jsonlog.TWISTD.observer")
        syslog: dict[str, Any] = {"logger": None, "syslog": True}
        use_json_log(syslog)
        self.assertIsNone(syslog["logger"])
        use_json_log(None)


class ProcessLogTests(unittest.TestCase):
    """
    Every line a real rrlb writes, parsed as JSON.
    """

    def lines(self, output: bytes) -> list[dict[str, Any]]:
        parsed = []
        for line in output.decode("utf-8").splitlines():
            try:
                value = json.loads(line)
            except ValueError:
                self.fail(f"not a JSON line: {line!r}")
            self.assertIsInstance(value, dict, line)
            for key in FIELDS:
                self.assertIsInstance(value.get(key), str, (key, line))
            parsed.append(value)
        return parsed

    async def run_rrlb(self, twistd: bool, *args: str) -> list[dict[str, Any]]:
        """
        rrlb with --log-format json: a node goes down, a reload, an API
        change and SIGTERM; every line it wrote.
        """
        a, b = await start_backends(self, "a", "b")
        admin = (await closed_port_url()).rsplit(":", 1)[1]
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(f"nodes: [{a.url}, {b.url}]\nhealth: {{path: /health, interval: 0.2}}\n")
        daemon = await start_daemon(
            self,
            "--config",
            path,
            "--log-format",
            "json",
            "--admin",
            f"tcp:{admin}:interface={LOOPBACK}",
            "--fall",
            "1",
            *args,
            twistd=twistd,
        )
        await daemon.wait_for_message("READY=1")
        b.healthy = False
        await daemon.wait_for_output('"reason"')
        daemon.signal("HUP")
        await daemon.wait_for_output("configuration reloaded")
        client = HTTPClient()
        self.addCleanup(client.close)
        reply = await client.request(
            "PATCH",
            f"http://{LOOPBACK}:{admin}/nodes/default/0",
            {b"Content-Type": [b"application/json"]},
            b'{"weight": 2}',
        )
        self.assertEqual(reply.code, 200)
        await daemon.wait_for_output("changed pool default")
        daemon.signal("TERM")
        self.assertEqual(await daemon.exit_code(), 0)
        lines = self.lines(daemon.output)
        down = [line for line in lines if line.get("node") == b.url and "reason" in line]
        self.assertTrue(down, lines)
        self.assertEqual((down[0]["level"], down[0]["pool"]), ("warn", "default"))
        (change,) = [line for line in lines if line.get("source") == "api"]
        self.assertEqual(
            (change["before"], change["after"]),
            ("weight 1, max_connections default", "weight 2, max_connections default"),
        )
        self.assertTrue(change["peer"].startswith(LOOPBACK), change)
        return lines

    async def test_twistd(self) -> None:
        """
        Under C{twistd -n}, the whole log is JSON lines, twistd's own lines
        included.
        """
        lines = await self.run_rrlb(True)
        self.assertIn("twistd", lines[0]["message"])

    async def test_twist_with_workers(self) -> None:
        """
        Under C{python -m twisted} with C{--workers 2}, the main process's
        lines and the workers' are JSON lines.
        """
        lines = await self.run_rrlb(False, "--workers", "2")
        systems = {line["system"] for line in lines}
        self.assertTrue({"rrlb worker 0", "rrlb worker 1"} <= systems, systems)
