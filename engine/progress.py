"""A progress line on stderr for long operator runs (reconcile over many orgs, vapi connect over many numbers)."""

import sys
import time
from typing import TextIO

redraw_interval_s = 0.2  # on a terminal
log_interval_s = 5.0  # into a log file or pipe


class ProgressLine:
    def __init__(
        self, label: str, stream: TextIO | None = None, *, unit: str = "orgs", flagged: str = "drifted"
    ) -> None:
        self.label = label
        self.unit = unit
        self.flagged = flagged
        self.stream = stream if stream is not None else sys.stderr  # read now: a test may have replaced it
        self.started = time.monotonic()
        self.drawn_at = 0.0
        self.interactive = self.stream.isatty()

    def __call__(self, done: int, total: int, drifted: int = 0) -> None:
        now = time.monotonic()
        interval = redraw_interval_s if self.interactive else log_interval_s
        if done < total and now - self.drawn_at < interval:
            return
        self.drawn_at = now
        rate = done / max(now - self.started, 1e-6)
        percent = 100.0 * done / total if total else 100.0
        width = 30
        filled = int(width * done / total) if total else width
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"{self.label} [{bar}] {done}/{total} {self.unit} ({percent:.0f}%), {drifted} {self.flagged}, "
            f"{rate:.0f} {self.unit}/s"
        )
        if self.interactive:
            self.stream.write("\r" + line)
            if done >= total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
