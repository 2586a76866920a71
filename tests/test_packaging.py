"""One installable distribution: the Lua scripts and the migrations ship inside the wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_scripts_migrations_and_the_console_script(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("credit_engine-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    lua_files = {p.name for p in (REPO / "lua").glob("*.lua")}
    assert lua_files and {f"lua/{name}" for name in lua_files} <= names
    for required in (
        "migrations/env.py",
        "migrations/script.py.mako",
        "migrations/sql/0001_ledger_triggers.sql",
        "migrations/versions/0001_initial.py",
        "engine/cli.py",
        "webapp/app.py",
        "worker/settings.py",
    ):
        assert required in names, required
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "credit-engine = engine.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
