"""Vapi's webhook and the status-check pull endpoint.

Vapi always gets a 200 with the documented body for a message it sent (an assistant-request is
refused with a spoken `{"error": ...}`, never a 5xx or an empty error, and answered within
`assistant_request_budget_s`, well inside Vapi's 7.5 s). Messages carry no event id and may be
duplicated or reordered: everything is keyed by call.id, and every engine operation is
idempotent, so a duplicate is a replay and a late `status-update` after the report changes nothing.
"""

import asyncio
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from engine import keys as key_rules
from engine.errors import InvalidInput
from engine.attribution import Attribution, attribute, may_be_a_replay
from engine.call_server import admission_overrides
from engine.control import control_url_allowed
from engine.end_queue import end_unheld_call
# The default sentences (declared once, in engine/org_profiles.py); an org may set its own.
from engine.org_profiles import SPOKEN_BUSY, SPOKEN_NO_CREDIT, SPOKEN_NOT_SET_UP, SPOKEN_TRY_LATER  # noqa: F401
from engine.org_profiles import Refusal, refusal_text
from engine.holds import CallCheck, CallEvent, Reservation, Unfunded, check_call, commit_call, release_call, reserve_call
from engine.results import Money, Outcome
from engine.idempotency import call_state_key
from webapp.auth import vapi_authenticated
from webapp.context import AppContext, context
from webapp.requests import parse_json
from webapp.responses import ApiError, json_response
from webapp.vapi_messages import VapiMessage, parse_message

log = logging.getLogger(__name__)

assistant_request_budget_s = 5.0
message_budget_s = 15.0

ZERO_MONEY = Money(0, 0, 0, 0, 0)


async def _authenticated_body(request: Request) -> Any:
    ctx = context(request)
    raw = await request.body()
    if not vapi_authenticated(request, ctx.settings, raw):
        raise ApiError(401, "unauthorized", "send the webhook secret (X-Vapi-Secret or Bearer) or a valid HMAC signature")
    return parse_json(raw)


async def attribute_message(ctx: AppContext, message: VapiMessage) -> Attribution:
    """Which org pays for the message's call (engine/attribution.py has the rule)."""
    return await attribute(ctx.rt, ctx.calls, message.call_id, message.phone_number_id, message.org_id_hint)


async def webhook(request: Request) -> Response:
    ctx = context(request)
    envelope = await _authenticated_body(request)
    try:
        message = parse_message(envelope)
    except InvalidInput as error:  # not a Vapi message at all
        raise ApiError(400, "invalid_request", error.message, field=error.field) from None
    handler = HANDLERS.get(message.type)
    if handler is None:
        ctx.metrics.webhooks.labels(message.type[:40], "ignored").inc()
        return json_response({})
    budget_s = assistant_request_budget_s if message.type == "assistant-request" else message_budget_s
    try:
        body = await asyncio.wait_for(handler(ctx, message), timeout=budget_s)
    except Exception:
        log.exception("vapi %s for call %s failed", message.type, message.call_id)
        ctx.metrics.webhooks.labels(message.type, "error").inc()
        body = {"error": SPOKEN_TRY_LATER} if message.type == "assistant-request" else {}
        if message.type == "assistant-request":
            _release_later(ctx, message)
    return json_response(body)


_background: set["asyncio.Task[None]"] = set()


def _release_later(ctx: AppContext, message: VapiMessage) -> None:
    """The call was refused, but the hold may have been taken just before the deadline: release
    it (a call that never started is charged nothing), so it does not lock credit until it expires."""

    async def release() -> None:
        who = await attribute_message(ctx, message)
        if who.by_number and message.call_id is not None and key_rules.is_call_id(message.call_id):
            resolution = await release_call(ctx.rt, who.org_id, message.call_id)  # type: ignore[arg-type]
            log.warning("released the hold of refused call %s: %s", message.call_id, resolution.outcome.name)

    async def guarded() -> None:
        try:
            await asyncio.wait_for(release(), timeout=message_budget_s)
        except Exception:
            log.exception("could not release the hold of refused call %s; it will expire", message.call_id)

    task = asyncio.get_running_loop().create_task(guarded())
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _reserve(ctx: AppContext, org_id: str, call_id: str, unfunded: Unfunded = Unfunded.refuse) -> Reservation:
    reservation = await reserve_call(ctx.rt, org_id, call_id, unfunded)
    if reservation.outcome == Outcome.org_unknown and await ctx.bring_org_in(org_id):
        reservation = await reserve_call(ctx.rt, org_id, call_id, unfunded)
    ctx.metrics.decision("reserve", reservation.outcome.name)
    return reservation


async def assistant_request(ctx: AppContext, message: VapiMessage) -> dict[str, Any]:
    # Only a number admits a call here: an assistant-request is an inbound call to a bare number.
    # (A call's variableValues are the platform's text, never a reason to bill an org.)
    who = await attribute_message(ctx, message)
    assistant_id = who.assistant_id or ctx.settings.default_assistant_id
    if not who.by_number or not who.may_admit or assistant_id is None:
        log.warning("assistant-request for a number with no org, no assistant, or suspended: %r", message.phone_number_id)
        ctx.metrics.webhooks.labels(message.type, "unknown_number").inc()
        # A suspended (or assistant-less) number is still its org's: the org's sentence.
        return {"error": await refusal_text(ctx.rt, who.org_id if who.by_number else None, Refusal.not_set_up)}
    org_id = who.org_id
    assert org_id is not None
    if message.call_id is None or not key_rules.is_call_id(message.call_id):
        log.warning("assistant-request without a usable call.id for org %s", org_id)
        return {"error": await refusal_text(ctx.rt, org_id, Refusal.try_later)}
    if not ctx.guard.ready:
        ctx.metrics.webhooks.labels(message.type, "state_restoring").inc()
        return {"error": await refusal_text(ctx.rt, org_id, Refusal.try_later)}
    if await may_be_a_replay(ctx.rt, org_id, message.call_id, message.created_ms) is not False:
        # A call older than Redis's memory of resolutions, resolved (or Postgres cannot say): a
        # replay of an assistant-request Vapi stopped waiting for long ago. A hold now would be a
        # phantom of a finished call.
        log.warning("assistant-request for call %s of org %s, created before the idempotency window: refused",
                    message.call_id, org_id)  # fmt: skip
        ctx.metrics.webhooks.labels(message.type, "replayed_after_window").inc()
        return {"error": await refusal_text(ctx.rt, org_id, Refusal.try_later)}
    reservation = await _reserve(ctx, org_id, message.call_id)
    ctx.metrics.webhooks.labels(message.type, reservation.outcome.name).inc()
    if reservation.held and not reservation.funded:  # the call is already running unfunded, being ended
        return {"error": await refusal_text(ctx.rt, org_id, Refusal.no_credit)}
    if reservation.outcome in (Outcome.ok, Outcome.replayed):
        await _remember(ctx, message, org_id)
        # The engine is the call's server (engine/call_server.py): its messages come here, not to
        # a server URL the saved assistant may carry.
        return {
            "assistantId": assistant_id,
            "assistantOverrides": admission_overrides(ctx.settings, org_id, reservation.max_duration_s),
        }
    if reservation.outcome == Outcome.insufficient_funds:
        return {"error": await refusal_text(ctx.rt, org_id, Refusal.no_credit)}
    if reservation.outcome == Outcome.too_many_calls:
        return {"error": await refusal_text(ctx.rt, org_id, Refusal.busy)}
    return {"error": await refusal_text(ctx.rt, org_id, Refusal.try_later)}


async def _remember(ctx: AppContext, message: VapiMessage, org_id: str) -> None:
    """The org admitted the call (it holds it): index it, and keep its control URL."""
    assert message.call_id is not None
    control_url = _allowed_control_url(ctx, message, org_id)
    await ctx.calls.remember(message.call_id, org_id, control_url)


def _allowed_control_url(ctx: AppContext, message: VapiMessage, org_id: str) -> str | None:
    """The call's control URL if it is one of Vapi's (https on CREDIT_ENGINE_CONTROL_URL_HOSTS):
    the kill switch sends the control token there, so a URL a payload made up is never kept."""
    control_url = message.control_url
    if control_url is not None and not control_url_allowed(ctx.settings, control_url):
        log.warning("call %s of org %s names a control URL not on Vapi's hosts; not kept", message.call_id, org_id)
        ctx.metrics.webhooks.labels(message.type, "control_url_refused").inc()
        return None
    return control_url


async def status_update(ctx: AppContext, message: VapiMessage) -> dict[str, Any]:
    if message.status not in ("in-progress", "ended"):
        return {}
    who = await _payer(ctx, message)
    if who is None:
        return {}
    org_id = who.org_id
    assert org_id is not None and message.call_id is not None
    event = CallEvent.start if message.status == "in-progress" else CallEvent.end
    checked = await check_call(ctx.rt, org_id, message.call_id, event)
    if checked.outcome == Outcome.org_unknown and await ctx.bring_org_in(org_id):
        checked = await check_call(ctx.rt, org_id, message.call_id, event)
    if checked.outcome == Outcome.hold_not_found and event == CallEvent.start:
        checked = await _first_sight(ctx, message, who, org_id)
    if checked.outcome == Outcome.ok:
        await _remember(ctx, message, org_id)
    ctx.metrics.webhooks.labels(f"{message.type}:{message.status}", checked.outcome.name).inc()
    return {}


async def _payer(ctx: AppContext, message: VapiMessage) -> Attribution | None:
    """The org that pays for the message's call; None (counted, logged, handled) when there is
    no usable call id or no org admitted the call."""
    if message.call_id is None or not key_rules.is_call_id(message.call_id):
        log.warning("%s without a usable call id (%r): billed to nobody", message.type, message.call_id)
        ctx.metrics.webhooks.labels(message.type, "unknown_call").inc()
        return None
    who = await attribute_message(ctx, message)
    if not who.known:
        await _unattributed(ctx, message)
        return None
    return who


async def _first_sight(ctx: AppContext, message: VapiMessage, who: Attribution, org_id: str) -> CallCheck:
    """A live call with no hold: an outbound call, a lost assistant-request, a number with an
    assistant attached at Vapi. Admitted if it may be; a call that cannot be funded (short of
    credit, at max_concurrent_calls, outbox full, a suspended number) gets an unfunded hold, so
    the kill switch ends it at once, it counts against the limit while it lives and its report
    bills it. A call resolved before (Redis, else Postgres: Redis forgets after its idempotency
    window) is not taken again: it is only ended, so a replayed status-update locks no credit."""
    call_id = message.call_id
    assert call_id is not None
    not_found = CallCheck(Outcome.hold_not_found, ZERO_MONEY, False, 0, 0, 0, False, False)
    if not who.by_number:
        return await _resolved_before(ctx, message, org_id, not_found)
    replay = await may_be_a_replay(ctx.rt, org_id, call_id, message.created_ms)
    if replay is None:
        # An old call and Postgres cannot say whether it was resolved: a hold now could be a
        # phantom of a finished call (locking credit, settled twice by a replayed report).
        log.warning("call %s of org %s first seen live; cannot tell if it was resolved (postgres away): ending it",
                    call_id, org_id)  # fmt: skip
        await _end_unheld(ctx, message, None, "cannot_check")
        return not_found
    if replay:
        return await _resolved_before(ctx, message, org_id, not_found)
    # Keep the control URL before the hold exists: an unfunded hold is due for its end-call at once.
    control_url = _allowed_control_url(ctx, message, org_id)
    if control_url is not None:
        await ctx.calls.keep_control_url(org_id, call_id, control_url)
    unfunded = Unfunded.record if who.may_admit else Unfunded.always
    reservation = await _reserve(ctx, org_id, call_id, unfunded)
    if reservation.outcome == Outcome.call_already_resolved:
        return await _resolved_before(ctx, message, org_id, not_found)
    if not reservation.held:
        log.error("live call %s of org %s could not be recorded (%s): it runs until Vapi's maxDurationSeconds",
                  call_id, org_id, reservation.outcome.name)  # fmt: skip
        await _end_unheld(ctx, message, org_id, reservation.outcome.name)
        return not_found
    if not reservation.funded:
        reason = "number_suspended" if not who.may_admit else "cannot_fund"
        log.warning("live call %s of org %s cannot be funded (%s): ending it", call_id, org_id, reason)
        ctx.metrics.webhooks.labels(message.type, f"unfunded_{reason}").inc()
    return await check_call(ctx.rt, org_id, call_id, CallEvent.start)


async def _resolved_before(ctx: AppContext, message: VapiMessage, org_id: str, not_found: CallCheck) -> CallCheck:
    """A status-update in-progress for a call already resolved: almost always a late or replayed
    message of a call that is over, so it takes no hold (none to lock credit, count against the
    limit or pull the kill switch's deadline in). Should the call really be running, it is ended:
    an end-call to a call that is over does no harm. No org alert if that fails (the call is
    most likely gone); the end queue logs it and counts it."""
    log.warning("status-update in-progress for call %s of org %s, resolved before: not held again; ending it",
                message.call_id, org_id)  # fmt: skip
    if message.control_url is not None:
        await _end_unheld(ctx, message, None, "resolved_before")
    else:
        ctx.metrics.webhooks.labels(message.type, "resolved_before").inc()
    return not_found


async def _unattributed(ctx: AppContext, message: VapiMessage) -> None:
    """A call no org admitted: nobody is billed; counted, logged, and ended unless allowed."""
    ctx.metrics.webhooks.labels(message.type, "unattributed").inc()
    log.warning("%s %s for call %s: no org admitted it (number %r, hint %r); billed to nobody", message.type,
                message.status or "", message.call_id, message.phone_number_id, message.org_id_hint)  # fmt: skip
    if message.type == "status-update" and message.status == "in-progress" and ctx.settings.unattributed_calls == "end":
        await _end_unheld(ctx, message, None, "unattributed")


async def _end_unheld(ctx: AppContext, message: VapiMessage, org_id: str | None, reason: str) -> None:
    assert message.call_id is not None
    queued = await end_unheld_call(ctx.rt, message.call_id, message.control_url, org_id=org_id, reason=reason)
    ctx.metrics.webhooks.labels(message.type, f"end_{reason}" if queued else f"cannot_end_{reason}").inc()


async def end_of_call_report(ctx: AppContext, message: VapiMessage) -> dict[str, Any]:
    who = await _payer(ctx, message)
    if who is None:
        return {}
    org_id = who.org_id
    assert org_id is not None and message.call_id is not None
    if message.billed_seconds is None:
        return await _report_without_duration(ctx, org_id, message.call_id)
    meta = {"vapi_cost_usd": message.cost_usd, "ended_reason": message.ended_reason}
    billed = message.billed_seconds
    resolution = await commit_call(ctx.rt, org_id, message.call_id, billed, meta=meta)
    if resolution.outcome == Outcome.org_unknown and await ctx.bring_org_in(org_id):
        resolution = await commit_call(ctx.rt, org_id, message.call_id, billed, meta=meta)
    if resolution.outcome == Outcome.idempotency_conflict:
        log.warning("second end-of-call-report for call %s says %d s; the first commit stands", message.call_id, billed)
    ctx.metrics.decision("commit", resolution.outcome.name)
    ctx.metrics.webhooks.labels(message.type, resolution.outcome.name).inc()
    return {}


async def _report_without_duration(ctx: AppContext, org_id: str, call_id: str) -> dict[str, Any]:
    """A report that says nothing about how long the call ran. Billing it at 0 s would give the
    call away and lock out a later, complete report; instead the call is resolved at what we
    know (from its start to its end, or to when it was last seen), and a report that comes later
    with times settles the difference."""
    resolution = await release_call(ctx.rt, org_id, call_id)
    if resolution.outcome == Outcome.hold_not_found:
        log.warning("end-of-call-report for call %s has no times and no hold: not billed until a report with times", call_id)
    else:
        log.warning("end-of-call-report for call %s has no times: billed %dp for the time we saw", call_id,
                    resolution.charged_pence)  # fmt: skip
    ctx.metrics.webhooks.labels("end-of-call-report", f"no_duration_{resolution.outcome.name}").inc()
    return {}


HANDLERS = {
    "assistant-request": assistant_request,
    "status-update": status_update,
    "end-of-call-report": end_of_call_report,
}


def _status_body(end_call: bool, reason: str, balance: int = 0, available: int = 0, cost: int = 0) -> dict[str, Any]:
    return {
        "endCall": end_call,
        "reason": reason,
        "balance_pence": balance,
        "available_pence": available,
        "call_cost_so_far_pence": cost,
    }


async def status_check(request: Request) -> Response:
    """The kill switch's pull side: one script call on the hot path, no Postgres."""
    ctx = context(request)
    body = await _authenticated_body(request)
    call_id, message = _call_id_of(body)
    ctx.require_ready()
    if message is not None:  # a Vapi envelope: its number, else the org that admitted the call
        org_id = (await attribute_message(ctx, message)).org_id
    else:  # a bare call id: the org that admitted it first
        org_id = await ctx.calls.org_of(call_id)
    if org_id is None:
        return json_response(_status_body(False, "unknown_call"))
    checked = await check_call(ctx.rt, org_id, call_id)
    if checked.outcome == Outcome.org_unknown:
        if not await ctx.bring_org_in(org_id):
            return json_response(_status_body(False, "unknown_call"))
        checked = await check_call(ctx.rt, org_id, call_id)
    ctx.metrics.decision("status_check", checked.outcome.name)
    money = checked.money
    if checked.outcome == Outcome.hold_not_found:
        resolved = await ctx.rt.redis.hexists(ctx.rt.keys.org(org_id).idem, call_state_key(org_id, call_id))
        if resolved:
            return json_response(_status_body(True, "call_ended", money.balance_pence, money.available_pence))
        return json_response(_status_body(False, "unknown_call", money.balance_pence, money.available_pence))
    if checked.outcome != Outcome.ok:
        raise ApiError(503, "state_restoring", "this account is being restored; retry shortly")
    reason = "call_ended" if checked.ended else ("credit_exhausted" if checked.end_call else "ok")
    return json_response(
        _status_body(checked.end_call, reason, money.balance_pence, money.available_pence, checked.cost_so_far_pence)
    )


def _call_id_of(body: Any) -> tuple[str, VapiMessage | None]:
    """`{"call_id": ...}`, or a Vapi envelope carrying `message.call.id`."""
    message = None
    if isinstance(body, dict) and "message" in body:
        try:
            message = parse_message(body)
        except InvalidInput:
            raise ApiError(400, "invalid_request", "send {\"call_id\": ...} or a Vapi message", field="message") from None
        call_id: Any = message.call_id
        field = "message.call.id"
    else:
        call_id = body.get("call_id") if isinstance(body, dict) else None
        field = "call_id"
    if not key_rules.is_call_id(call_id):
        raise ApiError(422, "invalid_field", "a call id of 1-128 characters of A-Z a-z 0-9 _ . : - is required", field=field)
    return call_id, message
