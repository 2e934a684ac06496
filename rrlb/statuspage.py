# -*- test-case-name: tests.test_admin,tests.test_history -*-
"""
The admin endpoint's status page: one section per pool, one row per node
with its counters and inline SVG charts of its recent history, rendered
from C{status.html} and served with C{status.css} under a
Content-Security-Policy that allows only the page's own script.

L{rrlb.admin} serves it; this module only turns a status snapshot into
HTML.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
import time
from importlib import resources
from typing import Any, Optional, Sequence

from rrlb.history import HISTORY_SAMPLES, History, NodeHistory
from rrlb.pool import DRAINING

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def _asset(name: str) -> str:
    return resources.files("rrlb").joinpath(name).read_text(encoding="utf-8")


PAGE_TEMPLATE = _asset("status.html")
STYLESHEET = _asset("status.css").encode("utf-8")
_SCRIPT = re.search(r"<script>(.*?)</script>", PAGE_TEMPLATE, re.S)
_SCRIPT_HASH = base64.b64encode(
    hashlib.sha256((_SCRIPT.group(1) if _SCRIPT else "").encode("utf-8")).digest()
).decode("ascii")
# Only what the page itself needs: its stylesheet, its one inline script
# (by hash), fetches and form posts back to this endpoint.
PAGE_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self';"
    f" script-src 'sha256-{_SCRIPT_HASH}'; connect-src 'self'; form-action 'self';"
    " base-uri 'none'; frame-ancestors 'none'"
).encode("ascii")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.1f} ms"


def _in_flight(node: dict[str, Any]) -> str:
    limit = node["max_connections"]
    return f"{node['in_flight']} / {limit}" if limit else str(node["in_flight"])


# Chart geometry: one x unit per sample, drawn 150 x 32 CSS pixels.
CHART_HEIGHT = 40


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def chart(values: Sequence[Optional[float]], kind: str, label: str, unit: str, scale: float) -> str:
    """
    An inline SVG line chart of C{values} (oldest first; L{None} breaks the
    line), right-aligned on a five-minute axis, with its latest and highest
    values in words for screen readers and as a caption.
    """
    count = len(values)
    offset = HISTORY_SAMPLES - count
    top = max((v for v in values if v is not None), default=0.0)
    span = top if top > 0 else 1.0
    parts = []
    pen_down = False
    for i, value in enumerate(values):
        if value is None:
            pen_down = False
            continue
        y = CHART_HEIGHT - 1 - (CHART_HEIGHT - 2) * value / span
        parts.append(f"{'L' if pen_down else 'M'}{offset + i} {y:.1f}")
        pen_down = True
    last = next((v for v in reversed(values) if v is not None), None)
    now_text = "–" if last is None else f"{_number(last * scale)} {unit}"
    peak = f"{_number(top * scale)} {unit}"
    words = f"{label}, last 5 minutes: now {now_text}, highest {peak}"
    return (
        f'<figure class="chart {kind}" data-samples="{count}">'
        f'<svg viewBox="0 0 {HISTORY_SAMPLES} {CHART_HEIGHT}" preserveAspectRatio="none"'
        f' role="img" aria-label="{html.escape(words)}">'
        f'<path class="line" d="{" ".join(parts)}"/></svg>'
        f"<figcaption>{html.escape(label)} <b>{html.escape(now_text)}</b>"
        f" <span>max {html.escape(peak)}</span></figcaption></figure>"
    )


def _charts(history: Optional[NodeHistory]) -> str:
    if history is None:
        return '<span class="muted">collecting…</span>'
    return chart(list(history.rps), "rps", "req/s", "", 1.0) + chart(
        list(history.p99), "p99", "p99", "ms", 1000.0
    )


def _row(node: dict[str, Any], now: float, history: Optional[NodeHistory] = None) -> str:
    e = html.escape
    state = node["state"]
    if node["healthy"]:
        checks = f"healthy, {node['consecutive_successes']} ok in a row"
    else:
        checks = f"failing, {node['consecutive_failures']} failed in a row"
    if node["last_check"] is None:
        last = "not yet"
    else:
        last = f"{max(0.0, now - node['last_check']):.1f} s ago"
    action, label = ("enable", "Enable") if node["drained"] else ("drain", "Drain")
    pool = e(node["pool"])
    return f"""
   <tr class="node state-{state}" data-node-id="{node["id"]}" data-state="{state}" data-pool="{pool}">
    <td class="num">{node["id"]}</td>
    <td class="url"><span class="name">{e(node["name"])}</span><br><span class="full">{e(node["url"])}</span></td>
    <td><span class="state {state}">{state.upper()}</span></td>
    <td class="num">{node["weight"]}</td>
    <td>{e(checks)}</td>
    <td>{last}</td>
    <td class="num">{_ms(node["last_latency"])}</td>
    <td class="error">{e(node["last_error"] or "")}</td>
    <td class="num">{_in_flight(node)}</td>
    <td class="num">{node["requests"]}</td>
    <td class="num">{node["errors"]}</td>
    <td class="charts">{_charts(history)}</td>
    <td><form method="post" action="/nodes/{pool}/{node["id"]}/{action}"><button type="submit" class="{action}">{label}</button></form></td>
   </tr>"""  # noqa: E501


_TABLE_HEAD = """
   <thead>
    <tr>
     <th>#</th><th>node</th><th>state</th><th>weight</th><th>health checks</th>
     <th>last check</th><th>latency</th><th>last error</th><th>in flight</th>
     <th>requests</th><th>errors</th><th>last 5 minutes</th><th></th>
    </tr>
   </thead>"""


def _policy(pool: dict[str, Any]) -> str:
    words = [pool["balance"]]
    if pool["hash_key"]:
        words.append(f"on {pool['hash_key']}")
    if pool["sticky_cookie"]:
        words.append(f"sticky cookie {pool['sticky_cookie']}")
    if pool["slow_start"]:
        words.append(f"slow start {pool['slow_start']:g} s")
    return ", ".join(words)


def _pool_section(pool: dict[str, Any], now: float, history: Optional[History]) -> str:
    e = html.escape
    rows = "".join(
        _row(n, now, history.get((n["pool"], n["url"])) if history is not None else None)
        for n in pool["nodes"]
    ) or ('\n   <tr><td colspan="13" class="empty">no nodes configured</td></tr>')
    up = sum(1 for n in pool["nodes"] if n["state"] == "up")
    return f"""
  <section class="pool" data-pool="{e(pool["name"])}">
   <h2>{e(pool["name"])} <span class="policy">{e(_policy(pool))}</span>
    <span class="count">{up}/{len(pool["nodes"])} up</span></h2>
   <table class="nodes">{_TABLE_HEAD}
   <tbody>{rows}
   </tbody>
   </table>
  </section>"""


def _certificates(certificates: Sequence[dict[str, Any]], now: float) -> str:
    """
    The TLS certificates served (none: no section): names, issuer, expiry.
    """
    if not certificates:
        return ""
    e = html.escape
    rows = []
    for cert in certificates:
        end = cert["not_after"]
        left = end - now
        rows.append(
            f"""
    <tr class="certificate{" expiring" if left < 7 * 86400 else ""}">
     <td class="names">{e(", ".join(cert["names"]))}</td>
     <td class="issuer">{e(cert["issuer"])}</td>
     <td>{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(end))}</td>
     <td class="num">{_duration(left) if left > 0 else "expired"}</td>
     <td>{e(cert["source"])}</td>
    </tr>"""
        )
    return f"""
  <section class="certificates">
   <h2>TLS certificates</h2>
   <table class="certificates">
   <thead><tr><th>names</th><th>issuer</th><th>expires</th><th>left</th><th>from</th></tr></thead>
   <tbody>{"".join(rows)}
   </tbody>
   </table>
  </section>"""


def render_page(status: dict[str, Any], history: Optional[History] = None) -> str:
    """
    The status page for a C{/status} document, with charts from C{history}.
    """
    process = status["process"]
    counts = process["nodes"]
    now = process["time"]
    pools = "".join(_pool_section(p, now, history) for p in status["pools"])
    values = {
        "version": html.escape(process["version"]),
        "uptime": _duration(process["uptime"]),
        "connections": str(process["connections"]),
        "upstream_connections": str(process["upstream_connections"]),
        "requests": str(process["requests"]),
        "retries": str(process["retries"]),
        "queue_length": str(process["queue_length"]),
        "up": str(counts["up"]),
        "down": str(counts["down"]),
        "draining": str(counts[DRAINING]),
        "pools": pools,
        "certificates": _certificates(status.get("certificates", ()), now),
    }
    # One pass, so nothing a value holds (a node URL) is ever substituted.
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], PAGE_TEMPLATE)
