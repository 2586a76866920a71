"""The kill switch's push to Vapi: one attempt to say the warning or end a call through its
control URL (engine/control.py sends it, only to Vapi's hosts), the control URL looked up at Vapi
when the engine never kept one, and where the kept ones live.

engine/killswitch.py decides what to push and when (the tick, the rounds, the retries); this
module only delivers, so what leaves the engine for Vapi is in one place.
"""

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import httpx
from redis.exceptions import RedisError

from credit_engine.engine.call_index import CallIndex
from credit_engine.engine.control import VapiCall, call_at_vapi, send_control
from credit_engine.engine.phone_numbers import number_owner
from credit_engine.engine.replies import asyncio_reply
from credit_engine.engine.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Action:
    call_id: str
    kind: str  # warn | end | end_failed
    attempt: int


async def push(
    rt: Runtime,
    http: httpx.AsyncClient,
    org_id: str | None,
    action: Action,
    control_url: str | None,
    *,
    timeout_s: float | None = None,
) -> bool:
    """One attempt. True when Vapi took it (2xx). No control URL, or one not on Vapi's hosts
    (engine/control.py), sends nothing: an ERROR line and a failed attempt."""
    timeout_s = rt.settings.kill_push_deadline_ms / 1000 if timeout_s is None else timeout_s
    if control_url is None and rt.settings.vapi_api_key is not None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        control_url = await _control_url_from_vapi(rt, http, org_id, action.call_id, timeout_s / 2)
        timeout_s = max(0.001, timeout_s - (loop.time() - started))
    reply = await send_control(rt.settings, http, control_url, action.kind, timeout_s)
    if reply.refused:
        log.error(
            "kill switch: cannot %s call %s of org %s (attempt %d): %s",
            action.kind,
            action.call_id,
            org_id,
            action.attempt,
            reply.problem,
        )
    elif not reply.taken:
        log.warning(
            "kill switch: %s of call %s (org %s) failed, attempt %d: %s",
            action.kind,
            action.call_id,
            org_id,
            action.attempt,
            reply.problem,
        )
    return reply.taken


async def _control_url_from_vapi(
    rt: Runtime, http: httpx.AsyncClient, org_id: str | None, call_id: str, timeout_s: float
) -> str | None:
    """The engine lost the call's control URL (a Redis rebuilt from Postgres keeps holds, not URLs)
    or never saw it: Vapi knows it. Used only if Vapi's record says the call is the org's (on one
    of its numbers, or admitted for it: variableValues.org_id): a hold names any call id an org
    chose (the reserve API), and must not reach another org's call. Kept for the call's next push."""
    found = await call_at_vapi(rt.settings, http, call_id, timeout_s)
    ours = found is not None and (org_id is None or await _call_is_the_orgs(rt, org_id, found))
    if found is not None and ours and org_id is not None:
        with contextlib.suppress(RedisError):
            await CallIndex(rt).keep_control_url(org_id, call_id, found.control_url)
    what = "Vapi gave one" if ours else "Vapi gave none" if found is None else "Vapi's record is another org's call"
    log.warning("kill switch: no control URL kept for call %s (org %s); %s", call_id, org_id, what)
    return found.control_url if found is not None and ours else None


async def _call_is_the_orgs(rt: Runtime, org_id: str, found: VapiCall) -> bool:
    """On a number: the number's owner decides (the registry is ours); else the org it was admitted for."""
    if found.phone_number_id is not None:
        owner = await number_owner(rt, found.phone_number_id, active_only=False)
        if owner is not None:
            return owner.org_id == org_id
    return found.org_id == org_id


class ControlUrls:
    """Where each call's control URL is kept: the admitting org's own hash (engine/call_index.py),
    filled by the webhook from `call.monitor.controlUrl` when it is one of Vapi's. Per org, so no
    other org can hide or redirect a call's end-call."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def get(self, org_id: str, call_ids: list[str]) -> dict[str, str | None]:
        if not call_ids:
            return {}
        urls = await asyncio_reply(self.rt.redis.hmget(self.rt.keys.org(org_id).control, call_ids))
        return dict(zip(call_ids, urls, strict=True))
