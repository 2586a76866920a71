"""The burn model: how fast an org's live calls spend, and when its credit runs out. The kill
switch's prediction is kept in Redis as running sums (lua/_burn.lua; _holds.lua's burn_add and
burn_remove move them); this module is their Python model, used by the kill switch's schedule,
`status`, the reconciler and the load tools, and held equal to the Lua on generated traffic by
tests/lua/test_burn_model.py.

A live call burns its rate from its start (from its reservation until it is known to have started,
so the prediction errs early) until it ends; an ended call's cost is frozen until its report
commits it. The sums, in whole seconds:
  burn_rate          R: the sum of the rates of the calls burning now (pence per minute)
  burn_k             K: the sum over those calls of rate * (burn_at_s - the second it began)
  burn_at_s          A: the second K was last brought up to date
  burn_frozen_pence  E: the cost of ended calls that are not committed yet
By second t the calls have spent (K + R * (t - A)) / 60 + E pence, and the org's credit runs out
when that reaches balance_pence.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from credit_engine.engine.amounts import billed_seconds_from_ms, call_cost_pence
from credit_engine.engine.records import HoldRecord

# The org hash's fields depletion_ms reads, in the order of Burn's constructor arguments.
FIELDS = ("balance_pence", "burn_rate", "burn_k", "burn_at_s", "burn_frozen_pence")


@dataclass(frozen=True)
class Burn:
    balance_pence: int
    rate: int
    k: int
    at_s: int
    frozen_pence: int

    @classmethod
    def from_fields(cls, values: Sequence[str | bytes | int | None]) -> "Burn":
        """From the org hash's FIELDS as HMGET returns them (a missing field reads as 0)."""
        balance, rate, k, at_s, frozen = (int(v or 0) for v in values)
        return cls(balance, rate, k, at_s, frozen)

    def spent_pence_by(self, t_s: int) -> float:
        """What the calls have spent by second t (frozen costs included)."""
        return (self.k + self.rate * (t_s - self.at_s)) / 60 + self.frozen_pence

    def depletion_ms(self) -> int:
        """The predicted depletion moment, as _burn.lua's burn_deadline_ms computes it: the first
        whole second by which the calls have spent the balance (0: no call is burning; may be in
        the past; never 0 otherwise)."""
        if self.rate <= 0:
            return 0
        x = math.ceil((60 * (self.balance_pence - self.frozen_pence) - self.k) / self.rate)
        return max(1, (self.at_s + x) * 1000)


def depletion_ms_of(values: Sequence[str | bytes | int | None]) -> int:
    """Burn.from_fields(values).depletion_ms(): the depletion moment from the org hash's FIELDS."""
    return Burn.from_fields(values).depletion_ms()


def burn_from_s(hold: HoldRecord) -> int:
    """The second from which a hold's call burns: its start, else its reservation."""
    return (hold.started_ms if hold.started_ms > 0 else hold.created_ms) // 1000


def frozen_pence(hold: HoldRecord) -> int:
    """What an ended call has cost (its clock is stopped); 0 if it never started."""
    if hold.started_ms == 0 or hold.ended_ms <= hold.started_ms:
        return 0
    return call_cost_pence(billed_seconds_from_ms(hold.ended_ms - hold.started_ms), hold.rate_pence_per_minute)


def burn_sums(holds: Iterable[HoldRecord], burn_at_s: int) -> tuple[int, int, int]:
    """(burn_rate, burn_k, burn_frozen_pence) as the Lua keeps them, recomputed from the holds: what
    burn_add and burn_remove sum to, whatever order the holds came and went in."""
    rate = k = frozen = 0
    for hold in holds:
        if hold.ended_ms > 0:
            frozen += frozen_pence(hold)
        else:
            rate += hold.rate_pence_per_minute
            k += hold.rate_pence_per_minute * (burn_at_s - burn_from_s(hold))
    return rate, k, frozen
