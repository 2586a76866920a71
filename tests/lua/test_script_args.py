"""The limits the Lua scripts enforce are the ones declared in Python: every `int_arg(…, name,
min, max)` in lua/ spells the bounds of engine/limits.SCRIPT_ARGS (or, for an org setting, of its
row in engine/org_setting_table.py), and the constants the scripts spell as literals equal theirs.
The configuration reads the same settings within the same named bounds (engine/config.py)."""

import re
from importlib import resources

import pytest

from credit_engine.engine import limits
from credit_engine.engine import org_setting_table as table
from credit_engine.engine.config import ConfigError, Settings

LUA = resources.files("credit_engine.lua")
INT_ARG = re.compile(r"int_arg\(\s*[^,()]+,\s*'(\w+)',\s*(-?\d+),\s*(-?\d+)\s*\)")
CONSTANT = re.compile(r"^local ([A-Z][A-Z0-9_]*) = (-?\d+)$", re.MULTILINE)


def lua_sources() -> dict[str, str]:
    return {path.name: path.read_text(encoding="utf-8") for path in LUA.iterdir() if path.name.endswith(".lua")}


def test_every_int_arg_spells_the_declared_bounds() -> None:
    seen: set[str] = set()
    for script, text in lua_sources().items():
        for name, low, high in INT_ARG.findall(text):
            seen.add(name)
            if name in table.SCRIPT_ORDER:
                continue  # an org setting: tests/engine/test_org_setting_table.py holds it to its row
            assert name in limits.SCRIPT_ARGS, f"{script}: int_arg {name!r} is declared nowhere"
            assert (int(low), int(high)) == limits.SCRIPT_ARGS[name], f"{script}: int_arg {name!r}"
    assert set(limits.SCRIPT_ARGS) <= seen, "limits.SCRIPT_ARGS names an argument no script takes"
    assert len(seen) >= len(limits.SCRIPT_ARGS) + len(table.SCRIPT_ORDER)


def test_every_script_constant_that_is_a_limit_equals_it() -> None:
    found: dict[str, int] = {}
    for text in lua_sources().values():
        found.update({name: int(value) for name, value in CONSTANT.findall(text)})
    for name, value in limits.SCRIPT_CONSTANTS.items():
        assert found.get(name) == value, name


def test_the_regexes_find_what_they_check() -> None:
    """Not vacuous: the shipped scripts take these arguments, spelled as the test expects."""
    text = "\n".join(lua_sources().values())
    assert "'outbox_max', 1, 100000000)" in text and INT_ARG.search(text) is not None
    assert re.search(r"^local MAX_DURATION_S_MAX = 43200$", text, re.MULTILINE)


@pytest.mark.parametrize(
    ("variable", "largest", "scale"),
    [
        ("CREDIT_ENGINE_OUTBOX_PER_ORG_MAX", "outbox_max", 1),
        ("CREDIT_ENGINE_HOLD_REPORT_SLACK_S", "report_slack_ms", 1000),
        ("CREDIT_ENGINE_KILL_WARN_LEAD_S", "warn_lead_ms", 1000),
        ("CREDIT_ENGINE_KILL_ATTEMPTS_MAX", "attempts_max", 1),
        ("CREDIT_ENGINE_KILL_BACKOFF_BASE_MS", "backoff_base_ms", 1),
        ("CREDIT_ENGINE_KILL_BACKOFF_MAX_MS", "backoff_max_ms", 1),
        ("CREDIT_ENGINE_KILL_RECHECK_S", "recheck_ms", 1000),
    ],
)
def test_the_configuration_accepts_exactly_what_the_scripts_take(variable: str, largest: str, scale: int) -> None:
    """The largest value the scripts take is configurable, one more is refused at start: a
    setting can never be accepted by the engine and refused by every script call."""
    high = limits.SCRIPT_ARGS[largest][1] // scale
    env = {"CREDIT_ENGINE_KILL_BACKOFF_MAX_MS": str(limits.kill_backoff_ms_max)}  # base <= max
    Settings.from_env({**env, variable: str(high)})
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({**env, variable: str(high + 1)})
