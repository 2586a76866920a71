"""The org settings, declared once: name, kind, bounds, default, command-line flag and help.

Everything else is derived from this table or pinned to it by a test:
  - validation (engine/org_settings.py OrgSettings.validated, whose fields and defaults are
    asserted equal to the table's at import),
  - the orgs table's columns, read and written in the table's order (engine/orgs.py,
    engine/snapshots.py; tests/engine/test_org_setting_table.py checks migrations/schema.json),
  - the settings the scripts take, in SCRIPT_ORDER (OrgSettings.script_args, the reconciler's
    comparison), and the bounds the Lua scripts check them against (the same test reads
    org_configure.lua's and org_restore.lua's `int_arg` literals),
  - the `credit-engine orgs create|update` flags and `--unset` choices (cli/commands.py),
  - the OpenAPI schemas of requests and responses (webapp/openapi.py) and the admin org view.

A new setting: a row here, a field of OrgSettings, a migration (column and CHECK), and, if the
scripts read it, its place in SCRIPT_ORDER and an `int_arg` in each script that takes settings.
The tests name whichever of those is missing.

This module imports only engine/limits.py: the command line builds its parser from it without
loading the engine.
"""

from dataclasses import dataclass
from typing import Literal

from credit_engine.engine import limits

Kind = Literal["integer", "url", "sentence"]


@dataclass(frozen=True)
class Setting:
    name: str
    kind: Kind
    minimum: int  # integers: the least value; text: the least length once trimmed
    maximum: int  # integers: the largest value; text: the longest length
    default: int | None  # what an org that never set it has; None: unset, and `--unset` / null restores it
    flag: str
    help: str
    required: bool = False  # an org cannot be created without it
    shown_in_force: bool = False  # shown as the value in force when unset, never null (min_start_pence)

    @property
    def unsettable(self) -> bool:
        return self.default is None and not self.required


def _refusal(name: str, when: str) -> Setting:
    text = f"what a caller hears when a call is refused ({when}); unset: the engine's default sentence"
    return Setting(name, "sentence", 1, limits.refusal_text_length_max, None, "--" + name.replace("_", "-"), text)


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "rate_pence_per_minute",
        "integer",
        1,
        limits.rate_pence_per_minute_max,
        None,
        "--rate",
        "what a call costs, in pence per minute",
        required=True,
    ),
    Setting(
        "overdraft_pence",
        "integer",
        0,
        limits.amount_pence_max,
        0,
        "--overdraft",
        "how far below zero the org's calls may take its balance",
    ),
    Setting(
        "min_start_pence",
        "integer",
        1,
        limits.amount_pence_max,
        None,
        "--min-start",
        "the least available credit a call needs to start; unset: one minute at the rate",
        shown_in_force=True,
    ),
    Setting(
        "hold_block_minutes",
        "integer",
        1,
        limits.hold_block_minutes_max,
        5,
        "--hold-block-minutes",
        "the minutes of credit a call holds at a time",
    ),
    Setting(
        "grace_seconds",
        "integer",
        0,
        limits.grace_seconds_max,
        10,
        "--grace-seconds",
        "how long the kill switch lets a call run past its last funded moment",
    ),
    Setting(
        "low_balance_threshold_pence",
        "integer",
        0,
        limits.amount_pence_max,
        None,
        "--low-balance-threshold",
        "available credit below which the low-balance alert is sent; unset: no alert",
    ),
    Setting(
        "alert_webhook_url",
        "url",
        1,
        limits.url_length_max,
        None,
        "--alert-webhook-url",
        "where the org's signed alerts are sent (public addresses only); unset: no alerts",
    ),
    Setting(
        "max_concurrent_calls",
        "integer",
        1,
        limits.concurrent_calls_max,
        None,
        "--max-concurrent-calls",
        "the most live calls at once; unset: no limit",
    ),
    Setting(
        "forward_url",
        "url",
        1,
        limits.url_length_max,
        None,
        "--forward-url",
        "the platform's own server (public addresses only); unset: CREDIT_ENGINE_FORWARD_URL",
    ),
    _refusal("refusal_no_credit", "not enough credit"),
    _refusal("refusal_busy", "at max_concurrent_calls"),
    _refusal("refusal_not_set_up", "the number cannot take calls"),
    _refusal("refusal_try_later", "anything else"),
)

BY_NAME = {setting.name: setting for setting in SETTINGS}
NAMES = tuple(BY_NAME)
UNSETTABLE = tuple(setting.name for setting in SETTINGS if setting.unsettable)

# The settings the scripts keep in the org's Redis hash, in the order org_configure.lua and
# org_restore.lua take them (0 stands for "unset" where the table's minimum is above 0).
SCRIPT_ORDER = (
    "rate_pence_per_minute",
    "overdraft_pence",
    "min_start_pence",
    "hold_block_minutes",
    "grace_seconds",
    "max_concurrent_calls",
    "low_balance_threshold_pence",
)

assert len(BY_NAME) == len(SETTINGS), "a setting is declared twice"
assert set(SCRIPT_ORDER) <= set(NAMES) and all(BY_NAME[name].kind == "integer" for name in SCRIPT_ORDER)
assert all(setting.maximum < limits.lua_integer_exact_max for setting in SETTINGS)
assert all(setting.flag.startswith("--") for setting in SETTINGS)
