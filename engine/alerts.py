"""Alerts to an org's webhook: low balance, balance exhausted, call ended for lack of credit,
end-call failed.

Decided in Redis with the change that causes them (lua/_alerts.lua alerts_after_debit, the kill
switch's scripts), carried by the outbox into `alert_events` exactly once per key, and delivered
from there by the worker: at least once, retried with exponential backoff, a bounded number of
times, then marked failed (a log line at ERROR). The receiver deduplicates by the event's `id`.

Each request is signed like Stripe's: header `Credit-Engine-Signature: t=<unix seconds>,v1=<hex>`
where hex is HMAC-SHA256 over `<t>.<raw body>` with the org's signing secret. The secret is
derived from the deployment's CREDIT_ENGINE_ALERT_SIGNING_KEY and the org id, so nothing secret
is stored per org; an org reads its own from `GET /api/alerts/signing-secret`.

Delivery is bounded so that one org's endpoint cannot hold up another's, nor the worker that also
drains the ledger and runs the kill switch. A round claims at most `deliveries_in_flight_max`
alerts, at most `deliveries_per_org_in_flight_max` of any one org (orgs waiting longest first), and
sends them all at once, each within `delivery_total_s_max` from resolving the name to the response
headers, reading at most `response_bytes_max` of the body, following no redirect, and only to an
address engine/outbound.py allows (refused: marked failed at once, never retried). So a round ends
within about one deadline, and an org's alert waits behind no other org's endpoint. A claim is a
lease (`claim_lease_s`, well past a round): an alert whose worker died mid-round is sent again
after it. What the org reads as `last_error` is a coarse category (`last_error_public`).
"""

import asyncio
import hashlib
import hmac
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass

import asyncpg

from credit_engine.engine.outbound import Failure, Outbound
from credit_engine.engine.runtime import Runtime

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Credit-Engine-Signature"
delivery_total_s_max = 5.0  # one delivery, from resolving the name to the response's first bytes
response_bytes_max = 1024  # of a response's body; we need its status only
deliveries_in_flight_max = 32  # per round, so per worker: every claimed alert is sent at once
deliveries_per_org_in_flight_max = 4  # per round: an org's endpoint is never sent more at once
claim_lease_s = 60  # a claimed alert whose worker died is tried again after this
assert deliveries_per_org_in_flight_max <= deliveries_in_flight_max
assert claim_lease_s > 4 * delivery_total_s_max  # a round, with its Postgres writes, ends well inside its lease

# Orgs whose alerts waited longest first; of each, its oldest due alerts, at most $2; at most $1 in
# all. Rows another worker is claiming are skipped, not waited for.
CLAIM_SQL = """
WITH due_orgs AS (
    SELECT org_id, min(next_attempt_at) AS due_at FROM alert_events
    WHERE status = 'pending' AND next_attempt_at <= now()
    GROUP BY org_id ORDER BY due_at LIMIT $1
), picked AS (
    SELECT e.id FROM due_orgs d CROSS JOIN LATERAL (
        SELECT id, next_attempt_at FROM alert_events
        WHERE org_id = d.org_id AND status = 'pending' AND next_attempt_at <= now()
        ORDER BY next_attempt_at, id LIMIT $2 FOR UPDATE SKIP LOCKED
    ) e
    ORDER BY d.due_at, e.next_attempt_at, e.id LIMIT $1
)
UPDATE alert_events a SET attempts = a.attempts + 1,
       next_attempt_at = now() + make_interval(secs => $3)
FROM orgs o
WHERE a.id IN (SELECT id FROM picked) AND o.org_id = a.org_id
RETURNING a.id, a.org_id, a.kind, a.payload::text AS payload, a.attempts, o.alert_webhook_url
"""
HTTP_STATUS_ERROR = re.compile(r"HTTP [1-5][0-9][0-9]")


def org_signing_secret(signing_key: str, org_id: str) -> str:
    return hmac.new(signing_key.encode(), f"alert-signing:{org_id}".encode(), hashlib.sha256).hexdigest()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, tolerance_s: int = 300, now_s: float | None = None) -> bool:
    """What a receiver does (and what the tests do): recompute, compare in constant time."""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((now_s if now_s is not None else time.time()) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), f"t={timestamp},v1={parts.get('v1', '')}")


def last_error_public(last_error: str | None) -> str | None:
    """`last_error` as the org may read it: one of the coarse categories or an HTTP status. Rows
    written before the categories (an exception's class name) read as `no response`."""
    if last_error is None or last_error in {f.value for f in Failure} or HTTP_STATUS_ERROR.fullmatch(last_error):
        return last_error
    return Failure.no_response.value


@dataclass
class DeliveryReport:
    delivered: int = 0
    retrying: int = 0
    failed: int = 0
    refused: int = 0  # also counted in failed
    no_endpoint: int = 0


def outbound_for_alerts(allow_private: bool) -> Outbound:
    return Outbound(allow_private=allow_private, connections_max=deliveries_in_flight_max)


async def deliver_due(rt: Runtime, outbound: Outbound, *, total_s_max: float = delivery_total_s_max) -> DeliveryReport:
    """One round: claim the due alerts (bounded per org and in all) and send them all at once."""
    assert 0 < total_s_max <= delivery_total_s_max  # the claim lease is sized for the longest
    signing_key = rt.settings.alert_signing_key
    if signing_key is None:
        return DeliveryReport()  # nothing can be signed: alerts wait in alert_events
    rows = await rt.pg.fetch(CLAIM_SQL, deliveries_in_flight_max, deliveries_per_org_in_flight_max, claim_lease_s)
    assert len(rows) <= deliveries_in_flight_max
    assert max(Counter(row["org_id"] for row in rows).values(), default=0) <= deliveries_per_org_in_flight_max
    results = await asyncio.gather(
        *(deliver_one(rt, outbound, signing_key, row, total_s_max) for row in rows), return_exceptions=True
    )
    for row, result in zip(rows, results, strict=True):
        if isinstance(result, BaseException):
            # Its outcome was not written (Postgres away): the claim's lease runs out and it is sent again.
            org_id, error = row["org_id"], type(result).__name__
            log.error("alert %s to org %s: outcome not saved (%s), resent after the lease", row["id"], org_id, error)
    counts = Counter(result for result in results if isinstance(result, str))
    return DeliveryReport(
        delivered=counts["delivered"],
        retrying=counts["retrying"],
        failed=counts["failed"] + counts["refused"],
        refused=counts["refused"],
        no_endpoint=counts["no_endpoint"],
    )


async def deliver_one(
    rt: Runtime, outbound: Outbound, signing_key: str, row: asyncpg.Record, total_s_max: float
) -> str:
    """Send one claimed alert and write what happened; the DeliveryReport field to count it in."""
    url = row["alert_webhook_url"]
    if not url:
        await rt.pg.execute("UPDATE alert_events SET status = 'no_endpoint' WHERE id = $1", row["id"])
        return "no_endpoint"
    body = row["payload"].encode()  # the receiver verifies these exact bytes
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(org_signing_secret(signing_key, row["org_id"]), int(time.time()), body),
    }
    answer = await outbound.post(url, body, headers, total_s_max=total_s_max, response_bytes_max=response_bytes_max)
    if answer.status is not None and 200 <= answer.status < 300:
        await rt.pg.execute(
            "UPDATE alert_events SET status = 'delivered', delivered_at = now(), last_error = NULL WHERE id = $1",
            row["id"],
        )
        return "delivered"
    error = answer.failure.value if answer.failure is not None else f"HTTP {answer.status}"
    assert last_error_public(error) == error
    if answer.failure == Failure.refused or row["attempts"] >= rt.settings.alert_attempts_max:
        await rt.pg.execute(
            "UPDATE alert_events SET status = 'failed', last_error = $2 WHERE id = $1", row["id"], error
        )
        log.error(
            "alert %s (%s) to org %s failed after %d attempts, last: %s; given up",
            row["id"],
            row["kind"],
            row["org_id"],
            row["attempts"],
            answer.detail,
        )
        return "refused" if answer.failure == Failure.refused else "failed"
    backoff_s = rt.settings.alert_backoff_base_ms / 1000 * 2 ** (row["attempts"] - 1)
    await rt.pg.execute(
        "UPDATE alert_events SET next_attempt_at = now() + make_interval(secs => $2), last_error = $3 WHERE id = $1",
        row["id"],
        backoff_s,
        error,
    )
    log.warning(
        "alert %s to org %s: %s, retry %d in %.1f s",
        row["id"],
        row["org_id"],
        answer.detail,
        row["attempts"],
        backoff_s,
    )
    return "retrying"


async def recent_alerts(rt: Runtime, org_id: str, limit: int) -> list[asyncpg.Record]:
    """The org's alerts, newest first, at most `limit`: what was sent to its webhook (or is still to
    be), for the org's own alerts page."""
    rows: list[asyncpg.Record] = await rt.pg.fetch(
        """
        SELECT idempotency_key, kind, call_id, payload::text AS payload, status, attempts, last_error,
               created_at, delivered_at
        FROM alert_events WHERE org_id = $1 ORDER BY id DESC LIMIT $2
        """,
        org_id,
        limit,
    )
    return rows
