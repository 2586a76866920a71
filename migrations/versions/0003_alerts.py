"""Alerts to orgs' webhooks (low balance, balance exhausted, call ended for lack of credit,
end-call failed), written by the ledger writer from the outbox and delivered by the worker.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.create_table(
        "alert_events",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("org_id", sa.Text, sa.ForeignKey("orgs.org_id", ondelete="RESTRICT"), nullable=False),
        sa.Column("idempotency_key", sa.Text, nullable=False, unique=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("call_id", sa.Text, nullable=True),
        sa.Column("payload", postgresql.JSONB, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("delivered_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.CheckConstraint(
            "kind IN ('low_balance', 'balance_exhausted', 'call_ended_no_credit', 'end_call_failed')",
            name="alert_events_kind",
        ),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed', 'no_endpoint')", name="alert_events_status"),
    )
    # The delivery loop's query: due pending alerts, oldest first.
    op.create_index(
        "alert_events_due", "alert_events", ["next_attempt_at"], postgresql_where=sa.text("status = 'pending'")
    )
    op.create_index("alert_events_org", "alert_events", ["org_id", "id"])


def downgrade() -> None:
    op.drop_table("alert_events")
