"""Found by an adversarial review (minor): a first sight keeps the call's control URL before its reservation; when
the reservation takes no hold (the call was resolved before: a replayed in-progress), the URL stays
in the org's control hash. Only a kill-switch visit cleans that hash, and an org with no live call
is never visited: the URLs (capabilities to end or speak into calls) pile up for good."""

from tests.webapp import vapi_payloads as payloads
from tests.webapp.test_calls_at_the_edges import hang_up
from tests.webapp.test_kill_switch import World


async def test_a_replayed_in_progress_leaves_its_control_url_behind(
    world: World,
) -> None:
    org_id, _key, number = await world.org(10_000)
    calls = []
    for i in range(3):
        done = await world.start_call(number, f"done-{i}")
        await hang_up(world, done, 5)
        calls.append(done)
    world.at(3 * 3600)  # past the depletion moment the calls had filed: the org's last visit
    await world.round()
    assert await world.rt.redis.hlen(world.rt.keys.org(org_id).control) == 0  # visited and cleaned
    assert await world.scheduled_ms(org_id) is None  # nothing left to watch
    for done in calls:  # Vapi delivers each in-progress again, late
        assert (await world.api.vapi(payloads.status_update(done, "in-progress"))).json() == {}
    for minutes in (1, 60, 24 * 60):
        world.at(3 * 3600 + minutes * 60)
        await world.round()
    kept = await world.rt.redis.hgetall(world.rt.keys.org(org_id).control)
    assert kept == {}, "control URLs of calls that hold nothing are never dropped"
