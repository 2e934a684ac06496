"""
Tests for L{rrlb.filters} and L{rrlb.stdfilters}: a filter built from its
YAML entry (the built-in kinds and C{use:}), every mistake a one-line
L{ConfigError} naming the filter, the registry, and what a filter sees and
changes of a request. No sockets here: tests/test_actions.py runs filters
over real connections.
"""

from __future__ import annotations

import copy
import itertools
import os
import pickle
from typing import Any, Optional

from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from rrlb import filters, stdfilters
from rrlb.accesslog import format_combined
from rrlb.config import ConfigError, parse_routes
from rrlb.filterheaders import filter_headers
from rrlb.filters import (
    Answer,
    FilterContext,
    FilterKind,
    FilterRequest,
    FilterResponse,
    build_filter,
    parse_filters,
    register,
)
from rrlb.http1 import EDGE_TRUSTED, EDGE_UNTRUSTED
from rrlb.stdfilters import valid_request_id, valid_traceparent


class Channel:
    def __init__(self, edge: int = 0, scheme: bytes = b"http") -> None:
        self.edge = edge
        self.forwarded = (scheme, b"10.1.2.3")


class Peer:
    host = "10.1.2.3"


class Request:
    """
    What a filter's L{FilterRequest} reads of a proxy request.
    """

    def __init__(
        self,
        uri: bytes = b"/",
        headers: Optional[dict[bytes, list[bytes]]] = None,
        edge: int = 0,
        real_client: Optional[str] = None,
        method: bytes = b"GET",
    ) -> None:
        self.uri = uri
        self.method = method
        self.requestHeaders = Headers()
        for name, values in (headers or {}).items():
            self.requestHeaders.setRawHeaders(name, values)
        self.channel = Channel(edge)
        self.client = Peer()
        self.real_client = real_client
        self.log_notes: Optional[dict[str, str]] = None


def built(entries: list[Any], where: str = "filters") -> list[Any]:
    context = FilterContext(Clock())
    return [build_filter(spec, context) for spec in parse_filters(where, entries)]


def config_error(entries: Any, where: str = "filters") -> str:
    try:
        parse_filters(where, entries)
    except ConfigError as e:
        return str(e)
    raise AssertionError(f"no ConfigError for {entries!r}")


class ParseTests(unittest.TestCase):
    """
    Each YAML entry becomes a L{rrlb.filters.FilterSpec}; every mistake is
    one line naming the filter.
    """

    def test_builtin_kinds(self) -> None:
        """
        Every built-in kind is named by its key, and labelled by it.
        """
        specs = parse_filters(
            "filters",
            [
                {"request_headers": {"set": {"X-A": "1"}}},
                {"response_headers": {"add": {"X-B": "2"}, "remove": ["Server"]}},
                {"request_id": {}},
                {"traceparent": {}},
                {"allow": ["10.0.0.0/8"]},
                {"deny": "192.168.0.0/16, 127.0.0.1"},
            ],
        )
        self.assertEqual(
            [s.label for s in specs],
            ["request_headers", "response_headers", "request_id", "traceparent", "allow", "deny"],
        )
        self.assertEqual(specs[3].where, "filters[3]")

    def test_bad_entries(self) -> None:
        """
        A bad value of any key names the filter's place and the key.
        """
        cases = [
            ("not a list", "filters must be a list"),
            ([42], "filters[0] must be a mapping"),
            ([{"nope": {}}], "filters[0]: unknown filter 'nope'"),
            ([{"request_id": {}, "traceparent": {}}], "filters[0] must name one filter"),
            ([{"request_headers": {}}], "filters[0].request_headers must be a mapping with set"),
            ([{"request_headers": {"put": {}}}], "unknown setting filters[0].request_headers.put"),
            ([{"request_headers": {"set": []}}], "filters[0].request_headers.set must be"),
            ([{"request_headers": {"set": {"X-A": "a\r\nX-B: b"}}}], "has a CR, LF or NUL"),
            ([{"request_headers": {"set": {"Bad Name": "x"}}}], "is not a header name"),
            ([{"response_headers": {"set": {"Connection": "close"}}}], "hop-by-hop or framing"),
            ([{"response_headers": {"add": {"Transfer-Encoding": "x"}}}], "hop-by-hop or framing"),
            ([{"request_headers": {"set": {"Content-Length": "1"}}}], "hop-by-hop or framing"),
            ([{"request_headers": {"remove": "Upgrade"}}], "hop-by-hop or framing"),
            ([{"request_headers": {"remove": 3}}], "must be a list of header names"),
            ([{"request_headers": {"set": {"X-A": None}}}], "must be a str"),
            ([{"request_id": {"header": "a b"}}], "filters[0].request_id.header"),
            ([{"request_id": {"name": "x"}}], "unknown setting filters[0].request_id.name"),
            ([{"request_id": "x"}], "filters[0].request_id must be a mapping"),
            ([{"traceparent": {"x": 1}}], "unknown setting filters[0].traceparent.x"),
            ([{"allow": ["10.0.0.0/33"]}], "filters[0].allow: '10.0.0.0/33' is not a network"),
            ([{"deny": []}], "filters[0].deny must be a list of networks"),
            ([{"use": 42}], "filters[0].use must be module:callable"),
            ([{"use": "nodots"}], "filters[0] (use: nodots): cannot import it"),
            ([{"use": "tests.filterpkg:Missing"}], "has no 'Missing'"),
            ([{"use": "no_such_module_x:F"}], "No module named 'no_such_module_x'"),
            ([{"use": "tests.filterpkg:TenantFilter", "with": {"nope": 1}}], "TypeError"),
            ([{"use": "tests.filterpkg:TenantFilter", "with": [1]}], "filters[0].with must be"),
            ([{"use": "tests.filterpkg:TenantFilter", "wiht": {}}], "setting filters[0].wiht"),
            ([{"use": "tests.filterpkg:not_a_filter"}], "has no request(request) method"),
            ([{"use": "tests.filterpkg:Answers.__doc__"}], "is not callable"),
        ]
        for entries, wanted in cases:
            message = config_error(entries)
            self.assertIn(wanted, message, entries)
            self.assertNotIn("\n", message)

    def test_route_filters(self) -> None:
        """
        A route's filters are named by the route's place; a route may have
        a name, which no other route has.
        """
        routes = parse_routes(
            [{"name": "api", "pool": "a", "filters": [{"traceparent": {}}]}, {"pool": "b"}]
        )
        self.assertEqual(routes[0].name, "api")
        self.assertEqual(routes[0].filters[0].where, "routes[0].filters[0]")
        try:
            parse_routes([{"pool": "a", "filters": [{"use": "tests.filterpkg:Nope"}]}])
        except ConfigError as e:
            self.assertTrue(str(e).startswith("routes[0].filters[0] (use: tests.filterpkg:Nope)"))
        else:
            self.fail("no ConfigError")
        with self.assertRaises(ConfigError):
            parse_routes([{"name": "x", "pool": "a"}, {"name": "x", "pool": "b"}])
        with self.assertRaises(ConfigError):
            parse_routes([{"name": "a b", "pool": "a"}])

    def test_use_built_once_and_pickled_without_it(self) -> None:
        """
        A Python filter is made when the configuration is loaded (so a bad
        argument stops it); a worker process gets the entry without the
        object and makes its own.
        """
        (spec,) = parse_filters(
            "filters", [{"use": "tests.filterpkg:TenantFilter", "with": {"header": "X-T"}}]
        )
        self.assertEqual(spec.label, "tests.filterpkg:TenantFilter")
        self.assertIs(build_filter(spec, FilterContext(Clock())), spec.built)
        copy = pickle.loads(pickle.dumps(spec))
        self.assertIsNone(copy.built)
        self.assertEqual(copy, spec)
        made = build_filter(copy, FilterContext(Clock()))
        self.assertEqual(made.header, "X-T")
        self.assertIsNot(made, spec.built)

    def test_register(self) -> None:
        """
        Another module adds a kind to the registry, as an object or as
        C{module:attribute}; its parse and build get the place and context.
        """
        seen: list[Any] = []

        def parse(where: str, value: Any) -> Any:
            if not isinstance(value, int):
                raise ConfigError(f"{where} must be a number")
            return value

        def build(args: Any, context: FilterContext) -> Any:
            seen.append((args, context.route))
            return filters_module_filter()

        self.addCleanup(filters.KINDS.pop, "counting", None)
        self.addCleanup(filters.KINDS.pop, "lazy", None)
        register("counting", FilterKind(parse, build))
        register("lazy", "rrlb.stdfilters:TRACEPARENT")
        (spec, lazy) = parse_filters("filters", [{"counting": 3}, {"lazy": {}}])
        build_filter(spec, FilterContext(Clock(), route="api"))
        self.assertEqual(seen, [(3, "api")])
        self.assertIn("must be a number", config_error([{"counting": "x"}]))
        self.assertIsInstance(filters.KINDS["lazy"], FilterKind)


def filters_module_filter() -> Any:
    class Nothing:
        def request(self, request: FilterRequest) -> None:
            return None

    return Nothing()


class InterfaceTests(unittest.TestCase):
    """
    What a filter reads and changes of a request and a response.
    """

    def test_request_fields(self) -> None:
        """
        method, path (as sent), query, client (the real one) and scheme.
        """
        req = FilterRequest(Request(b"/a/../b?x=1&y", method=b"POST", real_client="1.2.3.4"))
        self.assertEqual(
            (req.method, req.path, req.query, req.client), ("POST", "/a/../b", "x=1&y", "1.2.3.4")
        )
        self.assertEqual(FilterRequest(Request(b"http://h:1?q")).path, "/")
        self.assertEqual(FilterRequest(Request(b"http://h:1?q")).query, "q")
        self.assertEqual(FilterRequest(Request(b"/")).client, "10.1.2.3")
        self.assertEqual(FilterRequest(Request(b"/")).scheme, "http")
        self.assertIsNone(FilterRequest(Request()).route)

    def test_scheme_behind_trusted_proxy(self) -> None:
        """
        Behind a trusted peer the scheme is its X-Forwarded-Proto; an
        untrusted peer's is ignored.
        """
        xfp = {b"X-Forwarded-Proto": [b"http, https"]}
        self.assertEqual(FilterRequest(Request(headers=xfp, edge=EDGE_TRUSTED)).scheme, "https")
        self.assertEqual(FilterRequest(Request(headers=xfp, edge=EDGE_UNTRUSTED)).scheme, "http")
        self.assertFalse(FilterRequest(Request(edge=EDGE_UNTRUSTED)).peer_trusted)
        self.assertTrue(FilterRequest(Request(edge=EDGE_TRUSTED)).peer_trusted)

    def test_headers(self) -> None:
        """
        get, set, add and remove with str names in any case and values;
        hop-by-hop and framing headers and CR/LF values are refused.
        """
        raw = Request(headers={b"X-A": [b"1", b"2"], b"Cookie": [b"a=1; sid=xyz"]})
        req = FilterRequest(raw)
        headers = req.headers
        self.assertEqual(headers.get("x-a"), "1, 2")
        self.assertEqual(headers.get_all("X-A"), ["1", "2"])
        self.assertIsNone(headers.get("X-None"))
        self.assertIsNone(headers.get("bad name"))
        headers.set("x-b", "3")
        headers.add("X-B", "4")
        headers.remove("X-A")
        self.assertEqual(raw.requestHeaders.getRawHeaders(b"X-B"), [b"3", b"4"])
        self.assertFalse(raw.requestHeaders.hasHeader(b"X-A"))
        self.assertEqual(req.cookie("sid"), "xyz")
        self.assertIsNone(req.cookie("nope"))
        for bad in (
            lambda: headers.set("Connection", "close"),
            lambda: headers.add("Content-Length", "1"),
            lambda: headers.remove("Transfer-Encoding"),
            lambda: headers.set("X-C", "a\r\nX-D: b"),
            lambda: headers.set("X-C", "a\nb"),
            lambda: headers.set("X-C", "a\rb"),
            lambda: headers.set("X-C", "a\0b"),
            lambda: headers.add("X-C", "a\nb"),
            lambda: headers.set("X-C", "\u2603"),
            lambda: headers.set("X C", "x"),
            lambda: headers.set("X-C", 3),  # type: ignore[arg-type]
        ):
            self.assertRaises(ValueError, bad)
        self.assertIsNone(raw.requestHeaders.getRawHeaders(b"X-C"))
        headers.set("X-C", "caf\u00e9\tok")  # Latin-1 and a tab are values a header may have
        self.assertEqual(raw.requestHeaders.getRawHeaders(b"X-C"), [b"caf\xe9\tok"])

    def test_response(self) -> None:
        """
        A response's status is read and its headers changed.
        """
        headers = Headers({b"Server": [b"node"]})
        response = FilterResponse(503, headers)
        response.headers.remove("server")
        response.headers.set("Retry-After", "5")
        self.assertEqual(response.status, 503)
        self.assertEqual(list(response.headers), [("Retry-After", "5")])

    def test_response_copied(self) -> None:
        """
        A L{FilterResponse} copies and pickles as it did before it was a
        pair: a filter may keep one (C{copy.copy}, C{copy.deepcopy}).
        """
        response = FilterResponse(503, Headers({b"Server": [b"node"]}))
        for copied in (
            copy.copy(response),
            copy.deepcopy(response),
            pickle.loads(pickle.dumps(response)),
        ):
            self.assertEqual(copied.status, 503)
            self.assertEqual(copied.headers.get("server"), "node")

    def test_note(self) -> None:
        """
        note() adds a field to the access log line; names are a-z and _.
        """
        raw = Request()
        FilterRequest(raw).note("tenant", "blue")
        self.assertEqual(raw.log_notes, {"tenant": "blue"})
        self.assertRaises(ValueError, FilterRequest(raw).note, "Bad-Name", "x")

    def test_note_in_combined_line(self) -> None:
        """
        Notes reach the combined line as C{name=value}, in the order added:
        plain values as they are (made as they are noted), and any value
        with a space, quote, backslash, control or non-ASCII character
        escaped, so that no note can add or break a field; a name noted
        again keeps its last value, once.
        """

        class Lying(str):
            def isalnum(self) -> bool:
                return True

        entry = (0.0, "192.0.2.7", b"GET", b"/", b"HTTP/1.1", 200, 0, None, None, None, None)
        entry += (None,)

        def line(*notes: tuple[str, str]) -> str:
            raw = Request()
            view = FilterRequest(raw)
            for name, value in notes:
                view.note(name, value)
            return format_combined((*entry, None, raw.log_notes)).decode()  # type: ignore[arg-type]

        uuid = "0af76519-16cd-43dd-8448-eb211c80319c"
        self.assertTrue(
            line(("request_id", "ab12"), ("trace_id", uuid)).endswith(
                f" upstream_time=- request_id=ab12 trace_id={uuid}\n"
            )
        )
        for value, written in (
            ('a b" request_id=forged', "a\\x20b\\x22\\x20request_id=forged"),
            ("back\\slash", "back\\x5Cslash"),
            ("caf\u00e9", "caf\\xC3\\xA9"),
            ("x\r\ny", "x\\x0D\\x0Ay"),
            (Lying("a b"), "a\\x20b"),
        ):
            got = line(("tenant", value), ("request_id", "abc"))
            self.assertTrue(got.endswith(f" tenant={written} request_id=abc\n"), got)
            self.assertEqual(got.count(" request_id="), 1)
            self.assertEqual(got.count("\n"), 1)
        got = line(("request_id", "one"), ("tenant", "t"), ("request_id", "two"))
        self.assertTrue(got.endswith(" request_id=two tenant=t\n"), got)

    def test_answer(self) -> None:
        """
        An Answer has a status, a body and headers, each with a default.
        """
        answer = Answer(204)
        self.assertEqual((answer.status, answer.body, answer.headers), (204, b"", {}))


class BuiltinTests(unittest.TestCase):
    """
    The built-in filters, on stand-in requests.
    """

    def test_header_rules(self) -> None:
        """
        request_headers removes, then sets, then adds; response_headers does
        the same to a response.
        """
        rules = {"remove": ["X-Old"], "set": {"X-Set": "a", "X-Num": 5}, "add": {"X-Add": "b"}}
        req_filter, resp_filter = built([{"request_headers": rules}, {"response_headers": rules}])
        raw = Request(headers={b"X-Old": [b"1"], b"X-Add": [b"a"], b"X-Set": [b"z"]})
        req_filter.request(FilterRequest(raw))
        self.assertEqual(
            sorted(filter_headers(raw.requestHeaders)),
            [("X-Add", "a"), ("X-Add", "b"), ("X-Num", "5"), ("X-Set", "a")],
        )
        headers = Headers({b"X-Old": [b"x"]})
        self.assertIsNone(resp_filter.request(FilterRequest(Request())))
        resp_filter.response(FilterRequest(Request()), FilterResponse(200, headers))
        self.assertFalse(headers.hasHeader(b"X-Old"))
        self.assertEqual(headers.getRawHeaders(b"X-Set"), [b"a"])

    def test_request_id(self) -> None:
        """
        A request without an ID gets 32 hex characters; a valid one is kept;
        an invalid one, or any from an untrusted peer, is replaced; it is
        noted for the access log and comes back on the response.
        """
        (rid,) = built([{"request_id": {}}])
        raw = Request()
        req = FilterRequest(raw)
        rid.request(req)
        new = req.headers.get("X-Request-Id")
        assert new is not None
        self.assertRegex(new, "^[0-9a-f]{32}$")
        self.assertEqual(raw.log_notes, {"request_id": new})
        headers = Headers()
        rid.response(req, FilterResponse(200, headers))
        self.assertEqual(headers.getRawHeaders(b"X-Request-Id"), [new.encode()])
        kept = Request(headers={b"X-Request-Id": [b"abc-123"]})
        rid.request(FilterRequest(kept))
        self.assertEqual(kept.log_notes, {"request_id": "abc-123"})
        for bad in (b"a b", b"x" * 201, b"caf\xe9"):
            replaced = Request(headers={b"X-Request-Id": [bad]})
            rid.request(FilterRequest(replaced))
            assert replaced.log_notes is not None
            self.assertRegex(replaced.log_notes["request_id"], "^[0-9a-f]{32}$")
        untrusted = Request(headers={b"X-Request-Id": [b"abc"]}, edge=EDGE_UNTRUSTED)
        rid.request(FilterRequest(untrusted))
        self.assertNotEqual(untrusted.log_notes, {"request_id": "abc"})
        (other,) = built([{"request_id": {"header": "X-Trace"}}])
        raw = Request()
        other.request(FilterRequest(raw))
        self.assertTrue(raw.requestHeaders.hasHeader(b"X-Trace"))
        self.assertTrue(valid_request_id("x" * 200))
        self.assertFalse(valid_request_id(""))

    def test_traceparent(self) -> None:
        """
        A valid traceparent passes unchanged; any other is replaced by a
        new one with flags 00; the trace-id is noted.
        """
        (tp,) = built([{"traceparent": {}}])
        good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        raw = Request(headers={b"Traceparent": [good.encode()]})
        tp.request(FilterRequest(raw))
        self.assertEqual(raw.requestHeaders.getRawHeaders(b"Traceparent"), [good.encode()])
        self.assertEqual(raw.log_notes, {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"})
        for bad in (None, b"junk", good.upper().encode(), b"00-" + b"0" * 32 + good[35:].encode()):
            raw = Request(headers={b"Traceparent": [bad]} if bad else {})
            tp.request(FilterRequest(raw))
            value = raw.requestHeaders.getRawHeaders(b"Traceparent")[0].decode()
            self.assertRegex(value, "^00-[0-9a-f]{32}-[0-9a-f]{16}-00$")
            self.assertNotEqual(value, good)
        self.assertTrue(valid_traceparent("01-" + good[3:] + "-more"))
        self.assertFalse(valid_traceparent(good + "-more"))
        self.assertFalse(valid_traceparent("ff" + good[2:]))
        self.assertFalse(valid_traceparent(good[:36] + "0" * 16 + "-01"))

    def test_traceparent_ids_never_zero(self) -> None:
        """
        A new traceparent never has an all-zero trace-id or parent-id (W3C:
        not an ID): a draw with either is skipped.
        """
        good = "4bf92f3577b34da6a3ce929d0e0e4736" + "00f067aa0ba902b7"
        draws = iter(["0" * 32 + "00f067aa0ba902b7", "4bf92f3577b34da6a3ce929d0e0e4736" + "0" * 16])
        self.patch(stdfilters, "_trace_ids", itertools.chain(draws, itertools.repeat(good)))
        (tp,) = built([{"traceparent": {}}])
        raw = Request()
        tp.request(FilterRequest(raw))
        self.assertEqual(
            raw.requestHeaders.getRawHeaders(b"Traceparent"),
            [b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"],
        )

    def test_ids_after_fork(self) -> None:
        """
        A forked worker draws request IDs of its own, not the rest of the
        block its parent read ahead.
        """
        (rid,) = built([{"request_id": {}}])
        rid.request(FilterRequest(Request()))  # the parent has a block read ahead
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            try:
                raw = Request()
                rid.request(FilterRequest(raw))
                os.write(write, raw.log_notes["request_id"].encode())  # type: ignore[index]
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        child = os.read(read, 100).decode()
        raw = Request()
        rid.request(FilterRequest(raw))
        self.assertRegex(child, "^[0-9a-f]{32}$")
        self.assertNotEqual(child, raw.log_notes["request_id"])  # type: ignore[index]

    def test_allow_deny(self) -> None:
        """
        allow answers 403 outside its networks, deny inside them; IPv4
        clients written as IPv6-mapped addresses count as IPv4.
        """
        allow, deny = built([{"allow": ["10.0.0.0/8", "::1"]}, {"deny": ["10.9.0.0/16"]}])
        verdicts = {
            client: (
                allow.request(FilterRequest(Request(real_client=client))),
                deny.request(FilterRequest(Request(real_client=client))),
            )
            for client in ("10.1.1.1", "10.9.1.1", "192.168.1.1", "::ffff:10.1.1.1", "::1", "x")
        }
        self.assertIsNone(verdicts["10.1.1.1"][0])
        self.assertIsNone(verdicts["10.1.1.1"][1])
        self.assertEqual(verdicts["10.9.1.1"][1].status, 403)
        self.assertEqual(verdicts["192.168.1.1"][0].status, 403)
        self.assertIsNone(verdicts["::ffff:10.1.1.1"][0])
        self.assertIsNone(verdicts["::1"][0])
        self.assertEqual(verdicts["x"][0].status, 403)
        self.assertIsNone(verdicts["x"][1])
