"""A fake of a platform's own Vapi server (the server the engine stands in front of), on a loopback
port: it records every message it gets and answers as the test scripts it (an assistant-request's
answer, a tool's result, an error, a delay, garbage)."""

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def fake_platform_server() -> AsyncIterator[FakePlatform]:
    fake = FakePlatform(port=_free_port())
    app = Starlette(routes=[Route("/{path:path}", fake.handle, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=fake.port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield fake
    finally:
        server.should_exit = True
        server.force_exit = True
        await task
