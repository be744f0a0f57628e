"""Prompts on a running job, from the client side: check them, send them on the job's control stream
(`vseg:control:{job_id}`), and wait a while for what the worker did with them.

Everything is checked here before anything is written: the job exists and has not ended, the prompts lie
inside its frames (a streamed job still decoding: frames below the per-job limit, VSEG_MAX_FRAMES), the
objects it would then track stay within VSEG_MAX_OBJECTS, and a removed object is one the job has had.
The command then goes on the control stream in one step with a last look at the job's state, which also
takes the result stream's last id: the worker's `object` entries for it (one per object: added,
corrected, removed, or refused with a note) can only come after that id, so one XREAD from there sees
them. A job already finished when the command lands gets nothing written.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import redis

from producer.enqueue import lane_keys
from producer.prompts import build_prompts
from runtime.connection import connect
from runtime.faults import redact_url
from runtime.limits import LimitError
from runtime.lua import lua, register
from runtime.settings import Settings
from schemas import messages
from schemas.errors import PromptError, SchemaError, UnknownJobError, VsegError
from schemas.names import TERMINAL_STATES, terminal_states_arg, validate_job_id
from schemas.prompts import ObjectPrompt, object_ids, validate_prompts

log = logging.getLogger(__name__)

NOW = "@now"
READ_BLOCK_MS = 1000  # one XREAD while waiting for the reply: below the quick client's socket timeout


_PROMPTS_ONLY = "prompts apply only to a running or queued job"
_REMOVE_ONLY = "objects can be removed only from a running or queued job"


class JobEndedError(VsegError):
    """The job has already ended (completed, failed, cancelled, dead): it takes no more commands."""


class UnknownObjectError(VsegError, LookupError):
    """A removal names an object id the job never had."""


class PromptRefused(VsegError):
    """The worker refused every change a command asked for (the job goes on unharmed)."""


# KEYS: job hash, control stream, results stream. ARGV: the terminal states (space-separated), the entry's
# type and data. Returns {-1, ''} unknown job, {0, state} already ended (nothing written), or {1, the
# command's id, the result stream's last id before it}. A job hash with an expiry passes it on to the
# control stream, so that nothing outlives the job.
_SEND_LUA = lua("send_command", """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1, ''} end
if string.find(' ' .. ARGV[1] .. ' ', ' ' .. state .. ' ', 1, true) then return {0, state} end
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
local last_id = '0-0'
if #last > 0 then last_id = last[1][1] end
local id = redis.call('XADD', KEYS[2], '*', 'type', ARGV[2], 'data', ARGV[3])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return {1, id, last_id}
""")


def split_now(specs: Sequence[str]) -> tuple[list[str], bool]:
    """`--point 3:10,20@now` -> ('3:10,20', True): the spec without its `@now`, and whether any had one."""
    out, now = [], False
    for spec in specs:
        bare = spec.strip()
        if bare.lower().endswith(NOW) and "@" not in bare[: -len(NOW)]:
            bare, now = bare[: -len(NOW)], True
        out.append(bare)
    return out, now


def cli_prompts(points: Sequence[str] = (), boxes: Sequence[str] = (), json_file: Path | None = None,
                now: bool = False) -> tuple[list[ObjectPrompt], bool]:
    """The prompts of `python -m producer prompt` (submit's syntax, plus `@now` for `--now`) and whether they
    apply now. Raises PromptError, before anything is sent."""
    points, now_p = split_now(points)
    boxes, now_b = split_now(boxes)
    now = now or now_p or now_b
    prompts = build_prompts(points=points, boxes=boxes, json_file=json_file)
    if not prompts:
        raise PromptError("no prompts: give at least one --point OBJ:X,Y, --box OBJ:X0,Y0,X1,Y1 or --prompts FILE")
    if now:
        for p in prompts:
            if p.frame_idx:
                raise PromptError(f"object {p.obj_id}: a prompt names frame {p.frame_idx}, but --now (or @now) applies "
                                  f"it at the next frame the worker processes; give one or the other")
    return prompts, now


@dataclass(frozen=True)
class PromptReply:
    """What became of a command: the worker's `object` entries for it that came within the wait (one per
    object it names), and `ended` (the job's terminal entry type) if the job ended meanwhile."""

    job_id: str
    request_id: str
    obj_ids: tuple[int, ...]
    changes: tuple[messages.ObjectChange, ...] = ()
    wait_s: float = 0.0
    ended: str = ""

    @property
    def pending(self) -> tuple[int, ...]:
        """Objects with no reply yet."""
        done = {c.obj_id for c in self.changes}
        return tuple(o for o in self.obj_ids if o not in done)

    @property
    def refused(self) -> bool:
        """Every object of the command has a reply, and every reply is a refusal."""
        return bool(self.changes) and not self.pending and all(c.change == "refused" for c in self.changes)

    def describe(self) -> str:
        """What `python -m producer prompt` and `remove` print: a line per object."""
        lines = [_change_line(c) for c in sorted(self.changes, key=lambda c: c.obj_id)]
        if not self.pending:
            return "\n".join(lines)
        if self.ended:
            why = f"the job ended ({self.ended}) before a worker applied it"
        elif self.wait_s > 0:
            why = (f"no worker has applied it within {self.wait_s:g} s; it applies when the job's worker reaches it "
                   f"(a queued job: from its first frame)")
        else:
            why = "it applies when the job's worker reaches it (a queued job: from its first frame)"
        which = "" if not self.changes else f" for object{'s' if len(self.pending) > 1 else ''} " \
                                            f"{', '.join(map(str, self.pending))}"
        return "\n".join([*lines, f"sent (request {self.request_id}){which}: {why}"])

    def raise_if_refused(self) -> None:
        if self.refused:
            raise PromptRefused(f"job {self.job_id} refused request {self.request_id}: "
                                + "; ".join(_change_line(c) for c in sorted(self.changes, key=lambda c: c.obj_id)))


def _change_line(change: messages.ObjectChange) -> str:
    if change.obj_id == messages.TEXT_OBJ_ID:
        what = f"text {change.label!r}"
        return (f"{what} refused: {change.note or 'no reason given'}" if change.change == "refused"
                else f"{what} looked for from frame {change.frame_idx}")
    if change.change == "refused":
        return f"object {change.obj_id} refused: {change.note or 'no reason given'}"
    line = f"object {change.obj_id} {change.change} from frame {change.frame_idx}"
    return f"{line} ({change.note})" if change.note else line


@dataclass(frozen=True)
class _Job:
    """What the client knows of a job that takes commands."""

    job: messages.JobMessage
    total_frames: int | None  # None: a streamed job still decoding (num_frames is the estimate)
    tracked: frozenset[int]  # its objects now: the job's, plus those prompted since, less those removed
    ever: frozenset[int]  # every object it has had


def add_prompts(job_id: str, prompts: Sequence[ObjectPrompt], *, settings: Settings, now: bool = False,
                wait_s: float = 10.0, client: redis.Redis | None = None) -> PromptReply:
    """Add objects to a running or queued job, or correct its objects, from each prompt's frame on (`now`:
    from the next frame its worker processes, whatever frame the prompt names); wait up to `wait_s` for the
    worker's reply (0: do not wait).

    Raises, with nothing written: JobIdError, UnknownJobError, JobEndedError (the job has ended), PromptError
    (outside the frame, past the last frame, malformed), LimitError (over VSEG_MAX_OBJECTS); redis-py's errors
    if Redis refuses. Waiting ends early once every object has its reply, or when the job ends."""
    validate_job_id(job_id)
    prompts = list(prompts)
    client = client or connect(settings)
    job = _read_job(client, settings, job_id, _PROMPTS_ONLY)
    _check_prompts(job, prompts, settings, now)
    new = set(object_ids(prompts))
    count = len(job.tracked | new)
    if count > settings.max_objects:
        raise LimitError(f"job {job_id} would track {count} objects, over the limit of {settings.max_objects} "
                         f"(VSEG_MAX_OBJECTS); remove one first, or split the objects over jobs")
    command = messages.PromptCommand(job_id, uuid.uuid4().hex, tuple(prompts), now=now)
    return _send_and_wait(client, settings, command, tuple(sorted(new)), wait_s, _PROMPTS_ONLY)


def add_text(job_id: str, phrases: Sequence[str], *, settings: Settings, wait_s: float = 10.0,
             client: redis.Redis | None = None) -> PromptReply:
    """Look for every instance of these phrases too in a running or queued job with text (SAM 3), from the next
    frame its worker processes; wait up to `wait_s` for the worker's reply (one `text` entry per phrase, obj_id
    TEXT_OBJ_ID; the instances found come as `added` entries as they show).

    Raises, with nothing written: PromptError (an empty phrase, or a job without text: its worker's model takes
    none), and as `add_prompts` does."""
    validate_job_id(job_id)
    clean = tuple(p.strip() for p in phrases)
    if not clean or not all(clean):
        raise PromptError(f"--text needs phrases such as \"ball, referee\", but got {list(phrases)!r}")
    client = client or connect(settings)
    job = _read_job(client, settings, job_id, _PROMPTS_ONLY)
    if not job.job.text:
        raise PromptError(f"job {job_id} was submitted without --text, so its worker's model takes no phrases: submit "
                          "a job with --text (a SAM 3 worker takes it)")
    command = messages.PromptCommand(job_id, uuid.uuid4().hex, (), text=clean)
    return _send_and_wait(client, settings, command, (messages.TEXT_OBJ_ID,), wait_s, _PROMPTS_ONLY)


def remove_object(job_id: str, obj_id: int, *, settings: Settings, wait_s: float = 10.0,
                  client: redis.Redis | None = None) -> PromptReply:
    """Stop tracking object `obj_id` of a running or queued job from the next frame its worker processes;
    wait up to `wait_s` for the reply. Raises as `add_prompts` does, and UnknownObjectError for an object
    the job never had. A job with automatic objects (`--auto`) has objects only its worker knows: an id the
    client does not know is sent all the same, and the worker's reply says whether it had it."""
    validate_job_id(job_id)
    if isinstance(obj_id, bool) or not isinstance(obj_id, int) or obj_id < 0:
        raise PromptError(f"an object id must be an integer >= 0, but got {obj_id!r}")
    client = client or connect(settings)
    job = _read_job(client, settings, job_id, _REMOVE_ONLY)
    if obj_id not in job.ever and job.job.auto is None and not job.job.text:
        removed = sorted(job.ever - job.tracked)
        raise UnknownObjectError(f"job {job_id} has no object {obj_id} (its objects now: "
                                 f"{', '.join(map(str, sorted(job.tracked))) or 'none'}"
                                 + (f"; removed: {', '.join(map(str, removed))})" if removed else ")"))
    command = messages.RemoveCommand(job_id, uuid.uuid4().hex, obj_id)
    return _send_and_wait(client, settings, command, (obj_id,), wait_s, _REMOVE_ONLY)


def _unknown(settings: Settings, job_id: str) -> UnknownJobError:
    return UnknownJobError(f"no job {job_id!r} in Redis at {redact_url(settings.redis_url)} "
                           f"(never submitted, or expired)")


def _ended(job_id: str, state: str, what: str) -> JobEndedError:
    return JobEndedError(f"job {job_id} is already {state}: {what}")


def _read_job(client: redis.Redis, settings: Settings, job_id: str, what: str) -> _Job:
    keys = settings.keys
    state, entry_id, lane = cast(list[bytes | None], client.hmget(keys.job(job_id), ["state", "entry_id", "lane"]))
    keys = lane_keys(keys, lane)
    if state is None:
        raise _unknown(settings, job_id)
    if state.decode() in TERMINAL_STATES:
        raise _ended(job_id, state.decode(), what)
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]],
                   client.xrange(keys.jobs, entry_id, entry_id) if entry_id else [])
    if not entries:
        raise VsegError(f"job {job_id} is {state.decode()} but its entry on {keys.jobs} is gone, so its frames "
                        f"cannot be checked; it is probably ending: see python -m producer status {job_id}")
    job = messages.decode(entries[0][1])
    if not isinstance(job, messages.JobMessage):
        raise SchemaError(f"entry {entry_id.decode() if entry_id else ''} of job {job_id} is a {job.TYPE.value} "
                          f"entry, not a job")
    total: int | None = job.num_frames
    if job.frames_stream:
        # this layout's name, not the entry's (a job migrated from the old key layout names the old one)
        last = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrevrange(keys.frames(job_id), count=1))
        total = int(last[0][1][b"end"]) if last and b"end" in last[0][1] else None
    tracked = set(object_ids(job.prompts))
    ever = set(tracked)
    for command in _commands(client, settings, job_id):
        if isinstance(command, messages.PromptCommand):
            tracked |= set(object_ids(command.prompts))
            ever |= set(object_ids(command.prompts))
        else:
            tracked.discard(command.obj_id)
    return _Job(job, total, frozenset(tracked), frozenset(ever))


def _commands(client: redis.Redis, settings: Settings, job_id: str
              ) -> list[messages.PromptCommand | messages.RemoveCommand]:
    stream = settings.keys.control(job_id)
    out: list[messages.PromptCommand | messages.RemoveCommand] = []
    for entry_id, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream)):
        try:
            msg = messages.decode(fields)
        except SchemaError as e:
            log.warning("skipping undecodable entry %s on %s: %s", entry_id, stream, e)
            continue
        if isinstance(msg, (messages.PromptCommand, messages.RemoveCommand)):
            out.append(msg)
    return out


def _check_prompts(job: _Job, prompts: list[ObjectPrompt], settings: Settings, now: bool) -> None:
    """PromptError unless every prompt lies inside the job's frames (with `now` the frame is the worker's)."""
    if not prompts:
        raise PromptError("no prompts: give at least one point or box")
    width, height = job.job.width, job.job.height
    if now or job.job.live:  # a live job keeps no frames: every prompt applies at the next frame it processes
        seen: set[int] = set()
        which = "prompts applied now" if now else "a live job's prompts (applied at the next frame it processes)"
        for p in prompts:
            if p.obj_id in seen:
                raise PromptError(f"object {p.obj_id} has two prompts, but {which} take one per object: merge them")
            seen.add(p.obj_id)
        validate_prompts([replace(p, frame_idx=0) for p in prompts], width=width, height=height, num_frames=1,
                         frame_word=False)
        return
    if job.total_frames is None:  # still decoding: the total is not known yet
        for p in prompts:
            if p.frame_idx >= settings.max_frames:
                raise PromptError(f"prompt for object {p.obj_id} is on frame {p.frame_idx}, past the per-job limit of "
                                  f"{settings.max_frames} frames (VSEG_MAX_FRAMES; the video is still being decoded, "
                                  f"about {job.job.num_frames} frames expected)")
    validate_prompts(prompts, width=width, height=height,
                     num_frames=job.total_frames if job.total_frames is not None else settings.max_frames)


def _send_and_wait(client: redis.Redis, settings: Settings, command: messages.PromptCommand | messages.RemoveCommand,
                   obj_ids: tuple[int, ...], wait_s: float, what: str) -> PromptReply:
    keys = settings.keys
    job_id = command.job_id
    fields = messages.encode(command)
    send = register(client, "send_command")  # EVALSHA (SCRIPT LOAD once, after a NOSCRIPT)
    reply = cast(list[Any], send(keys=[keys.job(job_id), keys.control(job_id), keys.results(job_id)],
                                 args=[terminal_states_arg(), fields["type"], fields["data"]]))
    code = int(reply[0])
    if code == -1:
        raise _unknown(settings, job_id)
    if code == 0:
        raise _ended(job_id, _text(reply[1]), what)
    entry_id, last_id = _text(reply[1]), _text(reply[2])
    log.debug("job %s: sent %s %s (request %s) at %s", job_id, command.TYPE.value,
             "objects " + ", ".join(map(str, obj_ids)), command.request_id, entry_id)
    result = PromptReply(job_id, command.request_id, obj_ids, wait_s=max(0.0, wait_s))
    if wait_s <= 0:
        return result
    changes, ended = _wait(client, settings, job_id, command.request_id, set(obj_ids), last_id, wait_s)
    return replace(result, changes=tuple(changes), ended=ended)


def _wait(client: redis.Redis, settings: Settings, job_id: str, request_id: str, pending: set[int],
          after_id: str, wait_s: float) -> tuple[list[messages.ObjectChange], str]:
    """The `object` entries for `request_id` after `after_id` on the result stream, until every object in
    `pending` has one, the job's terminal entry, or `wait_s`. A Redis outage ends the wait (the command
    was sent)."""
    stream = settings.keys.results(job_id)
    deadline = time.monotonic() + wait_s
    changes: list[messages.ObjectChange] = []
    last: bytes | str = after_id
    while pending:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            break
        try:
            reply = cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]],
                         client.xread({stream: last}, count=256, block=max(1, min(left_ms, READ_BLOCK_MS,
                                                                                  settings.block_ms))))
        except (redis.ConnectionError, redis.TimeoutError) as e:
            log.warning("stopped waiting for the reply to request %s of job %s: Redis does not answer (%s)",
                        request_id, job_id, e)
            break
        for entry_id, fields in reply[0][1] if reply else ():
            last = entry_id
            try:
                msg = messages.decode(fields)
            except SchemaError:
                continue
            if isinstance(msg, messages.ObjectChange) and msg.request_id == request_id and msg.obj_id in pending:
                pending.discard(msg.obj_id)
                changes.append(msg)
            elif isinstance(msg, messages.TERMINAL_TYPES):
                return changes, msg.TYPE.value
    return changes, ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
