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
        " AND (result IS NULL OR response_status IS NULL)"
        " AND (result IS NULL OR jsonb_typeof(result) = 'object')",
    )


# The answers webapp/answers.py gives these results as of this release, written back for the
# older release, which replays a stored HTTP answer (frozen here, as a migration is).
TO_HTTP = """
UPDATE idempotent_requests SET
  response_status = CASE WHEN result->>'outcome' = 'provider_failed' THEN 502 ELSE 201 END,
  response_body = CASE
    WHEN operation = 'topup' THEN jsonb_build_object(
      'transaction_id', result->'transaction_id', 'balance_pence', result->'balance_pence',
      'available_pence', result->'available_pence', 'applied', result->'applied')
    WHEN result->>'outcome' = 'bought' THEN jsonb_build_object(
      'phone_number', result->'phone_number', 'charged_pence', result->'price_pence',
      'balance_pence', result->'balance_pence')
    ELSE jsonb_build_object('error', jsonb_build_object(
      'code', 'provider_failed',
      'message', 'the telephony provider could not supply a number; the charge was refunded',
      'refunded_pence', result->'price_pence', 'refund_transaction_id', result->'refund_transaction_id'))
  END,
  result = NULL
WHERE result IS NOT NULL AND (operation = 'topup' OR result->>'outcome' IN ('bought', 'provider_failed'))
"""


def downgrade() -> None:
    op.drop_constraint(CHECK, "idempotent_requests", type_="check")
    op.execute(TO_HTTP)
    # Any other kept result (an operation this migration does not know) cannot be replayed by the
    # older release: its claim is forgotten, and a retry runs again, idempotent underneath.
    op.execute("DELETE FROM idempotent_requests WHERE result IS NOT NULL")
    op.create_check_constraint(CHECK, "idempotent_requests", "(state = 'done') = (response_status IS NOT NULL)")
    op.drop_column("idempotent_requests", "result")
