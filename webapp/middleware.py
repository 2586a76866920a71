"""Pure ASGI middleware."""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from credit_engine.webapp.responses import error_response


class BodySizeLimit:
    """Refuse request bodies over a limit with 413, before the endpoint reads them.

    Vapi's webhook path gets a larger limit: end-of-call reports carry whole transcripts.
    """

    def __init__(self, app: ASGIApp, *, bytes_max: int, large_prefix: str, large_bytes_max: int) -> None:
        self.app = app
        self.bytes_max = bytes_max
        self.large_prefix = large_prefix
        self.large_bytes_max = large_bytes_max

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.large_bytes_max if scope["path"].startswith(self.large_prefix) else self.bytes_max
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = True
                if too_big:
                    await self._refuse(scope, receive, send, limit)
                    return
                # The server delivers no more than Content-Length says: nothing left to count.
                await self.app(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._refuse(scope, receive, send, limit)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = error_response(413, "body_too_large", f"the request body is over {limit} bytes")
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass
