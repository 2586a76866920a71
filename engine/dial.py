"""Placing an outbound call through the engine (POST /api/calls): reserve, then ask Vapi, then
adopt Vapi's call id for the hold.

Vapi sends no assistant-request for a call placed with `POST /call`, so the credit check has to
happen on the way out. Under the client's Idempotency-Key (engine/idempotent_requests.once):

1. The number must be the org's own, active (else `phone_number_unknown`: nothing reserved).
2. A hold is reserved under the request's *reservation id* (engine/idempotency.dial_reservation_id,
   one per key: every attempt of the request reserves the same hold), refusing what the org cannot
   fund or is over `max_concurrent_calls` for: nothing reserved, no call placed, the key free again.
3. The dial record (the org's idem hash) says `dialling` before Vapi is asked, so no later attempt
   of the same key ever asks again: Vapi's POST /call has no idempotency key of its own.
4. Vapi is asked once, with the engine's part merged into the call's `assistantOverrides`
   (engine/call_server.admission_overrides: the engine as the call's server, its messages,
   control, `maxDurationSeconds` from the credit, `variableValues.org_id`) and the reservation id
   in `variableValues.credit_engine_reservation_id`: Vapi echoes the overrides on every message's
   `call`, so the webhook can find the hold before, or without, step 5.
5. Vapi's call id is adopted for the hold (lua/hold_adopt.lua, atomic): `placed`.

What can go wrong, and what is done:
- Vapi answers that it did not place the call (a 4xx or 5xx): the hold is released (hold_release,
  once) and the result `vapi_refused` is kept for the key. Should Vapi have placed it after all,
  its first status-update finds no hold to adopt and admits it as any call on the org's number
  (billed and killable; webapp/vapi.py).
- Vapi does not answer (a timeout, a broken connection, a 2xx without a call): whether the call
  was placed is unknown. The hold is *kept*, not released: if the call exists, its first message
  adopts the hold and the call is billed and ended like any other; if it does not, the hold expires
  (at its funded time plus the report slack), charging nothing since the call never started. The
  result `vapi_no_answer` is kept for the key, so no retry places a second call; the platform may
  place it again with a new key once it knows the first did not happen.
- The process dies after Vapi answered, before step 5: the call runs with the reservation id in its
  overrides, and its first message (status-update, end-of-call-report) adopts the hold. A retry of
  the key (after CREDIT_ENGINE_IDEMPOTENT_CLAIM_STALE_S) reads the dial record: `placed` answers
  the call, `dialling` answers `vapi_no_answer`; never a second call.
"""

import logging
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Protocol

from credit_engine.engine import idempotent_requests as claims
from credit_engine.engine import validate
from credit_engine.engine.call_server import RESERVATION_VARIABLE, admission_overrides
from credit_engine.engine.config import Settings
from credit_engine.engine.decisions import decide, restoring
from credit_engine.engine.errors import InvalidInput
from credit_engine.engine.holds import Reservation, Unfunded, release_call, reserve_call
from credit_engine.engine.idempotency import (
    call_state_key,
    dial_record_key,
    dial_reservation_id,
    is_dial_reservation_id,
)
from credit_engine.engine.phone_numbers import number_owner
from credit_engine.engine.replies import asyncio_reply
from credit_engine.engine.results import Money, Outcome
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.vapi_account import VapiError

log = logging.getLogger(__name__)

OPERATION = "dial"
E164 = re.compile(r"\+[1-9][0-9]{6,14}")
VAPI_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
call_name_length_max = 40  # Vapi's CreateCallDTO.name
reason_chars_max = 300


class CallPlacer(Protocol):
    """Vapi's POST /call (engine/vapi_account.VapiAccount.create_call)."""

    async def create_call(self, body: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class DialRequest:
    """What the platform asked for: its own parts of Vapi's CreateCallDTO."""

    phone_number_id: str
    customer: dict[str, Any]
    assistant_id: str | None = None
    assistant: dict[str, Any] | None = None
    assistant_overrides: dict[str, Any] | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def platform_server_url(self) -> str | None:
        """The server URL the platform named for the call (its overrides', else its transient
        assistant's): the engine takes the call's messages and forwards them there."""
        for holder in (self.assistant_overrides, self.assistant):
            server = holder.get("server") if isinstance(holder, dict) else None
            url = server.get("url") if isinstance(server, dict) else None
            if isinstance(url, str) and url:
                return url
        return None

    @classmethod
    def parse(cls, body: dict[str, Any]) -> "DialRequest":
        """The request body, checked field by field (InvalidInput names the field)."""
        phone_number_id = body.get("phone_number_id")
        if not isinstance(phone_number_id, str) or VAPI_ID.fullmatch(phone_number_id) is None:
            raise InvalidInput("phone_number_id", "a Vapi phone number id registered to this org is required")
        customer = body.get("customer")
        if not isinstance(customer, dict) or not isinstance(customer.get("number"), str):
            raise InvalidInput("customer", 'an object with the number to call is required: {"number": "+1..."}')
        if E164.fullmatch(customer["number"]) is None:
            raise InvalidInput("customer.number", "must be an E.164 number (+ and 7-15 digits)")
        chosen = [name for name in ("assistant_id", "assistant") if body.get(name) is not None]
        if len(chosen) != 1:
            raise InvalidInput("assistant_id", "exactly one of assistant_id and assistant is required")
        assistant_id, assistant = body.get("assistant_id"), body.get("assistant")
        if assistant_id is not None and (not isinstance(assistant_id, str) or VAPI_ID.fullmatch(assistant_id) is None):
            raise InvalidInput("assistant_id", "must be a Vapi assistant id")
        if assistant is not None and (not isinstance(assistant, dict) or not assistant):
            raise InvalidInput("assistant", "must be a Vapi assistant (CreateAssistantDTO) object")
        overrides = body.get("assistant_overrides")
        if overrides is not None and not isinstance(overrides, dict):
            raise InvalidInput("assistant_overrides", "must be a Vapi AssistantOverrides object")
        name = body.get("name")
        if name is not None and (not isinstance(name, str) or not 1 <= len(name) <= call_name_length_max):
            raise InvalidInput("name", f"must be 1-{call_name_length_max} characters")
        return cls(phone_number_id, customer, assistant_id, assistant, overrides, name)


class Dialled(Enum):
    """How a dial ended. The refusals before Vapi was asked carry the reservation's outcome name."""

    placed = "placed"
    vapi_refused = "vapi_refused"  # Vapi said no: the hold released, the key spent
    vapi_no_answer = "vapi_no_answer"  # unknown whether Vapi placed it: the hold kept, the key spent
    phone_number_unknown = "phone_number_unknown"
    insufficient_funds = Outcome.insufficient_funds.name
    too_many_calls = Outcome.too_many_calls.name
    outbox_full = Outcome.outbox_full.name
    org_unknown = Outcome.org_unknown.name


KEPT = frozenset({Dialled.placed, Dialled.vapi_refused, Dialled.vapi_no_answer})  # what a replay gets back


@dataclass(frozen=True)
class Dial:
    """A dial's result, and the record its claim keeps (replays decode the same fields)."""

    outcome: Dialled
    reservation_id: str
    call_id: str | None = None  # placed: Vapi's id of the call
    hold_pence: int = 0
    max_duration_s: int = 0
    status: str | None = None  # placed: the call's status as Vapi answered ("queued")
    vapi_status: int | None = None  # vapi_refused: Vapi's HTTP status
    reason: str | None = None  # vapi_refused, vapi_no_answer: what Vapi said, or did not
    available_pence: int | None = None  # insufficient_funds: what the org had
    control_url: str | None = field(default=None, compare=False)  # this run only: never kept

    def kept(self) -> bool:
        return self.outcome in KEPT

    def record(self) -> dict[str, Any]:
        record = {**asdict(self), "outcome": self.outcome.value}
        del record["control_url"]
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Dial":
        return cls(**{**record, "outcome": Dialled(record["outcome"])})


async def dial(rt: Runtime, vapi: CallPlacer, org_id: str, key: str, request: DialRequest) -> claims.Once[Dial]:
    """Place the call under the client's key, once (engine/idempotent_requests.once). A replay of
    "no answer" (kept before Vapi was asked) becomes the call once its first message adopted it."""
    once = await claims.once(
        rt,
        org_id,
        OPERATION,
        key,
        request.as_dict(),
        lambda attempt: _run(rt, vapi, org_id, key, request, attempt),
        Dial.from_record,
    )
    if once.claim != claims.Claim.replay or once.result is None or once.result.outcome != Dialled.vapi_no_answer:
        return once
    earlier = await dial_record(rt, org_id, once.result.reservation_id)
    if earlier is None or earlier.outcome != Dialled.placed:
        return once
    await claims.replace(rt, org_id, OPERATION, key, earlier.record())
    return claims.Once(claims.Claim.replay, earlier)


async def _run(
    rt: Runtime, vapi: CallPlacer, org_id: str, key: str, request: DialRequest, attempt: claims.Attempt
) -> Dial:
    reservation_id = dial_reservation_id(org_id, key)
    earlier = await dial_record(rt, org_id, reservation_id)
    if earlier is not None:  # an earlier attempt of this key asked Vapi: never again
        return await _finish_earlier(rt, org_id, earlier)
    owner = await number_owner(rt, request.phone_number_id, active_only=True)
    if owner is None or owner.org_id != org_id:
        return Dial(Dialled.phone_number_unknown, reservation_id)
    attempt.changed = True  # from here every step is idempotent under the key
    reservation = await restoring(rt, org_id, lambda: reserve_call(rt, org_id, reservation_id))
    if reservation.outcome not in (Outcome.ok, Outcome.replayed):
        return _not_reserved(reservation_id, reservation)
    if not await _mark_dialling(rt, org_id, reservation_id):
        earlier = await dial_record(rt, org_id, reservation_id)
        assert earlier is not None
        return await _finish_earlier(rt, org_id, earlier)
    attempt.asked_outside = True
    # Kept in Postgres before Vapi is asked (the dial record above is Redis's, which may be lost):
    # whatever happens next, a retry of the key replays a result and never asks Vapi again. A
    # process dying while Vapi answers leaves "no answer": the hold kept, adopted by the call's
    # first message if Vapi placed it, expiring at no charge if not.
    interim = Dial(Dialled.vapi_no_answer, reservation_id, reason="the request ended while Vapi was asked")
    await claims.finish(rt, org_id, OPERATION, key, interim.record())
    dialled = await _ask_vapi(rt, vapi, org_id, reservation_id, reservation.max_duration_s, request)
    await claims.replace(rt, org_id, OPERATION, key, dialled.record())
    return dialled


async def _ask_vapi(
    rt: Runtime, vapi: CallPlacer, org_id: str, reservation_id: str, funded_s: int, request: DialRequest
) -> Dial:
    body = create_call_body(rt.settings, org_id, reservation_id, funded_s, request)
    try:
        answer = await vapi.create_call(body)
    except VapiError as error:
        if error.status is None or 200 <= error.status < 300 or error.status in GATEWAY_STATUSES:
            return _no_answer(org_id, reservation_id, str(error))
        return await _refused(rt, org_id, reservation_id, error)
    call_id = answer.get("id")
    if not isinstance(call_id, str) or not validate_call_id(call_id):
        return _no_answer(org_id, reservation_id, "Vapi answered without a usable call id")
    placed = await adopt(rt, org_id, reservation_id, call_id)
    return Dial(
        Dialled.placed,
        reservation_id,
        call_id,
        placed.hold_pence,
        placed.max_duration_s,
        status=answer.get("status") if isinstance(answer.get("status"), str) else None,
        control_url=_control_url(answer),
    )


# A gateway's answer (502, 503, 504) does not say Vapi placed no call: treated as no answer.
GATEWAY_STATUSES = frozenset({502, 503, 504})


async def _finish_earlier(rt: Runtime, org_id: str, earlier: Dial) -> Dial:
    """An earlier attempt's dial, finished: a refusal's release is made again (it is idempotent,
    and that attempt may have died between writing the record and releasing)."""
    if earlier.outcome == Dialled.vapi_refused:
        await release_call(rt, org_id, earlier.reservation_id)
    return earlier


def validate_call_id(call_id: str) -> bool:
    try:
        validate.call_id(call_id)
    except InvalidInput:
        return False
    return not is_dial_reservation_id(call_id)


def _not_reserved(reservation_id: str, reservation: Reservation) -> Dial:
    if reservation.outcome == Outcome.call_already_resolved:
        # The reservation was resolved (adopted, or released) but Redis has no dial record (lost
        # with Redis, past its window): whether a call was placed is not known here.
        return Dial(Dialled.vapi_no_answer, reservation_id, reason="this request was dialled before")
    try:
        outcome = Dialled(reservation.outcome.name)
    except ValueError:
        raise AssertionError(f"hold_reserve answered {reservation.outcome.name} to a refusing reservation") from None
    return Dial(outcome, reservation_id, available_pence=reservation.money.available_pence)


def _no_answer(org_id: str, reservation_id: str, reason: str) -> Dial:
    log.warning(
        "vapi did not say whether it placed call %s of org %s (%s): its hold is kept until the call reports or it expires",
        reservation_id,
        org_id,
        reason,
    )
    return Dial(Dialled.vapi_no_answer, reservation_id, reason=reason[:reason_chars_max])


async def _refused(rt: Runtime, org_id: str, reservation_id: str, error: VapiError) -> Dial:
    """Vapi answered that it placed no call: the hold is released (once: hold_release resolves a
    hold at most once), and the dial record says so for any later attempt of the key. Unless the
    call's own first message adopted the hold meanwhile (Vapi placed it after all): then the call
    is the answer, and its hold, under Vapi's id, stays."""
    assert error.status is not None
    earlier = await dial_record(rt, org_id, reservation_id)
    if earlier is not None and earlier.outcome == Dialled.placed:
        log.warning(
            "vapi answered %s for call %s of org %s, which its first message adopted",
            error.status,
            reservation_id,
            org_id,
        )
        return earlier
    await _write_record(rt, org_id, reservation_id, f"refused|{error.status}", overwrite=True)
    released = await release_call(rt, org_id, reservation_id)
    log.warning("vapi refused call %s of org %s (%s): hold %s", reservation_id, org_id, error, released.outcome.name)
    return Dial(Dialled.vapi_refused, reservation_id, vapi_status=error.status, reason=str(error)[:reason_chars_max])


def _control_url(answer: dict[str, Any]) -> str | None:
    monitor = answer.get("monitor")
    url = monitor.get("controlUrl") if isinstance(monitor, dict) else None
    return url if isinstance(url, str) else None


def create_call_body(
    settings: Settings, org_id: str, reservation_id: str, funded_duration_s: int, request: DialRequest
) -> dict[str, Any]:
    """Vapi's CreateCallDTO: the platform's call with the engine's part merged into its overrides
    (engine/call_server.admission_overrides) and the reservation id among its variables."""
    assistant = request.assistant or {}
    messages = assistant.get("serverMessages")
    overrides = admission_overrides(
        settings,
        org_id,
        funded_duration_s,
        request.assistant_overrides,
        messages if isinstance(messages, list) else None,
    )
    overrides["variableValues"][RESERVATION_VARIABLE] = reservation_id
    body: dict[str, Any] = {
        "phoneNumberId": request.phone_number_id,
        "customer": request.customer,
        "assistantOverrides": overrides,
    }
    if request.assistant_id is not None:
        body["assistantId"] = request.assistant_id
    else:
        body["assistant"] = request.assistant
    if request.name is not None:
        body["name"] = request.name
    return body


@dataclass(frozen=True)
class Adoption:
    outcome: Outcome  # ok, replayed, org_unknown, idempotency_conflict, hold_not_found
    money: Money
    hold_pence: int
    max_duration_s: int


async def adopt_call(rt: Runtime, org_id: str, reservation_id: str, call_id: str) -> Adoption:
    """Move the reservation's hold to Vapi's call id (lua/hold_adopt.lua), once."""
    validate.org_id(org_id)
    validate.call_id(call_id)
    assert is_dial_reservation_id(reservation_id)
    keys = rt.keys.org(org_id)
    result = await decide(
        rt,
        "hold_adopt",
        org_id,
        [keys.org, keys.holds, keys.idem, keys.idem_exp, keys.outbox],
        [
            rt.clock.script_arg(),
            org_id,
            reservation_id,
            call_id,
            call_state_key(org_id, reservation_id),
            call_state_key(org_id, call_id),
            dial_record_key(org_id, reservation_id),
            rt.settings.idempotency_ttl_ms,
        ],
        tail_length=2,
        operation="adopt",
    )
    hold_pence, max_duration_s = result.tail
    if result.outcome not in (Outcome.ok, Outcome.replayed):
        assert (hold_pence, max_duration_s) == (0, 0)
    return Adoption(result.outcome, result.money, hold_pence, max_duration_s)


async def adopt(rt: Runtime, org_id: str, reservation_id: str, call_id: str) -> Reservation:
    """Vapi placed the call: it is held under its own id from now on, whatever came first.

    - adopted now, or before (the webhook saw the call first): the reservation's hold;
    - the reservation holds nothing (it expired, or a 5xx released it and Vapi placed the call
      anyway): the call is reserved as any call running on the org's number (unfunded if it must
      be: the kill switch then ends it at once, and its report bills it);
    - the call id has a hold of its own already (seen before its reservation could be found): the
      reservation's hold is released, the call keeps its own."""
    adoption = await restoring(rt, org_id, lambda: adopt_call(rt, org_id, reservation_id, call_id))
    if adoption.outcome in (Outcome.ok, Outcome.replayed):
        return Reservation(adoption.outcome, adoption.money, adoption.hold_pence, adoption.max_duration_s)
    if adoption.outcome == Outcome.idempotency_conflict:
        released = await release_call(rt, org_id, reservation_id)
        log.warning("call %s already had a hold of its own: its reservation %s %s", call_id, reservation_id, released)
    return await reserve_call(rt, org_id, call_id, Unfunded.record)


async def _mark_dialling(rt: Runtime, org_id: str, reservation_id: str) -> bool:
    """Write the dial record `dialling` unless there is one: False when another attempt wrote one."""
    return await _write_record(rt, org_id, reservation_id, "dialling", overwrite=False)


async def _write_record(rt: Runtime, org_id: str, reservation_id: str, value: str, *, overwrite: bool) -> bool:
    keys = rt.keys.org(org_id)
    field_name = dial_record_key(org_id, reservation_id)
    expires_ms = await rt.clock.now_ms(rt.redis) + rt.settings.idempotency_ttl_ms
    # Its expiry first, then the record (no MULTI: a Redis Cluster client has none): a crash between
    # leaves an expiry for a record that is not there, which the pruning passes over harmlessly,
    # never a record that is kept for good.
    await asyncio_reply(rt.redis.zadd(keys.idem_exp, {field_name: expires_ms}))
    if overwrite:
        await asyncio_reply(rt.redis.hset(keys.idem, field_name, value))
        return True
    return bool(await asyncio_reply(rt.redis.hsetnx(keys.idem, field_name, value)))


async def dial_record(rt: Runtime, org_id: str, reservation_id: str) -> Dial | None:
    """What an earlier attempt of the key did at Vapi, from its dial record; None if it never asked."""
    text = await asyncio_reply(rt.redis.hget(rt.keys.org(org_id).idem, dial_record_key(org_id, reservation_id)))
    if text is None:
        return None
    kind, _, rest = str(text).partition("|")
    if kind == "placed":
        call_id, hold_pence, max_duration_s = rest.split("|")
        return Dial(Dialled.placed, reservation_id, call_id, int(hold_pence), int(max_duration_s))
    if kind == "refused":
        status = int(rest)
        return Dial(Dialled.vapi_refused, reservation_id, vapi_status=status, reason=f"Vapi answered {status}")
    assert kind == "dialling", text
    return Dial(
        Dialled.vapi_no_answer, reservation_id, reason="an earlier attempt asked Vapi and never learnt its answer"
    )
