# -*- test-case-name: tests.test_limits,tests.test_proxyproto,tests.test_slow_peers -*-
"""
The client connections as a whole: L{ClientLimits} (what a client may send,
and for how long), the cap on connections and the file descriptors it
needs, who is a trusted proxy, and L{ClientSite}, which keeps the open
channels, times them out in one sweep, and stops accepting at
C{--max-connections}.

L{rrlb.channel} (one connection's requests) builds on this module, never
the other way round.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from twisted.logger import Logger
from twisted.web import server

from rrlb.settings import DEFAULT_MAX_CONNECTIONS, Config, values_for
from rrlb.values import Network

log = Logger()


# How long a connection whose request was refused is read from (and the
# bytes dropped) after the error response, so that a client still sending
# its body gets to read the answer instead of a reset (nginx's
# lingering_close).
LINGER_TIMEOUT = 2.0
# The most seconds between two sweeps over the open connections.
MAX_SWEEP_INTERVAL = 1.0
# How long a connection rrlb closes may take to send what is left of its
# last response: a client that reads none of it is cut off then (nginx's
# send_timeout), or its connection and that buffer would stay for as long
# as it reads nothing.
CLOSE_TIMEOUT = 60.0
# Client connections /status lists at most.
MAX_LISTED_CLIENTS = 100


@dataclass(frozen=True)
class ClientLimits:
    """
    What a client may send, and for how long (see docs/security.md).

    @ivar trusted_proxies: networks whose X-Forwarded-* headers are kept; an
        empty tuple means the option is unset (X-Forwarded-For is appended
        to, whoever sent it).
    @ivar proxy_protocol_from: the peers a C{haproxy:} listener takes a
        PROXY header from (L{rrlb.proxyproto}); empty: any peer.
    """

    # The defaults are rrlb.settings', where the options are.
    max_header_size: int = Config.max_header_size
    max_headers: int = Config.max_headers
    max_body_size: int = Config.max_body_size
    header_timeout: float = Config.client_header_timeout
    body_timeout: float = Config.client_body_timeout
    keepalive_timeout: float = Config.keepalive_timeout
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    trusted_proxies: tuple[Network, ...] = ()
    proxy_protocol_from: tuple[Network, ...] = ()

    @classmethod
    def from_config(cls, config: Config) -> ClientLimits:
        """
        The limits C{config} sets (its settings that feed C{client}), with
        C{max_connections} as what fits (L{connections_that_fit}).
        """
        limits = values_for("client", config)
        return cls(**{**limits, "max_connections": connections_that_fit(limits["max_connections"])})


# File descriptors kept beyond two per client connection (the client's and
# its node connection): listeners, health probes, logs, the admin API.
FD_RESERVE = 64


def connections_that_fit(max_connections: Optional[int]) -> int:
    """
    The cap on client connections: C{max_connections}, or fewer if that many
    cannot have their file descriptors under the soft C{RLIMIT_NOFILE}
    (HAProxy lowers its maxconn the same way). Unset (L{None}), it is what
    the limit fits, at most L{DEFAULT_MAX_CONNECTIONS}.
    """
    wanted = DEFAULT_MAX_CONNECTIONS if max_connections is None else max_connections
    try:
        import resource
    except ImportError:  # not on POSIX
        return wanted
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, (soft - FD_RESERVE) // 2))


def raise_fd_limit(max_connections: Optional[int]) -> None:
    """
    Raise the soft C{RLIMIT_NOFILE} to the hard limit, and say so once if a
    C{max_connections} the operator set still cannot fit in it (rrlb then
    uses the cap L{connections_that_fit} gives). Unset, the cap is what
    fits, and nothing is said.
    """
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    elif hard == resource.RLIM_INFINITY:
        soft = hard
    if max_connections is None:
        return
    needed = 2 * max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warn(
            "--max-connections {max} needs up to {needed} file descriptors (a client"
            " and a node connection each), but the limit (RLIMIT_NOFILE) is {limit}:"
            " accepting at most {fits} client connections; raise the limit"
            " (LimitNOFILE= in the systemd unit) or lower --max-connections",
            max=max_connections,
            needed=needed,
            limit=soft,
            fits=connections_that_fit(max_connections),
        )


def is_trusted(host: Optional[str], networks: Sequence[Network]) -> bool:
    """
    Whether an address (text) is inside one of C{networks}.
    """
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return any(address in network for network in networks)


def real_client(peer: bytes, forwarded_for: list[bytes], networks: Sequence[Network]) -> bytes:
    """
    The client behind a chain of trusted proxies: the first address of
    C{X-Forwarded-For} from the right (after the peer) that is not trusted,
    or the leftmost one if every hop is trusted. The walk stops at a hop
    that is not an IP address; the answer is then the last address before
    it (the peer's, if none).
    """
    client = peer
    for value in reversed(forwarded_for):
        for hop in reversed(value.split(b",")):
            try:
                address = ipaddress.ip_address(hop.strip().decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                # Not an address: nothing to its left can be believed, and
                # nothing but an address may stand in the log.
                return client
            client = str(address).encode("ascii")
            if not is_trusted(client.decode("ascii"), networks):
                return client
    return client


class ClientSite(server.Site):
    """
    A L{server.Site} that keeps its open channels: it times them out in one
    sweep (no timer per connection or request), pauses its listening ports
    at C{max_connections} and resumes them below it, and hands the drain
    the channels to close.

    A connection on a C{haproxy:} listener holds its place from accept: it
    is in L{waiting} until its PROXY header has come (L{rrlb.proxyproto}),
    then in L{channels}.

    @ivar ports: the listening ports to pause and resume (the service adds
        them once they listen).
    @ivar streams: places under C{max_connections} taken by HTTP/2 streams
        beyond the first of their connection (L{stream_opened}).
    @ivar waiting: connections waiting for their PROXY header.
    @ivar parked: connections accepted past the cap (Twisted accepts several
        per wake-up), unread until a place is free.
    @ivar linger: read and drop what a refused client still sends before
        closing (off in tests that use in-memory transports).
    @ivar close_timeout: how long a connection rrlb closes may take to send
        what is left of its last response (L{CLOSE_TIMEOUT}).
    @ivar accepts_per_wakeup: the most clients a port accepts per wake-up
        (L{None}: as many as there are places). A worker sets 1, nginx's
        C{multi_accept off}: every worker is woken for each client on the
        listening socket they share, and a port that accepts a burst in
        one go leaves the other workers idle.
    """

    linger = True
    close_timeout = CLOSE_TIMEOUT
    accepts_per_wakeup: Optional[int] = None

    def __init__(self, resource: Any, clock: Any, limits: ClientLimits, **kw: Any) -> None:
        # No twisted.web timeout: the sweep does every client timeout.
        server.Site.__init__(self, resource, timeout=None, reactor=clock, **kw)
        self.clock = clock
        self.limits = limits
        # rrlb.channel.ProxyChannel instances (this module is below it).
        self.channels: set[Any] = set()
        self.waiting: set[Any] = set()
        self.on_channel_lost: Optional[Callable[[], None]] = None
        self.ports: list[Any] = []
        self.parked: list[Any] = []
        self.streams = 0
        self.paused = False
        self._sweep_call: Any = None
        self._cap_call: Any = None

    @property
    def open_count(self) -> int:
        """
        The client connections open, those waiting for a PROXY header too
        (C{rrlb_client_connections}).
        """
        return len(self.channels) + len(self.waiting)

    @property
    def taken(self) -> int:
        """
        The places taken under C{max_connections}: every client connection
        (from accept), and the HTTP/2 streams beyond the first of theirs.
        """
        return len(self.channels) + len(self.waiting) + self.streams

    def add_port(self, port: Any) -> Any:
        self.ports.append(port)
        self._cap_accepts()
        if self.paused:
            port.stopReading()
        return port

    def _cap_accepts(self) -> None:
        """
        Twisted's port accepts up to its C{numberAccepts} clients per
        wake-up (a hundred at first, and it raises that after a full one):
        never more than there are places for, or a burst would hold
        descriptors past the cap, parked. Set before each wake-up: when a
        port is added or resumed, and in the turn after one that took
        places (the port raises its count at the end of a wake-up).
        """
        self._cap_call = None
        room = max(1, self.limits.max_connections - self.taken)
        if self.accepts_per_wakeup is not None:
            room = min(room, self.accepts_per_wakeup)
        for port in self.ports:
            if hasattr(port, "numberAccepts"):
                port.numberAccepts = min(port.numberAccepts, room)

    def _places_taken(self) -> None:
        if self.taken >= self.limits.max_connections and not self.paused:
            self.pause_accepting()
        elif self._cap_call is None and self.ports:
            self._cap_call = self.clock.callLater(0, self._cap_accepts)

    def _park(self, connection: Any) -> None:
        # Twisted accepts several clients per wake-up, so a few may come in
        # past the cap: they wait, unread, for a free place.
        connection.transport.pauseProducing()
        self.parked.append(connection)
        if not self.paused:
            self.pause_accepting()

    def channel_opened(self, channel: Any) -> None:
        channels = self.channels
        if channel not in channels:
            # (One that waited for its PROXY header is in already.)
            if self.taken >= self.limits.max_connections:
                channel.deadline = None
                self._park(channel)
                return
            channels.add(channel)
        self._places_taken()
        if self._sweep_call is None:
            self._sweep_call = self.clock.callLater(self.sweep_interval(), self._sweep)

    def header_awaited(self, connection: Any) -> bool:
        """
        C{connection} was accepted on a C{haproxy:} listener and waits for
        its PROXY header: it holds a place from now on.

        @return: whether it has one; if not, it is parked (unread) until a
            place is free, and then its C{admitted()} is called.
        """
        if self.taken >= self.limits.max_connections:
            self._park(connection)
            return False
        self.waiting.add(connection)
        self._places_taken()
        return True

    def header_arrived(self, connection: Any, channel: Any) -> None:
        """
        The PROXY header of C{connection} came: C{channel}, about to be
        connected, takes over its place.
        """
        self.waiting.discard(connection)
        self.channels.add(channel)

    def channel_closed(self, channel: Any) -> None:
        """
        C{channel} (a L{ProxyChannel}, or a connection still waiting for its
        PROXY header) is gone: its place goes to the first parked one.
        """
        channels = self.channels
        if channel in channels:
            channels.discard(channel)
        elif channel in self.waiting:
            self.waiting.discard(channel)
        elif channel in self.parked:
            self.parked.remove(channel)
        self._room_freed()
        if self.on_channel_lost is not None:
            self.on_channel_lost()

    def stream_opened(self) -> bool:
        """
        An HTTP/2 connection opens a stream beside those it has open: each
        may hold a node connection, so it takes a place under
        C{max_connections} as a client connection does. Returns C{False},
        taking nothing, when there is no place left (the stream is refused).
        """
        if self.taken >= self.limits.max_connections:
            return False
        self.streams += 1
        if self.taken >= self.limits.max_connections and not self.paused:
            self.pause_accepting()
        return True

    def stream_closed(self) -> None:
        """
        A stream that took a place with L{stream_opened} ended.
        """
        self.streams -= 1
        self._room_freed()

    def _room_freed(self) -> None:
        """
        A place may be free: a client held unread takes it, and accepting
        resumes if there is still room.
        """
        channels = self.channels
        room = self.limits.max_connections - self.taken
        while self.parked and room > 0:
            parked = self.parked.pop(0)
            room -= 1
            admitted = getattr(parked, "admitted", None)
            if admitted is None:  # a ProxyChannel
                channels.add(parked)
                parked.deadline = self.clock.seconds() + self.limits.header_timeout
            else:  # a connection waiting for its PROXY header
                self.waiting.add(parked)
                admitted()
            parked.transport.resumeProducing()
        if not channels:
            self.stop_sweeping()
        elif self._sweep_call is None:
            self._sweep_call = self.clock.callLater(self.sweep_interval(), self._sweep)
        if self.paused and room > 0:
            self.resume_accepting()

    def client_list(self, limit: int = MAX_LISTED_CLIENTS) -> list[dict[str, Any]]:
        """
        The open client connections for C{/status} (the longest-open first,
        at most C{limit}): who the client is (behind trusted proxies: the
        real client of its latest request), its peer, what it is doing and
        how many requests it has had answered.
        """
        listed = sorted(self.channels, key=lambda c: c.opened)[:limit]
        return [
            {
                "client": channel.client_address,
                "peer": channel.forwarded[1].decode("ascii", "replace"),
                "state": channel.state_name,
                "requests": channel.served,
                "since": channel.opened,
            }
            for channel in listed
        ]

    def close_parked(self) -> None:
        """
        At shutdown: close the clients waiting for a place (they sent
        nothing that was read), and those still waiting for their PROXY
        header (no request of theirs has begun).
        """
        parked, self.parked = self.parked, []
        waiting, self.waiting = self.waiting, set()
        for connection in parked + list(waiting):
            connection.transport.abortConnection()

    def pause_accepting(self) -> None:
        """
        Stop accepting: new clients wait in the kernel's listen backlog.
        """
        self.paused = True
        log.warn(
            "{count} client connections open (--max-connections): not accepting more"
            " until one closes",
            count=self.open_count,
        )
        for port in self.ports:
            port.stopReading()

    def resume_accepting(self) -> None:
        self.paused = False
        log.info("below --max-connections again: accepting clients")
        self._cap_accepts()
        for port in self.ports:
            if getattr(port, "connected", False) and not getattr(port, "disconnecting", False):
                port.startReading()

    def set_limits(self, limits: ClientLimits) -> None:
        """
        A reload: new limits apply to connections from now on; a lower
        C{max_connections} pauses accepting until enough have closed.
        """
        self.limits = limits
        over = self.taken >= limits.max_connections
        if over and not self.paused:
            self.pause_accepting()
        elif not over and self.paused:
            self.resume_accepting()

    # -- timeouts -------------------------------------------------------------

    def sweep_interval(self) -> float:
        limits = self.limits
        shortest = min(
            limits.header_timeout, limits.body_timeout, limits.keepalive_timeout, LINGER_TIMEOUT
        )
        return min(MAX_SWEEP_INTERVAL, shortest / 4)

    def _sweep(self) -> None:
        self._sweep_call = None
        now = self.clock.seconds()
        expired = [c for c in self.channels if c.deadline is not None and now >= c.deadline]
        for channel in expired:
            channel.deadline = None
            try:
                channel.timed_out()
            except Exception:
                log.failure("timing out a client connection")
        if self.channels:
            self._sweep_call = self.clock.callLater(self.sweep_interval(), self._sweep)

    def stop_sweeping(self) -> None:
        for call in (self._sweep_call, self._cap_call):
            if call is not None and call.active():
                call.cancel()
        self._sweep_call = self._cap_call = None
