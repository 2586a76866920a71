"""<data-dir>/services.json: where a running `credit-engine up` listens, for the other commands."""

import json
import os
from pathlib import Path

SERVICES_FILE = "services.json"


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
