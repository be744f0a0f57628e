"""Infrastructure faults (Redis down, Redis full, disk full) turned into one-line, actionable errors.

Pure classification: `redis_fault` and `disk_fault` return the VsegError that says what is wrong
and what to do, or None when the error is something else. Both sides call them at their edges: the
worker to retry with backoff (these are RetryableErrors), the CLIs to print one line instead of a
traceback.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

from schemas.errors import DiskFull, InfrastructureError, RedisFull, RedisUnavailable

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def redact_url(url: str) -> str:
    """The URL without its password (logs and messages never show credentials)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable REDIS_URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redis_full_message(url: str) -> str:
    return (f"Redis at {redact_url(url)} is out of memory (used memory reached maxmemory, policy noeviction) "
            f"and refuses writes: raise maxmemory (CONFIG SET maxmemory), lower results_ttl_s (VSEG_RESULTS_TTL_S) "
            f"so finished results expire sooner, or consume and trim result streams faster")


def redis_unavailable_message(url: str, error: BaseException) -> str:
    detail = str(error).strip().rstrip(".") or type(error).__name__
    return (f"cannot reach Redis at {redact_url(url)} ({detail}): check that redis-server is running and "
            f"answering there, and that REDIS_URL points at it")


def is_redis_full(error: BaseException) -> bool:
    return isinstance(error, redis.exceptions.OutOfMemoryError) or (
        isinstance(error, redis.ResponseError) and "OOM command not allowed" in str(error))


def redis_fault(error: BaseException, url: str) -> InfrastructureError | None:
    """RedisUnavailable or RedisFull for a Redis error that is the infrastructure's fault, else None."""
    if isinstance(error, InfrastructureError):
        return error
    if is_redis_full(error):
        return RedisFull(redis_full_message(url))
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
        return RedisUnavailable(redis_unavailable_message(url, error))
    return None


def free_mib(path: Path) -> float | None:
    """Free space of the file system holding `path` (or its nearest existing parent), in MiB."""
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free / 2**20
        except OSError:
            continue
    return None


WORKER_RETRIES = "a worker retries the job with backoff"
SUBMIT_AGAIN = "then submit the video again"


def disk_full_message(where: Path, storage_root: Path | None = None, then: str = WORKER_RETRIES) -> str:
    root = storage_root if storage_root is not None else where
    free = free_mib(where)
    free_text = f"{free:.1f} MiB free" if free is not None else "free space unknown"
    return (f"no space left on the disk of STORAGE_ROOT {root} ({free_text}; writing {where}): free space there "
            f"or point STORAGE_ROOT at a larger volume ({then})")


def disk_fault(error: BaseException, where: Path, storage_root: Path | None = None,
               then: str = WORKER_RETRIES) -> DiskFull | None:
    """DiskFull (naming STORAGE_ROOT, the free space and what to do, then `then`) for ENOSPC or EDQUOT,
    else None."""
    if isinstance(error, DiskFull):
        return error
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        full = DiskFull(disk_full_message(where, storage_root, then))
        full.errno = error.errno
        return full
    return None
