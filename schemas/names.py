"""Every Redis stream, group and key name, in one place.

Backends read these with their own Redis clients; the README documents them.

Key layout 2 (README "Redis Cluster"): every key of one job carries the hash tag `{job_id}`
(`vseg:job:{j1}`, `vseg:results:{j1}`, ...), so all of a job's keys share one hash slot and every Lua
script, which touches one job's keys only, runs on a cluster. A job id never holds `{` or `}`
(JOB_ID_PATTERN), so the tag is the whole id. The shared keys (`vseg:jobs`, `vseg:events`, `vseg:dead`,
the workers' health keys) are single keys, each on one slot; no script touches them together with a
job's keys. `vseg:layout` records which layout a Redis holds (runtime/layout.py).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from schemas.errors import JobIdError

DEFAULT_PREFIX = "vseg"
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_job_id(job_id: str) -> str:
    """Return `job_id` if it is safe in Redis keys and file paths, else raise JobIdError."""
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.match(job_id) or ".." in job_id:
        raise JobIdError(
            f"job id must be 1-64 characters of letters, digits, '_', '.', '-', starting with a letter "
            f"or digit and without '..', but got {job_id!r}"
        )
    return job_id


# Key layouts: 1 (before Redis Cluster support) named a job's keys `vseg:job:<id>`; 2 wraps the id in a hash tag.
LAYOUT_VERSION = "2"
JOB_KEY_KINDS = ("job", "results", "frames", "control", "producer")  # per-job keys: <prefix>:<kind>:{<job id>}


def hash_tag(job_id: str) -> str:
    """`{job_id}`: the part of a key Redis Cluster hashes, so that all of one job's keys share a slot."""
    return "{" + job_id + "}"


# What a job needs of its worker's model, and the jobs stream ("lane") it goes on: a worker reads the one lane its
# model serves (worker/model/models.py). Points and boxes (SAM 2): `vseg:jobs`, as ever; text (SAM 3): `vseg:jobs:text`.
POINTS = "points"
TEXT = "text"
LANES = {POINTS: "", TEXT: TEXT}  # capability -> lane ("" is the first stream, `vseg:jobs`)


def lane_of(text: tuple[str, ...] | list[str]) -> str:
    """The lane of a job with these text phrases: text jobs on theirs, the rest on `vseg:jobs`."""
    return LANES[TEXT] if text else LANES[POINTS]


@dataclass(frozen=True)
class Keys:
    """Names of the service's streams and keys under one prefix (default `vseg`); `lane` picks the jobs stream
    (a worker's keys name the lane it reads; a client's the first, and `for_lane` another)."""

    prefix: str = DEFAULT_PREFIX
    lane: str = ""

    def for_lane(self, lane: str) -> Keys:
        """The same names, with the jobs stream of `lane` ("" or a value of LANES)."""
        if lane not in LANES.values():
            raise ValueError(f"unknown jobs lane {lane!r}; known: {sorted(LANES.values())}")
        return Keys(self.prefix, lane)

    def all_lanes(self) -> list[Keys]:
        """One Keys per lane, the first lane first (queue statistics, the viewer)."""
        return [self.for_lane(lane) for lane in dict.fromkeys(LANES.values())]

    @property
    def jobs(self) -> str:
        """Stream of submitted jobs of this lane; workers read it through the `group` consumer group."""
        return f"{self.prefix}:jobs:{self.lane}" if self.lane else f"{self.prefix}:jobs"

    @property
    def group(self) -> str:
        """Consumer group of the workers on `jobs`."""
        return f"{self.prefix}:workers"

    @property
    def events(self) -> str:
        """Lifecycle events of every job: started, progress, and a copy of its terminal entry."""
        return f"{self.prefix}:events"

    @property
    def dead(self) -> str:
        """Messages that could not be processed (poison, or out of attempts)."""
        return f"{self.prefix}:dead"

    @property
    def alerts(self) -> str:
        """Zone and line events of every job (producer/alerts.py): zone_enter, zone_leave, line_cross, dwell."""
        return f"{self.prefix}:alerts"

    def alerts_jobs(self, group: str) -> str:
        """Set of the job ids the events consumer of group `group` follows (producer/alerts.py): added when it sees
        a job's `started`, removed after its terminal entry; a restart follows them again."""
        return f"{self.prefix}:alerts:jobs:{group}"

    @property
    def layout(self) -> str:
        """String with the key layout this Redis holds (LAYOUT_VERSION); see runtime/layout.py."""
        return f"{self.prefix}:layout"

    def results(self, job_id: str) -> str:
        """One job's results: started, a frame entry per frame in order, then one terminal entry (completed,
        failed, cancelled or dead) at TERMINAL_ENTRY_ID."""
        return f"{self.prefix}:results:{hash_tag(job_id)}"

    def frames(self, job_id: str) -> str:
        """Frames of a streamed job, announced as the producer decodes them; then an end marker."""
        return f"{self.prefix}:frames:{hash_tag(job_id)}"

    def control(self, job_id: str) -> str:
        """Commands for a running job (prompts, removals), in order; every attempt replays them."""
        return f"{self.prefix}:control:{hash_tag(job_id)}"

    def producer(self, job_id: str) -> str:
        """Key the producer of a streamed job keeps alive while it decodes; it expires if the producer dies."""
        return f"{self.prefix}:producer:{hash_tag(job_id)}"

    def job(self, job_id: str) -> str:
        """Hash with one job's state, attempt, progress and last error; also the job's fence (`owner`,
        `lease_until`: worker/broker/lease.py)."""
        return f"{self.prefix}:job:{hash_tag(job_id)}"

    def job_key_kinds(self) -> tuple[str, ...]:
        """The prefixes of per-job keys (`vseg:job:`, `vseg:results:`, ...), for finding a job's keys."""
        return tuple(f"{self.prefix}:{kind}:" for kind in JOB_KEY_KINDS)

    def submit_lock(self, job_id: str) -> str:
        """Lock held by the one submit that decodes and enqueues a job id (a duplicate waits on it)."""
        return f"{self.job(job_id)}:submit-lock"

    def terminal_seen(self, job_id: str, group: str) -> str:
        """The id of the terminal entry copy on vseg:events that consumer group `group` handed out for a job
        (producer/events.py: later copies are duplicates); expires with the job's results."""
        return f"{self.job(job_id)}:terminal-seen:{group}"

    def job_alerts(self, job_id: str) -> str:
        """One job's zone and line events (the same entries as on `alerts`); expires with the job's results.
        Not the results stream: its entry ids are frame numbers, so no other writer may add to it."""
        return f"{self.job(job_id)}:alerts"

    def zone_state(self, job_id: str) -> str:
        """Where the events consumer stands on a job: each object's zones, sides of lines and dwell, as of the
        last frame it judged (producer/alerts.py); a restart resumes from it."""
        return f"{self.job(job_id)}:zone-state"

    def worker_health(self, worker: str) -> str:
        """Key a live worker refreshes (JSON: worker, host, at, jobs_done, state idle/busy/broken, reason,
        job_id, frames_done); it expires when the worker stops."""
        return f"{self.prefix}:worker:{worker}"


class JobState(str, enum.Enum):
    """A job's `state` field in its hash (`vseg:job:{id}`, the braces its hash tag). The Lua scripts that write or compare a state
    take it as an ARGV from here, so Python and Lua share one spelling.

    queued (submitted, or handed back by a worker) -> running (a worker started an attempt) -> one of
    the terminal states; retrying: an attempt failed transiently or stalled, the job runs again.
    """

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD = "dead"

    def __str__(self) -> str:  # the wire spelling, also in f-strings and str(): never "JobState.QUEUED"
        return self.value


# A job's state ends in one of these; none is ever left. Members compare equal to their decoded strings
# (`"dead" in TERMINAL_STATES`).
TERMINAL_STATES: tuple[JobState, ...] = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.DEAD)


def terminal_states_arg() -> str:
    """TERMINAL_STATES as one Lua ARGV: space-separated (no state has a space)."""
    return " ".join(s.value for s in TERMINAL_STATES)


# Entry ids on a job's result stream are derived from the frame index, so Redis itself rejects a
# second copy of a frame (XADD with an id <= the stream's last id fails) and readers get frames in
# order: `started` is 0-1, frame k is (k+1)-0, and the one terminal entry has the fixed id
# TERMINAL_ENTRY_ID (2^53 - 1, safe in every client's integers), so no write can follow it and the
# id does not depend on a frame count that a streamed video only knows at its end.
STARTED_ENTRY_ID = "0-1"
TERMINAL_ENTRY_ID = "9007199254740991-0"
# vseg:events is a log for observers: trimming it loses no work. Approximate (`MAXLEN ~`): every XADD to it
# trims to this, and the worker's housekeeping XTRIMs to it.
EVENTS_MAXLEN = 100_000


def frame_entry_id(frame_idx: int) -> str:
    if frame_idx < 0:
        raise ValueError(f"frame_idx must be >= 0, but got {frame_idx}")
    return f"{frame_idx + 1}-0"


def object_entry_id(frame_idx: int, k: int) -> str:
    """The k-th object change taking effect at frame F: id `F-(k+2)`, after frame F-1's entry (at `F-0`) and
    after `started` (`0-1`), before frame F's (at `(F+1)-0`); fixed, so a rerun's duplicate is refused."""
    if frame_idx < 0 or k < 0:
        raise ValueError(f"frame_idx and k must be >= 0, but got {frame_idx}, {k}")
    return f"{frame_idx}-{k + 2}"


def frames_end_entry_id(num_frames: int) -> str:
    """Id of the end marker on a job's frames stream (frame k is announced at (k+1)-0)."""
    return f"{num_frames + 1}-0"

