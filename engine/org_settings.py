"""An org's settings: what its calls cost and how far its credit may be stretched; and how its
calls sound and where its platform's server is (the Vapi profile).

Settings are Postgres-first (the orgs table). The money settings are copied into the org's Redis
hash, where the scripts read them at decision time; the profile settings (`forward_url`, the
refusal sentences) are read by the webhook through engine/org_profiles.py and never reach Redis.
"""

from dataclasses import dataclass, fields, replace
from typing import Any

from credit_engine.engine import limits, outbound, validate
from credit_engine.engine.errors import InvalidInput
from credit_engine.engine.org_profiles import Refusal


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
    # The platform's own server (None: CREDIT_ENGINE_FORWARD_URL), and what callers hear when a
    # call is refused (None: engine/org_profiles.py's default sentence).
    forward_url: str | None = None
    refusal_no_credit: str | None = None
    refusal_busy: str | None = None
    refusal_not_set_up: str | None = None
    refusal_try_later: str | None = None

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
            validate.whole_number(
                self.low_balance_threshold_pence, "low_balance_threshold_pence", 0, limits.amount_pence_max
            )
        if self.alert_webhook_url is not None:
            _check_url(self.alert_webhook_url, "alert_webhook_url")
        if self.max_concurrent_calls is not None:
            validate.whole_number(self.max_concurrent_calls, "max_concurrent_calls", 1, 1_000_000)
        if self.forward_url is not None:
            _check_url(self.forward_url, "forward_url")
        spoken: dict[str, Any] = {
            name: spoken_text(getattr(self, name), name) for name in REFUSAL_SETTINGS if getattr(self, name) is not None
        }
        return replace(self, **spoken) if spoken else self  # kept trimmed

    def changed(self, changes: dict[str, Any]) -> "OrgSettings":
        known = {f.name for f in fields(self)}
        for name in changes:
            if name not in known:
                raise InvalidInput(name, "is not an org setting")
        return replace(self, **changes).validated()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


REFUSAL_SETTINGS = tuple(refusal.value for refusal in Refusal)
URL_SETTINGS = ("alert_webhook_url", "forward_url")  # called by the engine: the address rule applies


def spoken_text(value: object, field: str) -> str:
    """A sentence Vapi will speak: 1..refusal_text_length_max printable characters once trimmed
    (no NUL, newline or other control character). Never empty: Vapi says "Unknown Error" instead."""
    length_max = limits.refusal_text_length_max
    text = value.strip() if isinstance(value, str) else ""
    if not 1 <= len(text) <= length_max or not text.isprintable():
        raise InvalidInput(field, f"must be a sentence of 1-{length_max} printable characters (null: the default)")
    return text


def _check_url(value: object, field: str) -> None:
    length_max = limits.url_length_max
    if not isinstance(value, str) or len(value) > length_max or not value.isprintable() or " " in value:
        raise InvalidInput(field, f"must be an http(s) URL of at most {length_max} characters")
    if outbound.parse_url(value) is None:  # the parser the sender uses
        raise InvalidInput(field, "must be an http(s) URL")


async def check_url_addresses(settings: OrgSettings, names: tuple[str, ...], *, allow_private: bool) -> None:
    """When URLs are saved: refuse a host that is, or resolves to, an internal address (the rule
    is engine/outbound.py's; the same check runs again, pinned, at every send)."""
    for name in names:
        assert name in URL_SETTINGS
        url = getattr(settings, name)
        if url is None:
            continue
        refusal = await outbound.url_refusal(url, allow_private=allow_private)
        if refusal is not None:
            raise InvalidInput(name, refusal)
