"""The three promises, checked after every step of traffic nobody scripted (issue 12).

A hypothesis state machine drives the real app over HTTP (in-process ASGI, its real lifespan)
and the worker's own functions (drain, kill switch against a fake Vapi over real HTTP, hold
expiry, pending credits, alert delivery), from a model of Vapi calls: inbound calls with an
assistant-request, outbound calls first seen at in-progress, web calls and calls from numbers
not registered here naming an org in their variableValues, calls the platform reserves through
the API; messages duplicated, reordered, lost and replayed late, also after Redis's idempotency
window; Redis rebuilt and orgs repaired at random moments; numbers suspended; top-ups and
purchases with replayed and hostile Idempotency-Keys; an alert endpoint that hangs.

The model knows what Vapi knows (which calls ran, when, for how long, who admitted them) and
nothing of the engine's insides. After every step:
- each org's Redis money is consistent: available = balance - held, held = the sum of its holds,
  debt >= 0, balance never below minus the overdraft; funded holds within max_concurrent_calls;
- each call is charged only to an org that owns its number or admitted it, and in all never more
  than its true duration costs (never twice);
- an org's debt stays within what the kill switch allows (grace plus one clock step of each of
  its calls), except for calls the engine could not see or stop (lost in-progress, a failing
  control URL), which may cost in full;
and after a drain: ledger = projection = Redis, `reconcile --check` clean, and every reported
call billed exactly its reported duration.
"""

import asyncio
import contextlib
import gc
import os
import secrets
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import httpx
import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from starlette.applications import Starlette
from vapi.types import (
    Analysis,
    Artifact,
    AssistantOverrides,
    Call,
    CreateCustomerDto,
    Monitor,
    ServerMessageAssistantRequest,
    ServerMessageEndOfCallReport,
    ServerMessageStatusUpdate,
)

from credit_engine.engine.alerts import deliver_due, outbound_for_alerts
from credit_engine.engine.amounts import call_cost_pence
from credit_engine.engine.balances import read_wallet
from credit_engine.engine.clock import ManualClock
from credit_engine.engine.config import Settings
from credit_engine.engine.credits import apply_pending_credits
from credit_engine.engine.expiry import expire_due_holds
from credit_engine.engine.holds import live_holds
from credit_engine.engine.killswitch import run_round
from credit_engine.engine.killswitch_push import ControlUrls
from credit_engine.engine.ledger import LedgerEntry
from credit_engine.engine.outbound import Outbound
from credit_engine.engine.outbox import drain_org_fully, parse_entry
from credit_engine.engine.phone_numbers import forget_owner
from credit_engine.engine.reconciler import check, repair
from credit_engine.engine.restore import ensure_rebuilt
from credit_engine.engine.runtime import Runtime
from credit_engine.webapp.app import create_app
from tests.conftest import delete_prefix
from tests.fake_vapi import FakeVapi, fake_vapi_server
from tests.fake_vapi_api import API_KEY as VAPI_API_KEY
from tests.fake_vapi_api import fake_vapi_api_server
from tests.webapp.conftest import ADMIN_TOKEN, WEBHOOK_SECRET
from tests.webapp.vapi_payloads import encode

ORGS = ("a", "b")
CALLS = tuple(f"c{i}" for i in range(6))
ALERT_DEADLINE_S = 0.3  # the hanging endpoint costs an alert round this long
STEP_S_MAX = 20  # the clock moves at most this far between two kill-switch rounds
RARELY = st.sampled_from([True, False, False, False])  # the stores' rules act one step in four
GRACE_S = 5
PRICE_PENCE = 150
TOPUP_KEYS = ("t1", "t2", "rent:pn:2026-12", "a/topup/t1", "x" * 255)
PURCHASE_KEYS = ("p1", "p2", "rent:pn-a:2026-12", "b/asset/p1")
SETTINGS = {
    "idempotency_ttl_ms": 3_600_000,  # the shortest window configuration allows: replays cross it
    "kill_warn_lead_ms": 10_000,
    "kill_attempts_max": 3,
    "kill_backoff_base_ms": 1_000,
    "kill_backoff_max_ms": 2_000,
    "alert_signing_key": "model-alert-signing-key-" + "d" * 20,
    "alert_attempts_max": 2,
    "alert_backoff_base_ms": 1,
    "outbound_allow_private": True,  # the test's receivers listen on 127.0.0.1
    "phone_number_pence": PRICE_PENCE,
}


def iso(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


@dataclass
class OrgModel:
    org_id: str
    key: str
    number: str
    rate: int
    overdraft: int
    max_calls: int | None
    suspended: bool = False


@dataclass
class CallModel:
    """What Vapi knows of one call."""

    call_id: str
    route: str  # inbound | outbound | web | stranger
    org: str | None  # the org whose number the call is on (inbound, outbound)
    hint: str | None  # the org id in assistantOverrides.variableValues
    control_url: str
    failing_control: bool
    lost_in_progress: bool
    admitted_by: set[str] = field(default_factory=set)  # orgs that reserved it through the API
    started_ms: int = 0
    ended_ms: int = 0
    max_duration_s: int = 0  # what the assistant-request answered (Vapi enforces it)
    intended_s: int = 60  # how long the customer would talk if nobody ended the call
    created_ms: int = 0  # Vapi's call.createdAt
    reported: bool = False
    messages: list[bytes] = field(default_factory=list)  # every message sent, for replays

    @property
    def live(self) -> bool:
        return self.started_ms > 0 and self.ended_ms == 0

    def true_duration_ms(self, now_ms: int) -> int:
        if self.started_ms == 0:
            return 0
        return (self.ended_ms or now_ms) - self.started_ms


CALL_STRATEGIES: dict[str, Any] = dict(
    index=st.integers(0, len(CALLS) - 1),
    route=st.sampled_from(["inbound", "inbound", "outbound", "web", "stranger"]),
    org=st.sampled_from(ORGS),
    hint=st.sampled_from([None, "a", "b"]),
    reserve_as=st.sampled_from([None, "a", "b"]),
    failing_control=st.sampled_from([False, False, False, True]),
    lost_in_progress=st.sampled_from([False] * 9 + [True]),
    intended_s=st.integers(5, 900),
)


SEEN: Counter[str] = Counter()  # what the runs did, so the test can tell it was not vacuous


class Calls(RuleBasedStateMachine):
    loop: asyncio.AbstractEventLoop
    app: Starlette
    client: httpx.AsyncClient
    rt: Runtime
    clock: ManualClock
    fake: FakeVapi
    hanging_url: str
    outbound: Outbound

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    # Setup -----------------------------------------------------------------------------------

    @initialize(
        rates=st.lists(st.sampled_from([60, 120]), min_size=2, max_size=2),
        overdrafts=st.lists(st.sampled_from([0, 50]), min_size=2, max_size=2),
        limits=st.lists(st.sampled_from([None, 1, 2]), min_size=2, max_size=2),
        balances=st.lists(st.sampled_from([0, 40, 120, 600]), min_size=2, max_size=2),
    )
    def setup(self, rates: list[int], overdrafts: list[int], limits: list[int | None], balances: list[int]) -> None:
        self.tag = secrets.token_hex(3)
        self.orgs: dict[str, OrgModel] = {}
        self.calls: dict[str, CallModel] = {}
        self.credits: dict[tuple[str, str], tuple[int, int]] = {}  # (org, key) -> (amount, status)
        self.purchases: dict[tuple[str, str], tuple[str, int]] = {}  # (org, key) -> (area, status)
        for name, rate, overdraft, limit, balance in zip(ORGS, rates, overdrafts, limits, balances, strict=True):
            self.orgs[name] = self.run(self._new_org(name, rate, overdraft, limit, balance))

    async def _new_org(self, name: str, rate: int, overdraft: int, limit: int | None, balance: int) -> OrgModel:
        org_id = f"m{self.tag}-{name}"
        body: dict[str, Any] = {
            "org_id": org_id,
            "name": org_id,
            "rate_pence_per_minute": rate,
            "overdraft_pence": overdraft,
            "min_start_pence": 10,
            "hold_block_minutes": 1,
            "grace_seconds": GRACE_S,
        }
        if limit is not None:
            body["max_concurrent_calls"] = limit
        if name == "b":  # b's alert endpoint never answers
            body["alert_webhook_url"] = self.hanging_url
        assert (await self.admin("POST", "/api/admin/orgs", body)).status_code == 201
        key = (await self.admin("POST", f"/api/admin/orgs/{org_id}/api-keys")).json()["api_key"]
        number = f"pn-{self.tag}-{name}"
        registered = await self.admin(
            "POST",
            "/api/admin/phone-numbers",
            {"vapi_phone_number_id": number, "org_id": org_id, "assistant_id": "asst-1"},
        )
        assert registered.status_code == 201
        if balance:
            topped = await self.admin(
                "POST",
                f"/api/admin/orgs/{org_id}/topups",
                {"amount_pence": balance},
                headers={"Idempotency-Key": "seed"},
            )
            assert topped.status_code == 201
        return OrgModel(org_id, key, number, rate, overdraft, limit)

    async def admin(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.client.request(
            method, path, json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}", **(headers or {})}
        )

    async def vapi(self, body: bytes) -> httpx.Response:
        answer = await self.client.post(
            "/api/vapi/webhook",
            content=body,
            headers={"X-Vapi-Secret": WEBHOOK_SECRET, "Content-Type": "application/json"},
        )
        assert answer.status_code == 200, answer.text  # Vapi always gets a 200 with the documented body
        return answer

    # Vapi's messages, built with its SDK -------------------------------------------------------

    def vapi_call(self, c: CallModel) -> Call:
        number = None
        if c.route in ("inbound", "outbound"):
            assert c.org is not None
            number = self.orgs[c.org].number
        elif c.route == "stranger":
            number = f"pn-{self.tag}-stranger"
        hint = self.orgs[c.hint].org_id if c.hint is not None else None
        overrides = AssistantOverrides(variable_values={"org_id": hint}) if hint else None
        call_type = {"inbound": "inboundPhoneCall", "web": "webCall"}.get(c.route, "outboundPhoneCall")
        return Call(
            id=c.call_id,
            org_id="vapi-org",
            type=call_type,
            created_at=iso(c.created_ms),
            updated_at=iso(self.clock.value_ms),
            phone_number_id=number,
            customer=CreateCustomerDto(number="+15557654321"),
            monitor=Monitor(control_url=c.control_url),
            assistant_overrides=overrides,
        )

    async def send(self, c: CallModel, body: bytes) -> httpx.Response:
        c.messages.append(body)
        return await self.vapi(body)

    async def report(self, c: CallModel) -> None:
        message = ServerMessageEndOfCallReport(
            type="end-of-call-report",
            ended_reason="customer-ended-call",
            call=self.vapi_call(c),
            artifact=Artifact(),
            analysis=Analysis(),
            cost=0.1,
            started_at=iso(c.started_ms),
            ended_at=iso(c.ended_ms),
        )
        await self.send(c, encode(message))
        c.reported = True
        SEEN["reports"] += 1

    # Rules: calls ------------------------------------------------------------------------------

    @rule(**CALL_STRATEGIES)
    def call_starts(
        self,
        index: int,
        route: str,
        org: str,
        hint: str | None,
        reserve_as: str | None,
        failing_control: bool,
        lost_in_progress: bool,
        intended_s: int,
    ) -> None:
        call_id = f"{CALLS[index]}-{self.tag}-{len(self.calls)}"
        on_number = route in ("inbound", "outbound")
        c = CallModel(
            call_id,
            route,
            org if on_number else None,
            org if route == "inbound" else hint,
            f"https://aws-us-west-2-production1-phone-call-websocket.vapi.ai/{call_id}/control",
            failing_control,
            lost_in_progress,
            intended_s=intended_s,
            created_ms=self.clock.value_ms,
        )
        self.calls[call_id] = c
        as_vapi_has_it = self.vapi_call(c)
        variables = as_vapi_has_it.assistant_overrides.variable_values if as_vapi_has_it.assistant_overrides else None
        self.vapi_api.add_call(  # type: ignore[attr-defined]
            call_id,
            c.control_url,
            phone_number_id=as_vapi_has_it.phone_number_id,
            org_id=(variables or {}).get("org_id"),
        )
        if failing_control:
            self.fake.always[f"/{call_id}/control"] = 500
        self.run(self._start(c, reserve_as))

    @rule(**CALL_STRATEGIES)
    def another_call_starts(
        self,
        index: int,
        route: str,
        org: str,
        hint: str | None,
        reserve_as: str | None,
        failing_control: bool,
        lost_in_progress: bool,
        intended_s: int,
    ) -> None:
        self.call_starts(index, route, org, hint, reserve_as, failing_control, lost_in_progress, intended_s)

    async def _start(self, c: CallModel, reserve_as: str | None) -> None:
        if c.route == "inbound":
            answer = (
                await self.send(
                    c, encode(ServerMessageAssistantRequest(type="assistant-request", call=self.vapi_call(c)))
                )
            ).json()
            if "error" in answer:
                assert answer["error"]  # never an empty error (Vapi would say "Unknown Error")
                SEEN["inbound refused"] += 1
                return  # refused: the call never starts
            SEEN["inbound admitted"] += 1
            c.max_duration_s = answer["assistantOverrides"]["maxDurationSeconds"]
            assert answer["assistantOverrides"]["variableValues"]["org_id"] == self.orgs[c.org].org_id  # type: ignore[index]
        elif reserve_as is not None and c.route != "outbound":
            reserved = await self.client.post(
                f"/api/calls/{c.call_id}/reserve", headers={"Authorization": f"Bearer {self.orgs[reserve_as].key}"}
            )
            if reserved.status_code == 201:
                c.admitted_by.add(reserve_as)
                SEEN["reserved through the API"] += 1
            else:
                assert reserved.status_code in (402, 409, 503), reserved.text
        c.started_ms = self.clock.value_ms
        in_progress = encode(
            ServerMessageStatusUpdate(type="status-update", status="in-progress", call=self.vapi_call(c))
        )
        if c.lost_in_progress:
            c.messages.append(in_progress)  # sent, never delivered (a replay may deliver it later)
        else:
            await self.send(c, in_progress)

    @rule(seconds=st.integers(1, STEP_S_MAX))
    def more_time_passes(self, seconds: int) -> None:
        self.time_passes(seconds)

    @precondition(lambda self: any(c.live for c in self.calls.values()))
    @rule(pick=st.integers(0, 10**6), report=st.sampled_from(["now", "now", "lost", "later"]), now=RARELY)
    def call_ends(self, pick: int, report: str, now: bool) -> None:
        """The customer hangs up early (most calls run their intended length, or until ended)."""
        if not now:
            return
        live = [c for c in self.calls.values() if c.live]
        self.run(self._end(live[pick % len(live)], report))

    async def _end(self, c: CallModel, report: str = "now") -> None:
        c.ended_ms = self.clock.value_ms
        await self.send(
            c,
            encode(
                ServerMessageStatusUpdate(
                    type="status-update", status="ended", call=self.vapi_call(c), ended_reason="customer-ended-call"
                )
            ),
        )
        if report == "now":
            await self.report(c)
        elif report == "lost":
            c.reported = True  # Vapi sent it; it never arrived (expiry bills what was seen)
            c.messages.append(b"")

    @precondition(lambda self: any(c.ended_ms and not c.reported for c in self.calls.values()))
    @rule(pick=st.integers(0, 10**6))
    def late_report(self, pick: int) -> None:
        waiting = [c for c in self.calls.values() if c.ended_ms and not c.reported]
        self.run(self.report(waiting[pick % len(waiting)]))

    @precondition(lambda self: any(c.messages for c in self.calls.values()))
    @rule(pick=st.integers(0, 10**6), times=st.integers(1, 3))
    def replay(self, pick: int, times: int) -> None:
        """A message delivered again: a duplicate, out of order, or much later."""
        sent = [m for c in self.calls.values() for m in c.messages if m]
        if sent:
            self.run(self._at_once(sent[pick % len(sent)], times))
            SEEN["replays"] += 1

    async def _at_once(self, body: bytes, times: int) -> None:
        await asyncio.gather(*[self.vapi(body) for _ in range(times)])

    @rule(seconds=st.integers(1, STEP_S_MAX))
    def time_passes(self, seconds: int) -> None:
        """The clock moves; the worker's kill switch runs, and Vapi hangs up what it was told to
        end and what reached its maxDurationSeconds."""
        self.clock.advance(seconds * 1000)
        self.run(self._worker_reacts())

    async def _worker_reacts(self) -> None:
        await self._drain()  # the worker drains all the time; here, whenever the clock moves
        seen = len(self.fake.received)
        await run_round(self.rt, self.http, ControlUrls(self.rt))
        ended_by_us = {r.path.split("/")[1] for r in self.fake.received[seen:] if r.json.get("type") == "end-call"}
        SEEN["end-calls pushed"] += len(ended_by_us)
        for c in list(self.calls.values()):
            elapsed_ms = self.clock.value_ms - c.started_ms
            over_max = c.max_duration_s and elapsed_ms >= c.max_duration_s * 1000
            done = elapsed_ms >= c.intended_s * 1000
            if c.live and (c.call_id in ended_by_us and not c.failing_control or over_max or done):
                await self._end(c, report=("now", "later", "now", "lost")[len(c.call_id) % 4])
        await expire_due_holds(self.rt)

    @rule(now=RARELY)
    def past_the_idempotency_window(self, now: bool) -> None:
        """Hours pass: the calls running now end now (the model does not let a call run unwatched
        for hours: between kill-switch rounds the clock moves at most STEP_S_MAX)."""
        if not now:
            return
        SEEN["windows passed"] += 1
        for c in self.calls.values():
            if c.live:
                self.run(self._end(c))
        self.clock.advance(self.rt.settings.idempotency_ttl_ms + 60_000)
        self.run(self._worker_reacts())

    # Rules: money ------------------------------------------------------------------------------

    @rule(org=st.sampled_from(ORGS), key=st.sampled_from(TOPUP_KEYS), amount=st.sampled_from([1, 100, 500]))
    def top_up(self, org: str, key: str, amount: int) -> None:
        o = self.orgs[org]
        answer = self.run(
            self.admin(
                "POST", f"/api/admin/orgs/{o.org_id}/topups", {"amount_pence": amount}, headers={"Idempotency-Key": key}
            )
        )
        first = self.credits.get((org, key))
        if first is None:
            assert answer.status_code == 201, answer.text
            self.credits[(org, key)] = (amount, answer.status_code)
        elif first[0] == amount:
            assert answer.status_code == 201  # a replay gets the first answer
        else:
            assert answer.status_code == 422  # same key, other amount

    @rule(org=st.sampled_from(ORGS), key=st.sampled_from(PURCHASE_KEYS), area=st.sampled_from(["415", "999"]))
    def purchase(self, org: str, key: str, area: str) -> None:
        o = self.orgs[org]
        answer = self.run(
            self.client.post(
                "/api/managed-telephony/provision",
                json={"area_code": area},
                headers={"Authorization": f"Bearer {o.key}", "Idempotency-Key": key},
            )
        )
        assert answer.status_code in (201, 402, 422, 502, 503), answer.text
        first = self.purchases.get((org, key))
        if first is not None and first[0] == area and first[1] in (201, 502):
            assert answer.status_code == first[1]  # a finished purchase replays its answer
        if first is None or first[1] not in (201, 502):
            self.purchases[(org, key)] = (area, answer.status_code)

    @rule(org=st.sampled_from(ORGS), suspended=st.booleans())
    def rent_unpaid(self, org: str, suspended: bool) -> None:
        o = self.orgs[org]
        status = "suspended" if suspended else "active"
        self.run(
            self.rt.pg.execute("UPDATE phone_numbers SET status = $2 WHERE vapi_phone_number_id = $1", o.number, status)
        )
        self.run(forget_owner(self.rt, o.number))
        o.suspended = suspended

    @rule(now=RARELY)
    def alerts_delivered(self, now: bool) -> None:
        """b's endpoint hangs: a round still ends within the delivery bound, and a's go out."""
        if not now:
            return
        started = self.loop.time()
        self.run(deliver_due(self.rt, self.outbound, total_s_max=ALERT_DEADLINE_S))
        assert self.loop.time() - started < ALERT_DEADLINE_S + 2

    # Rules: the stores -------------------------------------------------------------------------

    @rule(now=RARELY)
    def redis_lost_and_rebuilt(self, now: bool) -> None:
        if now:
            self.run(self._rebuild())

    async def _rebuild(self) -> None:
        await self._drain()  # what was acknowledged and not drained is lost with Redis (its docs say so)
        assert self.rt.settings.redis_url is not None
        await delete_prefix(self.rt.settings.redis_url, self.rt.settings.key_prefix)
        await ensure_rebuilt(self.rt)
        SEEN["rebuilds"] += 1
        for _ in range(100):  # the web app notices within a second and confirms the marker
            if self.app.state.ctx.guard.ready:
                break
            await asyncio.sleep(0.02)

    @rule(now=RARELY)
    def repair_orgs(self, now: bool) -> None:
        if now:
            self.run(repair(self.rt, [o.org_id for o in self.orgs.values()]))

    @rule(now=RARELY)
    def settle_and_compare(self, now: bool) -> None:
        if now:
            self.run(self._settle_and_compare())

    def teardown(self) -> None:
        """Every example ends drained, with Redis, Postgres and the model compared (not only when
        the rare rule above happened to run)."""
        if hasattr(self, "orgs"):
            self.run(self._settle_and_compare())

    async def _drain(self) -> None:
        await apply_pending_credits(self.rt, older_than_ms=0)
        for o in self.orgs.values():
            await drain_org_fully(self.rt, o.org_id)

    async def _settle_and_compare(self) -> None:
        await self._drain()
        for o in self.orgs.values():
            row = await self.rt.pg.fetchrow(
                """SELECT b.balance_pence, b.debt_pence,
                          (SELECT coalesce(sum(amount_pence), 0) FROM ledger_entries WHERE org_id = $1) AS amounts,
                          (SELECT coalesce(sum(debt_delta_pence), 0) FROM ledger_entries WHERE org_id = $1) AS debts
                   FROM org_balances b WHERE b.org_id = $1""",
                o.org_id,
            )
            wallet = await read_wallet(self.rt, o.org_id)
            assert wallet is not None
            assert row["amounts"] == row["balance_pence"] == wallet.balance_pence, (o.org_id, dict(row), wallet)
            assert row["debts"] == row["debt_pence"] == wallet.debt_pence, (o.org_id, dict(row), wallet)
        report = await check(self.rt, [o.org_id for o in self.orgs.values()])
        assert report.clean, report.drifted
        charges = await self._charges()
        SEEN["settled and compared"] += 1
        for c in self.calls.values():
            if c.reported and c.messages and c.messages[-1] and c.call_id in charges and self._payer(c) is not None:
                billed = (c.ended_ms - c.started_ms + 999) // 1000
                org = self.orgs[self._payer(c)]  # type: ignore[index]
                assert sum(charges[c.call_id].values()) == call_cost_pence(billed, org.rate), (c, charges[c.call_id])

    # Invariants --------------------------------------------------------------------------------

    def _payer(self, c: CallModel) -> str | None:
        """The org that may pay: the number's, else one that admitted it (None: nobody)."""
        if c.org is not None:
            return c.org
        if c.hint in c.admitted_by:
            return c.hint
        return next(iter(sorted(c.admitted_by)), None) if c.admitted_by else None

    async def _entries(self) -> list[tuple[str, str | None, int]]:
        """Every ledger entry of the model's orgs as (org name, call id, change of net worth =
        amount - debt_delta): the ledger, plus what is still in the outboxes on its way there."""
        by_org_id = {o.org_id: name for name, o in self.orgs.items()}
        seen: dict[str, tuple[str, str | None, int]] = {}
        rows = await self.rt.pg.fetch(
            "SELECT idempotency_key, org_id, call_id, amount_pence, debt_delta_pence FROM ledger_entries WHERE org_id = ANY($1::text[])",
            list(by_org_id),
        )
        for row in rows:
            seen[row["idempotency_key"]] = (
                by_org_id[row["org_id"]],
                row["call_id"],
                row["amount_pence"] - row["debt_delta_pence"],
            )
        for org_id, name in by_org_id.items():
            for stream_id, fields in await self.rt.redis.xrange(self.rt.keys.org(org_id).outbox, "-", "+"):
                item = parse_entry(stream_id, fields)
                if isinstance(item, LedgerEntry):
                    seen.setdefault(
                        item.idempotency_key, (name, item.call_id, item.amount_pence - item.debt_delta_pence)
                    )
        return list(seen.values())

    async def _charges(self) -> dict[str, dict[str, int]]:
        """What every call has been charged, by org."""
        charges: dict[str, dict[str, int]] = {}
        for org_name, call_id, worth in await self._entries():
            if call_id is not None:
                by_org = charges.setdefault(call_id, {})
                by_org[org_name] = by_org.get(org_name, 0) - worth
        return charges

    @invariant()
    def promises_hold(self) -> None:
        if not hasattr(self, "orgs"):
            return
        self.run(self._promises_hold())

    async def _promises_hold(self) -> None:
        for name, o in self.orgs.items():
            wallet = await read_wallet(self.rt, o.org_id)
            if wallet is None:
                continue  # not in Redis yet after a rebuild's race; the next step brings it in
            holds = await live_holds(self.rt, o.org_id)
            assert wallet.held_pence == sum(h.hold_pence for h in holds.values())
            assert wallet.available_pence == wallet.balance_pence - wallet.held_pence
            assert wallet.debt_pence >= 0
            assert wallet.balance_pence >= -o.overdraft
            if o.max_calls is not None:
                assert sum(1 for h in holds.values() if h.max_duration_s > 0) <= o.max_calls
        entries = await self._entries()
        charges: dict[str, dict[str, int]] = {}
        funds = {name: 0 for name in self.orgs}  # credits less assets: what calls may spend
        for org_name, call_id, worth in entries:
            if call_id is None:
                funds[org_name] += worth
            else:
                charges.setdefault(call_id, {})[org_name] = charges.get(call_id, {}).get(org_name, 0) - worth
        for call_id, by_org in charges.items():
            c = self.calls.get(call_id)
            assert c is not None, f"a charge for a call nobody made: {call_id}"
            assert set(by_org) <= {self._payer(c)} | c.admitted_by, (c, by_org)  # only an org that owns or admitted it
            SEEN[f"charged calls ({c.route})"] += 1
        # Calls, billed or still running, as Vapi knows them: what each org's calls have really cost.
        spent = {name: 0 for name in self.orgs}
        allowance = {name: 0 for name in self.orgs}
        for c in self.calls.values():
            payer = self._payer(c)
            by_org = charges.get(c.call_id, {})
            rate = self.orgs[payer].rate if payer else max(o.rate for o in self.orgs.values())
            truth_cost = call_cost_pence((c.true_duration_ms(self.clock.value_ms) + 999) // 1000, rate)
            assert sum(by_org.values()) <= truth_cost, (c, by_org, truth_cost)  # never charged twice
            if payer is None or c.started_ms == 0:
                continue  # nobody pays for it (unattributed): it spends no org's money
            spent[payer] += truth_cost
            unseen = c.lost_in_progress or c.failing_control  # the engine could not watch or end it
            allowance[payer] += truth_cost if unseen else -(-rate * (GRACE_S + STEP_S_MAX + 2) // 60)
        for name, o in self.orgs.items():
            # No org spends beyond its credit + grace x rate x its calls (+ one clock step each).
            assert spent[name] <= max(0, funds[name]) + allowance[name], (name, spent, funds, allowance)


@pytest.fixture
def model_settings(settings: Settings) -> Settings:
    return replace(settings, admin_token=ADMIN_TOKEN, vapi_webhook_secret=WEBHOOK_SECRET, **SETTINGS)


class HangingEndpoint:
    """An alert endpoint that accepts connections and never answers."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.handlers: list[asyncio.Task[Any]] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._hang, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/alerts"

    async def _hang(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.append(task)
        self.writers.append(writer)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()
        await asyncio.sleep(0.05)  # the aborted transports' callbacks run while the loop is open
        gc.collect()


def run_model(settings: Settings, max_examples: int, *, derandomize: bool = False) -> None:
    loop = asyncio.new_event_loop()
    clock = ManualClock()

    async def open_world() -> tuple[Any, ...]:
        fake_cm = fake_vapi_server()
        fake = await fake_cm.__aenter__()
        vapi_api_cm = fake_vapi_api_server()
        vapi_api = await vapi_api_cm.__aenter__()
        hanging = HangingEndpoint()
        hanging_url = await hanging.start()
        # Vapi's REST API too: numbers are bought there, and a control URL the engine lost is found there.
        worker_settings = replace(
            settings, vapi_control_base_url=fake.base_url, vapi_api_key=VAPI_API_KEY, vapi_base_url=vapi_api.base_url
        )
        app = create_app(worker_settings, clock=clock)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://credit-engine.test")
        rt = await Runtime.open(worker_settings, clock=clock)
        return fake_cm, fake, vapi_api_cm, vapi_api, hanging, hanging_url, app, lifespan, client, rt

    fake_cm, fake, vapi_api_cm, vapi_api, hanging, hanging_url, app, lifespan, client, rt = loop.run_until_complete(
        open_world()
    )
    http = httpx.AsyncClient()
    outbound = outbound_for_alerts(allow_private=True)
    Calls.loop, Calls.app, Calls.client, Calls.rt, Calls.clock = loop, app, client, rt, clock
    Calls.fake, Calls.hanging_url, Calls.http, Calls.outbound = fake, hanging_url, http, outbound  # type: ignore[attr-defined]
    Calls.vapi_api = vapi_api  # type: ignore[attr-defined]
    try:
        run_state_machine_as_test(
            Calls,
            settings=hypothesis_settings(
                max_examples=max_examples,
                derandomize=derandomize,
                stateful_step_count=40,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    finally:

        async def close_world() -> None:
            await client.aclose()
            await http.aclose()
            await outbound.aclose()
            await lifespan.__aexit__(None, None, None)
            await rt.close()
            await hanging.close()
            await fake_cm.__aexit__(None, None, None)
            await vapi_api_cm.__aexit__(None, None, None)
            assert vapi_api.invalid == []  # every request to Vapi's API was one it accepts
            assert settings.redis_url is not None
            await delete_prefix(settings.redis_url, settings.key_prefix)

        loop.run_until_complete(close_world())
        loop.close()


def test_the_promises_hold_whatever_vapi_and_clients_send(model_settings: Settings) -> None:
    SEEN.clear()
    # The same examples every run (hypothesis's derandomize): twelve random ones once went by with no
    # report at all, and the check below (rightly) failed a run that had tested nothing wrong. The
    # soak below, and CI's bounded soak, draw new examples every time.
    examples = int(os.environ.get("CREDIT_ENGINE_MODEL_EXAMPLES", "12"))
    run_model(model_settings, max_examples=examples, derandomize=os.environ.get("CREDIT_ENGINE_MODEL_RANDOM") != "1")
    print("model runs did:", dict(sorted(SEEN.items())))
    # Not vacuous: calls were admitted, reported, billed, ended by the kill switch, replayed.
    for what in ("inbound admitted", "reports", "end-calls pushed", "replays", "settled and compared"):
        assert SEEN[what] > 0, (what, SEEN)


@pytest.mark.soak
def test_the_promises_hold_whatever_vapi_and_clients_send_soak(model_settings: Settings) -> None:
    run_model(model_settings, max_examples=int(os.environ.get("CREDIT_ENGINE_SOAK_EXAMPLES", "400")) // 2)
