"""The practical limit: a bare Starlette endpoint that does one Redis EVALSHA and nothing else.

It runs the very script the status check runs (hold_check.lua), on the same web stack (uvicorn,
uvloop, httptools, Starlette) through the same Redis client the web app makes (engine/runtime.py
`redis_client`: its bounded pool, no per-command timeout, as the web app opens it), without auth,
call lookup, metrics, the request budget or error mapping: what is left of the status check's
time once those are gone is this endpoint's. Run: uvicorn credit_engine.loadtest.bare_app:app
"""

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from credit_engine.engine.config import Settings
from credit_engine.engine.keys import Keyspace
from credit_engine.engine.runtime import redis_client
from credit_engine.engine.scripts import ScriptRunner

scripts = ScriptRunner()
keys = Keyspace(os.environ.get("CREDIT_ENGINE_KEY_PREFIX", "ce"))
redis: Any = redis_client(os.environ["REDIS_URL"], Settings.redis_pool_size, socket_timeout_s=None)
script = scripts.scripts["hold_check"]


async def check(request: Request) -> Response:
    body = orjson.loads(await request.body())
    org = keys.org(body["org_id"])
    reply = await redis.evalsha(
        script.sha, 3, org.org, org.holds, org.outbox, 0, body["org_id"], body["call_id"], 0, 600_000, 100_000, 8
    )
    return Response(
        orjson.dumps({"endCall": bool(reply[6]), "available_pence": reply[3]}), media_type="application/json"
    )


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await scripts.load(redis)
    yield
    await redis.aclose()


app = Starlette(routes=[Route("/check", check, methods=["POST"])], lifespan=lifespan)
