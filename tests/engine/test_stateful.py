"""Random sequences of every operation, against the real scripts and a small pure-Python model.

After every step: each operation's outcome is the model's; Redis's balance, held, debt and live
holds are the model's; available = balance - held; held = the sum of live holds; no asset
deduction took available below zero. After the worker drains: the sum of the ledger's amounts
= the Redis balance = the Postgres projection (and the same for debt). Rebuilding Redis from
Postgres (after a drain) changes nothing.
"""

import asyncio
import os
import secrets
from dataclasses import dataclass, field, replace
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from credit_engine.engine.amounts import billed_seconds_from_ms, call_cost_pence, charge_with_floor
from credit_engine.engine.assets import deduct_asset
from credit_engine.engine.balances import read_wallet
from credit_engine.engine.clock import ManualClock
from credit_engine.engine.config import Settings
from credit_engine.engine.credits import credit
from credit_engine.engine.holds import (
    CallEvent,
    check_call,
    commit_call,
    expire_call,
    live_holds,
    release_call,
    reserve_call,
)
from credit_engine.engine.org_settings import OrgSettings
from credit_engine.engine.orgs import create_org
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.restore import ensure_rebuilt
from credit_engine.engine.runtime import Runtime
from tests.conftest import delete_prefix

CALLS = [f"call-{i}" for i in range(4)]
KEYS = [f"key-{i}" for i in range(4)]
SLACK_MS = 10 * 60 * 1000
EXTENSIONS_MAX = 8


@dataclass
class HoldModel:
    hold_pence: int
    rate: int
    started_ms: int
    last_seen_ms: int
    expires_ms: int
    max_duration_s: int
    ended_ms: int = 0


@dataclass
class OrgModel:
    rate: int
    overdraft: int
    block: int
    balance: int = 0
    debt: int = 0
    holds: dict[str, HoldModel] = field(default_factory=dict)
    resolved: dict[str, tuple[str, int, int, int]] = field(default_factory=dict)  # status, charged, billed, rate
    assets: dict[str, int] = field(default_factory=dict)
    credits: dict[str, int] = field(default_factory=dict)

    @property
    def held(self) -> int:
        return sum(h.hold_pence for h in self.holds.values())

    def charge(self, cost: int) -> None:
        self.balance, debt_delta = charge_with_floor(self.balance, self.overdraft, cost)
        self.debt += debt_delta

    def credit(self, amount: int) -> None:
        repay = min(self.debt, amount)
        self.balance += amount - repay
        self.debt -= repay


class Ledger(RuleBasedStateMachine):
    loop: asyncio.AbstractEventLoop
    rt: Runtime

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    @initialize(
        rates=st.lists(st.sampled_from([1, 7, 60, 600]), min_size=2, max_size=2),
        overdrafts=st.lists(st.sampled_from([0, 100]), min_size=2, max_size=2),
        blocks=st.lists(st.sampled_from([1, 5]), min_size=2, max_size=2),
    )
    def setup(self, rates: list[int], overdrafts: list[int], blocks: list[int]) -> None:
        self.clock = ManualClock()
        self.rt.clock = self.clock
        self.models: dict[str, OrgModel] = {}
        for rate, overdraft, block in zip(rates, overdrafts, blocks, strict=True):
            org_id = f"org-{secrets.token_hex(4)}"
            settings_ = OrgSettings(rate_pence_per_minute=rate, overdraft_pence=overdraft, hold_block_minutes=block)
            self.run(create_org(self.rt, org_id, org_id, settings_))
            self.models[org_id] = OrgModel(rate=rate, overdraft=overdraft, block=block)
        self.org_ids = list(self.models)

    def org(self, index: int) -> tuple[str, OrgModel]:
        org_id = self.org_ids[index]
        return org_id, self.models[org_id]

    @rule(index=st.integers(0, 1), key=st.sampled_from(KEYS), amount=st.integers(1, 3000))
    def topup(self, index: int, key: str, amount: int) -> None:
        org_id, m = self.org(index)
        result = self.run(credit(self.rt, org_id, key, amount))
        if key in m.credits:
            assert result.outcome.name == ("replayed" if m.credits[key] == amount else "idempotency_conflict")
            return
        assert result.outcome.name == "ok" and result.applied
        m.credits[key] = amount
        m.credit(amount)

    @rule(index=st.integers(0, 1), key=st.sampled_from(KEYS), amount=st.integers(1, 2000))
    def deduct(self, index: int, key: str, amount: int) -> None:
        org_id, m = self.org(index)
        result = self.run(deduct_asset(self.rt, org_id, key, amount))
        if key in m.assets:
            assert result.outcome.name == ("replayed" if m.assets[key] == amount else "idempotency_conflict")
        elif m.balance - m.held < amount:
            assert result.outcome.name == "insufficient_funds"
        else:
            assert result.outcome.name == "ok"
            m.assets[key] = amount
            m.balance -= amount
            assert m.balance - m.held >= 0  # zero-debt: never below zero
        assert result.money.available_pence == m.balance - m.held

    @rule(index=st.integers(0, 1), call=st.sampled_from(CALLS))
    def reserve(self, index: int, call: str) -> None:
        org_id, m = self.org(index)
        result = self.run(reserve_call(self.rt, org_id, call))
        available = m.balance - m.held
        if call in m.holds:
            expected = "replayed"
        elif call in m.resolved:
            expected = "call_already_resolved"
        elif available <= 0 or available < m.rate or available * 60 // m.rate < 10:
            expected = "insufficient_funds"
        else:
            expected = "ok"
            max_duration_s = min(available * 60 // m.rate, 43_200)
            now = self.clock.value_ms
            m.holds[call] = HoldModel(
                min(m.block * m.rate, available), m.rate, 0, now, now + max_duration_s * 1000 + SLACK_MS, max_duration_s
            )
            assert (result.hold_pence, result.max_duration_s) == (m.holds[call].hold_pence, max_duration_s)
        assert result.outcome.name == expected

    @rule(index=st.integers(0, 1), call=st.sampled_from(CALLS), event=st.sampled_from(list(CallEvent)))
    def check(self, index: int, call: str, event: CallEvent) -> None:
        org_id, m = self.org(index)
        result = self.run(check_call(self.rt, org_id, call, event))
        hold = m.holds.get(call)
        if hold is None:
            assert result.outcome.name == "hold_not_found"
            return
        now = self.clock.value_ms
        changed = False
        if event == CallEvent.start and hold.started_ms == 0 and hold.ended_ms == 0:
            hold.started_ms = now
            hold.expires_ms = max(hold.expires_ms, now + hold.max_duration_s * 1000 + SLACK_MS)
            changed = True
        elif event == CallEvent.end and hold.ended_ms == 0:
            hold.ended_ms = now
            hold.expires_ms = now + SLACK_MS
            changed = True
        clock_now = min(now, hold.ended_ms) if hold.ended_ms else now
        elapsed = clock_now - hold.started_ms if hold.started_ms and clock_now > hold.started_ms else 0
        cost = call_cost_pence(billed_seconds_from_ms(elapsed), hold.rate)
        if hold.started_ms and not hold.ended_ms and hold.hold_pence - cost < hold.rate:
            for _ in range(EXTENSIONS_MAX):
                available = m.balance - m.held
                if available <= 0:
                    break
                hold.hold_pence += min(m.block * hold.rate, available)
                changed = True
                if hold.hold_pence - cost >= hold.rate:
                    break
        # The last moment seen is kept to the second: rewritten on a change or a second later.
        if changed or now - hold.last_seen_ms >= 1000:
            hold.last_seen_ms = max(hold.last_seen_ms, now)
        remaining = hold.hold_pence * 60_000 // hold.rate - elapsed
        assert result.outcome.name == "ok"
        assert (result.cost_so_far_pence, result.hold_pence, result.remaining_ms) == (cost, hold.hold_pence, remaining)
        assert result.end_call == (hold.ended_ms > 0 or (hold.started_ms > 0 and remaining <= 0))

    @rule(ms=st.integers(0, 20 * 60_000))
    def advance_clock(self, ms: int) -> None:
        self.clock.advance(ms)

    @rule(index=st.integers(0, 1), call=st.sampled_from(CALLS), billed=st.integers(0, 900))
    def commit(self, index: int, call: str, billed: int) -> None:
        org_id, m = self.org(index)
        result = self.run(commit_call(self.rt, org_id, call, billed))
        state = m.resolved.get(call)
        if state is not None and state[0] == "committed":
            assert result.outcome.name == ("replayed" if state[2] == billed else "idempotency_conflict")
            return
        if state is not None:
            true_cost = call_cost_pence(billed, state[3])
            difference = true_cost - state[1]
            if difference > 0:
                m.charge(difference)
            elif difference < 0:
                m.credit(-difference)
            m.resolved[call] = ("committed", true_cost, billed, state[3])
            assert (result.outcome.name, result.charged_pence) == ("adjusted", difference)
            return
        hold = m.holds.pop(call, None)
        rate = hold.rate if hold else m.rate
        cost = call_cost_pence(billed, rate)
        m.charge(cost)
        m.resolved[call] = ("committed", cost, billed, rate)
        assert (result.outcome.name, result.charged_pence) == ("ok", cost)

    @rule(index=st.integers(0, 1), call=st.sampled_from(CALLS), expire=st.booleans())
    def release_or_expire(self, index: int, call: str, expire: bool) -> None:
        org_id, m = self.org(index)
        result = self.run((expire_call if expire else release_call)(self.rt, org_id, call))
        hold = m.holds.get(call)
        if hold is None:
            assert result.outcome.name == ("replayed" if call in m.resolved else "hold_not_found")
            return
        if expire and self.clock.value_ms < hold.expires_ms:
            assert result.outcome.name == "not_expired"
            return
        known_until = hold.ended_ms or hold.last_seen_ms
        billed = billed_seconds_from_ms(known_until - hold.started_ms) if hold.started_ms else 0
        cost = call_cost_pence(billed, hold.rate)
        m.charge(cost)
        del m.holds[call]
        m.resolved[call] = ("expired" if expire else "released", cost, billed, hold.rate)
        assert (result.outcome.name, result.charged_pence) == ("ok", cost)

    @rule()
    def drain_and_compare_with_postgres(self) -> None:
        for org_id, m in self.models.items():
            self.run(drain_org_fully(self.rt, org_id))
            row = self.run(
                self.rt.pg.fetchrow(
                    """SELECT b.balance_pence, b.debt_pence,
                          (SELECT coalesce(sum(amount_pence), 0) FROM ledger_entries WHERE org_id = $1) AS amounts,
                          (SELECT coalesce(sum(debt_delta_pence), 0) FROM ledger_entries WHERE org_id = $1) AS debts
                   FROM org_balances b WHERE b.org_id = $1""",
                    org_id,
                )
            )
            assert row["amounts"] == row["balance_pence"] == m.balance
            assert row["debts"] == row["debt_pence"] == m.debt

    @rule()
    def lose_redis_and_rebuild(self) -> None:
        """Redis loses everything after a drain: the rebuild from Postgres must change nothing."""
        self.drain_and_compare_with_postgres()
        assert self.rt.settings.redis_url is not None
        self.run(delete_prefix(self.rt.settings.redis_url, self.rt.settings.key_prefix))
        self.run(ensure_rebuilt(self.rt))

    @invariant()
    def redis_agrees_with_the_model(self) -> None:
        if not hasattr(self, "models"):
            return
        for org_id, m in self.models.items():
            wallet = self.run(read_wallet(self.rt, org_id))
            assert wallet is not None
            assert (wallet.balance_pence, wallet.held_pence, wallet.debt_pence) == (m.balance, m.held, m.debt)
            assert wallet.available_pence == wallet.balance_pence - wallet.held_pence
            holds = self.run(live_holds(self.rt, org_id))
            assert {call: h.hold_pence for call, h in holds.items()} == {c: h.hold_pence for c, h in m.holds.items()}
            assert wallet.held_pence == sum(h.hold_pence for h in holds.values())


def test_random_operation_sequences_keep_every_invariant(settings: Settings) -> None:
    run_machine(settings, max_examples=40)


@pytest.mark.soak
def test_random_operation_sequences_soak(settings: Settings) -> None:
    run_machine(settings, max_examples=int(os.environ.get("CREDIT_ENGINE_SOAK_EXAMPLES", "400")))


def run_machine(settings: Settings, max_examples: int) -> None:
    loop = asyncio.new_event_loop()
    rt = loop.run_until_complete(Runtime.open(replace(settings)))
    Ledger.loop = loop
    Ledger.rt = rt
    try:
        run_state_machine_as_test(
            Ledger,
            settings=hypothesis_settings(
                max_examples=max_examples,
                stateful_step_count=40,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    finally:
        loop.run_until_complete(rt.close())
        assert settings.redis_url is not None
        loop.run_until_complete(delete_prefix(settings.redis_url, settings.key_prefix))
        loop.close()
