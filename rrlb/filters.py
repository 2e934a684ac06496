# -*- test-case-name: tests.test_filters -*-
"""
Filters: the public interface a filter is written against, how a filter is
built from its YAML entry, and the registry of filter kinds.

A filter is any object with C{request(request)}, and optionally
C{response(request, response)} and C{done(request)}:

  - C{request(request)} gets a L{FilterRequest} and returns L{None} to go
    on, an L{Answer} to answer the client at once, or a Deferred of either.
  - C{response(request, response)} gets the same L{FilterRequest} and a
    L{FilterResponse}, for every response rrlb sends for that request (a
    node's, rrlb's own errors, redirects, fixed answers and any L{Answer}).
  - C{done(request)} is called once when the request has ended, however it
    ended (response sent, client gone), for every filter whose C{request}
    ran.

A YAML entry names its kind: C{- request_id: {header: X-Request-Id}}, or
C{- use: package.module:callable} with C{with: {keyword: value}} for a filter
written in Python. Each kind is a L{FilterKind} in L{KINDS}: its C{parse}
checks the YAML value when the configuration is loaded (every mistake a
one-line L{ConfigError} naming the filter), and its C{build} makes the
filter object from what C{parse} returned, with the L{FilterContext} of the
process that serves it. A module adds a kind with L{register}; a kind may
also be named by C{"module:attribute"} and is imported on first use.

The headers a filter sees and changes are L{FilterHeaders}, defined with
the checks on every header a filter writes in L{rrlb.filterheaders}.

Pure: no reactor, no I/O; the filters built here are plain objects the
proxy calls (L{rrlb.chain} runs them).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Callable, Mapping, Optional, Protocol, Union

from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers

from rrlb._twisted import raw_headers
from rrlb.filterheaders import FilterHeaders, filter_headers
from rrlb.http1 import EDGE_TRUSTED, EDGE_UNTRUSTED
from rrlb.values import ConfigError

__all__ = [
    "Answer",
    "FilterContext",
    "FilterHeaders",
    "FilterKind",
    "FilterRequest",
    "FilterResponse",
    "FilterSpec",
    "KINDS",
    "build_filter",
    "parse_filters",
    "register",
]


# -- what a filter sees ----------------------------------------------------------


class FilterRequest:
    """
    A request as filters see it.

    @ivar method: the method, as sent (C{"GET"}).
    @ivar client: the real client's address (behind C{--trusted-proxies}, the
        one they vouch for).
    @ivar route: the matched route's C{name:}, else its 0-based index; L{None}
        in top-level filters, which run before routes are matched.
    @ivar headers: the request headers (L{FilterHeaders}).
    @ivar pool: set to a pool's name to send the request there.
    @ivar peer_trusted: whether what the peer says of the client may be
        believed: C{--trusted-proxies} is unset, or the peer is one of them.
    """

    __slots__ = ("raw", "route", "headers", "pool", "_path")

    def __init__(self, raw: Any) -> None:
        #: The L{rrlb.proxy.ProxyRequest} (not part of the interface).
        self.raw = raw
        self.route: Union[str, int, None] = None
        headers = raw.requestHeaders
        # (Always one, but for requests made by hand: tests.)
        self.headers = headers if headers.__class__ is FilterHeaders else filter_headers(headers)
        self.pool: Optional[str] = None
        self._path: Optional[tuple[str, str]] = None

    # Read from the request when asked: most filters read one or two of them.

    @property
    def method(self) -> str:
        return str(self.raw.method.decode("latin-1"))

    @property
    def client(self) -> str:
        raw = self.raw
        real: Optional[str] = raw.real_client
        if real is not None:
            return real
        host = getattr(raw.client, "host", None)
        return host if type(host) is str else ""

    @property
    def peer_trusted(self) -> bool:
        return bool(getattr(self.raw.channel, "edge", 0) != EDGE_UNTRUSTED)

    def _split(self) -> tuple[str, str]:
        parts = self._path
        if parts is None:
            uri = self.raw.uri
            if uri[:1] != b"/":
                rest = uri.partition(b"://")[2]
                cut = len(rest)
                for sep in (b"/", b"?"):
                    i = rest.find(sep)
                    if 0 <= i < cut:
                        cut = i
                uri = rest[cut:]
                if not uri.startswith(b"/"):
                    uri = b"/" + uri
            path, _, query = uri.partition(b"?")
            parts = self._path = (path.decode("latin-1"), query.decode("latin-1"))
        return parts

    @property
    def path(self) -> str:
        """
        The path as the client sent it (before C{strip_prefix}), without the
        query string.
        """
        return self._split()[0]

    @property
    def query(self) -> str:
        """
        The raw query string, without its C{?} (C{""} without one).
        """
        return self._split()[1]

    @property
    def scheme(self) -> str:
        """
        C{http} or C{https}: what the client used to reach rrlb (behind
        C{--trusted-proxies}, the trusted C{X-Forwarded-Proto}).
        """
        return request_scheme(self.raw).decode("ascii")

    def cookie(self, name: str) -> Optional[str]:
        """
        The value of the request's cookie C{name}, or L{None}.
        """
        return request_cookie(self.raw, name)

    def note(self, name: str, value: str) -> None:
        """
        Add C{name=value} to the request's access log line (a key of the
        JSON line). C{name} is lower-case letters and C{_}.
        """
        try:
            prefix = _NOTE_PREFIXES[name] if type(value) is str else None
        except (KeyError, TypeError):  # a new name, or an unhashable one
            prefix = None
        if prefix is None:
            if not isinstance(name, str) or not name or not set(name) <= _NOTE_NAME:
                raise ValueError(f"a log field is a name of a-z and _, not {name!r}")
            if name in ACCESS_LOG_FIELDS:
                raise ValueError(f"{name} is a field the access log writes itself")
            if not isinstance(value, str):
                raise ValueError(f"the value of log field {name} must be a str, not {value!r}")
            # A str subclass's own isalnum or __str__ is not asked below.
            value = str.__str__(value)
            prefix = b" %s=" % name.encode("ascii")
            if len(_NOTE_PREFIXES) < _NOTES_SIZE:
                _NOTE_PREFIXES[str(name)] = prefix
        raw = self.raw
        notes = raw.log_notes
        if notes is None:
            notes = raw.log_notes = LogNotes()
            line: Optional[bytes] = b""
        else:
            line = notes.line if name not in notes else None
        notes[name] = value
        if line is not None:
            if value.isascii():
                raw_value = value.encode("ascii")
                # Letters and digits (hex IDs) at C speed, else the regex.
                if raw_value.isalnum() or _PLAIN_VALUE.fullmatch(raw_value):
                    line += prefix + raw_value
                else:
                    line = None
            else:
                line = None
        notes.line = line


class LogNotes(dict[str, str]):
    """
    The fields filters added to a request's access log line (name -> value),
    and, while no value needs escaping and no name came twice, those fields
    as they end a combined line (C{line}: C{b" name=value"} each), made as
    they are added; L{None} has the access log make them from the dict.
    """

    __slots__ = ("line",)

    line: Optional[bytes]


def request_cookie(request: Any, name: str) -> Optional[str]:
    """
    The value of C{request}'s cookie C{name}, or L{None}.
    """
    wanted = name.encode("latin-1", "replace")
    for line in raw_headers(request.requestHeaders).get(b"Cookie", ()):
        for pair in line.split(b";"):
            key, sep, value = pair.strip().partition(b"=")
            if sep and key == wanted:
                return value.decode("latin-1")
    return None


_NOTE_NAME = frozenset("abcdefghijklmnopqrstuvwxyz_")
# The fields rrlb.accesslog writes itself (combined and JSON), which no note
# may be named: a line never carries a field twice.
ACCESS_LOG_FIELDS = frozenset(
    {
        "time",
        "remote_addr",
        "method",
        "uri",
        "protocol",
        "status",
        "bytes",
        "referer",
        "user_agent",
        "node",
        "upstream_status",
        "upstream_time",
        "tunnel_bytes_to_node",
        "tunnel_bytes_to_client",
        "tunnel_time",
        "client_cert_subject",
    }
)
# Log field names filters used (checked once each) -> b" name=", at most
# _NOTES_SIZE of them.
_NOTE_PREFIXES: dict[str, bytes] = {}
_NOTES_SIZE = 1024
# A value that goes into a combined line as it is: visible ASCII but for the
# quote and backslash (rrlb.accesslog's escaping leaves these alone).
_PLAIN_VALUE = re.compile(rb"[!#-\[\]-~]*")


def request_scheme(request: Any) -> bytes:
    """
    C{b"http"} or C{b"https"}: what the client of C{request} used to reach
    rrlb, or behind C{--trusted-proxies} what the trusted peer says it
    used (the last C{X-Forwarded-Proto} value).
    """
    channel = request.channel
    scheme: bytes = channel.forwarded[0]
    if getattr(channel, "edge", 0) == EDGE_TRUSTED:
        claimed = raw_headers(request.requestHeaders).get(b"X-Forwarded-Proto")
        if claimed:
            last = claimed[-1].rpartition(b",")[2].strip().lower()
            if last in (b"http", b"https"):
                return last
    return scheme


class FilterResponse(tuple[int, FilterHeaders]):
    """
    A response as filters see it: its C{status} (read it) and its
    C{headers} (L{FilterHeaders}, change them).

    A pair: L{rrlb.chain} makes one per response head as a tuple (no
    constructor of its own to run); C{FilterResponse(status, headers)}
    makes one by hand.
    """

    __slots__ = ()

    status: int = property(itemgetter(0))  # type: ignore[assignment]
    headers: FilterHeaders = property(itemgetter(1))  # type: ignore[assignment]

    def __new__(cls, status: int, headers: Headers) -> FilterResponse:
        if headers.__class__ is not FilterHeaders:
            headers = filter_headers(headers)
        return tuple.__new__(cls, (status, headers))

    def __getnewargs__(self) -> tuple[int, FilterHeaders]:
        # What copy and pickle pass __new__ (a tuple's would be one pair).
        return (self[0], self[1])

    def __repr__(self) -> str:
        return f"FilterResponse({self[0]!r})"


class Answer:
    """
    What a filter returns to answer the client itself: a status (200 to
    599), a body (bytes, or a str sent as UTF-8) and headers (C{str} names
    and values; C{Content-Type} is C{text/plain; charset=utf-8} unless
    given, when there is a body).
    """

    __slots__ = ("status", "body", "headers")

    def __init__(
        self,
        status: int,
        body: Union[bytes, str] = b"",
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers or {}

    def __repr__(self) -> str:
        return f"Answer({self.status!r}, {len(self.body)} bytes)"


# -- building filters from YAML ----------------------------------------------------


class Filter(Protocol):
    """
    What C{request} of a filter looks like (C{response} and C{done} are
    optional).
    """

    def request(self, request: FilterRequest) -> Union[None, Answer, Deferred[Any]]: ...


@dataclass
class FilterContext:
    """
    What a kind's C{build} gets besides the parsed YAML value.

    @ivar reactor: the reactor of the process serving the filter.
    @ivar where: the filter's place in the configuration (C{filters[0]},
        C{routes[2].filters[1]}), for messages.
    @ivar route: the route's name, else its index; L{None} at the top level.
    @ivar metrics: the process's L{rrlb.metrics.Metrics} (L{None} in tests
        that need none).
    @ivar shared: state kept for the life of the process across reloads,
        one entry per kind that wants one (C{shared.setdefault(kind, ...)}),
        e.g. a rate-limit store or the link to the main process.
    """

    reactor: Any
    where: str = "filters[0]"
    route: Union[str, int, None] = None
    metrics: Any = None
    shared: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FilterKind:
    """
    One kind of filter.

    @ivar parse: C{(where, YAML value) -> args}, when the configuration is
        loaded: raises L{ConfigError} naming C{where} for a bad value. The
        args travel to worker processes pickled: plain values or frozen
        dataclasses of a module.
    @ivar build: C{(args, context) -> filter}, in each process that serves it.
    """

    parse: Callable[[str, Any], Any]
    build: Callable[[Any, FilterContext], Any]


@dataclass(frozen=True)
class FilterSpec:
    """
    One entry of a C{filters:} list, parsed.

    @ivar kind: its kind's name in L{KINDS} (C{use} for a Python filter).
    @ivar label: its name in C{rrlb_filter_errors_total} and in log
        messages: the kind, or the C{use:} string.
    @ivar where: its place, C{routes[2].filters[1]}.
    @ivar args: what its kind's C{parse} returned.
    @ivar built: a Python filter's object, made when the configuration was
        loaded (not pickled: a worker process makes its own).
    @ivar entry: the entry as the file gave it, which C{--print-config}
        writes back (L{rrlb.configdump}; not pickled either).
    """

    kind: str
    label: str
    where: str
    args: Any = None
    built: Any = field(default=None, compare=False, repr=False)
    entry: Any = field(default=None, compare=False, repr=False)

    def __reduce__(self) -> Any:
        return (FilterSpec, (self.kind, self.label, self.where, self.args))


KINDS: dict[str, Union[FilterKind, str]] = {}


def register(name: str, kind: Union[FilterKind, str]) -> None:
    """
    Make C{name} a kind of filter YAML can name (C{- name: VALUE}): a
    L{FilterKind}, or C{"module:attribute"} naming one, imported when a
    configuration first uses it.
    """
    KINDS[name] = kind


def kind_of(name: str) -> FilterKind:
    """
    The L{FilterKind} registered as C{name}.

    @raise KeyError: none is.
    """
    kind = KINDS[name]
    if isinstance(kind, str):
        kind = KINDS[name] = import_name(kind)
    return kind


def import_name(use: str) -> Any:
    """
    The object C{"package.module:name"} names.

    @raise ImportError: the module cannot be imported, or has no such name.
    @raise ValueError: C{use} is not of that form.
    """
    module_name, sep, attribute = use.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{use!r} must be module:callable, like mycompany.edge:TenantFilter")
    module = importlib.import_module(module_name)
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ImportError(f"module {module_name!r} has no {attribute!r}") from None
    return value


def parse_filters(where: str, value: Any) -> tuple[FilterSpec, ...]:
    """
    A C{filters:} list; C{where} is its place (C{filters},
    C{routes[2].filters}).
    """
    if not isinstance(value, list):
        raise ConfigError(
            f"{where} must be a list of filters like - request_id: {{}}, not {value!r}"
        )
    return tuple(
        dataclasses.replace(parse_filter(f"{where}[{i}]", item), entry=item)
        for i, item in enumerate(value)
    )


def parse_filter(where: str, item: Any) -> FilterSpec:
    """
    One entry of a C{filters:} list.
    """
    if isinstance(item, str):
        item = {item: None}
    if not isinstance(item, dict) or not item:
        raise ConfigError(f"{where} must be a mapping like request_id: {{}}, not {item!r}")
    if "use" in item:
        unknown = sorted(str(k) for k in item if k not in ("use", "with"))
        if unknown:
            raise ConfigError(f"unknown setting {where}.{unknown[0]} (known: use, with)")
        return parse_use(where, item["use"], item.get("with"))
    if len(item) != 1:
        raise ConfigError(
            f"{where} must name one filter, not {', '.join(sorted(map(str, item)))}"
            " (one list entry per filter)"
        )
    ((name, value),) = item.items()
    try:
        kind = kind_of(name)
    except KeyError:
        known = ", ".join(sorted(list(KINDS) + ["use"]))
        raise ConfigError(f"{where}: unknown filter {name!r} (known: {known})") from None
    except Exception as e:
        raise ConfigError(f"{where} ({name}): cannot load the filter kind: {_why(e)}") from None
    return FilterSpec(name, name, where, kind.parse(f"{where}.{name}", value))


def _why(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def parse_use(where: str, use: Any, keywords: Any) -> FilterSpec:
    """
    A filter written in Python: C{use: module:callable}, C{with: {...}}.
    The callable is imported and called now, so that an import error or a
    bad argument stops a start or a reload.
    """
    if not isinstance(use, str) or not use.strip():
        raise ConfigError(f"{where}.use must be module:callable, not {use!r}")
    use = use.strip()
    if keywords is None:
        keywords = {}
    if not isinstance(keywords, dict) or not all(
        isinstance(k, str) and k.isidentifier() for k in keywords
    ):
        raise ConfigError(f"{where}.with must be a mapping of keyword arguments, not {keywords!r}")
    try:
        factory = import_name(use)
    except Exception as e:
        raise ConfigError(f"{where} (use: {use}): cannot import it: {_why(e)}") from None
    if not callable(factory):
        raise ConfigError(f"{where} (use: {use}): {factory!r} is not callable")
    built = make_use(where, use, factory, keywords)
    return FilterSpec("use", use, where, (use, dict(keywords)), built)


def make_use(where: str, use: str, factory: Any, keywords: Mapping[str, Any]) -> Any:
    """
    C{factory(**keywords)}, checked to be a filter.

    @raise ConfigError: it raised, or what it returned has no C{request}.
    """
    try:
        built = factory(**keywords)
    except Exception as e:
        raise ConfigError(f"{where} (use: {use}): {_why(e)}") from None
    if not callable(getattr(built, "request", None)):
        raise ConfigError(
            f"{where} (use: {use}): it returned {type(built).__name__}, which has no"
            " request(request) method"
        )
    for optional in ("response", "done"):
        method = getattr(built, optional, None)
        if method is not None and not callable(method):
            raise ConfigError(f"{where} (use: {use}): its {optional} is not a method")
    return built


def build_filter(spec: FilterSpec, context: FilterContext) -> Any:
    """
    The filter object of C{spec}, for the process of C{context}.

    @raise ConfigError: it cannot be built here.
    """
    if spec.kind == "use":
        if spec.built is not None:
            return spec.built
        use, keywords = spec.args
        try:
            factory = import_name(use)
        except Exception as e:
            raise ConfigError(f"{spec.where} (use: {use}): cannot import it: {_why(e)}") from None
        return make_use(spec.where, use, factory, keywords)
    try:
        return kind_of(spec.kind).build(spec.args, context)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{spec.where} ({spec.label}): {_why(e)}") from None


# The built-in kinds (rrlb.stdfilters), imported when a configuration first
# names one of them.
for _name in ("request_headers", "response_headers", "request_id", "traceparent", "allow", "deny"):
    register(_name, f"rrlb.stdfilters:{_name.upper()}")

# The rate limits (rrlb.limits, issue 20).
register("rate_limit", "rrlb.limits:RATE_LIMIT")
register("limit_in_flight", "rrlb.limits:LIMIT_IN_FLIGHT")
