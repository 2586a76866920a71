"""A fake of a platform's own Vapi server (the server the engine stands in front of), on a loopback
port: it records every message it gets and answers as the test scripts it (an assistant-request's
answer, a tool's result, an error, a delay, garbage)."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from credit_engine.engine.embedded import free_port
from tests.served import served


@dataclass
class Got:
    path: str
    message: dict[str, Any]
    headers: dict[str, str]


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=dict)  # JSON-encoded unless raw is set
    raw: bytes | None = None
    delay_s: float = 0.0


@dataclass
class FakePlatform:
    port: int = 0
    got: list[Got] = field(default_factory=list)
    replies: dict[str, Reply] = field(default_factory=dict)  # message type -> how to answer
    down: bool = False  # every request answered 503

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def types(self, path: str = "/vapi") -> list[str]:
        return [g.message.get("type", "") for g in self.got if g.path == path]

    async def handle(self, request: Request) -> Response:
        envelope = orjson.loads(await request.body())
        message = envelope.get("message", {})
        self.got.append(Got(request.url.path, message, dict(request.headers)))
        if self.down:
            return JSONResponse({"message": "down"}, status_code=503)
        reply = self.replies.get(message.get("type", ""), Reply())
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.raw is not None:
            return Response(reply.raw, status_code=reply.status, media_type="application/json")
        return JSONResponse(reply.body, status_code=reply.status)


@asynccontextmanager
async def fake_platform_server() -> AsyncIterator[FakePlatform]:
    fake = FakePlatform(port=free_port())
    app = Starlette(routes=[Route("/{path:path}", fake.handle, methods=["POST"])])
    async with served(app, fake.port, cut_short=True):
        yield fake
