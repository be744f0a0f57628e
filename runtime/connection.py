"""Opening a Redis client from the settings, the same way on both sides: one Redis, or a Redis Cluster
(`VSEG_REDIS_CLUSTER=on`, REDIS_URL naming any of its nodes)."""

from __future__ import annotations

from typing import Any, cast

import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from runtime.faults import redact_url
from runtime.settings import Settings
from schemas.errors import ConfigError


def is_cluster(client: object) -> bool:
    """Whether `client` talks to a Redis Cluster (redis-py's RedisCluster)."""
    return isinstance(client, RedisCluster)


def node_client(client: redis.Redis, key: str) -> redis.Redis:
    """A client for the one node that holds `key`: `client` itself on one Redis; on a cluster, that node's
    own connection, for a MULTI/EXEC over that key alone (a consistent snapshot of it)."""
    if not is_cluster(client):
        return client
    node = cast(RedisCluster, client).get_node_from_key(key)
    return cast(redis.Redis, node.redis_connection) if node is not None and node.redis_connection else client


def connect(
    settings: Settings,
    *,
    retries: int = 5,
    socket_timeout_s: float | None = None,
    connect_timeout_s: float = 5.0,
    health_check_interval_s: float = 15,
) -> redis.Redis:
    """A client for settings.redis_url (redis://, rediss://, user:password@ all work).

    The socket timeout is set explicitly and is always longer than the blocking reads (block_ms),
    so XREADGROUP/XREAD BLOCK never trips redis-py 8's default 5 s socket timeout. Connection errors
    are retried with exponential backoff before they surface (`retries` times: 5 by default, about
    5 s against a refused port, but each retry against a hung Redis costs a whole socket timeout).
    `socket_timeout_s` (default settings.socket_timeout_s), fewer `retries` and no health check
    (`health_check_interval_s=0`: its PING has retries of its own, which multiply the command's against
    a hung Redis) make a client that fails fast: the command-line tools use one for their first contact,
    so that a dead or hung Redis is reported within seconds. A shorter socket timeout is only for
    clients that never block.

    With `redis_cluster` on, a RedisCluster (typed as a Redis: the commands this service sends are the
    same, routed by key slot) that finds every node from the one in the URL, with the same timeouts and
    the same number of retries (RedisCluster retries a command itself, re-reading the slot map after a
    failover; its node connections do not retry on their own).
    """
    timeout_s = settings.socket_timeout_s if socket_timeout_s is None else socket_timeout_s
    retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=retries)
    if settings.redis_cluster == "on":
        return _cluster(settings, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s,
                        health_check_interval_s=health_check_interval_s, retry=retry)
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=timeout_s,
        socket_connect_timeout=connect_timeout_s,
        health_check_interval=health_check_interval_s,
        retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def _cluster(settings: Settings, *, timeout_s: float, connect_timeout_s: float, health_check_interval_s: float,
             retry: Retry) -> redis.Redis:
    """A RedisCluster, which reads the slot map when it is made: a node that is not in cluster mode is a
    ConfigError; no node answering is a redis.ConnectionError (one line from the CLIs, RedisUnavailable)."""
    try:
        return cast(redis.Redis, RedisCluster.from_url(
            settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=connect_timeout_s,
            health_check_interval=health_check_interval_s, retry=retry,
        ))
    except RedisClusterException as e:
        if "not enabled" in str(e):
            raise ConfigError(f"Redis at {redact_url(settings.redis_url)} is not a Redis Cluster node (cluster mode is "
                              f"not enabled on it): set VSEG_REDIS_CLUSTER=off, or point REDIS_URL at a cluster "
                              f"node") from None
        raise redis.ConnectionError(f"no node of the Redis Cluster answers ({e})") from None


def connect_async(settings: Settings, *, retries: int = 5) -> redis.asyncio.Redis:
    """`connect`'s twin for asyncio (redis.asyncio): the same URL, timeouts and retries; a RedisCluster with
    `redis_cluster` on."""
    retry = AsyncRetry(ExponentialBackoff(cap=2.0, base=0.1), retries=retries)
    kwargs: dict[str, Any] = {"socket_timeout": settings.socket_timeout_s, "socket_connect_timeout": 5.0,
                              "retry": retry}
    if settings.redis_cluster == "on":
        return cast(redis.asyncio.Redis, AsyncRedisCluster.from_url(settings.redis_url, **kwargs))
    return redis.asyncio.Redis.from_url(settings.redis_url, health_check_interval=15,
                                        retry_on_error=[redis.ConnectionError, redis.TimeoutError], **kwargs)


QUICK_RETRIES = 1
QUICK_TIMEOUT_S = 2.5


def quick_client(settings: Settings) -> redis.Redis:
    """A client that fails within seconds when Redis is down or hung, for the command-line tools' calls
    that never block: one retry, at most QUICK_TIMEOUT_S an attempt, and no health-check PING (whose own
    retries would multiply these)."""
    return connect(settings, retries=QUICK_RETRIES, socket_timeout_s=min(settings.socket_timeout_s, QUICK_TIMEOUT_S),
                   connect_timeout_s=QUICK_TIMEOUT_S, health_check_interval_s=0)


def worker_socket_timeout_s(settings: Settings) -> float:
    """The worker's Redis calls give up after this: never longer than a third of a lease, never shorter
    than a blocking read plus a second."""
    return min(settings.socket_timeout_s, max(settings.block_ms / 1000 + 1.0, settings.lease_s / 3))


def worker_client(settings: Settings) -> redis.Redis:
    """A client for the worker (and its model process): those timeouts and one quick reconnect."""
    timeout_s = worker_socket_timeout_s(settings)
    return connect(settings, retries=1, socket_timeout_s=timeout_s, connect_timeout_s=min(5.0, timeout_s))
