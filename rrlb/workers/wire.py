# -*- test-case-name: tests.test_workers -*-
"""
The messages between the main process and its workers, over one
socketpair per worker with L{twisted.protocols.amp}:

  - main -> worker: L{Configure} (the configuration and every pool with
    its node set, at start and after a reload or a change of the nodes
    found in DNS), L{NodeStates} (health and drain changes, as they
    happen), L{GetCounters} (on each admin scrape, and once a second for
    the status page's charts), L{Stop};
  - worker -> main: L{NodeFailed} (a passive failure the proxy saw);
    L{Decide} and L{Release}: the decisions of the C{store: local} rate
    limits, made in the main process so that the whole instance has one
    count (L{rrlb.workers.limitlink}).

A node is named on the wire by its pool and its key (its URL): one URL in
two pools is two nodes, with their own health, drain state and counts.

The configuration travels pickled: it goes only from the main process to
the children it started, on a socket nobody else holds, and both run the
same code. What workers send back (counters, failures) is JSON or plain AMP
values, so the main process never unpickles anything a worker sent.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Iterable

from twisted.internet import error
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols import amp
from twisted.python.failure import Failure

from rrlb.pool import Node

# The worker's end of its channel, and its first listening socket (the
# others follow in --listen order).
CHANNEL_FD = 3
FIRST_LISTEN_FD = 4


class _Chunked(amp.Argument):
    """
    A value of any size: AMP limits one value to 64 KiB, so it is sent as
    C{name} (the number of chunks) and C{name.0}, C{name.1}, ...
    """

    def encode(self, value: Any) -> bytes:
        raise NotImplementedError()

    def decode(self, data: bytes) -> Any:
        raise NotImplementedError()

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        data = self.encode(objects[name.decode("ascii")])
        size = amp.MAX_VALUE_LENGTH
        chunks = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        strings[name] = b"%d" % len(chunks)
        for i, chunk in enumerate(chunks):
            strings[b"%s.%d" % (name, i)] = chunk

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        count = int(strings[name])
        data = b"".join(strings[b"%s.%d" % (name, i)] for i in range(count))
        objects[name.decode("ascii")] = self.decode(data)


class Pickled(_Chunked):
    """
    A Python value, pickled: only ever sent from the main process to its
    own workers.
    """

    def encode(self, value: Any) -> bytes:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    def decode(self, data: bytes) -> Any:
        return pickle.loads(data)


class Json(_Chunked):
    """
    A JSON value.
    """

    def encode(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode("utf-8")

    def decode(self, data: bytes) -> Any:
        return json.loads(data)


class ConfigRefused(Exception):
    """
    A worker could not apply a configuration (say, a TLS file went bad
    between the main process's check and the worker's read).
    """


class Configure(amp.Command):
    """
    Main -> worker: run this configuration (the first one starts serving).
    C{pools}: the pools to run as the main process runs them, each with its
    node set (the demo backends and the nodes found in DNS included: a
    worker neither starts backends nor looks up names). C{reload}: a reload
    (apply every setting) rather than a new node set. C{states}: every
    node's C{[pool, key, healthy, drained]}. C{count}: count requests for
    the admin endpoint.
    """

    arguments = [
        (b"config", Pickled()),
        (b"pools", Pickled()),
        (b"states", Json()),
        (b"reload", amp.Boolean()),
        (b"count", amp.Boolean()),
    ]
    response = [(b"pid", amp.Integer())]
    errors = {ConfigRefused: b"CONFIG_REFUSED"}


class NodeStates(amp.Command):
    """
    Main -> worker: nodes whose health or drain state changed, each
    C{[pool, key, healthy, drained]}.
    """

    arguments = [(b"states", Json())]
    requiresAnswer = False


class AcmeUpdate(amp.Command):
    """
    Main -> worker: serve this L{rrlb.acme.AcmeState} (the certificate from
    ACME and the challenges pending); only the main process talks to the CA.
    """

    arguments = [(b"state", Pickled())]
    response = [(b"names", amp.Integer())]


class GetCounters(amp.Command):
    """
    Main -> worker: the worker's counters, for an admin scrape (with its
    client connections if C{clients}) or the status page's charts.
    """

    arguments = [(b"clients", amp.Boolean(optional=True))]
    response = [(b"counters", Json())]


class Stop(amp.Command):
    """
    Main -> worker: stop accepting, drain, exit.
    """

    requiresAnswer = False


class NodeFailed(amp.Command):
    """
    Worker -> main: a request to node C{key} of pool C{pool} failed
    (passive health).
    """

    arguments = [
        (b"pool", amp.Unicode()),
        (b"key", amp.Unicode()),
        (b"reason", amp.Unicode()),
    ]
    requiresAnswer = False


class Decide(amp.Command):
    """
    Worker -> main: the C{store: local} rate-limit decisions a worker
    needed in one turn of its reactor, in order, each
    C{["take", limit, key, count, period, burst, max_keys]} (one request
    on rate limit C{limit}, a filter's place in the configuration) or
    C{["acquire", limit, key, max]} (one more request in flight on
    C{limit_in_flight} C{limit}). C{answers}: for each, in order, its
    C{Retry-After} (0: go on) or 1 (granted) / 0 (refused). Keys are
    strings (bytes as Latin-1).
    """

    arguments = [(b"decisions", Json())]
    response = [(b"answers", Json())]


class Release(amp.Command):
    """
    Worker -> main: requests that held in-flight places ended, each
    C{[limit, key]}.
    """

    arguments = [(b"releases", Json())]
    requiresAnswer = False


def node_states(nodes: Iterable[Node]) -> list[list[Any]]:
    """
    The states L{Configure} and L{NodeStates} carry: a node is named by its
    pool and key (one URL may be a node of two pools).
    """
    return [[n.pool_name, n.key, n.healthy, n.drained] for n in nodes]


class OneProtocol(Factory):
    """
    The factory of one connection whose protocol is already made.
    """

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance


class QuietAMP(amp.AMP):
    """
    AMP without its log lines for every connection made and lost (a worker
    restart would log four).
    """

    def makeConnection(self, transport: Any) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # type: ignore[assignment]
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None
