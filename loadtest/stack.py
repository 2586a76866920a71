"""A private credit-engine for load runs and benchmarks: embedded Redis and Postgres in a temporary
directory, migrations, `credit-engine serve` and `credit-engine worker` as processes. It never
touches the machine's own services or anyone else's data."""

import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx

from credit_engine.engine import processes
from credit_engine.engine.config import Settings
from credit_engine.engine.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, new_scratch_dir
from credit_engine.engine.migrate import upgrade_to_head

ready_timeout_s = 60.0


class Stack:
    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        extra_env: dict[str, str] | None = None,
        appendfsync: str = "everysec",
        with_worker: bool = True,
    ) -> None:
        self.data_dir = data_dir or new_scratch_dir("credit-engine-load-")
        self.owns_data_dir = data_dir is None  # a scratch folder of its own: removed on the way out
        self.extra_env = extra_env or {}
        self.with_worker = with_worker
        self.admin_token = secrets.token_urlsafe(24)
        self.webhook_secret = secrets.token_urlsafe(24)
        self.redis = EmbeddedRedis(self.data_dir / "redis", appendfsync=appendfsync)
        self.postgres = EmbeddedPostgres(self.data_dir / "postgres", user=Settings.from_env().pg_user)
        self.port = free_port()
        self.web: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "REDIS_URL": self.redis.url,
            "DATABASE_URL": self.postgres.url,
            "CREDIT_ENGINE_ADMIN_TOKEN": self.admin_token,
            "VAPI_WEBHOOK_SECRET": self.webhook_secret,
            "CREDIT_ENGINE_LOG_LEVEL": "WARNING",
            "CREDIT_ENGINE_PG_POOL_SIZE": "20",
            **self.extra_env,
        }

    def __enter__(self) -> "Stack":
        self.redis.start()
        self.postgres.start()
        upgrade_to_head(self.postgres.url)
        cli = processes.cli()
        with open(self.data_dir / "web.log", "ab") as log:
            self.web = subprocess.Popen([*cli, "serve", "--port", str(self.port)], env=self.env, stdout=log, stderr=log)
        if self.with_worker:
            with open(self.data_dir / "worker.log", "ab") as log:
                self.worker = subprocess.Popen([*cli, "worker"], env=self.env, stdout=log, stderr=log)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + ready_timeout_s
        wanted = 200 if self.with_worker else None
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"{self.url}/readyz", timeout=2).status_code
                if wanted is None or status == wanted:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the stack did not become ready; see {self.data_dir}/web.log and worker.log")

    def __exit__(self, *exc: object) -> None:
        for process in (self.web, self.worker):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
        self.postgres.stop()
        self.redis.stop()
        if self.owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}
