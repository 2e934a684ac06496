"""
A package of filters written in Python, as a user's would be, for the tests
of C{use:} filters (tests/test_filters.py, tests/test_actions.py): one that
answers, one that rewrites, one that re-pools, and ones that fail.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer

from rrlb.filters import Answer, FilterRequest, FilterResponse


class TenantFilter:
    """
    Sends a request to the pool its tenant header names; answers 400 without
    one.
    """

    def __init__(self, header: str = "X-Tenant", pools: Optional[dict[str, str]] = None) -> None:
        self.header = header
        self.pools = pools or {}

    def request(self, request: FilterRequest) -> Optional[Answer]:
        tenant = request.headers.get(self.header)
        if tenant is None:
            return Answer(400, b"no tenant\n", {"X-Why": "tenant"})
        pool = self.pools.get(tenant)
        if pool is not None:
            request.pool = pool
        return None


class Rewrite:
    """
    Sets a request header (with what it saw of the request) and a response
    header (with the response's status).
    """

    def request(self, request: FilterRequest) -> None:
        request.headers.set(
            "X-Seen",
            f"{request.method} {request.path} q={request.query} route={request.route}"
            f" client={request.client}",
        )
        request.headers.remove("X-Drop")

    def response(self, request: FilterRequest, response: FilterResponse) -> None:
        response.headers.set("X-Status-Seen", str(response.status))
        response.headers.remove("Server")


class Answers:
    """
    Answers every request itself.
    """

    def __init__(self, status: int = 418, body: str = "short and stout\n") -> None:
        self.status = status
        self.body = body

    def request(self, request: FilterRequest) -> Answer:
        return Answer(self.status, self.body, {"X-Answered": "yes"})


class Raises:
    """
    Raises in request() (or, with where=response, in response()).
    """

    def __init__(self, where: str = "request") -> None:
        self.where = where

    def request(self, request: FilterRequest) -> None:
        if self.where == "request":
            raise RuntimeError("the filter broke")

    def response(self, request: FilterRequest, response: FilterResponse) -> None:
        if self.where == "response":
            raise RuntimeError("the response filter broke")


class FailsLater:
    """
    Returns a Deferred that fails on the next turn of the reactor.
    """

    def __init__(self, reactor: Any = None) -> None:
        self.reactor = reactor

    def request(self, request: FilterRequest) -> defer.Deferred[None]:
        from twisted.internet import reactor

        d: defer.Deferred[None] = defer.Deferred()
        reactor.callLater(0, d.errback, RuntimeError("the auth service is down"))  # type: ignore[attr-defined]
        return d


class AsksLater:
    """
    Answers (or lets pass) after a turn of the reactor, as an auth check
    asking another service would.
    """

    def __init__(self, allow: bool = True) -> None:
        self.allow = allow

    def request(self, request: FilterRequest) -> defer.Deferred[Optional[Answer]]:
        from twisted.internet import reactor

        d: defer.Deferred[Optional[Answer]] = defer.Deferred()
        result = None if self.allow else Answer(401, b"who are you?\n")
        reactor.callLater(0, d.callback, result)  # type: ignore[attr-defined]
        return d


class NeverFires:
    """
    Returns a Deferred that never fires; counts how often one was cancelled.
    """

    cancelled = 0
    finished = 0

    def request(self, request: FilterRequest) -> defer.Deferred[None]:
        def cancel(d: defer.Deferred[None]) -> None:
            NeverFires.cancelled += 1

        return defer.Deferred(cancel)

    def done(self, request: FilterRequest) -> None:
        NeverFires.finished += 1


class Garbage:
    """
    Returns something that is neither None, an Answer nor a Deferred.
    """

    def request(self, request: FilterRequest) -> Any:
        return 42


def not_a_filter() -> object:
    """
    Returns an object without request().
    """
    return object()


class Hostile:
    """
    Sets a header value with CR/LF in it (what=header), or returns an Answer
    with a status no response may have (what=status).
    """

    def __init__(self, what: str = "header") -> None:
        self.what = what

    def request(self, request: FilterRequest) -> Optional[Answer]:
        if self.what == "header":
            request.headers.set("X-Evil", "a\r\nSet-Cookie: owned=1")
            return None
        return Answer(99, b"x")
