"""After a fault: wait for the system to settle, then demand that the ledger, Postgres' projection
and Redis all say exactly what the load was told."""

import asyncio
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from credit_engine.engine import processes
from credit_engine.engine.balances import read_wallet
from credit_engine.engine.holds import live_holds
from credit_engine.engine.reconciler import check
from credit_engine.engine.runtime import Runtime
from tests.faults.mixed_load import OrgUnderLoad
from tests.processes import service_env


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)

    @property
    def held(self) -> bool:
        return not self.problems


async def oldest_outbox_age_ms(rt: Runtime, org_ids: list[str]) -> int:
    """How far the ledger is behind for these orgs: the age of the oldest entry still in an outbox."""
    now_ms = int(time.time() * 1000)
    oldest = 0
    for org_id in org_ids:
        first = await rt.redis.xrange(rt.keys.org(org_id).outbox, count=1)
        if first:
            oldest = max(oldest, now_ms - int(first[0][0].split("-")[0]))
    return oldest


async def settled(rt: Runtime, org_ids: list[str], timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            lengths = [await rt.redis.xlen(rt.keys.org(org_id).outbox) for org_id in org_ids]
            holds = [await live_holds(rt, org_id) for org_id in org_ids]
            # A top-up is committed in Postgres first; while Redis was away it waits to be applied.
            pending = await rt.pg.fetchval("SELECT count(*) FROM pending_credits WHERE org_id = ANY($1)", org_ids)
            if sum(lengths) == 0 and not any(holds) and pending == 0:
                return True
        except Exception:  # the part that was killed may still be coming back
            pass
        await asyncio.sleep(0.2)
    return False


async def verify(rt: Runtime, orgs: list[OrgUnderLoad], phone_number_pence: int) -> Verdict:
    verdict = Verdict()
    org_ids = [org.org_id for org in orgs]
    if not await settled(rt, org_ids):
        verdict.problems.append("did not settle within 60 s (outbox entries, live holds or pending credits left)")
        return verdict
    for org in orgs:
        verdict.problems += await org_problems(rt, org, phone_number_pence)
    report = await check(rt, org_ids)
    if not report.clean:
        verdict.problems.append(f"reconciler: drifted {[d.problems for d in report.drifted]} busy {report.busy}")
    return verdict


async def org_problems(rt: Runtime, org: OrgUnderLoad, phone_number_pence: int) -> list[str]:
    """One org's ledger against what was accepted: top-ups, number charges, call charges, and the
    balance as expected = ledger sum = projection = Redis; and no dead letters."""
    problems: list[str] = []
    rows = await rt.pg.fetch("SELECT kind, amount_pence, call_id FROM ledger_entries WHERE org_id = $1", org.org_id)
    topups = sorted(r["amount_pence"] for r in rows if r["kind"] == "topup")
    expected_topups = sorted([*org.topups_pence.values(), 10_000_000])
    if topups != expected_topups:
        problems.append(f"{org.org_id}: top-ups in the ledger {len(topups)}, accepted {len(expected_topups)}")
    assets = [r["amount_pence"] for r in rows if r["kind"] == "asset"]
    if sorted(assets) != [-phone_number_pence] * len(org.provisions):
        problems.append(f"{org.org_id}: {len(assets)} number charges in the ledger, {len(org.provisions)} accepted")
    problems += _call_charge_problems(org, rows)
    expected_balance = org.expected_balance_pence(phone_number_pence)
    ledger_sum = sum(r["amount_pence"] for r in rows)
    projection = await rt.pg.fetchval("SELECT balance_pence FROM org_balances WHERE org_id = $1", org.org_id)
    wallet = await read_wallet(rt, org.org_id)
    redis_balance = wallet.balance_pence if wallet else None
    if not expected_balance == ledger_sum == projection == redis_balance:
        problems.append(
            f"{org.org_id}: expected {expected_balance}, ledger {ledger_sum}, "
            f"projection {projection}, redis {redis_balance}"
        )
    dead = await rt.redis.xlen(rt.keys.org(org.org_id).dead)
    if dead:
        problems.append(f"{org.org_id}: {dead} dead-lettered outbox entries")
    return problems


def _call_charge_problems(org: OrgUnderLoad, rows: list[Any]) -> list[str]:
    """Each call charged once, at the cost accepted for it (a call that cost nothing: no charge)."""
    charges: dict[str, list[int]] = {}
    for r in rows:
        if r["call_id"] is not None:
            charges.setdefault(r["call_id"], []).append(r["amount_pence"])
    expected_charges = {call_id: [-cost] for call_id, cost in org.calls_pence.items() if cost > 0}
    if charges != expected_charges:
        wrong = {c for c in charges.keys() | expected_charges.keys() if charges.get(c) != expected_charges.get(c)}
        return [
            f"{org.org_id}: call charges differ for {sorted(wrong)[:5]} "
            f"(ledger {[charges.get(c) for c in sorted(wrong)[:5]]}, "
            f"expected {[expected_charges.get(c) for c in sorted(wrong)[:5]]})"
        ]
    return []


def reconcile_cli_exit_code(rt: Runtime) -> tuple[int, str]:
    """`credit-engine reconcile --check` over the whole deployment, as an operator would run it."""
    env = service_env(rt.settings)
    done = subprocess.run(
        processes.cli("reconcile", "--check"), env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    return done.returncode, done.stdout[-2000:] + done.stderr[-2000:]
