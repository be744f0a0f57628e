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
backfill (Session.backfill, worker/model/session.py: `update` entries for the earlier frames); a live job's prompts,
whatever frame they name, apply at the next frame processed. Every change is held until the runner
puts the frame it takes effect on (`flush`): the session, a model process, may be frames ahead.

By concern: reading the stream (worker/service/control_reader.py, its own thread), holding and writing the
changes in order with the frames (worker/service/control_changes.py), where a prompt applies on a live or a
file job (`prompt_target`), and here applying commands and replays to the session, within the object limit.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

import redis

from runtime.settings import Settings
from schemas import messages
from schemas.errors import PromptError
from schemas.names import Keys
from schemas.prompts import ObjectPrompt
from worker.broker.publish import object_result
from worker.model.session import Session
from worker.service.control_changes import Command, HeldChanges, Sink
from worker.service.control_reader import ControlReader, stream_id
from worker.service.outcomes import STOPPED, outcome_of

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Replay:
    """A recorded change of an earlier attempt, to apply again when the session reaches its frame."""

    command: Command
    change: messages.ObjectChange


def prompt_target(prompt: ObjectPrompt, *, now: bool, live: bool, position: int) -> tuple[int, str]:
    """The session frame a running job's prompt takes effect on, and a note when it is not the frame it names:
    a live job's frames are not kept, so its prompts apply at the next frame processed; a file job's prompt on
    a frame not yet segmented applies there, one on a frame already segmented (or `now`) at the next."""
    if live:
        return position, "" if now else (f"a live job applies prompts from the next frame it processes, not "
                                         f"frame {prompt.frame_idx}")
    target = prompt.frame_idx if not now and prompt.frame_idx >= position else position
    return target, "" if target == prompt.frame_idx or now else (
        f"frame {prompt.frame_idx} was already segmented: applied from the next frame processed")


class ControlFeed:
    """One attempt's commands applied to its session (see the module doc)."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings, job_id: str,
                 reachable: Callable[[], bool] = lambda: True, *, live: bool = False,
                 backfills: bool = False) -> None:
        self.live = live  # every prompt and replay applies at the next frame processed (frames are not kept)
        self.backfills = backfills  # a file job's: prompts on frames already published propagated backwards
        self.settings = settings
        self.job_id = job_id
        self.reader = ControlReader(client, keys, job_id, reachable)
        self.changes = HeldChanges(job_id, self.reader.ids)
        self._new: list[Command] = []  # read, not applied yet
        self._replays: dict[int, list[Replay]] = defaultdict(list)

    # ---- an attempt's start -----------------------------------------------------------------------
    def load(self, start_frame: int) -> None:
        """Read every command so far and what earlier attempts recorded of them; schedule the replays at
        frames from `start_frame` on (those before it are in the frames already published)."""
        recorded = self.reader.recorded()
        done_id = self.reader.done_id()
        for command in self.reader.read():
            changes = recorded.get(command.request_id)
            if not changes:
                if stream_id(self.reader.ids[command.request_id]) <= done_id:
                    continue  # applied by an earlier attempt, its record trimmed away (a live job's stream)
                self._new.append(command)
                continue
            for change in changes:
                if change.change != "refused" and change.frame_idx >= start_frame:
                    self._replays[change.frame_idx].append(Replay(command, change))
        if recorded or self._replays:
            log.info("job %s: %d recorded object changes replayed from frame %d on", self.job_id,
                     sum(len(r) for r in self._replays.values()), start_frame)

    def start(self) -> ControlFeed:
        self.reader.start()
        return self

    def stop(self) -> None:
        self.reader.stop()

    # ---- between frames ---------------------------------------------------------------------------
    def apply(self, session: Session) -> None:
        """Apply what is due to the session before its next frame: replays recorded for it, then new
        commands. What each did is written when the runner reaches its frame (`flush`)."""
        for frame in sorted(f for f in self._replays if self.live or f <= session.position):  # passed: now
            for replay in self._replays.pop(frame):
                try:
                    self._replay(session, replay)
                except Exception as e:  # noqa: BLE001 - a replay must not fail its job either (a stop ends it)
                    if outcome_of(e) in STOPPED:
                        raise
                    log.exception("job %s: replaying request %s failed; going on without it", self.job_id,
                                  replay.command.request_id)
        self._new.extend(self.reader.arrived())
        while self._new:
            command = self._new.pop(0)
            try:
                if isinstance(command, messages.RemoveCommand):
                    self._remove(session, command)
                else:
                    self._prompt(session, command)
            except Exception as e:  # noqa: BLE001 - a command must never fail its job: it is refused, with why
                if outcome_of(e) in STOPPED:  # (a stop ends the attempt)
                    raise
                log.exception("job %s: command %s could not be applied", self.job_id, command.request_id)
                obj_ids = [command.obj_id] if isinstance(command, messages.RemoveCommand) else sorted(
                    {p.obj_id for p in command.prompts} | ({messages.TEXT_OBJ_ID} if command.text else set()))
                for obj_id in obj_ids:
                    self.changes.hold(session.position, command, obj_id, "refused", -1,
                                      f"the worker could not apply it: {type(e).__name__}: {e}")

    def flush(self, session_frame: int, frame_idx: int, sink: Sink) -> None:
        """Write the changes taking effect at session frame `session_frame` (frame `frame_idx` of the job) or
        before, just before that frame's entry (worker/service/control_changes.py)."""
        self.changes.flush(session_frame, frame_idx, sink)

    def reserve(self, frame_idx: int, count: int) -> list[str]:
        """`count` entry ids just before frame `frame_idx`'s entry, after those given out so far there."""
        return self.changes.reserve(frame_idx, count)

    def note(self, session_frame: int, obj_id: int, change: str, *, label: str = "", note: str = "",
             source: str = "auto") -> None:
        """A change the model made (an automatic object's, worker/service/auto.py; a text instance's, source
        `text`), written when the runner reaches its frame."""
        self.changes.hold(session_frame, None, obj_id, change, -1, note, label, source=source)

    def _prompt(self, session: Session, command: messages.PromptCommand) -> None:
        if command.text:
            self._text(session, command)
        if not command.prompts:
            return
        known = set(session.obj_ids)
        new_ids = {p.obj_id for p in command.prompts} - known
        if len(known) + len(new_ids) > self.settings.max_objects:
            for obj_id in sorted({p.obj_id for p in command.prompts}):
                self.changes.hold(session.position, command, obj_id, "refused", -1,
                                  f"the job would track {len(known) + len(new_ids)} objects, over the limit of "
                                  f"{self.settings.max_objects} (VSEG_MAX_OBJECTS)")
            return
        for p in command.prompts:
            requested = -1 if command.now else p.frame_idx
            target, note = prompt_target(p, now=command.now, live=self.live, position=session.position)
            change = "corrected" if p.obj_id in session.obj_ids else "added"
            try:
                if target != p.frame_idx and not command.now and not self.live and self._backfilled(session, command,
                                                                                                     p, change):
                    continue
                target = self._add(session, replace(p, frame_idx=target))
            except PromptError as e:  # a model that cannot take it (SAM 3: no backfill): refused, with why
                self.changes.hold(session.position, command, p.obj_id, "refused", requested, str(e))
                continue
            self.changes.hold(target, command, p.obj_id, change, requested, note)

    def _text(self, session: Session, command: messages.PromptCommand) -> None:
        """A command's phrases, looked for from the next frame on: one `text` entry per phrase (obj_id
        TEXT_OBJ_ID), or `refused` with why (a model that takes no text)."""
        try:
            session.add_text(command.text)
        except PromptError as e:
            for phrase in command.text:
                self.changes.hold(session.position, command, messages.TEXT_OBJ_ID, "refused", -1, str(e), phrase)
            return
        for phrase in command.text:
            self.changes.hold(session.position, command, messages.TEXT_OBJ_ID, "text", -1,
                              f"every instance of {phrase!r} is looked for from here on", phrase)

    def _backfilled(self, session: Session, command: messages.PromptCommand, p: ObjectPrompt, change: str) -> bool:
        """A prompt on a frame already published, propagated backwards (Session.backfill): its earlier frames as
        `update` entries, the object from the frame the session resolves on. False: not for this job (live)."""
        if not self.backfills:
            return False
        done = session.backfill(p)
        self.changes.hold_updates(done.upto, [
            messages.FrameUpdate(self.job_id, k, (object_result(p.obj_id, done.masks[k], done.scores[k]),),
                                 request_id=command.request_id) for k in range(done.upto)])
        upto = done.upto
        self.changes.hold(upto, command, p.obj_id, change, p.frame_idx,
                          f"prompted on frame {p.frame_idx}, already segmented: propagated from there, frames "
                          f"0..{upto - 1} updated (update entries)")
        return True

    def _add(self, session: Session, prompt: ObjectPrompt) -> int:
        """Add one prompt, from its frame or, if the session has computed that frame meanwhile (a model process
        ahead of what the worker has read), from the next it computes. Returns the frame it takes effect on."""
        session.add_prompts([prompt], or_next=True)
        return max(prompt.frame_idx, session.position)

    def _remove(self, session: Session, command: messages.RemoveCommand) -> None:
        try:
            session.remove_object(command.obj_id)
        except PromptError as e:
            self.changes.hold(session.position, command, command.obj_id, "refused", -1, str(e))
            return
        self.changes.hold(session.position, command, command.obj_id, "removed", -1, "")

    def _replay(self, session: Session, replay: Replay) -> None:
        change, command = replay.change, replay.command
        frame = session.position if self.live else max(change.frame_idx, session.position)
        try:
            if change.change == "removed":
                session.remove_object(change.obj_id)
                frame = session.position
            elif change.change == "text":  # a phrase: looked for again from here
                session.add_text([change.label])
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
        self.changes.hold(frame, command, change.obj_id, change.change, change.requested_frame, change.note)

