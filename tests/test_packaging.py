"""One installable distribution with one import name: the wheel installs `credit_engine` and
nothing else at the top level (the repository's folders are its subpackages), the Lua scripts and
the migrations ship inside it, and the command runs as `credit-engine` or `python -m credit_engine`
without a folder in the working directory ever standing in for the installed code."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from credit_engine.engine import processes

REPO = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("credit_engine-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed on its own into a folder (its dependencies come from this venv)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def test_every_package_is_a_folder_of_the_repository_mapped_under_the_one_name() -> None:
    mapping = SETUPTOOLS["package-dir"]
    assert {package.split(".")[0] for package in SETUPTOOLS["packages"]} == {processes.PACKAGE}
    for package in SETUPTOOLS["packages"]:
        top = ".".join(package.split(".")[:2]) if package != processes.PACKAGE else package
        folder = REPO / mapping[top] / "/".join(package.split(".")[2:])
        assert (folder / "__init__.py").is_file(), package


def test_the_wheel_installs_only_credit_engine_with_scripts_migrations_and_the_command(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"credit_engine"}
    lua_files = {p.name for p in (REPO / "lua").glob("*.lua")}
    assert lua_files and {f"credit_engine/lua/{name}" for name in lua_files} <= names
    for required in (
        "credit_engine/__main__.py",
        "credit_engine/commands.py",
        "credit_engine/migrations/env.py",
        "credit_engine/migrations/script.py.mako",
        "credit_engine/migrations/sql/0001_ledger_triggers.sql",
        "credit_engine/migrations/versions/0001_initial.py",
        "credit_engine/webapp/app.py",
        "credit_engine/worker/settings.py",
        "credit_engine/loadtest/wrk_post.lua",
    ):
        assert required in names, required
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "credit-engine = credit_engine.commands:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_an_install_has_no_top_level_engine_webapp_worker_lua_migrations_or_loadtest(installed: Path) -> None:
    importable = {path.name for path in installed.iterdir() if not path.name.endswith(".dist-info")} - {"bin"}
    assert importable == {"credit_engine"}  # bin/ holds the credit-engine script


def test_a_folder_in_the_working_directory_never_shadows_the_installed_code(installed: Path, tmp_path: Path) -> None:
    """A checkout's folders (or anything named like them) in the directory a process starts in:
    every child the engine starts runs `python -P -m credit_engine`, which never looks there."""
    for decoy in ("credit_engine", "engine", "webapp", "worker", "lua", "migrations"):
        (tmp_path / decoy).mkdir()
        (tmp_path / decoy / "__init__.py").write_text(f"raise SystemExit('the {decoy}/ folder was imported')\n")
    env = {"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([*processes.cli("--help")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "usage: credit-engine" in done.stdout
    probe = "import credit_engine.engine.config as c, importlib.util as u; print(c.__file__, u.find_spec('engine'))"
    done = subprocess.run(
        [sys.executable, "-P", "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    path, engine_spec = done.stdout.split()
    assert path.startswith(str(installed)) and engine_spec == "None"
    # Without -P the decoy wins: the hazard the flag is there for.
    shadowed = subprocess.run(
        [sys.executable, "-m", "credit_engine", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "the credit_engine/ folder was imported" in shadowed.stderr
