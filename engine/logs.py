"""How every process of the engine logs: one set-up, called once by the CLI before a command runs.

Two formats: `text` for people (the default) and `json` for log shippers, one object per line with
the time, level, logger and message (and the traceback, when there is one). arq logs two INFO lines
for every job it runs and one for every health check it records, and the worker's crons run every
few seconds: those lines are logged at DEBUG, so that at the default level the log holds what an
operator must read (calls ended, alerts, drift, failures) and not a heartbeat."""

import json
import logging
from datetime import UTC, datetime

LOG_FORMATS = ("text", "json")
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


class ArqRoutineAtDebug(logging.Filter):
    """Logs arq's routine lines at DEBUG: passed on only when DEBUG is wanted."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and str(record.msg).startswith(ARQ_ROUTINE_PREFIXES):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    arq_worker = logging.getLogger("arq.worker")
    if not any(isinstance(f, ArqRoutineAtDebug) for f in arq_worker.filters):
        arq_worker.addFilter(ArqRoutineAtDebug())
