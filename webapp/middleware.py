"""Pure ASGI middleware, and the body limit's rule (shared with the hot lane, webapp/hot_lane.py)."""

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from credit_engine.webapp.responses import error_response


class BodyLimit:
    """How many bytes a request body may have. Vapi's webhook path gets a larger limit: end-of-call
    reports carry whole transcripts."""

    def __init__(self, *, bytes_max: int, large_prefix: str, large_bytes_max: int) -> None:
        self.bytes_max = bytes_max
        self.large_prefix = large_prefix
        self.large_bytes_max = large_bytes_max

    def for_path(self, path: str) -> int:
        return self.large_bytes_max if path.startswith(self.large_prefix) else self.bytes_max


def declared_over(scope: Scope, limit: int) -> bool | None:
    """Whether the Content-Length says the body is over the limit (an unreadable one is); None
    without one (chunked: count it as it comes, `counted`). The server delivers no more than
    Content-Length says, so a body that declares its length needs no counting."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value) > limit
            except ValueError:
                return True
    return None


def counted(receive: Receive, limit: int) -> Receive:
    """`receive`, raising TooLarge once the body so far is over the limit."""
    received = 0

    async def limited_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise TooLarge(limit)
        return message

    return limited_receive


def too_large(limit: int) -> Response:
    return error_response(413, "body_too_large", f"the request body is over {limit} bytes")


class TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class BodySizeLimit:
    """Refuse request bodies over a limit with 413, before the endpoint reads them."""

    def __init__(self, app: ASGIApp, *, limit: BodyLimit) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit.for_path(scope["path"])
        over = declared_over(scope, limit)
        if over:
            await too_large(limit)(scope, receive, send)
            return
        if over is False:
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, counted(receive, limit), send)
        except TooLarge:
            await too_large(limit)(scope, receive, send)
