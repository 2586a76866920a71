"""Found by an adversarial review (high): the kill switch's fallback that asks Vapi for a lost
control URL (`GET /call/{id}`, engine/killswitch_push._control_url_from_vapi) takes whatever call id the
org's hold names and never checks that the call Vapi returns is the org's. An org can hold any call
id (`POST /api/calls/{call_id}/reserve` takes any id; holds are per org, so another org's live call
id is accepted). When the org's own credit runs out, the kill switch warns and ends every live hold
of the org, finds no control URL for the borrowed id, asks Vapi, keeps the URL under the attacker's
org, and speaks into and hangs up the OTHER org's call. Before the lookup the only control URLs the
kill switch used came from the call's own messages, attributed to the org.

Fixed twice: the reserve API refuses (409 `call_taken`) a call id another org admitted, and the
lookup uses Vapi's record only if it says the call is the org's (its number's owner, else the org
it was admitted for). The second holds when the first cannot: the call index lost with Redis."""

import httpx

from tests.fake_vapi_api import FakeVapiApi
from tests.regressions.with_vapi_api import worker_rt  # noqa: F401 - a fixture
from tests.webapp.test_kill_switch import World


async def test_an_org_cannot_make_the_kill_switch_end_another_orgs_call(
    world: World, vapi_api: FakeVapiApi, http: httpx.AsyncClient
) -> None:
    _victim_org, _victim_key, victim_number = await world.org(100_000)
    victim_call = await world.start_call(victim_number, "victim-call")
    assert victim_call.monitor is not None and victim_call.monitor.control_url is not None
    vapi_api.add_call("victim-call", victim_call.monitor.control_url, phone_number_id=victim_number)

    _attacker, attacker_key, attacker_number = await world.org(200)
    await world.start_call(attacker_number, "attacker-own")  # burns the attacker's credit
    borrowed = await world.api.as_org(attacker_key, "POST", "/api/calls/victim-call/reserve")
    assert (borrowed.status_code, borrowed.json()["error"]["code"]) == (409, "call_taken"), borrowed.text
    # A call of the victim's the engine never indexed (its messages lost, or the index with Redis).
    unseen_url = world.fake.control_url("victim-unseen")
    vapi_api.add_call("victim-unseen", unseen_url, phone_number_id=victim_number)
    borrowed = await world.api.as_org(attacker_key, "POST", "/api/calls/victim-unseen/reserve")
    assert borrowed.status_code == 201, borrowed.text

    for seconds in range(10, 400, 10):  # past the attacker's depletion + grace
        world.at(seconds)
        await world.round()
    assert world.fake.control_bodies("attacker-own"), "the attacker's own call is ended"
    assert world.fake.control_bodies("victim-unseen") == [] and world.fake.control_bodies("victim-call") == [], (
        "another org's call was warned/ended through a control URL looked up at Vapi for a borrowed call id"
    )
