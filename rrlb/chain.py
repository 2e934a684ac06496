# -*- test-case-name: tests.test_actions,tests.test_pyfilters -*-
"""
A request's chain: the top-level filters, the route it matches, the
route's filters, and its action (L{rrlb.actions}: forward to a pool or to
weighted pools, redirect, respond). L{rrlb.proxy.RotatingProxy} hands a
request here only when filters or actions are configured for it; without
any, nothing here runs.

Request filters run in order; any may answer (an L{Answer}), re-pool the
request, or hold it on a Deferred (a client that leaves meanwhile cancels
it). Response filters run in reverse order on every response head rrlb
sends for the request: a node's (L{rrlb.exchange}) and rrlb's own
(L{rrlb.http1.answer}), through C{request.response_hook}. A filter that
raises, returns something else, or whose Deferred fails gives the client a
plain 500, is logged once with its traceback and counted by its label in
C{rrlb_filter_errors_total}; the daemon goes on.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from rrlb._twisted import client_gone
from rrlb.actions import Forward, Redirect, Respond
from rrlb.failures import log_text
from rrlb.filterheaders import FilterHeaders, header_name, header_value
from rrlb.filters import (
    Answer,
    FilterContext,
    FilterRequest,
    FilterResponse,
    build_filter,
)
from rrlb.http1 import PLAIN_TEXT, answer, error_response
from rrlb.routeactions import ForwardAction, RedirectAction, RespondAction
from rrlb.routes import Route, Router

log = Logger()

_pair = tuple.__new__


def response_of(code: int, headers: Any) -> FilterResponse:
    """
    The L{FilterResponse} of a response head.
    """
    if headers.__class__ is FilterHeaders:  # a proxy request's: no check to run
        return _pair(FilterResponse, (code, headers))
    return FilterResponse(code, headers)


class Step:
    """
    One filter of a chain, its methods looked up once.
    """

    __slots__ = ("label", "filter", "request", "response", "done")

    def __init__(self, label: str, filter: Any) -> None:
        self.label = label
        self.filter = filter
        self.request: Callable[[FilterRequest], Any] = filter.request
        self.response: Optional[Callable[[FilterRequest, FilterResponse], Any]] = getattr(
            filter, "response", None
        )
        self.done: Optional[Callable[[FilterRequest], Any]] = getattr(filter, "done", None)


class Responders:
    """
    The response filters of a chain that ran to its end (the top-level
    filters, then a route's), in the order they run: the reverse. Made once
    per configuration, so that a request whose filters all went on at once
    costs no object of its own for them: its hook is L{hook}.
    """

    __slots__ = ("chains", "steps", "hook")

    def __init__(self, chains: Chains, steps: tuple[Step, ...]) -> None:
        self.chains = chains
        self.steps = tuple((s.label, s.response) for s in reversed(steps) if s.response)
        # What request.response_hook is (None: no response filter).
        self.hook: Optional[Callable[[Any, int], bool]] = self.respond if self.steps else None

    def respond(self, request: Any, code: int) -> bool:
        """
        Run the response filters on the head of a response with status
        C{code}.

        @return: C{False} if one failed (the client got a 500 instead).
        """
        view = request.filter_view
        headers = request.responseHeaders
        if headers.__class__ is FilterHeaders:  # response_of, inlined
            response = _pair(FilterResponse, (code, headers))
        else:
            response = FilterResponse(code, headers)
        for label, method in self.steps:
            try:
                method(view, response)
            except Exception:
                self.chains.failed(request, label, Failure())
                return False
        return True


class Chains:
    """
    Runs the chains of one proxy's requests.

    @ivar top: the top-level filters' steps.
    @ivar errors: label -> filter errors (C{rrlb_filter_errors_total}).
    """

    def __init__(
        self,
        proxy: Any,
        top: tuple[Step, ...],
        errors: dict[str, int],
        router: Optional[Router[Any]] = None,
    ) -> None:
        self.proxy = proxy
        self.top = top
        self.errors = errors
        self.responders = Responders(self, top)
        # Each route's response filters after the top-level ones'.
        for route in router.routes if router is not None else ():
            route.responders = Responders(self, top + route.filters)

    def start(self, request: Any, route: Any = None) -> None:
        """
        Run C{request}'s chain: from the top-level filters, or with C{route}
        (matched already), from the route's filters.

        Filters that all return L{None} at once (what the built-in ones
        but C{allow}/C{deny} refusing do) run here in one loop, with a
        response hook made per configuration; the first that answers,
        waits, re-pools or wants C{done} hands the rest to a L{Flow}.
        """
        if route is None:
            view = request.filter_view = FilterRequest(request)
            if not self.run(request, view, self.top, None):
                return
            router = self.proxy.router
            if router is None:
                request.response_hook = self.responders.hook
                self.proxy.send(request, self.proxy.default, None)
                return
            route = router.match(request)
            if route is None:
                request.response_hook = self.responders.hook
                error_response(request, 404, "no route for this request")
                return
            view.route = route.label
        elif not route.filters:
            # Only an action: no filter to run, no request view to make.
            route.action.act(self, request, route)
            return
        else:
            view = request.filter_view = FilterRequest(request)
            view.route = route.label
        if not self.run(request, view, route.filters, route):
            return
        request.response_hook = route.responders.hook
        action = route.action
        if action is None:
            self.proxy.send(request, route.target, route)
        else:
            action.act(self, request, route)

    def run(self, request: Any, view: FilterRequest, steps: tuple[Step, ...], route: Any) -> bool:
        """
        Run C{steps} while each returns L{None} at once, sets no pool and
        has no C{done}.

        @return: whether all did; if not, the rest is in a L{Flow}'s hands.
        """
        index = 0
        for step in steps:
            try:
                result = step.request(view)
            except Exception:
                self.failed(request, step.label, Failure())
                return False
            index += 1
            if result is not None or view.pool is not None or step.done is not None:
                Flow(self, request, view, route, steps, index).took(step, result)
                return False
        return True

    def failed(self, request: Any, label: str, failure: Failure) -> None:
        """
        A filter failed: log it once with its traceback, count it, and answer
        a plain 500 (if the client is still there and nothing was sent).
        """
        self.errors[label] = self.errors.get(label, 0) + 1
        log.failure(
            "filter {filter} failed on {method} {uri}",
            failure,
            filter=label,
            method=log_text(request.method),
            uri=log_text(request.uri),
        )
        request.response_hook = None
        exchange = request.exchange
        if exchange is not None:
            # A response filter failed on a node's head: that response goes
            # no further, and the client gets rrlb's 500.
            request.exchange = None
            exchange.client_gone()
        if request.startedWriting:
            request.channel.loseConnection()
            return
        answer(
            request,
            500,
            b"500 Internal Server Error: a filter failed\n",
            content_type=PLAIN_TEXT,
            filtered=False,
        )


class Flow:
    """
    The rest of one request's way through its chain, from the first filter
    that did not simply go on (L{Chains.run}): it answered, waits on a
    Deferred, re-pooled the request, or wants to be told when it ends.
    """

    __slots__ = (
        "chains",
        "request",
        "view",
        "steps",
        "index",
        "route",
        "matched",
        "ran",
        "pool",
        "waiting",
        "watched",
    )

    def __init__(
        self,
        chains: Chains,
        request: Any,
        view: FilterRequest,
        route: Any,
        steps: tuple[Step, ...],
        index: int,
    ) -> None:
        """
        @param route: the matched route whose C{steps} these are, or L{None}
            for the top-level filters.
        @param index: how many of C{steps} ran.
        """
        self.chains = chains
        self.request = request
        self.view = view
        self.route = route
        self.steps = steps
        self.index = index
        self.matched = route is not None
        self.pool: Optional[str] = None
        self.waiting: Optional[Deferred[Any]] = None
        self.watched = False
        # The filters that ran, whose response or done is owed to them.
        ran = chains.top + steps[:index] if route is not None else steps[:index]
        self.ran = [s for s in ran if s.response is not None or s.done is not None]
        if any(s.response is not None for s in self.ran):
            request.response_hook = self.respond
        if any(s.done is not None for s in self.ran):
            self.watch()

    def took(self, step: Step, result: Any) -> None:
        """
        Go on from what C{step}'s C{request} returned.
        """
        if result is None:
            view = self.view
            if view.pool is not None and view.pool != self.pool and not self.repooled(step):
                return
            self.run()
        elif isinstance(result, Deferred):
            self.wait(step, result)
        else:
            self.answered(step, result)

    def run(self) -> None:
        """
        Run the request filters from where the chain stands, then match the
        route (after the top-level ones) and run its filters, then its
        action.
        """
        view = self.view
        request = self.request
        ran = self.ran
        while True:
            steps = self.steps
            index = self.index
            while index < len(steps):
                step = steps[index]
                index += 1
                self.index = index
                if step.response is not None:
                    if request.response_hook is None:
                        request.response_hook = self.respond
                    ran.append(step)
                if step.done is not None:
                    self.add_done(step)
                try:
                    result = step.request(view)
                except Exception:
                    self.chains.failed(request, step.label, Failure())
                    return
                if result is not None:
                    if isinstance(result, Deferred):
                        self.wait(step, result)
                    else:
                        self.answered(step, result)
                    return
                if view.pool is not None and view.pool != self.pool and not self.repooled(step):
                    return
            if self.matched:
                break
            self.matched = True
            router = self.chains.proxy.router
            if router is None:
                break
            route = router.match(self.request)
            if route is None:
                error_response(self.request, 404, "no route for this request")
                return
            self.route = route
            view.route = route.label
            self.steps = route.filters
            self.index = 0
        self.act()

    def repooled(self, step: Step) -> bool:
        """
        A filter set C{pool}: check there is such a pool.
        """
        name = self.view.pool
        if name not in self.chains.proxy.destinations:
            failure = Failure(ValueError(f"the filter set pool {name!r}; there is no such pool"))
            self.chains.failed(self.request, step.label, failure)
            return False
        self.pool = name
        return True

    def act(self) -> None:
        """
        Do what the route says: forward (to the pool a filter set, the
        route's pool, or one of its weighted pools), redirect or respond.
        """
        proxy = self.chains.proxy
        route = self.route
        if self.pool is not None:
            proxy.send(self.request, proxy.destinations[self.pool], route)
        elif route is None:
            proxy.send(self.request, proxy.default, None)
        elif route.action is None:
            proxy.send(self.request, route.target, route)
        else:
            route.action.act(self.chains, self.request, route)

    def add_done(self, step: Step) -> None:
        self.watch()
        if step not in self.ran:
            self.ran.append(step)

    def watch(self) -> None:
        """
        Be told when the request ends (L{finished}).
        """
        if not self.watched:
            self.watched = True
            self.request.notifyFinish().addBoth(self.finished)

    def finished(self, reason: Any) -> None:
        """
        The request ended (or its client left): cancel a filter still
        holding it, and tell each filter that ran and wants to know.
        """
        self.cancel()
        for step in self.ran:
            if step.done is not None:
                try:
                    step.done(self.view)
                except Exception:
                    self.chains.errors[step.label] = self.chains.errors.get(step.label, 0) + 1
                    log.failure("filter {filter} failed when its request ended", filter=step.label)

    def cancel(self) -> None:
        waiting = self.waiting
        if waiting is not None:
            self.waiting = None
            waiting.cancel()

    def respond(self, request: Any, code: int) -> bool:
        """
        Run the response filters, in reverse, on the head of a response
        with status C{code}.

        @return: C{False} if one failed (the client got a 500 instead).
        """
        response = response_of(code, request.responseHeaders)
        view = self.view
        for step in reversed(self.ran):
            if step.response is None:
                continue
            try:
                step.response(view, response)
            except Exception:
                self.chains.failed(request, step.label, Failure())
                return False
        return True

    # -- a filter that answers or waits ---------------------------------------

    def answered(self, step: Step, result: Any) -> None:
        """
        A filter answered: send its L{Answer}, through the response filters.
        """
        try:
            status, body, headers = checked_answer(result)
        except (TypeError, ValueError) as e:
            self.chains.failed(self.request, step.label, Failure(e))
            return
        content_type = None if b"Content-Type" in dict(headers) or not body else PLAIN_TEXT
        answer(self.request, status, body, headers, content_type, date=self.chains.proxy.date())

    def wait(self, step: Step, d: Deferred[Any]) -> None:
        """
        Hold the request until C{d} fires; a client that leaves meanwhile
        cancels it.
        """
        self.waiting = d
        self.watch()
        d.addCallbacks(
            self.resumed, self.deferred_failed, callbackArgs=(step, d), errbackArgs=(step, d)
        )

    def resumed(self, result: Any, step: Step, d: Deferred[Any]) -> None:
        if self.waiting is not d:
            return  # cancelled: the client left
        self.waiting = None
        if client_gone(self.request) or self.request.finished:
            return
        if result is None:
            view = self.view
            if view.pool is not None and view.pool != self.pool and not self.repooled(step):
                return
            self.run()
        else:
            self.answered(step, result)

    def deferred_failed(self, failure: Failure, step: Step, d: Deferred[Any]) -> None:
        if self.waiting is not d:
            return  # cancelled because the client left: nothing to say
        self.waiting = None
        if failure.check(CancelledError) and client_gone(self.request):
            return
        self.chains.failed(self.request, step.label, failure)


def checked_answer(result: Any) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """
    The status, body and headers of a filter's L{Answer}.

    @raise TypeError: C{result} is not an L{Answer}.
    @raise ValueError: one of its parts is bad.
    """
    if not isinstance(result, Answer):
        raise TypeError(
            f"a filter's request() returned {type(result).__name__}, not None, an Answer"
            " or a Deferred"
        )
    status = result.status
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        raise ValueError(f"an Answer's status must be from 200 to 599, not {status!r}")
    body = result.body
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not isinstance(body, bytes):
        raise TypeError(f"an Answer's body must be bytes or str, not {type(body).__name__}")
    headers = result.headers
    if not isinstance(headers, Mapping):
        raise TypeError(f"an Answer's headers must be a mapping, not {type(headers).__name__}")
    pairs = [(header_name(name), header_value(name, value)) for name, value in headers.items()]
    return status, body, pairs


# -- building the chains of a configuration ----------------------------------------


def build_steps(config: Any, context: Callable[[str, Any], FilterContext]) -> Built:
    """
    The steps of C{config}'s top-level filters and of each route's, built
    for this process.

    @param context: the L{FilterContext} of a filter at a place, for a route
        label (L{None} at the top level).
    @raise ConfigError: a filter cannot be built here.
    """
    top = tuple(
        Step(spec.label, build_filter(spec, context(spec.where, None))) for spec in config.filters
    )
    routes = tuple(
        tuple(
            Step(spec.label, build_filter(spec, context(spec.where, route_label(r, i))))
            for spec in r.filters
        )
        for i, r in enumerate(config.routes)
    )
    return top, routes


Built = tuple[tuple[Step, ...], tuple[tuple[Step, ...], ...]]


def route_label(route: Any, index: int) -> Union[str, int]:
    """
    A route as filters see it: its name, else its index.
    """
    return route.name if route.name is not None else index


def build_routes(
    config: Any, built: Built, destinations: Mapping[str, Any]
) -> tuple[Optional[Router[Any]], tuple[Step, ...]]:
    """
    The router of C{config}'s routes (L{None} without routes), each route
    with its filters and action, and the top-level steps.
    """
    top, route_steps = built
    if not config.routes:
        return None, top
    routes = []
    for i, (r, steps) in enumerate(zip(config.routes, route_steps)):
        action: Any = None
        target = destinations.get(r.pool)
        if isinstance(r.action, Forward):
            targets = [destinations[name] for name, _ in r.action.pools]
            action = ForwardAction(r.action.picker(targets))
            target = targets[0]
        elif isinstance(r.action, Redirect):
            action = RedirectAction(r.action)
        elif isinstance(r.action, Respond):
            action = RespondAction(r.action)
        route: Route[Any] = Route(
            target,
            r.pool,
            host=r.host,
            path_prefix=r.path_prefix,
            methods=r.methods,
            header=r.header,
            strip_prefix=r.strip_prefix,
            scheme=r.scheme,
            query=r.query,
            source=r.source,
            path=r.path,
            client_cert=r.client_cert,
        )
        route.name = r.name
        route.label = route_label(r, i)
        route.filters = steps
        route.action = action
        route.chained = bool(steps) or action is not None
        routes.append(route)
    return Router(routes), top
