"""Taking job entries from the consumer group, and giving them back.

A worker first takes over an entry whose lease expired (its worker stopped renewing: XAUTOCLAIM with the
lease as the minimum idle time), then reads a new one (XREADGROUP). An entry leaves the group in one of
two ways: with its job's terminal entry (worker/broker/scripts.py FINISH_LUA), or dropped here, when
there is nothing left to do for it. On shutdown it is handed back: claimable by another worker at once,
the attempt not counted.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import redis

from schemas.names import JobState, Keys
from worker.broker.lease import Lease
from worker.broker.redis_client import call_bounded
from worker.broker.scripts import Scripts

log = logging.getLogger(__name__)

Entry = tuple[str, dict[Any, Any]]  # entry id, fields


def _str(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def ensure_group(client: redis.Redis, keys: Keys) -> None:
    """Create the consumer group (from the stream's start, so jobs queued before any worker count)."""
    try:
        client.xgroup_create(keys.jobs, keys.group, id="0", mkstream=True)
        log.info("created consumer group %s on %s", keys.group, keys.jobs)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def claim_expired(client: redis.Redis, keys: Keys, consumer: str, lease_ms: int) -> Entry | None:
    """Take over one entry whose lease expired. An entry deleted while pending is only acknowledged."""
    _cursor, claimed, *_ = client.xautoclaim(keys.jobs, keys.group, consumer, min_idle_time=lease_ms,
                                             start_id="0-0", count=1)
    for entry_id, fields in claimed:
        entry = _str(entry_id)
        if not fields:
            client.xack(keys.jobs, keys.group, entry)
            continue
        log.warning("reclaimed job entry %s: its lease expired", entry)
        return entry, fields
    return None


def read_new(client: redis.Redis, keys: Keys, consumer: str, block_ms: int | None) -> Entry | None:
    """Read one entry no consumer has had yet, waiting up to `block_ms` (None: not at all)."""
    reply = cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]],
                 client.xreadgroup(keys.group, consumer, {keys.jobs: ">"}, count=1, block=block_ms))
    if not reply or not reply[0][1]:
        return None
    entry_id, fields = reply[0][1][0]
    return _str(entry_id), fields


def drop_entry(client: redis.Redis, keys: Keys, entry_id: str) -> None:
    """Acknowledge and delete an entry there is nothing left to do for (vseg:jobs holds only jobs in flight)."""
    client.xack(keys.jobs, keys.group, entry_id)
    client.xdel(keys.jobs, entry_id)


def hand_back(scripts: Scripts, keys: Keys, entry_id: str, job_id: str, consumer: str, *, lease_s: float,
              lease: Lease | None, timeout_s: float) -> bool:
    """Give the job back: its attempt uncounted, its state `queued`, its entry idle for ten leases so that
    any worker's XAUTOCLAIM takes it at once. One try, waiting at most `timeout_s` (and never past the
    lease's end: after that the job is not ours to hand back). True if it was handed back; with the lease
    lost or presumed lost, or Redis not answering, it is not, and is reclaimed after its lease."""
    if lease is not None and not lease.writable():
        log.warning("job %s not handed back: its lease is lost or presumed lost (%s); it is reclaimed after its "
                    "lease", job_id, lease.reason or "Redis not answering")
        return False
    if lease is not None:
        timeout_s = min(timeout_s, max(0.1, lease.remaining_s()))
    done = call_bounded(
        lambda: scripts.hand_back(keys=[keys.jobs, keys.job(job_id)],
                                  args=[keys.group, entry_id, consumer, 10 * int(lease_s * 1000),
                                        JobState.QUEUED.value]),
        timeout_s, f"handing job {job_id} back")
    if done == 1:
        log.warning("job %s handed back to the group", job_id)
        return True
    log.error("could not hand job %s back; it is reclaimed after its lease expires", job_id)
    return False
