"""The hot lane: Vapi's two endpoints, the status check and the webhook, dispatched in front of
Starlette's middleware stack.

Vapi polls the status check for every live call and sends every call's messages to the webhook:
they are most of the traffic. Behind Starlette a request passes the server-error middleware, the
body limit, the exception middleware, the router (where these two routes are tried after every
other route's pattern failed) and two exception-handling wrappers, each a frame or a closure
around `send`, before the endpoint runs. The lane skips those layers and none of their checks: a
POST to exactly one of the two paths gets
- the body limit (middleware.BodyLimit: the same limit, the same 413);
- the same endpoint, wrapped as the route wraps it (app.py `timed`: the request budget and the
  latency histogram), which authenticates, reads, validates, decides and counts as it does
  behind Starlette;
- the app's own exception handlers, looked up as Starlette looks them up (the error's most
  specific class first); an error that only the crash handler maps gets its 500 and is raised on
  to the server, which logs it, as Starlette's ServerErrorMiddleware does.
Anything else (another method, another path, a trailing slash, a root path) goes through
Starlette as before. tests/webapp/test_hot_lane.py holds the lane to the same answers.
"""

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from credit_engine.webapp.middleware import BodyLimit, TooLarge, counted, declared_over, too_large

Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[Request, Exception], Awaitable[Response]]


class HotLane:
    def __init__(
        self,
        app: ASGIApp,
        endpoints: Mapping[str, Endpoint],
        handlers: Mapping[Any, Handler],
        body_limit: BodyLimit,
    ) -> None:
        self.app = app
        self.endpoints = dict(endpoints)
        self.handlers = {kind: handler for kind, handler in handlers.items() if isinstance(kind, type)}
        self.crash = self.handlers[Exception]
        self.body_limit = body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self._endpoint(scope)
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        limit = self.body_limit.for_path(scope["path"])
        over = declared_over(scope, limit)
        if over:
            await too_large(limit)(scope, receive, send)
            return
        request = Request(scope, receive if over is False else counted(receive, limit))
        try:
            response = await endpoint(request)
        except TooLarge:
            response = too_large(limit)
        except Exception as error:
            handler = self._handler(error)
            response = await handler(request, error)
            if handler is self.crash:
                await response(scope, receive, send)
                raise
            error.__traceback__ = None  # as Starlette does: a reused error must not grow a traceback
        await response(scope, receive, send)

    def _endpoint(self, scope: Scope) -> Endpoint | None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            return None
        return self.endpoints.get(scope["path"])

    def _handler(self, error: Exception) -> Handler:
        for kind in type(error).__mro__:
            handler = self.handlers.get(kind)
            if handler is not None:
                return handler
        return self.crash  # unreachable: Exception is in every error's __mro__
