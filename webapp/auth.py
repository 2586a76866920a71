"""Who is calling: the admin, an org (by API key), or Vapi (shared secret, bearer, or HMAC).

Every secret is compared in constant time (hmac.compare_digest), and none is ever logged.
"""

import hashlib
import hmac
import math
import time

from starlette.requests import Request

from credit_engine.engine.api_keys import org_for_api_key
from credit_engine.engine.config import Settings
from credit_engine.engine.runtime import Runtime
from credit_engine.webapp.responses import ApiError

HMAC_SIGNATURE_HEADER = "x-signature"
HMAC_TIMESTAMP_HEADER = "x-timestamp"


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return token.strip()


def same_secret(given: str | None, expected: str | None) -> bool:
    if given is None or expected is None:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def require_admin(request: Request, settings: Settings) -> None:
    if settings.admin_token is None:
        raise ApiError(401, "unauthorized", "the admin API is disabled: CREDIT_ENGINE_ADMIN_TOKEN is not set")
    if not same_secret(bearer_token(request), settings.admin_token):
        raise ApiError(401, "unauthorized", "a valid admin token is required (Authorization: Bearer ...)")


async def require_org(request: Request, rt: Runtime) -> str:
    token = bearer_token(request)
    org_id = await org_for_api_key(rt, token) if token else None
    if org_id is None:
        raise ApiError(401, "unauthorized", "a valid org API key is required (Authorization: Bearer ...)")
    return org_id


def hmac_valid(settings: Settings, signature: str, timestamp: str, raw_body: bytes, now_s: float) -> bool:
    secret = settings.hmac_secret
    if secret is None:
        return False
    try:
        stamp = float(timestamp)
    except ValueError:
        return False
    if not math.isfinite(stamp):
        return False
    if stamp > 1e11:  # milliseconds: Vapi does not say which unit it sends
        stamp /= 1000
    if abs(now_s - stamp) > settings.vapi_hmac_tolerance_s:
        return False
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + raw_body, hashlib.sha256).hexdigest()
    given = signature.strip().removeprefix("sha256=")
    return hmac.compare_digest(given.encode(), expected.encode())


def vapi_authenticated(request: Request, settings: Settings, raw_body: bytes) -> bool:
    """X-Vapi-Secret, or Authorization: Bearer with the same secret, or the HMAC credential."""
    if same_secret(request.headers.get("x-vapi-secret"), settings.vapi_webhook_secret):
        return True
    if same_secret(bearer_token(request), settings.vapi_webhook_secret):
        return True
    signature = request.headers.get(HMAC_SIGNATURE_HEADER)
    timestamp = request.headers.get(HMAC_TIMESTAMP_HEADER)
    if signature is not None and timestamp is not None:
        return hmac_valid(settings, signature, timestamp, raw_body, time.time())
    return False
