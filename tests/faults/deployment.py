"""A whole deployment of the test's own, every part of it a real process that the test may kill:
Redis (AOF `appendfsync always`), Postgres, `credit-engine serve` and `credit-engine worker`.

The servers are always started here, even when the rest of the suite uses the machine's: killing
them is the point, and a test never kills what it did not start.
"""

import asyncio
import os
import secrets
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from credit_engine.engine import processes
from credit_engine.engine.config import Settings
from credit_engine.engine.db import with_database
from credit_engine.engine.embedded import EmbeddedRedis, free_port
from credit_engine.engine.migrate import upgrade_to_head
from tests.processes import service_env, stop
from tests.services import embedded_postgres

ADMIN_TOKEN = "admin-" + secrets.token_hex(20)
WEBHOOK_SECRET = "whsec-" + secrets.token_hex(20)
COMPONENTS = ("web", "worker", "redis", "postgres")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the command in parentheses
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie (which has already let go of its memory)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def sigkill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a server and every process it forked (Postgres' backends too), as a power cut would.
    The server is stopped first so that it cannot fork a backend between our look and the kill
    (a surviving backend holds Postgres' shared memory, and no new postmaster could start)."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGSTOP)
    victims = _children(process.pid)
    for pid in [*victims, process.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(30)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in victims) and time.monotonic() < deadline:
        time.sleep(0.01)


class Deployment:
    def __init__(
        self,
        root: Path,
        key_prefix: str = "faults",
        redis_appendfsync: str | None = "always",
        *,
        postgres_dir: Path,
        **env: str,
    ) -> None:
        """`postgres_dir`: where Postgres keeps its data, from tests/services.py's postgres_data_dir."""
        self.root = root
        self.redis = EmbeddedRedis(root / "redis", appendfsync=redis_appendfsync)
        self.postgres = embedded_postgres(postgres_dir / "postgres")
        self.key_prefix = key_prefix
        self.env = env
        self.web_port = free_port()
        self.web: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.settings = Settings()
        # The servers die with the thread that started them (Linux parent-death signal), so kills and
        # restarts during a test run on this one thread, which lives as long as the deployment.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="deployment")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def start(self) -> None:
        self.redis.start()
        admin_url = self.postgres.start()
        database_url = with_database(admin_url, "credit_engine")
        subprocess.run(
            [
                str(self.postgres.bin_dir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.postgres.port),
                "-U",
                "postgres",
                "credit_engine",
            ],
            check=True,
            capture_output=True,
        )
        upgrade_to_head(database_url)
        self.settings = replace(
            Settings(),
            redis_url=self.redis.url,
            database_url=database_url,
            key_prefix=self.key_prefix,
            admin_token=ADMIN_TOKEN,
            vapi_webhook_secret=WEBHOOK_SECRET,
        )
        self.start_web()
        self.start_worker()

    def _process_env(self) -> dict[str, str]:
        return service_env(
            self.settings,
            CREDIT_ENGINE_ADMIN_TOKEN=ADMIN_TOKEN,
            VAPI_WEBHOOK_SECRET=WEBHOOK_SECRET,
            CREDIT_ENGINE_LOG_LEVEL="INFO",
            **self.env,
        )

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log_path = self.root / log_name
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                processes.cli(*args), env=self._process_env(), stdout=log, stderr=subprocess.STDOUT
            )
        process.log_path = log_path  # type: ignore[attr-defined]
        return process

    def start_web(self) -> None:
        self.web = self._spawn(["serve", "--port", str(self.web_port)], "web.log")

    def start_worker(self) -> None:
        self.worker = self._spawn(["worker"], "worker.log")

    async def kill_soon(self, component: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self.kill, component)

    async def restart_soon(self, component: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self.restart, component)

    def kill(self, component: str) -> None:
        if component == "web" and self.web is not None:
            sigkill_tree(self.web)
        elif component == "worker" and self.worker is not None:
            sigkill_tree(self.worker)
        elif component == "redis":
            self.redis.kill()
        elif component == "postgres":
            assert self.postgres.process is not None
            sigkill_tree(self.postgres.process)

    def restart(self, component: str) -> None:
        if component == "web":
            self.start_web()
        elif component == "worker":
            self.start_worker()
        elif component == "redis":
            self.redis.start()
        elif component == "postgres":
            self.postgres.start()

    def logs(self) -> str:
        return "".join(
            (self.root / name).read_text(errors="replace")
            for name in ("web.log", "worker.log")
            if (self.root / name).exists()
        )

    def stop(self) -> tuple[int | None, int | None]:
        codes = (stop(self.web) if self.web else None, stop(self.worker) if self.worker else None)
        self.postgres.stop()
        self.redis.stop()
        self._thread.shutdown()
        return codes
