"""Opening a Redis client from the settings, the same way on both sides."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from schemas.settings import Settings


def connect(settings: Settings) -> redis.Redis:
    """A client for settings.redis_url (redis://, rediss://, user:password@ all work).

    The socket timeout is set explicitly and is always longer than the blocking reads (block_ms),
    so XREADGROUP/XREAD BLOCK never trips redis-py 8's default 5 s socket timeout. Connection errors
    are retried with exponential backoff before they surface.
    """
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=5.0,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=5),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
