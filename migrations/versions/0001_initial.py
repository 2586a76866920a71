"""Orgs, the append-only ledger, its per-org projection, call holds and pending credits.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from pathlib import Path

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from credit_engine.migrations.sql_statements import read_statements

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
TS = sa.TIMESTAMP(timezone=True)
ENTRY_KINDS = ("topup", "refund", "asset", "call_charge", "call_expired", "call_adjustment", "debt_repayment")
HOLD_STATUSES = ("live", "committed", "released", "expired")
AMOUNT_MAX = 10**12


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "orgs",
        sa.Column("org_id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("rate_pence_per_minute", sa.Integer, nullable=False),
        sa.Column("overdraft_pence", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("min_start_pence", sa.BigInteger, nullable=True),  # NULL: one minute at the rate
        sa.Column("hold_block_minutes", sa.Integer, nullable=False, server_default="5"),
        sa.Column("grace_seconds", sa.Integer, nullable=False, server_default="10"),
        sa.Column("low_balance_threshold_pence", sa.BigInteger, nullable=True),
        sa.Column("alert_webhook_url", sa.Text, nullable=True),
        sa.Column("max_concurrent_calls", sa.Integer, nullable=True),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint(r"org_id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'", name="orgs_chk_org_id_format"),
        sa.CheckConstraint("length(name) BETWEEN 1 AND 200", name="orgs_chk_name_length"),
        sa.CheckConstraint("rate_pence_per_minute BETWEEN 1 AND 1000000", name="orgs_chk_rate_positive"),
        sa.CheckConstraint(f"overdraft_pence BETWEEN 0 AND {AMOUNT_MAX}", name="orgs_chk_overdraft_range"),
        sa.CheckConstraint(f"min_start_pence BETWEEN 1 AND {AMOUNT_MAX}", name="orgs_chk_min_start_positive"),
        sa.CheckConstraint("hold_block_minutes BETWEEN 1 AND 60", name="orgs_chk_hold_block_range"),
        sa.CheckConstraint("grace_seconds BETWEEN 0 AND 300", name="orgs_chk_grace_range"),
        sa.CheckConstraint(
            f"low_balance_threshold_pence BETWEEN 0 AND {AMOUNT_MAX}", name="orgs_chk_low_balance_threshold_range"
        ),
        sa.CheckConstraint("max_concurrent_calls BETWEEN 1 AND 1000000", name="orgs_chk_max_concurrent_calls_range"),
    )

    op.create_table(
        "org_balances",
        sa.Column("org_id", sa.Text, sa.ForeignKey("orgs.org_id", ondelete="RESTRICT"), primary_key=True),
        sa.Column("balance_pence", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("debt_pence", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("entry_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("last_entry_id", sa.BigInteger, nullable=True),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("debt_pence >= 0", name="org_balances_chk_debt_not_negative"),
        sa.CheckConstraint("entry_count >= 0", name="org_balances_chk_entry_count_not_negative"),
    )

    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("org_id", sa.Text, sa.ForeignKey("orgs.org_id", ondelete="RESTRICT"), nullable=False),
        sa.Column("idempotency_key", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("amount_pence", sa.BigInteger, nullable=False),
        sa.Column("debt_delta_pence", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("balance_after_pence", sa.BigInteger, nullable=False),
        sa.Column("debt_after_pence", sa.BigInteger, nullable=False),
        sa.Column("call_id", sa.Text, nullable=True),
        sa.Column("billed_seconds", sa.Integer, nullable=True),
        sa.Column("rate_pence_per_minute", sa.Integer, nullable=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("redis_seq", sa.BigInteger, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("recorded_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("meta", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.UniqueConstraint("idempotency_key", name="ledger_entries_uq_idempotency_key"),
        sa.CheckConstraint(_in("kind", ENTRY_KINDS), name="ledger_entries_chk_kind"),
        sa.CheckConstraint(_in("source", ("redis", "postgres")), name="ledger_entries_chk_source"),
        sa.CheckConstraint("amount_pence <> 0 OR debt_delta_pence <> 0", name="ledger_entries_chk_moves_money"),
        sa.CheckConstraint(
            f"abs(amount_pence) <= {AMOUNT_MAX} AND abs(debt_delta_pence) <= {AMOUNT_MAX}",
            name="ledger_entries_chk_amount_bounded",
        ),
        sa.CheckConstraint("debt_after_pence >= 0", name="ledger_entries_chk_debt_after_not_negative"),
        sa.CheckConstraint(
            "kind NOT IN ('topup', 'refund') OR (amount_pence > 0 AND debt_delta_pence = 0 AND source = 'postgres')",
            name="ledger_entries_chk_credit_positive_postgres_first",
        ),
        sa.CheckConstraint(
            "kind <> 'asset' OR (amount_pence < 0 AND debt_delta_pence = 0)", name="ledger_entries_chk_asset_zero_debt"
        ),
        sa.CheckConstraint(
            "kind NOT IN ('call_charge', 'call_expired') OR (amount_pence <= 0 AND debt_delta_pence >= 0)",
            name="ledger_entries_chk_charge_is_debit",
        ),
        sa.CheckConstraint(
            "kind <> 'debt_repayment' OR (amount_pence < 0 AND debt_delta_pence = amount_pence)",
            name="ledger_entries_chk_repayment_pays_debt",
        ),
        sa.CheckConstraint(
            "(kind LIKE 'call\\_%') = (call_id IS NOT NULL)", name="ledger_entries_chk_call_id_on_call_kinds"
        ),
    )
    op.create_index("ledger_entries_ix_org_id_id", "ledger_entries", ["org_id", sa.text("id DESC")])
    op.create_index(
        "ledger_entries_ix_call_id", "ledger_entries", ["call_id"], postgresql_where=sa.text("call_id IS NOT NULL")
    )
    op.create_index("ledger_entries_ix_org_id_created_at", "ledger_entries", ["org_id", "created_at"])

    op.create_table(
        "call_holds",
        sa.Column("org_id", sa.Text, sa.ForeignKey("orgs.org_id", ondelete="RESTRICT"), nullable=False),
        sa.Column("call_id", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("hold_pence", sa.BigInteger, nullable=False),
        sa.Column("rate_pence_per_minute", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("last_seen_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("max_duration_seconds", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("charged_pence", sa.BigInteger, nullable=True),
        sa.Column("billed_seconds", sa.Integer, nullable=True),
        sa.Column("resolved_at", TS, nullable=True),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("org_id", "call_id", name="call_holds_pk"),
        sa.CheckConstraint(_in("status", HOLD_STATUSES), name="call_holds_chk_status"),
        sa.CheckConstraint("hold_pence >= 0", name="call_holds_chk_hold_not_negative"),
        sa.CheckConstraint("rate_pence_per_minute > 0", name="call_holds_chk_rate_positive"),
        sa.CheckConstraint("charged_pence >= 0", name="call_holds_chk_charged_not_negative"),
        sa.CheckConstraint("(status = 'live') = (resolved_at IS NULL)", name="call_holds_chk_resolved_iff_not_live"),
    )
    op.create_index(
        "call_holds_ix_live_expires_at", "call_holds", ["expires_at"], postgresql_where=sa.text("status = 'live'")
    )
    op.create_index("call_holds_ix_live_org_id", "call_holds", ["org_id"], postgresql_where=sa.text("status = 'live'"))
    op.create_index(
        "call_holds_ix_resolved_at", "call_holds", ["resolved_at"], postgresql_where=sa.text("status <> 'live'")
    )

    # Credits are Postgres-first: a credit's row here is written in the ledger's transaction and
    # deleted once Redis has applied it; the worker re-applies any row left behind.
    op.create_table(
        "pending_credits",
        sa.Column(
            "idempotency_key",
            sa.Text,
            sa.ForeignKey("ledger_entries.idempotency_key", ondelete="RESTRICT"),
            primary_key=True,
        ),
        sa.Column("org_id", sa.Text, sa.ForeignKey("orgs.org_id", ondelete="RESTRICT"), nullable=False),
        sa.Column("amount_pence", sa.BigInteger, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.CheckConstraint("amount_pence > 0", name="pending_credits_chk_amount_positive"),
    )
    op.create_index("pending_credits_ix_created_at", "pending_credits", ["created_at"])

    # Outbox entries the writer could not put in the ledger (the same idempotency key with a
    # different entry: Redis decided twice, e.g. after losing its idempotency records). Kept as
    # evidence, never silently dropped; `reconcile --check` shows the drift they cause.
    op.create_table(
        "ledger_rejects",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("org_id", sa.Text, nullable=False),
        sa.Column("idempotency_key", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("entry", sa.Text, nullable=False),  # JSON as text: it may hold what jsonb refuses
        sa.Column("recorded_at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ledger_rejects_ix_org_id", "ledger_rejects", ["org_id"])

    for statement in read_statements(SQL_DIR / "0001_ledger_triggers.sql"):
        op.execute(statement)


def downgrade() -> None:
    op.drop_table("ledger_rejects")
    op.drop_table("pending_credits")
    op.drop_table("call_holds")
    op.execute("DROP TABLE ledger_entries")
    op.execute(
        "DROP FUNCTION ledger_entries_check_projection, ledger_entries_check_chain, ledger_entries_refuse_change"
    )
    op.drop_table("org_balances")
    op.drop_table("orgs")
