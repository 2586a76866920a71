"""Reading request bodies and fields, refusing bad input with a 4xx that names the field."""

import json
import re
from typing import Any

import orjson
from starlette.requests import Request

from credit_engine.engine import limits
from credit_engine.engine.keys import is_idempotency_key
from credit_engine.webapp.responses import ApiError

JSON_CONTENT_TYPE = re.compile(r"^application/([a-z0-9.+-]*\+)?json\s*(;.*)?$", re.IGNORECASE)


def parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses integers beyond 64 bits; the standard parser reads them, so that an absurd
    # amount is refused for what it is (a 422 naming the field) rather than as broken JSON.
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
    if _has_lone_surrogate(parsed):  # orjson refuses them; a string with one cannot reach Redis or Postgres
        raise ApiError(
            400, "invalid_json", "the request body holds a string that is not valid Unicode (a lone surrogate)"
        )
    return parsed


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string in a parsed JSON value (keys included) holds a lone UTF-16 surrogate.
    Only the standard parser's output is walked: json.loads already bounded its depth."""
    if isinstance(value, str):
        return _LONE_SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    return False


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def check_storable(body: dict[str, Any]) -> None:
    """A free-form request body kept in Postgres (its claim: POST /api/calls' assistant and
    overrides), whose jsonb holds no NUL character, and hashed with orjson, which writes no deeper
    than it must: both refused here, as bad input. (Every other body's fields are checked one by
    one, each refusal naming its field.)"""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limits.json_depth_max:
            raise ApiError(400, "invalid_json", f"the request body nests deeper than {limits.json_depth_max} levels")
        if isinstance(value, str):
            if "\x00" in value:
                raise ApiError(400, "invalid_json", "the request body holds a NUL character (\\u0000)")
        elif isinstance(value, dict):
            stack.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


def check_content_type(request: Request) -> None:
    content_type = request.headers.get("content-type")
    if content_type is not None and not JSON_CONTENT_TYPE.match(content_type):
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")


async def json_object(request: Request, allowed: set[str] | None = None) -> dict[str, Any]:
    """The body as a JSON object. With `allowed`, any other field is refused."""
    check_content_type(request)
    raw = await request.body()
    if not raw:
        body: Any = {}
    else:
        body = parse_json(raw)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "the request body must be a JSON object")
    if allowed is not None:
        for name in body:
            if name not in allowed:
                raise ApiError(422, "unknown_field", f"{name!r} is not a field of this request", field=str(name)[:100])
    return body


def whole_number(body: dict[str, Any], name: str, minimum: int, maximum: int, *, required: bool = True) -> int | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(422, "missing_field", f"{name} is required", field=name)
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, "invalid_field", f"{name} must be a whole number, got {type(value).__name__}", field=name)
    if not minimum <= value <= maximum:
        raise ApiError(422, "invalid_field", f"{name} must be between {minimum} and {maximum}", field=name)
    return value


def amount_pence(body: dict[str, Any], name: str = "amount_pence") -> int:
    value = whole_number(body, name, 1, limits.amount_pence_max)
    assert value is not None
    return value


def text(
    body: dict[str, Any],
    name: str,
    *,
    pattern: re.Pattern[str] | None = None,
    length_max: int = 200,
    required: bool = False,
) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(422, "missing_field", f"{name} is required", field=name)
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= length_max or not value.isprintable():
        raise ApiError(422, "invalid_field", f"{name} must be 1-{length_max} printable characters", field=name)
    if pattern is not None and pattern.fullmatch(value) is None:
        raise ApiError(422, "invalid_field", f"{name} has the wrong format", field=name)
    return value


def idempotency_key(request: Request) -> str:
    value = request.headers.get("idempotency-key")
    if value is None:
        raise ApiError(
            400, "missing_idempotency_key", "this request needs an Idempotency-Key header", field="Idempotency-Key"
        )
    if not is_idempotency_key(value):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1-255 printable ASCII characters without spaces",
            field="Idempotency-Key",
        )
    return value
