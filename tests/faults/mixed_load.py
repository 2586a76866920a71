"""A steady mixed load over HTTP that behaves like its real senders under failure, and remembers
exactly what was accepted, so a test can demand that the ledger says the same.

Each operation is retried, with the same idempotency key or call id, until it gets a definitive
answer: an admin or org client retries on a dropped connection, a 5xx or a 409 (still running);
Vapi's side re-sends an end-of-call report until the call reads as billed (Vapi may deliver any
message more than once, and a report acknowledged while Redis was away was not billed). Nothing
is ever counted as accepted on a guess.
"""

import asyncio
import random
import secrets
import time
from dataclasses import dataclass, field

import httpx

from credit_engine.engine.amounts import billed_seconds_from_ms, call_cost_pence
from tests.faults.deployment import ADMIN_TOKEN, WEBHOOK_SECRET
from tests.webapp.vapi_payloads import assistant_request, call, end_of_call_report, status_update

# Every org API key any load has been given, for the test that greps the logs for secrets.
ISSUED_API_KEYS: list[str] = []
RATE_PENCE_PER_MINUTE = 60
SEED_BALANCE_PENCE = 10_000_000
give_up_after_s = 90.0
retry_pause_s = 0.1


class GaveUp(AssertionError):
    pass


@dataclass
class OrgUnderLoad:
    org_id: str
    api_key: str
    number_id: str
    topups_pence: dict[str, int] = field(default_factory=dict)  # Idempotency-Key -> amount
    provisions: set[str] = field(default_factory=set)  # Idempotency-Keys answered 201
    refused_provisions: int = 0
    calls_pence: dict[str, int] = field(default_factory=dict)  # admitted call id -> its cost
    refused_calls: set[str] = field(default_factory=set)

    def expected_balance_pence(self, phone_number_pence: int) -> int:
        return (
            SEED_BALANCE_PENCE
            + sum(self.topups_pence.values())
            - phone_number_pence * len(self.provisions)
            - sum(self.calls_pence.values())
        )


class MixedLoad:
    def __init__(self, base_url: str, seed: int) -> None:
        self.client = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(10.0, connect=2.0))
        self.rng = random.Random(seed)
        self.seed = seed
        self.orgs: list[OrgUnderLoad] = []
        self.retries = 0

    async def close(self) -> None:
        await self.client.aclose()

    async def _until_definitive(self, send, done) -> httpx.Response:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + give_up_after_s
        while time.monotonic() < deadline:
            try:
                response = await send()
                if done(response):
                    return response
            except httpx.TransportError:
                pass
            self.retries += 1
            await asyncio.sleep(retry_pause_s)
        raise GaveUp("no definitive answer within the deadline")

    async def admin(self, method: str, path: str, json: object = None, key: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        if key:
            headers["Idempotency-Key"] = key
        return await self._until_definitive(
            lambda: self.client.request(method, path, json=json, headers=headers),
            lambda r: r.status_code < 500 and r.status_code != 409,
        )

    async def make_orgs(self, count: int) -> None:
        for _ in range(count):
            org_id = f"org-{self.seed}-{secrets.token_hex(3)}"
            created = await self.admin(
                "POST",
                "/api/admin/orgs",
                {"org_id": org_id, "name": "Fault Org", "rate_pence_per_minute": RATE_PENCE_PER_MINUTE},
            )
            assert created.status_code in (201, 409), created.text  # 409: the first attempt made it
            key_response = await self.admin("POST", f"/api/admin/orgs/{org_id}/api-keys")
            assert key_response.status_code == 201, key_response.text
            topped = await self.admin(
                "POST", f"/api/admin/orgs/{org_id}/topups", {"amount_pence": SEED_BALANCE_PENCE}, key=f"seed-{org_id}"
            )
            assert topped.status_code == 201, topped.text
            number_id = f"pn-{org_id}"
            registered = await self.admin(
                "POST",
                "/api/admin/phone-numbers",
                {
                    "vapi_phone_number_id": number_id,
                    "org_id": org_id,
                    "number": "+15550001111",
                    "assistant_id": "asst-1",
                },
            )
            assert registered.status_code in (201, 409), registered.text
            self.orgs.append(OrgUnderLoad(org_id, key_response.json()["api_key"], number_id))
            ISSUED_API_KEYS.append(key_response.json()["api_key"])

    async def topup(self, org: OrgUnderLoad, n: int) -> None:
        key = f"topup-{n}"
        amount = self.rng.randint(1, 5_000)
        response = await self.admin("POST", f"/api/admin/orgs/{org.org_id}/topups", {"amount_pence": amount}, key=key)
        assert response.status_code == 201, response.text
        org.topups_pence[key] = amount

    async def provision(self, org: OrgUnderLoad, n: int) -> None:
        key = f"prov-{n}"
        headers = {"Authorization": f"Bearer {org.api_key}", "Idempotency-Key": key}
        response = await self._until_definitive(
            lambda: self.client.post("/api/managed-telephony/provision", json={"area_code": "415"}, headers=headers),
            lambda r: r.status_code < 500 and r.status_code != 409,
        )
        if response.status_code == 201:
            org.provisions.add(key)
        else:
            assert response.status_code == 402, response.text
            org.refused_provisions += 1

    async def _vapi(self, body: bytes) -> httpx.Response:
        headers = {"X-Vapi-Secret": WEBHOOK_SECRET, "Content-Type": "application/json"}
        response = await self._until_definitive(
            lambda: self.client.post("/api/vapi/webhook", content=body, headers=headers), lambda r: True
        )
        assert response.status_code == 200, response.text  # Vapi always gets a 200
        return response

    async def call(self, org: OrgUnderLoad, n: int) -> None:
        call_id = f"call-{self.seed}-{n}"
        the_call = call(call_id, phone_number_id=org.number_id)
        answer = (await self._vapi(assistant_request(the_call))).json()
        admitted = "assistantId" in answer or "assistant" in answer
        seconds = self.rng.randint(1, 900) if admitted else 0
        if admitted:
            the_call = call(call_id, phone_number_id=org.number_id, org_hint=org.org_id)
            await self._vapi(status_update(the_call, "in-progress"))
            await asyncio.sleep(self.rng.uniform(0, 0.3))  # live while the faults happen
        await self._vapi(status_update(the_call, "ended", ended_reason="customer-ended-call"))
        report = end_of_call_report(the_call, seconds, cost_usd=0.01)
        headers = {"Authorization": f"Bearer {org.api_key}"}
        deadline = time.monotonic() + give_up_after_s
        while True:  # Vapi's redelivery: until the call reads as billed (or, refused, as never live)
            await self._vapi(report)
            try:
                shown = await self.client.get(f"/api/calls/{call_id}", headers=headers)
                if shown.status_code == 404 and not admitted:
                    break
                if shown.status_code == 200 and shown.json()["status"] != "live":
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise GaveUp(f"call {call_id} never read as billed")
            self.retries += 1
            await asyncio.sleep(retry_pause_s)
        if admitted:
            org.calls_pence[call_id] = call_cost_pence(billed_seconds_from_ms(seconds * 1000), RATE_PENCE_PER_MINUTE)
        else:
            org.refused_calls.add(call_id)

    async def user(self, index: int, stop: asyncio.Event) -> int:
        """One sender: operations one after another until told to stop. Returns how many it made."""
        n = 0
        while not stop.is_set():
            org = self.rng.choice(self.orgs)
            roll = self.rng.random()
            op_id = f"{index}-{n}"
            if roll < 0.25:
                await self.topup(org, op_id)  # type: ignore[arg-type]
            elif roll < 0.40:
                await self.provision(org, op_id)  # type: ignore[arg-type]
            else:
                await self.call(org, op_id)  # type: ignore[arg-type]
            n += 1
        return n
