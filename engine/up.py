"""`credit-engine up`: the whole system on one machine.

Starts an embedded Redis (AOF on) and Postgres when REDIS_URL / DATABASE_URL are not set, runs
the migrations, rebuilds Redis from Postgres if it lost its state, then runs the web app and the
worker as child processes and watches them. Ctrl-C (or SIGTERM) stops the children, then the
servers, cleanly. Data lives in --data-dir, so a restart keeps every balance.

While it runs, <data-dir>/services.json says where the servers listen; other `credit-engine`
commands read it when REDIS_URL / DATABASE_URL are not set, so `credit-engine topup ...` in a
second terminal just works.
"""

import asyncio
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from credit_engine.engine import processes
from credit_engine.engine.config import Settings
from credit_engine.engine.embedded import EmbeddedPostgres, EmbeddedRedis
from credit_engine.engine.migrate import upgrade_to_head
from credit_engine.engine.restore import ensure_rebuilt
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.services_file import SECRETS_FILE, read_secrets, services_path, write_services

log = logging.getLogger(__name__)

GENERATED_SECRETS = ("CREDIT_ENGINE_ADMIN_TOKEN", "VAPI_WEBHOOK_SECRET", "CREDIT_ENGINE_ALERT_SIGNING_KEY")
child_stop_timeout_s = 20.0
child_restarts_per_minute_max = 5


class Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.starts: list[float] = []

    def start(self) -> None:
        self.starts = [t for t in self.starts if time.monotonic() - t < 60] + [time.monotonic()]
        if len(self.starts) > child_restarts_per_minute_max:
            raise RuntimeError(f"{self.name} keeps crashing ({len(self.starts)} starts in a minute); stopping")
        self.process = subprocess.Popen(self.argv, env=self.env)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(child_stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def local_secrets(data_dir: Path) -> dict[str, str]:
    """The admin token and Vapi webhook secret for this machine: from the environment if set,
    else generated once into <data-dir>/secrets.env (mode 600). Never printed."""
    path = data_dir / SECRETS_FILE
    stored = read_secrets(data_dir)
    changed = False
    for name in GENERATED_SECRETS:
        if name not in stored:
            stored[name] = secrets.token_urlsafe(32)
            changed = True
    if changed:
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text("".join(f"{name}={value}\n" for name, value in stored.items()))
    return {name: os.environ.get(name) or stored[name] for name in GENERATED_SECRETS}


def run_up(settings: Settings, host: str, port: int) -> int:
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    redis_server = pg_server = None
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    children: list[Child] = []
    try:
        redis_url, database_url = settings.redis_url, settings.database_url
        if redis_url is None:
            appendfsync = settings.redis_appendfsync
            redis_server = EmbeddedRedis(data_dir / "redis", appendfsync=appendfsync)
            redis_url = redis_server.start()
        if database_url is None:
            pg_server = EmbeddedPostgres(data_dir / "postgres", user=settings.pg_user)
            database_url = pg_server.start()
        settings = replace(settings, redis_url=redis_url, database_url=database_url)
        upgrade_to_head(database_url)
        asyncio.run(_rebuild(settings))

        env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url, **local_secrets(data_dir)}
        cli = processes.cli()
        children = [
            Child("web", [*cli, "serve", "--host", host, "--port", str(port)], env),
            Child("worker", [*cli, "worker"], env),
        ]
        for child in children:
            child.start()
        write_services(data_dir, redis_url, database_url, f"http://{host}:{port}")
        _print_banner(host, port, redis_url, database_url, redis_server, pg_server, data_dir, settings)
        while not stopping:  # supervises until Ctrl-C or SIGTERM
            time.sleep(0.2)
            for child in children:
                if child.process is not None and child.process.poll() is not None and not stopping:
                    log.error("%s exited with %s; restarting it", child.name, child.process.returncode)
                    child.start()
        return 0
    finally:
        _stop_all(children, data_dir, pg_server, redis_server)


def _stop_all(
    children: list[Child], data_dir: Path, pg_server: EmbeddedPostgres | None, redis_server: EmbeddedRedis | None
) -> None:
    """The web app and the worker first, while the servers they use still run; then the embedded
    servers. Their data stays for the next `up`."""
    print("\nstopping credit-engine ...", file=sys.stderr)
    for child in children:
        child.stop()
    services_path(data_dir).unlink(missing_ok=True)
    if pg_server is not None:
        pg_server.stop()
    if redis_server is not None:
        redis_server.stop()
    print("stopped; data kept in", data_dir, file=sys.stderr)


async def _rebuild(settings: Settings) -> None:
    rt = await Runtime.open(settings)
    try:
        await ensure_rebuilt(rt)
    finally:
        await rt.close()


def redact(url: str) -> str:
    """A URL fit to print: any password replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _print_banner(
    host: str,
    port: int,
    redis_url: str,
    database_url: str,
    redis_server: EmbeddedRedis | None,
    pg_server: EmbeddedPostgres | None,
    data_dir: Path,
    settings: Settings,
) -> None:
    redis_note = f"embedded, AOF appendfsync {settings.redis_appendfsync}" if redis_server else "external"
    pg_note = "embedded" if pg_server else "external"
    metrics_port = settings.worker_metrics_port
    worker_metrics = (
        f"   (its metrics: http://{settings.worker_metrics_host}:{metrics_port}/metrics)" if metrics_port else ""
    )
    print(
        f"""
credit-engine is up
  web app    http://{host}:{port}   (GET /healthz, GET /readyz, GET /openapi.json)
  secrets    {data_dir / SECRETS_FILE}   (admin token, Vapi webhook secret; mode 600)
  worker     draining the outbox into the Postgres ledger{worker_metrics}
  Redis      {redact(redis_url)}   ({redis_note})
  Postgres   {redact(database_url)}   ({pg_note})
  data       {data_dir}

Try it from another terminal (the CLI finds these servers through {services_path(data_dir)}):
  credit-engine orgs create acme --name "Acme Ltd" --rate 12
  credit-engine topup acme 5000              # 5000 pence, Postgres-first, then Redis
  credit-engine orgs show acme               # balance, held, available, debt
  credit-engine reconcile --check            # Redis and Postgres agree?

Ctrl-C stops everything; balances are kept in {data_dir}.
""",
        flush=True,
    )
    if settings.public_url is None:
        print(
            "WARNING: CREDIT_ENGINE_PUBLIC_URL is not set: calls this engine admits do not name it as their server,\n"
            "         so an assistant with its own server URL takes their messages (and their billing) away.\n"
            '         Set it to the URL Vapi reaches this engine at (README, "Vapi\'s messages").',
            flush=True,
        )
