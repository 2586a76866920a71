"""`credit-engine audit vapi` and the worker's daily audit (engine/audit.py), against real Redis and
Postgres and the fake Vapi API over real HTTP (listing validated against the SDK's `calls.list`)."""

import asyncio
import json
from datetime import UTC, datetime, timedelta

from credit_engine.engine import processes
from credit_engine.engine.audit import audit_previous_day, audit_vapi
from credit_engine.engine.clock import ManualClock
from credit_engine.engine.holds import CallEvent, check_call, commit_call, expire_call, reserve_call
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.phone_numbers import register_number
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.vapi_account import VapiAccount
from tests.fake_vapi_api import API_KEY, T0, FakeVapiApi
from tests.helpers import assert_books_agree, new_org
from tests.processes import service_env

SINCE, UNTIL = "2026-11-01", "2026-11-02"


async def _audit(rt: Runtime, fake: FakeVapiApi, *args: str) -> tuple[int, str, str]:
    """The command in a process of its own (the fake serves from this test's loop meanwhile)."""
    env = service_env(rt.settings, VAPI_API_KEY=API_KEY, VAPI_BASE_URL=fake.base_url, CREDIT_ENGINE_VAPI_API_RPS="50")
    child = await asyncio.create_subprocess_exec(
        *processes.cli("audit", "vapi", *args),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), 120)
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


async def _org_with_number(rt: Runtime, fake: FakeVapiApi, balance_pence: int = 10_000) -> tuple[str, str]:
    org_id = await new_org(rt, balance_pence, rate_pence_per_minute=60)
    number = fake.add_number()
    await register_number(rt, org_id, number["id"], number=number["number"], assistant_id=None, provider="vapi")
    return org_id, number["id"]


def _ended(fake: FakeVapiApi, call_id: str, number_id: str, minute: int, seconds: float) -> None:
    started = T0 + timedelta(minutes=minute, seconds=1)
    fake.add_call(
        call_id,
        phone_number_id=number_id,
        status="ended",
        created_at=T0 + timedelta(minutes=minute),
        started_at=started,
        ended_at=started + timedelta(seconds=seconds),
    )


async def _billed(rt: Runtime, org_id: str, call_id: str, seconds: int) -> None:
    assert (await commit_call(rt, org_id, call_id, seconds)).outcome == Outcome.ok


async def test_the_audit_finds_an_unbilled_call_a_wrong_duration_and_a_call_vapi_does_not_know(
    rt: Runtime, clock: ManualClock, vapi_api: FakeVapiApi
) -> None:
    clock.value_ms = int((T0 + timedelta(hours=2)).timestamp() * 1000)  # resolutions fall in the window
    org_id, number_id = await _org_with_number(rt, vapi_api)
    _, elsewhere = await _org_with_number(rt, vapi_api)
    _ended(vapi_api, "c-ok", number_id, 1, 60.4)  # 61 s at Vapi, 60 billed: within a second
    await _billed(rt, org_id, "c-ok", 60)
    _ended(vapi_api, "c-unbilled", number_id, 2, 30)
    _ended(vapi_api, "c-wrong", number_id, 3, 40)
    await _billed(rt, org_id, "c-wrong", 100)
    await _billed(rt, org_id, "c-unknown", 50)  # Vapi never had it
    vapi_api.add_call("c-running", phone_number_id=number_id, created_at=T0 + timedelta(minutes=4), started_at=T0)
    _ended(vapi_api, "c-never-connected", number_id, 5, 0)
    vapi_api.add_call(
        "c-other-account",
        phone_number_id="pn-not-ours",
        status="ended",
        started_at=T0,
        ended_at=T0 + timedelta(seconds=9),
    )
    _ended(vapi_api, "c-before", number_id, -10, 5)  # outside the window
    await drain_org_fully(rt, org_id)
    vapi_api.list_order = "DESC"

    code, out, err = await _audit(rt, vapi_api, "--since", SINCE, "--until", UNTIL, "--json")
    assert code == 1, err
    report = json.loads(out)
    assert vapi_api.invalid == []
    assert {m["call_id"]: m["kind"] for m in report["mismatches"]} == {
        "c-unbilled": "unbilled",
        "c-wrong": "duration",
        "c-unknown": "unknown_to_vapi",
    }
    by_call = {m["call_id"]: m for m in report["mismatches"]}
    assert by_call["c-unbilled"] | {"org_id": org_id} == by_call["c-unbilled"]
    assert (by_call["c-unbilled"]["vapi_seconds"], by_call["c-unbilled"]["billed_seconds"]) == (30, None)
    assert (by_call["c-wrong"]["vapi_seconds"], by_call["c-wrong"]["billed_seconds"]) == (40, 100)
    assert (by_call["c-unknown"]["vapi_seconds"], by_call["c-unknown"]["billed_seconds"]) == (None, 50)
    assert not any(m["settled"] for m in report["mismatches"])
    assert report["ok"] is False and report["running"] == 1
    assert report["vapi_calls"] == 6  # the window's: c-before is not listed
    assert report["orgs"] == {
        org_id: {"calls": 5, "unbilled": 1, "duration": 1, "unknown_to_vapi": 1, "settled": 0, "settled_pence": 0}
    }
    assert set(report) == {"ok", "since", "until", "vapi_calls", "compared", "running", "mismatches", "orgs"}
    assert elsewhere not in report["orgs"]

    code, out, _ = await _audit(rt, vapi_api, "--since", SINCE, "--until", UNTIL)
    assert code == 1
    assert "✗ unbilled" in out and "c-wrong" in out and "Vapi does not know it" in out and org_id in out


async def test_settle_bills_the_unbilled_call_exactly_once(
    rt: Runtime, clock: ManualClock, vapi_api: FakeVapiApi
) -> None:
    clock.value_ms = int((T0 + timedelta(hours=2)).timestamp() * 1000)
    org_id, number_id = await _org_with_number(rt, vapi_api)
    _ended(vapi_api, "c-lost", number_id, 2, 29.5)  # 30 s: 30p
    vapi_api.list_order = "ASC"

    code, out, err = await _audit(rt, vapi_api, "--since", SINCE, "--until", UNTIL, "--settle", "--json")
    assert code == 0, (out, err)  # the only mismatch is settled
    report = json.loads(out)
    assert [(m["kind"], m["settled"], m["settled_pence"]) for m in report["mismatches"]] == [("unbilled", True, 30)]
    await drain_org_fully(rt, org_id)
    entries = await rt.pg.fetch(
        "SELECT idempotency_key, amount_pence, billed_seconds FROM ledger_entries WHERE call_id = 'c-lost'"
    )
    assert [tuple(e) for e in entries] == [(f"{org_id}/call/c-lost/charge", -30, 30)]
    assert await assert_books_agree(rt, org_id) == 10_000 - 30

    for args in (("--settle",), ()):  # a second run bills nothing; the audit is clean
        code, out, err = await _audit(rt, vapi_api, "--since", SINCE, "--until", UNTIL, "--json", *args)
        assert code == 0, (out, err)
        assert json.loads(out)["mismatches"] == []
    await drain_org_fully(rt, org_id)
    assert await rt.pg.fetchval("SELECT count(*) FROM ledger_entries WHERE call_id = 'c-lost'") == 1
    # And the report that never came turns up: a replay.
    assert (await commit_call(rt, org_id, "c-lost", 30)).outcome == Outcome.replayed
    assert await assert_books_agree(rt, org_id) == 10_000 - 30


async def test_the_audit_pages_through_a_window_larger_than_a_page(
    rt: Runtime, clock: ManualClock, vapi_api: FakeVapiApi
) -> None:
    org_id, number_id = await _org_with_number(rt, vapi_api)
    for i in range(7):
        _ended(vapi_api, f"c-{i}", number_id, i, 0)
    vapi_api.add_call("c-same-instant", phone_number_id=number_id, status="ended", created_at=T0 + timedelta(minutes=3))
    async with VapiAccount(API_KEY, vapi_api.base_url) as account:
        calls = await account.list_calls(
            datetime.fromisoformat(SINCE + "T00:00:00+00:00"), T0 + timedelta(days=1), page_size=3
        )
    assert sorted(call.id for call in calls) == sorted([f"c-{i}" for i in range(7)] + ["c-same-instant"])
    assert vapi_api.invalid == []
    assert len(vapi_api.seen_where("GET", "/call")) >= 3


async def test_bad_input_and_a_missing_key_exit_2_without_a_traceback(rt: Runtime, vapi_api: FakeVapiApi) -> None:
    for args in (("--since", "yesterday"), ("--since", UNTIL, "--until", SINCE)):
        code, out, err = await _audit(rt, vapi_api, *args)
        assert code == 2 and "error:" in err and "Traceback" not in err, err
    env = {k: v for k, v in service_env(rt.settings).items() if k != "VAPI_API_KEY"}
    child = await asyncio.create_subprocess_exec(
        *processes.cli("audit", "vapi", "--since", SINCE), env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await child.communicate()
    assert child.returncode == 2 and b"VAPI_API_KEY is not set" in err


async def test_the_daily_audit_alerts_each_org_with_mismatches_once(
    rt: Runtime, clock: ManualClock, vapi_api: FakeVapiApi
) -> None:
    clock.value_ms = int((T0 + timedelta(days=1, minutes=20)).timestamp() * 1000)  # audits 2026-11-01
    org_id, number_id = await _org_with_number(rt, vapi_api)
    _ended(vapi_api, "c-lost", number_id, 2, 12)
    async with VapiAccount(API_KEY, vapi_api.base_url) as account:
        for _ in range(2):
            report = await audit_previous_day(rt, account)
            assert [m.kind for m in report.mismatches] == ["unbilled"]
    alerts = await rt.pg.fetch("SELECT kind, idempotency_key, payload FROM alert_events WHERE org_id = $1", org_id)
    assert [(a["kind"], a["idempotency_key"]) for a in alerts] == [
        ("vapi_audit_mismatch", f"{org_id}/vapi_audit_mismatch/2026-11-01")
    ]
    assert alerts[0]["payload"]["unbilled"] == 1 and alerts[0]["payload"]["call_ids"] == ["c-lost"]
    assert await rt.pg.fetchval("SELECT count(*) FROM ledger_entries WHERE call_id = 'c-lost'") == 0  # nothing settled


async def test_settle_corrects_a_call_the_engine_expired_at_other_seconds_exactly_once(
    rt: Runtime, clock: ManualClock, vapi_api: FakeVapiApi
) -> None:
    """The wrong duration the engine itself can make: a call whose report was lost, expired at the
    seconds the engine saw. `--settle` bills the difference to Vapi's seconds, once. (In-process,
    on the test's clock: a CLI process would run on today's, weeks after Redis forgot the call.)"""
    org_id, number_id = await _org_with_number(rt, vapi_api)
    clock.value_ms = int((T0 + timedelta(minutes=5, seconds=1)).timestamp() * 1000)
    assert (await reserve_call(rt, org_id, "c-exp")).outcome == Outcome.ok
    await check_call(rt, org_id, "c-exp", CallEvent.start)
    clock.value_ms += 20_000
    await check_call(rt, org_id, "c-exp", CallEvent.end)  # the engine saw 20 s; Vapi ran 95 s
    clock.value_ms = int((T0 + timedelta(hours=20)).timestamp() * 1000)
    expired = await expire_call(rt, org_id, "c-exp")
    assert expired.outcome == Outcome.ok and expired.charged_pence == 20
    _ended(vapi_api, "c-exp", number_id, 5, 95)
    since, until = datetime.fromisoformat(SINCE).replace(tzinfo=UTC), datetime.fromisoformat(UNTIL).replace(tzinfo=UTC)

    async with VapiAccount(API_KEY, vapi_api.base_url) as account:
        found = (await audit_vapi(rt, account, since, until)).mismatches
        assert [(m.kind, m.vapi_seconds, m.billed_seconds, m.settled) for m in found] == [("duration", 95, 20, False)]
        settled = (await audit_vapi(rt, account, since, until, settle=True)).mismatches
        assert [(m.settled, m.settled_pence) for m in settled] == [(True, 75)]  # the difference
        for settle in (True, False):  # a second run bills nothing; the audit is clean
            assert (await audit_vapi(rt, account, since, until, settle=settle)).mismatches == []
    await drain_org_fully(rt, org_id)
    rows = await rt.pg.fetch("SELECT amount_pence FROM ledger_entries WHERE call_id = 'c-exp' ORDER BY id")
    assert [row["amount_pence"] for row in rows] == [-20, -75]
    assert await assert_books_agree(rt, org_id) == 10_000 - 95
