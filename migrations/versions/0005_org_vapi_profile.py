"""An org's Vapi profile: the platform's own server (`forward_url`) and the sentences its callers
hear when a call is refused. Nullable: NULL is the default (CREDIT_ENGINE_FORWARD_URL, today's
sentences), so existing orgs keep what they had.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

URL_LENGTH_MAX = 2000  # engine/limits.py url_length_max
REFUSAL_LENGTH_MAX = 500  # engine/limits.py refusal_text_length_max
REFUSALS = ("refusal_no_credit", "refusal_busy", "refusal_not_set_up", "refusal_try_later")


def upgrade() -> None:
    op.add_column("orgs", sa.Column("forward_url", sa.Text, nullable=True))
    op.create_check_constraint(
        "orgs_chk_forward_url_length", "orgs", f"length(forward_url) BETWEEN 1 AND {URL_LENGTH_MAX}"
    )
    for column in REFUSALS:
        op.add_column("orgs", sa.Column(column, sa.Text, nullable=True))
        # Never empty or blank: Vapi speaks "Unknown Error" for an empty error. (Python also
        # trims it and refuses control characters.)
        op.create_check_constraint(
            f"orgs_chk_{column}_length",
            "orgs",
            f"length({column}) BETWEEN 1 AND {REFUSAL_LENGTH_MAX} AND btrim({column}) <> ''",
        )


def downgrade() -> None:
    for column in reversed(REFUSALS):
        op.drop_constraint(f"orgs_chk_{column}_length", "orgs", type_="check")
        op.drop_column("orgs", column)
    op.drop_constraint("orgs_chk_forward_url_length", "orgs", type_="check")
    op.drop_column("orgs", "forward_url")
