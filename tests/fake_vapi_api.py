"""A fake of Vapi's REST API (api.vapi.ai) on a loopback port, that checks every request body
against the request types of Vapi's own SDK (vapi_server_sdk), so the engine is tested sending
what Vapi accepts, field names and nesting included, and nothing Vapi does not know.

Routes, each answering with the shapes of the SDK's response types:

- `POST /phone-number` (a `provider: "vapi"` body, validated as `CreateVapiPhoneNumberDto`);
- `GET /phone-number`: the query parameters of the SDK's `phone_numbers.list` only (`limit` up to
  1,000, Vapi's maximum; `createdAtGt|Lt|Ge|Le`, `updatedAt…` as ISO dates), newest first (or
  `list_order = "ASC"`), at most `limit` (default 100) numbers;
- `PATCH /phone-number/{id}`: the body validated as the SDK's update DTO of the number's provider
  (`UpdateVapiPhoneNumberDto` for a vapi number; `provider` is the SDK union's discriminator and
  must be the number's); a null detaches (`assistantId: null`);
- `DELETE /phone-number/{id}`, `GET /credential/{id}`, `GET /assistant/{id}`, `GET /workflow/{id}`, `GET /call/{id}`
  (a call's `monitor.controlUrl`, where the kill switch finds a URL it lost; its status and times,
  which the settle job bills from);
- `POST /call`: the body validated as the SDK's `calls.create` request (`CreateCallDto`, built from
  that method's typed parameters, as the SDK names them in JSON), answered 201 with a `Call` of
  status `queued` and its `monitor.controlUrl` (under `control_base_url`, for the kill switch's
  fake). `call_mode` makes it refuse (`"refuse"`: 400 as Vapi's validation does), fail (`"fail"`:
  500, no call), or place the call and then hang past the engine's timeout (`"hang"`).
- `GET /call`: the query parameters of the SDK's `calls.list` only (`limit` up to 1,000,
  `createdAtGt|Lt|Ge|Le`, `updatedAt…`, `id`, `assistantId`, `phoneNumberId`), newest first (or
  `list_order = "ASC"`), at most `limit` (default 100) calls, each validated as the SDK's `Call`.

Every request is recorded with its parsed body and its arrival time (`Seen.at`,
`time.monotonic()`, so a test can count requests per second). `failing` makes a route answer a status instead
(keyed "METHOD /path"), as an outage of Vapi's would.
"""

import asyncio
import inspect
import itertools
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pydantic
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from vapi.calls.client import AsyncCallsClient
from vapi.phone_numbers.client import AsyncPhoneNumbersClient
from vapi.types import (
    Assistant,
    ByoPhoneNumber,
    Call,
    CreateVapiPhoneNumberDto,
    TelnyxPhoneNumber,
    TwilioPhoneNumber,
    UpdateByoPhoneNumberDto,
    UpdateTelnyxPhoneNumberDto,
    UpdateTwilioPhoneNumberDto,
    UpdateVapiPhoneNumberDto,
    UpdateVonagePhoneNumberDto,
    VapiPhoneNumber,
    VonagePhoneNumber,
    WebhookCredential,
    Workflow,
)

from credit_engine.engine.embedded import free_port
from tests.fake_vapi import VAPI_CONTROL_HOST
from tests.served import served

API_KEY = "vapi-api-key-for-tests"
VAPI_ORG_ID = "vapi-org-0001"
LIST_LIMIT_MAX = 1_000  # the spec's maximum for `limit`
LIST_LIMIT_DEFAULT = 100
# provider -> (the SDK's response type of such a number, its update DTO)
PHONE_NUMBER_TYPES: dict[str, tuple[type[pydantic.BaseModel], type[pydantic.BaseModel]]] = {
    "vapi": (VapiPhoneNumber, UpdateVapiPhoneNumberDto),
    "twilio": (TwilioPhoneNumber, UpdateTwilioPhoneNumberDto),
    "vonage": (VonagePhoneNumber, UpdateVonagePhoneNumberDto),
    "telnyx": (TelnyxPhoneNumber, UpdateTelnyxPhoneNumberDto),
    "byo-phone-number": (ByoPhoneNumber, UpdateByoPhoneNumberDto),
}
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


# The query parameters the SDK's `GET /phone-number` sends (limit, createdAtGt, ...).
LIST_PARAMETERS = frozenset(
    _camel(name)
    for name in inspect.signature(AsyncPhoneNumbersClient.list).parameters
    if name not in ("self", "request_options")
)


# The query parameters the SDK's `GET /call` sends (id, assistantId, phoneNumberId, limit, createdAtGt, ...).
CALL_LIST_PARAMETERS = frozenset(
    _camel(name)
    for name in inspect.signature(AsyncCallsClient.list).parameters
    if name not in ("self", "request_options")
)
CALL_FILTERS = frozenset({"id", "assistantId", "phoneNumberId"})


def _create_call_dto() -> type[pydantic.BaseModel]:
    """Vapi's CreateCallDTO as the SDK sends it: `calls.create`'s keyword parameters, typed, under
    their JSON names (the SDK writes `assistant_overrides` as `assistantOverrides`, ...)."""
    fields: dict[str, Any] = {}
    for name, parameter in inspect.signature(AsyncCallsClient.create).parameters.items():
        if name in ("self", "request_options"):
            continue
        fields[name] = (parameter.annotation, pydantic.Field(None, alias=_camel(name)))
    return pydantic.create_model("CreateCallDto", __config__=pydantic.ConfigDict(populate_by_name=False), **fields)


CreateCallDto = _create_call_dto()


def iso(instant: datetime) -> str:
    """Vapi's timestamps: ISO 8601, milliseconds, Z."""
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{instant.microsecond // 1000:03d}Z"


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
    at: float = field(default_factory=time.monotonic)


@dataclass
class FakeVapiApi:
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    numbers: dict[str, dict[str, Any]] = field(default_factory=dict)
    credentials: dict[str, dict[str, Any]] = field(default_factory=dict)
    assistants: dict[str, dict[str, Any]] = field(default_factory=dict)
    workflows: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    invalid: list[str] = field(default_factory=list)  # every validation problem, for the test to assert empty
    failing: dict[str, int] = field(default_factory=dict)  # "PATCH /phone-number/<id>" -> the status to answer
    list_order: str = "DESC"  # how GET /phone-number orders by createdAt
    call_mode: str = "place"  # POST /call: "place", "refuse" (400), "fail" (500), "hang" (placed, never answered)
    hang_s: float = 3.0
    control_base_url: str = VAPI_CONTROL_HOST  # what tests/fake_vapi.FakeVapi.control_url names
    _created: itertools.count = field(default_factory=itertools.count)  # type: ignore[type-arg]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _authorised(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {API_KEY}"

    def seen_where(self, method: str, path_prefix: str = "/") -> list[Seen]:
        return [seen for seen in self.seen if seen.method == method and seen.path.startswith(path_prefix)]

    def add_number(
        self, *, provider: str = "vapi", created_at: datetime | None = None, **fields: Any
    ) -> dict[str, Any]:
        """A number on the account, as Vapi would list it (checked against the SDK's response type).
        `fields` are its JSON fields (assistantId, squadId, server, ...)."""
        index = next(self._created)
        created = created_at or T0 + timedelta(minutes=index)
        number: dict[str, Any] = {
            "id": f"pn-{index:04d}-{secrets.token_hex(4)}",
            "orgId": VAPI_ORG_ID,
            "provider": provider,
            "status": "active",
            "number": f"+1415555{index:04d}",
            "createdAt": iso(created),
            "updatedAt": iso(created),
            **({"twilioAccountSid": "AC" + "0" * 32} if provider == "twilio" else {}),
            **fields,
        }
        PHONE_NUMBER_TYPES[provider][0].model_validate(number)
        self.numbers[number["id"]] = number
        return number

    def add_credential(
        self, credential_id: str, authentication_plan: dict[str, Any], provider: str = "webhook"
    ) -> None:
        credential = {
            "id": credential_id,
            "orgId": VAPI_ORG_ID,
            "provider": provider,
            "authenticationPlan": authentication_plan,
            "authenticationSession": {},
            "createdAt": iso(T0),
            "updatedAt": iso(T0),
        }
        if provider == "webhook":
            WebhookCredential.model_validate(credential)
        self.credentials[credential_id] = credential

    def add_assistant(self, assistant_id: str, server_url: str | None = None) -> None:
        assistant: dict[str, Any] = {
            "id": assistant_id,
            "orgId": VAPI_ORG_ID,
            "name": assistant_id,
            "createdAt": iso(T0),
            "updatedAt": iso(T0),
        }
        if server_url is not None:
            assistant["server"] = {"url": server_url}
        Assistant.model_validate(assistant)
        self.assistants[assistant_id] = assistant

    def add_workflow(
        self, workflow_id: str, server: dict[str, Any] | None = None, control_enabled: bool = True
    ) -> None:
        workflow: dict[str, Any] = {
            "id": workflow_id,
            "orgId": VAPI_ORG_ID,
            "name": workflow_id,
            "createdAt": iso(T0),
            "updatedAt": iso(T0),
            "nodes": [],
            "edges": [],
            "monitorPlan": {"controlEnabled": control_enabled},
        }
        if server is not None:
            workflow["server"] = server
        Workflow.model_validate(workflow)
        self.workflows[workflow_id] = workflow

    def add_call(
        self,
        call_id: str,
        control_url: str | None = None,
        *,
        phone_number_id: str | None = None,
        org_id: str | None = None,
        status: str = "in-progress",
        created_at: datetime | None = None,
        started_at: datetime | None = None,
        ended_at: datetime | None = None,
        cost: float | None = None,
    ) -> dict[str, Any]:
        """A call as Vapi records it: on a number, or (a web call) with the org it was admitted for;
        `ended` with its times once it is over."""
        created = created_at or T0
        the_call: dict[str, Any] = {
            "id": call_id,
            "orgId": VAPI_ORG_ID,
            "type": "inboundPhoneCall" if phone_number_id else "webCall",
            "status": status,
            "createdAt": iso(created),
            "updatedAt": iso(ended_at or created),
        }
        if control_url is not None:
            the_call["monitor"] = {"controlUrl": control_url}
        if phone_number_id is not None:
            the_call["phoneNumberId"] = phone_number_id
        if org_id is not None:
            the_call["assistantOverrides"] = {"variableValues": {"org_id": org_id}}
        for name, value in (("startedAt", started_at), ("endedAt", ended_at)):
            if value is not None:
                the_call[name] = iso(value)
        if status == "ended":
            the_call["endedReason"] = "customer-ended-call"
        if cost is not None:
            the_call["cost"] = cost
        Call.model_validate(the_call)
        self.calls[call_id] = the_call
        return the_call

    def _refused(self, request: Request, body: Any = None) -> Response | None:
        """Record the request; the answer when it is not to be served (no key, or failing on purpose)."""
        self.seen.append(Seen(request.method, request.url.path, body, dict(request.headers)))
        if not self._authorised(request):
            return JSONResponse({"message": "Unauthorized", "statusCode": 401}, status_code=401)
        status = self.failing.get(f"{request.method} {request.url.path}")
        if status is not None:
            return JSONResponse({"message": "failing on purpose", "statusCode": status}, status_code=status)
        return None

    def _listing_problems(
        self, query: dict[str, str], allowed: frozenset[str]
    ) -> tuple[list[str], dict[str, datetime]]:
        """What is wrong with a listing's query (names the SDK would not send, a bad limit or date),
        and its createdAt/updatedAt bounds."""
        problems = [f"unknown query parameter {name!r}" for name in sorted(set(query) - allowed)]
        bounds: dict[str, datetime] = {}
        for name, value in query.items():
            if name == "limit":
                try:
                    valid = 0 <= float(value) <= LIST_LIMIT_MAX
                except ValueError:
                    valid = False
                if not valid:
                    problems.append(f"limit must be a number in 0..{LIST_LIMIT_MAX}, got {value!r}")
            elif name in allowed and name not in CALL_FILTERS:
                try:
                    bounds[name] = datetime.fromisoformat(value)
                except ValueError:
                    problems.append(f"{name} must be an ISO 8601 date-time, got {value!r}")
        return problems, bounds

    def _listed(self, items: list[dict[str, Any]], query: dict[str, str], bounds: dict[str, datetime]) -> Response:
        compare = {
            "Gt": lambda a, b: a > b,
            "Lt": lambda a, b: a < b,
            "Ge": lambda a, b: a >= b,
            "Le": lambda a, b: a <= b,
        }
        chosen = [
            item
            for item in items
            if all(compare[name[-2:]](datetime.fromisoformat(item[name[:9]]), bound) for name, bound in bounds.items())
            and all(item.get(name) == query[name] for name in CALL_FILTERS if name in query)
        ]
        chosen.sort(key=lambda item: item["createdAt"], reverse=self.list_order == "DESC")
        limit = int(float(query.get("limit", LIST_LIMIT_DEFAULT)))
        return JSONResponse(chosen[:limit])

    def _bad_request(self, problems: list[str]) -> Response:
        self.invalid.extend(problems)
        return JSONResponse({"message": problems, "error": "Bad Request", "statusCode": 400}, status_code=400)

    async def list_phone_numbers(self, request: Request) -> Response:
        query = dict(request.query_params)
        if (refused := self._refused(request, query)) is not None:
            return refused
        problems, bounds = self._listing_problems(query, LIST_PARAMETERS)
        if problems:
            return self._bad_request(problems)
        return self._listed(list(self.numbers.values()), query, bounds)

    async def list_calls(self, request: Request) -> Response:
        query = dict(request.query_params)
        if (refused := self._refused(request, query)) is not None:
            return refused
        problems, bounds = self._listing_problems(query, CALL_LIST_PARAMETERS)
        if problems:
            return self._bad_request(problems)
        return self._listed(list(self.calls.values()), query, bounds)

    async def update_phone_number(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        if (refused := self._refused(request, body)) is not None:
            return refused
        number = self.numbers.get(request.path_params["number_id"])
        if number is None:
            return JSONResponse({"message": "Not Found", "statusCode": 404}, status_code=404)
        problems = (
            []
            if body.get("provider", number["provider"]) == number["provider"]
            else [f"provider {body.get('provider')!r} is not the number's ({number['provider']!r})"]
        )
        problems += check_request(PHONE_NUMBER_TYPES[number["provider"]][1], body, ignore=frozenset({"provider"}))
        if problems:
            self.invalid.extend(problems)
            return JSONResponse({"message": problems, "error": "Bad Request", "statusCode": 400}, status_code=400)
        for name, value in body.items():
            if name == "provider":
                continue
            if value is None:
                number.pop(name, None)
            else:
                number[name] = value
        number["updatedAt"] = iso(datetime.now(UTC))
        return JSONResponse(number)

    def _one(self, request: Request, store: dict[str, dict[str, Any]], param: str) -> Response:
        """GET of one object by id: as stored, or Vapi's 404."""
        if (refused := self._refused(request)) is not None:
            return refused
        found = store.get(request.path_params[param])
        return JSONResponse(found or {"message": "Not Found", "statusCode": 404}, status_code=200 if found else 404)

    async def get_credential(self, request: Request) -> Response:
        return self._one(request, self.credentials, "credential_id")

    async def get_assistant(self, request: Request) -> Response:
        return self._one(request, self.assistants, "assistant_id")

    async def get_workflow(self, request: Request) -> Response:
        return self._one(request, self.workflows, "workflow_id")

    async def get_call(self, request: Request) -> Response:
        return self._one(request, self.calls, "call_id")

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
            "orgId": VAPI_ORG_ID,
            "provider": "vapi",
            "status": "active",
            "number": f"+1{body.get('numberDesiredAreaCode', '415')}555{len(self.numbers):04d}",
            "createdAt": "2026-11-29T00:00:00.000Z",
            "updatedAt": "2026-11-29T00:00:00.000Z",
            **{k: v for k, v in body.items() if k != "provider"},
        }
        self.numbers[number_id] = number
        return JSONResponse(number, status_code=201)

    async def create_call(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        if (refused := self._refused(request, body)) is not None:
            return refused
        problems = check_request(CreateCallDto, body)
        if problems:
            self.invalid.extend(problems)
            return JSONResponse({"message": problems, "error": "Bad Request", "statusCode": 400}, status_code=400)
        if self.call_mode == "refuse":
            message = ["customer.number must be a valid phone number in the E.164 format"]
            return JSONResponse({"message": message, "error": "Bad Request", "statusCode": 400}, status_code=400)
        if self.call_mode == "fail":
            return JSONResponse({"message": "Internal server error", "statusCode": 500}, status_code=500)
        call_id = str(uuid.uuid4())
        now = iso(datetime.now(UTC))
        the_call = {
            "id": call_id,
            "orgId": VAPI_ORG_ID,
            "type": "outboundPhoneCall",
            "status": "queued",
            "createdAt": now,
            "updatedAt": now,
            "cost": 0,
            "monitor": {"controlUrl": f"{self.control_base_url}/{call_id}/control"},
            **{k: v for k, v in body.items() if k != "name" or v is not None},
        }
        Call.model_validate(the_call)
        self.calls[call_id] = the_call
        if self.call_mode == "hang":
            await asyncio.sleep(self.hang_s)
        return JSONResponse(the_call, status_code=201)

    async def delete_phone_number(self, request: Request) -> Response:
        number_id = request.path_params["number_id"]
        self.seen.append(Seen("DELETE", request.url.path, None, dict(request.headers)))
        if not self._authorised(request):
            return JSONResponse({"message": "Unauthorized"}, status_code=401)
        number = self.numbers.pop(number_id, None)
        return JSONResponse(number or {"message": "Not Found"}, status_code=200 if number else 404)


@asynccontextmanager
async def fake_vapi_api_server() -> AsyncIterator[FakeVapiApi]:
    fake = FakeVapiApi(port=free_port())
    routes = [
        Route("/phone-number", fake.create_phone_number, methods=["POST"]),
        Route("/phone-number", fake.list_phone_numbers, methods=["GET"]),
        Route("/phone-number/{number_id}", fake.delete_phone_number, methods=["DELETE"]),
        Route("/phone-number/{number_id}", fake.update_phone_number, methods=["PATCH"]),
        Route("/credential/{credential_id}", fake.get_credential, methods=["GET"]),
        Route("/assistant/{assistant_id}", fake.get_assistant, methods=["GET"]),
        Route("/workflow/{workflow_id}", fake.get_workflow, methods=["GET"]),
        Route("/call", fake.list_calls, methods=["GET"]),
        Route("/call/{call_id}", fake.get_call, methods=["GET"]),
        Route("/call", fake.create_call, methods=["POST"]),
    ]
    async with served(Starlette(routes=routes), fake.port):
        yield fake
