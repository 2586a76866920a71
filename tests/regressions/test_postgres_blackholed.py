"""Review 4: a Postgres that accepts connections and never answers (a blackholed network path, a
frozen host), as opposed to one that refuses them. A pool's `timeout=` bounds only the query, not
the wait for a connection, so every Postgres read waited asyncpg's 60-second connect timeout:
- an end-of-call report for a call Redis had no hold for outlasted Vapi's budget and was answered
  `{}` unbilled (the "Postgres away: bill from Redis" fallback never ran): a free call;
- /readyz and /metrics took 20 s and answered 504, so a load balancer's probe took every web
  process out at once, the very thing readiness was changed not to do;
- every org API request waited 20 s for its key lookup and answered 504.
Each read on a decision path is now bounded as a whole (engine/db.py `bounded`)."""

import socket
import time

import asyncpg

from tests.webapp.conftest import Api
from tests.webapp.test_seed_scenarios import wallet
from tests.webapp.vapi_payloads import call, end_of_call_report


async def test_a_report_for_a_call_with_no_hold_is_billed_from_redis_in_time(api: Api) -> None:
    org, key = await api.new_org(1000)
    number = await api.register_number(org)
    async with blackholed_postgres(api):
        started = time.monotonic()
        answer = await api.vapi(end_of_call_report(call("lost-request", phone_number_id=number), 120))
        took_s = time.monotonic() - started
    assert (answer.status_code, answer.json()) == (200, {})
    assert took_s < 5  # Vapi's budget is far longer; a bounded lookup, then billed from Redis
    assert (await wallet(api, key))["balance_pence"] == 1000 - 120


async def test_readiness_and_metrics_answer_at_once_and_name_postgres(api: Api) -> None:
    async with blackholed_postgres(api):
        started = time.monotonic()
        ready = await api.client.get("/readyz")
        metrics = await api.client.get("/metrics")
        took_s = time.monotonic() - started
    assert ready.status_code == 200 and "postgres" in ready.json()["degraded"]
    assert ready.json()["checks"]["postgres"].startswith("unreachable")
    assert metrics.status_code == 200 and "credit_engine_postgres_up 0.0" in metrics.text
    assert took_s < 4


async def test_the_org_api_answers_503_at_once_not_504_after_its_budget(api: Api) -> None:
    _, key = await api.new_org(1000)
    async with blackholed_postgres(api):
        started = time.monotonic()
        answer = await api.as_org(key, "GET", "/api/wallet")
        took_s = time.monotonic() - started
    assert (answer.status_code, answer.json()["error"]["code"]) == (503, "unavailable")
    assert took_s < 4


class blackholed_postgres:  # noqa: N801 - reads as what it is: `async with blackholed_postgres(api)`
    """The web app's Postgres pool swapped, for the block, for one whose server accepts and never speaks."""

    def __init__(self, api: Api) -> None:
        self.ctx = api.client._transport.app.state.ctx  # type: ignore[attr-defined]
        self.listener = socket.socket()

    async def __aenter__(self) -> None:
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)  # the kernel completes each handshake; nobody ever answers
        self.real = self.ctx.rt.pg
        port = self.listener.getsockname()[1]
        self.ctx.rt.pg = await asyncpg.create_pool(f"postgresql://x:y@127.0.0.1:{port}/db", min_size=0, max_size=2)

    async def __aexit__(self, *exc: object) -> None:
        silent, self.ctx.rt.pg = self.ctx.rt.pg, self.real
        silent.terminate()
        self.listener.close()
