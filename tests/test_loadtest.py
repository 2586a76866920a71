"""The load runner and the benchmark still run end to end (their figures are not asserted here:
performance is measured by `credit-engine bench`, not by timed tests)."""

import subprocess
from pathlib import Path

from credit_engine.engine import processes


def test_the_provision_race_passes_over_http_with_locust(tmp_path: Path) -> None:
    # Locust runs in its own process: it monkey-patches the interpreter with gevent.
    result = subprocess.run(
        processes.cli("loadtest", "provision-race", "--out", str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASS  100 concurrent provisions, balance for one" in result.stdout
    assert "[x] exactly 1 succeeded (201): 1" in result.stdout
    assert (tmp_path / "provision-race_stats.csv").exists()


def test_the_benchmark_runs_and_writes_its_report(tmp_path: Path) -> None:
    result = subprocess.run(
        processes.cli("bench", "--quick", "--only", "lua,reconcile", "--out", str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "benchmarks.md").read_text()
    assert "hold_check.lua" in report and "Reconciler" in report
    assert (tmp_path / "benchmarks.json").exists()
