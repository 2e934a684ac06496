"""
Tests for L{rrlb.settings}, the table every setting is declared in once:
README's options table lists every option with its default, each option,
YAML key and L{Config} field agree, pools inherit what the table says, and
the values the proxy and the client side use are the table's.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from rrlb.clients import ClientLimits
from rrlb.config import build_config
from rrlb.proxy import ProxySettings
from rrlb.settings import (
    POOL,
    POOL_OWN,
    Config,
    HealthConfig,
    PoolSettings,
    Setting,
    command_line,
    rows,
    values_for,
)
from rrlb.tap import Options
from rrlb.values import (
    boolean,
    byte_size,
    non_negative_float,
    non_negative_int,
    percent,
    positive_float,
    positive_int,
    trusted_networks,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An option row of README's table: the option (and its argument) in
# backticks, then the default.
README_ROW = re.compile(r"^\| `--([a-z0-9-]+)[^`]*` \|([^|]*)\|")
# A value each parser takes that is not its setting's default.
SAMPLE_BY_PARSER = {
    positive_float: "7",
    non_negative_float: "7",
    positive_int: "7",
    non_negative_int: "7",
    percent: "7",
    byte_size: "7",
    trusted_networks: "10.0.0.0/8",
}
SAMPLE_BY_NAME = {
    "nodes": "http://b",
    "path": "/hz",
    "listen": "tcp:0",
    "access_log": "x.log",
    "access_log_format": "json",
    "log_format": "json",
    "admin": "tcp:0",
    "admin_hosts": "admin.internal",
    "admin_token_file": "admin.token",
    "cert": "c.pem",
    "key": "k.pem",
    "ca_file": "ca.pem",
    "resolvers": "10.0.0.1",
    "workers": "2",
    "balance": "hash",
    "hash_key": "uri",
}
# What a sample needs beside it to be valid: (options, YAML lines).
NEEDS = {
    "hash_key": (["--balance", "hash"], "balance: hash\n"),
    "key": (["--tls-cert", "c.pem"], ""),
}


def sample(row: Setting) -> Any:
    if row.parse is boolean:
        return True
    return SAMPLE_BY_NAME.get(row.name) or SAMPLE_BY_PARSER.get(row.parse)  # type: ignore[call-overload]


class _Parsed(Options):
    """
    rrlb's options without the checks of C{postOptions}, which read the
    files and endpoints the samples name.
    """

    def postOptions(self) -> None:
        pass


def value_at(config: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        config = getattr(config, name)
    return config


class ReadmeTests(unittest.TestCase):
    """
    README's options table and the table of settings agree.
    """

    def readme_options(self) -> dict[str, str]:
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            matches = [README_ROW.match(line) for line in f]
        return {m.group(1): m.group(2).strip() for m in matches if m}

    def test_every_option_with_its_default(self) -> None:
        """
        Every option of the table is a row of README's options table with
        its default as the table shows it, and README lists no other
        option (C{--config}, C{--check} and C{--print-config} are the
        options' own).
        """
        self.maxDiff = None
        listed = self.readme_options()
        expected = {row.flag: row.shown for _, row in command_line()}
        expected.update(config="", check="", **{"print-config": ""})
        self.assertEqual(listed, expected)


class AgreementTests(unittest.TestCase):
    """
    Each option, YAML key and L{Config} field agree.
    """

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_option_and_yaml_key_set_the_field(self) -> None:
        """
        Every setting with an option and a YAML key: the option and the key
        (under its section in YAML) given the same value set the same field
        of L{Config} to the same value, which is not the default; and the
        options not given leave the YAML value alone.
        """
        none_given = _Parsed()
        none_given.parseOptions([])
        for path, row in command_line():
            name = ".".join(path)
            value = sample(row)
            self.assertIsNotNone(value, f"no sample for {name}")
            options, lines = NEEDS.get(row.name, ([], ""))
            parsed = _Parsed()
            argv = [f"--{row.flag}"] + ([] if value is True else [value])
            parsed.parseOptions(["--nodes", "http://a", *options, *argv])
            from_flag = value_at(build_config(None, parsed.given()), path)
            self.assertNotEqual(from_flag, value_at(Config(), path), name)
            if not row.yaml:
                continue
            text = f"{path[-1]}: {str(value).lower() if value is True else value}"
            if len(path) == 2:
                text = f"{path[0]}: {{{text}{', cert: c.pem' if row.name == 'key' else ''}}}"
            path_yaml = self.write(f"nodes: [http://a]\n{lines}{text}\n")
            self.assertEqual(value_at(build_config(path_yaml), path), from_flag, name)
            config = build_config(path_yaml, none_given.given())
            self.assertEqual(value_at(config, path), from_flag, name)

    def test_yaml_keys_are_fields(self) -> None:
        """
        A setting's YAML key is the name of its field, in the class that
        declares it, and its default is the field's.
        """
        for table in (Config, HealthConfig, PoolSettings):
            fields = {f.name: f for f in dataclasses.fields(table)}
            for row in rows(table):
                self.assertEqual(fields[row.name].default, row.default, row.name)

    def test_options_are_unique(self) -> None:
        """
        No two settings share an option.
        """
        flags = [row.flag for _, row in command_line()]
        self.assertEqual(len(flags), len(set(flags)))


class PoolScopeTests(unittest.TestCase):
    """
    A pool inherits the top-level settings of scope L{POOL} and not those
    of scope L{POOL_OWN}.
    """

    def test_inheritance(self) -> None:
        """
        With every pool setting set at the top level (to a value that is
        not its default) and none in the pool, the pool has the top-level
        value of each L{POOL} setting and the default of each L{POOL_OWN}
        one.
        """
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(
                "nodes: [http://a]\ntimeout: 7\nconnect_timeout: 7\nnode_host: true\n"
                "max_idle_per_node: 7\nhealth: {rise: 7}\nbalance: hash\nhash_key: uri\n"
                "sticky: {cookie: s}\nslow_start: 7\n"
                "pools: {p: {nodes: [http://b]}}\nroutes: [{pool: p}]\n"
            )
        config = build_config(path)
        (pool,) = config.pools
        for row in rows(PoolSettings):
            if row.name == "nodes":
                continue
            self.assertIn(row.scope, (POOL, POOL_OWN))
            self.assertNotEqual(getattr(config, row.name), row.default, row.name)
            expected = getattr(config, row.name) if row.scope == POOL else row.default
            self.assertEqual(getattr(pool, row.name), expected, row.name)


class DerivedValuesTests(unittest.TestCase):
    """
    The client limits and the proxy's settings are the table's.
    """

    def test_client_limits(self) -> None:
        """
        Every field of L{ClientLimits} is fed by one setting, and
        L{ClientLimits.from_config} takes the config's values.
        """
        config = Config(client_header_timeout=3.0, max_headers=7, max_connections=5)
        fed = values_for("client", config)
        self.assertEqual(set(fed), {f.name for f in dataclasses.fields(ClientLimits)})
        limits = ClientLimits.from_config(config)
        self.assertEqual(dataclasses.asdict(limits), fed)
        self.assertEqual((limits.header_timeout, limits.max_headers), (3.0, 7))
        self.assertEqual(
            dataclasses.replace(ClientLimits.from_config(Config()), max_connections=0),
            dataclasses.replace(ClientLimits(), max_connections=0),
        )

    def test_proxy_settings(self) -> None:
        """
        Every field of L{ProxySettings} but C{retry_after} is fed by one
        setting; C{retry_after} is the health interval in whole seconds.
        """
        config = Config(retries=5, node_host=True, health=HealthConfig(interval=2.5))
        fed = values_for("proxy", config)
        fields = {f.name for f in dataclasses.fields(ProxySettings)}
        self.assertEqual(set(fed), fields - {"retry_after"})
        settings = ProxySettings.from_config(config)
        self.assertEqual((settings.retries, settings.node_host, settings.retry_after), (5, True, 3))
        self.assertEqual(
            dataclasses.replace(ProxySettings.from_config(Config()), retry_after=1),
            ProxySettings(),
        )


class NoReactorTests(unittest.TestCase):
    """
    Parsing the options never imports the global reactor: only makeService
    picks it.
    """

    async def test_no_reactor(self) -> None:
        """
        In a fresh process, importing L{rrlb.tap} and parsing options that
        check listeners, the admin endpoint and C{--workers} leaves
        C{twisted.internet.reactor} unimported.
        """
        script = (
            "import sys\n"
            "from rrlb.tap import Options\n"
            "Options().parseOptions(['--nodes', 'http://127.0.0.1:1', '--listen', 'tcp:0',"
            " '--admin', 'tcp:0', '--workers', '2', '--http2'])\n"
            "print('twisted.internet.reactor' in sys.modules)\n"
        )
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-c", script],
            env={**os.environ, "PYTHONPATH": ROOT},
            path=ROOT,
            reactor=reactor,
        )
        self.assertEqual((code, out.strip()), (0, b"False"), err)
