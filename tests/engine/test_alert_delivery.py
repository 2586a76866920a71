"""Alert delivery (engine/alerts.py) against real HTTP servers on loopback that stall, trickle or
stream without end, and real Postgres: a round ends within one delivery deadline whatever the
endpoints do, other orgs' alerts are not held up, bytes read are bounded, the caps hold."""

import asyncio
import time
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from credit_engine.engine import alerts
from credit_engine.engine.alerts import deliver_due, deliveries_in_flight_max, deliveries_per_org_in_flight_max
from credit_engine.engine.config import Settings
from credit_engine.engine.errors import InvalidInput
from credit_engine.engine.orgs import update_org
from credit_engine.engine.outbound import Outbound
from credit_engine.engine.runtime import Runtime
from tests.alert_receivers import ANSWER, ENDLESS, SILENT, TRICKLE, add_alerts, alert_rows, receiver
from tests.helpers import new_org

DEADLINE_S = 1.5
ROUND_SLACK_S = 1.5  # Postgres writes and a loaded 2-core machine


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return replace(
        settings, alert_signing_key="k" * 40, alert_attempts_max=2, alert_backoff_base_ms=1, outbound_allow_private=True
    )


@pytest.fixture
async def outbound() -> AsyncIterator[Outbound]:
    out = Outbound(allow_private=True, connections_max=deliveries_in_flight_max)
    yield out
    await out.aclose()


async def timed_round(rt: Runtime, outbound: Outbound) -> tuple[alerts.DeliveryReport, float]:
    started = time.monotonic()
    async with asyncio.timeout(DEADLINE_S + ROUND_SLACK_S):  # the old, per-read timeout never ends here
        report = await deliver_due(rt, outbound, total_s_max=DEADLINE_S)
    return report, time.monotonic() - started


async def test_stalled_trickling_and_endless_endpoints_hold_up_no_other_org(rt: Runtime, outbound: Outbound) -> None:
    async with (
        receiver(SILENT) as silent,
        receiver(TRICKLE) as trickle,
        receiver(ENDLESS) as endless,
        receiver(ANSWER, hold_s=0.05) as good,
    ):
        servers = {"silent": silent, "trickle": trickle, "endless": endless}
        bad = {name: await new_org(rt, alert_webhook_url=server.url()) for name, server in servers.items()}
        good_orgs = [await new_org(rt, alert_webhook_url=good.url(f"/org{n}")) for n in range(3)]
        for org_id in bad.values():
            await add_alerts(rt, org_id, deliveries_per_org_in_flight_max)
        good_ids = {alert_id for org_id in good_orgs for alert_id in await add_alerts(rt, org_id, 3)}

        tracemalloc.start()
        started = time.monotonic()
        try:
            report, elapsed_s = await timed_round(rt, outbound)
            peak_bytes = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

        assert elapsed_s < DEADLINE_S + ROUND_SLACK_S
        # Every good org's alert arrived at once, not after a bad endpoint's deadline.
        assert {r.alert_id for r in good.requests} == good_ids
        assert max(r.at for r in good.requests) - started < DEADLINE_S / 2
        for org_id in good_orgs:
            assert {status for _, status, _, _ in await alert_rows(rt, org_id)} == {"delivered"}
        # The endless body: its 200 counts; the rest is never read (what the server got off its hands
        # sits in the kernel's buffers until the connection is dropped), and the connection is dropped.
        assert {status for _, status, _, _ in await alert_rows(rt, bad["endless"])} == {"delivered"}
        assert peak_bytes < 8 * 1024 * 1024
        await asyncio.sleep(0.2)
        assert endless.closed_by_client == deliveries_per_org_in_flight_max
        assert (report.delivered, report.retrying, report.failed) == (9 + 4, 8, 0)

        # The stalled ones are retried, with a coarse error, then given up.
        for name in ("silent", "trickle"):
            assert [(s, a, e) for _, s, a, e in await alert_rows(rt, bad[name])] == [("pending", 1, "no response")] * 4
        await asyncio.sleep(0.01)  # past the 1 ms backoff
        report, elapsed_s = await timed_round(rt, outbound)
        assert elapsed_s < DEADLINE_S + ROUND_SLACK_S
        assert (report.delivered, report.failed) == (0, 8)
        for name, server in (("silent", silent), ("trickle", trickle)):
            assert [(s, a, e) for _, s, a, e in await alert_rows(rt, bad[name])] == [("failed", 2, "no response")] * 4
            assert len(server.requests) == 8
    assert len(good.requests) == 9  # nothing sent twice


async def test_a_round_sends_at_most_the_per_org_cap_to_one_endpoint_and_the_global_cap_in_all(
    rt: Runtime, outbound: Outbound
) -> None:
    async with receiver(ANSWER, hold_s=0.4) as server:
        busy = await new_org(rt, alert_webhook_url=server.url("/busy"))
        others = [await new_org(rt, alert_webhook_url=server.url(f"/org{n}")) for n in range(9)]
        expected = set(await add_alerts(rt, busy, 10))
        for org_id in others:
            expected |= set(await add_alerts(rt, org_id, 4))
        assert len(expected) == 46 > deliveries_in_flight_max

        first, elapsed_s = await timed_round(rt, outbound)
        assert first.delivered == deliveries_in_flight_max
        assert elapsed_s < 0.4 + ROUND_SLACK_S  # all at once: one hold, not 32
        assert server.in_flight_all_max == deliveries_in_flight_max
        for _ in range(5):
            if (await timed_round(rt, outbound))[0].delivered == 0:
                break
        assert sorted(r.alert_id for r in server.requests) == sorted(expected)  # each once
        assert server.in_flight_max["/busy"] == deliveries_per_org_in_flight_max
        assert max(server.in_flight_max.values()) == deliveries_per_org_in_flight_max


async def test_a_claim_of_a_worker_that_died_is_sent_after_its_lease(rt: Runtime, outbound: Outbound) -> None:
    async with receiver(ANSWER) as server:
        org_id = await new_org(rt, alert_webhook_url=server.url())
        [alert_id] = await add_alerts(rt, org_id, 1)
        claimed = await rt.pg.fetch(alerts.CLAIM_SQL, 32, 4, alerts.claim_lease_s)  # a worker claims, then dies
        assert [r["org_id"] for r in claimed] == [org_id]
        assert (await deliver_due(rt, outbound, total_s_max=DEADLINE_S)).delivered == 0  # leased: not sent twice
        lease_passes = "UPDATE alert_events SET next_attempt_at = next_attempt_at - make_interval(secs => $1)"
        await rt.pg.execute(lease_passes, alerts.claim_lease_s)
        assert (await deliver_due(rt, outbound, total_s_max=DEADLINE_S)).delivered == 1
        assert [r.alert_id for r in server.requests] == [alert_id]
        assert await alert_rows(rt, org_id) == [(alert_id, "delivered", 2, None)]


async def test_an_internal_url_in_postgres_is_refused_at_send_failed_at_once_and_never_connected(
    rt: Runtime, settings: Settings
) -> None:
    """The URL was saved while internal addresses were allowed (or written straight into Postgres);
    the worker now refuses them. Also a name that resolves to loopback only when it is sent."""
    async with receiver(ANSWER) as server:
        names = {"alerts.example.test": ["127.0.0.1"], "rebound.example.test": ["203.0.114.7", "127.0.0.1"]}

        async def resolver(host: str, port: int) -> list[str]:
            return names[host]

        hosts = ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "alerts.example.test", "rebound.example.test")
        urls = [server.url(host=host) for host in hosts]
        orgs = [await new_org(rt, alert_webhook_url=url) for url in urls]  # saved while allowed
        for org_id in orgs:
            await add_alerts(rt, org_id, 1)
        strict = Outbound(allow_private=False, connections_max=4, resolver=resolver)
        try:
            report = await deliver_due(rt, strict, total_s_max=DEADLINE_S)
        finally:
            await strict.aclose()
        assert server.connections == 0
        assert (report.refused, report.failed, report.retrying, report.delivered) == (5, 5, 0, 0)
        for org_id in orgs:
            refused = [(s, a, e) for _, s, a, e in await alert_rows(rt, org_id)]
            assert refused == [("failed", 1, "refused: address not allowed")]


async def test_saving_an_internal_url_through_the_engine_is_refused_naming_the_field(rt: Runtime) -> None:
    """What the admin API and the CLI both call (engine/orgs.py)."""
    rt_strict = replace(rt, settings=replace(rt.settings, outbound_allow_private=False))
    org_id = await new_org(rt_strict, alert_webhook_url="https://acme.test/alerts")  # does not resolve here: accepted
    internal = (
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/hook",
        "http://[::ffff:10.0.0.1]/hook",
        "http://0x7f000001/hook",
    )
    for url in internal:
        with pytest.raises(InvalidInput) as refused:
            await update_org(rt_strict, org_id, {"alert_webhook_url": url})
        assert refused.value.field == "alert_webhook_url"
    allowed = await update_org(rt, org_id, {"alert_webhook_url": "http://127.0.0.1:8080/hook"})  # the allow setting on
    assert allowed.settings.alert_webhook_url == "http://127.0.0.1:8080/hook"
