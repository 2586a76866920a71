"""Loads the Lua scripts shipped in the `lua` package and runs them by EVALSHA.

A script may say `--- @include "_money"` to inline the library lua/_money.lua (BullMQ's include
idea); a library may include others. The loader inlines every library a script needs, each once,
in dependency order, in place of the script's first include line; the SHA covers the composed
text. Each script includes exactly the libraries whose names it uses (tests/lua/test_includes.py). Each script's header declares its KEYS and ARGV; the loader counts
them and every call is checked against the count, so a caller cannot pass a key the script
does not declare (which would break Redis Cluster slot routing) or forget an argument.
"""

import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError, RedisError

from credit_engine.engine.results import Outcome

log = logging.getLogger(__name__)

INCLUDE_PATTERN = re.compile(r'^--- @include "(\w+)"\s*$', re.MULTILINE)
KEY_PATTERN = re.compile(r"^\s+KEYS\[(\d+)\]\s+(.+?)\s*$", re.MULTILINE)
ARGV_PATTERN = re.compile(r"^\s+ARGV\[(\d+)(\.\.)?\]\s+(\S+)", re.MULTILINE)
# "   -2  org_unknown", optionally followed by a note in brackets.
OUTPUT_CODE_PATTERN = re.compile(r"^\s+(-?\d+)\s+([a-z_]+)(?:\s+\(.*\))?\s*$", re.MULTILINE)


@dataclass(frozen=True)
class LuaScript:
    name: str
    source: str  # with includes inlined
    sha: str
    key_names: tuple[str, ...]
    argv_count: int  # declared fixed arguments
    argv_variadic: bool  # declares ARGV[n..]: any number of extra arguments
    output_codes: dict[int, str]

    def check_call(self, keys: list[str], args: list[Any]) -> None:
        assert len(keys) == len(self.key_names), (self.name, keys)
        # One hash tag for all keys: one Redis Cluster slot (engine/keys.py makes the tags).
        assert len({key[key.find("{") : key.find("}") + 1] for key in keys}) <= 1, (self.name, keys)
        if self.argv_variadic:
            assert len(args) >= self.argv_count, (self.name, len(args))
        else:
            assert len(args) == self.argv_count, (self.name, len(args))


def _header(text: str) -> str:
    end = text.find("]]")
    assert text.startswith("--[[") and end > 0, "a script starts with its --[[ header ]]"
    return text[:end]


class IncludeError(ValueError):
    """A library included twice by one file, an include cycle, or an unknown library."""


def direct_includes(name: str, text: str) -> list[str]:
    """The libraries a file names in its own include lines, refusing one named twice."""
    names = INCLUDE_PATTERN.findall(text)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise IncludeError(f"{name}.lua includes {', '.join(twice)} more than once")
    return names


def include_order(name: str, text: str, libraries: dict[str, str]) -> list[str]:
    """Every library a file needs, its own includes and theirs, each once, each after the
    libraries it includes (a Lua local must be declared before a function can use it)."""
    order: list[str] = []

    def visit(library: str, chain: tuple[str, ...]) -> None:
        if library in chain:
            raise IncludeError(f"include cycle: {' -> '.join((*chain, library))}")
        if library in order:
            return
        if library not in libraries:
            raise IncludeError(f"{chain[-1]}.lua includes {library}, which is not a library in lua/")
        for needed in direct_includes(library, libraries[library]):
            visit(needed, (*chain, library))
        order.append(library)

    for library in direct_includes(name, text):
        visit(library, (name,))
    return order


def compose(name: str, text: str, libraries: dict[str, str]) -> str:
    """The file with its include lines replaced by the libraries it needs, inlined in order."""
    order = include_order(name, text, libraries)
    if not order:
        return text
    inlined = "\n".join(INCLUDE_PATTERN.sub("", libraries[library]).rstrip("\n") + "\n" for library in order)
    first = INCLUDE_PATTERN.search(text)
    assert first is not None
    rest = INCLUDE_PATTERN.sub("", text[first.end() :])
    return text[: first.start()] + inlined + rest


def parse_script(name: str, text: str, includes: dict[str, str]) -> LuaScript:
    header = _header(text)
    key_matches = KEY_PATTERN.findall(header)
    argv_matches = ARGV_PATTERN.findall(header)
    assert [int(n) for n, _ in key_matches] == list(range(1, len(key_matches) + 1)), name
    fixed = [int(n) for n, dots, _ in argv_matches if not dots]
    assert fixed == list(range(1, len(fixed) + 1)), name
    output_block = header[header.index("Output:") :]
    codes = {int(code): label for code, label in OUTPUT_CODE_PATTERN.findall(output_block)}
    source = compose(name, text, includes)
    return LuaScript(
        name=name,
        source=source,
        sha=hashlib.sha1(source.encode()).hexdigest(),
        key_names=tuple(label for _, label in key_matches),
        argv_count=len(fixed),
        argv_variadic=any(dots for _, dots, _ in argv_matches),
        output_codes=codes,
    )


CODES_LIBRARY = "_codes"


def codes_library() -> str:
    """lua/_codes.lua: the Outcome enum (engine/results.py) as Lua constants, so scripts return
    CODE_ORG_UNKNOWN rather than -2. Generated; tests/lua/test_codes.py compares the shipped
    file with this text. To write it again: python -m credit_engine.engine.scripts"""
    lines = [
        "--[[",
        "  The return codes of every script: engine/results.py's Outcome enum, one constant a code.",
        "  Generated by engine/scripts.py codes_library() (python -m credit_engine.engine.scripts);",
        "  do not edit by hand: tests/lua/test_codes.py fails when this file and the enum differ.",
        "]]",
        "",
    ]
    lines += [f"local CODE_{outcome.name.upper()} = {int(outcome)}" for outcome in Outcome]
    return "\n".join(lines) + "\n"


def load_scripts() -> dict[str, LuaScript]:
    package = resources.files("credit_engine.lua")
    texts = {
        entry.name.removesuffix(".lua"): entry.read_text(encoding="utf-8")
        for entry in package.iterdir()
        if entry.name.endswith(".lua")
    }
    includes = {name: text for name, text in texts.items() if name.startswith("_")}
    return {
        name: parse_script(name, text, includes) for name, text in sorted(texts.items()) if not name.startswith("_")
    }


class ScriptRunner:
    """Runs scripts by SHA, loading them again if Redis forgot them (a restart, a failover)."""

    def __init__(self, scripts: dict[str, LuaScript] | None = None) -> None:
        self.scripts = scripts if scripts is not None else load_scripts()

    async def load(self, redis: Redis) -> None:
        for script in self.scripts.values():
            sha = await redis.script_load(script.source)
            assert sha == script.sha, (script.name, sha)

    async def run(self, redis: Redis, name: str, keys: list[str], args: list[Any]) -> list[int]:
        script = self.scripts[name]
        script.check_call(keys, args)
        try:
            return await self._evalsha(redis, script, keys, args)
        except NoScriptError:
            await self.load(redis)
            return await self._evalsha(redis, script, keys, args)

    @staticmethod
    def _evalsha(redis: Redis, script: LuaScript, keys: list[str], args: list[Any]) -> Awaitable[list[int]]:
        """Our scripts all reply with a list of integers (redis-py types EVALSHA's reply as a string)."""
        return cast("Awaitable[list[int]]", redis.evalsha(script.sha, len(keys), *keys, *args))

    def add_to_pipeline(self, pipe: Any, name: str, keys: list[str], args: list[Any]) -> None:
        script = self.scripts[name]
        script.check_call(keys, args)
        # execute_command, not pipe.evalsha: redis-py's cluster pipeline blocks the evalsha method
        # but routes the command itself by its keys like any other.
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

    async def execute(self, redis: Redis, build: Callable[[Any], None]) -> list[Any]:
        """Build and run a pipeline; if Redis forgot the scripts, load them and run it again.
        Everything put in such a pipeline must be safe to run twice."""
        for attempt in range(2):
            async with redis.pipeline(transaction=False) as pipe:
                build(pipe)
                try:
                    return await pipe.execute()
                except NoScriptError:
                    if attempt == 1:
                        raise
                    await self.load(redis)
        raise AssertionError("unreachable")

    async def run_and_ring(
        self,
        redis: Redis,
        name: str,
        keys: list[str],
        args: list[Any],
        doorbell_key: str,
        org_id: str,
    ) -> list[int]:
        """Run a script that appends to an org's outbox and ring the worker's doorbell in the
        same round trip. The doorbell only speeds the drain up: a lost ring is found by the
        worker's sweep, because the entry itself is already in the outbox."""

        if isinstance(redis, RedisCluster):
            # A cluster pipeline sends each node its part at once, so the ring could arrive before
            # the entry: a worker popping it then would find nothing and leave the entry to the
            # sweep. One after the other instead.
            reply = await self.run(redis, name, keys, args)
            try:
                await redis.sadd(doorbell_key, org_id)
            except RedisError as error:  # the decision stands; the worker's sweep finds the entry
                log.warning("could not ring the worker for org %s (the sweep will): %s", org_id, error)
            return reply

        def build(pipe: Any) -> None:
            self.add_to_pipeline(pipe, name, keys, args)
            pipe.sadd(doorbell_key, org_id)

        reply, _ = await self.execute(redis, build)
        return reply  # type: ignore[no-any-return]


if __name__ == "__main__":
    import sys
    from pathlib import Path

    target = Path(__file__).resolve().parent.parent / "lua" / f"{CODES_LIBRARY}.lua"
    target.write_text(codes_library(), encoding="utf-8")
    print(f"wrote {target}", file=sys.stderr)
