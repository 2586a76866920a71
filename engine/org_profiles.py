"""An org's Vapi profile: what its callers hear when a call is refused, and where its platform's
own server is (`forward_url`). The webhook reads it; the Lua scripts never do, so it is not in Redis.

Read on the assistant-request path, so it costs no Postgres query per request: each process keeps
the profiles it has read for `org_profile_cache_ttl_s`, at most `org_profile_cache_size_max` of
them (the least recently used is forgotten first). A change made through this process
(`engine/orgs.py`: the admin API of this web process) forgets the org's profile at once; a change
made by another process (another web process, the CLI) is seen within `org_profile_cache_ttl_s`.
A read that was under way while a profile was forgotten is not kept: the cache's generation moved,
so a slow read of the old row cannot put back what an update just forgot.

Defaults: each sentence the org has not set is today's sentence below, and `forward_url` is the
org's, else `CREDIT_ENGINE_FORWARD_URL`. A sentence is never empty (Vapi would say "Unknown Error").
"""

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import asyncpg

from credit_engine.engine import limits

if TYPE_CHECKING:
    from credit_engine.engine.runtime import Runtime

log = logging.getLogger(__name__)

SPOKEN_NO_CREDIT = "Sorry, there is not enough credit on this account to take your call. Please top up and try again."
SPOKEN_NOT_SET_UP = "Sorry, this number is not set up to take calls yet."
SPOKEN_BUSY = "Sorry, all of this account's lines are busy right now. Please try again in a few minutes."
SPOKEN_TRY_LATER = "Sorry, we cannot take your call right now. Please try again in a few minutes."


class Refusal(str, Enum):
    """Why an assistant-request is refused; each value is the org setting holding its sentence."""

    no_credit = "refusal_no_credit"
    busy = "refusal_busy"
    not_set_up = "refusal_not_set_up"
    try_later = "refusal_try_later"


REFUSAL_DEFAULTS = {
    Refusal.no_credit: SPOKEN_NO_CREDIT,
    Refusal.busy: SPOKEN_BUSY,
    Refusal.not_set_up: SPOKEN_NOT_SET_UP,
    Refusal.try_later: SPOKEN_TRY_LATER,
}
assert set(REFUSAL_DEFAULTS) == set(Refusal)
assert all(1 <= len(text) <= limits.refusal_text_length_max for text in REFUSAL_DEFAULTS.values())

PROFILE_SQL = """
SELECT forward_url, refusal_no_credit, refusal_busy, refusal_not_set_up, refusal_try_later
FROM orgs WHERE org_id = $1
"""
# What a profile read may fail with when Postgres is away or slow (asyncpg's own, a refused or
# dropped socket, the read's deadline).
READ_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


@dataclass(frozen=True)
class VapiProfile:
    forward_url: str | None  # the org's, else CREDIT_ENGINE_FORWARD_URL; None: no platform server to forward to
    refusal_no_credit: str
    refusal_busy: str
    refusal_not_set_up: str
    refusal_try_later: str

    def spoken(self, refusal: Refusal) -> str:
        text = getattr(self, refusal.value)
        assert isinstance(text, str)
        assert text.strip()  # never empty: Vapi speaks "Unknown Error" for an empty error
        return text


@dataclass(frozen=True)
class StoredProfile:
    """The org's own values as the orgs table holds them (None: not set, the default applies)."""

    forward_url: str | None = None
    refusals: tuple[str | None, ...] = (None,) * len(Refusal)  # in Refusal's order

    @classmethod
    def from_row(cls, row: asyncpg.Record | None) -> "StoredProfile":
        if row is None:  # no such org: the defaults
            return cls()
        return cls(row["forward_url"], tuple(row[refusal.value] for refusal in Refusal))


def profile_with_defaults(stored: StoredProfile, forward_url_default: str | None) -> VapiProfile:
    assert len(stored.refusals) == len(Refusal)
    texts = {
        refusal.value: own if own is not None else REFUSAL_DEFAULTS[refusal]
        for refusal, own in zip(Refusal, stored.refusals, strict=True)
    }
    return VapiProfile(forward_url=stored.forward_url or forward_url_default, **texts)


class ProfileCache:
    """One process's profiles: bounded in size and in age (see the module docstring)."""

    def __init__(
        self,
        *,
        ttl_s: float = limits.org_profile_cache_ttl_s,
        size_max: int = limits.org_profile_cache_size_max,
        now_s: Callable[[], float] = time.monotonic,
    ) -> None:
        assert ttl_s > 0
        assert size_max >= 1
        self.ttl_s = ttl_s
        self.size_max = size_max
        self.now_s = now_s
        self.generation = 0  # moves on every forget: a read begun before it is not kept
        self._entries: OrderedDict[str, tuple[float, StoredProfile]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, org_id: str) -> StoredProfile | None:
        entry = self._entries.get(org_id)
        if entry is None:
            return None
        expires_s, stored = entry
        if self.now_s() >= expires_s:
            del self._entries[org_id]
            return None
        self._entries.move_to_end(org_id)
        return stored

    def put(self, org_id: str, stored: StoredProfile, generation: int) -> None:
        """Keep a profile read when the cache was at `generation`, unless something was forgotten since."""
        if generation != self.generation:
            return
        self._entries[org_id] = (self.now_s() + self.ttl_s, stored)
        self._entries.move_to_end(org_id)
        while len(self._entries) > self.size_max:
            self._entries.popitem(last=False)
        assert len(self._entries) <= self.size_max

    def forget(self, org_id: str) -> None:
        self._entries.pop(org_id, None)
        self.generation += 1


async def vapi_profile(rt: "Runtime", org_id: str) -> VapiProfile:
    """The org's profile, defaults applied; from this process's cache when it has it, else one
    Postgres query (bounded by `org_profile_read_s_max`). An org that does not exist gets the
    defaults. Raises one of READ_ERRORS when Postgres cannot answer."""
    cache = rt.profiles
    stored = cache.get(org_id)
    if stored is None:
        generation = cache.generation
        async with asyncio.timeout(limits.org_profile_read_s_max):
            row = await rt.pg.fetchrow(PROFILE_SQL, org_id)
        stored = StoredProfile.from_row(row)
        cache.put(org_id, stored, generation)
    return profile_with_defaults(stored, rt.settings.forward_url)


async def refusal_text(rt: "Runtime", org_id: str | None, refusal: Refusal) -> str:
    """What a caller hears when the call is refused: the org's sentence, or the default one when
    no org is known (a number not registered here) or its profile cannot be read now (a refusal
    is never lost, nor held up past `org_profile_read_s_max`, for want of the org's wording)."""
    if org_id is None:
        return REFUSAL_DEFAULTS[refusal]
    try:
        profile = await vapi_profile(rt, org_id)
    except READ_ERRORS as error:
        log.warning(
            "org %s's refusal sentences cannot be read (%s); the default is spoken", org_id, type(error).__name__
        )
        return REFUSAL_DEFAULTS[refusal]
    return profile.spoken(refusal)
