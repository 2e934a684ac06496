"""
Tests for L{rrlb.routes}: host, path prefix, method and header conditions,
first match wins, the default route, prefix stripping and path
normalization. No sockets: requests are small stand-ins.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.trial import unittest

from rrlb.routes import Route, Router, normalize_host, normalize_path
from tests.support import FakeRequest


def request(
    uri: bytes = b"/",
    host: Optional[bytes] = b"example.com",
    method: bytes = b"GET",
    **headers: Any,
) -> FakeRequest:
    raw: dict[bytes, list[bytes]] = {}
    if host is not None:
        raw[b"Host"] = [host]
    for name, value in headers.items():
        raw[name.replace("_", "-").title().encode("ascii")] = [value]
    r = FakeRequest(uri=uri, headers=raw)
    r.method = method
    return r


def router(*routes: Route[str]) -> Router[str]:
    return Router(list(routes))


def target(r: Router[str], req: FakeRequest) -> Optional[str]:
    route = r.match(req)
    return None if route is None else route.target


class HostTests(unittest.TestCase):
    """
    host: exact or one-label wildcard, without port, any case.
    """

    def test_exact(self) -> None:
        """
        The Host header's host, without its port and in any case, must
        equal the route's.
        """
        r = router(Route("api", host="api.example.com"))
        self.assertEqual(target(r, request(host=b"api.example.com")), "api")
        self.assertEqual(target(r, request(host=b"API.Example.COM:8080")), "api")
        self.assertEqual(target(r, request(host=b"api.example.com.")), "api")
        self.assertIsNone(target(r, request(host=b"www.example.com")))
        self.assertIsNone(target(r, request(host=None)))

    def test_wildcard_one_label(self) -> None:
        """
        *.example.com matches exactly one more label.
        """
        r = router(Route("w", host="*.example.com"))
        self.assertEqual(target(r, request(host=b"a.example.com")), "w")
        self.assertEqual(target(r, request(host=b"B.EXAMPLE.com:443")), "w")
        self.assertIsNone(target(r, request(host=b"example.com")))
        self.assertIsNone(target(r, request(host=b"a.b.example.com")))
        self.assertIsNone(target(r, request(host=b"aexample.com")))

    def test_absolute_form(self) -> None:
        """
        An absolute-form target's authority is the host (and wins over Host).
        """
        r = router(Route("api", host="api.example.com"))
        req = request(uri=b"http://api.example.com:81/x", host=b"other")
        self.assertEqual(target(r, req), "api")

    def test_ipv6(self) -> None:
        """
        A bracketed IPv6 literal keeps its brackets and loses its port.
        """
        self.assertEqual(normalize_host(b"[::1]:8080"), b"[::1]")
        self.assertEqual(normalize_host(b"[::1]"), b"[::1]")


class PathTests(unittest.TestCase):
    """
    path_prefix: whole segments of the normalized path.
    """

    def test_segments(self) -> None:
        """
        /static/ and /static match /static and /static/...; not /staticx.
        """
        for prefix in ("/static/", "/static"):
            r = router(Route("s", path_prefix=prefix))
            self.assertEqual(target(r, request(b"/static")), "s")
            self.assertEqual(target(r, request(b"/static/")), "s")
            self.assertEqual(target(r, request(b"/static/a/b?x=1")), "s")
            self.assertEqual(target(r, request(b"/static?x")), "s")
            self.assertIsNone(target(r, request(b"/staticx")))
            self.assertIsNone(target(r, request(b"/")))

    def test_normalized(self) -> None:
        """
        Encoded unreserved characters and dot segments cannot dodge (or
        fake) a prefix; an encoded slash is not a segment boundary.
        """
        r = router(Route("s", path_prefix="/static"), Route("other"))
        self.assertEqual(target(r, request(b"/st%61tic/x")), "s")
        self.assertEqual(target(r, request(b"/static/../admin")), "other")
        self.assertEqual(target(r, request(b"/x/../static/a")), "s")
        self.assertEqual(target(r, request(b"/static%2Fa")), "other")
        self.assertEqual(normalize_path(b"/a/./b/../c/"), b"/a/c/")
        self.assertEqual(normalize_path(b"/a/%7e%2f%20"), b"/a/~%2F%20")
        self.assertEqual(normalize_path(b"/a/.."), b"/")

    def test_absolute_form_path(self) -> None:
        """
        The path of an absolute-form target is matched.
        """
        r = router(Route("s", path_prefix="/static"))
        self.assertEqual(target(r, request(b"http://h/static/a")), "s")
        self.assertIsNone(target(r, request(b"http://h")))

    def test_strip(self) -> None:
        """
        strip_prefix removes the matched prefix and keeps the query.
        """
        route: Route[str] = Route("s", path_prefix="/static/", strip_prefix=True)
        self.assertTrue(route.strip_prefix)
        self.assertEqual(route.strip(b"/static/a/b?x=1"), b"/a/b?x=1")
        self.assertEqual(route.strip(b"/static"), b"/")
        self.assertEqual(route.strip(b"/static?x"), b"/?x")
        self.assertEqual(route.strip(b"/st%61tic/a%20b"), b"/a%20b")
        # "/" as a prefix strips nothing.
        self.assertFalse(Route("r", path_prefix="/", strip_prefix=True).strip_prefix)


class OtherConditionTests(unittest.TestCase):
    """
    methods, header, the default route and the order of routes.
    """

    def test_methods(self) -> None:
        """
        A route with methods matches only those.
        """
        r = router(Route("w", methods=["POST", "PUT"]))
        self.assertEqual(target(r, request(method=b"POST")), "w")
        self.assertIsNone(target(r, request(method=b"GET")))

    def test_header_exact(self) -> None:
        """
        A header condition needs that exact value (name in any case).
        """
        r = router(Route("canary", header=[("x-canary", "1")]))
        self.assertEqual(target(r, request(x_canary=b"1")), "canary")
        self.assertIsNone(target(r, request(x_canary=b"10")))
        self.assertIsNone(target(r, request()))

    def test_all_conditions(self) -> None:
        """
        Every condition of a route must hold.
        """
        r = router(Route("a", host="api.example.com", path_prefix="/v1", methods=["GET"]))
        self.assertEqual(target(r, request(b"/v1/x", host=b"api.example.com")), "a")
        self.assertIsNone(target(r, request(b"/v2/x", host=b"api.example.com")))
        self.assertIsNone(target(r, request(b"/v1/x", host=b"example.com")))
        self.assertIsNone(target(r, request(b"/v1/x", host=b"api.example.com", method=b"PUT")))

    def test_first_match_and_default(self) -> None:
        """
        The first matching route wins; a route without conditions matches
        everything; without one an unmatched request matches nothing.
        """
        r = router(
            Route("api", host="api.example.com"),
            Route("static", path_prefix="/static/"),
            Route("api2", header=[("X-Canary", "1")]),
            Route("default"),
            Route("never"),
        )
        self.assertEqual(target(r, request(b"/static/x", host=b"api.example.com")), "api")
        self.assertEqual(target(r, request(b"/static/x")), "static")
        self.assertEqual(target(r, request(b"/x", x_canary=b"1")), "api2")
        self.assertEqual(target(r, request(b"/x")), "default")
        self.assertIsNone(target(router(Route("a", host="a")), request(b"/x")))

    def test_host_cache_bounded(self) -> None:
        """
        The cache of normalized hosts stops growing at its size.
        """
        r = router(Route("a", host="a"))
        for i in range(2000):
            r.match(request(host=b"h%d" % i))
        self.assertLessEqual(len(r._hosts), 512)
