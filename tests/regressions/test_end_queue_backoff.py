"""Found by an adversarial review (low): claim_unheld_call takes any call it is given without checking that it is
still due. A worker whose listing is a moment old claims a call right after another worker's failed
attempt released it: the second attempt goes out at once, not after the backoff, and the attempts
(and so the give-up) are used up early."""

import httpx

from credit_engine.engine.clock import ManualClock
from credit_engine.engine.end_queue import claim_unheld_call, due_unheld_calls, end_unheld_call
from credit_engine.engine.killswitch import run_round
from credit_engine.engine.killswitch_push import ControlUrls
from credit_engine.engine.runtime import Runtime
from tests.fake_vapi import FakeVapi


async def test_a_stale_listing_skips_the_backoff(
    qrt: Runtime, clock: ManualClock, fake: FakeVapi, http: httpx.AsyncClient
) -> None:
    fake.always["/busy/control"] = 503
    assert await end_unheld_call(qrt, "busy", fake.control_url("busy"), org_id=None, reason="unattributed")
    now_ms = clock.value_ms
    listed_by_b = await due_unheld_calls(qrt, now_ms, 10)  # worker B lists the due calls...
    report_a = await run_round(qrt, http, ControlUrls(qrt))  # ...worker A claims, pushes, fails, releases
    assert report_a.failed_attempts == 1
    claims_b = [await claim_unheld_call(qrt, call_id, now_ms) for call_id in listed_by_b]  # B goes on
    assert claims_b == [None], "a second attempt at once: the backoff is skipped"
