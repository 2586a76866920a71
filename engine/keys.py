"""Redis key names, in one place (as arq keeps its prefixes in constants.py).

Every key of one org carries the hash tag `{org:<org_id>}`, so every script touches one Redis
Cluster slot. Org ids are restricted to a charset without `{`, `}` or `:` so an id can never
end the tag early or make two orgs share a slot by construction. Call ids and idempotency keys
never appear in an org's key names: they are fields inside the org's hashes, so no content of
theirs can move a write to another org. (The call index and the end queue, outside every org,
name a call in a key after a fixed prefix or hash tag; the call id charset has no braces.)

Keys outside any org's slot are only ever touched by plain commands, never inside a script.
"""

import re
import zlib
from dataclasses import dataclass

from credit_engine.engine import limits

ORG_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,%d}" % (limits.org_id_length_max - 1))
CALL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,%d}" % (limits.call_id_length_max - 1))
PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,32}")
# Client idempotency keys: printable ASCII without spaces.
IDEMPOTENCY_KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,%d}" % limits.idempotency_key_length_max)


# The worker's hint sets (the doorbell, the kill switch's schedule) are split into shards so that
# no one Redis Cluster master carries every decision's ring. Shard i's hash tag lands in slot
# 1024·i + 512 (tests/engine/test_redis_cluster.py checks), so shards spread over the masters of a
# cluster whose slots are split evenly. The worker visits every shard, on whichever node it is.
HINT_SHARD_TAGS = (
    "1768",
    "20261",
    "18360",
    "41271",
    "3453",
    "11199",
    "29098",
    "8591",
    "265",
    "45842",
    "13409",
    "17891",
    "46093",
    "3635",
    "2912",
    "48623",
)


def hint_shard(org_id: str) -> int:
    return zlib.crc32(org_id.encode()) % len(HINT_SHARD_TAGS)


def is_org_id(value: object) -> bool:
    return isinstance(value, str) and ORG_ID_PATTERN.fullmatch(value) is not None


def is_call_id(value: object) -> bool:
    return isinstance(value, str) and CALL_ID_PATTERN.fullmatch(value) is not None


def is_idempotency_key(value: object) -> bool:
    return isinstance(value, str) and IDEMPOTENCY_KEY_PATTERN.fullmatch(value) is not None


@dataclass(frozen=True)
class OrgKeys:
    org: str  # hash: balance, held, debt, seq and the org's settings
    holds: str  # hash: call_id -> hold record
    idem: str  # hash: idempotency key -> first outcome
    idem_exp: str  # sorted set: idempotency key -> expiry (ms)
    outbox: str  # stream: ledger entries and hold events not yet in Postgres
    dead: str  # stream: outbox entries the ledger refused, kept until a repair archives them
    kill: str  # hash: call_id -> the kill switch's progress with that call (warned, ended)
    control: str  # hash: call_id -> the call's control URL (engine/call_index.py)

    def all(self) -> list[str]:
        return [self.org, self.holds, self.idem, self.idem_exp, self.outbox, self.dead, self.kill, self.control]

    def restore_staging(self, token: str) -> str:
        """Hash: one restore's idempotency records, staged before org_restore.lua takes them (or
        not); the restore deletes it, and it expires if the restoring process dies first."""
        assert token.isalnum()
        return f"{self.org.removesuffix(':org')}:restore:{token}"


@dataclass(frozen=True)
class Keyspace:
    prefix: str

    def __post_init__(self) -> None:
        if PREFIX_PATTERN.fullmatch(self.prefix) is None:
            raise ValueError(f"bad Redis key prefix {self.prefix!r}")

    def org(self, org_id: str) -> OrgKeys:
        if not is_org_id(org_id):
            raise ValueError(f"bad org id {org_id!r}")
        tag = f"{self.prefix}:{{org:{org_id}}}"
        return OrgKeys(
            org=f"{tag}:org",
            holds=f"{tag}:holds",
            idem=f"{tag}:idem",
            idem_exp=f"{tag}:idem_exp",
            outbox=f"{tag}:outbox",
            dead=f"{tag}:outbox:dead",
            kill=f"{tag}:kill",
            control=f"{tag}:control",
        )

    def outbox_dirty(self, org_id: str) -> str:
        """The org's shard of the set of org ids whose outbox may hold entries (the worker's doorbell)."""
        return self.outbox_dirty_shards[hint_shard(org_id)]

    @property
    def outbox_dirty_shards(self) -> list[str]:
        return [f"{self.prefix}:outbox:dirty:{{{tag}}}" for tag in HINT_SHARD_TAGS]

    def call_index(self, call_id: str) -> str:
        """Hash: the org that admitted a call first (engine/call_index.py)."""
        return f"{self.prefix}:call:{call_id}"

    def kill_schedule(self, org_id: str) -> str:
        """The org's shard of the sorted set org id -> when the kill switch should look at it, as a
        depletion moment (the worker visits an org warn_lead before its score). Only plain
        commands touch it."""
        return self.kill_schedule_shards[hint_shard(org_id)]

    @property
    def kill_schedule_shards(self) -> list[str]:
        return [f"{self.prefix}:killswitch:due:{{{tag}}}" for tag in HINT_SHARD_TAGS]

    def end_queue(self, call_id: str) -> str:
        """The call's shard of the end queue (engine/end_queue.py): sorted set call id -> when its
        next end-call attempt is due. Sharded by call id, as the schedule is by org id."""
        return self.end_queue_shards[hint_shard(call_id)]

    @property
    def end_queue_shards(self) -> list[str]:
        return [f"{self.prefix}:killswitch:end:{{{tag}}}" for tag in HINT_SHARD_TAGS]

    def end_queue_entry(self, call_id: str) -> str:
        """String (JSON, with a TTL): one call the end queue must end. The shard's hash tag comes
        first, so the call id (no braces in its charset) cannot move it to another slot."""
        return f"{self.end_queue(call_id)}:call:{call_id}"

    def end_queue_lock(self, call_id: str) -> str:
        """Set while a worker's end-call for the call is under way (expires with its deadline)."""
        return f"{self.end_queue(call_id)}:lock:{call_id}"

    @property
    def state(self) -> str:
        """Marker hash: present once the reconciler has built Redis from Postgres."""
        return f"{self.prefix}:state"

    @property
    def rebuild_lock(self) -> str:
        return f"{self.prefix}:state:rebuild-lock"

    @property
    def worker_stats(self) -> str:
        return f"{self.prefix}:worker:stats"

    @property
    def worker_counters(self) -> str:
        """Hash of counters every worker increments (kill switch, alerts)."""
        return f"{self.prefix}:worker:counters"

    @property
    def workflows_answered(self) -> str:
        """Sorted set: saved workflows a platform answered an assistant-request with, by when (ms)."""
        return f"{self.prefix}:workflows-answered"

    def vapi_pace_slot(self, slot: int) -> str:
        """Set while one Vapi request owns this 1/rps-second slot (engine/vapi_calls.VapiPace)."""
        return f"{self.prefix}:vapi:pace:{slot}"

    def settle_looked_up(self, call_id: str) -> str:
        """Set while a silent hold's call was looked up at Vapi recently (engine/settle.py)."""
        return f"{self.prefix}:vapi:settle:{call_id}"

    @property
    def arq_queue(self) -> str:
        return f"{self.prefix}:arq:queue"

    def pattern(self) -> str:
        """Glob matching every key of this keyspace (tests use it to clean up after themselves)."""
        return f"{self.prefix}:*"
