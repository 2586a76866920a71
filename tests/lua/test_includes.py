"""The libraries: each script includes exactly the libraries whose names it uses, and the loader
inlines them transitively, each once, refusing a library included twice or an include cycle.

Lua locals make a call to a library a script did not include a call of a nil global, found only
when that line runs; these tests find it statically, from the names each library declares at
its top level and the names each file uses (its comments and strings left out)."""

import re
from importlib import resources

import pytest

from credit_engine.engine.scripts import INCLUDE_PATTERN, IncludeError, compose, direct_includes, include_order

TEXTS = {
    entry.name.removesuffix(".lua"): entry.read_text(encoding="utf-8")
    for entry in resources.files("credit_engine.lua").iterdir()
    if entry.name.endswith(".lua")
}
LIBRARIES = {name: text for name, text in TEXTS.items() if name.startswith("_")}
SCRIPTS = {name: text for name, text in TEXTS.items() if not name.startswith("_")}

DECLARED = re.compile(r"^local\s+(?:function\s+)?([A-Za-z_]\w*)", re.MULTILINE)
IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_]\w*)")
LONG_COMMENT = re.compile(r"--\[(=*)\[.*?\]\1\]", re.S)
LINE_COMMENT = re.compile(r"--[^\n]*")
STRING = re.compile(r"'(?:\\.|[^'\\\n])*'|\"(?:\\.|[^\"\\\n])*\"")


def code_only(text: str) -> str:
    """The text without comments and string literals (strings first: a string may hold `--`)."""
    text = LONG_COMMENT.sub(" ", text)
    text = STRING.sub("''", text)
    return LINE_COMMENT.sub(" ", text)


def declared(text: str) -> set[str]:
    """The names a library declares at its top level (its locals and local functions)."""
    return set(DECLARED.findall(code_only(text)))


def used(text: str) -> set[str]:
    """The names a file uses, not counting a field after `.` or `:`."""
    return set(IDENTIFIER.findall(code_only(text)))


OWNER: dict[str, str] = {}
for _library, _text in sorted(LIBRARIES.items()):
    for _name in declared(_text):
        OWNER.setdefault(_name, _library)


def test_no_name_is_declared_by_two_libraries() -> None:
    seen: dict[str, str] = {}
    for library, text in sorted(LIBRARIES.items()):
        for name in declared(text):
            assert name not in seen, f"{name} is declared by both {seen[name]}.lua and {library}.lua"
            seen[name] = library


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_a_file_includes_every_library_whose_names_it_uses(name: str) -> None:
    text = TEXTS[name]
    own = declared(text)
    needed = {OWNER[n] for n in used(text) - own if n in OWNER and OWNER[n] != name}
    missing = needed - set(direct_includes(name, text))
    assert not missing, f"{name}.lua uses names of {sorted(missing)} without including them: " + ", ".join(
        sorted(n for n in used(text) - own if OWNER.get(n) in missing)
    )


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_a_file_includes_no_library_it_does_not_use(name: str) -> None:
    text = TEXTS[name]
    names = used(text)
    for library in direct_includes(name, text):
        assert declared(LIBRARIES[library]) & names, f"{name}.lua includes {library} and uses none of its names"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_composed_script_has_each_library_once_and_every_name_it_calls(name: str) -> None:
    source = compose(name, SCRIPTS[name], LIBRARIES)
    assert INCLUDE_PATTERN.search(source) is None
    for library in include_order(name, SCRIPTS[name], LIBRARIES):
        for local in declared(LIBRARIES[library]):
            assert len(re.findall(rf"^local\s+(?:function\s+)?{local}\b", source, re.M)) == 1, (library, local)
    # Every name that is called is declared somewhere in the composed script or is Lua's/Redis's.
    calls = set(re.findall(r"(?<![\w.:])([A-Za-z_]\w*)\s*\(", code_only(source)))
    builtins = {"error", "tonumber", "tostring", "unpack", "ipairs", "pairs", "type", "select"}
    builtins |= {"and", "or", "not", "if", "elseif", "while", "until", "return", "function"}
    unknown = calls - builtins - set(re.findall(r"\blocal\s+(?:function\s+)?([A-Za-z_]\w*)", source))
    assert not unknown, f"{name}.lua calls undeclared {sorted(unknown)}"


def header(text: str = "") -> str:
    return "--[[\n  A test library.\n]]\n" + text


def test_a_library_included_twice_by_one_file_is_refused() -> None:
    libraries = {"_a": header("local function a() end\n")}
    with pytest.raises(IncludeError, match="more than once"):
        compose("s", header('--- @include "_a"\n--- @include "_a"\nreturn a()\n'), libraries)


def test_an_include_cycle_is_refused() -> None:
    libraries = {
        "_a": header('--- @include "_b"\n'),
        "_b": header('--- @include "_c"\n'),
        "_c": header('--- @include "_a"\n'),
    }
    with pytest.raises(IncludeError, match="cycle: s -> _a -> _b -> _c -> _a"):
        compose("s", header('--- @include "_a"\n'), libraries)


def test_an_unknown_library_is_refused() -> None:
    with pytest.raises(IncludeError, match="not a library"):
        compose("s", header('--- @include "_nowhere"\n'), {})


def test_libraries_are_inlined_once_each_after_the_libraries_they_include() -> None:
    libraries = {
        "_base": header("local B = 1\n"),
        "_left": header('--- @include "_base"\nlocal L = B\n'),
        "_right": header('--- @include "_base"\nlocal R = B\n'),
    }
    source = compose(
        "s", header('--- @include "_right"\n--- @include "_left"\n--- @include "_base"\nreturn L + R\n'), libraries
    )
    assert source.count("local B = 1") == 1
    assert source.index("local B") < source.index("local R") < source.index("local L") < source.index("return")
