"""Job control from the client side: status and cancellation."""

from __future__ import annotations

import logging
from typing import Any, cast

import redis

from runtime.cleanup import producer_finished, remove_frames
from runtime.connection import connect
from runtime.faults import redact_url
from runtime.settings import Settings
from schemas import messages
from schemas.errors import UnknownJobError
from schemas.names import EVENTS_MAXLEN, TERMINAL_ENTRY_ID, JobState, terminal_states_arg, validate_job_id

log = logging.getLogger(__name__)


# KEYS: job hash, jobs stream, results stream, events stream. ARGV: group, terminal id, ttl_s, events MAXLEN
# (EVENTS_MAXLEN), the queued state, the cancelled state, the terminal states (space-separated: JobState,
# terminal_states_arg), then the cancelled entry's field/value pairs.
# -1 unknown job, 0 already ended, 1 cancel requested (a worker holds it and stops within a frame or
# two), 2 cancelled here (it was still queued: its entry is deleted before any worker could read it).
_CANCEL_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
if string.find(' ' .. ARGV[7] .. ' ', ' ' .. state .. ' ', 1, true) then return 0 end
redis.call('HSET', KEYS[1], 'cancel', '1')
local eid = redis.call('HGET', KEYS[1], 'entry_id')
if state == ARGV[5] and eid then
  local ok, p = pcall(redis.call, 'XPENDING', KEYS[2], ARGV[1], eid, eid, 1)
  if (not ok) or #p == 0 then
    redis.call('XDEL', KEYS[2], eid)
    redis.call('XADD', KEYS[3], ARGV[2], unpack(ARGV, 8))
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', tonumber(ARGV[4]), '*', unpack(ARGV, 8))
    redis.call('HSET', KEYS[1], 'state', ARGV[6])
    redis.call('EXPIRE', KEYS[3], tonumber(ARGV[3]))
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
    return 2
  end
end
return 1
"""


def cancel(job_id: str, *, settings: Settings, client: redis.Redis | None = None) -> str:
    """Cancel a job: returns 'cancelled' (was queued), 'requested' (running: it stops within a few
    frames), or the state it already ended in. Raises UnknownJobError, or redis-py's errors (the cancel
    flag is a write: a Redis at maxmemory refuses it with OutOfMemoryError)."""
    validate_job_id(job_id)
    client = client or connect(settings)
    keys = settings.keys
    fields = messages.encode(messages.Cancelled(job_id, 0))
    result = client.eval(
        _CANCEL_LUA, 4, keys.job(job_id), keys.jobs, keys.results(job_id), keys.events,
        keys.group, TERMINAL_ENTRY_ID, settings.results_ttl_s, EVENTS_MAXLEN, JobState.QUEUED.value,
        JobState.CANCELLED.value, terminal_states_arg(),
        *[x for kv in fields.items() for x in kv],
    )
    if result == -1:
        raise UnknownJobError(f"no job {job_id!r} in Redis at {redact_url(settings.redis_url)}")
    if result == 0:
        return str(status(job_id, settings=settings, client=client)["state"])
    if result == 2:  # no worker ever had it; a producer still streaming removes the frames when it stops
        try:
            if producer_finished(client, settings, job_id):
                remove_frames(settings, job_id)
        except (redis.RedisError, OSError) as e:  # disk space, not correctness: the job is cancelled
            log.warning("could not remove the frames of cancelled job %s (%s)", job_id, e)
        return JobState.CANCELLED.value
    return "requested"


def status(job_id: str, *, settings: Settings, client: redis.Redis | None = None) -> dict[str, Any]:
    """The job's state hash: state, attempt, frames_done, num_frames, worker, error, render_path...
    Raises UnknownJobError. A read: it works on a Redis at maxmemory."""
    validate_job_id(job_id)
    client = client or connect(settings)
    raw = cast(dict[bytes, bytes], client.hgetall(settings.keys.job(job_id)))
    if not raw:
        raise UnknownJobError(f"no job {job_id!r} in Redis at {redact_url(settings.redis_url)} "
                              f"(never submitted, or expired)")
    return {k.decode(): v.decode() for k, v in raw.items()}
