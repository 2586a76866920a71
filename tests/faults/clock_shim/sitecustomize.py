"""Shifts this Python process's wall clock by CREDIT_ENGINE_TEST_CLOCK_SKEW_S seconds (only for
test_clocks.py, and only when libfaketime is not installed): time.time() and time.time_ns()."""

import os
import time

_skew_s = float(os.environ.get("CREDIT_ENGINE_TEST_CLOCK_SKEW_S", "0"))
if _skew_s:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + _skew_s  # type: ignore[assignment]
    time.time_ns = lambda: _time_ns() + int(_skew_s * 1e9)  # type: ignore[assignment]
