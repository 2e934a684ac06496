# -*- test-case-name: tests.test_discovery -*-
"""
Nodes from DNS: each C{{dns: NAME, port: N}} entry is a node per A/AAAA
record of NAME, each C{{srv: NAME}} entry a node per SRV target (at the
target's port, weighted by the SRV weight). Names are looked up with
L{twisted.names} again when their TTL runs out (at least L{TTL_FLOOR}
seconds, at most C{dns_refresh}); whenever the set of nodes found changes,
L{DnsDiscovery} calls its C{on_change}, and the service applies the new node
set the way a reload does (L{rrlb.service.ControlService.nodes_found}).

A lookup that fails (no answer, a server failure) keeps the nodes found
last; one that is answered with no records (or NXDOMAIN) empties the set:
the DNS says there are no nodes now. Either is logged once when it starts
and once when it ends, not on every retry.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import client, dns, error, hosts, resolve
from twisted.python.failure import Failure

from rrlb.config import MAX_WEIGHT, DnsNodes, NodeSpec

# Bounds on the time between two lookups of a name: a TTL of 0 does not
# make rrlb query in a loop, and dns_refresh caps long TTLs.
TTL_FLOOR = 1.0
# After a failed lookup, look again this soon (or after dns_refresh if less).
RETRY_AFTER_FAILURE = 5.0
# How long one lookup waits for an answer: seconds per try, each try going
# to the next name server. A dead server costs 4 s, not twisted.names'
# default of a minute.
LOOKUP_TIMEOUT = (1.0, 3.0)

# One address found: (address, port, weight, the name it belongs to).
Found = tuple[str, int, int, str]


class TCPResolver(client.Resolver):
    """
    A L{client.Resolver} that asks over TCP (RFC 7766: every name server
    answers there too), on one connection it keeps while the server does.

    Over UDP, Twisted's resolver opens a port per query (a fresh source port
    against spoofed answers), and Twisted logs four lines for each: with
    names re-resolved every few seconds that buries rrlb's own log. A TCP
    connection logs nothing once its factory is quiet, and needs no source
    port games: an answer can only come back on it.
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        factory: Any = self.factory
        factory.noisy = False

    def queryUDP(self, queries: Any, timeout: Any = None) -> Any:
        timeouts: Sequence[float] = timeout if timeout is not None else self.timeout  # type: ignore[assignment]
        return self.queryTCP(queries, sum(timeouts))


def make_resolver(reactor: Any, servers: Sequence[tuple[str, int]] = ()) -> Any:
    """
    The resolver rrlb uses: C{/etc/hosts} first, then the given name servers,
    or those of C{/etc/resolv.conf}, over TCP (L{TCPResolver}). No cache:
    rrlb keeps what it found until the TTL runs out, and a cache would only
    hand the same answers back.
    """
    if servers:
        dns_resolver = TCPResolver(servers=list(servers), reactor=reactor)
    else:
        dns_resolver = TCPResolver(resolv="/etc/resolv.conf", reactor=reactor)
    return resolve.ResolverChain([hosts.Resolver(file=b"/etc/hosts"), dns_resolver])


class LookupFailed(Exception):
    """
    A lookup got no usable answer; the message says why.
    """


def describe_lookup_failure(reason: Failure) -> str:
    """
    A short reason for a log line.
    """
    if reason.check(error.DNSQueryTimeoutError, defer.TimeoutError):
        return "no answer from the name servers (timed out)"
    if reason.check(error.DNSServerError):
        return "server failure (SERVFAIL)"
    if reason.check(error.DNSQueryRefusedError):
        return "query refused (REFUSED)"
    if reason.check(LookupFailed):
        return str(reason.value)
    return reason.getErrorMessage() or type(reason.value).__name__


def _is_no_such_name(reason: Failure) -> bool:
    # NXDOMAIN from a server, or (for /etc/hosts and authorities) a plain
    # DomainError: the name has no records. Every other DomainError subclass
    # is a server saying it could not answer.
    return reason.type in (error.DNSNameError, error.DomainError, error.AuthoritativeDomainError)


def _empty_ttl(authority: Iterable[Any], cap: float) -> float:
    """
    How long a "no records" answer holds: the SOA's negative TTL (RFC 2308
    section 5), else C{cap}.
    """
    for record in authority:
        if record.type == dns.SOA:
            return float(min(record.ttl, record.payload.minimum))
    return cap


def _addresses(answers: Iterable[Any]) -> tuple[dict[str, list[str]], Optional[float]]:
    """
    The A and AAAA records among C{answers} by owner name, and the lowest
    TTL of them and of any CNAME leading to them.
    """
    found: dict[str, list[str]] = {}
    ttl: Optional[float] = None
    for record in answers:
        if record.type == dns.A:
            address = record.payload.dottedQuad()
        elif record.type == dns.AAAA:
            address = socket.inet_ntop(socket.AF_INET6, record.payload.address)
        elif record.type == dns.CNAME:
            ttl = record.ttl if ttl is None else min(ttl, record.ttl)
            continue
        else:
            continue
        found.setdefault(record.name.name.decode("ascii", "replace").lower(), []).append(address)
        ttl = record.ttl if ttl is None else min(ttl, record.ttl)
    return found, ttl


@dataclass
class _Name:
    """
    What is known of one DNS entry: the addresses its last good lookup
    found, and the state of its lookups.
    """

    entry: DnsNodes
    found: tuple[Found, ...] = ()
    resolved: bool = False
    error: Optional[str] = None
    call: Any = None
    lookup: Optional[defer.Deferred[Any]] = None

    def nodes(self) -> list[NodeSpec]:
        return [self.entry.node(a, port, weight, target) for a, port, weight, target in self.found]


class DnsDiscovery(Service):
    """
    Looks up the DNS node entries of the configuration and keeps their
    nodes current.

    @param clock: schedules the lookups (C{callLater}).
    @param resolver: an L{twisted.names} resolver (see L{make_resolver}).
    @param on_change: called with no arguments when L{nodes} changed.
    @ivar nodes: every node found, entry by entry, each entry's in address
        order; a node found twice is listed once.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        resolver: Any,
        on_change: Callable[[], None],
        entries: Sequence[DnsNodes] = (),
        refresh: float = 30.0,
        lookup_timeout: Sequence[float] = LOOKUP_TIMEOUT,
    ) -> None:
        self.clock = clock
        self.resolver = resolver
        self.on_change = on_change
        self.refresh = refresh
        self.lookup_timeout = tuple(lookup_timeout)
        self.nodes: tuple[NodeSpec, ...] = ()
        self._names: dict[tuple[str, bool, int], _Name] = {}
        self.configure(entries, refresh)

    @staticmethod
    def _key(entry: DnsNodes) -> tuple[str, bool, int]:
        return (entry.name, entry.srv, entry.port)

    def configure(self, entries: Sequence[DnsNodes], refresh: float, resolver: Any = None) -> bool:
        """
        Take a new set of entries (a reload). Entries that stay keep what
        they found, under their new settings; new ones are looked up now.

        @return: whether L{nodes} changed (C{on_change} is not called).
        """
        self.refresh = refresh
        if resolver is not None:
            self.resolver = resolver
        old = self._names
        self._names = {}
        for entry in entries:
            key = self._key(entry)
            name = old.pop(key, None)
            if name is None:
                name = _Name(entry)
                if self.running:
                    self._schedule(name, 0)
            else:
                name.entry = entry
                if name.call is not None and name.call.active():
                    # A shorter dns_refresh applies now, not after the wait.
                    when = min(name.call.getTime(), self.clock.seconds() + refresh)
                    name.call.reset(max(0.0, when - self.clock.seconds()))
            self._names[key] = name
        for name in old.values():
            self._cancel(name)
        return self._collect()

    def nodes_of(self, entry: DnsNodes) -> list[NodeSpec]:
        """
        The nodes found for C{entry}, made from its own template: pools that
        list one name with different node settings each get theirs.
        """
        name = self._names.get(self._key(entry))
        if name is None:
            return []
        return [entry.node(a, port, weight, target) for a, port, weight, target in name.found]

    def _collect(self) -> bool:
        nodes: list[NodeSpec] = []
        seen: set[str] = set()
        for name in self._names.values():
            for node in name.nodes():
                if node.key not in seen:
                    seen.add(node.key)
                    nodes.append(node)
        changed = tuple(nodes) != self.nodes
        self.nodes = tuple(nodes)
        return changed

    # -- the lookups ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for name in self._names.values():
            self._schedule(name, 0)

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        lookups = [n.lookup for n in self._names.values() if n.lookup is not None]
        for name in self._names.values():
            self._cancel(name)
        # Lookups in flight end within the lookup timeout; wait for them, so
        # none answers into a stopped service (or a finished test).
        return defer.DeferredList(lookups, consumeErrors=True)

    def _cancel(self, name: _Name) -> None:
        if name.call is not None and name.call.active():
            name.call.cancel()
        name.call = None

    def _schedule(self, name: _Name, delay: float) -> None:
        self._cancel(name)
        name.call = self.clock.callLater(delay, self._look_up, name)

    def _look_up(self, name: _Name) -> None:
        name.call = None
        if name.lookup is not None:
            return
        d = self.resolve(name.entry)
        name.lookup = d
        d.addCallbacks(self._found, self._failed, callbackArgs=(name,), errbackArgs=(name,))
        d.addErrback(lambda f: self.log.failure("DNS lookup of {name}", f, name=name.entry.name))

    def _current(self, name: _Name) -> bool:
        name.lookup = None
        return bool(self.running) and self._names.get(self._key(name.entry)) is name

    def _found(self, result: tuple[tuple[Found, ...], float], name: _Name) -> None:
        if not self._current(name):
            return
        found, ttl = result
        entry = name.entry
        if name.error is not None:
            self.log.info(
                "DNS lookup of {setting} answered again: {count} nodes",
                setting=entry.setting,
                count=len(found),
            )
            name.error = None
        if not name.resolved or found != name.found:
            before, after = set(name.found), set(found)
            self.log.info(
                "DNS {setting}: {count} nodes ({added} added, {removed} removed)",
                setting=entry.setting,
                count=len(found),
                added=len(after - before),
                removed=len(before - after),
            )
        name.resolved = True
        name.found = found
        self._schedule(name, min(self.refresh, max(TTL_FLOOR, ttl)))
        if self._collect():
            self.on_change()

    def _failed(self, reason: Failure, name: _Name) -> None:
        if not self._current(name):
            return
        why = describe_lookup_failure(reason)
        # Logged when lookups start failing, not again while they keep
        # failing (whatever the reason of each: timed out, refused).
        if name.error is None:
            self.log.warn(
                "DNS lookup of {setting} failed: {why}; keeping its {count} nodes"
                " until a lookup succeeds",
                setting=name.entry.setting,
                why=why,
                count=len(name.found),
            )
            name.error = why
        self._schedule(name, min(self.refresh, RETRY_AFTER_FAILURE))

    # -- one lookup ---------------------------------------------------------------

    def resolve(self, entry: DnsNodes) -> defer.Deferred[tuple[tuple[Found, ...], float]]:
        """
        Look up one entry: the addresses found, sorted, and how long they
        hold (the lowest TTL involved).
        """
        if entry.srv:
            return defer.Deferred.fromCoroutine(self._resolve_srv(entry))
        return defer.Deferred.fromCoroutine(self._resolve_name(entry.name, entry.port, 1))

    async def _addresses_of(self, name: str) -> tuple[dict[str, list[str]], float]:
        """
        The A and AAAA records of C{name} (both asked at once), and their TTL.
        """
        lookups = [
            self.resolver.lookupAddress(name, self.lookup_timeout),
            self.resolver.lookupIPV6Address(name, self.lookup_timeout),
        ]
        results = await defer.DeferredList(lookups, consumeErrors=True)
        found: dict[str, list[str]] = {}
        ttls: list[float] = []
        empty_ttl = self.refresh
        for ok, result in results:
            if not ok:
                if _is_no_such_name(result):
                    continue
                raise LookupFailed(describe_lookup_failure(result))
            answers, authority, _ = result
            addresses, ttl = _addresses(answers)
            for owner, values in addresses.items():
                found.setdefault(owner, []).extend(values)
            if ttl is not None:
                ttls.append(ttl)
            else:
                empty_ttl = min(empty_ttl, _empty_ttl(authority, self.refresh))
        return found, min(ttls) if ttls else empty_ttl

    async def _resolve_name(
        self, name: str, port: int, weight: int
    ) -> tuple[tuple[Found, ...], float]:
        addresses, ttl = await self._addresses_of(name)
        found = {(a, port, weight, name) for values in addresses.values() for a in values}
        return _sorted(found), ttl

    async def _resolve_srv(self, entry: DnsNodes) -> tuple[tuple[Found, ...], float]:
        try:
            answers, authority, additional = await self.resolver.lookupService(
                entry.name, self.lookup_timeout
            )
        except Exception:
            reason = Failure()
            if _is_no_such_name(reason):
                return (), self.refresh
            raise
        targets = []
        ttls: list[float] = []
        for record in answers:
            if record.type != dns.SRV:
                continue
            ttls.append(record.ttl)
            target = record.payload.target.name.decode("ascii", "replace").lower()
            if target in ("", "."):
                continue  # RFC 2782: the service is decidedly not available here
            weight = max(1, min(MAX_WEIGHT, record.payload.weight))
            targets.append((target, record.payload.port, weight))
        if not ttls:
            return (), _empty_ttl(authority, self.refresh)
        # Addresses that came with the answer, else one lookup per target.
        extra, extra_ttl = _addresses(additional)
        found: set[Found] = set()
        for target, port, weight in targets:
            addresses = extra.get(target)
            if addresses:
                if extra_ttl is not None:
                    ttls.append(extra_ttl)
            else:
                by_name, ttl = await self._addresses_of(target)
                addresses = [a for values in by_name.values() for a in values]
                ttls.append(ttl)
            found.update((a, port, weight, target) for a in addresses)
        return _sorted(found), min(ttls)


def _sorted(found: Iterable[Found]) -> tuple[Found, ...]:
    """
    Addresses in a stable order: DNS servers rotate their answers, and the
    pool's order should not change with them.
    """

    def key(item: Found) -> tuple[int, bytes, int, str]:
        address = item[0]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return (family, socket.inet_pton(family, address), item[1], item[3])

    # One node per address and port: the first (by target name) wins.
    unique: dict[tuple[str, int], Found] = {}
    for item in sorted(found, key=key):
        unique.setdefault((item[0], item[1]), item)
    return tuple(unique.values())
