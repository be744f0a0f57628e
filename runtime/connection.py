"""Opening a Redis client from the settings, the same way on both sides."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from runtime.settings import Settings


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
    """
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.socket_timeout_s if socket_timeout_s is None else socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        health_check_interval=health_check_interval_s,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


QUICK_RETRIES = 1
QUICK_TIMEOUT_S = 2.5


def quick_client(settings: Settings) -> redis.Redis:
    """A client that fails within seconds when Redis is down or hung, for the command-line tools' calls
    that never block: one retry, at most QUICK_TIMEOUT_S an attempt, and no health-check PING (whose own
    retries would multiply these)."""
    return connect(settings, retries=QUICK_RETRIES, socket_timeout_s=min(settings.socket_timeout_s, QUICK_TIMEOUT_S),
                   connect_timeout_s=QUICK_TIMEOUT_S, health_check_interval_s=0)
