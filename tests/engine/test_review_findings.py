"""Findings of an adversarial review of the promises-at-the-edges change, kept as regression tests:
restores racing credits, unfunded holds across rebuilds and admissions, the reconciler's new
checks under normal traffic and against work landing while it reads."""

from typing import Any

import pytest

from credit_engine.engine import credits, restore
from credit_engine.engine.balances import read_wallet
from credit_engine.engine.call_index import CallIndex
from credit_engine.engine.credits import apply_pending_credits, credit
from credit_engine.engine.holds import CallEvent, Unfunded, check_call, commit_call, expire_call, reserve_call
from credit_engine.engine.killswitch_push import ControlUrls
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.reconciler import check
from credit_engine.engine.restore import restore_org_if_absent
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.snapshots import ORGS_SQL
from tests.helpers import assert_books_agree, new_org

CONTROL = "https://phone-call-websocket.aws-us-west-2-backend-production1.vapi.ai/c-1/control"


async def test_the_kill_switch_finds_the_control_url_the_webhook_keeps(rt: Runtime) -> None:
    """The webhook keeps a call's control URL in the admitting org's own hash; the kill switch
    reads it from there (without it no warning and no end-call would be sent)."""
    org_id = await new_org(rt, 1_000)
    assert (await reserve_call(rt, org_id, "c-1")).outcome == Outcome.ok
    await check_call(rt, org_id, "c-1", CallEvent.start)
    await CallIndex(rt).remember("c-1", org_id, CONTROL)
    assert await rt.redis.hget(rt.keys.org(org_id).control, "c-1") == CONTROL  # written here...
    assert (await ControlUrls(rt).get(org_id, ["c-1"]))["c-1"] == CONTROL  # ...read from elsewhere: None


async def test_a_credit_committed_while_a_restore_reads_its_snapshot_is_not_lost_in_redis(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Promise 3 / 'a credit committed between snapshots'. load_snapshots reads the balance
    (ORGS_SQL) and the idempotency records (IDEM_ENTRIES_SQL, pending_credits) in separate
    statements on a connection with no transaction (engine/restore.py snapshot_orgs). A top-up
    committed between the two is missing from the restored balance but its record ("applied") is
    staged and taken by org_restore.lua; when its Redis step then runs, credit_apply.lua sees the
    record and answers `replayed`, and the pending row is deleted. Redis keeps the old balance:
    the customer's paid credit is unusable until someone runs a repair."""
    org_id = await new_org(rt, 1_000)
    await drain_org_fully(rt, org_id)
    await rt.redis.delete(*rt.keys.org(org_id).all())  # Redis lost the org (or never had it)

    real_load = restore.load_snapshots
    real_apply = credits.apply_to_redis
    fired = False

    async def not_yet(*args: Any) -> tuple[bool, None]:
        return False, None  # the top-up's own Redis step comes a moment later

    class Conn:
        def __init__(self, conn: Any) -> None:
            self.conn = conn

        def __getattr__(self, name: str) -> Any:
            return getattr(self.conn, name)

        async def fetch(self, sql: str, *args: Any) -> Any:
            nonlocal fired
            rows = await self.conn.fetch(sql, *args)
            if sql is ORGS_SQL and not fired:
                fired = True
                monkeypatch.setattr(credits, "apply_to_redis", not_yet)
                await credit(rt, org_id, "topup-during-restore", 500)  # committed in Postgres now
                monkeypatch.setattr(credits, "apply_to_redis", real_apply)
            return rows

    async def load(conn: Any, *args: Any) -> Any:
        return await real_load(Conn(conn), *args)

    monkeypatch.setattr(restore, "load_snapshots", load)
    assert await restore_org_if_absent(rt, org_id) == Outcome.ok
    monkeypatch.setattr(restore, "load_snapshots", real_load)
    report = await apply_pending_credits(rt, older_than_ms=0)  # the worker finishes the top-up
    assert report.applied == 1
    projection = await rt.pg.fetchval("SELECT balance_pence FROM org_balances WHERE org_id = $1", org_id)
    assert projection == 1_500
    wallet = await read_wallet(rt, org_id)
    assert wallet is not None
    drift = (await check(rt, [org_id])).drifted
    assert wallet.balance_pence == 1_500, (
        f"redis {wallet.balance_pence}, ledger {projection}: the top-up is lost in redis; check: {drift}"
    )


async def test_the_reconciler_is_quiet_under_normal_traffic_with_the_new_record_checks(rt: Runtime) -> None:
    """Suspected false positives of the new call-resolution check: direct billing of cost 0, a late
    report settling an expired hold (adjustment), an unfunded hold committed, a release."""
    org_id = await new_org(rt, 1_000)
    await commit_call(rt, org_id, "direct-zero", 0)  # direct billing, cost 0: no ledger entry
    await reserve_call(rt, org_id, "expired-then-reported")
    await check_call(rt, org_id, "expired-then-reported", CallEvent.start)
    rt.clock.advance(2 * 86_400_000)  # type: ignore[attr-defined]
    assert (await expire_call(rt, org_id, "expired-then-reported")).outcome == Outcome.ok
    assert (await commit_call(rt, org_id, "expired-then-reported", 30)).outcome == Outcome.adjusted
    reservation = await reserve_call(rt, org_id, "unfunded", Unfunded.always)
    assert reservation.outcome == Outcome.admitted_unfunded
    await check_call(rt, org_id, "unfunded", CallEvent.start)
    await commit_call(rt, org_id, "unfunded", 5)
    await assert_books_agree(rt, org_id)
    # And with the events still in the outbox (not drained):
    await commit_call(rt, org_id, "direct-zero-2", 0)
    await reserve_call(rt, org_id, "in-flight")
    await commit_call(rt, org_id, "in-flight", 7)
    await reserve_call(rt, org_id, "unfunded-live", Unfunded.always)  # a live unfunded hold, started
    await check_call(rt, org_id, "unfunded-live", CallEvent.start)
    await reserve_call(rt, org_id, "unfunded-not-started", Unfunded.always)
    report = await check(rt, [org_id])
    assert report.clean, report.drifted
    await drain_org_fully(rt, org_id)
    rt.clock.advance(5_000)  # type: ignore[attr-defined]
    report = await check(rt, [org_id])
    assert report.clean, report.drifted


async def test_an_unfunded_hold_replayed_through_an_admission_says_it_is_not_funded(rt: Runtime) -> None:
    """A call first seen at in-progress that could not be funded has an unfunded hold; a
    reservation for it afterwards (the reserve API, a late duplicate assistant-request) is a
    replay of that hold, which says so (tests/webapp/test_calls_at_the_edges.py: both refuse it)."""
    org_id = await new_org(rt, 5)  # too little to fund a call
    first = await reserve_call(rt, org_id, "out-1", Unfunded.record)
    assert first.outcome == Outcome.admitted_unfunded
    again = await reserve_call(rt, org_id, "out-1")  # mode 0: an admission
    assert again.held and not again.funded  # the callers (assistant-request, the reserve API) refuse it


async def test_after_a_rebuild_a_live_unfunded_hold_is_still_ended_at_once(rt: Runtime) -> None:
    """Low. An unfunded hold (a call on a suspended number, or at max_concurrent_calls) is ended at
    once because hold_reserve.lua files the org in the kill switch's schedule for *now*. A rebuild
    from Postgres restores the hold (max_duration_s 0) but files the org only at its credit-based
    depletion moment (org_restore.lua's head, reschedule_live_orgs): with a healthy balance that is
    hours away, so a call whose end-call was not yet acknowledged when Redis was lost runs on."""
    from credit_engine.engine.killswitch import due_orgs, visit_org
    from credit_engine.engine.restore import ensure_rebuilt
    from tests.conftest import delete_prefix

    org_id = await new_org(rt, 10_000)  # 166 minutes at 60p/min
    reservation = await reserve_call(rt, org_id, "on-a-suspended-number", Unfunded.always)
    assert reservation.outcome == Outcome.admitted_unfunded
    await check_call(rt, org_id, "on-a-suspended-number", CallEvent.start)
    assert org_id in await due_orgs(rt)  # due at once
    await drain_org_fully(rt, org_id)
    assert rt.settings.redis_url is not None
    await delete_prefix(rt.settings.redis_url, rt.settings.key_prefix)  # Redis restarts empty
    await ensure_rebuilt(rt)
    assert org_id in await due_orgs(rt)  # filed for now, not for when the credit would run out
    assert (await visit_org(rt, org_id)).actions


async def test_a_rent_charge_landing_during_a_check_is_not_drift(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Low (false alarm). reconcile --check reads the outbox (org_read.lua) first and the paid
    months (rent_problems) last, and phone_numbers is not part of the before/after comparison that
    retries an org that moved. A rent charge made in between (Redis charge, then
    rent_paid_month = M) is in neither the outbox it read nor the ledger: 'number ... is marked paid
    for M, but the ledger has no rent entry'. The monthly rent run charges every number at once, so
    a check during it reports drift that is not there."""
    from credit_engine.engine import reconciler
    from credit_engine.engine.assets import charge_asset
    from credit_engine.engine.idempotency import rent_ledger_key
    from credit_engine.engine.phone_numbers import register_number

    org_id = await new_org(rt, 1_000)
    await register_number(rt, org_id, "pn-rent", number=None, assistant_id=None, provider="fake")
    real = reconciler.rent_problems

    async def rent_run_meanwhile(pg: Any, paid: Any, outbox_keys: set[str]) -> Any:
        key = rent_ledger_key(org_id, "pn-rent", "2026-12")
        meta = {"asset": "phone_number_rent", "phone_number_id": "pn-rent", "month": "2026-12"}
        assert (await charge_asset(rt, org_id, key, 100, meta=meta)).outcome == Outcome.ok
        await rt.pg.execute(
            "UPDATE phone_numbers SET rent_paid_month = '2026-12' WHERE vapi_phone_number_id = 'pn-rent'"
        )
        return await real(pg, paid, outbox_keys)

    monkeypatch.setattr(reconciler, "rent_problems", rent_run_meanwhile)
    report = await check(rt, [org_id])
    assert report.clean, report.drifted


async def test_a_resolution_drained_between_the_postgres_and_redis_reads_is_not_drift(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Suspected false positive of the new check; it holds (the org is re-read, then clean)."""
    from credit_engine.engine import reconciler

    org_id = await new_org(rt, 1_000)
    await drain_org_fully(rt, org_id)
    await reserve_call(rt, org_id, "c")
    await commit_call(rt, org_id, "c", 30)  # its resolution waits in the outbox
    real = reconciler._redis_states
    drained = False

    async def drain_first(rt_: Runtime, pg: Any) -> Any:
        nonlocal drained
        if not drained:
            drained = True
            await drain_org_fully(rt, org_id)
        return await real(rt_, pg)

    monkeypatch.setattr(reconciler, "_redis_states", drain_first)
    report = await check(rt, [org_id])
    assert drained and report.clean, (report.drifted, report.busy)
