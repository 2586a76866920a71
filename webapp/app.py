"""Builds the Starlette app; the lifespan owns the Redis and Postgres pools."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from engine.clock import Clock
from engine.config import Settings
from engine.runtime import Runtime
from webapp.state import StateGuard


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    guard: StateGuard = request.app.state.guard
    if not guard.ready:
        return JSONResponse({"status": "not_ready", "reason": "redis state is being rebuilt"}, status_code=503)
    return JSONResponse({"status": "ready"})


def create_app(settings: Settings | None = None, *, clock: Clock | None = None) -> Starlette:
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        rt = await Runtime.open(settings, clock=clock)
        guard = StateGuard(rt)
        await guard.start()  # rebuild Redis from Postgres before taking any traffic
        app.state.rt = rt
        app.state.guard = guard
        watcher = asyncio.create_task(guard.watch_forever(), name="redis-state-watch")
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await rt.close()

    return Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz)], lifespan=lifespan)
