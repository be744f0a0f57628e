"""A real Redis Cluster for tests: three masters (`redis-server --cluster-enabled yes`) on free ports, joined by
`redis-cli --cluster create`, no replicas."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.cluster import RedisCluster

from producer.local_redis import RedisServer, free_port


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(n: int) -> list[int]:
    """`n` free ports whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port + 10000 <= 65535 and port not in ports and _free(port + 10000):
            ports.append(port)
    return ports


class RedisClusterNodes:
    """Three cluster-enabled redis-servers made into one cluster (every slot covered, `cluster_state:ok`)."""

    def __init__(self, data_dir: Path, masters: int = 3) -> None:
        self.data_dir = data_dir
        self.servers: list[RedisServer] = []
        for port in cluster_ports(masters):
            server = RedisServer(port=port, data_dir=data_dir / f"node-{port}")
            server.data_dir.mkdir(parents=True)
            server.extra_args = ["--cluster-enabled", "yes", "--cluster-config-file",
                                 str(server.data_dir / f"nodes-{port}.conf"), "--cluster-node-timeout", "5000"]
            self.servers.append(server)

    @property
    def url(self) -> str:
        """One node's URL: a cluster client finds the others from it."""
        return f"redis://127.0.0.1:{self.servers[0].port}/0"

    def start(self, timeout_s: float = 30.0) -> RedisClusterNodes:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is needed to create a Redis Cluster")
        for server in self.servers:
            server.start()
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{s.port}" for s in self.servers],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + timeout_s
        for server in self.servers:
            node = redis.Redis(port=server.port)
            while b"cluster_state:ok" not in node.execute_command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster did not reach cluster_state:ok (node {server.port})")
                time.sleep(0.1)
            node.close()
        return self

    def client(self) -> RedisCluster:
        return RedisCluster.from_url(self.url, socket_timeout=5)

    def flush(self) -> None:
        client = self.client()
        try:
            client.flushall(target_nodes=RedisCluster.PRIMARIES)
        finally:
            client.close()

    def node_of(self, client: RedisCluster, key: str) -> int:
        """The port of the node that holds `key`'s slot."""
        return int(client.get_node_from_key(key).port)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
