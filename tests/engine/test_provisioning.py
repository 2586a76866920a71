"""Provisioning when things go wrong in the middle: crashes, clients that never come back."""

import pytest

from credit_engine.engine import idempotent_requests as claims
from credit_engine.engine import provisioning
from credit_engine.engine.balances import read_wallet
from credit_engine.engine.credits import top_up
from credit_engine.engine.errors import InvalidInput
from credit_engine.engine.provisioning import (
    OPERATION,
    Provided,
    ProvisionRequest,
    finish_abandoned_provisions,
    provision,
)
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.telephony import BoughtNumber, FakeTelephony, ProviderError
from tests.helpers import new_org


class FlakyProvider:
    """Fails the first purchase, succeeds afterwards."""

    name = "flaky"

    def __init__(self) -> None:
        self.calls = 0

    async def buy(self, *, area_code: str | None, idempotency_key: str) -> BoughtNumber:
        self.calls += 1
        if self.calls == 1:
            raise ProviderError("first attempt fails")
        return BoughtNumber(f"pn-{idempotency_key[-8:]}", "+14155550100", "active")


async def test_a_refunded_purchase_is_never_bought_afterwards(rt: Runtime) -> None:
    org = await new_org(rt, 5000)
    provider = FlakyProvider()
    first = await provision(rt, provider, org, "buy-1", ProvisionRequest(None, None), 1000)
    assert first.result is not None and first.result.outcome == Provided.provider_failed
    # A crash between the refund and recording the answer: the claim is still in progress.
    await rt.pg.execute(
        "UPDATE idempotent_requests SET state = 'in_progress', result = NULL, "
        "created_at = now() - interval '1 hour' WHERE org_id = $1",
        org,
    )
    again = await provision(rt, provider, org, "buy-1", ProvisionRequest(None, None), 1000)
    # Not a free number: the refund stands, the purchase stays failed.
    assert (again.claim, again.result) == (claims.Claim.new, first.result)
    assert provider.calls == 1
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.balance_pence == 5000


async def test_a_provision_whose_client_went_away_is_finished_by_the_worker(rt: Runtime) -> None:
    org = await new_org(rt, 5000)
    request = ProvisionRequest("212", None)
    # The client's request claimed the key and then its process died before charging.
    await claims.begin(rt, org, OPERATION, "gone", request.as_dict())
    await rt.pg.execute("UPDATE idempotent_requests SET created_at = now() - interval '1 hour' WHERE org_id = $1", org)
    assert await finish_abandoned_provisions(rt, FakeTelephony(), 1000) == 1
    replay = await provision(rt, FakeTelephony(), org, "gone", request, 1000)
    assert replay.claim == claims.Claim.replay and replay.result is not None
    assert replay.result.outcome == Provided.bought
    assert replay.result.phone_number is not None and replay.result.phone_number["number"].startswith("+1212")
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.balance_pence == 4000
    assert await finish_abandoned_provisions(rt, FakeTelephony(), 1000) == 0


async def test_a_purchase_failing_after_its_charge_is_finished_not_forgotten(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever a purchase raises once it may have charged (even a refusal of some input), its
    claim stays for the sweep: the org ends with its number or its money, never neither."""
    org = await new_org(rt, 5000)
    real = provisioning.number_for_provision_key

    async def refuses_once(*args: object, **kwargs: object) -> object:
        monkeypatch.setattr(provisioning, "number_for_provision_key", real)
        raise InvalidInput("key", "refused after the charge")

    monkeypatch.setattr(provisioning, "number_for_provision_key", refuses_once)
    with pytest.raises(InvalidInput):
        await provision(rt, FakeTelephony(), org, "late", ProvisionRequest("212", None), 1000)
    assert await rt.pg.fetchval("SELECT state FROM idempotent_requests WHERE org_id = $1", org) == "in_progress"
    assert await finish_abandoned_provisions(rt, FakeTelephony(), 1000) == 1  # let go: stale at once
    replay = await provision(rt, FakeTelephony(), org, "late", ProvisionRequest("212", None), 1000)
    assert replay.result is not None and replay.result.outcome == Provided.bought
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.balance_pence == 4000


async def test_a_top_up_whose_answer_could_not_be_kept_can_be_retried_at_once(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keeping the result fails (Postgres went away between the credit and the claim's update):
    the key is free again at once, and the retry replays the ledger's entry, credited once."""
    org = await new_org(rt, 0)
    real = claims.finish

    async def fails_once(*args: object, **kwargs: object) -> None:
        monkeypatch.setattr(claims, "finish", real)
        raise ConnectionError("postgres went away")

    monkeypatch.setattr(claims, "finish", fails_once)
    with pytest.raises(ConnectionError):
        await top_up(rt, org, "t-1", 700, meta={})
    again = await top_up(rt, org, "t-1", 700, meta={})
    assert again.claim == claims.Claim.new and again.result is not None
    assert again.result.outcome == Outcome.replayed
    replay = await top_up(rt, org, "t-1", 700, meta={})
    assert (replay.claim, replay.result) == (claims.Claim.replay, again.result)
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.balance_pence == 700
