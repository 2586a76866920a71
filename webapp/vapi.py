"""Vapi's webhook and the status-check pull endpoint.

Vapi always gets a 200 with the documented body for a message it sent (an assistant-request is
refused with a spoken `{"error": ...}`, never a 5xx or an empty error, and answered within
`assistant_request_budget_s`, well inside Vapi's 7.5 s). Messages carry no event id and may be
duplicated or reordered: everything is keyed by call.id, and every engine operation is
idempotent, so a duplicate is a replay and a late `status-update` after the report changes nothing.
"""

import asyncio
import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from credit_engine.engine import keys as key_rules
from credit_engine.engine.attribution import UNATTRIBUTED, Attribution, attribute, may_be_a_replay
from credit_engine.engine.call_server import (
    admission_overrides,
    merge_handoff_answer,
    merge_platform_answer,
    remember_workflow,
)
from credit_engine.engine.control import control_url_allowed
from credit_engine.engine.decisions import restoring
from credit_engine.engine.dial import adopt_call
from credit_engine.engine.end_queue import end_unheld_call
from credit_engine.engine.errors import InvalidInput
from credit_engine.engine.forwarding import ANSWERED_TYPES, FORWARDED_HEADER, Target, forward_secret_for
from credit_engine.engine.holds import (
    CallCheck,
    CallEvent,
    Reservation,
    Unfunded,
    check_call,
    commit_call,
    release_call,
    reserve_call,
    resolution_remembered,
)
from credit_engine.engine.idempotency import is_dial_reservation_id

# The default sentences (declared once, in engine/org_profiles.py); an org may set its own.
from credit_engine.engine.org_profiles import (  # noqa: F401
    SPOKEN_BUSY,
    SPOKEN_NO_CREDIT,
    SPOKEN_NOT_SET_UP,
    SPOKEN_TRY_LATER,
    Refusal,
    refusal_text,
    vapi_profile,
)
from credit_engine.engine.orgs import org_exists
from credit_engine.engine.results import Money, Outcome
from credit_engine.webapp.auth import vapi_authenticated
from credit_engine.webapp.context import AppContext, context
from credit_engine.webapp.requests import parse_json
from credit_engine.webapp.responses import ApiError, json_response
from credit_engine.webapp.vapi_messages import VapiMessage, parse_message

log = logging.getLogger(__name__)

assistant_request_budget_s = 5.0
message_budget_s = 15.0
relay_s_max = 12.0  # a relayed message's answer from the platform (Vapi gives a server 20 s by default)
relay_lookup_s_max = 1.0  # finding where a relayed message goes
platform_answer_margin_s = 0.5  # of the assistant-request's budget, kept for our own work after the platform answers
assert relay_lookup_s_max + relay_s_max < message_budget_s

ZERO_MONEY = Money(0, 0, 0, 0, 0)


async def _authenticated_body(request: Request) -> tuple[bytes, Any]:
    ctx = context(request)
    raw = await request.body()
    if not vapi_authenticated(request, ctx.settings, raw):
        raise ApiError(
            401, "unauthorized", "send the webhook secret (X-Vapi-Secret or Bearer) or a valid HMAC signature"
        )
    return raw, parse_json(raw)


async def attribute_message(ctx: AppContext, message: VapiMessage) -> Attribution:
    """Which org pays for the message's call (engine/attribution.py has the rule)."""
    return await attribute(ctx.rt, ctx.calls, message.call_id, message.phone_number_id, message.org_id_hint)


async def webhook(request: Request) -> Response:
    ctx = context(request)
    raw, envelope = await _authenticated_body(request)
    try:
        message = parse_message(envelope)
    except InvalidInput as error:  # not a Vapi message at all
        raise ApiError(400, "invalid_request", error.message, field=error.field) from None
    if FORWARDED_HEADER in request.headers:
        return json_response(_forwarded_back(ctx, message))
    if message.type in ANSWERED_TYPES and message.type != "assistant-request":
        # The platform's server answers these (a tool's result, a transfer's destination, ...).
        return json_response(await _relayed_answer(ctx, message, raw))
    handler = HANDLERS.get(message.type)
    body: dict[str, Any] = {}
    if handler is None:
        ctx.metrics.webhooks.labels(message.type[:40], "ignored").inc()
    else:
        budget_s = assistant_request_budget_s if message.type == "assistant-request" else message_budget_s
        try:
            body = await asyncio.wait_for(handler(ctx, message, raw), timeout=budget_s)
        except Exception:
            log.exception("vapi %s for call %s failed", message.type, message.call_id)
            ctx.metrics.webhooks.labels(message.type, "error").inc()
            body = {"error": SPOKEN_TRY_LATER} if message.type == "assistant-request" else {}
            if message.type == "assistant-request":
                _release_later(ctx, message)
    if message.type != "assistant-request":
        # After the engine's own part (clock, commit), for the platform: in the background, so
        # Vapi's 200 never waits for it and nothing the platform does changes billing.
        ctx.forwarder.enqueue(lambda: _forward_target(ctx, message), raw)
    return json_response(body)


def _forwarded_back(ctx: AppContext, message: VapiMessage) -> dict[str, Any]:
    """A message the engine forwarded came back to it: a forward URL that names the engine (under
    a name other than CREDIT_ENGINE_PUBLIC_URL). Handled once already, on its way in; handled again
    it would be forwarded again, forever. An assistant-request is refused (the platform it was
    meant for never saw it), so the misconfiguration is heard, not hidden."""
    ctx.metrics.webhooks.labels(message.type[:40], "forwarded_back").inc()
    ctx.forwarder.stats.forwarded_back += 1
    if ctx.forwarder.stats.forwarded_back == 1 or ctx.forwarder.stats.forwarded_back % 1000 == 0:
        log.error(
            "%d messages the engine forwarded came back to it: a forward URL (or an assistant's server) "
            "names the engine; they are not handled or forwarded again",
            ctx.forwarder.stats.forwarded_back,
        )
    return {"error": SPOKEN_TRY_LATER} if message.type == "assistant-request" else {}


async def _forward_target(ctx: AppContext, message: VapiMessage) -> Target | None:
    """Where the call's messages go on to (engine/forwarding.py): the URL the platform's answer
    named for the call, else its org's forward_url (else the deployment's), else the saved
    assistant's own server URL at Vapi. Never back to the engine itself."""
    call_id = message.call_id if message.call_id is not None and key_rules.is_call_id(message.call_id) else None
    if call_id is not None:
        found, target = ctx.forwarder.cached_target(call_id)
        if found:
            return target
    who = await attribute_message(ctx, message) if call_id is not None else UNATTRIBUTED
    url = await ctx.calls.forward_url_of(call_id) if call_id is not None else None
    if url is None:
        url = await _org_forward_url(ctx, who.org_id)
    operators_choice = False
    if url is None and message.assistant_id is not None:
        url = await ctx.assistant_servers.server_url(message.assistant_id)
        operators_choice = True  # the account's own assistant, configured at Vapi by the platform
    if url is not None and ctx.settings.public_url is not None and url.startswith(ctx.settings.public_url + "/"):
        url = None  # the platform's assistant already names the engine: nothing to forward to
    target = _target(ctx, url, who.org_id, operators_choice) if url is not None else None
    if call_id is not None:
        ctx.forwarder.cache_target(call_id, target)
    return target


def _target(ctx: AppContext, url: str, org_id: str | None, operators_choice: bool = False) -> Target:
    """The deployment's own forward URL may be internal, and it (with the account's assistants'
    servers) gets the forward secret; any other URL was chosen by an org or a platform's answer:
    the address rule, and the org's derived secret (engine/forwarding.forward_secret_for)."""
    operators = url == ctx.settings.forward_url
    secret = forward_secret_for(ctx.settings, org_id, operators=operators or operators_choice)
    return Target(url, secret, operators=operators)


async def _org_forward_url(ctx: AppContext, org_id: str | None) -> str | None:
    """The org's own forward_url, else the deployment's CREDIT_ENGINE_FORWARD_URL (cached per
    process: engine/org_profiles.py). Postgres away: raises, rather than guess which platform."""
    if org_id is None:
        return ctx.settings.forward_url
    return (await vapi_profile(ctx.rt, org_id)).forward_url


async def _relayed_answer(ctx: AppContext, message: VapiMessage, raw: bytes) -> dict[str, Any]:
    """A message whose sender waits for the platform's answer: relayed at once, answered as the
    platform answered (within the time Vapi gives a server), or {} when there is no platform or
    no usable answer (Vapi then goes on as it would with a server that said nothing)."""
    try:
        target = await asyncio.wait_for(_forward_target(ctx, message), timeout=relay_lookup_s_max)
    except Exception:
        log.exception("cannot tell where %s of call %s goes", message.type, message.call_id)
        target = None
    if target is None:
        ctx.metrics.webhooks.labels(message.type[:40], "no_platform").inc()
        return {}
    relayed = await ctx.forwarder.relay(target, raw, relay_s_max)
    if relayed.answer is None:
        log.warning(
            "the platform gave %s for %s of call %s; answered {}", relayed.problem, message.type, message.call_id
        )
        ctx.metrics.webhooks.labels(message.type[:40], "relay_failed").inc()
        return {}
    ctx.metrics.webhooks.labels(message.type[:40], "relayed").inc()
    if message.type == "handoff-destination-request":
        return await _handoff_made_ours(ctx, message, relayed.answer)
    return relayed.answer


async def _handoff_made_ours(ctx: AppContext, message: VapiMessage, answer: dict[str, Any]) -> dict[str, Any]:
    """The rest of the call goes to the assistant (or squad) the platform named: the engine stays
    its server (engine/call_server.merge_handoff_answer), and a server URL the platform named in
    it is where the call's messages are forwarded from now on."""
    who = await attribute_message(ctx, message)
    if who.org_id is None or message.call_id is None:
        return answer  # a call no org admitted: not the engine's to bill
    merged, server_url = merge_handoff_answer(ctx.settings, who.org_id, answer)
    if server_url is not None:
        await ctx.calls.remember(message.call_id, who.org_id, forward_url=server_url)
        ctx.forwarder.targets.pop(message.call_id, None)
    return merged


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
    reservation = await restoring(ctx.rt, org_id, lambda: reserve_call(ctx.rt, org_id, call_id, unfunded))
    ctx.metrics.decision("reserve", reservation.outcome.name)
    return reservation


async def assistant_request(ctx: AppContext, message: VapiMessage, raw: bytes) -> dict[str, Any]:
    # Only a number admits a call here: an assistant-request is an inbound call to a bare number.
    # (A call's variableValues are the platform's text, never a reason to bill an org.)
    who = await attribute_message(ctx, message)
    assistant_id = who.assistant_id or ctx.settings.default_assistant_id
    if not who.by_number or not who.may_admit or assistant_id is None:
        log.warning(
            "assistant-request for a number with no org, no assistant, or suspended: %r", message.phone_number_id
        )
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
        log.warning(
            "assistant-request for call %s of org %s, created before the idempotency window: refused",
            message.call_id,
            org_id,
        )
        ctx.metrics.webhooks.labels(message.type, "replayed_after_window").inc()
        return {"error": await refusal_text(ctx.rt, org_id, Refusal.try_later)}
    started = asyncio.get_running_loop().time()
    reservation = await _reserve(ctx, org_id, message.call_id)
    ctx.metrics.webhooks.labels(message.type, reservation.outcome.name).inc()
    if reservation.held and not reservation.funded:  # the call is already running unfunded, being ended
        return {"error": await refusal_text(ctx.rt, org_id, Refusal.no_credit)}
    if reservation.outcome in (Outcome.ok, Outcome.replayed):
        forward_url = await _org_forward_url(ctx, org_id)
        if forward_url is not None:
            budget_s = (
                assistant_request_budget_s - platform_answer_margin_s - (asyncio.get_running_loop().time() - started)
            )
            return await _platform_answers(
                ctx, message, raw, org_id, reservation, _target(ctx, forward_url, org_id), budget_s
            )
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


async def _platform_answers(
    ctx: AppContext,
    message: VapiMessage,
    raw: bytes,
    org_id: str,
    reservation: Reservation,
    target: Target,
    budget_s: float,
) -> dict[str, Any]:
    """The org's platform has its own assistant-request logic (transient assistants, squads,
    workflows): the call is reserved, then the platform is asked with Vapi's own body, and its
    answer comes back with the engine's overrides merged in. The platform's own refusal is passed
    on; a platform slow, down or answering garbage gets the org's spoken try-later. Either way the
    hold is released (a call that never starts is charged nothing)."""
    assert message.call_id is not None
    relayed = await ctx.forwarder.relay(target, raw, budget_s)
    merged = merge_platform_answer(ctx.settings, org_id, reservation.max_duration_s, relayed.answer or {})
    if merged.answer is None:
        await release_call(ctx.rt, org_id, message.call_id)
        if merged.refusal is not None:
            ctx.metrics.webhooks.labels(message.type, "platform_refused").inc()
            return {"error": merged.refusal}
        log.warning(
            "the platform of org %s gave %s for the assistant-request of call %s: refused",
            org_id,
            relayed.problem or "an answer choosing nothing",
            message.call_id,
        )
        ctx.metrics.webhooks.labels(message.type, "platform_failed").inc()
        return {"error": await refusal_text(ctx.rt, org_id, Refusal.try_later)}
    await _remember(ctx, message, org_id, merged.server_url)
    if merged.workflow_id is not None and key_rules.is_call_id(merged.workflow_id):  # an id's characters only
        try:
            await remember_workflow(ctx.rt, merged.workflow_id, int(time.time() * 1000))
        except Exception:  # for `vapi check` only: the call goes on
            log.exception("could not remember workflow %s for `vapi check`", merged.workflow_id[:64])
    ctx.metrics.webhooks.labels(message.type, "platform_answered").inc()
    return merged.answer


async def _remember(ctx: AppContext, message: VapiMessage, org_id: str, forward_url: str | None = None) -> None:
    """The org admitted the call (it holds it): index it, keep its control URL, and where its
    messages go on to if the platform's answer named it."""
    assert message.call_id is not None
    control_url = _allowed_control_url(ctx, message, org_id)
    await ctx.calls.remember(message.call_id, org_id, control_url, forward_url)
    ctx.forwarder.targets.pop(message.call_id, None)


def _allowed_control_url(ctx: AppContext, message: VapiMessage, org_id: str) -> str | None:
    """The call's control URL if it is one of Vapi's (https on CREDIT_ENGINE_CONTROL_URL_HOSTS):
    the kill switch sends the control token there, so a URL a payload made up is never kept."""
    control_url = message.control_url
    if control_url is not None and not control_url_allowed(ctx.settings, control_url):
        log.warning("call %s of org %s names a control URL not on Vapi's hosts; not kept", message.call_id, org_id)
        ctx.metrics.webhooks.labels(message.type, "control_url_refused").inc()
        return None
    return control_url


async def _adopt_carried(ctx: AppContext, message: VapiMessage, who: Attribution) -> None:
    """A call the engine placed (POST /api/calls, engine/dial.py) carries the id its hold was
    reserved under: the hold becomes the call's here if the request has not made it so yet (Vapi
    may send a message before its answer to POST /call arrives, or the request's process may have
    died). Only on the org's own number, and only the org's own reservation (the script looks in
    the number's org alone), so a message naming another org's reservation moves nothing."""
    reservation_id, call_id, org_id = message.reservation_id, message.call_id, who.org_id
    if reservation_id is None or call_id is None or org_id is None or not who.by_number:
        return
    if not is_dial_reservation_id(reservation_id) or not key_rules.is_call_id(call_id):
        return
    adoption = await restoring(ctx.rt, org_id, lambda: adopt_call(ctx.rt, org_id, reservation_id, call_id))
    ctx.metrics.webhooks.labels(message.type, f"adopt_{adoption.outcome.name}").inc()
    if adoption.outcome == Outcome.ok:
        await _remember(ctx, message, org_id)
    elif adoption.outcome == Outcome.idempotency_conflict:
        await release_call(ctx.rt, org_id, reservation_id)  # the call holds its own: the reservation's goes


async def status_update(ctx: AppContext, message: VapiMessage, raw: bytes) -> dict[str, Any]:
    if message.status not in ("in-progress", "ended") and message.reservation_id is None:
        return {}
    who = await _payer(ctx, message)
    if who is None:
        return {}
    await _adopt_carried(ctx, message, who)
    if message.status not in ("in-progress", "ended"):
        return {}
    org_id = who.org_id
    assert org_id is not None and message.call_id is not None
    event = CallEvent.start if message.status == "in-progress" else CallEvent.end
    call_id = message.call_id
    checked = await restoring(ctx.rt, org_id, lambda: check_call(ctx.rt, org_id, call_id, event))
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
        log.warning(
            "call %s of org %s first seen live; cannot tell if it was resolved (postgres away): ending it",
            call_id,
            org_id,
        )
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
    if not reservation.held and control_url is not None:
        await ctx.calls.forget_control_url(org_id, call_id)  # kept for a hold that was not taken
    if reservation.outcome == Outcome.call_already_resolved:
        return await _resolved_before(ctx, message, org_id, not_found)
    if not reservation.held:
        log.error(
            "live call %s of org %s could not be recorded (%s): it runs until Vapi's maxDurationSeconds",
            call_id,
            org_id,
            reservation.outcome.name,
        )
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
    log.warning(
        "status-update in-progress for call %s of org %s, resolved before: not held again; ending it",
        message.call_id,
        org_id,
    )
    if message.control_url is not None:
        await _end_unheld(ctx, message, None, "resolved_before")
    else:
        ctx.metrics.webhooks.labels(message.type, "resolved_before").inc()
    return not_found


async def _unattributed(ctx: AppContext, message: VapiMessage) -> None:
    """A call no org admitted: nobody is billed; counted, logged, and ended unless allowed."""
    ctx.metrics.webhooks.labels(message.type, "unattributed").inc()
    log.warning(
        "%s %s for call %s: no org admitted it (number %r, hint %r); billed to nobody",
        message.type,
        message.status or "",
        message.call_id,
        message.phone_number_id,
        message.org_id_hint,
    )
    if message.type == "status-update" and message.status == "in-progress" and ctx.settings.unattributed_calls == "end":
        await _end_unheld(ctx, message, None, "unattributed")


async def _end_unheld(ctx: AppContext, message: VapiMessage, org_id: str | None, reason: str) -> None:
    assert message.call_id is not None
    queued = await end_unheld_call(ctx.rt, message.call_id, message.control_url, org_id=org_id, reason=reason)
    ctx.metrics.webhooks.labels(message.type, f"end_{reason}" if queued else f"cannot_end_{reason}").inc()


async def end_of_call_report(ctx: AppContext, message: VapiMessage, raw: bytes) -> dict[str, Any]:
    who = await _payer(ctx, message)
    if who is None:
        return {}
    await _adopt_carried(ctx, message, who)
    org_id = who.org_id
    assert org_id is not None and message.call_id is not None
    if message.billed_seconds is None:
        return await _report_without_duration(ctx, org_id, message.call_id)
    meta = {"vapi_cost_usd": message.cost_usd, "ended_reason": message.ended_reason}
    billed, call_id = message.billed_seconds, message.call_id
    resolution = await restoring(ctx.rt, org_id, lambda: commit_call(ctx.rt, org_id, call_id, billed, meta=meta))
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
        log.warning(
            "end-of-call-report for call %s has no times and no hold: not billed until a report with times", call_id
        )
    else:
        log.warning(
            "end-of-call-report for call %s has no times: billed %dp for the time we saw",
            call_id,
            resolution.charged_pence,
        )
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
    _, body = await _authenticated_body(request)
    call_id, message = _call_id_of(body)
    ctx.require_ready()
    if message is not None:  # a Vapi envelope: its number, else the org that admitted the call
        org_id = (await attribute_message(ctx, message)).org_id
    else:  # a bare call id: the org that admitted it first
        org_id = await ctx.calls.org_of(call_id)
    if org_id is None:
        return json_response(_status_body(False, "unknown_call"))
    checked = await restoring(ctx.rt, org_id, lambda: check_call(ctx.rt, org_id, call_id))
    if checked.outcome == Outcome.org_unknown and not await org_exists(ctx.rt, org_id):
        return json_response(_status_body(False, "unknown_call"))  # no such org, in Redis or Postgres
    # Still unknown to Redis although Postgres has it (its restore was refused: say, an outbox left
    # behind): a 503 below, so the caller retries, never an "unknown call" it could stop polling on.
    ctx.metrics.decision("status_check", checked.outcome.name)
    money = checked.money
    if checked.outcome == Outcome.hold_not_found:
        if await resolution_remembered(ctx.rt, org_id, call_id):
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
            raise ApiError(400, "invalid_request", 'send {"call_id": ...} or a Vapi message', field="message") from None
        call_id: Any = message.call_id
        field = "message.call.id"
    else:
        call_id = body.get("call_id") if isinstance(body, dict) else None
        field = "call_id"
    if not key_rules.is_call_id(call_id):
        raise ApiError(
            422, "invalid_field", "a call id of 1-128 characters of A-Z a-z 0-9 _ . : - is required", field=field
        )
    return call_id, message
