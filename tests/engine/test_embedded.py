"""Run as root, the embedded Postgres keeps its data where its own user owns it and changes nothing
outside the data directory it was given: no folder above it is chmod-ed, no user is created
(engine/embedded.py). The tests run as root on CI and on the development machine; the promises
about root are skipped elsewhere."""

import os
import pwd
import secrets
import subprocess
from pathlib import Path

import pytest

from credit_engine.engine import processes
from credit_engine.engine.embedded import EmbeddedPostgres, EmbeddedSetupError, free_port, postgres_user
from tests.services import Services, embedded_postgres

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the promises about running as root")


def snapshot(folders: list[Path]) -> dict[Path, tuple[int, int, int]]:
    found = {}
    for folder in folders:
        info = folder.stat()
        found[folder] = (info.st_mode, info.st_uid, info.st_gid)
    return found


def above(path: Path) -> list[Path]:
    return list(path.parents)


def no_such_user() -> str:
    name = f"ce-nobody-{secrets.token_hex(4)}"
    with pytest.raises(KeyError):
        pwd.getpwnam(name)
    return name


def test_starting_postgres_changes_no_folder_above_its_data_directory(pg_data_dir: Path) -> None:
    server = embedded_postgres(pg_data_dir / "group-only" / "pg")
    if server.run_as is not None:
        # Reachable through Postgres' user's group only, not by others: the old code added o+x here.
        server.data_dir.parent.mkdir(mode=0o710)
        os.chown(server.data_dir.parent, 0, server.run_as.pw_gid)
        server.data_dir.parent.chmod(0o710)
    watched = [*above(server.data_dir), *above(server.bin_dir / "postgres")]
    before = snapshot(watched)
    server.start()
    try:
        assert server._ready()
    finally:
        server.stop()
    assert snapshot(watched) == before
    runner = os.geteuid() if server.run_as is None else server.run_as.pw_uid
    assert server.data_dir.stat().st_uid == runner  # the data directory itself is Postgres' own
    assert server.pgdata.stat().st_uid == runner


@as_root
@pytest.mark.parametrize("made", [False, True], ids=["new-data-dir", "existing-data-dir"])
def test_a_data_directory_postgres_user_cannot_reach_is_refused_and_nothing_changes(
    pg_data_dir: Path, made: bool
) -> None:
    locked = pg_data_dir / "locked"
    locked.mkdir(mode=0o700)
    data_dir = locked / "a" / "pg"
    if made:
        data_dir.mkdir(parents=True)
    watched = [*([data_dir, data_dir.parent] if made else []), *above(locked.parent), locked]
    before = snapshot(watched)
    server = embedded_postgres(data_dir)
    with pytest.raises(EmbeddedSetupError) as refused:
        server.start()
    message = str(refused.value)
    assert f"cannot enter {locked}," in message  # the first folder in the way, named
    assert "--data-dir" in message and "non-root user" in message  # and the ways out
    assert snapshot(watched) == before
    assert data_dir.exists() == made and not (data_dir / "pgdata").exists()
    assert server.process is None


@as_root
def test_a_pg_user_that_does_not_exist_is_refused_and_not_created(pg_data_dir: Path) -> None:
    name = no_such_user()
    with pytest.raises(EmbeddedSetupError, match=f"CREDIT_ENGINE_PG_USER={name}, but there is no such user"):
        EmbeddedPostgres(pg_data_dir / "pg", user=name)
    with pytest.raises(KeyError):
        pwd.getpwnam(name)
    assert list(pg_data_dir.iterdir()) == []


@as_root
def test_root_is_not_a_pg_user() -> None:
    with pytest.raises(EmbeddedSetupError, match="refuses to run as root"):
        postgres_user("root")


@as_root
def test_a_pgdata_another_user_owns_is_refused_plainly(pg_data_dir: Path) -> None:
    server = embedded_postgres(pg_data_dir / "pg")
    server.pgdata.mkdir(parents=True)
    (server.pgdata / "PG_VERSION").write_text("16\n")  # made by root: not Postgres' user's
    with pytest.raises(EmbeddedSetupError, match="belongs to uid 0"):
        server.start()
    assert server.process is None


def up(data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    return subprocess.run(
        processes.cli("up", "--data-dir", str(data_dir), "--port", str(free_port())),
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **env},
    )


@as_root
def test_up_as_root_in_a_folder_postgres_user_cannot_reach_says_what_to_do(pg_data_dir: Path) -> None:
    locked = pg_data_dir / "locked"
    locked.mkdir(mode=0o700)
    result = up(locked / "data")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "credit-engine up: Postgres runs as user" in result.stderr
    assert f"cannot enter {locked}," in result.stderr
    assert "Traceback" not in result.stderr
    assert locked.stat().st_mode & 0o777 == 0o700
    assert not (locked / "data" / "postgres").exists()


@as_root
def test_up_as_root_with_a_pg_user_that_does_not_exist_says_what_to_do(pg_data_dir: Path) -> None:
    name = no_such_user()
    result = up(pg_data_dir / "data", CREDIT_ENGINE_PG_USER=name)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"CREDIT_ENGINE_PG_USER={name}, but there is no such user" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(KeyError):
        pwd.getpwnam(name)


def test_the_suites_postgres_keeps_no_data_under_pytests_basetemp(
    services: Services, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A second pytest session re-chmods /tmp/pytest-of-<user> 0700: a Postgres run as its own user
    under it would lose its files mid-session."""
    if services.embedded_pg is None:
        pytest.skip("the machine's Postgres")
    data_dir = services.embedded_pg.data_dir
    assert not data_dir.is_relative_to(tmp_path_factory.getbasetemp().resolve())
    assert not any(part.startswith("pytest-of-") for part in data_dir.parts), data_dir
