"""Locust users for the seed's load scenarios and a realistic mixed profile.

Run through the runner (`credit-engine loadtest <scenario>`, loadtest/runner.py), which prepares
orgs and numbers, starts locust headless as a subprocess with CSV output, then checks Redis and
the Postgres ledger agree. The runner passes everything through LOADTEST_* environment variables.

Race scenarios: every user waits until all users have spawned, fires its one request at the same
instant, records the status it got (requests are named by status, so the CSV counts them), and
stops; the last one to finish ends the run.
"""

import json
import os
import random
import uuid
from typing import Any

import gevent.event
from locust import HttpUser, between, events, task
from locust.exception import StopUser

SCENARIO = os.environ.get("LOADTEST_SCENARIO", "mixed")
CONFIG: dict[str, Any] = json.loads(os.environ.get("LOADTEST_CONFIG", "{}"))
ADMIN = {"Authorization": f"Bearer {os.environ.get('LOADTEST_ADMIN_TOKEN', '')}"}
VAPI = {"X-Vapi-Secret": os.environ.get("LOADTEST_WEBHOOK_SECRET", ""), "Content-Type": "application/json"}

csv_flush_wait_s = 1.5  # locust writes its CSV files every second
go = gevent.event.Event()
finished: list[int] = []


@events.spawning_complete.add_listener  # type: ignore[untyped-decorator]  # locust's EventHook is unannotated
def release_everyone(user_count: int, **_: Any) -> None:
    go.set()


def vapi_message(message_type: str, call_id: str, number_id: str, **extra: Any) -> str:
    call = {
        "id": call_id,
        "orgId": "vapi-org",
        "type": "inboundPhoneCall",
        "phoneNumberId": number_id,
        "createdAt": "2026-11-24T12:00:00Z",
        "updatedAt": "2026-11-24T12:00:00Z",
    }
    return json.dumps({"message": {"type": message_type, "call": call, **extra}})


class RaceUser(HttpUser):
    """One request per user, all at once."""

    wait_time = between(0, 0)

    def on_start(self) -> None:
        self.index = CONFIG["next_index"] = CONFIG.get("next_index", -1) + 1

    @task
    def once(self) -> None:
        go.wait()
        kind = CONFIG["kinds"][self.index % len(CONFIG["kinds"])]
        if kind == "provision":
            headers = {"Authorization": f"Bearer {CONFIG['api_key']}", "Idempotency-Key": f"race-{uuid.uuid4()}"}
            with self.client.post(
                "/api/managed-telephony/provision", json={}, headers=headers, catch_response=True, name="provision"
            ) as response:
                self._record(response, "provision")
        else:
            call_id = CONFIG.get("call_id") or f"race-call-{self.index}"
            body = vapi_message("assistant-request", call_id, CONFIG["number_id"])
            with self.client.post(
                "/api/vapi/webhook", data=body, headers=VAPI, catch_response=True, name="assistant-request"
            ) as response:
                outcome = "held" if response.ok and "assistantId" in response.json() else "refused"
                self._record(response, f"assistant-request {outcome}")
        finished.append(self.index)
        if len(finished) >= self.environment.parsed_options.num_users:
            gevent.spawn_later(csv_flush_wait_s, self.environment.runner.quit)  # let the CSV writer flush
        raise StopUser()

    def _record(self, response: Any, name: str) -> None:
        # Every documented answer is a success here; the status goes into the name, so the CSV
        # says how many of each there were.
        response.request_meta["name"] = f"{name} [{response.status_code}]"
        if response.status_code >= 500:
            response.failure(f"server error {response.status_code}")
        else:
            response.success()


class CallerUser(HttpUser):
    """The mixed profile: an org's calls, from assistant-request to end-of-call-report, checked
    by the kill switch while they run; now and then a top-up or a phone number."""

    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        self.org = random.choice(CONFIG["orgs"])

    @task(6)
    def call(self) -> None:
        call_id = f"mix-{uuid.uuid4()}"
        number = self.org["number_id"]
        answer = self.client.post(
            "/api/vapi/webhook",
            data=vapi_message("assistant-request", call_id, number),
            headers=VAPI,
            name="assistant-request",
        )
        if "assistantId" not in answer.json():
            return
        self.client.post(
            "/api/vapi/webhook",
            data=vapi_message("status-update", call_id, number, status="in-progress"),
            headers=VAPI,
            name="status-update",
        )
        for _ in range(random.randint(1, 5)):
            self.client.post(
                "/api/vapi/webhook/status-check", json={"call_id": call_id}, headers=VAPI, name="status-check"
            )
        seconds = random.randint(5, 600)
        report = vapi_message(
            "end-of-call-report",
            call_id,
            number,
            endedReason="customer-ended-call",
            startedAt="2026-11-24T12:00:00Z",
            endedAt=f"2026-11-24T12:{seconds // 60:02d}:{seconds % 60:02d}Z",
            cost=0.12,
        )
        self.client.post("/api/vapi/webhook", data=report, headers=VAPI, name="end-of-call-report")

    @task(1)
    def topup(self) -> None:
        self.client.post(
            f"/api/admin/orgs/{self.org['org_id']}/topups",
            json={"amount_pence": random.randint(100, 5000)},
            headers=ADMIN | {"Idempotency-Key": str(uuid.uuid4())},
            name="topup",
        )

    @task(1)
    def provision(self) -> None:
        headers = {"Authorization": f"Bearer {self.org['api_key']}", "Idempotency-Key": str(uuid.uuid4())}
        with self.client.post(
            "/api/managed-telephony/provision", json={}, headers=headers, catch_response=True, name="provision"
        ) as response:
            if response.status_code in (201, 402):  # a refusal for lack of credit is a right answer
                response.success()

    @task(2)
    def wallet(self) -> None:
        self.client.get("/api/wallet", headers={"Authorization": f"Bearer {self.org['api_key']}"}, name="wallet")


if SCENARIO == "mixed":
    RaceUser.abstract = True
else:
    CallerUser.abstract = True
