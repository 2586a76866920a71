"""Provisioning when things go wrong in the middle: crashes, clients that never come back."""

from credit_engine.engine import idempotent_requests as claims
from credit_engine.engine.balances import read_wallet
from credit_engine.engine.provisioning import (
    OPERATION,
    Provided,
    ProvisionRequest,
    finish_abandoned_provisions,
    provision,
)
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
