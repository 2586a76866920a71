"""An org's alerts: what was sent to its webhook, and the secret to verify the signatures."""

from starlette.requests import Request
from starlette.responses import Response

from credit_engine.engine.alerts import SIGNATURE_HEADER, last_error_public, org_signing_secret, recent_alerts
from credit_engine.webapp.responses import ApiError, json_response
from credit_engine.webapp.wallet import org_context

alerts_page_max = 100


async def list_alerts(request: Request) -> Response:
    ctx, org_id = await org_context(request)
    rows = await recent_alerts(ctx.rt, org_id, alerts_page_max)
    return json_response(
        {
            "alerts": [
                {
                    "id": row["idempotency_key"],
                    "type": row["kind"],
                    "call_id": row["call_id"],
                    "status": row["status"],
                    "attempts": row["attempts"],
                    "last_error": last_error_public(row["last_error"]),
                    "created_at": row["created_at"].isoformat(),
                    "delivered_at": row["delivered_at"].isoformat() if row["delivered_at"] else None,
                }
                for row in rows
            ]
        }
    )


async def signing_secret(request: Request) -> Response:
    ctx, org_id = await org_context(request)
    key = ctx.settings.alert_signing_key
    if key is None:
        raise ApiError(
            404, "alerts_disabled", "this deployment has no CREDIT_ENGINE_ALERT_SIGNING_KEY; alerts are not sent"
        )
    return json_response(
        {
            "signing_secret": org_signing_secret(key, org_id),
            "header": SIGNATURE_HEADER,
            "scheme": "t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.<raw body>'>",
        }
    )
