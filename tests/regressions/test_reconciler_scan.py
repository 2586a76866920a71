"""Found by an adversarial review: the call-resolution records are read by HSCAN after the atomic read, and the
outbox again after the scan. A call admitted and resolved in between (a refused assistant-request
released, a call that never started) is in the second outbox read as a resolution, is not among
the live holds of the first read, and the scan did not see its record: `reconcile --check` calls
a healthy org drifted ("redis has no record inside its idempotency window")."""

from collections.abc import AsyncIterator
from typing import Any

import pytest

from credit_engine.engine.holds import release_call, reserve_call
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.reconciler import check
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from tests.helpers import new_org


async def test_a_call_resolved_just_after_the_scan_is_reported_as_drift(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    org_id = await new_org(rt, 1_000)
    await drain_org_fully(rt, org_id)
    real_hscan = rt.redis.hscan_iter
    done = False

    def hscan_then_a_short_call(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async def scan() -> AsyncIterator[Any]:
            nonlocal done
            async for item in real_hscan(*args, **kwargs):
                yield item
            if not done:  # right after the scan, before the outbox is read again
                done = True
                assert (await reserve_call(rt, org_id, "short")).outcome == Outcome.ok
                assert (await release_call(rt, org_id, "short")).outcome == Outcome.ok

        return scan()

    monkeypatch.setattr(rt.redis, "hscan_iter", hscan_then_a_short_call)
    report = await check(rt, [org_id])
    monkeypatch.undo()
    assert report.clean, "a healthy org reported as drifted"
    await drain_org_fully(rt, org_id)
    assert (await check(rt, [org_id])).clean  # it was never drifted
