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
