"""The one outcome table for every script, and the decoder of their replies.

Each lua/*.lua header lists the codes it can return under `Output:`; tests/lua/test_headers.py
parses those blocks and compares them with this enum, so the two cannot drift apart.
"""

from dataclasses import dataclass
from enum import IntEnum


class Outcome(IntEnum):
    ok = 0
    replayed = 1
    adjusted = 2
    unknown_call = 3  # hold_commit: Redis has no hold and no resolution for the call
    admitted_unfunded = 4  # hold_reserve: a running call the org cannot fund, recorded so it is ended and billed
    insufficient_funds = -1
    org_unknown = -2
    idempotency_conflict = -3
    hold_not_found = -4
    call_already_resolved = -5
    outbox_full = -6
    too_many_calls = -7
    not_expired = -8
    restore_conflict = -9
    entry_not_found = -10


@dataclass(frozen=True)
class Money:
    """An org's money as a script left it."""

    balance_pence: int
    held_pence: int
    available_pence: int
    debt_pence: int
    seq: int


@dataclass(frozen=True)
class ScriptResult:
    outcome: Outcome
    money: Money
    depletion_ms: int  # the org's predicted depletion if this script moved it, else 0 (engine/killswitch.py)
    tail: tuple[int, ...]


HEAD_LENGTH = 7
# isinstance(value, int) as a C function map() calls without a generator's frame per value: the
# reply check below runs on every decision (a status check's reply has 14 values).
_is_int = int.__instancecheck__


def decode(reply: list[int], tail_length: int) -> ScriptResult:
    """Decode `{code, balance, held, available, debt, seq, depletion_ms, ...tail}` and check what it promises."""
    assert len(reply) == HEAD_LENGTH + tail_length, reply
    assert all(map(_is_int, reply)), reply
    outcome = Outcome(reply[0])
    money = Money(*reply[1:6])
    assert reply[6] >= 0, reply
    if outcome != Outcome.org_unknown:
        assert money.available_pence == money.balance_pence - money.held_pence, reply
        assert money.held_pence >= 0, reply
        assert money.debt_pence >= 0, reply
    return ScriptResult(outcome=outcome, money=money, depletion_ms=reply[6], tail=tuple(reply[HEAD_LENGTH:]))
