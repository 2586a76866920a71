"""Which org admitted a call, and where to end it: written when a call is admitted.

- The index (one small Redis hash per call id, `<prefix>:call:<call_id>`, kept two days, with an
  in-process cache in front): the org that admitted the call first. Only an org that holds the
  call writes it (an assistant-request, the reserve API, a first sight at status-update on the
  org's own number), and the first claim stays, so a request naming only the call (the status
  check) finds the org that admitted it, never one that merely named it.
- The control URL (Vapi's `call.monitor.controlUrl`), kept in the admitting org's own hash
  (`<prefix>:{org:<org_id>}:control`, in the org's slot), so the kill switch reads it per org and
  another org can never redirect or hide it.
"""

import logging
from collections import OrderedDict

from credit_engine.engine.replies import asyncio_reply
from credit_engine.engine.runtime import Runtime

log = logging.getLogger(__name__)

call_ttl_s = 2 * 24 * 60 * 60
cache_size_max = 100_000


class CallIndex:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.cache: OrderedDict[str, str] = OrderedDict()

    def key(self, call_id: str) -> str:
        return self.rt.keys.call_index(call_id)

    async def remember(
        self, call_id: str, org_id: str, control_url: str | None = None, forward_url: str | None = None
    ) -> bool:
        """Record that the org admitted the call (call this only when it holds the call); the first
        claim stays. With forward_url: where the platform's own answer said the call's messages go
        (engine/forwarding.py). Returns False if another org admitted the call id first."""
        key = self.key(call_id)
        async with self.rt.redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(key, "org_id", org_id)
            pipe.hget(key, "org_id")
            pipe.expire(key, call_ttl_s)
            _, owner, _ = await pipe.execute()
        if forward_url and owner == org_id:
            await asyncio_reply(self.rt.redis.hset(key, "forward_url", forward_url))
        if control_url:
            await self.keep_control_url(org_id, call_id, control_url)
        if owner != org_id:
            log.warning(
                "call %s was admitted by another org first; org %s keeps its own hold but not the index",
                call_id,
                org_id,
            )
            return False
        self._cache(call_id, org_id)
        return True

    async def keep_control_url(self, org_id: str, call_id: str, control_url: str) -> None:
        """Where the kill switch ends the org's call. Dropped by the kill switch's visit once the
        call holds nothing; the whole hash expires two days after its last write, so an org that
        is never visited again keeps none for long."""
        key = self.rt.keys.org(org_id).control
        async with self.rt.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, call_id, control_url)
            pipe.expire(key, call_ttl_s)
            await pipe.execute()

    async def forget_control_url(self, org_id: str, call_id: str) -> None:
        await asyncio_reply(self.rt.redis.hdel(self.rt.keys.org(org_id).control, call_id))

    async def forward_url_of(self, call_id: str) -> str | None:
        """Where the platform's own answer to the call's assistant-request said its messages go."""
        url: str | None = await asyncio_reply(self.rt.redis.hget(self.key(call_id), "forward_url"))
        return url

    async def org_of(self, call_id: str) -> str | None:
        org_id = self.cache.get(call_id)
        if org_id is not None:
            self.cache.move_to_end(call_id)
            return org_id
        org_id = await asyncio_reply(self.rt.redis.hget(self.key(call_id), "org_id"))
        if org_id is not None:
            self._cache(call_id, org_id)
        return org_id

    def _cache(self, call_id: str, org_id: str) -> None:
        self.cache[call_id] = org_id
        self.cache.move_to_end(call_id)
        while len(self.cache) > cache_size_max:
            self.cache.popitem(last=False)
