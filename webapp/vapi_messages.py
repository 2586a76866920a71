"""Reading Vapi server messages: `{"message": {"type": ..., "call": {...}, ...}}`.

Pure functions over parsed JSON, so they can be fuzzed. Only the envelope's shape is required
(a `message` object with a string `type`); every other field is read defensively, because Vapi
sends ~30 message types with hundreds of optional fields, and a field of the wrong type must make
us ignore that field, never fail the webhook. Where fields live (see shared/vapi-contract.md):
- the phone number: `call.phoneNumberId`, falling back to `phoneNumber.id`;
- the org we put in the call: `call.assistantOverrides.variableValues.org_id`;
- the reservation of a call the engine placed (engine/dial.py):
  `call.assistantOverrides.variableValues.credit_engine_reservation_id`;
- the call's times: message-level `startedAt`/`endedAt` (end-of-call-report), then `call.*`,
  then the undocumented message-level `durationSeconds`.
"""

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from credit_engine.engine import limits
from credit_engine.engine.call_server import RESERVATION_VARIABLE
from credit_engine.engine.errors import InvalidInput
from credit_engine.engine.vapi_calls import seconds_between
from credit_engine.engine.vapi_calls import vapi_time as _time


@dataclass(frozen=True)
class VapiMessage:
    type: str
    call_id: str | None
    phone_number_id: str | None
    org_id_hint: str | None  # assistantOverrides.variableValues.org_id
    assistant_id: str | None
    status: str | None
    control_url: str | None
    billed_seconds: int | None  # None: the message says nothing about the call's duration
    cost_usd: float | None
    ended_reason: str | None
    created_ms: int | None  # call.createdAt: how old the call is (a first sight of an old call is a replay)
    reservation_id: str | None = None  # a call the engine placed: the id its hold was reserved under


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any, length_max: int = 512) -> str | None:
    """A usable string: non-empty, bounded, and text that Redis and Postgres can store (no NUL,
    no lone surrogate, which a caller's own JSON parser may have let through)."""
    if not isinstance(value, str) or not 0 < len(value) <= length_max or "\x00" in value:
        return None
    try:
        value.encode()
    except UnicodeEncodeError:
        return None
    return value


def _ms(moment: datetime | None) -> int | None:
    if moment is None:
        return None
    return int(moment.timestamp()) * 1000 + moment.microsecond // 1000


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def billed_seconds(message: dict[str, Any], call: dict[str, Any]) -> int | None:
    """Whole seconds to bill, from the call's own times (per started second, in integers: a float
    of seconds would turn 256.001 s into 255.99999 and lose a second), else the undocumented
    `durationSeconds`. None when the message does not say how long the call ran, including a
    report with `endedAt` and no `startedAt`: the engine then bills what it saw of the call
    rather than nothing."""
    started = _time(message.get("startedAt")) or _time(call.get("startedAt"))
    ended = _time(message.get("endedAt")) or _time(call.get("endedAt"))
    if started is not None and ended is not None:
        return seconds_between(started, ended)
    duration = _number(message.get("durationSeconds"))
    if duration is not None:
        return min(max(0, math.ceil(duration)), limits.billed_seconds_max)
    return None


def parse_message(envelope: Any) -> VapiMessage:
    if not isinstance(envelope, dict) or not isinstance(envelope.get("message"), dict):
        raise InvalidInput("message", 'the body must be {"message": {...}} as Vapi sends it')
    message = envelope["message"]
    message_type = _str(message.get("type"), 100)
    if message_type is None:
        raise InvalidInput("message.type", "must be a string")
    call = _dict(message.get("call"))
    overrides = _dict(call.get("assistantOverrides"))
    variables = _dict(overrides.get("variableValues"))
    return VapiMessage(
        type=message_type,
        call_id=_str(call.get("id"), 256),
        phone_number_id=_str(call.get("phoneNumberId"), 256) or _str(_dict(message.get("phoneNumber")).get("id"), 256),
        org_id_hint=_str(variables.get("org_id"), 256),
        assistant_id=_str(call.get("assistantId"), 256),
        status=_str(message.get("status"), 100),
        control_url=_str(_dict(call.get("monitor")).get("controlUrl"), 2048),
        billed_seconds=billed_seconds(message, call),
        cost_usd=_number(message.get("cost")) if "cost" in message else _number(call.get("cost")),
        ended_reason=_str(message.get("endedReason"), 200) or _str(call.get("endedReason"), 200),
        created_ms=_ms(_time(call.get("createdAt"))),
        reservation_id=_str(variables.get(RESERVATION_VARIABLE), 256),
    )
