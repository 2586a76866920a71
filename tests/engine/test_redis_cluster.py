"""The engine on a real 3-master Redis Cluster (loopback ports, Redis 7 when the machine has it).

The whole money suite also runs against a cluster (CREDIT_ENGINE_TEST_REDIS_CLUSTER=1, in
.ci/run); this file holds what only a cluster can show: every script's keys in one slot, orgs on
every master drained and reconciled, and a master that restarts empty noticed and rebuilt.
"""

import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest
import redis as sync_redis
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import RedisCluster
from redis.crc import key_slot

from credit_engine.engine.assets import deduct_asset
from credit_engine.engine.balances import read_wallet
from credit_engine.engine.config import Settings
from credit_engine.engine.holds import commit_call, live_holds, reserve_call
from credit_engine.engine.keys import HINT_SHARD_TAGS, ORG_ID_PATTERN, Keyspace, hint_shard
from credit_engine.engine.killswitch import due_orgs, file_depletion, reschedule_live_orgs
from credit_engine.engine.reconciler import check
from credit_engine.engine.restore import ensure_rebuilt, state_present
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.scripts import load_scripts
from credit_engine.loadtest.redis_cluster import EmbeddedRedisCluster
from credit_engine.worker.drainer import Drainer
from tests.conftest import delete_prefix
from tests.helpers import new_org

SCRIPTS = load_scripts()
LABEL_KEY = re.compile(r"(<prefix>\S+)$")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedisCluster]:
    server = EmbeddedRedisCluster(tmp_path_factory.mktemp("cluster"), masters=3, appendfsync=None)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def cluster_rt(cluster: EmbeddedRedisCluster, settings: Settings) -> AsyncIterator[Runtime]:
    runtime = await Runtime.open(replace(settings, redis_url=cluster.url, redis_cluster=True))
    await ensure_rebuilt(runtime)
    yield runtime
    await runtime.close()
    await delete_prefix(cluster.url, settings.key_prefix)


def node_of(rt: Runtime, key: str) -> str:
    assert isinstance(rt.redis, RedisCluster)
    return str(rt.redis.get_node_from_key(key).name)


async def orgs_on_every_master(rt: Runtime, per_master: int) -> dict[str, list[str]]:
    """Create orgs until each master serves `per_master` of them (org ids are random)."""
    by_node: dict[str, list[str]] = {node.name: [] for node in rt.redis.get_primaries()}  # type: ignore[attr-defined]
    while min(len(orgs) for orgs in by_node.values()) < per_master:
        org = await new_org(rt, 10_000)
        by_node[node_of(rt, rt.keys.org(org).org)].append(org)
    return by_node


@given(
    org_id=st.from_regex(ORG_ID_PATTERN, fullmatch=True), prefix=st.from_regex(r"[A-Za-z0-9_.-]{1,32}", fullmatch=True)
)
def test_every_scripts_declared_keys_hash_to_one_slot(org_id: str, prefix: str) -> None:
    """Each header's key patterns, filled in as engine/keys.py fills them, are keys of the org's
    keyspace, and all of one script's keys share a slot, whatever the org id and prefix."""
    org_keys = Keyspace(prefix).org(org_id)
    for script in SCRIPTS.values():
        keys = []
        for label in script.key_names:
            pattern = LABEL_KEY.search(label)
            assert pattern is not None, (script.name, label)
            keys.append(
                pattern.group(1).replace("<prefix>", prefix).replace("<org_id>", org_id).replace("<token>", "t0")
            )
        assert set(keys) <= {*org_keys.all(), org_keys.restore_staging("t0")}, (script.name, keys)
        assert len({key_slot(key.encode()) for key in keys}) == 1, (script.name, keys)
        script.check_call(keys, [0] * script.argv_count)


def test_hint_shards_spread_evenly_over_the_slot_space() -> None:
    keys = Keyspace("any")
    for i, shard_keys in enumerate(zip(keys.outbox_dirty_shards, keys.kill_schedule_shards, strict=True)):
        assert {key_slot(key.encode()) for key in shard_keys} == {1024 * i + 512}
    assert len({hint_shard(f"org-{n}") for n in range(1_000)}) == len(HINT_SHARD_TAGS)


async def test_the_hint_shards_live_on_every_master(cluster_rt: Runtime) -> None:
    masters = {node.name for node in cluster_rt.redis.get_primaries()}  # type: ignore[attr-defined]
    assert {node_of(cluster_rt, key) for key in cluster_rt.keys.outbox_dirty_shards} == masters
    assert {node_of(cluster_rt, key) for key in cluster_rt.keys.kill_schedule_shards} == masters


async def test_the_kill_switch_visits_due_orgs_of_every_shard_soonest_first(cluster_rt: Runtime) -> None:
    rt = cluster_rt
    orgs = [f"org-due-{n}" for n in range(40)]
    now_ms = await rt.clock.now_ms(rt.redis)
    for n, org in enumerate(orgs):
        await file_depletion(rt, org, now_ms - 1_000 * (n + 1))
    assert len({node_of(rt, rt.keys.kill_schedule(org)) for org in orgs}) == 3
    assert await due_orgs(rt) == list(reversed(orgs))


def test_a_script_call_with_two_orgs_keys_is_refused_before_redis() -> None:
    keys = Keyspace("t")
    script = SCRIPTS["org_peek"]
    with pytest.raises(AssertionError):
        script.check_call([keys.org("a").org, keys.org("b").holds, keys.org("a").outbox], [])


async def test_the_cluster_has_three_masters_serving_every_slot(cluster_rt: Runtime) -> None:
    redis = cluster_rt.redis
    assert isinstance(redis, RedisCluster)
    assert len(redis.get_primaries()) == 3
    info = await redis.cluster_info(target_nodes=RedisCluster.RANDOM)
    assert info["cluster_state"] == "ok" and int(info["cluster_slots_ok"]) == 16_384


async def test_orgs_on_every_master_are_billed_drained_and_reconciled(cluster_rt: Runtime) -> None:
    rt = cluster_rt
    by_node = await orgs_on_every_master(rt, 3)
    orgs = [org for node_orgs in by_node.values() for org in node_orgs]
    for org in orgs:
        assert (await deduct_asset(rt, org, "number-1", 1_000)).outcome == Outcome.ok
        assert (await reserve_call(rt, org, "call-1")).outcome == Outcome.ok
        assert (await commit_call(rt, org, "call-1", 90)).outcome == Outcome.ok  # 90 s at 60p/min: 90p
        assert (await reserve_call(rt, org, "call-2")).outcome == Outcome.ok  # stays live
    # The doorbell's shards are spread over the masters. Lose them all (as if each master had
    # restarted) and the sweep, which asks every org's own stream, still finds every outbox.
    await rt.redis.delete(*rt.keys.outbox_dirty_shards)
    drainer = Drainer(rt)
    assert await drainer.sweep() == len(orgs)
    while await drainer.drain_round():
        pass
    for org in orgs:
        assert await rt.redis.xlen(rt.keys.org(org).outbox) == 0
        wallet = await read_wallet(rt, org)
        assert wallet is not None and wallet.balance_pence == 10_000 - 1_000 - 90 and wallet.live_calls == 1
    rows = await rt.pg.fetch(
        "SELECT org_id, count(*) AS entries, sum(amount_pence) AS pence FROM ledger_entries WHERE org_id = ANY($1::text[]) "
        "GROUP BY org_id",
        orgs,
    )
    # Per org: the seed top-up, the asset, the call's adjustment: written once each.
    assert {row["org_id"]: (row["entries"], row["pence"]) for row in rows} == {org: (3, 10_000 - 1_090) for org in orgs}
    report = await check(rt, orgs)
    assert report.clean and report.orgs_checked == len(orgs)
    # The kill switch's schedule is one key too: lost, the worker's backstop files every org
    # with a live call again, from Postgres and each org's own hash, wherever it lives.
    await rt.redis.delete(*rt.keys.kill_schedule_shards)
    assert await reschedule_live_orgs(rt) == len(orgs)
    filed = {org: await rt.redis.zscore(rt.keys.kill_schedule(org), org) for org in orgs}
    assert all(score is not None and score > 0 for score in filed.values()), filed
    assert {org for shard in rt.keys.kill_schedule_shards for org in await rt.redis.zrange(shard, 0, -1)} == set(orgs)


def move_slot(cluster: EmbeddedRedisCluster, slot: int, source: int, target: int) -> None:
    """A reshard step, as redis-cli --cluster reshard does it: the slot and its keys."""
    clients = [sync_redis.Redis(port=node.port, decode_responses=True) for node in cluster.nodes]
    try:
        source_id, target_id = (clients[i].execute_command("CLUSTER MYID") for i in (source, target))
        clients[target].execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        clients[source].execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        while keys := clients[source].execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            clients[source].execute_command(
                "MIGRATE", "127.0.0.1", cluster.nodes[target].port, "", 0, 5000, "KEYS", *keys
            )
        for client in clients:
            client.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
    finally:
        for client in clients:
            client.close()
    cluster.wait_until_formed()


async def test_a_reshard_keeps_the_state_markers_and_the_money(
    cluster: EmbeddedRedisCluster, settings: Settings
) -> None:
    """Markers move with their slots, so a master whose lowest slot changes still finds its own."""
    rt = await Runtime.open(replace(settings, redis_url=cluster.url, redis_cluster=True))
    try:
        await ensure_rebuilt(rt)
        org = await new_org(rt, 1_000)
        slot = key_slot(rt.keys.org(org).org.encode())
        owner = next(
            i for i, node in enumerate(cluster.nodes) if node_of(rt, rt.keys.org(org).org) == f"127.0.0.1:{node.port}"
        )
        lowest = min(
            slots
            for slots, nodes in rt.redis.nodes_manager.slots_cache.items()  # type: ignore[attr-defined]
            if nodes[0].name == f"127.0.0.1:{cluster.nodes[owner].port}"
        )
        move_slot(cluster, lowest, owner, (owner + 1) % 3)  # the owner's lowest slot changes
        if slot != lowest:
            move_slot(cluster, slot, owner, (owner + 2) % 3)  # and the org itself moves
    finally:
        await rt.close()
    rt = await Runtime.open(replace(settings, redis_url=cluster.url, redis_cluster=True))  # a fresh map of the slots
    try:
        assert await state_present(rt)
        assert (await deduct_asset(rt, org, "after-reshard", 100)).outcome == Outcome.ok
        wallet = await read_wallet(rt, org)
        assert wallet is not None and wallet.balance_pence == 900
    finally:
        await rt.close()
        await delete_prefix(cluster.url, settings.key_prefix)


async def test_a_master_restarting_empty_is_noticed_and_only_its_orgs_are_rebuilt(
    cluster: EmbeddedRedisCluster, cluster_rt: Runtime
) -> None:
    rt = cluster_rt
    by_node = await orgs_on_every_master(rt, 3)
    for node_orgs in by_node.values():
        for org in node_orgs:
            assert (await reserve_call(rt, org, "live")).outcome == Outcome.ok
            assert (await deduct_asset(rt, org, "drained", 100)).outcome == Outcome.ok
    drainer = Drainer(rt)
    await _drain(drainer)
    assert await state_present(rt)
    # Which master to lose: one that does not hold the main state marker, so only its own marker
    # can tell that it lost its orgs.
    main_marker_node = node_of(rt, rt.keys.state)
    lost_node = next(node for node in cluster.nodes if f"127.0.0.1:{node.port}" != main_marker_node)
    lost_name = f"127.0.0.1:{lost_node.port}"
    lost_orgs, kept_orgs = (
        by_node[lost_name],
        [org for name, orgs in by_node.items() if name != lost_name for org in orgs],
    )
    while not any(node_of(rt, rt.keys.outbox_dirty(org)) == lost_name for org in kept_orgs):
        org = await new_org(rt, 10_000)  # one more org on a master that stays up, rung on the lost one
        assert (await reserve_call(rt, org, "live")).outcome == Outcome.ok
        assert (await deduct_asset(rt, org, "drained", 100)).outcome == Outcome.ok
        (lost_orgs if node_of(rt, rt.keys.org(org).org) == lost_name else kept_orgs).append(org)
    await _drain(drainer)
    for org in kept_orgs:  # acknowledged, not yet drained: must survive on the masters that stayed up
        assert (await deduct_asset(rt, org, "undrained", 10)).outcome == Outcome.ok

    lost_node.kill()  # SIGKILL, no persistence: it comes back with its slots and no data
    # While it is down, an org on a master still up whose doorbell shard lived on the lost one is
    # still served: the ring is a hint, and its loss is left to the sweep.
    rung_on_lost = next(org for org in kept_orgs if node_of(rt, rt.keys.outbox_dirty(org)) == lost_name)
    assert (await deduct_asset(rt, rung_on_lost, "while-a-master-is-down", 5)).outcome == Outcome.ok
    lost_node.start()
    cluster.wait_until_formed()

    assert not await state_present(rt)
    for org in lost_orgs:
        assert await read_wallet(rt, org) is None
    report = await ensure_rebuilt(rt)
    assert report.rebuilt_here and report.orgs_restored == len(lost_orgs)
    assert await state_present(rt)
    for org in lost_orgs:
        wallet = await read_wallet(rt, org)
        assert wallet is not None and wallet.balance_pence == 10_000 - 100
        assert set(await live_holds(rt, org)) == {"live"}
        assert (await deduct_asset(rt, org, "drained", 100)).outcome == Outcome.replayed
    for org in kept_orgs:
        wallet = await read_wallet(rt, org)
        spent = 110 + (5 if org == rung_on_lost else 0)
        assert wallet is not None and wallet.balance_pence == 10_000 - spent  # "absent" mode left them alone
    await _drain(drainer)
    assert (await check(rt, lost_orgs + kept_orgs)).clean


async def _drain(drainer: Drainer) -> None:
    while await drainer.drain_round():
        pass
