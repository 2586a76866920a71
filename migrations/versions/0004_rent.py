"""Monthly phone-number rent: which month each number has paid, when its rent first failed,
suspension and release; and the alerts for each step.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.TIMESTAMP(timezone=True)
ALERT_KINDS_BEFORE = ("low_balance", "balance_exhausted", "call_ended_no_credit", "end_call_failed")
ALERT_KINDS = (*ALERT_KINDS_BEFORE, "rent_failed", "number_suspended", "number_released", "number_reactivated")


def _kinds(kinds: tuple[str, ...]) -> str:
    return "kind IN (" + ", ".join(f"'{kind}'" for kind in kinds) + ")"


def upgrade() -> None:
    op.add_column("phone_numbers", sa.Column("rent_paid_month", sa.Text, nullable=True))  # 'YYYY-MM'
    op.add_column("phone_numbers", sa.Column("rent_failed_month", sa.Text, nullable=True))
    op.add_column("phone_numbers", sa.Column("suspended_at", TS, nullable=True))
    op.add_column("phone_numbers", sa.Column("released_at", TS, nullable=True))
    op.create_check_constraint(
        "phone_numbers_chk_month_format",
        "phone_numbers",
        "(rent_paid_month IS NULL OR rent_paid_month ~ '^[0-9]{4}-[0-9]{2}$') "
        "AND (rent_failed_month IS NULL OR rent_failed_month ~ '^[0-9]{4}-[0-9]{2}$')",
    )
    op.drop_constraint("alert_events_kind", "alert_events", type_="check")
    op.create_check_constraint("alert_events_kind", "alert_events", _kinds(ALERT_KINDS))


def downgrade() -> None:
    op.drop_constraint("alert_events_kind", "alert_events", type_="check")
    op.create_check_constraint("alert_events_kind", "alert_events", _kinds(ALERT_KINDS_BEFORE))
    op.drop_constraint("phone_numbers_chk_month_format", "phone_numbers", type_="check")
    for column in ("released_at", "suspended_at", "rent_failed_month", "rent_paid_month"):
        op.drop_column("phone_numbers", column)
