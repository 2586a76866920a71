"""The one seam every money decision passes: run the org's script, ring the worker, decode the
reply, file the depletion moment, note a refusal for a full outbox; and, when Redis does not hold
the org, restore it from Postgres and decide once more.

Each operation (engine/assets.py, holds.py, credits.py) builds its keys and arguments and reads
its own tail of the reply; what every decision must do around the script is written here once, so
a new operation cannot forget to file the kill switch's moment or to ring the worker.
"""

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from credit_engine.engine.killswitch import file_depletion
from credit_engine.engine.outbox import note_refused_for_full_outbox
from credit_engine.engine.restore import restore_org_if_absent
from credit_engine.engine.results import Outcome, ScriptResult, decode
from credit_engine.engine.runtime import Runtime


async def decide(
    rt: Runtime, script: str, org_id: str, keys: list[str], args: list[Any], *, tail_length: int, operation: str
) -> ScriptResult:
    """Run a script that may append to the org's outbox, ringing the worker's doorbell in the same
    round trip; decode its reply (the head's promises asserted); file the org's depletion moment
    for the kill switch; and log, at most once a while, a refusal because the outbox is full
    (`operation` names what was refused)."""
    reply = await rt.scripts.run_and_ring(rt.redis, script, keys, args, rt.keys.outbox_dirty(org_id), org_id)
    result = decode(reply, tail_length=tail_length)
    await file_depletion(rt, org_id, result.depletion_ms)
    if result.outcome == Outcome.outbox_full:
        note_refused_for_full_outbox(org_id, operation, rt.settings.outbox_per_org_max)
    return result


class Decision(Protocol):
    @property
    def outcome(self) -> Outcome: ...


D = TypeVar("D", bound=Decision)


async def restoring(rt: Runtime, org_id: str, decision: Callable[[], Awaitable[D]]) -> D:
    """Make a decision; if Redis does not hold the org (org_unknown: it lost its state, or has not
    restored this org yet) and Postgres does, restore the org from Postgres and make it once more.
    An org Postgres does not know stays org_unknown. The decision must be idempotent, as every one
    is: the first attempt changed nothing."""
    result = await decision()
    if result.outcome == Outcome.org_unknown and await restore_org_if_absent(rt, org_id) is not None:
        result = await decision()
    return result
