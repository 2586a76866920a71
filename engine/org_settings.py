"""An org's settings: what its calls cost and how far its credit may be stretched.

Settings are Postgres-first (the orgs table), then copied into the org's Redis hash where the
scripts read them at decision time.
"""

from dataclasses import dataclass, fields, replace
from typing import Any

from engine import limits, outbound, validate
from engine.errors import InvalidInput


@dataclass(frozen=True)
class OrgSettings:
    rate_pence_per_minute: int
    overdraft_pence: int = 0
    min_start_pence: int | None = None  # least available credit to start a call; None: one minute
    hold_block_minutes: int = 5
    grace_seconds: int = 10
    low_balance_threshold_pence: int | None = None
    alert_webhook_url: str | None = None
    max_concurrent_calls: int | None = None  # None: no limit

    @property
    def min_start_pence_effective(self) -> int:
        return self.min_start_pence if self.min_start_pence is not None else self.rate_pence_per_minute

    def script_args(self) -> list[int]:
        """The settings as org_configure.lua and org_restore.lua take them."""
        return [
            self.rate_pence_per_minute,
            self.overdraft_pence,
            self.min_start_pence_effective,
            self.hold_block_minutes,
            self.grace_seconds,
            self.max_concurrent_calls or 0,
            self.low_balance_threshold_pence or 0,
        ]

    def validated(self) -> "OrgSettings":
        validate.whole_number(self.rate_pence_per_minute, "rate_pence_per_minute", 1, limits.rate_pence_per_minute_max)
        validate.whole_number(self.overdraft_pence, "overdraft_pence", 0, limits.amount_pence_max)
        if self.min_start_pence is not None:
            validate.whole_number(self.min_start_pence, "min_start_pence", 1, limits.amount_pence_max)
        validate.whole_number(self.hold_block_minutes, "hold_block_minutes", 1, limits.hold_block_minutes_max)
        validate.whole_number(self.grace_seconds, "grace_seconds", 0, limits.grace_seconds_max)
        if self.low_balance_threshold_pence is not None:
            validate.whole_number(self.low_balance_threshold_pence, "low_balance_threshold_pence", 0, limits.amount_pence_max)
        if self.alert_webhook_url is not None:
            _check_url(self.alert_webhook_url, "alert_webhook_url")
        if self.max_concurrent_calls is not None:
            validate.whole_number(self.max_concurrent_calls, "max_concurrent_calls", 1, 1_000_000)
        return self

    def changed(self, changes: dict[str, Any]) -> "OrgSettings":
        known = {f.name for f in fields(self)}
        for name in changes:
            if name not in known:
                raise InvalidInput(name, "is not an org setting")
        return replace(self, **changes).validated()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _check_url(value: object, field: str) -> None:
    if not isinstance(value, str) or len(value) > 2000 or not value.isprintable() or " " in value:
        raise InvalidInput(field, "must be an http(s) URL of at most 2000 characters")
    if outbound.parse_url(value) is None:  # the parser the sender uses
        raise InvalidInput(field, "must be an http(s) URL")


async def check_alert_webhook_url(url: str | None, *, allow_private: bool) -> None:
    """When the URL is saved: refuse a host that is, or resolves to, an internal address (the rule
    is engine/outbound.py's; the same check runs again, pinned, at every send)."""
    if url is None:
        return
    refusal = await outbound.url_refusal(url, allow_private=allow_private)
    if refusal is not None:
        raise InvalidInput("alert_webhook_url", refusal)
