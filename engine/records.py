"""Text formats the Lua scripts store, decoded and encoded the same way on the Python side.

See lua/_holds.lua (hold_encode, call_state_encode, asset idempotency value). The reconciler
writes these formats when it rebuilds Redis from Postgres, so both sides must agree exactly;
tests round-trip them through the scripts.
"""

from dataclasses import dataclass

from credit_engine.engine.types import HoldStatus


@dataclass(frozen=True)
class HoldRecord:
    hold_pence: int
    rate_pence_per_minute: int
    created_ms: int
    started_ms: int  # 0: the call has not started
    last_seen_ms: int
    expires_ms: int
    max_duration_s: int
    version: int
    ended_ms: int = 0  # 0: the call has not ended

    @property
    def known_until_ms(self) -> int:
        """The last moment the call is known to have run (see hold_known_until_ms in _holds.lua)."""
        return self.ended_ms if self.ended_ms > 0 else self.last_seen_ms

    @classmethod
    def decode(cls, text: str) -> "HoldRecord":
        parts = [int(part) for part in text.split("|")]
        assert len(parts) == 9, text
        record = cls(*parts)
        assert record.hold_pence >= 0
        assert record.rate_pence_per_minute > 0
        return record

    def encode(self) -> str:
        return "|".join(
            str(value)
            for value in (
                self.hold_pence,
                self.rate_pence_per_minute,
                self.created_ms,
                self.started_ms,
                self.last_seen_ms,
                self.expires_ms,
                self.max_duration_s,
                self.version,
                self.ended_ms,
            )
        )


@dataclass(frozen=True)
class CallState:
    """How a call was resolved: its idempotency record."""

    status: HoldStatus
    charged_pence: int
    billed_seconds: int
    rate_pence_per_minute: int

    @classmethod
    def decode(cls, text: str) -> "CallState":
        status, charged, billed, rate = text.split("|")
        return cls(HoldStatus(status), int(charged), int(billed), int(rate))

    def encode(self) -> str:
        assert self.status != HoldStatus.live
        return f"{self.status.value}|{self.charged_pence}|{self.billed_seconds}|{self.rate_pence_per_minute}"


def asset_idem_value(amount_pence: int, fingerprint: str, balance_pence_after: int) -> str:
    return f"{amount_pence}|{fingerprint}|{balance_pence_after}"


def credit_idem_value(amount_pence: int) -> str:
    return str(amount_pence)
