"""One table of return codes: lua/_codes.lua is generated from engine/results.py's Outcome enum
and the scripts return its names, never bare numbers."""

import re
from importlib import resources

import pytest

from credit_engine.engine.results import Outcome
from credit_engine.engine.scripts import CODES_LIBRARY, codes_library, load_scripts

LUA = resources.files("credit_engine.lua")
SCRIPTS = load_scripts()
CODE_NAME = re.compile(r"\bCODE_([A-Z_]+)\b")


def script_text(name: str) -> str:
    return LUA.joinpath(f"{name}.lua").read_text(encoding="utf-8")


def test_the_codes_library_is_the_enum_regenerated() -> None:
    shipped = LUA.joinpath(f"{CODES_LIBRARY}.lua").read_text(encoding="utf-8")
    assert shipped == codes_library(), "lua/_codes.lua is stale: python -m credit_engine.engine.scripts"
    for outcome in Outcome:
        assert f"local CODE_{outcome.name.upper()} = {int(outcome)}\n" in shipped


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_script_returns_only_the_codes_its_header_lists(name: str) -> None:
    body = script_text(name).split("]]", 1)[1]
    returned = {Outcome[label.lower()] for label in CODE_NAME.findall(body)}
    assert returned, f"{name}.lua returns no named code"
    assert returned == {Outcome(code) for code in SCRIPTS[name].output_codes}, name


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_script_spells_no_code_as_a_number(name: str) -> None:
    body = script_text(name).split("]]", 1)[1]
    body = body.replace("return {0, 0, 0, 0, 0, 0}", "")  # killswitch_tick's empty kill state, not a reply
    assert not re.search(r"\bhead\(\s*-?\d", body), f"{name}.lua passes head() a bare number"
    assert not re.search(r"\breturn\s*\{\s*-?\d", body), f"{name}.lua returns a bare code"
    assert not re.search(r"\b(refusal|code)\s*=\s*-?\d", body), f"{name}.lua keeps a code as a bare number"
