"""Every script's header is the contract: its output codes match the Python enum, its declared
keys are all of its org's slot, and every script ships in the package."""

from importlib import resources

import pytest

from credit_engine.engine.results import Outcome
from credit_engine.engine.scripts import INCLUDE_PATTERN, load_scripts

SCRIPTS = load_scripts()
EXPECTED = {
    "asset_deduct",
    "credit_apply",
    "hold_adopt",
    "hold_check",
    "hold_commit",
    "hold_release",
    "hold_reserve",
    "killswitch_ack",
    "killswitch_tick",
    "org_configure",
    "org_peek",
    "org_read",
    "org_restore",
    "outbox_dead_letter",
}


def test_every_script_ships_in_the_lua_package() -> None:
    shipped = {e.name for e in resources.files("credit_engine.lua").iterdir() if e.name.endswith(".lua")}
    libraries = {"_base", "_clock", "_money", "_burn", "_org", "_holds", "_idem", "_outbox", "_alerts", "_codes"}
    assert {f"{name}.lua" for name in EXPECTED | libraries} == shipped
    assert set(SCRIPTS) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_output_codes_match_the_outcome_enum(name: str) -> None:
    codes = SCRIPTS[name].output_codes
    assert codes, f"{name}.lua lists no output codes"
    for code, label in codes.items():
        assert Outcome(code).name == label, f"{name}.lua says {code} is {label}, the enum says {Outcome(code).name}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_key_is_in_the_orgs_hash_tag(name: str) -> None:
    for label in SCRIPTS[name].key_names:
        assert "{org:<org_id>}" in label, f"{name}.lua declares a key outside the org's slot: {label}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_include_is_inlined_and_the_script_does_not_read_the_clock_itself(name: str) -> None:
    source = SCRIPTS[name].source
    assert INCLUDE_PATTERN.search(source) is None
    # The only TIME call is clock_ms() in _clock.lua, which honours the caller's now_ms.
    assert source.count("'TIME'") <= 1


def test_a_call_with_the_wrong_number_of_keys_is_refused_before_redis() -> None:
    with pytest.raises(AssertionError):
        SCRIPTS["asset_deduct"].check_call(["only-one-key"], [0] * SCRIPTS["asset_deduct"].argv_count)
