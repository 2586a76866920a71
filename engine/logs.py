"""How every process of the engine logs: one set-up, called once by the CLI before a command runs.

Two formats: `text` for people (the default) and `json` for log shippers, one object per line with
the time, level, logger and message (and the traceback, when there is one). arq logs two INFO lines
for every job it runs and one for every health check it records, and the worker's crons run every
few seconds: those lines are logged at DEBUG, so that at the default level the log holds what an
operator must read (calls ended, alerts, drift, failures) and not a heartbeat."""

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# arq.worker's routine lines: a job started, finished, retried or aborted ("%6.2fs → …"), a health
# record written. Its start-up, shutdown and error lines stay as arq logs them.
ARQ_ROUTINE_PREFIXES = ("%6.2fs ", "recording health")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever sys.stderr is when a line is logged, not when the handler was made (as
    logging's own last-resort handler does): a caller that swaps sys.stderr for a while (a test's
    capture, then closed) must not leave every later line writing to a closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


class ArqRoutineAtDebug(logging.Filter):
    """Logs arq's routine lines at DEBUG: passed on only when DEBUG is wanted."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and str(record.msg).startswith(ARQ_ROUTINE_PREFIXES):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def configure_logging(level: str, log_format: str) -> None:
    """The process's root handler, once: a second call (the CLI's main() run again in one process)
    replaces it rather than adding a second one; a root that has handlers of someone else's (a test
    runner's) keeps them, as basicConfig does."""
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, StderrHandler)]
    for old in ours:
        root.removeHandler(old)
    if ours or not root.handlers:
        root.addHandler(handler)
        root.setLevel(level)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    arq_worker = logging.getLogger("arq.worker")
    if not any(isinstance(f, ArqRoutineAtDebug) for f in arq_worker.filters):
        arq_worker.addFilter(ArqRoutineAtDebug())
