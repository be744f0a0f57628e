"""The one enqueue step: a job's entry on the jobs stream, then its hash.

The job hash and the jobs stream are on different hash slots (a job's keys share its hash tag; the jobs
stream is shared: schemas/names.py), so no script can write both. The entry goes first (XADD), then a
script on the job's slot creates the hash, refusing when the job already exists (its `submitted_at` is
set: the same job id submitted twice, by a client retry or two racing clients, gives one job; the
refused call's entry is deleted again). Entry first, so that a producer that dies between the two
steps leaves a job that still runs: a worker that claims the entry takes the job (worker/broker/claim.py
`take`, which creates the hash's fence fields if the hash is not there yet), and the create script sets
only the fields a worker has not (HSETNX), so a worker that was quicker than the producer's second step
keeps its attempt and state. A job that ever gets two entries (a resubmit after a producer died between
the steps) is run once: the fence lets one worker hold it, and the other entry is dropped once the job
has ended.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import redis

from runtime.layout import ensure_layout
from runtime.lua import lua, register
from schemas import messages
from schemas.names import JobState, Keys, lane_of

log = logging.getLogger(__name__)

# KEYS: job hash. ARGV: entry id, num_frames, submitted_at, source, state (JobState.QUEUED), then field, value
# pairs (`job_fields`). 1 created (fields a worker already set are kept), 0 the job already exists (nothing written).
_CREATE_LUA = lua("create_job", """
if redis.call('HEXISTS', KEYS[1], 'submitted_at') == 1 then return 0 end
local fields = {'state', ARGV[5], 'attempt', '0', 'frames_done', '0', 'num_frames', ARGV[2],
                'submitted_at', ARGV[3], 'source', ARGV[4], 'entry_id', ARGV[1]}
for i = 6, #ARGV, 2 do fields[#fields + 1] = ARGV[i]; fields[#fields + 1] = ARGV[i + 1] end
for i = 1, #fields, 2 do redis.call('HSETNX', KEYS[1], fields[i], fields[i + 1]) end
return 1
""")


def job_exists(client: redis.Redis, keys: Keys, job_id: str) -> bool:
    """A job with this id was submitted (its hash has `submitted_at`; a hash a worker made for an entry
    whose producer died before creating it does not count: submitting again completes it)."""
    return bool(client.hexists(keys.job(job_id), "submitted_at"))


def job_fields(job: messages.JobMessage, extra: Mapping[str, str]) -> list[str]:
    """The job hash's fields beside its state, for readers that have no JobMessage (the viewer, the events
    consumer): the displayed size and rate, its lane (the jobs stream its entry is on, `lane_keys`), then `extra`
    (zones, camera, source_path, preview)."""
    fields = {"width": str(job.width), "height": str(job.height), "fps": f"{job.fps:.6g}",
              **({"lane": lane_of(job.text)} if lane_of(job.text) else {}), **extra}
    return [item for pair in fields.items() for item in pair]


def enqueue(client: redis.Redis, keys: Keys, job: messages.JobMessage, extra: Mapping[str, str] | None = None) -> bool:
    """Add the job's entry to the jobs stream, then create its hash; False if the job already existed (the
    entry just added is deleted again: nothing is left of this call). `extra`: more hash fields (`job_fields`).
    The entry goes on the jobs stream of the job's lane (a text job's: `vseg:jobs:text`)."""
    keys = keys.for_lane(lane_of(job.text))
    ensure_layout(client, keys)  # checked at the submit's start; marked with the Redis's first job
    fields = messages.encode(job)
    raw = client.xadd(keys.jobs, {"type": fields["type"], "data": fields["data"]})
    entry_id = raw.decode() if isinstance(raw, bytes) else str(raw)
    create = register(client, "create_job")  # EVALSHA (SCRIPT LOAD once, after a NOSCRIPT)
    if create(keys=[keys.job(job.job_id)], args=[entry_id, job.num_frames, job.submitted_at, job.source,
                                                  JobState.QUEUED.value, *job_fields(job, extra or {})]):
        return True
    client.xdel(keys.jobs, entry_id)
    log.info("job %s already exists: its new entry %s on %s deleted again", job.job_id, entry_id, keys.jobs)
    return False


def lane_keys(keys: Keys, lane: bytes | str | None) -> Keys:
    """`keys` with the jobs stream a job's entry is on, from its hash's `lane` field (None or "": the first)."""
    text = lane.decode() if isinstance(lane, bytes) else (lane or "")
    try:
        return keys.for_lane(text)
    except ValueError:
        log.warning("a job hash names lane %r, unknown to this client: reading %s", text, keys.jobs)
        return keys
