"""engine/org_profiles.py: the webhook's per-process view of an org's profile. Cached (no Postgres
query per request), forgotten in this process by an update, bounded in age and in size, never put
back by a read that raced an update, and never in the way of a refusal when Postgres is away."""

import asyncio
import time
from dataclasses import replace
from typing import Any

import pytest

from credit_engine.engine import limits
from credit_engine.engine.org_profiles import (
    REFUSAL_DEFAULTS,
    ProfileCache,
    Refusal,
    StoredProfile,
    refusal_text,
    vapi_profile,
)
from credit_engine.engine.orgs import update_org
from credit_engine.engine.runtime import Runtime
from tests.helpers import new_org


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1_000.0

    def __call__(self) -> float:
        return self.now_s


async def test_a_profile_is_read_once_and_an_update_in_this_process_is_seen_at_once(rt: Runtime) -> None:
    org = await new_org(rt, refusal_busy="Busy at Acme.")
    profile = await vapi_profile(rt, org)
    assert (profile.spoken(Refusal.busy), profile.spoken(Refusal.no_credit)) == (
        "Busy at Acme.",
        REFUSAL_DEFAULTS[Refusal.no_credit],
    )
    assert profile.forward_url is None
    # Written behind the engine's back: the cached profile is still served (no query per request).
    await rt.pg.execute("UPDATE orgs SET refusal_busy = 'Changed in SQL.' WHERE org_id = $1", org)
    assert (await vapi_profile(rt, org)).refusal_busy == "Busy at Acme."
    # Through the engine: this process forgets its copy at once.
    await update_org(rt, org, {"refusal_busy": "Busy, updated.", "forward_url": "https://93.184.216.34/vapi"})
    profile = await vapi_profile(rt, org)
    assert (profile.refusal_busy, profile.forward_url) == ("Busy, updated.", "https://93.184.216.34/vapi")
    await update_org(rt, org, {"refusal_busy": None})
    assert (await vapi_profile(rt, org)).refusal_busy == REFUSAL_DEFAULTS[Refusal.busy]


async def test_another_processs_change_is_seen_once_the_ttl_has_passed(rt: Runtime) -> None:
    clock = FakeClock()
    rt.profiles = ProfileCache(now_s=clock)
    org = await new_org(rt, refusal_try_later="Later, please.")
    assert await refusal_text(rt, org, Refusal.try_later) == "Later, please."
    await rt.pg.execute("UPDATE orgs SET refusal_try_later = 'From the CLI.' WHERE org_id = $1", org)
    clock.now_s += limits.org_profile_cache_ttl_s - 0.001
    assert await refusal_text(rt, org, Refusal.try_later) == "Later, please."
    clock.now_s += 0.001
    assert await refusal_text(rt, org, Refusal.try_later) == "From the CLI."


async def test_the_global_forward_url_is_the_default_and_an_unknown_org_gets_the_defaults(rt: Runtime) -> None:
    platform = replace(rt, settings=replace(rt.settings, forward_url="https://platform.example.com/vapi"))
    own = await new_org(rt, forward_url="https://93.184.216.34/own")
    plain = await new_org(rt)
    assert (await vapi_profile(platform, own)).forward_url == "https://93.184.216.34/own"
    assert (await vapi_profile(platform, plain)).forward_url == "https://platform.example.com/vapi"
    nobody = await vapi_profile(platform, "no-such-org")
    assert nobody.forward_url == "https://platform.example.com/vapi"
    assert [nobody.spoken(refusal) for refusal in Refusal] == [REFUSAL_DEFAULTS[refusal] for refusal in Refusal]
    assert await refusal_text(rt, None, Refusal.not_set_up) == REFUSAL_DEFAULTS[Refusal.not_set_up]


def test_the_cache_keeps_at_most_its_size_forgetting_the_least_recently_used() -> None:
    cache = ProfileCache(size_max=2, now_s=FakeClock())
    for org in ("a", "b"):
        cache.put(org, StoredProfile(forward_url=f"https://{org}.test/"), cache.generation)
    assert cache.get("a") is not None  # "b" is now the least recently used
    cache.put("c", StoredProfile(), cache.generation)
    assert (len(cache), cache.get("b"), cache.get("a") is not None, cache.get("c") is not None) == (2, None, True, True)
    assert limits.org_profile_cache_size_max == ProfileCache().size_max


def test_a_read_that_raced_an_update_is_not_kept() -> None:
    cache = ProfileCache(now_s=FakeClock())
    generation = cache.generation  # a read begins (the old row)
    cache.forget("acme")  # an update commits and forgets
    cache.put("acme", StoredProfile(refusals=("old", None, None, None)), generation)
    assert cache.get("acme") is None  # the next read sees the new row


async def test_a_refusal_is_spoken_in_the_default_words_when_postgres_is_away_or_slow(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    org = await new_org(rt, refusal_no_credit="Acme: no credit.")

    class Away:
        async def fetchrow(self, *args: Any) -> None:
            raise ConnectionRefusedError("postgres is down")

    class Hung:
        async def fetchrow(self, *args: Any) -> None:
            await asyncio.sleep(60)

    monkeypatch.setattr(limits, "org_profile_read_s_max", 0.2)
    for pool in (Away(), Hung()):
        cut_off = replace(rt, pg=pool, profiles=ProfileCache())
        started = time.monotonic()
        assert await refusal_text(cut_off, org, Refusal.no_credit) == REFUSAL_DEFAULTS[Refusal.no_credit]
        assert time.monotonic() - started < 1
        assert len(cut_off.profiles) == 0  # a failure is not cached: the org's words come back with Postgres
    assert await refusal_text(rt, org, Refusal.no_credit) == "Acme: no credit."
