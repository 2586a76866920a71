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
