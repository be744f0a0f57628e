"""Job control from the client side: status, cancellation, and stopping a live job."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any, cast

import redis

from producer.enqueue import lane_keys
from runtime.cleanup import producer_finished, remove_frames
from runtime.connection import connect
from runtime.faults import redact_url
from runtime.layout import ensure_layout
from runtime.lua import lua, register
from runtime.settings import Settings
from schemas import messages
from schemas.errors import InputError, UnknownJobError
from schemas.names import EVENTS_MAXLEN, TERMINAL_ENTRY_ID, JobState, terminal_states_arg, validate_job_id

log = logging.getLogger(__name__)


# KEYS: job hash, results stream (one job's keys: one slot). ARGV: terminal id, ttl_s, the queued state, the
# cancelled state, the terminal states (space-separated: JobState, terminal_states_arg), then the cancelled
# entry's field/value pairs.
# Returns {code, state, entry id}: -1 unknown job; 0 already ended (in that state, nothing written); 1 cancel
# requested (a worker holds it: the job hash has an owner, and it stops within a frame or two); 2 cancelled here
# (it was still queued and no worker had taken it: a worker that claims its entry later finds it ended and drops
# it). The state is read in the same step, so an already-ended job is told apart from one this call cancelled.
# With 2 the caller writes the copy on vseg:events and deletes the job's entry from vseg:jobs (shared keys).
_CANCEL_LUA = lua("cancel_job", """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1, '', ''} end
if string.find(' ' .. ARGV[5] .. ' ', ' ' .. state .. ' ', 1, true) then return {0, state, ''} end
redis.call('HSET', KEYS[1], 'cancel', '1')
local owner = redis.call('HGET', KEYS[1], 'owner')
if state == ARGV[3] and (not owner or owner == '') then
  redis.call('XADD', KEYS[2], ARGV[1], unpack(ARGV, 6))
  redis.call('HSET', KEYS[1], 'state', ARGV[4], 'event_copied', '0', 'finished_at', redis.call('TIME')[1])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
  return {2, ARGV[4], redis.call('HGET', KEYS[1], 'entry_id') or '', redis.call('HGET', KEYS[1], 'lane') or ''}
end
return {1, state, ''}
""")


class CancelAction(str, enum.Enum):
    """What a cancel did."""

    CANCELLED = "cancelled"  # it was still queued: cancelled here, before any worker read it
    REQUESTED = "requested"  # a worker holds it: the worker stops within a few frames and ends it cancelled
    ALREADY_ENDED = "already ended"  # it had already ended (in `state`): nothing was done


_ACTIONS = {2: CancelAction.CANCELLED, 1: CancelAction.REQUESTED, 0: CancelAction.ALREADY_ENDED}


@dataclass(frozen=True)
class CancelResult:
    """The outcome of `request_cancel`. Cancelling is idempotent: a job that has already ended (cancelled
    included) is left as it is, and says so; that is not an error."""

    job_id: str
    action: CancelAction
    state: str  # the job's state as the cancel left it (ALREADY_ENDED: the terminal state it ended in)

    @property
    def outcome(self) -> str:
        """What `cancel` returns: 'cancelled', 'requested', or the state the job had already ended in."""
        return self.state if self.action is CancelAction.ALREADY_ENDED else self.action.value

    def describe(self) -> str:
        """One line for a person (what `python -m producer cancel` prints)."""
        if self.action is CancelAction.CANCELLED:
            return f"job {self.job_id}: cancelled (it was still queued)"
        if self.action is CancelAction.REQUESTED:
            return f"job {self.job_id}: cancel requested: its worker stops within a few frames"
        return f"job {self.job_id}: already {self.state}: nothing to cancel"


def cancel(job_id: str, *, settings: Settings, client: redis.Redis | None = None) -> str:
    """Cancel a job: returns 'cancelled' (was queued), 'requested' (running: it stops within a few
    frames), or the state it already ended in ('cancelled' too: `request_cancel` tells them apart).
    Raises UnknownJobError, or redis-py's errors (the cancel flag is a write: a Redis at maxmemory
    refuses it with OutOfMemoryError)."""
    return request_cancel(job_id, settings=settings, client=client).outcome


def request_cancel(job_id: str, *, settings: Settings, client: redis.Redis | None = None) -> CancelResult:
    """Cancel a job, saying what was done (see CancelResult); raises as `cancel` does."""
    validate_job_id(job_id)
    client = client or connect(settings)
    keys = settings.keys
    ensure_layout(client, keys, mark=False)  # a job of the old layout is not "unknown": LayoutError says what to do
    fields = messages.encode(messages.Cancelled(job_id, 0))
    cancel_script = register(client, "cancel_job")  # EVALSHA (SCRIPT LOAD once, after a NOSCRIPT)
    code, state, entry_id, *lane = cast(list[Any], cancel_script(
        keys=[keys.job(job_id), keys.results(job_id)],
        args=[TERMINAL_ENTRY_ID, settings.results_ttl_s, JobState.QUEUED.value, JobState.CANCELLED.value,
              terminal_states_arg(), *[x for kv in fields.items() for x in kv]],
    ))
    if code == -1:
        raise UnknownJobError(f"no job {job_id!r} in Redis at {redact_url(settings.redis_url)}")
    result = CancelResult(job_id, _ACTIONS[int(code)], state.decode() if isinstance(state, bytes) else str(state))
    if result.action is CancelAction.CANCELLED:
        # The shared keys, after the job's own: the copy on vseg:events, then the entry off vseg:jobs. Dying
        # between leaves the entry: the worker that claims it finds the job ended, writes the copy if it is
        # still due, and drops it (worker/broker/claim.py).
        client.xadd(keys.events, cast(Any, fields), maxlen=EVENTS_MAXLEN, approximate=True)
        client.hset(keys.job(job_id), "event_copied", "1")
        if entry_id:
            client.xdel(lane_keys(keys, lane[0] if lane else "").jobs,
                        entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id))
    if result.action is CancelAction.CANCELLED:  # no worker ever had it: remove its frames, unless a
        try:                                       # producer still streams them (it removes them when it stops)
            if producer_finished(client, settings, job_id):
                remove_frames(settings, job_id)
        except (redis.RedisError, OSError) as e:  # disk space, not correctness: the job is cancelled
            log.warning("could not remove the frames of cancelled job %s (%s)", job_id, e)
    return result


# KEYS: job hash. ARGV: the terminal states (space-separated). Returns {code, state}: -1 unknown job, 0 already
# ended (nothing written), -2 not a live job, 1 stop requested.
_STOP_LUA = lua("stop_live_job", """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1, ''} end
if string.find(' ' .. ARGV[1] .. ' ', ' ' .. state .. ' ', 1, true) then return {0, state} end
if redis.call('HGET', KEYS[1], 'live') ~= '1' then return {-2, state} end
redis.call('HSET', KEYS[1], 'stop', '1')
return {1, state}
""")


def request_stop(job_id: str, *, settings: Settings, client: redis.Redis | None = None) -> str:
    """End a live job gracefully: its producer stops ingesting within a second and writes the end marker,
    the worker publishes the last frames, finishes the render and completes the job. Returns what was done,
    in one line. Idempotent; a job already ended says so. Raises UnknownJobError, or InputError for a job
    that is not live (`cancel` ends those)."""
    validate_job_id(job_id)
    client = client or connect(settings)
    ensure_layout(client, settings.keys, mark=False)
    script = register(client, "stop_live_job")
    code, raw = cast(list[Any], script(keys=[settings.keys.job(job_id)], args=[terminal_states_arg()]))
    state = raw.decode() if isinstance(raw, bytes) else str(raw)
    if code == -1:
        raise UnknownJobError(f"no job {job_id!r} in Redis at {redact_url(settings.redis_url)}")
    if code == -2:
        raise InputError(f"job {job_id} is not a live job ({state}): it ends with its video; to end it now use "
                         f"python -m producer cancel {job_id}")
    if code == 0:
        return f"job {job_id}: already {state}: nothing to stop"
    return (f"job {job_id}: stop requested: its producer ends the source within a second; the worker publishes the "
            "last frames, finishes the render, then completes it")


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
