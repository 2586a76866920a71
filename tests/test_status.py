"""`credit-engine status`: one org and the whole deployment, once and with --watch."""

import json
import re
import signal
import subprocess

from credit_engine.engine import processes
from credit_engine.engine.config import Settings
from credit_engine.engine.holds import CallEvent, check_call, reserve_call
from credit_engine.engine.restore import ensure_rebuilt
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from tests.conftest import delete_prefix
from tests.helpers import new_org
from tests.processes import service_env


def status(settings: Settings, *args: str) -> tuple[int, str]:
    done = subprocess.run(
        processes.cli("status", *args), env=service_env(settings), capture_output=True, text=True, timeout=60
    )
    return done.returncode, done.stdout + done.stderr


async def test_status_shows_an_orgs_money_and_live_calls_and_the_busiest_orgs(settings: Settings) -> None:
    rt = await Runtime.open(settings)  # Redis TIME, as the command reads it
    try:
        await ensure_rebuilt(rt)
        busy = await new_org(rt, 6_000, rate_pence_per_minute=60)
        quiet = await new_org(rt, 500)
        for call_id in ("call-a", "call-b"):
            assert (await reserve_call(rt, busy, call_id)).outcome == Outcome.ok
        await check_call(rt, busy, "call-a", CallEvent.start)

        code, output = status(settings, "--org", busy, "--json")
        assert code == 0, output
        shown = json.loads(output)
        assert (shown["balance_pence"], shown["debt_pence"]) == (6_000, 0)
        assert shown["held_pence"] > 0 and shown["available_pence"] == 6_000 - shown["held_pence"]
        assert [c["call_id"] for c in shown["calls"]] == ["call-a", "call-b"]
        assert shown["calls"][0]["started"] is not None and shown["calls"][1]["started"] is None
        # Two calls at 60p/min on 60.00 (a call burns from its reservation, to be safe): about 50 minutes.
        assert 2_900 <= shown["credit_runs_out_in_s"] <= 3_000

        code, output = status(settings, "--json")
        deployment = json.loads(output)
        assert code == 0 and deployment["live_calls"] == 2 and deployment["orgs_with_live_calls"] == 1
        assert [o["org_id"] for o in deployment["busiest"]] == [busy]
        assert deployment["worker_ok"] is False and "no worker" in deployment["worker"]

        code, output = status(settings, "--org", busy)
        assert code == 0 and "balance 60.00" in output and "call-a" in output
        assert re.search(r"credit runs out in (49m\d\ds|50m00s)", output), output  # whole seconds: either side of 50m
        code, output = status(settings, "--org", quiet)
        assert code == 0 and "live calls 0" in output
        code, output = status(settings, "--org", "org-nobody")
        assert code == 2 and "no org org-nobody" in output

        # --watch refreshes until interrupted, then exits cleanly.
        watching = subprocess.Popen(
            processes.cli("status", "--watch", "--interval", "0.2"),
            env=service_env(settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert watching.stdout is not None
            seen = ""
            while seen.count("2 live in 1 orgs") < 3:  # three whole refreshes, however slow the machine
                line = watching.stdout.readline()
                assert line, seen
                seen += line
            watching.send_signal(signal.SIGINT)  # one Ctrl-C is enough
            with watching.stdout:
                assert watching.wait(timeout=30) == 0, seen + watching.stdout.read()
        finally:  # a watch that did not stop must not outlive the test (nor its pipe)
            if watching.poll() is None:
                watching.kill()
                watching.wait()
    finally:
        await rt.close()
        assert settings.redis_url is not None
        await delete_prefix(settings.redis_url, settings.key_prefix)


async def test_a_reader_that_goes_away_stops_the_command_quietly(settings: Settings) -> None:
    """`credit-engine status | head -1`: the pipe closes before the command writes; it stops with
    141 (128 + SIGPIPE, as a shell tool) and no traceback."""
    rt = await Runtime.open(settings)
    try:
        await ensure_rebuilt(rt)
        await new_org(rt, 100)
    finally:
        await rt.close()
    command = subprocess.Popen(
        processes.cli("status", "--json"), env=service_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert command.stdout is not None and command.stderr is not None
    command.stdout.close()  # long before the command has connected and written anything
    with command.stderr:
        errors = command.stderr.read().decode()
    assert command.wait(60) == 128 + signal.SIGPIPE, errors
    assert "Traceback" not in errors and "BrokenPipe" not in errors, errors
