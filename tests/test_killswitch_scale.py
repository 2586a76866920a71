"""The kill switch's scale benchmark still runs end to end (its figures are not asserted here: it
is a benchmark, not a timed test; docs/killswitch-scale.md holds a full run)."""

import subprocess
from pathlib import Path

from credit_engine.engine import processes


def test_the_kill_switch_benchmark_runs_in_quick_mode_and_writes_its_report(tmp_path: Path) -> None:
    result = subprocess.run(
        processes.module(
            "credit_engine.loadtest.killswitch_scale", "--quick", "--scenarios", "slow", "--out", str(tmp_path)
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "killswitch-scale.md").read_text()
    assert "python -m credit_engine.loadtest.killswitch_scale --quick --scenarios slow" in report
    assert "| slow | 100 (20) |" in report
    assert "slow: 0 calls never ended" in report
