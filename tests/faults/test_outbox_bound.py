"""The outbox bound: with no worker draining (Postgres or the worker away too long), an org's outbox
reaches CREDIT_ENGINE_OUTBOX_PER_ORG_MAX and new money decisions are refused rather than made
without a ledger entry (fail closed), with a metric and one clear log line; calls already running
keep their holds and are still billed."""

import logging
from dataclasses import replace

import pytest

from credit_engine.engine.config import Settings
from tests.webapp.conftest import Api, api  # noqa: F401 - fixture
from tests.webapp.test_seed_scenarios import ledger_kinds, wallet
from tests.webapp.vapi_payloads import assistant_request, call, end_of_call_report, status_update

pytestmark = pytest.mark.faults

BOUND = 6


@pytest.fixture
def app_settings(settings: Settings) -> Settings:
    from tests.webapp.conftest import ADMIN_TOKEN, WEBHOOK_SECRET

    return replace(settings, admin_token=ADMIN_TOKEN, vapi_webhook_secret=WEBHOOK_SECRET, outbox_per_org_max=BOUND)


async def test_at_the_bound_new_decisions_are_refused_running_calls_are_billed(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    org, key = await api.new_org(100_000)
    number = await api.register_number(org)
    running = call("call-running", phone_number_id=number, org_hint=org)
    admitted = await api.vapi(assistant_request(call("call-running", phone_number_id=number)))
    assert "assistantOverrides" in admitted.json()
    await api.vapi(status_update(running, "in-progress"))
    held_before = (await wallet(api, key))["held_pence"]
    # No worker runs here: every charge stays in the outbox until it reaches the bound.
    bought = 0
    while True:
        answer = await api.as_org(
            key,
            "POST",
            "/api/managed-telephony/provision",
            {"area_code": "415"},
            headers={"Idempotency-Key": f"buy-{bought}"},
        )
        if answer.status_code != 201:
            break
        bought += 1
        assert bought < BOUND
    assert (answer.status_code, answer.json()["error"]["code"]) == (503, "ledger_backlog")
    with caplog.at_level(logging.ERROR, logger="credit_engine.engine.outbox"):
        refused = await api.vapi(assistant_request(call("call-new", phone_number_id=number)))
        reserve = await api.as_org(key, "POST", "/api/calls/call-outbound/reserve")
    assert set(refused.json()) == {"error"} and refused.json()["error"]  # a spoken refusal, in Vapi's shape
    assert reserve.status_code == 503
    full_lines = [r for r in caplog.records if "outbox of org" in r.getMessage() and "is full" in r.getMessage()]
    assert len(full_lines) == 1  # one clear line, not one per refusal
    assert org in full_lines[0].getMessage()
    metrics = (await api.client.get("/metrics")).text
    assert 'credit_engine_decisions_total{operation="reserve",outcome="outbox_full"} 2.0' in metrics
    assert 'credit_engine_decisions_total{operation="provision",outcome="ledger_backlog"} 1.0' in metrics
    # The call that was running kept its hold, and its end is still billed above the bound.
    shown = await wallet(api, key)
    assert (shown["held_pence"], shown["live_calls"]) == (held_before, 1)
    await api.vapi(end_of_call_report(running, 90))
    shown = await wallet(api, key)
    assert (shown["held_pence"], shown["live_calls"]) == (0, 0)
    assert sorted(await ledger_kinds(api, org)) == sorted(
        [("topup", 100_000), *[("asset", -1000)] * bought, ("call_charge", -90)]
    )


async def test_at_the_bound_a_call_first_seen_live_is_still_recorded_and_billed(api: Api) -> None:
    """A call already running when first seen (outbound, a lost assistant-request) cannot be
    refused: at the bound it is recorded as an unfunded hold (above the bound, like a commit), so
    it holds a line, is ended by the kill switch and is billed by its report."""
    org, key = await api.new_org(100_000)
    number = await api.register_number(org)
    for bought in range(BOUND):
        answer = await api.as_org(
            key,
            "POST",
            "/api/managed-telephony/provision",
            {"area_code": "415"},
            headers={"Idempotency-Key": f"buy-{bought}"},
        )
        if answer.status_code != 201:
            break
    outbound = call("call-first-seen", phone_number_id=number, call_type="outboundPhoneCall")
    assert (await api.vapi(status_update(outbound, "in-progress"))).json() == {}
    held = await api.as_org(key, "GET", "/api/wallet/holds")
    (hold,) = held.json()["items"]
    assert (hold["call_id"], hold["hold_pence"], hold["max_duration_seconds"]) == ("call-first-seen", 0, 0)
    await api.vapi(end_of_call_report(outbound, 45))
    shown = await wallet(api, key)
    assert (shown["held_pence"], shown["live_calls"]) == (0, 0)
    assert ("call_charge", -45) in await ledger_kinds(api, org)
