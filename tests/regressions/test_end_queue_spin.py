"""Found by an adversarial review: an end-queue call whose give-up cannot be written (Postgres away) keeps its
due time, so the kill switch's next round comes 10 ms later (0 s with 100 of them) and tries the
give-up again, a logged traceback each time, for as long as Postgres is away."""

import httpx
import orjson
import pytest

from credit_engine.engine import end_queue
from credit_engine.engine.clock import ManualClock
from credit_engine.engine.end_queue import end_unheld_call
from credit_engine.engine.killswitch import KillSwitch
from credit_engine.engine.killswitch_push import ControlUrls
from credit_engine.engine.runtime import Runtime
from tests.fake_vapi import FakeVapi
from tests.helpers import new_org


@pytest.mark.parametrize("calls", [1, 100])
async def test_a_give_up_postgres_cannot_take_is_retried_in_a_tight_loop(
    qrt: Runtime,
    clock: ManualClock,
    fake: FakeVapi,
    http: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    calls: int,
) -> None:
    org_id = await new_org(qrt, 100)
    for i in range(calls):
        call_id = f"gone-{i}"
        assert await end_unheld_call(
            qrt,
            call_id,
            fake.control_url(call_id),
            org_id=org_id,
            reason="resolved_before",
        )
        key = qrt.keys.end_queue_entry(call_id)
        entry = orjson.loads(await qrt.redis.get(key))
        entry["attempts"] = qrt.settings.kill_attempts_max  # its attempts are used up: the next claim gives up
        await qrt.redis.set(key, orjson.dumps(entry), keepttl=True)

    tries = 0

    async def postgres_away(*args: object) -> None:
        nonlocal tries
        tries += 1
        raise ConnectionRefusedError("postgres away")

    monkeypatch.setattr(end_queue, "alert_end_call_failed", postgres_away)
    kill_switch = KillSwitch(qrt, http, ControlUrls(qrt))
    pauses = []
    for _ in range(5):  # five rounds; the clock does not move
        pauses.append(await kill_switch.round())
    # Each give-up is tried once, then deferred by the backoff: the rounds after the first wait
    # their poll interval (the first may come at once when it found a full batch due).
    assert tries == calls, "the loop spins while Postgres is away"
    assert min(pauses[1:]) >= qrt.settings.kill_poll_interval_ms / 1000, pauses
