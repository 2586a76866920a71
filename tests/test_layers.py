"""The layers, checked from the source: the engine is below the web app and the worker, the load
tools are on top, and the web app and the worker do not import each other. The command line
(cli/, the package's root `credit_engine`), which starts every app, sits above them all and is
the one place allowed to import each; no layer imports it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("engine", "lua", "webapp", "worker", "migrations", "loadtest")
FORBIDDEN = {
    "engine": {"webapp", "worker", "loadtest", "commands"},
    "webapp": {"worker", "loadtest", "commands"},
    "worker": {"webapp", "loadtest", "commands"},
    "migrations": {"webapp", "worker", "loadtest", "commands"},
    "loadtest": {"commands"},
}


def imported_packages(path: Path) -> set[str]:
    """The credit_engine subpackages (or root modules) a file imports, wherever in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "credit_engine" else [f"credit_engine.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            assert parts[0] not in SUBPACKAGES, f"{path}: imports {name} by a top-level name the install lacks"
            if parts[0] == "credit_engine" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_no_module_imports_against_the_layers() -> None:
    crossings = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            if imported_packages(path) & forbidden:
                crossings.append((str(path.relative_to(ROOT)), sorted(imported_packages(path) & forbidden)))
    assert crossings == []


def test_every_module_imports_through_the_one_name() -> None:
    """`from engine import x` works from a checkout's root (the working directory is on sys.path)
    and nowhere else: every module and test imports `credit_engine.…` (imported_packages asserts it)."""
    for folder in (*SUBPACKAGES, "cli", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            imported_packages(path)


def test_the_check_sees_an_import_inside_a_function() -> None:
    """Most crossings would be lazy imports inside a function (as the command line's are): the
    check walks the whole tree, not only the module's top."""
    assert {"webapp", "worker", "loadtest", "engine"} <= imported_packages(ROOT / "cli/commands.py")


# The web app asks the engine; it does not run SQL or Redis commands itself. A call of a method on
# a chain ending in `.pg` or `.redis` (`ctx.rt.pg.fetch(...)`, `rt.redis.hget(...)`,
# `rt.pg.acquire()`) is such a query; passing the client to an engine function
# (`redis_now_ms(ctx.rt.redis)`) is not. Allowed, each with its reason: (path, the method's chain)
# -> why. None is needed today.
STORE_CALLS_ALLOWED: dict[tuple[str, str], str] = {}


def store_calls(path: Path) -> list[tuple[int, str]]:
    """Every `<...>.pg.<method>(...)` or `<...>.redis.<method>(...)` call in a file: (line, chain)."""
    source = path.read_text()
    found = []
    for node in ast.walk(ast.parse(source, str(path))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr in ("pg", "redis")
        ):
            found.append((node.lineno, ast.get_source_segment(source, node.func) or ast.unparse(node.func)))
    return sorted(found)


def test_the_web_app_runs_no_queries_itself() -> None:
    """SQL and Redis commands live in the engine, each in a named function of the module where its
    concept lives (engine/balances.py, engine/holds.py, engine/ledger.py, ...)."""
    calls = []
    for path in sorted((ROOT / "webapp").rglob("*.py")):
        relative = str(path.relative_to(ROOT))
        calls += [
            f"{relative}:{line} {chain}(...)"
            for line, chain in store_calls(path)
            if (relative, chain) not in STORE_CALLS_ALLOWED
        ]
    assert calls == []


def test_the_query_check_sees_a_query(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text(
        "async def f(ctx, rt):\n"
        "    await ctx.rt.pg.fetchval('SELECT 1')\n"
        "    async with rt.pg.acquire() as conn:\n"
        "        await asyncio_reply(rt.redis.hget('k', 'f'))\n"
        "        await conn.fetch('SELECT 2')  # on a connection the pool gave: its acquire() is the call seen\n"
        "    await redis_now_ms(ctx.rt.redis)  # the client handed to the engine: not a query here\n"
    )
    assert store_calls(planted) == [(2, "ctx.rt.pg.fetchval"), (3, "rt.pg.acquire"), (4, "rt.redis.hget")]
