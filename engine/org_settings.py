"""An org's settings (declared in engine/org_setting_table.py): what its calls cost and how far its credit may be stretched; and how its
calls sound and where its platform's server is (the Vapi profile).

Settings are Postgres-first (the orgs table). The money settings are copied into the org's Redis
hash, where the scripts read them at decision time; the profile settings (`forward_url`, the
refusal sentences) are read by the webhook through engine/org_profiles.py and never reach Redis.
"""

from dataclasses import MISSING, dataclass, fields, replace
from typing import Any

from credit_engine.engine import limits, outbound, validate
from credit_engine.engine import org_setting_table as table
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
        """The settings as org_configure.lua and org_restore.lua take them (table.SCRIPT_ORDER;
        0 where a setting is unset, and min_start_pence as in force)."""
        return [self._script_arg(name) for name in table.SCRIPT_ORDER]

    def _script_arg(self, name: str) -> int:
        value = self.in_force(name)
        if value is None:
            assert table.BY_NAME[name].unsettable, f"{name} is not set"  # 0 means unset only where it may be
            return 0
        assert isinstance(value, int), name
        return value

    def in_force(self, name: str) -> int | str | None:
        """A setting's value, or for min_start_pence the value in force when unset."""
        return self.min_start_pence_effective if name == "min_start_pence" else getattr(self, name)

    def shown(self) -> dict[str, int | str | None]:
        """The settings as the API shows them: unset is null, except where the value in force is shown."""
        return {s.name: self.in_force(s.name) if s.shown_in_force else getattr(self, s.name) for s in table.SETTINGS}

    def validated(self) -> "OrgSettings":
        """Each setting checked as the table declares it (None passes where it means "unset");
        sentences come back trimmed."""
        spoken: dict[str, Any] = {}
        for setting in table.SETTINGS:
            value = getattr(self, setting.name)
            if value is None and setting.unsettable:
                continue
            if setting.kind == "integer":
                validate.whole_number(value, setting.name, setting.minimum, setting.maximum)
            elif setting.kind == "url":
                _check_url(value, setting.name)
            else:
                spoken[setting.name] = spoken_text(value, setting.name)
        return replace(self, **spoken) if spoken else self

    def changed(self, changes: dict[str, Any]) -> "OrgSettings":
        for name in changes:
            if name not in table.BY_NAME:
                raise InvalidInput(name, "is not an org setting")
        return replace(self, **changes).validated()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return table.NAMES


def _defaults_match_the_table() -> bool:
    declared = {f.name: (f.default if f.default is not MISSING else None) for f in fields(OrgSettings)}
    return declared == {setting.name: setting.default for setting in table.SETTINGS}


assert _defaults_match_the_table(), "OrgSettings and engine/org_setting_table.py disagree"
REFUSAL_SETTINGS = tuple(refusal.value for refusal in Refusal)
URL_SETTINGS = tuple(setting.name for setting in table.SETTINGS if setting.kind == "url")
assert set(REFUSAL_SETTINGS) == {setting.name for setting in table.SETTINGS if setting.kind == "sentence"}


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
