"""`python -m tests.worker.sigterm_at_startup worker`: the worker process (credit_engine.commands), except that
it sends itself SIGTERM exactly as it writes its first Redis command after on_startup's rebuild.

That is when the flaky test's stop landed about one run in seven: arq cancels main(), which is
inside on_startup, and on Python 3.11 redis-py's asyncio.wait_for around the write (it has a socket
timeout) returns the write's result instead of raising CancelledError (CPython gh-86296). A signal
already pending as the write starts is lost every time, so this reproduces it on every run.
"""

import os
import signal
import sys
from typing import Any

from redis.asyncio.connection import Connection

import credit_engine.worker.settings as worker_settings
from credit_engine.commands import main

_armed = False
_send_packed_command = Connection.send_packed_command
_ensure_rebuilt = worker_settings.ensure_rebuilt


async def send_packed_command(self: Connection, *args: Any, **kwargs: Any) -> None:
    global _armed
    if _armed:
        _armed = False
        print("sigterm_at_startup: SIGTERM sent", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    await _send_packed_command(self, *args, **kwargs)


async def ensure_rebuilt(*args: Any, **kwargs: Any) -> Any:
    global _armed
    report = await _ensure_rebuilt(*args, **kwargs)
    _armed = True
    return report


Connection.send_packed_command = send_packed_command  # type: ignore[method-assign]
worker_settings.ensure_rebuilt = ensure_rebuilt

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
