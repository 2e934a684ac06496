"""
Tests for rrlb's settings: the command-line options of L{rrlb.tap.Options},
the YAML file of L{rrlb.config}, how the two merge, and every validation
error, which must be one clear line naming the setting and the bad value.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage
from twisted.trial import unittest

from rrlb.config import all_pools, build_config, parse_node
from rrlb.settings import Config, HealthConfig, RouteConfig
from rrlb.tap import Options
from rrlb.values import ConfigError
from tests.support import parse_error


def parse(*args: str) -> Config:
    """
    The L{Config} that parsing C{args} as rrlb's options builds.
    """
    options = Options()
    options.parseOptions(list(args))
    config: Config = options.config
    return config


class ConfigErrorAssertions:
    """
    How a configuration error must look.
    """

    def assertClearError(self, message: str, *names: str) -> None:
        """
        C{message} is a single line and names every one of C{names} (the
        setting and the value).
        """
        tc: Any = self
        tc.assertNotIn("\n", message)
        tc.assertNotIn("Traceback", message)
        for name in names:
            tc.assertIn(name, message)


class OptionDefaultsTests(unittest.TestCase):
    """
    What the options give when only the nodes are set.
    """

    def test_defaults(self) -> None:
        """
        The issue's defaults: listen on tcp:8080, probe / every 5 seconds with
        a 2 second timeout, rise 2, fall 3, 30 second upstream timeout.
        """
        config = parse("--nodes", "http://127.0.0.1:9001")
        self.assertEqual(config.listen, ("tcp:8080",))
        self.assertEqual(config.health, HealthConfig("/", 5.0, 2.0, 2, 3))
        self.assertEqual(config.timeout, 30.0)

    def test_all_flags(self) -> None:
        """
        Every flag of the issue is parsed into its setting.
        """
        config = parse(
            "--listen",
            "tcp:9000:interface=127.0.0.1",
            "--nodes",
            "http://127.0.0.1:9001",
            "--health-path",
            "/healthz",
            "--health-interval",
            "0.5",
            "--health-timeout",
            "0.25",
            "--rise",
            "4",
            "--fall",
            "5",
            "--timeout",
            "7",
        )
        self.assertEqual(config.listen, ("tcp:9000:interface=127.0.0.1",))
        self.assertEqual(config.health, HealthConfig("/healthz", 0.5, 0.25, 4, 5))
        self.assertEqual(config.timeout, 7.0)

    def test_listen_repeatable(self) -> None:
        """
        C{--listen} may be given several times; each is kept, in order.
        """
        config = parse(
            "--nodes",
            "http://a",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--listen",
            "tcp6:0:interface=\\:\\:1",
        )
        self.assertEqual(config.listen, ("tcp:0:interface=127.0.0.1", "tcp6:0:interface=\\:\\:1"))

    def test_nodes(self) -> None:
        """
        C{--nodes} takes comma-separated http and https URLs: scheme, host,
        optional port (80/443 by default) and optional base path, kept in
        order.
        """
        config = parse(
            "--nodes", "http://10.0.0.1:8080,https://example.com,http://b.example/app/v1/"
        )
        self.assertEqual(
            [(n.scheme, n.host, n.port, n.base_path, n.weight) for n in config.nodes],
            [
                ("http", "10.0.0.1", 8080, b"", 1),
                ("https", "example.com", 443, b"", 1),
                ("http", "b.example", 80, b"/app/v1", 1),
            ],
        )

    def test_ipv6_node(self) -> None:
        """
        A node may be an IPv6 literal in brackets.
        """
        (node,) = parse("--nodes", "http://[::1]:8080").nodes
        self.assertEqual((node.host, node.port), ("::1", 8080))

    def test_demo_without_nodes(self) -> None:
        """
        C{--demo N} supplies the nodes, so no C{--nodes} is needed.
        """
        config = parse("--demo", "3")
        self.assertEqual(config.demo, 3)
        self.assertEqual(config.nodes, ())


class OptionErrorTests(unittest.TestCase, ConfigErrorAssertions):
    """
    Every bad command-line setting is a L{usage.UsageError} with one line
    naming the setting and the value.
    """

    def test_no_nodes(self) -> None:
        """
        No nodes at all is refused.
        """
        self.assertClearError(parse_error(), "nodes")

    def test_empty_nodes(self) -> None:
        """
        A C{--nodes} value without any URL is refused.
        """
        self.assertClearError(parse_error("--nodes", ""), "--nodes")
        self.assertClearError(parse_error("--nodes", ",,"), "--nodes")

    def test_node_not_http(self) -> None:
        """
        A node URL that is not http or https is refused, naming the URL.
        """
        for url in ("ftp://x", "x.example:80", "file:///etc/passwd", "gopher://h"):
            self.assertClearError(parse_error("--nodes", url), "--nodes", repr(url))

    def test_node_without_host(self) -> None:
        """
        A node URL without a host is refused, naming the URL.
        """
        for url in ("http://", "https:///path", "http://:8080"):
            self.assertClearError(parse_error("--nodes", url), "--nodes", repr(url))

    def test_node_bad_port(self) -> None:
        """
        A node URL with a port that is not a number from 1 to 65535 is refused.
        """
        for url in ("http://a:99999", "http://a:port", "http://a:0"):
            self.assertClearError(parse_error("--nodes", url), "--nodes", repr(url))

    def test_missing_ca_file(self) -> None:
        """
        A --ca-file that cannot be read stops start-up even when no node is
        https yet, naming the setting and the file.
        """
        message = parse_error("--nodes", "http://a", "--ca-file", "/nonexistent/ca.pem")
        self.assertClearError(message, "--ca-file", "/nonexistent/ca.pem")

    def test_bad_access_log_format(self) -> None:
        """
        A bad --access-log-format is named as the option, with the value.
        """
        message = parse_error("--nodes", "http://a", "--access-log-format", "xml")
        self.assertClearError(message, "--access-log-format", "'xml'")

    def test_node_unusable_characters(self) -> None:
        """
        A host or base path with characters that would break the request
        line or the Host header (a space, a brace, a non-ASCII path) is
        refused, naming the URL.
        """
        for url in ("http://a b:80", "http://a/b c", "http://a/{x}", "http://a/caf\u00e9"):
            self.assertClearError(parse_error("--nodes", url), "--nodes", repr(url))

    def test_node_host_names(self) -> None:
        """
        Host names with an underscore or in another script are accepted.
        """
        config = parse("--nodes", "http://web_1:8080,http://b\u00fccher.example/%C3%A9")
        self.assertEqual([n.host for n in config.nodes], ["web_1", "b\u00fccher.example"])
        self.assertEqual(config.nodes[1].base_path, b"/%C3%A9")

    def test_one_bad_node_among_good(self) -> None:
        """
        One bad URL in the list is named, not a good one.
        """
        message = parse_error("--nodes", "http://a,ftp://b,http://c")
        self.assertClearError(message, "--nodes", "'ftp://b'")
        self.assertNotIn("'http://a'", message)

    def test_duplicate_node(self) -> None:
        """
        The same node twice is refused (it would get two timers' worth of
        state under one name).
        """
        self.assertClearError(
            parse_error("--nodes", "http://a:1,http://a:1"), "--nodes", "'http://a:1'"
        )

    def test_non_positive_numbers(self) -> None:
        """
        Intervals, timeouts, rise and fall must be positive: zero, negative,
        non-numbers, NaN and infinity are refused, naming option and value.
        """
        cases = {
            "--health-interval": ["0", "-1", "soon", "nan", "inf", ""],
            "--health-timeout": ["0", "-0.5", "x"],
            "--timeout": ["0", "-30", "never", "inf"],
            "--rise": ["0", "-1", "1.5", "two", ""],
            "--fall": ["0", "-3", "2.0", "x"],
        }
        for option, values in cases.items():
            for value in values:
                message = parse_error("--nodes", "http://a", option, value)
                self.assertClearError(message, option, repr(value))

    def test_bad_health_path(self) -> None:
        """
        The health path must be an absolute, percent-encoded path.
        """
        for value in ("health", "/a b", "/caf\u00e9"):
            self.assertClearError(
                parse_error("--nodes", "http://a", "--health-path", value),
                "--health-path",
                repr(value),
            )

    def test_bad_demo(self) -> None:
        """
        C{--demo} needs a whole number of at least one.
        """
        for value in ("0", "-2", "three"):
            self.assertClearError(parse_error("--demo", value), "--demo", repr(value))

    def test_bad_listen(self) -> None:
        """
        A C{--listen} value that is not an endpoint description is refused at
        parse time, naming it.
        """
        for value in ("bogus:8080", "tcp:notaport", "", "8080x"):
            self.assertClearError(
                parse_error("--nodes", "http://a", "--listen", value), "--listen", repr(value)
            )

    def test_unknown_option(self) -> None:
        """
        An option rrlb does not have is refused.
        """
        self.assertClearError(parse_error("--nodes", "http://a", "--bogus", "1"), "bogus")

    def test_missing_config_file(self) -> None:
        """
        A C{--config} file that cannot be read is refused, naming it.
        """
        path = self.mktemp()
        self.assertClearError(parse_error("--config", path), "config", repr(path))

    def test_config_is_directory(self) -> None:
        """
        A directory given as C{--config} is refused, naming it.
        """
        path = self.mktemp()
        import os

        os.mkdir(path)
        self.assertClearError(parse_error("--config", path), "config", repr(path))


class YAMLTests(unittest.TestCase):
    """
    The YAML configuration file and how flags override it.
    """

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_full_file(self) -> None:
        """
        Every setting of the issue's YAML file is read: listen, nodes (URLs
        and C{{url, weight}} mappings), health and timeout.
        """
        path = self.write(
            "listen: [tcp:0:interface=127.0.0.1, 'tcp:0']\n"
            "nodes:\n"
            "  - http://10.0.0.1:8080\n"
            "  - url: http://10.0.0.2:8080/app\n"
            "    weight: 3\n"
            "  - {url: 'https://c.example', weight: 256}\n"
            "health: {path: /healthz, interval: 1.5, timeout: 0.5, rise: 4, fall: 6}\n"
            "timeout: 7\n"
        )
        config = parse("--config", path)
        self.assertEqual(config.listen, ("tcp:0:interface=127.0.0.1", "tcp:0"))
        self.assertEqual(
            [(n.url, n.weight, n.base_path) for n in config.nodes],
            [
                ("http://10.0.0.1:8080", 1, b""),
                ("http://10.0.0.2:8080/app", 3, b"/app"),
                ("https://c.example", 256, b""),
            ],
        )
        self.assertEqual(config.health, HealthConfig("/healthz", 1.5, 0.5, 4, 6))
        self.assertEqual(config.timeout, 7.0)

    def test_short_config_flag(self) -> None:
        """
        C{-c} is short for C{--config}.
        """
        path = self.write("nodes: [http://a]\n")
        self.assertEqual([n.url for n in parse("-c", path).nodes], ["http://a"])

    def test_partial_health_keeps_defaults(self) -> None:
        """
        Health settings missing from the file keep their defaults.
        """
        path = self.write("nodes: [http://a]\nhealth: {rise: 5}\n")
        self.assertEqual(parse("--config", path).health, HealthConfig("/", 5.0, 2.0, 5, 3))

    def test_empty_file_needs_nodes(self) -> None:
        """
        An empty file is an empty configuration: nodes must come from flags.
        """
        path = self.write("")
        self.assertIn("nodes", parse_error("--config", path))
        self.assertEqual(len(parse("--config", path, "--nodes", "http://a").nodes), 1)

    def test_flags_override_file(self) -> None:
        """
        Flags given on the command line win over the file, setting by
        setting; settings not given on the command line come from the file.
        """
        path = self.write(
            "listen: [tcp:1111]\n"
            "nodes: [http://a, http://b]\n"
            "health: {path: /hz, interval: 9, timeout: 3, rise: 4, fall: 6}\n"
            "timeout: 40\n"
        )
        config = parse(
            "--config",
            path,
            "--listen",
            "tcp:2222",
            "--nodes",
            "http://c",
            "--health-interval",
            "1",
            "--fall",
            "2",
            "--timeout",
            "5",
        )
        self.assertEqual(config.listen, ("tcp:2222",))
        self.assertEqual([n.url for n in config.nodes], ["http://c"])
        self.assertEqual(config.health, HealthConfig("/hz", 1.0, 3.0, 4, 2))
        self.assertEqual(config.timeout, 5.0)

    def test_flags_before_config(self) -> None:
        """
        Flags win whatever their position relative to C{--config}.
        """
        path = self.write("nodes: [http://a]\ntimeout: 40\nhealth: {path: /x}\n")
        config = parse("--timeout", "5", "--health-path", "/y", "--config", path)
        self.assertEqual((config.timeout, config.health.path), (5.0, "/y"))

    def test_equal_weights_default(self) -> None:
        """
        A mapping entry without a weight has weight 1.
        """
        path = self.write("nodes: [{url: 'http://a'}, http://b]\n")
        self.assertEqual([n.weight for n in parse("--config", path).nodes], [1, 1])


class YAMLErrorTests(unittest.TestCase, ConfigErrorAssertions):
    """
    Every bad YAML setting is a L{usage.UsageError} with one line naming the
    setting and the value.
    """

    def error(self, text: str | bytes, *args: str) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
        return parse_error("--config", path, *args)

    def test_unknown_top_key(self) -> None:
        """
        An unknown top-level key is refused, naming it.
        """
        self.assertClearError(self.error("nodes: [http://a]\nbackends: [http://b]\n"), "backends")

    def test_unknown_health_key(self) -> None:
        """
        An unknown key under C{health} is refused, naming it.
        """
        self.assertClearError(
            self.error("nodes: [http://a]\nhealth: {path: /, intervall: 3}\n"),
            "health.intervall",
        )

    def test_unknown_node_key(self) -> None:
        """
        An unknown key in a node mapping is refused, naming it.
        """
        self.assertClearError(self.error("nodes: [{url: 'http://a', wieght: 2}]\n"), "wieght")

    def test_invalid_yaml(self) -> None:
        """
        A file that is not valid YAML is refused with where the problem is,
        and no traceback.
        """
        message = self.error("nodes: [http://a\n  - x: :\n")
        self.assertClearError(message, "config", "invalid YAML", "line 2")

    def test_not_utf8(self) -> None:
        """
        A file that is not UTF-8 text is refused.
        """
        self.assertClearError(self.error(b"nodes: [\xff\xfe]\n"), "config")

    def test_not_a_mapping(self) -> None:
        """
        A file holding a list or a scalar is refused.
        """
        self.assertClearError(self.error("- http://a\n"), "config", "mapping")
        self.assertClearError(self.error("just text\n"), "config", "mapping")

    def test_bad_node_urls(self) -> None:
        """
        Node URLs in the file are checked like those on the command line,
        and the message says which entry is wrong.
        """
        for url in ("ftp://x", "http://", "x.example"):
            message = self.error(f"nodes: [http://ok, '{url}']\n")
            self.assertClearError(message, "nodes[1]", repr(url))

    def test_bad_nodes_value(self) -> None:
        """
        C{nodes} must be a list; an entry must be a URL or a mapping with one.
        """
        self.assertClearError(self.error("nodes: 5\n"), "nodes", "5")
        self.assertClearError(self.error("nodes: [17]\n"), "nodes[0]", "17")
        self.assertClearError(self.error("nodes: [{weight: 2}]\n"), "nodes[0]", "url")

    def test_no_nodes(self) -> None:
        """
        An empty node list (and no C{--nodes}) is refused.
        """
        self.assertClearError(self.error("nodes: []\n"), "nodes")

    def test_duplicate_nodes(self) -> None:
        """
        The same node URL twice is refused.
        """
        self.assertClearError(self.error("nodes: [http://a, http://a]\n"), "'http://a'")

    def test_bad_weights(self) -> None:
        """
        A weight must be a whole number from 1 to 256.
        """
        for weight in ("0", "257", "-1", "1.5", "heavy", "true", "null"):
            message = self.error(f"nodes: [{{url: 'http://a', weight: {weight}}}]\n")
            self.assertClearError(message, "nodes[0].weight", "1 to 256")

    def test_weight_values_named(self) -> None:
        """
        The bad weight's value is in the message.
        """
        self.assertClearError(
            self.error("nodes: [{url: 'http://a', weight: 300}]\n"), "nodes[0].weight", "300"
        )

    def test_bad_health_numbers(self) -> None:
        """
        Non-positive or non-numeric health intervals, timeouts, rise and fall
        are refused, naming the setting and value.
        """
        for key, value in [
            ("interval", "0"),
            ("interval", "-5"),
            ("interval", "soon"),
            ("timeout", "0"),
            ("timeout", ".nan"),
            ("rise", "0"),
            ("rise", "1.5"),
            ("fall", "-1"),
            ("fall", "true"),
        ]:
            message = self.error(f"nodes: [http://a]\nhealth: {{{key}: {value}}}\n")
            self.assertClearError(message, f"health.{key}")

    def test_health_value_named(self) -> None:
        """
        The bad health value is in the message.
        """
        self.assertClearError(
            self.error("nodes: [http://a]\nhealth: {fall: -4}\n"), "health.fall", "-4"
        )

    def test_health_not_mapping(self) -> None:
        """
        C{health} must be a mapping.
        """
        self.assertClearError(self.error("nodes: [http://a]\nhealth: 5\n"), "health", "5")

    def test_bad_health_path(self) -> None:
        """
        C{health.path} must be an absolute path.
        """
        self.assertClearError(
            self.error("nodes: [http://a]\nhealth: {path: healthz}\n"), "health.path", "'healthz'"
        )

    def test_bad_timeout(self) -> None:
        """
        A non-positive upstream timeout is refused.
        """
        for value in ("0", "-1", "later", ".inf"):
            message = self.error(f"nodes: [http://a]\ntimeout: {value}\n")
            self.assertClearError(message, "timeout")

    def test_bad_listen(self) -> None:
        """
        An empty or bad listen list is refused, naming the value.
        """
        self.assertClearError(self.error("nodes: [http://a]\nlisten: []\n"), "listen")
        self.assertClearError(
            self.error("nodes: [http://a]\nlisten: [bogus:1]\n"), "listen", "'bogus:1'"
        )
        self.assertClearError(self.error("nodes: [http://a]\nlisten: [5]\n"), "listen", "5")

    def test_bad_file_fixed_by_flag(self) -> None:
        """
        A flag does not rescue a file with a bad value: the file is checked
        as a whole.
        """
        message = self.error("nodes: [http://a]\ntimeout: 0\n", "--timeout", "5")
        self.assertClearError(message, "timeout")


class BuildConfigTests(unittest.TestCase):
    """
    L{build_config} and L{parse_node}, used without the options.
    """

    def test_config_error_is_value_error(self) -> None:
        """
        L{ConfigError} is a L{ValueError}, so usage's coercion reports it.
        """
        self.assertTrue(issubclass(ConfigError, ValueError))

    def test_require_nodes(self) -> None:
        """
        Without nodes L{build_config} refuses, unless told nodes will come
        later.
        """
        self.assertRaises(ConfigError, build_config)
        self.assertEqual(build_config(require_nodes=False).nodes, ())

    def test_hostport(self) -> None:
        """
        A node's own C{Host} value leaves out the scheme's default port.
        """
        self.assertEqual(parse_node("http://a").hostport, b"a")
        self.assertEqual(parse_node("http://a:8080").hostport, b"a:8080")
        self.assertEqual(parse_node("https://a:443").hostport, b"a")
        self.assertEqual(parse_node("http://[::1]:81").hostport, b"[::1]:81")

    def test_usage_error_type(self) -> None:
        """
        Bad options raise exactly L{usage.UsageError}, which twistd reports
        as one line without a traceback.
        """
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--nodes", "ftp://x"])


class OverloadSettingsTests(unittest.TestCase, ConfigErrorAssertions):
    """
    Issue 11's settings: C{max_connections} per node, C{--max-conns-per-node},
    C{--queue-timeout}, C{--retries} and C{--retry-budget}, as flags and as
    YAML keys, and their errors.
    """

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_defaults(self) -> None:
        """
        No limit, a 5 second queue timeout, 2 retries, a 20% retry budget.
        """
        config = parse("--nodes", "http://a")
        self.assertEqual(config.max_conns_per_node, 0)
        self.assertEqual(config.queue_timeout, 5.0)
        self.assertEqual(config.retries, 2)
        self.assertEqual(config.retry_budget, 20.0)
        self.assertIsNone(config.nodes[0].max_connections)

    def test_flags(self) -> None:
        """
        Every flag is parsed into its setting.
        """
        config = parse(
            "--nodes",
            "http://a",
            "--max-conns-per-node",
            "10",
            "--queue-timeout",
            "0.5",
            "--retries",
            "0",
            "--retry-budget",
            "12.5",
        )
        self.assertEqual(
            (config.max_conns_per_node, config.queue_timeout, config.retries, config.retry_budget),
            (10, 0.5, 0, 12.5),
        )

    def test_yaml(self) -> None:
        """
        The YAML keys have the flags' names with underscores, and a node
        mapping may set its own C{max_connections}; flags win over the file.
        """
        path = self.write(
            "nodes:\n"
            "  - http://a\n"
            "  - {url: 'http://b', max_connections: 4}\n"
            "  - {url: 'http://c', max_connections: 0}\n"
            "max_conns_per_node: 8\n"
            "queue_timeout: 2\n"
            "retries: 1\n"
            "retry_budget: 50\n"
        )
        config = parse("--config", path)
        self.assertEqual([n.max_connections for n in config.nodes], [None, 4, 0])
        self.assertEqual(
            (config.max_conns_per_node, config.queue_timeout, config.retries, config.retry_budget),
            (8, 2.0, 1, 50.0),
        )
        config = parse("--config", path, "--retries", "3", "--max-conns-per-node", "0")
        self.assertEqual((config.retries, config.max_conns_per_node), (3, 0))

    def test_bad_flags(self) -> None:
        """
        Bad values are refused with one line naming the option and value.
        """
        cases = {
            "--max-conns-per-node": ["-1", "1.5", "many", ""],
            "--queue-timeout": ["-1", "soon", "nan", "inf"],
            "--retries": ["-1", "2.5", "x"],
            "--retry-budget": ["-1", "101", "lots", "nan"],
        }
        for option, values in cases.items():
            for value in values:
                message = parse_error("--nodes", "http://a", option, value)
                self.assertClearError(message, option, repr(value))

    def test_bad_yaml(self) -> None:
        """
        Bad YAML values are refused with one line naming the key and value.
        """
        node_limit = "nodes[0].max_connections"
        for text, names in [
            ("max_conns_per_node: -2\n", ("max_conns_per_node", "-2")),
            ("queue_timeout: later\n", ("queue_timeout", "'later'")),
            ("queue_timeout: -0.5\n", ("queue_timeout", "-0.5")),
            ("retries: true\n", ("retries", "True")),
            ("retry_budget: 150\n", ("retry_budget", "150")),
            ("nodes: [{url: 'http://b', max_connections: -1}]\n", (node_limit, "-1")),
            ("nodes: [{url: 'http://b', max_connections: x}]\n", (node_limit, "'x'")),
        ]:
            if not text.startswith("nodes"):
                text = "nodes: [http://a]\n" + text
            path = self.write(text)
            self.assertClearError(parse_error("--config", path), *names)


ISSUE_POOLS = """\
pools:
  api:
    nodes: [http://10.0.0.1:8080, {url: http://10.0.0.2:8080, weight: 2}]
    balance: leastconn
    health: {path: /healthz, interval: 2}
  static:
    nodes: [http://10.0.1.1:80]
routes:
  - {host: api.example.com, pool: api}
  - {path_prefix: /static/, pool: static, strip_prefix: true}
  - {header: {X-Canary: "1"}, pool: api}
  - {pool: static}            # no match fields: the default
"""


class PoolsAndRoutesTests(unittest.TestCase, ConfigErrorAssertions):
    """
    pools:, routes:, balance:, hash_key:, sticky:, slow_start:, --balance
    and --hash-key.
    """

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def error(self, text: str, *args: str) -> str:
        return parse_error("--config", self.write(text), *args)

    def test_issue_example(self) -> None:
        """
        The issue's file: two pools with their own settings, inheriting the
        top-level ones, and four routes in order.
        """
        config = parse("--config", self.write("timeout: 7\nhealth: {rise: 5}\n" + ISSUE_POOLS))
        api, static = config.pools
        self.assertEqual(config.nodes, ())
        self.assertEqual(api.name, "api")
        self.assertEqual(
            [(n.url, n.weight) for n in api.nodes],
            [("http://10.0.0.1:8080", 1), ("http://10.0.0.2:8080", 2)],
        )
        self.assertEqual(api.balance, "leastconn")
        self.assertEqual(api.health, HealthConfig("/healthz", 2.0, 2.0, 5, 3))
        self.assertEqual(api.timeout, 7.0)
        self.assertEqual(static.balance, "roundrobin")
        self.assertEqual(static.health, HealthConfig(rise=5))
        self.assertEqual([r.pool for r in config.routes], ["api", "static", "api", "static"])
        self.assertEqual(config.routes[0].host, "api.example.com")
        self.assertEqual(config.routes[1].path_prefix, "/static/")
        self.assertTrue(config.routes[1].strip_prefix)
        self.assertEqual(config.routes[2].header, (("X-Canary", "1"),))
        self.assertEqual(config.routes[3], RouteConfig(pool="static"))

    def test_pool_settings(self) -> None:
        """
        Every per-pool key is read.
        """
        config = parse(
            "--config",
            self.write(
                "pools:\n"
                "  p:\n"
                "    nodes: [http://a]\n"
                "    balance: hash\n"
                "    hash_key: header:X-User\n"
                "    sticky: {cookie: SRV}\n"
                "    slow_start: 30\n"
                "    timeout: 3\n"
                "    connect_timeout: 1\n"
                "    node_host: true\n"
                "    max_idle_per_node: 4\n"
            ),
        )
        (pool,) = config.pools
        self.assertEqual(
            (
                pool.balance,
                pool.hash_key,
                pool.sticky,
                pool.slow_start,
                pool.timeout,
                pool.connect_timeout,
                pool.node_host,
                pool.max_idle_per_node,
            ),
            ("hash", "header:X-User", "SRV", 30.0, 3.0, 1.0, True, 4),
        )

    def test_default_pool_flags(self) -> None:
        """
        --balance and --hash-key set the --nodes pool's policy; YAML has
        the same keys at the top level.
        """
        config = parse("--nodes", "http://a", "--balance", "hash", "--hash-key", "cookie:sid")
        self.assertEqual((config.balance, config.hash_key), ("hash", "cookie:sid"))
        (pool,) = all_pools(config)
        self.assertEqual(
            (pool.name, pool.balance, pool.hash_key), ("default", "hash", "cookie:sid")
        )
        config = parse(
            "--config",
            self.write("nodes: [http://a]\nbalance: p2c\nsticky: {cookie: lb}\nslow_start: 5\n"),
        )
        (pool,) = all_pools(config)
        self.assertEqual((pool.balance, pool.sticky, pool.slow_start), ("p2c", "lb", 5.0))

    def test_nodes_and_pools(self) -> None:
        """
        Top-level nodes are the pool named default, which routes may name.
        """
        config = parse(
            "--config",
            self.write(
                "nodes: [http://a]\npools: {b: {nodes: [http://b]}}\n"
                "routes: [{host: b, pool: b}, {pool: default}]\n"
            ),
        )
        self.assertEqual([p.name for p in all_pools(config)], ["default", "b"])

    def test_same_url_in_two_pools(self) -> None:
        """
        One URL may be in two pools (two nodes, each checked by its pool).
        """
        config = parse(
            "--config",
            self.write(
                "pools: {a: {nodes: [http://x]}, b: {nodes: [http://x]}}\nroutes: [{pool: a}]\n"
            ),
        )
        self.assertEqual([p.nodes[0].url for p in config.pools], ["http://x", "http://x"])

    def test_tls_file_errors_name_the_pool(self) -> None:
        """
        A TLS file of a node in a pool that cannot be read is refused with
        one line naming the pool.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                "pools:\n  api:\n    nodes: [http://127.0.0.1:9,"
                " {url: 'https://127.0.0.1:10', tls: {ca_file: /nonexistent/ca.pem}}]\n"
            )
        message = parse_error("--config", path)
        self.assertIn("pools.api: ", message)
        self.assertIn("tls.ca_file", message)
        self.assertIn("/nonexistent/ca.pem", message)

    def test_errors_name_the_pool_or_route(self) -> None:
        """
        Every mistake is one line naming the pool or route and the value.
        """
        cases = [
            ("pools: {api: {nodes: [http://a, ftp://b]}}\n", "pools.api.nodes[1]:", "ftp://b"),
            (
                "pools: {api: {nodes: [http://a, {url: http://b, weight: 0}]}}\n",
                "pools.api.nodes[1].weight",
                "0",
            ),
            ("pools: {api: {nodes: []}}\n", "pools.api.nodes"),
            ("pools: {api: {balance: random, nodes: [http://a]}}\n", "pools.api.balance", "random"),
            ("pools: {api: {nodes: [http://a], colour: red}}\n", "pools.api.colour"),
            (
                "pools: {api: {nodes: [http://a], health: {interval: -1}}}\n",
                "pools.api.health.interval",
                "-1",
            ),
            ("pools: {api: {nodes: [http://a], hash_key: uri}}\n", "pools.api.hash_key"),
            (
                "pools: {api: {nodes: [http://a], balance: hash, hash_key: body}}\n",
                "pools.api.hash_key",
                "body",
            ),
            ("pools: {api: {nodes: [http://a], sticky: {}}}\n", "pools.api.sticky"),
            (
                "pools: {api: {nodes: [http://a], sticky: {cookie: 'a b'}}}\n",
                "pools.api.sticky.cookie",
                "a b",
            ),
            ("pools: {'a/b': {nodes: [http://a]}}\n", "pools", "a/b"),
            ("pools: {'7': {nodes: [http://a]}}\n", "pools", "'7'"),
            ("pools: {none: {nodes: [http://a]}}\n", "pools", "'none'", "reserved"),
            ("pools: {api: {nodes: [http://a]}}\nroutes: [{pool: web}]\n", "routes[0].pool", "web"),
            (
                "pools: {api: {nodes: [http://a]}}\nroutes: [{pool: api, host: 'a/b'}]\n",
                "routes[0].host",
                "a/b",
            ),
            (
                "pools: {api: {nodes: [http://a]}}\nroutes: [{pool: api, path_prefix: static}]\n",
                "routes[0].path_prefix",
                "static",
            ),
            (
                "pools: {api: {nodes: [http://a]}}\nroutes: [{pool: api, strip_prefix: true}]\n",
                "routes[0].strip_prefix",
            ),
            (
                "pools: {api: {nodes: [http://a]}}\nroutes: [{pool: api, port: 1}]\n",
                "routes[0].port",
            ),
            ("pools: {api: {nodes: [http://a]}}\nroutes: [{host: a}]\n", "routes[0]", "pool"),
            ("pools: {a: {nodes: [http://a]}, b: {nodes: [http://b]}}\n", "routes", "a, b"),
            ("nodes: [http://a]\npools: {default: {nodes: [http://b]}}\n", "pools.default"),
            ("nodes: [http://a]\nhash_key: uri\n", "hash_key"),
            (
                "pools: {a: {nodes: [http://x]}, b: {nodes: [{url: http://x, send_proxy: v2}]}}\n"
                "routes: [{pool: a}]\n",
                "pools.b.nodes[0]",
                "send_proxy",
            ),
            ("pools: {a: {nodes: [http://a]}}\nbalance: p2c\n", "balance", "each pool"),
            (
                "pools: {a: {nodes: [https://x]},"
                " b: {nodes: [{url: https://x, tls: {verify: false}}]}}\n"
                "routes: [{pool: a}]\n",
                "pools.b.nodes[0]",
                "https://x",
            ),
        ]
        for text, *names in cases:
            self.assertClearError(self.error(text), *names)

    def test_bad_flags(self) -> None:
        """
        --balance and --hash-key values are checked.
        """
        self.assertIn("--balance", parse_error("--nodes", "http://a", "--balance", "random"))
        self.assertIn("--hash-key", parse_error("--nodes", "http://a", "--hash-key", "x"))
