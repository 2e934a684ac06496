"""
Tests for nodes from DNS (L{rrlb.discovery}): the C{dns:}/C{srv:} node
entries and C{--resolver}/C{resolvers}/C{dns_refresh} settings, lookups
against a real twisted.names authoritative server on loopback whose records
change during the test, and rrlb balancing over the nodes it finds.

Every address in the test records is a 127.x loopback address.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest
from twisted.web import server as web_server

from rrlb.config import ConfigError, build_config, parse_node_entries
from rrlb.discovery import TTL_FLOOR, DnsDiscovery, make_resolver
from tests.support import (
    LOOPBACK,
    SRV_NAME,
    Backend,
    DnsServer,
    LogCapture,
    a,
    balancer_options,
    http_request,
    parse_error,
    reactor,
    srv,
    start_backend,
    start_balancer,
    start_server,
    track_connections,
    wait_until,
)

NAME = "api.rrlb.test"
# Lookups in these tests give up quickly when the server is gone.
FAST_TIMEOUT = (0.3,)


def entries(*raw: dict[str, Any]) -> Any:
    nodes, dns_nodes = parse_node_entries(list(raw))
    assert not nodes
    return dns_nodes


class Changes:
    """
    The C{on_change} callback of a L{DnsDiscovery}: counts its calls.
    """

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def start_discovery(
    testcase: unittest.TestCase,
    dns_server: DnsServer,
    *raw: dict[str, Any],
    refresh: float = 30.0,
) -> tuple[DnsDiscovery, task.Clock, Changes]:
    """
    A L{DnsDiscovery} asking C{dns_server} over real UDP, its timers on a
    L{task.Clock}; stopped at cleanup.
    """
    clock = task.Clock()
    changes = Changes()
    discovery = DnsDiscovery(
        clock,
        make_resolver(reactor, [(LOOPBACK, dns_server.number)]),
        changes,
        entries(*raw),
        refresh,
        lookup_timeout=FAST_TIMEOUT,
    )
    discovery.startService()
    testcase.addCleanup(discovery.stopService)
    clock.advance(0)
    return discovery, clock, changes


def urls(discovery: DnsDiscovery) -> list[str]:
    return [n.url for n in discovery.nodes]


async def settled(discovery: DnsDiscovery) -> None:
    """
    Wait until no lookup is in flight.
    """
    await wait_until(
        lambda: all(n.lookup is None for n in discovery._names.values()), what="lookups"
    )


class DnsEntryConfigTests(unittest.TestCase):
    """
    The C{dns:}/C{srv:} node entries, C{resolvers} and C{dns_refresh} in YAML
    and on the command line.
    """

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_yaml_entries(self) -> None:
        """
        A YAML nodes list may mix URLs and DNS entries; the entry's scheme,
        weight, tls and send_proxy are kept for every node found.
        """
        config = build_config(
            self.write(
                "nodes:\n"
                "  - http://127.0.0.1:8000\n"
                "  - {dns: API.internal., port: 8080, weight: 3, send_proxy: v1}\n"
                "  - {srv: _http._tcp.api.internal, scheme: https,"
                " tls: {verify: false}}\n"
                "dns_refresh: 5\n"
                "resolvers: ['127.0.0.1:5353', '127.0.0.2']\n"
            )
        )
        self.assertEqual([n.url for n in config.nodes], ["http://127.0.0.1:8000"])
        first, second = config.dns_nodes
        self.assertEqual(
            (first.name, first.srv, first.port, first.weight), ("api.internal", False, 8080, 3)
        )
        self.assertEqual(first.template.send_proxy, "v1")
        self.assertEqual(
            (second.name, second.srv, second.weight), ("_http._tcp.api.internal", True, None)
        )
        self.assertEqual(config.dns_refresh, 5.0)
        self.assertEqual(config.resolvers, (("127.0.0.1", 5353), ("127.0.0.2", 53)))
        node = first.node("127.0.0.9", 8080)
        self.assertEqual(
            (node.url, node.weight, node.send_proxy), ("http://127.0.0.9:8080", 3, "v1")
        )
        https = second.node("127.0.0.9", 8443, 7, "b.api.internal.")
        self.assertEqual(https.url, "https://127.0.0.9:8443")
        self.assertEqual(https.weight, 7)
        # Certificates name the DNS name, not the address.
        self.assertEqual(https.tls.server_name, "b.api.internal")
        self.assertFalse(https.tls.verify)

    def test_dns_entries_alone(self) -> None:
        """
        A configuration whose only nodes are DNS entries is complete.
        """
        config = build_config(self.write("nodes:\n  - {srv: _http._tcp.x.internal}\n"))
        self.assertEqual(config.nodes, ())
        self.assertEqual(len(config.dns_nodes), 1)

    def test_bad_entries_name_the_setting(self) -> None:
        """
        Every mistake in an entry names it by its place in the list.
        """
        cases = [
            ({"dns": "api.internal"}, "nodes[1].port: a dns entry needs the nodes' port"),
            ({"dns": "api.internal", "port": 0}, "nodes[1].port must be a whole number"),
            ({"dns": "api.internal", "port": "x"}, "nodes[1].port must be a whole number"),
            ({"srv": "_x._tcp.a", "port": 80}, "nodes[1].port: an srv entry takes"),
            ({"dns": "a b", "port": 80}, "nodes[1].dns must be a DNS name"),
            ({"srv": 3}, "nodes[1].srv must be a DNS name"),
            ({"dns": "a", "srv": "b", "port": 1}, "nodes[1] may name dns or srv, not both"),
            ({"dns": "a", "port": 1, "url": "http://x"}, "unknown setting nodes[1].url"),
            ({"dns": "a", "port": 1, "scheme": "ftp"}, "nodes[1].scheme must be http or https"),
            ({"dns": "a", "port": 1, "weight": 0}, "nodes[1].weight must be a whole number"),
            ({"dns": "a", "port": 1, "send_proxy": "v3"}, "nodes[1].send_proxy must be v1 or v2"),
            ({"dns": "a", "port": 1, "tls": {"x": 1}}, "unknown setting nodes[1].tls.x"),
        ]
        for entry, message in cases:
            with self.assertRaises(ConfigError) as caught:
                parse_node_entries(["http://127.0.0.1:1", entry])
            self.assertIn(message, str(caught.exception), entry)

    def test_entry_listed_twice(self) -> None:
        """
        The same DNS entry twice is refused like a node listed twice.
        """
        with self.assertRaises(ConfigError) as caught:
            parse_node_entries([{"dns": "a.b", "port": 1}, {"dns": "A.b.", "port": 1}])
        self.assertIn("dns a.b is listed twice", str(caught.exception))

    def test_bad_yaml_settings(self) -> None:
        """
        A bad C{dns_refresh} or C{resolvers} value names the setting.
        """
        for text, message in [
            ("dns_refresh: 0\n", "dns_refresh must be a positive number"),
            ("resolvers: [dns.example]\n", "resolvers[0] must be HOST[:PORT]"),
            ("resolvers: ['127.0.0.1:99999']\n", "resolvers[0]: bad port"),
            ("resolvers: {a: 1}\n", "resolvers must be a list"),
        ]:
            path = self.write("nodes: [http://127.0.0.1:1]\n" + text)
            with self.assertRaises(ConfigError) as caught:
                build_config(path)
            self.assertIn(message, str(caught.exception))

    def test_command_line(self) -> None:
        """
        C{--resolver} is repeatable and wins over YAML C{resolvers};
        C{--dns-refresh} over C{dns_refresh}; C{--nodes} replaces the YAML
        nodes list, DNS entries included.
        """
        path = self.write(
            "nodes: [{dns: api.internal, port: 80}]\nresolvers: [127.0.0.9]\ndns_refresh: 9\n"
        )
        options = balancer_options(
            "--config",
            path,
            "--resolver",
            "127.0.0.1:5353",
            "--resolver",
            "[::1]:53",
            "--dns-refresh",
            "2.5",
        )
        self.assertEqual(options.config.resolvers, (("127.0.0.1", 5353), ("::1", 53)))
        self.assertEqual(options.config.dns_refresh, 2.5)
        self.assertEqual(len(options.config.dns_nodes), 1)
        options = balancer_options("--config", path, "--nodes", "http://127.0.0.1:1")
        self.assertEqual(options.config.dns_nodes, ())
        self.assertEqual(options.config.resolvers, (("127.0.0.9", 53),))
        self.assertIn("--resolver must be HOST[:PORT]", parse_error("--resolver", "ns.example"))
        self.assertIn("--dns-refresh must be a positive", parse_error("--dns-refresh", "-1"))


class DiscoveryTests(unittest.TestCase):
    """
    L{DnsDiscovery} against a real DNS server on loopback, its timers on a
    clock the test moves.
    """

    async def test_a_records_join_and_leave(self) -> None:
        """
        A C{dns:} entry is a node per A record at the entry's port; after the
        TTL a new lookup brings the records that appeared and drops those
        that went.
        """
        dns_server = start_server(self)
        dns_server.authority.set(NAME, a("127.0.0.3", 5), a("127.0.0.2", 5))
        discovery, clock, changes = start_discovery(self, dns_server, {"dns": NAME, "port": 8080})
        await wait_until(lambda: changes.calls == 1, what="first lookup")
        self.assertEqual(urls(discovery), ["http://127.0.0.2:8080", "http://127.0.0.3:8080"])

        dns_server.authority.set(NAME, a("127.0.0.3", 5), a("127.0.0.4", 5))
        clock.advance(5)
        await wait_until(lambda: changes.calls == 2, what="second lookup")
        self.assertEqual(urls(discovery), ["http://127.0.0.3:8080", "http://127.0.0.4:8080"])

    async def test_ttl_honoured(self) -> None:
        """
        The next lookup comes when the lowest TTL runs out, not before; an
        unchanged answer changes nothing.
        """
        dns_server = start_server(self)
        dns_server.authority.set(NAME, a("127.0.0.2", 7), a("127.0.0.3", 4))
        discovery, clock, changes = start_discovery(self, dns_server, {"dns": NAME, "port": 80})
        await wait_until(lambda: changes.calls == 1, what="first lookup")
        self.assertEqual(dns_server.authority.count(NAME), 1)
        clock.advance(3.9)
        await settled(discovery)
        self.assertEqual(dns_server.authority.count(NAME), 1)
        clock.advance(0.1)
        await wait_until(lambda: dns_server.authority.count(NAME) == 2, what="lookup at the TTL")
        await settled(discovery)
        self.assertEqual(changes.calls, 1)

    async def test_ttl_floor_and_cap(self) -> None:
        """
        A TTL of 0 is looked up again after L{TTL_FLOOR}, a long TTL after
        C{dns_refresh}.
        """
        dns_server = start_server(self)
        dns_server.authority.set(NAME, a("127.0.0.2", 0))
        dns_server.authority.set("long.rrlb.test", a("127.0.0.3", 86400))
        discovery, clock, changes = start_discovery(
            self,
            dns_server,
            {"dns": NAME, "port": 80},
            {"dns": "long.rrlb.test", "port": 80},
            refresh=10,
        )
        await wait_until(lambda: len(discovery.nodes) == 2, what="first lookups")
        await settled(discovery)
        for _ in range(3):
            clock.advance(TTL_FLOOR)
            await settled(discovery)
        self.assertEqual(dns_server.authority.count(NAME), 4)
        self.assertEqual(dns_server.authority.count("long.rrlb.test"), 1)
        clock.advance(10 - 3 * TTL_FLOOR)
        await wait_until(lambda: dns_server.authority.count("long.rrlb.test") == 2, what="refresh")

    async def test_srv_targets(self) -> None:
        """
        An C{srv:} entry is a node per target, at the target's port, with
        the SRV weight (0 counts as 1); a target's addresses come from the
        answer's additional section or, without it, from a lookup of its own.
        """
        dns_server = start_server(self)
        auth = dns_server.authority
        auth.set(SRV_NAME, srv("b.rrlb.test", 9002, 5), srv("a.rrlb.test", 9001, 0))
        auth.set("a.rrlb.test", a("127.0.0.2"))
        auth.set("b.rrlb.test", a("127.0.0.3"), a("127.0.0.4"))
        discovery, clock, changes = start_discovery(self, dns_server, {"srv": SRV_NAME})
        await wait_until(lambda: changes.calls == 1, what="first lookup")
        found = [(n.url, n.weight) for n in discovery.nodes]
        self.assertEqual(
            found,
            [
                ("http://127.0.0.2:9001", 1),
                ("http://127.0.0.3:9002", 5),
                ("http://127.0.0.4:9002", 5),
            ],
        )
        self.assertEqual(auth.count("a.rrlb.test"), 0)

        auth.additional = False
        auth.set(SRV_NAME, srv("a.rrlb.test", 9001, 2))
        clock.advance(30)
        await wait_until(lambda: changes.calls == 2, what="second lookup")
        self.assertEqual(
            [(n.url, n.weight) for n in discovery.nodes], [("http://127.0.0.2:9001", 2)]
        )
        self.assertEqual(auth.count("a.rrlb.test"), 1)

    async def test_srv_entry_weight_wins(self) -> None:
        """
        A C{weight} given on an C{srv:} entry applies to every target.
        """
        dns_server = start_server(self)
        dns_server.authority.set(SRV_NAME, srv("a.rrlb.test", 9001, 50))
        dns_server.authority.set("a.rrlb.test", a("127.0.0.2"))
        discovery, clock, changes = start_discovery(
            self, dns_server, {"srv": SRV_NAME, "weight": 2}
        )
        await wait_until(lambda: changes.calls == 1, what="first lookup")
        self.assertEqual([n.weight for n in discovery.nodes], [2])

    async def test_server_gone_keeps_last_set(self) -> None:
        """
        When the name server stops answering, the nodes found last stay, the
        failure is logged once however often the lookup is retried, and the
        next answer is used once the server is back.
        """
        logs = LogCapture.install(self)
        dns_server = start_server(self)
        dns_server.authority.set(NAME, a("127.0.0.2", 2))
        discovery, clock, changes = start_discovery(self, dns_server, {"dns": NAME, "port": 80})
        await wait_until(lambda: changes.calls == 1, what="first lookup")
        number = dns_server.number
        await dns_server.stop()
        for _ in range(3):
            clock.advance(5)
            await wait_until(lambda: discovery._names[(NAME, False, 80)].error is not None)
            await settled(discovery)
        self.assertEqual(urls(discovery), ["http://127.0.0.2:80"])
        failed = [m for m in logs.messages() if "DNS lookup of dns api.rrlb.test failed" in m]
        self.assertEqual(len(failed), 1, failed)
        self.assertRegex(failed[0], "timed out|refused")
        self.assertIn("keeping its 1 nodes", failed[0])

        dns_server.start(number)
        dns_server.authority.set(NAME, a("127.0.0.5", 2))
        clock.advance(5)
        await wait_until(lambda: changes.calls == 2, what="lookup after the server came back")
        self.assertEqual(urls(discovery), ["http://127.0.0.5:80"])
        self.assertEqual(len([m for m in logs.messages() if "answered again" in m]), 1)

    async def test_no_records_empties_the_set(self) -> None:
        """
        An answer with no records (the name is gone, NXDOMAIN) is the DNS
        saying there are no nodes: they leave.
        """
        dns_server = start_server(self)
        dns_server.authority.set(NAME, a("127.0.0.2", 2))
        discovery, clock, changes = start_discovery(self, dns_server, {"dns": NAME, "port": 80})
        await wait_until(lambda: changes.calls == 1, what="first lookup")
        del dns_server.authority.records[NAME.encode("ascii")]
        clock.advance(2)
        await wait_until(lambda: changes.calls == 2, what="second lookup")
        self.assertEqual(discovery.nodes, ())

    async def test_reconfigure(self) -> None:
        """
        A reload keeps what an entry that stays found, under its new
        settings, and drops an entry that went.
        """
        dns_server = start_server(self)
        dns_server.authority.set(NAME, a("127.0.0.2"))
        discovery, clock, changes = start_discovery(self, dns_server, {"dns": NAME, "port": 80})
        await wait_until(lambda: changes.calls == 1, what="first lookup")
        changed = discovery.configure(entries({"dns": NAME, "port": 80, "weight": 4}), 30.0)
        self.assertTrue(changed)
        self.assertEqual([(n.url, n.weight) for n in discovery.nodes], [("http://127.0.0.2:80", 4)])
        self.assertEqual(dns_server.authority.count(NAME), 1)
        self.assertTrue(discovery.configure((), 30.0))
        self.assertEqual(discovery.nodes, ())
        self.assertEqual(clock.getDelayedCalls(), [])


class AddressedBackend(Backend):
    """
    A L{Backend} on a given loopback address and port.
    """

    def __init__(self, name: str, interface: str, number: int) -> None:
        super().__init__(name)
        self.interface = interface
        self.number = number

    async def start(self) -> Backend:
        site = web_server.Site(self)
        site.noisy = False
        self._tracker = track_connections(site)
        self.port = reactor.listenTCP(self.number, site, interface=self.interface)
        self._port_number = self.port.getHost().port
        return self


class DnsBalancingTests(unittest.TestCase):
    """
    rrlb itself, configured with DNS entries: requests reach the nodes the
    DNS names, and follow the records as they change.
    """

    async def start(self, dns_server: DnsServer, entry: str) -> Any:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"nodes:\n  - {entry}\nresolvers: ['{dns_server.address}']\n")
        return await start_balancer(self, (), "--config", path, "--health-interval", "30")

    async def test_srv_nodes_join_and_leave(self) -> None:
        """
        Nodes named by SRV records take requests; when the records change a
        node joins the rotation (and the health checks), one leaves and
        finishes its request in flight, and the one that stays keeps its
        state.
        """
        a_, b_, c_ = [await start_backend(self, name) for name in "abc"]
        dns_server = start_server(self)
        auth = dns_server.authority
        auth.set(
            SRV_NAME,
            srv("a.rrlb.test", a_.port_number, ttl=1),
            srv("b.rrlb.test", b_.port_number, ttl=1),
        )
        auth.set("a.rrlb.test", a("127.0.0.1", 1))
        auth.set("b.rrlb.test", a("127.0.0.1", 1))
        auth.set("c.rrlb.test", a("127.0.0.1", 1))
        balancer = await self.start(dns_server, f"{{srv: {SRV_NAME}}}")
        pool = balancer.service.pool
        await wait_until(lambda: len(pool.nodes) == 2, what="nodes from DNS")
        bodies = {(await http_request(self, "GET", balancer.url + "/")).body for _ in range(4)}
        self.assertEqual(bodies, {b"a", b"b"})

        node_b = pool.get(b_.url)
        assert node_b is not None
        pool.set_drained(node_b, True)  # state an operator set, to be kept
        a_.delay = 1.5
        slow = defer.ensureDeferred(http_request(self, "GET", balancer.url + "/slow"))
        await wait_until(lambda: len(a_.requests) == 3, what="the slow request at a")
        auth.set(
            SRV_NAME,
            srv("b.rrlb.test", b_.port_number, ttl=1),
            srv("c.rrlb.test", c_.port_number, ttl=1),
        )
        await wait_until(lambda: {n.url for n in pool.nodes} == {b_.url, c_.url}, what="new set")
        # The node that came is health-checked at once (the interval is 30 s).
        await wait_until(lambda: c_.probes == 1, what="a probe of the new node")
        self.assertEqual(set(balancer.service.checker._loops), {b_.url, c_.url})
        self.assertIs(pool.get(b_.url), node_b)
        self.assertTrue(node_b.drained)
        reply = await slow
        self.assertEqual((reply.code, reply.body), (200, b"a"))
        pool.set_drained(node_b, False)
        bodies = {(await http_request(self, "GET", balancer.url + "/")).body for _ in range(4)}
        self.assertEqual(bodies, {b"b", b"c"})

    async def test_a_records_across_loopback_addresses(self) -> None:
        """
        A C{dns:} entry balances over one node per A record, all on the
        entry's port; when the DNS server goes away they stay.
        """
        first = await start_backend(self, "one")
        number = first.port_number
        second = AddressedBackend("two", "127.0.0.2", number)
        try:
            await second.start()
        except Exception as e:  # pragma: no cover - a host without 127.0.0.2
            raise unittest.SkipTest(f"cannot listen on 127.0.0.2:{number}: {e}") from None
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(second.stop()))
        logs = LogCapture.install(self)
        dns_server = start_server(self)
        dns_server.authority.set(NAME, a("127.0.0.1", 1), a("127.0.0.2", 1))
        balancer = await self.start(dns_server, f"{{dns: {NAME}, port: {number}}}")
        await wait_until(lambda: len(balancer.service.pool.nodes) == 2, what="nodes from DNS")
        await dns_server.stop()
        # The lookup after the records' 1-second TTL is when the nodes could
        # go; wait until it has failed.
        await wait_until(
            lambda: any(f"DNS lookup of dns {NAME} failed" in m for m in logs.messages()),
            what="a failed lookup after the TTL",
        )
        bodies = {(await http_request(self, "GET", balancer.url + "/")).body for _ in range(4)}
        self.assertEqual(bodies, {b"one", b"two"})
        self.assertEqual(len(balancer.service.pool.nodes), 2)

    async def test_reload_adds_and_removes_dns_entries(self) -> None:
        """
        A reload that adds a DNS entry starts looking it up (with the
        resolvers it names); one that removes it takes its nodes out.
        """
        static = await start_backend(self, "static")
        found = await start_backend(self, "found")
        dns_server = start_server(self)
        dns_server.authority.set(SRV_NAME, srv("f.rrlb.test", found.port_number, ttl=1))
        dns_server.authority.set("f.rrlb.test", a("127.0.0.1", 1))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"nodes: [{static.url}]\n")
        balancer = await start_balancer(self, (), "--config", path, "--health-interval", "30")
        service = balancer.service
        with open(path, "w") as f:
            f.write(
                f"nodes: [{static.url}, {{srv: {SRV_NAME}}}]\nresolvers: ['{dns_server.address}']\n"
            )
        self.assertTrue(service.reload())
        await wait_until(lambda: len(service.pool.nodes) == 2, what="the node from DNS")
        self.assertEqual([n.url for n in service.pool.nodes], [static.url, found.url])
        with open(path, "w") as f:
            f.write(f"nodes: [{static.url}]\n")
        self.assertTrue(service.reload())
        self.assertEqual([n.url for n in service.pool.nodes], [static.url])

    def test_bad_tls_file_of_a_dns_entry(self) -> None:
        """
        The TLS files of a DNS entry are read at start-up, so a bad one
        stops rrlb before any node is found.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                "nodes:\n  - {srv: _https._tcp.x.internal, scheme: https,"
                " tls: {ca_file: /nonexistent/ca.pem}}\n"
            )
        message = parse_error("--config", path)
        self.assertIn("/nonexistent/ca.pem", message)
