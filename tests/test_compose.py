"""compose.yaml cannot run here (no Docker engine), so it is checked as data: the services, their
commands (parsed by our own CLI), the environment, the health checks and the start order."""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import yaml

from credit_engine.commands import build_parser
from credit_engine.engine.keys import Keyspace

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "compose.yaml").read_text())  # type: ignore[no-any-return]


def test_the_services_are_all_there_with_health_checks_and_volumes() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "postgres", "migrate", "web", "worker"}
    for name in ("redis", "postgres", "web", "worker"):
        check = services[name]["healthcheck"]
        assert check["test"][0] == "CMD" and check["interval"] and check["retries"] >= 3, name
    assert services["redis"]["volumes"] == ["redis-data:/data"]
    assert services["postgres"]["volumes"] == ["postgres-data:/var/lib/postgresql/data"]
    assert set(compose()["volumes"]) == {"redis-data", "postgres-data"}


def test_redis_keeps_every_acknowledged_write() -> None:
    command = compose()["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2]))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] in ("always", "everysec")  # the README says what each can lose


def test_each_engine_service_runs_a_real_command_of_ours_in_order() -> None:
    services = compose()["services"]
    parser = build_parser()
    for name, expected in (("migrate", "migrate"), ("web", "serve"), ("worker", "worker")):
        args = parser.parse_args(services[name]["command"])  # an unknown command or flag exits here
        assert args.command == expected, name
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("web", "worker"):
        assert services[name]["depends_on"] == {
            "redis": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"},
        }
    web_args = parser.parse_args(services["web"]["command"])
    assert web_args.host == "0.0.0.0" and services["web"]["ports"] == [f"{web_args.port}:{web_args.port}"]
    assert f"127.0.0.1:{web_args.port}/readyz" in " ".join(services["web"]["healthcheck"]["test"])


def test_the_engine_services_point_at_the_compose_servers() -> None:
    services = compose()["services"]
    postgres_env = services["postgres"]["environment"]
    for name in ("migrate", "web", "worker"):
        env = services[name]["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0", name
        user, password, db = (
            postgres_env["POSTGRES_USER"],
            postgres_env["POSTGRES_PASSWORD"],
            postgres_env["POSTGRES_DB"],
        )
        assert env["DATABASE_URL"] == f"postgresql://{user}:{password}@postgres:5432/{db}", name


def test_the_worker_health_check_reads_the_key_the_worker_writes() -> None:
    check = " ".join(compose()["services"]["worker"]["healthcheck"]["test"])
    assert f"'{Keyspace('ce').arq_queue}:health-check'" in check  # the default prefix, as compose sets none


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of each line of the Dockerfile, comments left out."""
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    return [tuple(line.split(" ", 1)) for line in lines if line and not line.startswith("#")]  # type: ignore[misc]


def build_context() -> list[Path]:
    """The files `docker build .` sends: everything but what .dockerignore names (each of its lines
    a top-level name or a simple glob of one, which this reading insists on)."""
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert all("/" not in p and not p.startswith("!") for p in patterns), patterns
    return [
        path
        for path in ROOT.rglob("*")
        if path.is_file() and not any(fnmatch(path.relative_to(ROOT).parts[0], p) for p in patterns)
    ]


def test_the_image_installs_the_wheel_built_from_its_whole_context() -> None:
    """The image once listed five of the six packages by hand (COPY engine engine, …) and could not
    install: now the build stage copies the context and wheels it, and the image installs that."""
    instructions = dockerfile_instructions()
    copies = [arguments for instruction, arguments in instructions if instruction == "COPY"]
    assert copies == [". .", "--from=build /wheels /wheels"]
    runs = [arguments for instruction, arguments in instructions if instruction == "RUN"]
    assert runs[0] == "pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ."
    assert runs[1].startswith("pip install --no-cache-dir /wheels/*.whl")
    assert instructions[-1] == ("ENTRYPOINT", '["credit-engine"]')


def test_the_wheel_builds_from_exactly_the_files_the_image_gets_and_holds_every_package(tmp_path: Path) -> None:
    context = tmp_path / "context"
    for path in build_context():
        target = context / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(tmp_path / "wheels"), str(context)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (tmp_path / "wheels").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, folder in setuptools["package-dir"].items():  # every module and data file of each
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".lua", ".mako", ".json", ".sql") and "__pycache__" not in path.parts:
                installed = "/".join([*package.split("."), *path.relative_to(ROOT / folder).parts])
                assert installed in names, path
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"credit_engine"}
