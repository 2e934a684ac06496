"""Processes for bench/fuzz and bench/soak: rrlb and bench/node.py on 127.0.0.1 only.

Every process started here is remembered and stopped by its PID (never by
name) when the script ends, on Ctrl-C or SIGTERM too.
"""

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10

_started = []


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def default_python():
    """The project's virtualenv python if there is one, else this one."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def free_port():
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_listening(port, proc, timeout=READY_TIMEOUT_S):
    """Wait until something accepts on 127.0.0.1:port; fail if proc exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process {proc.args[:4]} exited with {proc.returncode}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {LOOPBACK}:{port} after {timeout}s")


def _spawn(argv, log_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Always the working tree's rrlb (and its dropin).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    out = open(log_path, "ab")
    proc = subprocess.Popen(
        argv, cwd=str(REPO), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
    )
    out.close()
    _started.append(proc)
    return proc


def start_node(python, port, name, log_path, script="node.py"):
    """`python bench/SCRIPT PORT NAME` (bench/node.py by default), once it listens."""
    proc = _spawn([python, str(BENCH / script), str(port), name], log_path)
    wait_listening(port, proc)
    return proc


def start_rrlb(python, port, args, log_path, scheme="tcp"):
    """`python -m twisted rrlb --listen SCHEME:PORT:interface=127.0.0.1 ARGS`, as start_daemon."""
    argv = [python, "-m", "twisted", "--log-format", "text", "rrlb"]
    argv += ["--listen", f"{scheme}:{port}:interface={LOOPBACK}", *args]
    proc = _spawn(argv, log_path)
    wait_listening(port, proc)
    return proc


def stop(proc, sig=signal.SIGTERM, timeout=STOP_TIMEOUT_S):
    """Stop one process by its PID; SIGKILL if it does not go within timeout."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc in _started:
        _started.remove(proc)
    return proc.returncode


def stop_all():
    for proc in list(_started):
        stop(proc, signal.SIGKILL, 5)


def _on_signal(signum, frame):
    stop_all()
    raise SystemExit(128 + signum)


atexit.register(stop_all)
signal.signal(signal.SIGTERM, _on_signal)


def rss_kib(pid):
    """Resident set size of pid in KiB, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid):
    """Open file descriptors of pid, from /proc."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def tracebacks(log_path):
    """The lines of a log that start a Python traceback."""
    text = Path(log_path).read_text("utf-8", "replace")
    return [line for line in text.splitlines() if "Traceback (most recent call last)" in line]


def table(header, rows):
    """A markdown table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)
