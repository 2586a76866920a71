"""An org's alert URL over the admin API (internal addresses refused when saved, with
CREDIT_ENGINE_OUTBOUND_ALLOW_PRIVATE off) and its alerts over `GET /api/alerts` (what failed reads
as a coarse category: no port-scan oracle)."""

import socket
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from credit_engine.engine.alerts import deliver_due
from credit_engine.engine.config import Settings
from credit_engine.engine.outbound import Outbound
from credit_engine.engine.runtime import Runtime
from tests.alert_receivers import ANSWER, SILENT, add_alerts, receiver
from tests.webapp.conftest import ADMIN_TOKEN, WEBHOOK_SECRET, Api

INTERNAL_URLS = (
    "http://127.0.0.1:8080/hook",
    "http://localhost/hook",
    "http://LOCALHOST./hook",
    "http://api.localhost/hook",
    "http://10.1.2.3/hook",
    "http://192.168.0.10/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/hook",
    "http://0.0.0.0:8080/hook",
    "http://[::1]:8080/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[fe80::1]/hook",
    "http://[fd00::1]/hook",
    "http://127.1/hook",
    "http://2130706433/hook",
)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return replace(settings, alert_signing_key="k" * 40, alert_attempts_max=3, alert_backoff_base_ms=1)


@pytest.fixture
def app_settings(settings: Settings) -> Settings:
    assert not settings.outbound_allow_private  # the default
    return replace(settings, admin_token=ADMIN_TOKEN, vapi_webhook_secret=WEBHOOK_SECRET)


@pytest.fixture
async def outbound() -> AsyncIterator[Outbound]:
    out = Outbound(allow_private=True, connections_max=8)  # a development worker: loopback allowed
    yield out
    await out.aclose()


async def test_an_internal_alert_url_is_refused_when_saved_naming_the_field(api: Api) -> None:
    for n, url in enumerate(INTERNAL_URLS):
        body = {"org_id": f"o{n}", "name": "x", "rate_pence_per_minute": 1, "alert_webhook_url": url}
        created = await api.admin("POST", "/api/admin/orgs", body)
        assert created.status_code == 422, url
        assert created.json()["error"]["field"] == "alert_webhook_url", url
    org_id, _ = await api.new_org(alert_webhook_url="https://acme.test/alerts")  # does not resolve here: accepted
    for url in INTERNAL_URLS:
        changed = await api.admin("PATCH", f"/api/admin/orgs/{org_id}", {"alert_webhook_url": url})
        assert (changed.status_code, changed.json()["error"]["field"]) == (422, "alert_webhook_url"), url
    shown = await api.admin("GET", f"/api/admin/orgs/{org_id}")
    assert shown.json()["alert_webhook_url"] == "https://acme.test/alerts"
    public = await api.admin("PATCH", f"/api/admin/orgs/{org_id}", {"alert_webhook_url": "https://93.184.216.34/a"})
    assert public.status_code == 200


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_last_error_tells_no_closed_port_from_a_silent_one(api: Api, rt: Runtime, outbound: Outbound) -> None:
    async with receiver(SILENT) as silent, receiver(ANSWER, status=500) as failing:
        urls = {
            "closed": f"http://127.0.0.1:{closed_port()}/hook",
            "silent": silent.url(),
            "failing": failing.url(),
            "legacy": failing.url(),
        }
        orgs = {}
        for name, url in urls.items():
            org_id, key = await api.new_org()
            # Written straight into Postgres: the API refuses loopback with the allow setting off.
            await rt.pg.execute("UPDATE orgs SET alert_webhook_url = $2 WHERE org_id = $1", org_id, url)
            await add_alerts(rt, org_id, 1)
            orgs[name] = (org_id, key)
        # A row written before the coarse categories, as the old worker wrote it.
        await rt.pg.execute(
            "UPDATE alert_events SET status = 'failed', last_error = 'ConnectError' WHERE org_id = $1",
            orgs["legacy"][0],
        )
        report = await deliver_due(rt, outbound, total_s_max=1.0)
        assert report.retrying == 3

        seen = {}
        for name, (_, key) in orgs.items():
            [alert] = (await api.as_org(key, "GET", "/api/alerts")).json()["alerts"]
            seen[name] = (alert["status"], alert["attempts"], alert["last_error"])
        assert seen == {
            "closed": ("pending", 1, "no response"),
            "silent": ("pending", 1, "no response"),
            "failing": ("pending", 1, "HTTP 500"),
            "legacy": ("failed", 0, "no response"),
        }


async def test_a_refused_send_reads_as_refused_and_is_not_retried(api: Api, rt: Runtime) -> None:
    """The name resolved nowhere when saved (accepted), and to loopback when sent (refused, pinned)."""
    async with receiver(ANSWER) as server:
        org_id, key = await api.new_org(alert_webhook_url=server.url(host="alerts.example.test"))
        await add_alerts(rt, org_id, 1)

        async def resolver(host: str, port: int) -> list[str]:
            return ["127.0.0.1"]

        strict = Outbound(allow_private=False, connections_max=2, resolver=resolver)
        try:
            assert (await deliver_due(rt, strict, total_s_max=1.0)).refused == 1
            assert (await deliver_due(rt, strict, total_s_max=1.0)).failed == 0  # nothing left to try
        finally:
            await strict.aclose()
        [alert] = (await api.as_org(key, "GET", "/api/alerts")).json()["alerts"]
        assert (alert["status"], alert["attempts"], alert["last_error"]) == (
            "failed",
            1,
            "refused: address not allowed",
        )
        assert server.connections == 0
