"""Prompts on a running job: the job's control stream (`vseg:control:{job_id}`) applied to its session.

`python -m producer prompt` and `remove` add commands there (checked at the client). A reader thread
reads new ones every POLL_S (off the model's thread: a hung Redis must not hold it up), and between two
frames the job's runner applies them to the session: a prompt on a frame the model has not reached takes effect there; one on a frame already
segmented (or with `now`) takes effect at the next frame the model processes, and says so. Each object a
command touches gets an `object` entry (added, corrected, removed, or refused with the reason: the job
goes on unharmed) at a fixed id just before the frame it takes effect on, queued through the result sink
so it lands in order with the frames, and copied to vseg:events.

Durable: the commands stay on the stream, and what each did is on the result stream. Another attempt
(a reclaimed or retried job) replays them: a command's recorded changes are applied again at their
recorded frames (a resumed attempt skips those at or before its seed frame: the seed masks already hold
them), and a command with no recorded change is applied as new, unless the job's `control_done` says an
earlier attempt applied it (a live job's trimmed stream may have lost the record). Rewritten entries
are refused by Redis as duplicates.

A prompt on a frame a file job has already published is propagated backwards from it by the runner's
backfill (worker/service/backfill.py: `update` entries for the earlier frames); a live job's prompts,
whatever frame they name, apply at the next frame processed. Every change is held until the runner
puts the frame it takes effect on (`flush`): the session, a model process, may be frames ahead.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import cast

import redis

from runtime.logs import ContextThread
from runtime.settings import Settings
from schemas import messages
from schemas.errors import PromptError, SchemaError, WorkerBroken
from schemas.names import TERMINAL_ENTRY_ID, Keys, object_entry_id
from schemas.prompts import ObjectPrompt
from worker.broker.lease import LeaseLost
from worker.broker.publish import JobCancelled
from worker.model.session import MaskPrompt, Session
from worker.service.shutdown import HandBack

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the runner looks for new commands (one XRANGE on the control stream)

Put = Callable[[str, messages.ObjectChange, str], None]  # the sink's put_change: entry id, change, command id
# prompts on frames already published (worker/service/backfill.py): (prompt, the session's position, request id) ->
# the object's mask prompt at the position, its earlier frames queued as `update` entries; None: not possible here
Backfill = Callable[[ObjectPrompt, int, str], MaskPrompt | None]


@dataclass(frozen=True)
class _Held:
    """An object change waiting for the runner to reach its session frame."""

    frame: int  # in the session's numbering
    command: messages.PromptCommand | messages.RemoveCommand | None  # None: an automatic object's change
    obj_id: int
    change: str
    requested: int
    note: str
    label: str = ""


@dataclass(frozen=True)
class Replay:
    """A recorded change of an earlier attempt, to apply again when the session reaches its frame."""

    command: messages.PromptCommand | messages.RemoveCommand
    change: messages.ObjectChange


class ControlFeed:
    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings, job_id: str,
                 reachable: Callable[[], bool] = lambda: True, *, live: bool = False) -> None:
        self.client = client
        self.live = live  # every prompt and replay applies at the next frame processed (frames are not kept)
        self.backfill: Backfill | None = None  # set by the runner of a file job
        self.reachable = reachable  # False while the job's lease is presumed lost (Redis away): no reads then
        self.keys = keys
        self.settings = settings
        self.job_id = job_id
        self.last_id = "0-0"
        self._new: list[messages.PromptCommand | messages.RemoveCommand] = []  # read, not applied yet
        self._arrived: list[messages.PromptCommand | messages.RemoveCommand] = []  # from the reader thread
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reader: ContextThread | None = None
        self._replays: dict[int, list[Replay]] = defaultdict(list)
        self._per_frame: dict[int, int] = defaultdict(int)  # object entries written for each frame, this attempt
        self._ids: dict[str, str] = {}  # request id -> its entry id on the control stream
        # changes not yet written: each waits until the runner puts the frame it takes effect on (stream ids only
        # grow, and the session, a model process, may be frames ahead of what the runner has put)
        self._held: list[_Held] = []

    # ---- an attempt's start -----------------------------------------------------------------------
    def load(self, start_frame: int) -> None:
        """Read every command so far and what earlier attempts recorded of them; schedule the replays at
        frames from `start_frame` on (those before it are in the frames already published)."""
        recorded: dict[str, list[messages.ObjectChange]] = defaultdict(list)
        for _entry_id, fields in self._xrange(self.keys.results(self.job_id), "0-0", f"({TERMINAL_ENTRY_ID}"):
            if fields.get(b"type") != messages.EntryType.OBJECT.value.encode():
                continue  # frames (most of the stream): not decoded
            msg = _decode(fields)
            if isinstance(msg, messages.ObjectChange) and msg.request_id:
                recorded[msg.request_id].append(msg)
        done = self.client.hget(self.keys.job(self.job_id), "control_done")
        done_id = _stream_id(done.decode() if isinstance(done, bytes) else "0-0")
        for command in self._read_commands():
            changes = recorded.get(command.request_id)
            if not changes:
                if _stream_id(self._ids[command.request_id]) <= done_id:
                    continue  # applied by an earlier attempt, its record trimmed away (a live job's stream)
                self._new.append(command)
                continue
            for change in changes:
                if change.change != "refused" and change.frame_idx >= start_frame:
                    self._replays[change.frame_idx].append(Replay(command, change))
        if recorded or self._replays:
            log.info("job %s: %d recorded object changes replayed from frame %d on", self.job_id,
                     sum(len(r) for r in self._replays.values()), start_frame)

    # ---- the reader thread: a hung Redis must not hold up the model's thread ------------------------
    def start(self) -> ControlFeed:
        self._reader = ContextThread(target=self._read_loop, daemon=True, name=f"control-{self.job_id}")
        self._reader.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _read_loop(self) -> None:
        while not self._stop.wait(POLL_S):
            if not self.reachable():
                continue
            try:
                commands = self._read_commands()
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as e:
                # Redis away (or full): the job's lease decides what happens to the job; commands wait
                log.debug("job %s: control stream not read (%s); trying again", self.job_id, e)
                continue
            with self._lock:
                self._arrived.extend(commands)

    # ---- between frames ---------------------------------------------------------------------------
    def apply(self, session: Session) -> None:
        """Apply what is due to the session before its next frame: replays recorded for it, then new
        commands. What each did is written when the runner reaches its frame (`flush`)."""
        for frame in sorted(f for f in self._replays if self.live or f <= session.position):  # passed: now
            for replay in self._replays.pop(frame):
                try:
                    self._replay(session, replay)
                except (LeaseLost, JobCancelled, HandBack, WorkerBroken):
                    raise
                except Exception:  # noqa: BLE001 - a replay must not fail its job either
                    log.exception("job %s: replaying request %s failed; going on without it", self.job_id,
                                  replay.command.request_id)
        with self._lock:
            self._new.extend(self._arrived)
            self._arrived.clear()
        while self._new:
            command = self._new.pop(0)
            try:
                if isinstance(command, messages.RemoveCommand):
                    self._remove(session, command)
                else:
                    self._prompt(session, command)
            except (LeaseLost, JobCancelled, HandBack, WorkerBroken):
                raise
            except Exception as e:  # noqa: BLE001 - a command must never fail its job: it is refused, with why
                log.exception("job %s: command %s could not be applied", self.job_id, command.request_id)
                obj_ids = [command.obj_id] if isinstance(command, messages.RemoveCommand) else sorted(
                    {p.obj_id for p in command.prompts})
                for obj_id in obj_ids:
                    self._hold(session.position, command, obj_id, "refused", -1,
                               f"the worker could not apply it: {type(e).__name__}: {e}")

    def flush(self, session_frame: int, frame_idx: int, put: Put) -> None:
        """The runner is about to put session frame `session_frame`, frame `frame_idx` of the job: write the
        changes that take effect there or before, at ids just before that frame's entry."""
        due = [h for h in self._held if h.frame <= session_frame]
        if not due:
            return
        self._held = [h for h in self._held if h.frame > session_frame]
        for h in due:
            k = self._per_frame[frame_idx]
            self._per_frame[frame_idx] += 1
            log.info("job %s: object %d %s from frame %d%s", self.job_id, h.obj_id, h.change, frame_idx,
                     f" ({h.note})" if h.note else "")
            request_id = h.command.request_id if h.command is not None else ""
            put(object_entry_id(frame_idx, k), messages.ObjectChange(
                self.job_id, h.obj_id, frame_idx, h.change, request_id=request_id,
                source="prompt" if h.command is not None else "auto", requested_frame=h.requested, note=h.note,
                label=h.label), self._ids.get(request_id, ""))

    def _prompt(self, session: Session, command: messages.PromptCommand) -> None:
        known = set(session.obj_ids)
        new_ids = {p.obj_id for p in command.prompts} - known
        if len(known) + len(new_ids) > self.settings.max_objects:
            for obj_id in sorted({p.obj_id for p in command.prompts}):
                self._hold(session.position, command, obj_id, "refused", -1,
                           f"the job would track {len(known) + len(new_ids)} objects, over the limit of "
                           f"{self.settings.max_objects} (VSEG_MAX_OBJECTS)")
            return
        for p in command.prompts:
            requested = -1 if command.now else p.frame_idx
            if self.live:  # frames are not kept: a prompt applies at the next frame the worker processes
                target = session.position
                note = "" if command.now else (f"a live job applies prompts from the next frame it processes, not "
                                               f"frame {p.frame_idx}")
            else:
                target = p.frame_idx if not command.now and p.frame_idx >= session.position else session.position
                note = "" if target == p.frame_idx or command.now else (
                    f"frame {p.frame_idx} was already segmented: applied from the next frame processed")
            change = "corrected" if p.obj_id in session.obj_ids else "added"
            if target != p.frame_idx and not command.now and not self.live and self._backfilled(session, command, p,
                                                                                                 change):
                continue
            try:
                target = self._add(session, replace(p, frame_idx=target))
            except PromptError as e:
                self._hold(session.position, command, p.obj_id, "refused", requested, str(e))
                continue
            self._hold(target, command, p.obj_id, change, requested, note)

    def _backfilled(self, session: Session, command: messages.PromptCommand, p: ObjectPrompt, change: str) -> bool:
        """A prompt on a frame already published, propagated backwards (worker/service/backfill.py): its earlier
        frames as `update` entries, the object from the session's position on. False: not possible here."""
        if self.backfill is None:
            return False
        position = session.position
        seed = self.backfill(p, position, command.request_id)
        if seed is None:
            return False
        session.add_prompts([seed])
        self._hold(position, command, p.obj_id, change, p.frame_idx,
                   f"prompted on frame {p.frame_idx}, already segmented: propagated from there, frames 0..{position - 1} "
                   f"updated (update entries)")
        return True

    def reserve(self, frame_idx: int, count: int) -> list[str]:
        """`count` entry ids just before frame `frame_idx`'s entry, after those given out so far there."""
        first = self._per_frame[frame_idx]
        self._per_frame[frame_idx] += count
        return [object_entry_id(frame_idx, first + i) for i in range(count)]

    def _add(self, session: Session, prompt: ObjectPrompt) -> int:
        """Add one prompt; a session ahead of what the worker has read (a model process) takes it at its own
        position instead. Returns the frame it takes effect on."""
        try:
            session.add_prompts([prompt])
            return prompt.frame_idx
        except PromptError:
            if prompt.frame_idx >= session.position:
                raise
            later = replace(prompt, frame_idx=session.position)
            session.add_prompts([later])
            return later.frame_idx

    def _remove(self, session: Session, command: messages.RemoveCommand) -> None:
        try:
            session.remove_object(command.obj_id)
        except PromptError as e:
            self._hold(session.position, command, command.obj_id, "refused", -1, str(e))
            return
        self._hold(session.position, command, command.obj_id, "removed", -1, "")

    def _replay(self, session: Session, replay: Replay) -> None:
        change, command = replay.change, replay.command
        frame = session.position if self.live else max(change.frame_idx, session.position)
        try:
            if change.change == "removed":
                session.remove_object(change.obj_id)
                frame = session.position
            else:
                assert isinstance(command, messages.PromptCommand)
                for p in command.prompts:
                    if p.obj_id == change.obj_id:
                        frame = self._add(session, replace(p, frame_idx=frame))
        except PromptError as e:  # the session differs from the earlier attempt's (it resumed from masks)
            log.warning("job %s: replaying %s of object %d at frame %d failed: %s", self.job_id, change.change,
                        change.obj_id, change.frame_idx, e)
            return
        self._hold(frame, command, change.obj_id, change.change, change.requested_frame, change.note)

    def note(self, session_frame: int, obj_id: int, change: str, *, label: str = "", note: str = "") -> None:
        """An automatic object's change (worker/service/auto.py), written when the runner reaches its frame."""
        self._held.append(_Held(session_frame, None, obj_id, change, -1, note, label))

    def _hold(self, frame: int, command: messages.PromptCommand | messages.RemoveCommand, obj_id: int, change: str,
              requested: int, note: str) -> None:
        self._held.append(_Held(frame, command, obj_id, change, requested, note))

    # ---- reading ----------------------------------------------------------------------------------
    def _read_commands(self) -> list[messages.PromptCommand | messages.RemoveCommand]:
        commands: list[messages.PromptCommand | messages.RemoveCommand] = []
        for entry_id, fields in self._xrange(self.keys.control(self.job_id), f"({self.last_id}", "+"):
            self.last_id = entry_id.decode()
            msg = _decode(fields)
            if isinstance(msg, (messages.PromptCommand, messages.RemoveCommand)) and msg.job_id == self.job_id:
                self._ids[msg.request_id] = self.last_id
                commands.append(msg)
            elif msg is not None:
                log.warning("job %s: ignoring a %s entry on %s", self.job_id, msg.TYPE.value,
                            self.keys.control(self.job_id))
        return commands

    def _xrange(self, key: str, start: str, end: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
        if start == "(0-0":
            start = "-"
        return cast(list[tuple[bytes, dict[bytes, bytes]]], self.client.xrange(key, min=start, max=end))


def _stream_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _decode(fields: dict[bytes, bytes]) -> messages.Message | None:
    try:
        return messages.decode(fields)
    except SchemaError as e:
        log.warning("ignoring an entry that does not decode: %s", e)
        return None
