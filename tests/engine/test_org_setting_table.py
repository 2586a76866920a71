"""engine/org_setting_table.py is the one declaration of the org settings: every other place that
names a setting is derived from it or, where it cannot be (Lua, SQL), checked against it here, so
a copy that drifts fails with its name."""

import argparse
import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from credit_engine.commands import build_parser
from credit_engine.engine import limits
from credit_engine.engine import org_setting_table as table
from credit_engine.engine.errors import InvalidInput
from credit_engine.engine.org_settings import OrgSettings
from credit_engine.engine.reconciler import SETTING_FIELDS
from credit_engine.engine.schema import expected
from credit_engine.webapp.openapi import SCHEMAS, SETTINGS_PROPERTIES

ROOT = Path(__file__).resolve().parents[2]
INT_ARG = re.compile(r"int_arg\(ARGV\[(\d+)\], '(\w+)', (-?\d+), (-?\d+)\)")


def lua_setting_args(script: str) -> list[tuple[int, str, int, int]]:
    """(ARGV index, name, least, most) of each setting a script checks with int_arg."""
    found = INT_ARG.findall((ROOT / "lua" / script).read_text())
    return [(int(i), name, int(lo), int(hi)) for i, name, lo, hi in found if name in table.BY_NAME]


@pytest.mark.parametrize("script", ["org_configure.lua", "org_restore.lua"])
def test_the_scripts_take_the_settings_in_script_order_with_the_tables_bounds(script: str) -> None:
    args = lua_setting_args(script)
    assert [name for _, name, _, _ in args] == list(table.SCRIPT_ORDER)
    first = args[0][0]
    assert [index for index, _, _, _ in args] == list(range(first, first + len(args))), "consecutive ARGV"
    for _, name, least, most in args:
        setting = table.BY_NAME[name]
        # 0 stands for "unset" in Redis where a setting may be unset and shows no value in force.
        zero_means_unset = setting.unsettable and not setting.shown_in_force
        assert (least, most) == (0 if zero_means_unset else setting.minimum, setting.maximum), name


def test_the_redis_hash_holds_every_script_setting() -> None:
    library = (ROOT / "lua" / "_org.lua").read_text()
    org_fields = re.search(r"local ORG_FIELDS = \{(.*?)\}", library, re.S)
    assert org_fields is not None
    assert set(table.SCRIPT_ORDER) <= set(re.findall(r"'(\w+)'", org_fields.group(1)))
    assert SETTING_FIELDS == table.SCRIPT_ORDER  # the reconciler compares exactly these


def test_the_orgs_table_has_a_column_for_each_setting_null_only_where_it_may_be_unset() -> None:
    columns = expected()["tables"]["orgs"]["columns"]
    for setting in table.SETTINGS:
        assert setting.name in columns, setting.name
        assert ("not null" not in columns[setting.name]) == setting.unsettable, setting.name


def test_the_dataclass_fields_and_defaults_are_the_tables() -> None:
    declared = {f.name: (None if f.default is MISSING else f.default) for f in fields(OrgSettings)}
    assert declared == {setting.name: setting.default for setting in table.SETTINGS}


def test_validation_applies_each_settings_bounds() -> None:
    base = OrgSettings(rate_pence_per_minute=60)
    for setting in table.SETTINGS:
        if setting.kind == "integer":
            for wrong in (setting.minimum - 1, setting.maximum + 1, "7", 1.5, True):
                with pytest.raises(InvalidInput) as refused:
                    base.changed({setting.name: wrong})
                assert refused.value.field == setting.name
            assert getattr(base.changed({setting.name: setting.maximum}), setting.name) == setting.maximum
        else:
            with pytest.raises(InvalidInput):
                base.changed({setting.name: "x" * (setting.maximum + 1)})
        if setting.unsettable:
            assert getattr(base.changed({setting.name: None}), setting.name) is None
        else:
            with pytest.raises(InvalidInput):
                base.changed({setting.name: None})


def test_the_openapi_schemas_carry_the_tables_bounds_and_nullability() -> None:
    assert set(SETTINGS_PROPERTIES) == set(table.NAMES)
    for setting in table.SETTINGS:
        schema = SETTINGS_PROPERTIES[setting.name]
        if setting.kind == "integer":
            assert (schema["minimum"], schema["maximum"]) == (setting.minimum, setting.maximum)
        else:
            assert schema["maxLength"] == setting.maximum
        assert schema.get("nullable", False) == setting.unsettable, setting.name
        shown = SCHEMAS["Org"]["properties"][setting.name]
        assert shown.get("nullable", False) == (setting.unsettable and not setting.shown_in_force), setting.name
    assert SCHEMAS["OrgCreate"]["required"] == ["org_id", "name", *(s.name for s in table.SETTINGS if s.required)]


def test_the_command_line_has_each_settings_flag_and_help() -> None:
    parser = build_parser()
    created = vars(parser.parse_args(["orgs", "create", "x", "--rate", "1", "--grace-seconds", "3"]))
    assert set(table.NAMES) <= set(created) and created["grace_seconds"] == 3
    with pytest.raises(SystemExit):  # a required setting
        parser.parse_args(["orgs", "create", "x"])
    update = subcommand(subcommand(parser, "orgs"), "update")
    flags = {action.dest: action for action in update._actions}
    for setting in table.SETTINGS:
        assert setting.flag in flags[setting.name].option_strings and flags[setting.name].help == setting.help
    assert tuple(flags["unset"].choices) == table.UNSETTABLE


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return commands.choices[name]


def test_the_table_is_consistent_with_the_limits() -> None:
    assert table.BY_NAME["max_concurrent_calls"].maximum == limits.concurrent_calls_max
    assert all(setting.minimum <= setting.maximum for setting in table.SETTINGS)
