"""A fake Vapi control endpoint and alert receiver: a real HTTP server on a loopback port that
records every request and answers with whatever status (and after whatever delay) the test
scripts for it.

Control URLs are Vapi's own (`https://…vapi.ai/<call_id>/control`, as the webhook carries them);
a worker reaches the fake through `vapi_control_base_url=fake.base_url` (VAPI_CONTROL_BASE_URL),
which keeps the path and replaces the scheme and host."""

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from credit_engine.engine.embedded import free_port
from tests.served import served

VAPI_CONTROL_HOST = "https://aws-us-west-2-production1-phone-call-websocket.vapi.ai"


@dataclass
class Received:
    path: str
    body: bytes
    headers: dict[str, str]

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class FakeVapi:
    port: int = 0
    received: list[Received] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)  # time.monotonic() of each
    # path -> statuses to answer, in order; when used up (or absent) the answer is 200
    scripted: dict[str, list[int]] = field(default_factory=dict)
    always: dict[str, int] = field(default_factory=dict)  # path -> status for every request
    delay_s: dict[str, float] = field(default_factory=dict)  # path -> seconds before answering
    in_flight: int = 0  # requests being answered now
    in_flight_max: int = 0  # the most at once

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def control_url(self, call_id: str) -> str:
        """What Vapi puts in `call.monitor.controlUrl` (route it here with vapi_control_base_url)."""
        return f"{VAPI_CONTROL_HOST}/{call_id}/control"

    def to(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    def control_bodies(self, call_id: str) -> list[dict[str, Any]]:
        return [r.json for r in self.to(f"/{call_id}/control")]

    async def handle(self, request: Request) -> JSONResponse:
        body = await request.body()
        path = request.url.path
        self.received.append(Received(path, body, dict(request.headers)))
        self.received_at.append(time.monotonic())
        self.in_flight += 1
        self.in_flight_max = max(self.in_flight_max, self.in_flight)
        try:
            if path in self.delay_s:
                await asyncio.sleep(self.delay_s[path])
        finally:
            self.in_flight -= 1
        if path in self.always:
            return JSONResponse({}, status_code=self.always[path])
        queue = self.scripted.get(path)
        status = queue.pop(0) if queue else 200
        return JSONResponse({}, status_code=status)


@asynccontextmanager
async def fake_vapi_server(port: int | None = None) -> AsyncIterator[FakeVapi]:
    """port: one chosen beforehand (a worker started earlier was told it); None: any free one."""
    fake = FakeVapi(port=port or free_port())
    app = Starlette(routes=[Route("/{path:path}", fake.handle, methods=["POST"])])
    async with served(app, fake.port, cut_short=True):
        yield fake
