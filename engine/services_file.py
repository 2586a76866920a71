"""What a `credit-engine up` leaves in its data dir for the other commands: services.json (where
it listens) and secrets.env (the secrets it generated)."""

import json
import os
from pathlib import Path

from dotenv import dotenv_values

SERVICES_FILE = "services.json"
SECRETS_FILE = "secrets.env"


def read_secrets(data_dir: Path) -> dict[str, str]:
    """<data-dir>/secrets.env as a shell would read it (python-dotenv: quotes, comments, `export`),
    so an operator's edit means what it says; `${…}` in a secret is kept as written, never expanded;
    names without a value are left out."""
    path = data_dir / SECRETS_FILE
    if not path.exists():
        return {}
    return {name: value for name, value in dotenv_values(path, interpolate=False).items() if value}


def services_path(data_dir: Path) -> Path:
    return data_dir / SERVICES_FILE


def write_services(data_dir: Path, redis_url: str, database_url: str, api_url: str) -> None:
    services = {"pid": os.getpid(), "redis_url": redis_url, "database_url": database_url, "api": api_url}
    path = services_path(data_dir)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)  # the URLs may carry passwords
    path.write_text(json.dumps(services))


def read_services(data_dir: Path) -> dict[str, str] | None:
    """The running `up`'s servers, or None (no file, or its `up` is no longer running)."""
    path = services_path(data_dir)
    if not path.exists():
        return None
    services = json.loads(path.read_text())
    try:
        os.kill(int(services["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return None
    return services  # type: ignore[no-any-return]
