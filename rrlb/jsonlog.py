# -*- test-case-name: tests.test_jsonlog -*-
"""
The daemon's own log as JSON lines (C{log_format: json}, C{--log-format
json}): one object a line with C{time} (ISO 8601, UTC, milliseconds),
C{level}, C{system} and C{message}, then the event's own fields (C{node},
C{pool}, C{reason}, ...), for log shippers and journald.

The runner is told to use it from the plugin's options
(L{use_json_log}): C{twistd} through its C{--logger} option, C{twist}
(C{python -m twisted}) through its log observer factory, so the log goes
where that runner would write its text (standard output with C{-n}, else
the C{--logfile}). Worker processes write theirs to standard error.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import IO, Any, Optional

from twisted.logger import FileLogObserver, ILogObserver, LogEvent, formatEvent

# Keys of the legacy log system (twisted.python.log) that the four fields
# above already say.
_LEGACY = frozenset({"message", "isError", "system", "time", "format", "why", "failure", "printed"})
_FIELDS = ("time", "level", "system", "message")


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def event_fields(event: LogEvent) -> dict[str, Any]:
    """
    What the JSON line of C{event} holds.
    """
    when = event.get("log_time") or 0.0
    level = event.get("log_level")
    failure = event.get("log_failure")
    fields: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
        + f".{int(when % 1 * 1000):03d}Z",
        "level": getattr(level, "name", "info"),
        "system": str(event.get("log_system") or event.get("log_namespace") or "-"),
        "message": formatEvent(event),
    }
    if failure is not None:
        fields["error"] = failure.getErrorMessage()
        fields["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if not key.startswith("log_") and key not in _LEGACY and key not in fields:
            fields[key] = _plain(value)
    return fields


def format_json_line(event: LogEvent) -> Optional[str]:
    """
    C{event} as one line of JSON (newlines inside values are escaped).
    """
    try:
        return json.dumps(event_fields(event), ensure_ascii=False) + "\n"
    except Exception:
        # Never lose an event to a field that cannot be written.
        return json.dumps({"message": repr(event)}) + "\n"


def json_file_observer(out: IO[Any]) -> ILogObserver:
    """
    An observer that writes each event as a JSON line to C{out}.
    """
    return FileLogObserver(out, format_json_line)


class TwistdLog:
    """
    The observer factory named to twistd's C{--logger} (which takes the
    dotted name of a callable without arguments): it writes where twistd
    would write its text log, as the options seen by L{use_json_log} say.
    """

    def __init__(self) -> None:
        self.logfile = ""
        self.nodaemon = False

    def observer(self) -> ILogObserver:
        out: IO[Any]
        if self.logfile == "-" or (self.nodaemon and not self.logfile):
            out = sys.stdout
        else:
            from twisted.python.logfile import LogFile

            out = LogFile.fromFullPath(self.logfile or "twistd.log")
        return json_file_observer(out)


TWISTD = TwistdLog()


def use_json_log(runner_options: Any) -> None:
    """
    Have the runner whose options (C{twistd}'s or C{twist}'s) these are
    log JSON lines. Nothing without a runner (tests), or with twistd's
    C{--syslog} or its own C{--logger}.
    """
    if runner_options is None:
        return
    if "fileLogObserverFactory" in runner_options:
        runner_options["fileLogObserverFactory"] = json_file_observer
        runner_options["logFormat"] = "json"
    elif "logger" in runner_options and runner_options["logger"] is None:
        if runner_options.get("syslog"):
            return
        TWISTD.logfile = runner_options.get("logfile") or ""
        TWISTD.nodaemon = bool(runner_options.get("nodaemon"))
        runner_options["logger"] = f"{__name__}.TWISTD.observer"
