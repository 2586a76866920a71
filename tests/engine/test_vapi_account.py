"""Connecting a Vapi account (issue 13, point 5): `credit-engine vapi import|connect|check` against a
fake of Vapi's REST API on a loopback port that checks every request against the SDK's request
types (tests/fake_vapi_api.py), with real Redis and Postgres; the commands run through
`credit_engine.commands.main` as an operator runs them (exit codes, output), in a thread so that the fake keeps
answering in the test's loop."""

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from credit_engine.commands import main
from credit_engine.engine import limits
from credit_engine.engine.call_server import WEBHOOK_PATH, remember_workflow, workflows_answered
from credit_engine.engine.config import Settings
from credit_engine.engine.embedded import free_port
from credit_engine.engine.phone_numbers import register_number, registered_numbers
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.vapi_account import AccountNumber, VapiAccount, VapiError, next_page_bound
from tests.fake_vapi_api import API_KEY, T0, FakeVapiApi, iso
from tests.helpers import engine_served, new_org
from tests.processes import service_env
from tests.webapp.conftest import ADMIN_TOKEN, WEBHOOK_SECRET, Api, api  # noqa: F401  (the `api` fixture)
from tests.webapp.vapi_payloads import assistant_request, call

PLATFORM_SERVER = "https://platform.example.com/vapi/hook"


@pytest.fixture
def engine_port() -> int:
    return free_port()


@pytest.fixture
def app_settings(settings: Settings, vapi_api: FakeVapiApi, engine_port: int) -> Settings:
    return replace(
        settings,
        admin_token=ADMIN_TOKEN,
        vapi_webhook_secret=WEBHOOK_SECRET,
        vapi_api_key=API_KEY,
        vapi_base_url=vapi_api.base_url,
        public_url=f"http://127.0.0.1:{engine_port}",
    )


@pytest.fixture
def operator_env(app_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The operator's environment, for `main` (Settings.from_env)."""
    assert app_settings.public_url is not None
    env = service_env(
        app_settings,
        VAPI_API_KEY=API_KEY,
        VAPI_BASE_URL=app_settings.vapi_base_url,
        VAPI_WEBHOOK_SECRET=WEBHOOK_SECRET,
        CREDIT_ENGINE_PUBLIC_URL=app_settings.public_url,
        CREDIT_ENGINE_VAPI_CREDENTIAL_ID="",
        CREDIT_ENGINE_DEFAULT_ASSISTANT_ID="",
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield env


async def vapi_cli(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str) -> tuple[int, str, str]:
    """`credit-engine vapi ARGS`: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["--data-dir", str(data_dir), "vapi", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert API_KEY not in out + err and WEBHOOK_SECRET not in out + err  # no secret is ever printed
    return code, out, err


async def registry(rt: Runtime) -> dict[str, tuple[str, str | None]]:
    return {known.vapi_phone_number_id: (known.org_id, known.assistant_id) for known in await registered_numbers(rt)}


async def test_import_lists_without_changing_anything_then_registers_each_number_with_its_assistant(
    rt: Runtime, vapi_api: FakeVapiApi, operator_env: dict[str, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    org_a, org_b = await new_org(rt), await new_org(rt)
    first = vapi_api.add_number(assistantId="asst-1")["id"]
    second = vapi_api.add_number(assistantId="asst-2", server={"url": PLATFORM_SERVER})["id"]
    squad = vapi_api.add_number(squadId="squad-1")["id"]
    workflow = vapi_api.add_number(workflowId="workflow-1")["id"]
    bare = vapi_api.add_number()["id"]
    theirs = vapi_api.add_number(assistantId="asst-9")["id"]
    await register_number(rt, org_b, theirs, number="+15550009999", assistant_id="asst-8", provider="vapi")

    code, out, _ = await vapi_cli(capsys, tmp_path, "import", "--json")
    assert code == 0
    listed = {line["id"]: line for line in json.loads(out)["numbers"]}
    assert {number_id: line["outcome"] for number_id, line in listed.items()} == {
        first: "unregistered",
        second: "unregistered",
        theirs: "already_registered",
        squad: "not_importable",
        workflow: "not_importable",
        bare: "not_importable",
    }
    assert listed[first]["attached"] == "assistant asst-1" and listed[squad]["attached"] == "squad squad-1"
    assert listed[theirs]["org_id"] == org_b
    assert await registry(rt) == {theirs: (org_b, "asst-8")}  # nothing changed
    code, out, _ = await vapi_cli(capsys, tmp_path, "import")
    assert code == 0 and "Nothing was changed" in out and "the engine answers assistants only" in out

    code, out, _ = await vapi_cli(capsys, tmp_path, "import", "--org", org_a, "--json")
    assert code == 1  # the squad, the workflow and the bare number could not be registered
    report = json.loads(out)
    assert report["counts"] == {"registered": 2, "unregistered": 0, "already_registered": 1, "not_importable": 3}
    expected = {first: (org_a, "asst-1"), second: (org_a, "asst-2"), theirs: (org_b, "asst-8")}
    assert await registry(rt) == expected  # the assistants attached at Vapi; another org's number left alone
    code, out, _ = await vapi_cli(capsys, tmp_path, "import", "--org", org_a, "--json")
    assert code == 1 and json.loads(out)["counts"]["registered"] == 0  # a second run registers nothing
    assert await registry(rt) == expected
    for unknown in ("org-nobody", "org{hash-tag}"):
        code, _, err = await vapi_cli(capsys, tmp_path, "import", "--org", unknown)
        assert code == 2 and "org" in err
    code, _, err = await vapi_cli(capsys, tmp_path, "connect", "--org", "org-nobody")
    assert code == 2 and "org-nobody" in err
    assert vapi_api.seen_where("PATCH") == []  # import never changes anything at Vapi
    assert vapi_api.invalid == []


@pytest.mark.parametrize("order", ["DESC", "ASC"])
async def test_the_listing_pages_through_a_large_account_in_either_order_without_losing_ties(
    vapi_api: FakeVapiApi, order: str
) -> None:
    vapi_api.list_order = order
    # Pairs share a createdAt, so page boundaries fall inside ties.
    ids = {vapi_api.add_number(created_at=T0 + timedelta(seconds=i // 2))["id"] for i in range(9)}
    pages: list[tuple[int, int]] = []
    async with VapiAccount(API_KEY, vapi_api.base_url) as account:
        listed = await account.list_numbers(page_size=3, on_page=lambda page, count: pages.append((page, count)))
        assert sorted(number.id for number in listed) == sorted(ids)  # each once
        assert pages[-1] == (len(pages), 9) and len(pages) >= 4
        with pytest.raises(VapiError, match="more than 6 numbers"):  # the bound: an error, never a short list
            await account.list_numbers(page_size=3, pages_max=2)
    queries = [seen.body for seen in vapi_api.seen_where("GET", "/phone-number")]
    assert queries[0] == {"limit": "3"}
    assert set(queries[1]) == {"limit", "createdAtLe" if order == "DESC" else "createdAtGe"}
    assert vapi_api.invalid == []  # only the SDK's query parameters, well formed

    def numbers(*seconds: int) -> list[AccountNumber]:
        return [
            AccountNumber(
                f"pn-{i}", "vapi", None, None, None, None, None, None, None, None, iso(T0 + timedelta(seconds=s))
            )
            for i, s in enumerate(seconds)
        ]

    with pytest.raises(VapiError, match="cannot page past them"):
        next_page_bound(numbers(5, 5, 5))  # a whole page created at one instant
    with pytest.raises(VapiError, match="not ordered by createdAt"):
        next_page_bound(numbers(1, 3, 2))


async def test_connect_makes_every_registered_number_bare_with_the_engine_as_server_and_a_second_run_sends_nothing(
    api: Api,
    rt: Runtime,
    vapi_api: FakeVapiApi,
    operator_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    org, _ = await api.new_org(5_000)
    kept = vapi_api.add_number(assistantId="asst-1", server={"url": PLATFORM_SERVER, "timeoutSeconds": 15})["id"]
    plain = vapi_api.add_number(assistantId="asst-2")["id"]
    assert (await vapi_cli(capsys, tmp_path, "import", "--org", org))[0] == 0

    code, out, _ = await vapi_cli(capsys, tmp_path, "connect", "--dry-run", "--json")
    assert code == 0
    assert [line["outcome"] for line in json.loads(out)["numbers"]] == ["would_connect"] * 2
    assert vapi_api.seen_where("PATCH") == []  # a dry run changes nothing

    code, out, _ = await vapi_cli(capsys, tmp_path, "connect", "--json")
    assert code == 0, out
    assert json.loads(out)["counts"]["connected"] == 2
    engine = {"url": api.settings.public_url + WEBHOOK_PATH, "headers": {"X-Vapi-Secret": WEBHOOK_SECRET}}
    bodies = {seen.path: seen.body for seen in vapi_api.seen_where("PATCH")}
    assert bodies == {
        f"/phone-number/{kept}": {"provider": "vapi", "assistantId": None, "server": {"timeoutSeconds": 15, **engine}},
        f"/phone-number/{plain}": {"provider": "vapi", "assistantId": None, "server": engine},
    }  # only what had to change; the platform's timeout kept
    for number_id in (kept, plain):
        assert "assistantId" not in vapi_api.numbers[number_id]  # bare: its calls send assistant-requests
        assert vapi_api.numbers[number_id]["server"]["url"] == engine["url"]
    assert await registry(rt) == {kept: (org, "asst-1"), plain: (org, "asst-2")}

    code, out, _ = await vapi_cli(capsys, tmp_path, "connect")
    assert code == 0 and "2 already connected" in out
    assert len(vapi_api.seen_where("PATCH")) == 2  # the second run sent nothing

    # Vapi now asks the engine, which answers with the assistant imported from the number.
    answer = (await api.vapi(assistant_request(call("c-1", phone_number_id=kept)))).json()
    assert answer["assistantId"] == "asst-1"
    assert answer["assistantOverrides"]["server"]["url"] == engine["url"]
    assert vapi_api.invalid == []


async def test_connect_records_the_assistant_before_making_a_number_bare_and_goes_on_past_a_failing_number(
    rt: Runtime,
    vapi_api: FakeVapiApi,
    operator_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    org = await new_org(rt)
    fine = vapi_api.add_number(assistantId="asst-1")["id"]
    adopted = vapi_api.add_number(assistantId="asst-7")["id"]  # registered without an assistant
    failing = vapi_api.add_number(assistantId="asst-3")["id"]
    differs = vapi_api.add_number(assistantId="asst-5")["id"]  # the engine was told asst-4
    squad = vapi_api.add_number(squadId="squad-1")["id"]
    registered = {
        fine: "asst-1",
        adopted: None,
        failing: "asst-3",
        differs: "asst-4",
        squad: "asst-6",
        "pn-gone": "asst-0",
    }
    for number_id, assistant_id in registered.items():
        await register_number(rt, org, number_id, number=None, assistant_id=assistant_id, provider="vapi")
    vapi_api.failing[f"PATCH /phone-number/{adopted}"] = 503
    vapi_api.failing[f"PATCH /phone-number/{failing}"] = 500

    monkeypatch.delenv("CREDIT_ENGINE_PUBLIC_URL")
    code, _, err = await vapi_cli(capsys, tmp_path, "connect")
    assert code == 2 and "CREDIT_ENGINE_PUBLIC_URL is not set" in err
    assert vapi_api.seen_where("PATCH") == []
    monkeypatch.setenv("CREDIT_ENGINE_PUBLIC_URL", operator_env["CREDIT_ENGINE_PUBLIC_URL"])

    code, out, _ = await vapi_cli(capsys, tmp_path, "connect", "--json")
    assert code == 1
    lines = {line["id"]: line for line in json.loads(out)["numbers"]}
    assert {number_id: line["outcome"] for number_id, line in lines.items()} == {
        fine: "connected",
        adopted: "failed",
        failing: "failed",
        differs: "failed",
        squad: "failed",
        "pn-gone": "failed",
    }
    assert "Vapi answered 500" in lines[failing]["detail"] and failing in lines[failing]["detail"]
    assert "Vapi answered 503" in lines[adopted]["detail"]
    assert "asst-5" in lines[differs]["detail"] and "asst-4" in lines[differs]["detail"]
    assert "squad squad-1" in lines[squad]["detail"] and "not on the Vapi account" in lines["pn-gone"]["detail"]
    # The assistant attached at Vapi was recorded before the PATCH that would detach it (which failed).
    assert (await registry(rt))[adopted] == (org, "asst-7")
    assert vapi_api.numbers[differs]["assistantId"] == "asst-5" and vapi_api.numbers[squad]["squadId"] == "squad-1"
    assert len(vapi_api.seen_where("PATCH", f"/phone-number/{failing}")) == 3  # 5xx: tried again, then given up

    vapi_api.failing.clear()  # Vapi is back: a second run finishes what it can
    code, out, err = await vapi_cli(capsys, tmp_path, "connect")
    assert code == 1 and "2 connected, 1 already connected, 3 failed" in out
    assert "assistantId" not in vapi_api.numbers[adopted] and "assistantId" not in vapi_api.numbers[failing]

    monkeypatch.setenv("VAPI_API_KEY", "not-the-key")
    code, _, err = await vapi_cli(capsys, tmp_path, "connect")
    assert code == 1 and "Vapi answered 401 (VAPI_API_KEY is not accepted)" in err and "not-the-key" not in err
    monkeypatch.delenv("VAPI_API_KEY")
    code, _, err = await vapi_cli(capsys, tmp_path, "check")
    assert code == 2 and "VAPI_API_KEY is not set" in err
    assert vapi_api.invalid == []


async def test_check_ticks_a_connected_account_and_crosses_each_thing_that_breaks_it(
    rt: Runtime,
    app_settings: Settings,
    engine_port: int,
    vapi_api: FakeVapiApi,
    operator_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CREDIT_ENGINE_VAPI_CREDENTIAL_ID", "cred-1")
    vapi_api.add_credential("cred-1", {"type": "bearer", "token": WEBHOOK_SECRET})
    for assistant_id in ("asst-1", "asst-2"):
        vapi_api.add_assistant(assistant_id)
    org = await new_org(rt)
    first = vapi_api.add_number(assistantId="asst-1")["id"]
    second = vapi_api.add_number(assistantId="asst-2")["id"]
    assert (await vapi_cli(capsys, tmp_path, "import", "--org", org))[0] == 0
    assert (await vapi_cli(capsys, tmp_path, "connect"))[0] == 0
    assert vapi_api.numbers[first]["server"] == {
        "url": app_settings.public_url + WEBHOOK_PATH,
        "credentialId": "cred-1",
    }
    vapi_api.add_number(assistantId="asst-s")  # bought at Vapi after the import

    async with engine_served(app_settings, engine_port):
        code, out, _ = await vapi_cli(capsys, tmp_path, "check", "--json")
        assert code == 0, out
        checks = {check["name"]: check for check in json.loads(out)["checks"]}
        assert all(check["ok"] for check in checks.values())
        assert checks["public url"]["warning"] and "loopback" in checks["public url"]["detail"]
        assert "a bearer token on Authorization" in checks["credential"]["detail"]
        assert checks["unregistered numbers"]["warning"]
        number_checks = [check for name, check in checks.items() if first in name or second in name]
        assert len(number_checks) == 2 and all("bare, its server is the engine" in c["detail"] for c in number_checks)
        code, out, _ = await vapi_cli(capsys, tmp_path, "check")
        assert code == 0 and "✓" in out and "✗" not in out

    # Broken four ways: an assistant re-attached at Vapi, a server pointing elsewhere, the
    # credential deleted, and the public URL no longer answering (the engine stopped).
    vapi_api.numbers[first]["assistantId"] = "asst-1"
    vapi_api.numbers[second]["server"] = {"url": PLATFORM_SERVER + "?token=platform-token", "credentialId": "cred-1"}
    del vapi_api.credentials["cred-1"]
    code, out, _ = await vapi_cli(capsys, tmp_path, "check", "--json")
    assert code == 1
    checks = {check["name"]: check for check in json.loads(out)["checks"]}
    crossed = {name: check["detail"] for name, check in checks.items() if not check["ok"]}
    assert "not reachable from here" in crossed["public url"]
    assert "cred-1" in crossed["credential"] and "404" in crossed["credential"]
    (first_detail,) = [detail for name, detail in crossed.items() if first in name]
    assert "assistant asst-1 is attached at Vapi" in first_detail
    (second_detail,) = [detail for name, detail in crossed.items() if second in name]
    assert f"its server is {PLATFORM_SERVER}, not the engine" in second_detail
    assert "platform-token" not in out  # a server URL's query may carry a token
    assert checks["vapi account"]["ok"]
    assert vapi_api.invalid == []


def test_a_credential_the_engine_cannot_read_is_crossed() -> None:
    from credit_engine.engine.vapi_check import credential_problems

    assert credential_problems({"provider": "webhook", "authenticationPlan": {"type": "bearer", "token": "t"}})[0] == []
    assert (
        credential_problems(
            {
                "provider": "webhook",
                "authenticationPlan": {
                    "type": "bearer",
                    "token": "t",
                    "headerName": "X-Vapi-Secret",
                    "bearerPrefixEnabled": False,
                },
            }
        )[0]
        == []
    )
    assert (
        credential_problems(
            {"provider": "webhook", "authenticationPlan": {"type": "hmac", "secretKey": "k", "algorithm": "sha256"}}
        )[0]
        == []
    )
    wrong: list[dict[str, Any]] = [
        {"provider": "openai"},
        {"provider": "webhook", "authenticationPlan": {"type": "bearer", "token": "t", "headerName": "X-Api-Key"}},
        {"provider": "webhook", "authenticationPlan": {"type": "hmac", "secretKey": "k", "algorithm": "sha512"}},
        {
            "provider": "webhook",
            "authenticationPlan": {
                "type": "hmac",
                "secretKey": "k",
                "algorithm": "sha256",
                "signatureEncoding": "base64",
            },
        },
        {
            "provider": "webhook",
            "authenticationPlan": {"type": "oauth2", "url": "u", "clientId": "c", "clientSecret": "s"},
        },
    ]
    for credential in wrong:
        assert credential_problems(credential)[0], credential


async def test_check_crosses_each_workflow_a_platform_answered_with_whose_calls_would_escape_the_engine(
    rt: Runtime,
    app_settings: Settings,
    vapi_api: FakeVapiApi,
    operator_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A workflow's overrides carry only variables at Vapi, so the engine cannot make itself the
    server of its calls: the workflows platforms answered with are checked where they live."""
    monkeypatch.setenv("CREDIT_ENGINE_VAPI_CREDENTIAL_ID", "cred-1")
    vapi_api.add_credential("cred-1", {"type": "bearer", "token": WEBHOOK_SECRET})
    engine = {"url": app_settings.public_url + WEBHOOK_PATH, "credentialId": "cred-1"}
    vapi_api.add_workflow("wf-engine", server=engine)
    vapi_api.add_workflow("wf-no-server")
    vapi_api.add_workflow("wf-platform", server={"url": PLATFORM_SERVER, "credentialId": "cred-1"})
    vapi_api.add_workflow("wf-no-control", server=engine, control_enabled=False)
    vapi_api.add_workflow("wf-never-answered", server={"url": PLATFORM_SERVER})  # no call used it: not checked
    for at_ms, workflow_id in enumerate(("wf-engine", "wf-no-server", "wf-platform", "wf-no-control", "wf-gone")):
        await remember_workflow(rt, workflow_id, at_ms)
    code, out, _ = await vapi_cli(capsys, tmp_path, "check", "--json")
    assert code == 1
    checks = {check["name"]: check for check in json.loads(out)["checks"] if check["name"].startswith("workflow")}
    assert set(checks) == {
        f"workflow {w}" for w in ("wf-engine", "wf-no-server", "wf-platform", "wf-no-control", "wf-gone")
    }
    assert checks["workflow wf-engine"]["ok"] and "its server is the engine" in checks["workflow wf-engine"]["detail"]
    assert checks["workflow wf-no-server"]["ok"] and "no server of its own" in checks["workflow wf-no-server"]["detail"]
    assert not checks["workflow wf-platform"]["ok"]
    assert f"its server is {PLATFORM_SERVER}, not the engine" in checks["workflow wf-platform"]["detail"]
    assert not checks["workflow wf-no-control"]["ok"] and "kill switch" in checks["workflow wf-no-control"]["detail"]
    assert not checks["workflow wf-gone"]["ok"] and "404" in checks["workflow wf-gone"]["detail"]
    assert vapi_api.invalid == []


async def test_the_workflows_remembered_are_the_newest_and_bounded(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "vapi_workflows_remembered_max", 3)
    for at_ms, workflow_id in enumerate(("wf-1", "wf-2", "wf-3", "wf-4", "wf-2")):
        await remember_workflow(rt, workflow_id, 10 + at_ms)
    assert await workflows_answered(rt, 10) == ["wf-2", "wf-4", "wf-3"]
    assert await workflows_answered(rt, 2) == ["wf-2", "wf-4"]
