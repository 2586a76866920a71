"""Vapi's own records of calls (`GET /call/{id}`, `GET /call`), read as the engine bills them.

A call's billed seconds come from its `startedAt`/`endedAt` exactly as an end-of-call-report's do
(`report_billed_seconds`, which webapp/vapi_messages.py uses for the report itself): per started
second, in integer microseconds. So a call settled from Vapi's record and the same call's report,
arriving late, bill the same seconds, and the report is a replay.

Lookups are paced (`VapiPace`): at most CREDIT_ENGINE_VAPI_API_RPS requests a second for the whole
deployment, every process and every retry included. Time is cut into slots of 1/rps seconds and a
request first claims a free slot in Redis (`SET NX` on the slot's key, a plain command, expiring
soon after), then waits for the slot's start: one request per slot, so any second holds at most
rps of them, however many workers and operators' commands ask at once. The slots follow each
process's wall clock (NTP keeps them within milliseconds), not the money clock: pacing decides no
money.
"""

import asyncio
import math
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis.asyncio import Redis

from credit_engine.engine import limits
from credit_engine.engine.amounts import billed_seconds_from_us
from credit_engine.engine.keys import Keyspace

ENDED = "ended"


def vapi_time(value: Any) -> datetime | None:
    """An ISO-8601 instant with its zone, as Vapi writes them ("…Z"); None for anything else."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def duration_us(started: datetime, ended: datetime) -> int:
    """Microseconds from started to ended (0 if ended is not after started), exactly."""
    delta = ended - started
    return max(0, (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds)


def seconds_between(started: datetime, ended: datetime) -> int:
    """Whole seconds to bill for a call that ran from started to ended (per started second, capped)."""
    return min(billed_seconds_from_us(duration_us(started, ended)), limits.billed_seconds_max)


def _text(value: Any, length_max: int = 256) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= length_max and "\x00" not in value else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class VapiCallRecord:
    """One call as Vapi's API answers it (the SDK's `Call`), the fields billing reads."""

    id: str
    status: str | None  # queued, ringing, in-progress, forwarding, ended
    created_at: str
    phone_number_id: str | None
    started_at: datetime | None
    ended_at: datetime | None
    cost_usd: float | None
    ended_reason: str | None

    @property
    def ended(self) -> bool:
        return self.status == ENDED

    @property
    def billed_seconds(self) -> int | None:
        """What its end-of-call-report would bill; None when Vapi has no start and end (it never
        connected, or it is still running)."""
        if self.started_at is None or self.ended_at is None:
            return None
        return seconds_between(self.started_at, self.ended_at)

    def meta(self, source: str) -> dict[str, Any]:
        """What the ledger entry records beside the charge, as a report's does, and where it came from."""
        return {"vapi_cost_usd": self.cost_usd, "ended_reason": self.ended_reason, "billed_from": source}


def call_record_from(item: Any) -> VapiCallRecord | None:
    """A call from Vapi's JSON, or None if it has no id or createdAt (then it is not a Call)."""
    if not isinstance(item, dict):
        return None
    call_id, created_at = _text(item.get("id")), _text(item.get("createdAt"), 64)
    if call_id is None or created_at is None:
        return None
    return VapiCallRecord(
        id=call_id,
        status=_text(item.get("status"), 64),
        created_at=created_at,
        phone_number_id=_text(item.get("phoneNumberId")),
        started_at=vapi_time(item.get("startedAt")),
        ended_at=vapi_time(item.get("endedAt")),
        cost_usd=_number(item.get("cost")),
        ended_reason=_text(item.get("endedReason"), 200),
    )


class VapiPace:
    """At most `rps` Vapi requests a second across the deployment (see the module docstring)."""

    def __init__(self, redis: Redis, keys: Keyspace, rps: int) -> None:
        assert 1 <= rps <= limits.vapi_api_rps_max
        self.redis = redis
        self.keys = keys
        self.rps = rps

    async def wait_turn(self) -> None:
        """Claim the first free slot from now on, then sleep until it starts."""
        slot_s = 1.0 / self.rps
        first = math.ceil(time.time() / slot_s)
        for offset in range(limits.vapi_pace_wait_slots_max):
            slot = first + offset
            ttl_ms = int((offset + 2) * slot_s * 1000) + 1000  # gone soon after the slot has passed
            if await self.redis.set(self.keys.vapi_pace_slot(slot), "1", nx=True, px=ttl_ms):
                await asyncio.sleep(max(0.0, slot * slot_s - time.time()))
                return
        raise TimeoutError(f"no free Vapi request slot within {limits.vapi_pace_wait_slots_max} slots")
