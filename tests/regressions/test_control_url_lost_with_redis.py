"""Found by the model-based test (tests/webapp/test_model_based.py), on an org with no credit: an
outbound call first seen mid-flight is taken unfunded and must be ended at once; Redis is then lost
and rebuilt from Postgres, which restores the call's hold (so the kill switch still ends it) but
not its control URL, which only Redis kept. Every end-call attempt failed with "no control URL",
the call ran on, and the org spent past its credit plus grace (29 p against 27 p allowed).

Vapi knows every call's control URL (`GET /call/{id}`, `monitor.controlUrl`): a kill switch that
has none asks, keeps what Vapi says (if it is one of Vapi's URLs), and ends the call."""

import httpx

from credit_engine.engine.killswitch import run_round
from credit_engine.engine.killswitch_push import ControlUrls
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.restore import ensure_rebuilt
from credit_engine.engine.runtime import Runtime
from tests.conftest import delete_prefix
from tests.fake_vapi_api import FakeVapiApi
from tests.regressions.with_vapi_api import worker_rt  # noqa: F401 - a fixture
from tests.webapp import vapi_payloads as payloads
from tests.webapp.test_kill_switch import END, World


async def lose_redis(rt: Runtime) -> None:
    assert rt.settings.redis_url is not None
    await delete_prefix(rt.settings.redis_url, rt.settings.key_prefix)
    await ensure_rebuilt(rt)


async def test_a_call_whose_control_url_redis_lost_is_still_ended_through_vapis_record(
    world: World, vapi_api: FakeVapiApi, http: httpx.AsyncClient
) -> None:
    org_id, key, number = await world.org(30)  # 30 s of one call at 60 p a minute
    the_call = await world.start_call(number, "call-lost-url")
    control_url = the_call.monitor.control_url if the_call.monitor else None
    assert control_url is not None
    vapi_api.add_call("call-lost-url", control_url, phone_number_id=number)
    await drain_org_fully(world.rt, org_id)  # the hold is in Postgres; the control URL only in Redis
    await lose_redis(world.rt)
    assert await world.rt.redis.hget(world.rt.keys.org(org_id).control, "call-lost-url") is None
    world.at(36)  # 30 s of credit + 5 s of grace, and a second
    report = await run_round(world.rt, http, ControlUrls(world.rt))
    assert report.ended == 1
    assert world.fake.control_bodies("call-lost-url") == [END]
    assert [s.path for s in vapi_api.seen if s.method == "GET"] == ["/call/call-lost-url"]
    # Kept for the call's next push: Vapi is asked once.
    assert await world.rt.redis.hget(world.rt.keys.org(org_id).control, "call-lost-url") == control_url
    assert (await world.api.vapi(payloads.end_of_call_report(the_call, 36))).json() == {}
    wallet = (await world.api.as_org(key, "GET", "/api/wallet")).json()
    assert 30 - wallet["balance_pence"] + wallet["debt_pence"] == 36  # ended within credit + grace


async def test_a_control_url_vapi_names_off_its_own_hosts_is_not_used(
    world: World, vapi_api: FakeVapiApi, http: httpx.AsyncClient
) -> None:
    """Vapi's answer is checked by the same rule as a webhook's: the token goes to Vapi's hosts only."""
    org_id, _key, number = await world.org(30)
    await world.start_call(number, "call-odd-url")
    vapi_api.add_call("call-odd-url", "https://attacker.example.com/call-odd-url/control", phone_number_id=number)
    await drain_org_fully(world.rt, org_id)
    await lose_redis(world.rt)
    world.at(36)
    report = await run_round(world.rt, http, ControlUrls(world.rt))
    assert (report.ended, report.failed_attempts) == (0, 1)
    assert world.fake.received == []
