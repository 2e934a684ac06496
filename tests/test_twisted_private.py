"""
The private Twisted names rrlb leans on (see L{rrlb._twisted}) still exist
and still mean what rrlb takes them to mean. A Twisted release that changes
one fails here, loudly, instead of in requests.

And they are used in L{rrlb._twisted} only: every other rrlb module is read
with C{ast} for Twisted's private names (L{PrivateNameScanTests}).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import textwrap
from functools import lru_cache
from typing import Any, Iterator, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from rrlb import _twisted
from rrlb.proxy import ProxyRequest, ProxySite


class HeadersTests(unittest.TestCase):
    """
    L{Headers} keeps a dict of canonical name -> values in C{_rawHeaders},
    and spells names with C{_nameEncoder}.
    """

    def test_raw_headers_dict(self) -> None:
        """
        The dict is what the public methods read and write.
        """
        headers = Headers()
        headers.addRawHeader(b"x-thing", b"1")
        headers.addRawHeader(b"X-THING", b"2")
        self.assertEqual(_twisted.raw_headers(headers), {b"X-Thing": [b"1", b"2"]})
        _twisted.set_raw_headers(headers, {b"Content-Type": [b"a"], b"X-A": [b"1", b"2"]})
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"a"])
        self.assertEqual(headers.getRawHeaders("x-a"), ["1", "2"])
        self.assertEqual(
            sorted(headers.getAllRawHeaders()), [(b"Content-Type", [b"a"]), (b"X-A", [b"1", b"2"])]
        )

    def test_canonical_names(self) -> None:
        """
        Names are spelled as Headers spells them, and non-tokens refused.
        """
        for name, canonical in (
            (b"content-type", b"Content-Type"),
            (b"x-forwarded-for", b"X-Forwarded-For"),
            (b"te", b"TE"),
            (b"www-authenticate", b"WWW-Authenticate"),
            (b"etag", b"ETag"),
        ):
            self.assertEqual(_twisted.canonical_name(name), canonical)
            headers = Headers()
            headers.addRawHeader(name, b"v")
            self.assertEqual(list(_twisted.raw_headers(headers)), [canonical])
        for bad in (b"", b"a b", b"a:", b" a", b"a\t", b"\xc3\xa9"):
            self.assertRaises(_twisted.HeaderNameError, _twisted.canonical_name, bad)


class Answer(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"ok"


class ChannelTests(unittest.TestCase):
    """
    The L{HTTPChannel} and L{Request} state rrlb.channel and rrlb.proxy use.
    """

    def connect(self, site: Any) -> Any:
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        # server.Site wraps its channel in _GenericHTTPChannelProtocol.
        channel = getattr(channel, "_channel", channel)
        channel.makeConnection(StringTransport())
        self.addCleanup(channel.connectionLost, Failure(ConnectionDone()))
        return channel

    def test_channel_state(self) -> None:
        """
        A connected HTTPChannel has the producer state rrlb reads and sets.
        """
        channel = self.connect(server.Site(Answer()))
        for name in _twisted.CHANNEL_STATE:
            self.assertTrue(hasattr(channel, name), name)
        self.assertIsNone(_twisted.request_producer(channel))
        self.assertIs(_twisted.network_producer(channel), channel.transport)

    def test_request_disconnected(self) -> None:
        """
        Request._disconnected turns true when the client goes away.
        """
        channel = self.connect(server.Site(Answer()))
        request = server.Request(channel)
        self.assertFalse(_twisted.client_gone(request))
        request.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(_twisted.client_gone(request))

    def test_proxy_request_attributes(self) -> None:
        """
        init_request (ProxyRequest's constructor) sets every attribute
        Twisted's constructor sets, to the same values.
        """
        site = ProxySite(Answer(), reactor=None)  # type: ignore[arg-type]
        channel = self.connect(site)
        twisted_own = server.Request(channel)
        ours = ProxyRequest(channel)
        theirs = vars(twisted_own)
        missing = set(theirs) - set(vars(ours))
        # Only read by Request.requestReceived, which ProxyRequest overrides
        # (and never calls).
        self.assertEqual(missing, {"_parsePOSTFormSubmission"})
        self.assertIsNot(ProxyRequest.requestReceived, http.Request.requestReceived)
        self.assertEqual(set(vars(ours)) - set(theirs), set())
        for name, value in vars(ours).items():
            if isinstance(value, Headers):
                self.assertEqual(list(value.getAllRawHeaders()), [], name)
                self.assertIsNot(value, theirs[name])
            else:
                self.assertEqual(value, theirs[name], name)

    def test_request_received_contract(self) -> None:
        """
        Request.requestReceived still takes (command, path, version), which
        ProxyRequest overrides.
        """
        import inspect

        parameters = list(inspect.signature(http.Request.requestReceived).parameters)
        self.assertEqual(parameters, ["self", "command", "path", "version"])


class EndpointServiceTests(unittest.TestCase):
    """
    StreamServerEndpointService's private state that rrlb.listeners uses.
    """

    def test_waiting_for_port(self) -> None:
        """
        _waitingForPort and _raiseSynchronously exist.
        """
        service = StreamServerEndpointService(None, None)
        self.assertIsNone(service._waitingForPort)
        self.assertIsNone(_twisted.port_waiting(service))
        self.assertFalse(service._raiseSynchronously)
        _twisted.bind_synchronously(service)
        self.assertIs(service._raiseSynchronously, True)


class ExitSignalTests(unittest.TestCase):
    """
    The signal twistd re-raises after the reactor stopped is the reactor's
    C{_exitSignal}.
    """

    def test_clear_exit_signal(self) -> None:
        """
        L{_twisted.clear_exit_signal} forgets SIGTERM and SIGINT only, on a
        real reactor class that has the attribute.
        """
        import signal

        from twisted.internet.base import ReactorBase

        self.assertIn("_exitSignal", vars(ReactorBase))
        self.assertIn("_exitSignal", ReactorBase.sigTerm.__code__.co_names)

        class Reactor:
            _exitSignal: object = signal.SIGTERM

        reactor = Reactor()
        _twisted.clear_exit_signal(reactor, (signal.SIGTERM, signal.SIGINT))
        self.assertIsNone(reactor._exitSignal)
        reactor._exitSignal = signal.SIGHUP
        _twisted.clear_exit_signal(reactor, (signal.SIGTERM, signal.SIGINT))
        self.assertEqual(reactor._exitSignal, signal.SIGHUP)


class ClientPoolTests(unittest.TestCase):
    """
    The private factory hook behind L{_twisted.quiet_connection_pool}.
    """

    def test_quiet_factory(self) -> None:
        """
        The pool still builds its connections' factory from C{_factory}, and
        the quiet pool's factory does not log.
        """
        from twisted.web import client

        self.assertTrue(issubclass(client.HTTPConnectionPool._factory, client._HTTP11ClientFactory))
        pool = _twisted.quiet_connection_pool(Clock(), persistent=False)
        self.assertIsInstance(pool, client.HTTPConnectionPool)
        self.assertFalse(pool.persistent)
        self.assertIs(pool._factory.noisy, False)


class SystemdTests(unittest.TestCase):
    """
    The descriptors C{systemd:} endpoints take live in
    C{_SystemdParser._sddaemon}.
    """

    def test_adopt(self) -> None:
        """
        Descriptors adopted through L{_twisted.adopt_systemd_descriptors} are
        what a C{systemd:} endpoint string finds.
        """
        from twisted.internet import endpoints
        from twisted.python.systemd import ListenFDs

        saved = _twisted.systemd_descriptors()
        self.addCleanup(_twisted.adopt_systemd_descriptors, saved)
        self.assertIsInstance(saved, ListenFDs)
        _twisted.adopt_systemd_descriptors(ListenFDs([3], ("web",)))
        self.assertEqual(endpoints._SystemdParser._sddaemon.inheritedDescriptors(), [3])
        self.assertEqual(_twisted.systemd_descriptors().inheritedNamedDescriptors(), {"web": 3})


# -- Twisted's private names used outside rrlb/_twisted.py --------------------------


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The private Twisted names used outside rrlb/_twisted.py today, by module,
# with why; they move into rrlb/_twisted.py (issue 18), and an entry that is
# no longer needed fails the test: take it out then.
ALLOWED: dict[tuple[str, str], str] = {}


def _allow(module: str, names: str, why: str) -> None:
    for name in names.split():
        ALLOWED[(module, name)] = why


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def own_private_names(tree: ast.AST) -> set[str]:
    """
    The private names code defines for itself: functions and classes,
    attributes of C{self} or C{cls} it assigns, and names it assigns.
    """
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {name for name in names if private(name)}


_inherited: dict[type, set[str]] = {}


def twisted_names_of(cls: Any) -> set[str]:
    """
    The private names the Twisted classes among C{cls}'s bases define: in
    their class dicts, or assigned to C{self} in their code.
    """
    names: set[str] = set()
    if not isinstance(cls, type):
        return names
    for base in cls.__mro__:
        if not (base.__module__ or "").startswith("twisted."):
            continue
        if base not in _inherited:
            found = {n for n in vars(base) if private(n)}
            try:
                found |= own_private_names(ast.parse(textwrap.dedent(inspect.getsource(base))))
            except (OSError, TypeError, SyntaxError):
                pass
            _inherited[base] = found
        names |= _inherited[base]
    return names


@lru_cache(maxsize=1)
def twisted_source() -> str:
    """
    The source of the installed Twisted, to tell a private name of Twisted's
    from one of another library's.
    """
    import twisted

    parts = []
    for directory, subdirectories, files in os.walk(os.path.dirname(twisted.__file__)):
        subdirectories[:] = [d for d in subdirectories if d != "test"]
        for filename in files:
            if filename.endswith(".py"):
                with open(os.path.join(directory, filename), encoding="utf-8") as f:
                    parts.append(f.read())
    return "\n".join(parts)


def in_twisted(name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", twisted_source()) is not None


def twisted_private_uses(
    tree: ast.AST, namespace: dict[str, Any], own: set[str]
) -> Iterator[tuple[int, str]]:
    """
    Where C{tree} (a module whose globals are C{namespace}) uses a private
    Twisted name, and which: an import from a private Twisted module or of a
    private name; an attribute (or C{getattr}/C{setattr}/C{hasattr} of one)
    of a name imported from Twisted; on C{self}, C{cls} or C{super()} in a
    class with Twisted bases, a private name those bases define (methods
    overridden included); on anything else, a private name that C{own} (the
    private names rrlb defines) does not have and Twisted's source does.
    """
    from_twisted = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "twisted":
            module = node.module or ""
            private_module = [p for p in module.split(".") if private(p)]
            for alias in node.names:
                from_twisted.add(alias.asname or alias.name)
                if private_module:
                    yield node.lineno, module[: module.index(private_module[0])] + private_module[0]
                elif private(alias.name):
                    yield node.lineno, f"{module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "twisted":
                    from_twisted.add((alias.asname or alias.name).split(".")[0])
                    parts = alias.name.split(".")
                    for i, part in enumerate(parts):
                        if private(part):
                            yield node.lineno, ".".join(parts[: i + 1])
                            break

    def lookup(owner: Any, name: str) -> Any:
        # A class of the module, or one nested in a class: the real thing.
        if isinstance(owner, dict):
            return owner.get(name)
        return getattr(owner, name, None) if isinstance(owner, type) else None

    def base_names(node: ast.ClassDef, owner: Any) -> set[str]:
        cls = lookup(owner, node.name)
        if not isinstance(cls, type):
            bases = []
            for base in node.bases:
                try:
                    bases.append(eval(ast.unparse(base), dict(namespace)))
                except Exception:
                    continue
            cls = type("Scanned", tuple(b for b in bases if isinstance(b, type)) or (object,), {})
        return twisted_names_of(cls)

    def attribute(node: ast.AST) -> Optional[tuple[ast.AST, str]]:
        if isinstance(node, ast.Attribute) and private(node.attr):
            return node.value, node.attr
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and private(node.args[1].value)
        ):
            return node.args[0], node.args[1].value
        return None

    def visit(
        node: ast.AST, inherited: Optional[set[str]], owner: Any
    ) -> Iterator[tuple[int, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                names = base_names(child, owner)
                for item in child.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        if item.name in names:
                            yield item.lineno, item.name
                yield from visit(child, names, lookup(owner, child.name))
                continue
            found = attribute(child)
            if found is not None:
                receiver, name = found
                mine = (isinstance(receiver, ast.Name) and receiver.id in ("self", "cls")) or (
                    isinstance(receiver, ast.Call)
                    and isinstance(receiver.func, ast.Name)
                    and receiver.func.id == "super"
                )
                if mine and inherited is not None:
                    if name in inherited:
                        yield child.lineno, name
                elif isinstance(receiver, ast.Name) and receiver.id in from_twisted:
                    yield child.lineno, name
                elif not mine and name not in own and in_twisted(name):
                    yield child.lineno, name
            # Functions keep the class they are in: self is its instance.
            yield from visit(child, inherited, owner if isinstance(owner, type) else None)

    yield from visit(tree, None, namespace)


def rrlb_modules() -> dict[str, str]:
    """
    Every rrlb module but rrlb._twisted: dotted name -> file.
    """
    found = {}
    top = os.path.join(ROOT, "rrlb")
    for directory, _, files in os.walk(top):
        for filename in files:
            if filename.endswith(".py"):
                path = os.path.join(directory, filename)
                parts = os.path.relpath(path, top)[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                name = ".".join(parts)
                if name != "_twisted":
                    found[name] = path
    return found


def scan_rrlb() -> dict[tuple[str, str], list[int]]:
    """
    (module, private Twisted name) -> the lines that use it, for every rrlb
    module but rrlb._twisted.
    """
    modules = rrlb_modules()
    trees = {}
    own: set[str] = set()
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            trees[name] = ast.parse(f.read(), path)
        own |= own_private_names(trees[name])
    found: dict[tuple[str, str], list[int]] = {}
    for name, tree in trees.items():
        module = importlib.import_module(f"rrlb.{name}" if name else "rrlb")
        for line, used in twisted_private_uses(tree, vars(module), own):
            found.setdefault((name, used), []).append(line)
    return found


SAMPLE = """
from twisted.internet import reactor
from twisted.internet.endpoints import _SystemdParser
from twisted.web import http
from twisted.web._http2 import H2Connection


class Channel(http.HTTPChannel):
    def connectionMade(self):
        self._own = 1
        self._handlingRequest = False

    def _finishRequestBody(self, data):
        return super()._finishRequestBody(data)


class Plain:
    def __init__(self):
        self._handlingRequest = 1


def stop(transport, node):
    reactor._exitSignal = 15
    _SystemdParser._sddaemon = None
    getattr(transport, "_tempDataLen", 0)
    node._own
    node._private_of_another_library
"""


class PrivateNameScanTests(unittest.TestCase):
    """
    Twisted's private names appear in rrlb._twisted only.
    """

    def test_scan_finds_each_form(self) -> None:
        """
        The scan finds a private module and a private name imported, an
        attribute of the reactor and of an imported class, an inherited
        attribute and an overridden method of a Twisted base, a getattr by
        name; not rrlb's own private names, nor another library's, nor an
        attribute of a class without Twisted bases.
        """
        namespace: dict[str, Any] = {}
        exec(compile(SAMPLE, "<sample>", "exec"), namespace)
        tree = ast.parse(SAMPLE)
        found = sorted(set(twisted_private_uses(tree, namespace, own_private_names(tree))))
        self.assertEqual(
            found,
            [
                (3, "twisted.internet.endpoints._SystemdParser"),
                (5, "twisted.web._http2"),
                (11, "_handlingRequest"),
                (13, "_finishRequestBody"),
                (14, "_finishRequestBody"),
                (23, "_exitSignal"),
                (24, "_sddaemon"),
                (25, "_tempDataLen"),
            ],
        )

    def test_only_in_twisted_module(self) -> None:
        """
        Outside rrlb/_twisted.py no rrlb module uses a private Twisted name,
        but the ones of today in L{ALLOWED}; an entry no longer needed there
        fails too.
        """
        found = scan_rrlb()
        new = [
            f"rrlb/{module.replace('.', '/')}.py:{','.join(map(str, sorted(set(lines))))}: {name}"
            for (module, name), lines in sorted(found.items())
            if (module, name) not in ALLOWED
        ]
        self.assertEqual(
            new, [], "private Twisted names outside rrlb/_twisted.py:\n" + "\n".join(new)
        )
        stale = sorted(key for key in ALLOWED if key not in found)
        self.assertEqual(stale, [], f"no longer used, remove them from ALLOWED: {stale}")
