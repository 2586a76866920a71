"""Which org a call belongs to, for requests that name only the call (the status check).

Written when a call is reserved or first seen: a per-call Redis hash (org, control URL) that
expires two days later, and a small in-process cache in front of it, so repeated status checks
of one call cost one script call and nothing else. The first org to claim a call id keeps it:
another org reserving the same id (through the outbound reserve API) holds its own money, but
cannot take over the call's status checks.
"""

import logging

from collections import OrderedDict

from engine.runtime import Runtime

log = logging.getLogger(__name__)

call_ttl_s = 2 * 24 * 60 * 60
cache_size_max = 100_000


class CallIndex:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.cache: OrderedDict[str, str] = OrderedDict()

    def key(self, call_id: str) -> str:
        return self.rt.keys.call_index(call_id)

    async def remember(self, call_id: str, org_id: str, control_url: str | None = None) -> bool:
        """Claim the call for the org (first claim wins). False if another org has it."""
        key = self.key(call_id)
        async with self.rt.redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(key, "org_id", org_id)
            pipe.hget(key, "org_id")
            pipe.expire(key, call_ttl_s)
            _, owner, _ = await pipe.execute()
        if owner != org_id:
            log.warning("call %s is claimed by another org; org %s keeps its own hold but not the call's checks", call_id, org_id)
            return False
        self._cache(call_id, org_id)
        if control_url:
            await self.rt.redis.hset(key, "control_url", control_url)
        return True

    async def org_of(self, call_id: str) -> str | None:
        org_id = self.cache.get(call_id)
        if org_id is not None:
            self.cache.move_to_end(call_id)
            return org_id
        org_id = await self.rt.redis.hget(self.key(call_id), "org_id")
        if org_id is not None:
            self._cache(call_id, org_id)
        return org_id

    def _cache(self, call_id: str, org_id: str) -> None:
        self.cache[call_id] = org_id
        self.cache.move_to_end(call_id)
        while len(self.cache) > cache_size_max:
            self.cache.popitem(last=False)
