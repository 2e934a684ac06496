"""
C{--check} and C{--print-config}: the configuration read and checked as a
start would, without listening or contacting a node, and printed back.
"""

from __future__ import annotations

import io
import os
import socket
import sys
from typing import Any

import yaml
from twisted.internet.protocol import Factory, Protocol

from rrlb.config import build_config
from rrlb.tap import Options
from tests.support import LOOPBACK, TLSCase, reactor, run_twistd


class _Counted(Protocol):
    def connectionMade(self) -> None:
        self.factory.count += 1  # type: ignore[attr-defined]
        self.transport.loseConnection()


class Checking(TLSCase):
    """
    Files for a configuration, and rrlb's options parsed in this process.
    """

    def setUp(self) -> None:
        super().setUp()
        # The files are named to a process that runs elsewhere.
        self.dir = os.path.abspath(self.dir)

    def good(self, node: str = "http://127.0.0.1:9") -> dict[str, Any]:
        cert, key = self.write_pair("site", self.certs.site_a)
        token = self.write("admin.token", b"s3cret-token-value\n")
        return {
            "nodes": [node, {"url": "http://127.0.0.1:10", "weight": 2}],
            "pools": {"api": {"nodes": ["https://127.0.0.1:11"], "balance": "leastconn"}},
            "routes": [{"path_prefix": "/api", "pool": "api"}, {"pool": "default"}],
            "tls": {"cert": cert, "key": key, "ca_file": self.ca_file},
            "admin_token_file": token,
        }

    def config_file(self, settings: dict[str, Any]) -> str:
        return self.write("rrlb.yaml", yaml.safe_dump(settings).encode("utf-8"))

    def run_options(self, *args: str) -> tuple[int, str, str]:
        """
        Parse C{args} as twistd would hand them to rrlb; the exit code and
        what was written to standard output and error.
        """
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        with self.assertRaises(SystemExit) as raised:
            Options().parseOptions(list(args))
        return int(raised.exception.code or 0), out.getvalue(), err.getvalue()


class CheckProcessTests(Checking):
    """
    C{twistd -n rrlb --check} as ExecReload runs it.
    """

    async def test_good_file_binds_and_contacts_nothing(self) -> None:
        """
        A good configuration exits 0 with one line counting pools, nodes and
        routes, while the ports it names are held by another listener (as
        the running daemon holds them), and no node is contacted.
        """
        factory = Factory.forProtocol(_Counted)
        factory.count = 0  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface=LOOPBACK)
        self.addCleanup(port.stopListening)
        held = []
        for _ in range(2):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            s.listen(1)
            self.addCleanup(s.close)
            held.append(s.getsockname()[1])
        path = self.config_file(self.good(f"http://{LOOPBACK}:{port.getHost().port}"))
        ran = await run_twistd(
            "rrlb",
            "--config",
            path,
            "--listen",
            f"tcp:{held[0]}:interface={LOOPBACK}",
            "--admin",
            f"tcp:{held[1]}:interface={LOOPBACK}",
            "--check",
        )
        self.assertEqual(
            (ran.code, ran.out, ran.err), (0, "configuration ok: 2 pools, 3 nodes, 2 routes\n", "")
        )
        self.assertEqual(factory.count, 0)  # type: ignore[attr-defined]

    async def test_bad_file_one_line(self) -> None:
        """
        A bad setting exits 1 with the one line naming it on standard error,
        and nothing else: no usage text.
        """
        settings = self.good()
        settings["nodes"][1]["weight"] = 0
        ran = await run_twistd("rrlb", "--config", self.config_file(settings), "--check")
        self.assertEqual(ran.code, 1)
        self.assertEqual(ran.out, "")
        self.assertEqual(ran.err, "nodes[1].weight must be a whole number from 1 to 256, not 0\n")

    async def test_bad_flag_one_line(self) -> None:
        """
        A bad flag value is one line too, without the prefix usage.Options
        puts before it.
        """
        ran = await run_twistd("rrlb", "--nodes", "http://a", "--timeout", "soon", "--check")
        self.assertEqual((ran.code, ran.out), (1, ""))
        self.assertEqual(ran.err, "--timeout must be a positive number of seconds, not 'soon'\n")

    async def test_systemd_listener(self) -> None:
        """
        A systemd: listener is checked without the socket systemd passes
        only to the service itself (ExecReload has none).
        """
        ran = await run_twistd(
            "rrlb", "--nodes", "http://a", "--listen", "systemd:domain=INET:index=0", "--check"
        )
        self.assertEqual(
            (ran.code, ran.out, ran.err), (0, "configuration ok: 1 pools, 1 nodes, 0 routes\n", "")
        )


class CheckTests(Checking):
    """
    Each kind of bad configuration, found by C{--check}.
    """

    def bad(self, change: Any, expected: str, *args: str) -> None:
        settings = self.good()
        change(settings)
        code, out, err = self.run_options("--config", self.config_file(settings), *args, "--check")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn(expected, err)

    def test_good(self) -> None:
        """
        The good file passes; N counts the named pools plus default.
        """
        code, out, err = self.run_options("--config", self.config_file(self.good()), "--check")
        self.assertEqual(
            (code, out, err), (0, "configuration ok: 2 pools, 3 nodes, 2 routes\n", "")
        )

    def test_only_named_pools(self) -> None:
        """
        Without top-level nodes the default pool is not counted.
        """
        settings = self.good()
        del settings["nodes"]
        settings["routes"] = [{"pool": "api"}]
        code, out, _ = self.run_options("--config", self.config_file(settings), "--check")
        self.assertEqual((code, out), (0, "configuration ok: 1 pools, 1 nodes, 1 routes\n"))

    def test_invalid_yaml(self) -> None:
        """
        YAML that does not parse names the line.
        """
        path = self.write("bad.yaml", b"nodes: [http://a\n")
        code, _, err = self.run_options("--config", path, "--check")
        self.assertEqual(code, 1)
        self.assertIn("config: invalid YAML in", err)

    def test_unknown_key(self) -> None:
        """
        An unknown setting is named.
        """
        self.bad(lambda s: s.update(timeuot=3), "config: unknown setting 'timeuot'")

    def test_bad_value(self) -> None:
        """
        A bad value names the setting.
        """
        self.bad(lambda s: s.update(retries=-1), "retries must be a whole number of at least 0")

    def test_key_not_matching_cert(self) -> None:
        """
        A key that is not the certificate's is refused.
        """
        _, other = self.write_pair("other", self.certs.site_b)
        self.bad(lambda s: s["tls"].update(key=other), "tls")

    def test_missing_ca_file(self) -> None:
        """
        A CA file that cannot be read is refused.
        """
        self.bad(lambda s: s["tls"].update(ca_file="/nonexistent/ca.pem"), "/nonexistent/ca.pem")

    def test_node_ca_file(self) -> None:
        """
        A node's own CA file is read too.
        """
        self.bad(
            lambda s: s["pools"]["api"].update(
                nodes=[{"url": "https://127.0.0.1:11", "tls": {"ca_file": "/nonexistent/n.pem"}}]
            ),
            "pools.api: ",
        )

    def test_route_to_unknown_pool(self) -> None:
        """
        A route naming no pool is refused.
        """
        self.bad(lambda s: s["routes"].insert(0, {"pool": "web"}), "routes[0].pool: no pool 'web'")

    def test_filters(self) -> None:
        """
        A filter that cannot be imported, or a built-in one with a bad
        argument, is refused.
        """
        self.bad(lambda s: s.update(filters=[{"use": "no.such.module:Filter"}]), "filters[0]")
        self.bad(lambda s: s.update(filters=[{"request_id": {"colour": 1}}]), "filters[0]")

    def test_token_file(self) -> None:
        """
        A missing admin token file is refused.
        """
        self.bad(lambda s: s.update(admin_token_file="/nonexistent/t"), "admin_token_file")

    def test_flag(self) -> None:
        """
        Flags are checked with the file, and win over it.
        """
        self.bad(lambda s: None, "--nodes: node URL 'ftp://x'", "--nodes", "ftp://x")


class PrintConfigTests(Checking):
    """
    C{--print-config}: the effective configuration, as a config file.
    """

    def test_round_trip(self) -> None:
        """
        The YAML printed, read as a config file, gives the configuration it
        was printed from; defaults are filled in.
        """
        path = self.config_file(self.good())
        code, out, err = self.run_options("--config", path, "--retries", "4", "--print-config")
        self.assertEqual((code, err), (0, ""))
        printed = yaml.safe_load(out)
        self.assertEqual(printed["retries"], 4)
        self.assertEqual(printed["health"]["interval"], 5.0)
        self.assertEqual(printed["pools"]["api"]["health"]["fall"], 3)
        self.assertEqual(printed["max_connections"], None)
        again = self.write("again.yaml", out.encode("utf-8"))
        self.assertEqual(build_config(again), build_config(path, {"retries": 4}))

    def test_round_trip_filters_and_actions(self) -> None:
        """
        Filters and route actions (redirect, respond, weighted forward) are
        printed as the file gave them, and read back the same.
        """
        settings = self.good()
        settings["pools"]["canary"] = {"nodes": ["http://127.0.0.1:12"]}
        settings["filters"] = [
            {"request_id": {}},
            {"response_headers": {"set": {"Strict-Transport-Security": "max-age=31536000"}}},
        ]
        settings["routes"] = [
            {"scheme": "http", "redirect": {"scheme": "https"}},
            {"host": "status.example.com", "respond": {"status": 503, "body": "Back soon\n"}},
            {
                "path_prefix": "/api",
                "forward": [{"pool": "api", "weight": 90}, {"pool": "canary", "weight": 10}],
                "filters": [{"request_headers": {"set": {"X-Route": "api"}}}],
            },
            {"pool": "default"},
        ]
        path = self.config_file(settings)
        code, out, err = self.run_options("--config", path, "--print-config")
        self.assertEqual((code, err), (0, ""))
        printed = yaml.safe_load(out)
        self.assertEqual(printed["routes"], settings["routes"])
        self.assertEqual(printed["filters"], settings["filters"])
        again = self.write("again.yaml", out.encode("utf-8"))
        self.assertEqual(build_config(again), build_config(path))

    def test_no_secrets(self) -> None:
        """
        Neither the admin token nor a private key is printed, only the
        paths of their files.
        """
        settings = self.good()
        _, out, _ = self.run_options("--config", self.config_file(settings), "--print-config")
        self.assertNotIn("s3cret-token-value", out)
        self.assertNotIn("PRIVATE KEY", out)
        with open(settings["tls"]["key"]) as f:
            self.assertNotIn(f.read().splitlines()[1], out)
        self.assertIn(settings["admin_token_file"], out)

    def test_bad_config(self) -> None:
        """
        A bad configuration is not printed: the one line, exit 1.
        """
        code, out, err = self.run_options("--nodes", "ftp://x", "--print-config")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("--nodes", err)


class UnitFileTests(Checking):
    """
    contrib/systemd/rrlb.service checks before it reloads.
    """

    def test_exec_reload_checks_first(self) -> None:
        """
        ExecReload runs rrlb's check with ExecStart's command line, then
        sends SIGHUP; systemd stops at the first command that fails.
        """
        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "contrib", "systemd")
        with open(os.path.join(path, "rrlb.service"), encoding="utf-8") as f:
            lines = [line.strip() for line in f if not line.startswith("#")]
        start = [line.split("=", 1)[1] for line in lines if line.startswith("ExecStart=")]
        reload = [line.split("=", 1)[1] for line in lines if line.startswith("ExecReload=")]
        self.assertEqual(reload, [start[0] + " --check", "/bin/kill -HUP $MAINPID"])
