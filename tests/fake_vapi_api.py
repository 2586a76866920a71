"""A fake of Vapi's REST API (api.vapi.ai) on a loopback port, that checks every request body
against the request types of Vapi's own SDK (vapi_server_sdk), so the engine is tested sending
what Vapi accepts, field names and nesting included, and nothing Vapi does not know.

Routes: `POST /phone-number` (a `provider: "vapi"` body, validated as `CreateVapiPhoneNumberDto`)
and `DELETE /phone-number/{id}`. Every request is recorded with its parsed body.
"""

import asyncio
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import pydantic
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from vapi.types import CreateVapiPhoneNumberDto

API_KEY = "vapi-api-key-for-tests"


def sdk_fields(model: type[pydantic.BaseModel]) -> set[str]:
    """The JSON names a request type knows (its aliases where it has them)."""
    return {info.alias or name for name, info in model.model_fields.items()}


def check_request(
    model: type[pydantic.BaseModel], body: dict[str, Any], *, ignore: frozenset[str] = frozenset()
) -> list[str]:
    """What is wrong with `body` as a `model` (empty: Vapi would take it). The SDK's models allow
    extra fields, so unknown names are looked for here."""
    problems = [f"unknown field {name!r}" for name in sorted(set(body) - sdk_fields(model) - ignore)]
    try:
        model.model_validate({k: v for k, v in body.items() if k not in ignore})
    except pydantic.ValidationError as error:
        problems.append(str(error))
    return problems


@dataclass
class Seen:
    method: str
    path: str
    body: Any
    headers: dict[str, str]


@dataclass
class FakeVapiApi:
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    numbers: dict[str, dict[str, Any]] = field(default_factory=dict)
    invalid: list[str] = field(default_factory=list)  # every validation problem, for the test to assert empty

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _authorised(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {API_KEY}"

    async def create_phone_number(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.seen.append(Seen("POST", request.url.path, body, dict(request.headers)))
        if not self._authorised(request):
            return JSONResponse({"message": "Unauthorized"}, status_code=401)
        problems = [] if body.get("provider") == "vapi" else [f"provider {body.get('provider')!r} is not 'vapi'"]
        problems += check_request(CreateVapiPhoneNumberDto, body, ignore=frozenset({"provider"}))
        if problems:
            self.invalid.extend(problems)
            return JSONResponse({"message": problems, "error": "Bad Request", "statusCode": 400}, status_code=400)
        number_id = f"pn_{secrets.token_hex(8)}"
        number = {
            "id": number_id,
            "orgId": "vapi-org-0001",
            "provider": "vapi",
            "status": "active",
            "number": f"+1{body.get('numberDesiredAreaCode', '415')}555{len(self.numbers):04d}",
            "createdAt": "2026-11-29T00:00:00.000Z",
            "updatedAt": "2026-11-29T00:00:00.000Z",
            **{k: v for k, v in body.items() if k != "provider"},
        }
        self.numbers[number_id] = number
        return JSONResponse(number, status_code=201)

    async def delete_phone_number(self, request: Request) -> Response:
        number_id = request.path_params["number_id"]
        self.seen.append(Seen("DELETE", request.url.path, None, dict(request.headers)))
        if not self._authorised(request):
            return JSONResponse({"message": "Unauthorized"}, status_code=401)
        number = self.numbers.pop(number_id, None)
        return JSONResponse(number or {"message": "Not Found"}, status_code=200 if number else 404)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def fake_vapi_api_server() -> AsyncIterator[FakeVapiApi]:
    fake = FakeVapiApi(port=_free_port())
    routes = [
        Route("/phone-number", fake.create_phone_number, methods=["POST"]),
        Route("/phone-number/{number_id}", fake.delete_phone_number, methods=["DELETE"]),
    ]
    app = Starlette(routes=routes)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=fake.port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield fake
    finally:
        server.should_exit = True
        await task
