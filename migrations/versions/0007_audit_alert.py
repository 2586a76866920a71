"""The daily audit against Vapi's calls alerts an org whose calls disagree with Vapi
(`vapi_audit_mismatch`, engine/audit.py).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ALERT_KINDS_BEFORE = (
    "low_balance",
    "balance_exhausted",
    "call_ended_no_credit",
    "end_call_failed",
    "rent_failed",
    "number_suspended",
    "number_released",
    "number_reactivated",
)
ALERT_KINDS = (*ALERT_KINDS_BEFORE, "vapi_audit_mismatch")


def _kinds(kinds: tuple[str, ...]) -> str:
    return "kind IN (" + ", ".join(f"'{kind}'" for kind in kinds) + ")"


def upgrade() -> None:
    op.drop_constraint("alert_events_kind", "alert_events", type_="check")
    op.create_check_constraint("alert_events_kind", "alert_events", _kinds(ALERT_KINDS))


def downgrade() -> None:
    op.execute("DELETE FROM alert_events WHERE kind = 'vapi_audit_mismatch'")
    op.drop_constraint("alert_events_kind", "alert_events", type_="check")
    op.create_check_constraint("alert_events_kind", "alert_events", _kinds(ALERT_KINDS_BEFORE))
