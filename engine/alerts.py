"""Alerts to an org's webhook: low balance, balance exhausted, call ended for lack of credit,
end-call failed.

Decided in Redis with the change that causes them (lua/_lib.lua alerts_after_debit, the kill
switch's scripts), carried by the outbox into `alert_events` exactly once per key, and delivered
from there by the worker: at least once, retried with exponential backoff, a bounded number of
times, then marked failed (a log line at ERROR). The receiver deduplicates by the event's `id`.

Each request is signed like Stripe's: header `Credit-Engine-Signature: t=<unix seconds>,v1=<hex>`
where hex is HMAC-SHA256 over `<t>.<raw body>` with the org's signing secret. The secret is
derived from the deployment's CREDIT_ENGINE_ALERT_SIGNING_KEY and the org id, so nothing secret
is stored per org; an org reads its own from `GET /v1/alerts/signing-secret`.
"""

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass

import httpx

from engine.runtime import Runtime

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Credit-Engine-Signature"
delivery_timeout_s = 5.0
claim_lease_s = 60  # a claimed alert whose worker died is tried again after this
batch_size_max = 50

CLAIM_SQL = """
UPDATE alert_events a SET attempts = a.attempts + 1,
       next_attempt_at = now() + make_interval(secs => $2)
FROM orgs o
WHERE a.id IN (SELECT id FROM alert_events
               WHERE status = 'pending' AND next_attempt_at <= now()
               ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
  AND o.org_id = a.org_id
RETURNING a.id, a.org_id, a.kind, a.payload::text AS payload, a.attempts, o.alert_webhook_url
"""


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


@dataclass
class DeliveryReport:
    delivered: int = 0
    retrying: int = 0
    failed: int = 0
    no_endpoint: int = 0


async def deliver_due(rt: Runtime, http: httpx.AsyncClient) -> DeliveryReport:
    report = DeliveryReport()
    signing_key = rt.settings.alert_signing_key
    if signing_key is None:
        return report  # nothing can be signed: alerts wait in alert_events
    rows = await rt.pg.fetch(CLAIM_SQL, batch_size_max, claim_lease_s)
    for row in rows:
        url = row["alert_webhook_url"]
        if not url:
            await rt.pg.execute("UPDATE alert_events SET status = 'no_endpoint' WHERE id = $1", row["id"])
            report.no_endpoint += 1
            continue
        body = row["payload"].encode()  # the receiver verifies these exact bytes
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(org_signing_secret(signing_key, row["org_id"]), int(time.time()), body),
        }
        error = None
        try:
            response = await http.post(url, content=body, headers=headers, timeout=delivery_timeout_s)
            if not response.is_success:
                error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        if error is None:
            await rt.pg.execute(
                "UPDATE alert_events SET status = 'delivered', delivered_at = now(), last_error = NULL WHERE id = $1",
                row["id"],
            )
            report.delivered += 1
        elif row["attempts"] >= rt.settings.alert_attempts_max:
            await rt.pg.execute("UPDATE alert_events SET status = 'failed', last_error = $2 WHERE id = $1", row["id"], error)
            log.error("alert %s (%s) to org %s failed %d times, last: %s; given up", row["id"], row["kind"],
                      row["org_id"], row["attempts"], error)  # fmt: skip
            report.failed += 1
        else:
            backoff_s = rt.settings.alert_backoff_base_ms / 1000 * 2 ** (row["attempts"] - 1)
            await rt.pg.execute(
                "UPDATE alert_events SET next_attempt_at = now() + make_interval(secs => $2), last_error = $3 WHERE id = $1",
                row["id"], backoff_s, error,
            )  # fmt: skip
            log.warning("alert %s to org %s: %s, retry %d in %.1f s", row["id"], row["org_id"], error, row["attempts"], backoff_s)
            report.retrying += 1
    return report
