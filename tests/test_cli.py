"""The `credit-engine` command as an operator uses it."""

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from credit_engine.commands import build_parser, main
from credit_engine.engine import processes
from credit_engine.engine.config import Settings
from credit_engine.engine.embedded import free_port
from credit_engine.engine.runtime import Runtime
from tests.helpers import new_org

up_start_timeout_s = 60


def cli(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        processes.cli("--data-dir", str(data_dir), *args),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def clean_env() -> dict[str, str]:
    """No REDIS_URL / DATABASE_URL: `up` starts its embedded servers."""
    return {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}


def start_up(data_dir: Path, port: int) -> tuple[subprocess.Popen[str], list[str]]:
    process = subprocess.Popen(
        processes.cli("up", "--data-dir", str(data_dir), "--port", str(port)),  # as the README writes it
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + up_start_timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError("`up` exited early:\n" + "".join(lines))
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            return process, lines
    raise AssertionError("`up` did not come up:\n" + "".join(lines))


def wait_http(url: str, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return int(response.status)
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


def stop_up(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    return output


def test_up_runs_everything_and_a_restart_keeps_every_balance(pg_data_dir: Path) -> None:
    data_dir = pg_data_dir / "data"  # outside pytest's basetemp: run as root, Postgres' user must reach it
    port = free_port()
    process, banner = start_up(data_dir, port)
    try:
        text = "".join(banner)
        assert f"http://127.0.0.1:{port}" in text
        assert "credit-engine topup" in text  # it says how to top up an org
        assert wait_http(f"http://127.0.0.1:{port}/readyz") == 200
        created = cli(data_dir, "orgs", "create", "acme", "--name", "Acme Ltd", "--rate", "12")
        assert created.returncode == 0, created.stderr
        topup = cli(data_dir, "topup", "acme", "5000", "--idempotency-key", "first")
        assert topup.returncode == 0, topup.stderr
        assert json.loads(topup.stdout)["balance_pence"] == 5000
        replay = cli(data_dir, "topup", "acme", "5000", "--idempotency-key", "first")
        assert json.loads(replay.stdout)["outcome"] == "replayed"
        checked = cli(data_dir, "reconcile", "--check")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        # The admin API works out of the box with the token `up` generated (never printed).
        secrets_file = data_dir / "secrets.env"
        assert secrets_file.stat().st_mode & 0o777 == 0o600
        token = dict(line.split("=", 1) for line in secrets_file.read_text().splitlines())["CREDIT_ENGINE_ADMIN_TOKEN"]
        assert token not in text
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/admin/orgs/acme", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.loads(response.read())["wallet"]["balance_pence"] == 5000
        services = json.loads((data_dir / "services.json").read_text())
    finally:
        output = stop_up(process)
    assert "stopped; data kept in" in output
    assert not (data_dir / "services.json").exists()
    # Nothing is left running: the web app's and the embedded servers' ports are closed.
    for url in (services["redis_url"], services["database_url"], services["api"]):
        port_number = int(url.rsplit(":", 1)[1].split("/")[0])
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port_number)) != 0, f"{url} still listening"

    # Without `up`, the CLI says what is missing instead of guessing.
    orphan = cli(data_dir, "orgs", "show", "acme", env=clean_env())
    assert orphan.returncode != 0 and "no `credit-engine up` is running" in orphan.stderr

    process, _ = start_up(data_dir, port)
    try:
        shown = cli(data_dir, "orgs", "show", "acme")
        assert shown.returncode == 0, shown.stderr
        wallet = json.loads(shown.stdout)["wallet"]
        assert (wallet["balance_pence"], wallet["available_pence"]) == (5000, 5000)
    finally:
        stop_up(process)


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI in this process, pointed at the test's own servers, database and key prefix."""
    assert settings.redis_url is not None and settings.database_url is not None
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("CREDIT_ENGINE_KEY_PREFIX", settings.key_prefix)
    monkeypatch.setenv("CREDIT_ENGINE_REDIS_CLUSTER", "1" if settings.redis_cluster else "0")
    monkeypatch.setenv("CREDIT_ENGINE_ARQ_REDIS_URL", settings.arq_redis_url or "")


@pytest.mark.usefixtures("cli_env")
async def test_reconcile_exits_1_on_drift_and_repair_fixes_it(rt: Runtime, capsys: pytest.CaptureFixture[str]) -> None:
    org = await new_org(rt, 1000)
    assert await asyncio.to_thread(main, ["reconcile", "--check"]) == 0
    await rt.redis.hincrby(rt.keys.org(org).org, "balance_pence", 7)
    assert await asyncio.to_thread(main, ["reconcile", "--check"]) == 1
    assert f"DRIFT {org}" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["reconcile", "--repair"]) == 0
    assert f"repaired {org}" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["reconcile", "--check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["drifted"] == [] and report["orgs_checked"] == 1


@pytest.mark.usefixtures("cli_env")
async def test_cli_refuses_bad_input_with_a_clear_message(rt: Runtime, capsys: pytest.CaptureFixture[str]) -> None:
    assert await asyncio.to_thread(main, ["orgs", "create", "bad}id", "--rate", "10"]) == 2
    assert "org_id" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["orgs", "create", "ok-id", "--rate", "0"]) == 2
    assert "rate_pence_per_minute" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["topup", "missing-org", "100"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_clustered_worker_without_its_own_arq_redis_is_refused_with_the_setting_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """arq cannot run on a Redis Cluster; the worker says which setting is missing instead of crashing."""
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("CREDIT_ENGINE_REDIS_CLUSTER", "1")
    monkeypatch.delenv("CREDIT_ENGINE_ARQ_REDIS_URL", raising=False)
    assert main(["worker"]) == 2
    assert "CREDIT_ENGINE_ARQ_REDIS_URL" in capsys.readouterr().err
    monkeypatch.setenv("CREDIT_ENGINE_REDIS_CLUSTER", "maybe")
    assert main(["worker"]) == 2
    assert "CREDIT_ENGINE_REDIS_CLUSTER must be 1 or 0" in capsys.readouterr().err


@pytest.mark.usefixtures("cli_env")
async def test_orgs_create_and_update_set_the_vapi_profile(rt: Runtime, capsys: pytest.CaptureFixture[str]) -> None:
    from credit_engine.engine.orgs import get_org

    created = [
        "orgs",
        "create",
        "voice",
        "--rate",
        "60",
        "--forward-url",
        "https://93.184.216.34/vapi",
        "--refusal-busy",
        " All lines busy at Voice Co. ",
        "--refusal-no-credit",
        "Voice Co: no credit.",
    ]
    assert await asyncio.to_thread(main, created) == 0
    shown = json.loads(capsys.readouterr().out)["settings"]
    assert (shown["forward_url"], shown["refusal_busy"]) == (
        "https://93.184.216.34/vapi",
        "All lines busy at Voice Co.",
    )
    updated = [
        "orgs",
        "update",
        "voice",
        "--refusal-not-set-up",
        "Voice Co: closed.",
        "--refusal-try-later",
        "Voice Co: later.",
        "--unset",
        "refusal_busy",
        "--unset",
        "forward_url",
    ]
    assert await asyncio.to_thread(main, updated) == 0
    settings = (await get_org(rt, "voice")).settings
    assert (
        settings.refusal_no_credit,
        settings.refusal_busy,
        settings.refusal_not_set_up,
        settings.refusal_try_later,
        settings.forward_url,
    ) == ("Voice Co: no credit.", None, "Voice Co: closed.", "Voice Co: later.", None)
    capsys.readouterr()
    for args, field in (
        (["--refusal-busy", "   "], "refusal_busy"),
        (["--refusal-try-later", "x" * 501], "refusal_try_later"),
        (["--refusal-no-credit", "a\x07b"], "refusal_no_credit"),
        (["--forward-url", "http://127.0.0.1:8080/vapi"], "forward_url"),
        (["--forward-url", "https://93.184.216.34/", "--unset", "forward_url"], "forward_url"),
    ):
        assert await asyncio.to_thread(main, ["orgs", "update", "voice", *args]) == 2, args
        assert field in capsys.readouterr().err, args
    assert (await get_org(rt, "voice")).settings == settings  # nothing changed


def readme_commands() -> list[str]:
    """The first column of the README's commands table, without its backquotes."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = text.split("## Commands", 1)[1].split("\n\n", 2)[1]
    return [line.split("`")[1] for line in table.splitlines() if line.startswith("| `credit-engine")]


def test_every_option_the_readme_documents_is_accepted_where_it_is_written() -> None:
    """`credit-engine up --data-dir DIR` was documented and refused ("unrecognized arguments"): each
    `[--option]` of a row must be an option of that very command."""
    commands = readme_commands()
    assert len(commands) >= 12
    parser = build_parser()
    for usage in commands:
        words = [w for w in usage.split()[1:] if not w.startswith(("[", "--", "|"))]
        names = [w for w in words if w.islower() and w.isidentifier()]
        subparser = parser
        for name in names[0].split("|")[:1] + names[1:2]:
            choices = next(a for a in subparser._actions if isinstance(a, argparse._SubParsersAction)).choices
            if name not in choices:
                break
            subparser = choices[name]
        known = set(subparser._option_string_actions)
        for option in re.findall(r"--[a-z-]+", usage):
            assert option in known, (usage, option)


@pytest.mark.parametrize("argv", [["up", "--data-dir", "D"], ["--data-dir", "D", "up"], ["status", "--data-dir", "D"]])
def test_data_dir_may_come_before_or_after_the_command(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).data_dir == Path("D")


def test_data_dir_after_the_command_wins_and_without_it_the_default_stays() -> None:
    assert build_parser().parse_args(["--data-dir", "A", "up", "--data-dir", "B"]).data_dir == Path("B")
    assert build_parser().parse_args(["up"]).data_dir is None  # Settings' own default applies


def test_an_operator_edited_secrets_file_means_what_a_shell_would_read(tmp_path: Path) -> None:
    """secrets.env is read with python-dotenv: quotes, a trailing comment and `export` are the
    file's syntax, not part of the secret (a hand-rolled split once kept them in)."""
    from credit_engine.engine.up import local_secrets

    (tmp_path / "secrets.env").write_text(
        "# rotated 2026-11-29\n"
        'export CREDIT_ENGINE_ADMIN_TOKEN="admin-token-1"  # the new one\n'
        "VAPI_WEBHOOK_SECRET='webhook-secret-1'\n"
        "CREDIT_ENGINE_ALERT_SIGNING_KEY=\n"
    )
    generated = ("CREDIT_ENGINE_ADMIN_TOKEN", "VAPI_WEBHOOK_SECRET", "CREDIT_ENGINE_ALERT_SIGNING_KEY")
    with pytest.MonkeyPatch.context() as patch:
        for name in generated:
            patch.delenv(name, raising=False)
        read = local_secrets(tmp_path)
        assert local_secrets(tmp_path) == read  # written back, read again: the same secrets
    assert (read["CREDIT_ENGINE_ADMIN_TOKEN"], read["VAPI_WEBHOOK_SECRET"]) == ("admin-token-1", "webhook-secret-1")
    assert len(read["CREDIT_ENGINE_ALERT_SIGNING_KEY"]) >= 32  # empty in the file: generated and written back
    assert tmp_path.joinpath("secrets.env").stat().st_mode & 0o777 == 0o600
