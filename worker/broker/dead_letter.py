"""The dead-letter stream (vseg:dead): entries that cannot be run, with the reason.

An entry goes there when it does not decode (poison: at once, never retried) or when its job used up
its attempts. The dead entry keeps the original fields and adds error, error_type, source_stream,
source_id, attempts, worker and at. A job that can be named also gets its `dead` terminal entry (the
caller writes it under a lease, worker/service/entry.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import redis

from schemas.errors import VsegError
from schemas.names import Keys, validate_job_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peek:
    """What can be told of an entry that failed to decode: its job id (if it names a valid one) and its
    frame count (0 if none)."""

    job_id: str | None
    num_frames: int


def peek(fields: dict[Any, Any]) -> Peek:
    """Best effort, for an entry `messages.decode` refused: the job id and num_frames of its msgpack
    data, if it has them. The one place the worker reads an entry's data without the codec."""
    raw = fields.get(b"data", fields.get("data"))
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=False) if isinstance(raw, bytes) else None
    except Exception:  # noqa: BLE001 - msgpack raises several unrelated types on garbage
        data = None
    if not isinstance(data, dict):
        return Peek(None, 0)
    try:
        job_id: str | None = validate_job_id(data["job_id"])
    except (KeyError, VsegError):
        job_id = None
    n = data.get("num_frames")
    return Peek(job_id, n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0)


def add_dead_entry(client: redis.Redis, keys: Keys, entry_id: str, fields: dict[Any, Any], error: BaseException, *,
                   attempts: int, worker: str) -> None:
    """Copy the entry to vseg:dead with the reason (the job entry itself is removed by the caller)."""
    dead: dict[Any, Any] = dict(fields)
    dead.update({"error": str(error), "error_type": type(error).__name__, "source_stream": keys.jobs,
                 "source_id": entry_id, "attempts": str(attempts), "worker": worker, "at": str(time.time())})
    client.xadd(keys.dead, dead)
