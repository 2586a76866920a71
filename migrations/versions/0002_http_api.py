"""HTTP API: org API keys (hashed), registered phone numbers, idempotent HTTP responses; calls'
end time on holds.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.add_column("call_holds", sa.Column("ended_at", TS, nullable=True))

    # Only a SHA-256 of each key is stored; the key itself is shown once, when it is issued.
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.Text, primary_key=True),
        sa.Column("org_id", sa.Text, sa.ForeignKey("orgs.org_id", ondelete="RESTRICT"), nullable=False),
        sa.Column("key_sha256", sa.LargeBinary, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("revoked_at", TS, nullable=True),
        sa.UniqueConstraint("key_sha256", name="api_keys_uq_key_sha256"),
        sa.CheckConstraint("length(key_sha256) = 32", name="api_keys_chk_sha256_length"),
    )
    op.create_index("api_keys_ix_org_id", "api_keys", ["org_id"])

    op.create_table(
        "phone_numbers",
        sa.Column("vapi_phone_number_id", sa.Text, primary_key=True),
        sa.Column("org_id", sa.Text, sa.ForeignKey("orgs.org_id", ondelete="RESTRICT"), nullable=False),
        sa.Column("number", sa.Text, nullable=True),
        sa.Column("assistant_id", sa.Text, nullable=True),
        sa.Column("status", sa.Text, nullable=False, server_default="active"),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("provision_key", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.UniqueConstraint("org_id", "provision_key", name="phone_numbers_uq_org_provision_key"),
        sa.CheckConstraint("length(vapi_phone_number_id) BETWEEN 1 AND 128", name="phone_numbers_chk_id_length"),
    )
    op.create_index("phone_numbers_ix_org_id", "phone_numbers", ["org_id"])

    # The first response to each (org, operation, Idempotency-Key): replays get it back verbatim.
    op.create_table(
        "idempotent_requests",
        sa.Column("org_id", sa.Text, nullable=False),
        sa.Column("operation", sa.Text, nullable=False),
        sa.Column("idempotency_key", sa.Text, nullable=False),
        sa.Column("request_sha256", sa.LargeBinary, nullable=False),
        sa.Column("request_body", postgresql.JSONB, nullable=False),  # to finish a request whose client left
        sa.Column("state", sa.Text, nullable=False, server_default="in_progress"),
        sa.Column("response_status", sa.Integer, nullable=True),
        sa.Column("response_body", postgresql.JSONB, nullable=True),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("completed_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("org_id", "operation", "idempotency_key", name="idempotent_requests_pk"),
        sa.CheckConstraint("state IN ('in_progress', 'done')", name="idempotent_requests_chk_state"),
        sa.CheckConstraint(
            "(state = 'done') = (response_status IS NOT NULL)", name="idempotent_requests_chk_done_has_response"
        ),
    )
    op.create_index(
        "idempotent_requests_ix_in_progress",
        "idempotent_requests",
        ["created_at"],
        postgresql_where=sa.text("state = 'in_progress'"),
    )


def downgrade() -> None:
    op.drop_table("idempotent_requests")
    op.drop_table("phone_numbers")
    op.drop_table("api_keys")
    op.drop_column("call_holds", "ended_at")
