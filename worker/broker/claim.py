"""Taking job entries from the consumer group, and giving them back.

A worker first takes over an entry whose lease expired (its worker stopped renewing: XAUTOCLAIM with the
lease as the minimum idle time), then reads a new one (XREADGROUP). Either way it then takes the job
itself (`take`: the fence in the job's hash, worker/broker/lease.py), which is refused while another
worker's lease on it still runs. An entry leaves the group in one of two ways: after its job's terminal
entry (worker/broker/publish.py `terminal`), or dropped here, when there is nothing left to do for it
(a job already ended: the copy of its terminal entry on vseg:events is written first if its worker did
not get to it). On shutdown it is handed back: claimable by another worker at once, the attempt not
counted.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import redis

from runtime.layout import ensure_layout
from schemas.names import EVENTS_MAXLEN, TERMINAL_ENTRY_ID, JobState, Keys, terminal_states_arg
from worker.broker.lease import Lease, reset_idle
from worker.broker.redis_client import call_bounded
from worker.broker.scripts import Scripts

log = logging.getLogger(__name__)

Entry = tuple[str, dict[Any, Any]]  # entry id, fields


def _str(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def is_group_gone(error: BaseException) -> bool:
    """The jobs stream or its consumer group does not exist (Redis restarted empty, a failover to a replica
    without them, FLUSHALL): NOGROUP from XREADGROUP, XAUTOCLAIM, XPENDING and XACK's kin, "no such key" from
    XINFO, "requires the key to exist" from XGROUP DELCONSUMER, UNBLOCKED to an XREADGROUP that was waiting
    on a stream deleted under it (each seen from Redis 7.0)."""
    text = str(error)
    return isinstance(error, redis.ResponseError) and (
        "NOGROUP" in text or "no such key" in text.lower() or "requires the key to exist" in text
        or text.startswith("UNBLOCKED"))


def ensure_group(client: redis.Redis, keys: Keys) -> None:
    """Check the key layout (runtime/layout.py: LayoutError if this Redis holds jobs of the old one), then
    create the consumer group (from the stream's start, so jobs queued before any worker count)."""
    ensure_layout(client, keys)
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


def copy_terminal_event(client: redis.Redis, keys: Keys, job_id: str) -> bool:
    """Write the copy of the job's terminal entry on vseg:events if it is still due (`event_copied` 0: the
    step that wrote the terminal entry stopped before its copy), then mark it written. True if one was
    written. At least once: a crash between the copy and its mark writes it again."""
    if client.hget(keys.job(job_id), "event_copied") != b"0":
        return False
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]],
                   client.xrange(keys.results(job_id), TERMINAL_ENTRY_ID, TERMINAL_ENTRY_ID))
    if entries:
        client.xadd(keys.events, cast(Any, entries[0][1]), maxlen=EVENTS_MAXLEN, approximate=True)
    client.hset(keys.job(job_id), "event_copied", "1")
    return bool(entries)


def drop_ended(client: redis.Redis, keys: Keys, entry_id: str, job_id: str) -> None:
    """Drop the entry of a job that has already ended, its terminal copy on vseg:events written first if due."""
    if copy_terminal_event(client, keys, job_id):
        log.warning("job %s: wrote the copy of its terminal entry on %s, which its worker had not", job_id, keys.events)
    drop_entry(client, keys, entry_id)


def take(client: redis.Redis, scripts: Scripts, keys: Keys, entry_id: str, job_id: str | None, consumer: str,
         lease_ms: int) -> bool:
    """Take the job of a claimed entry (its hash's owner becomes `consumer`, leased for `lease_ms`). False when
    there is nothing to run: the job has already ended (its terminal copy on vseg:events written if due, the
    entry dropped), or another worker's lease on it still runs (the entry is left: that worker's next renewal
    claims it back). An entry that names no job (poison) is not taken: it is dead-lettered without a job."""
    if job_id is None:
        return True
    status = scripts.take(keys=[keys.job(job_id)], args=[consumer, lease_ms, terminal_states_arg()])
    if status == 1:
        return True
    if status == 0:
        state = cast(bytes | None, client.hget(keys.job(job_id), "state"))
        log.info("job %s is already %s; dropping its entry", job_id, (state or b"ended").decode())
        drop_ended(client, keys, entry_id, job_id)
        return False
    log.warning("job %s: entry %s claimed while another worker's lease on the job still runs; left to it", job_id,
                entry_id)
    return False


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
    def give_back() -> Any:
        done = scripts.hand_back(keys=[keys.job(job_id)], args=[consumer, JobState.QUEUED.value])
        if done == 1:  # idle for ten leases: any worker's XAUTOCLAIM takes it at once
            reset_idle(scripts.client, keys, entry_id, consumer, 10 * int(lease_s * 1000))
        return done

    done = call_bounded(give_back, timeout_s, f"handing job {job_id} back")
    if done == 1:
        log.warning("job %s handed back to the group", job_id)
        return True
    log.error("could not hand job %s back; it is reclaimed after its lease expires", job_id)
    return False
