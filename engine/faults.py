"""Fault injection points for crash tests.

CREDIT_ENGINE_FAULT="<point>:<n>" makes the process SIGKILL itself the n-th time it reaches
<point>: a real kill at an exact moment (e.g. after the ledger COMMIT, before the outbox entries
are deleted), which random kills only hit by luck. Unset in production: `reached` is then one
dictionary lookup.
"""

import os
import signal

_counts: dict[str, int] = {}


def _configured() -> tuple[str, int] | None:
    raw = os.environ.get("CREDIT_ENGINE_FAULT", "")
    if ":" not in raw:
        return None
    point, _, count = raw.rpartition(":")
    return point, int(count)


_FAULT = _configured()


def reached(point: str) -> None:
    if _FAULT is None or _FAULT[0] != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] >= _FAULT[1]:
        os.kill(os.getpid(), signal.SIGKILL)
