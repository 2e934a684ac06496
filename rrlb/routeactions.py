# -*- test-case-name: tests.test_actions -*-
"""
The steps that end a route's chain: a route's C{redirect}, C{respond} and
C{forward} (L{rrlb.actions} holds their pure parts), each answering the
request or sending it to a pool through the proxy of the L{rrlb.chain.Chains}
that calls it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from rrlb._twisted import raw_headers
from rrlb.actions import ForwardPicker, Redirect, Respond
from rrlb.filters import request_cookie
from rrlb.http1 import answer


class RedirectAction:
    """
    A route's C{redirect}.
    """

    def __init__(self, redirect: Redirect) -> None:
        self.redirect = redirect

    def act(self, chains: Any, request: Any, route: Any) -> None:
        location = self.redirect.location(request)
        answer(
            request,
            self.redirect.status,
            b"",
            [(b"Location", location)],
            content_type=None,
            date=chains.proxy.date(),
        )


class RespondAction:
    """
    A route's C{respond}.
    """

    def __init__(self, respond: Respond) -> None:
        self.respond = respond

    def act(self, chains: Any, request: Any, route: Any) -> None:
        r = self.respond
        answer(request, r.status, r.body, r.headers, r.content_type, date=chains.proxy.date())


class ForwardAction:
    """
    A route's C{forward}: one of its pools per request (their
    L{rrlb.exchange.Destination}s), sticky by a cookie if asked.
    """

    def __init__(self, picker: ForwardPicker[Any]) -> None:
        self.picker = picker
        sticky = picker.stickiness
        self.cookie = None if sticky is None else sticky.cookie

    def act(self, chains: Any, request: Any, route: Any) -> None:
        cookie = None
        if self.cookie is not None:
            cookie = request_cookie(request, self.cookie)
        dest, set_cookie = self.picker.pick(_serving, cookie)
        if set_cookie is not None:
            request.response_hook = _SetCookie(set_cookie, request.response_hook).respond
        chains.proxy.send(request, dest, route)


def _serving(dest: Any) -> bool:
    return bool(dest.pool.serving)


class _SetCookie:
    """
    Gives a response the sticky cookie of the pool a forward chose, before
    the response filters run (as the last of them would).
    """

    __slots__ = ("value", "then")

    def __init__(self, value: bytes, then: Optional[Callable[[Any, int], bool]]) -> None:
        self.value = value
        self.then = then

    def respond(self, request: Any, code: int) -> bool:
        raw_headers(request.responseHeaders).setdefault(b"Set-Cookie", []).append(self.value)
        then = self.then
        return then is None or then(request, code)
