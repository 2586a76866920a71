"""Org API keys: issued once, stored as SHA-256 only, revocable.

Keys carry 256 bits of randomness, so a plain SHA-256 (no slow hash) is enough: nobody can
guess a preimage, and the lookup by hash is an index probe. The key itself exists only in the
response that issued it.
"""

import hashlib
import secrets

from credit_engine.engine import validate
from credit_engine.engine.db import bounded
from credit_engine.engine.errors import OrgNotFound
from credit_engine.engine.runtime import Runtime

KEY_PREFIX = "ce_live_"


def key_sha256(api_key: str) -> bytes:
    return hashlib.sha256(api_key.encode()).digest()


async def issue_api_key(rt: Runtime, org_id: str) -> tuple[str, str]:
    """Returns (key_id, api_key). The api_key is not stored anywhere."""
    validate.org_id(org_id)
    key_id = f"key_{secrets.token_hex(8)}"
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    inserted = await rt.pg.fetchval(
        """
        INSERT INTO api_keys (key_id, org_id, key_sha256)
        SELECT $1, org_id, $3 FROM orgs WHERE org_id = $2
        RETURNING key_id
        """,
        key_id,
        org_id,
        key_sha256(api_key),
    )
    if inserted is None:
        raise OrgNotFound(org_id)
    return key_id, api_key


async def org_for_api_key(rt: Runtime, api_key: str) -> str | None:
    if not api_key.startswith(KEY_PREFIX) or len(api_key) > 128:
        return None
    async with bounded():  # a Postgres that never answers: a quick 503 (TimeoutError), not a 20 s hang
        org_id: str | None = await rt.pg.fetchval(
            "SELECT org_id FROM api_keys WHERE key_sha256 = $1 AND revoked_at IS NULL", key_sha256(api_key)
        )
    return org_id


async def revoke_api_key(rt: Runtime, org_id: str, key_id: str) -> bool:
    revoked = await rt.pg.fetchval(
        """
        UPDATE api_keys SET revoked_at = now()
        WHERE org_id = $1 AND key_id = $2 AND revoked_at IS NULL
        RETURNING key_id
        """,
        org_id,
        key_id,
    )
    return revoked is not None
