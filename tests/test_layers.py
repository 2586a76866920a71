"""The layers, checked from the source: the engine is below the web app and the worker, the load
tools are on top, and the web app and the worker do not import each other. engine/cli.py, which
starts every app, is the one module of engine/ allowed above it (issue 14 moves it out)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "engine": {"webapp", "worker", "loadtest"},
    "webapp": {"worker", "loadtest"},
    "worker": {"webapp", "loadtest"},
}
ALLOWED = {"engine/cli.py"}  # the command line starts the web app, the worker and the load tools


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_no_module_imports_against_the_layers() -> None:
    crossings = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = str(path.relative_to(ROOT))
            if relative not in ALLOWED and imported_packages(path) & forbidden:
                crossings.append((relative, sorted(imported_packages(path) & forbidden)))
    assert crossings == []


def test_the_check_sees_an_import_inside_a_function() -> None:
    """Most crossings would be lazy imports inside a function (as cli.py's are): the check walks
    the whole tree, not only the module's top."""
    assert {"webapp", "worker", "loadtest"} <= imported_packages(ROOT / "engine/cli.py")
