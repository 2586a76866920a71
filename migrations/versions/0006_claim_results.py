"""Claims keep the engine's result, not an HTTP answer: the engine returns outcomes and the web app
maps them to HTTP in one table (webapp/answers.py), on the first answer and on every replay alike.

`result` holds the operation's outcome record (engine/idempotent_requests.py). Claims finished by
releases before this one keep their `response_status`/`response_body` and are replayed verbatim.
A finished claim has exactly one of the two.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

CHECK = "idempotent_requests_chk_done_has_response"


def upgrade() -> None:
    op.add_column("idempotent_requests", sa.Column("result", postgresql.JSONB, nullable=True))
    op.drop_constraint(CHECK, "idempotent_requests", type_="check")
    op.create_check_constraint(
        CHECK,
        "idempotent_requests",
        "(state = 'done') = ((result IS NOT NULL) <> (response_status IS NOT NULL))"
        " AND (result IS NULL OR response_status IS NULL)",
    )


def downgrade() -> None:
    op.drop_constraint(CHECK, "idempotent_requests", type_="check")
    op.execute("DELETE FROM idempotent_requests WHERE result IS NOT NULL")  # the older release cannot replay them
    op.create_check_constraint(CHECK, "idempotent_requests", "(state = 'done') = (response_status IS NOT NULL)")
    op.drop_column("idempotent_requests", "result")
