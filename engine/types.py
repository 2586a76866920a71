"""Shared vocabulary: ledger entry kinds and hold states, spelled once."""

from enum import StrEnum


class EntryKind(StrEnum):
    topup = "topup"  # credit, Postgres-first
    refund = "refund"  # credit, Postgres-first
    asset = "asset"  # one-off purchase (a phone number), zero-debt, Redis-first
    call_charge = "call_charge"  # a call committed at its actual cost
    call_expired = "call_expired"  # a call that never reported, charged to its last known moment
    call_adjustment = "call_adjustment"  # a late report after expiry: the difference
    debt_repayment = "debt_repayment"  # part of a credit that paid off recorded debt


CREDIT_KINDS = frozenset({EntryKind.topup, EntryKind.refund})


class HoldStatus(StrEnum):
    live = "live"
    committed = "committed"
    released = "released"
    expired = "expired"


def ledger_key(org_id: str, namespace: str, suffix: str) -> str:
    """Globally unique ledger idempotency key. Org-scoped, so orgs never collide on client keys.

    Namespaces never share a suffix space: client keys live under asset/topup/refund,
    call keys under call (call ids cannot contain '/'), derived keys under their own names.
    """
    assert "/" not in org_id
    assert "/" not in namespace
    return f"{org_id}/{namespace}/{suffix}"


def call_ledger_key(org_id: str, call_id: str, phase: str) -> str:
    assert "/" not in call_id
    return ledger_key(org_id, "call", f"{call_id}/{phase}")


def call_state_key(org_id: str, call_id: str) -> str:
    """Idempotency record of a call's resolution (commit, release or expiry)."""
    return ledger_key(org_id, "call", call_id)
