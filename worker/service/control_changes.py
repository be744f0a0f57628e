"""What a job's commands and automatic objects changed, held until the runner puts the frame it takes effect on
(worker/service/control.py): the session, a model process, may be frames ahead of what is published, and
result-stream ids only grow. Each change is then written as an `object` entry at a fixed id just before that
frame's entry (`flush`), after the `update` entries a backfill held for the same frame (the earlier frames'
masks of a prompt on a frame already published: after every frame they correct, before the change)."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

from schemas import messages
from schemas.names import object_entry_id

log = logging.getLogger(__name__)

Command = messages.PromptCommand | messages.RemoveCommand


class Sink(Protocol):
    """Where held entries go (worker/output/sink.py ResultSink), in order with the frames."""

    def put_change(self, entry_id: str, change: messages.ObjectChange, command_id: str = "") -> None: ...

    def put_update(self, entry_id: str, update: messages.FrameUpdate) -> None: ...


@dataclass(frozen=True)
class Held:
    """An object change waiting for the runner to reach its session frame."""

    frame: int  # in the session's numbering
    command: Command | None  # None: an automatic object's change
    obj_id: int
    change: str
    requested: int
    note: str
    label: str = ""
    source: str = "auto"  # prompt (a command) | auto | text: ObjectChange.source


@dataclass(frozen=True)
class HeldUpdates:
    """A backfill's `update` entries, waiting for the runner to reach the frame its object starts on."""

    frame: int  # in the session's numbering
    updates: tuple[messages.FrameUpdate, ...]


class HeldChanges:
    """One attempt's changes not yet written, and the entry ids given out before each frame."""

    def __init__(self, job_id: str, command_ids: dict[str, str]) -> None:
        self.job_id = job_id
        self.command_ids = command_ids  # request id -> its entry id on the control stream (the reader's)
        self._held: list[Held | HeldUpdates] = []
        self._per_frame: dict[int, int] = defaultdict(int)  # object entries written for each frame, this attempt

    def hold(self, frame: int, command: Command | None, obj_id: int, change: str, requested: int, note: str,
             label: str = "", *, source: str = "auto") -> None:
        """A change to write at `frame`: a command's (source `prompt`), else the model's (`source`)."""
        self._held.append(Held(frame, command, obj_id, change, requested, note, label,
                               "prompt" if command is not None else source))

    def hold_updates(self, frame: int, updates: list[messages.FrameUpdate]) -> None:
        self._held.append(HeldUpdates(frame, tuple(updates)))

    def flush(self, session_frame: int, frame_idx: int, sink: Sink) -> None:
        """The runner is about to put session frame `session_frame`, frame `frame_idx` of the job: write the
        changes that take effect there or before, at ids just before that frame's entry."""
        due = [h for h in self._held if h.frame <= session_frame]
        if not due:
            return
        self._held = [h for h in self._held if h.frame > session_frame]
        for h in due:
            if isinstance(h, HeldUpdates):
                for entry_id, update in zip(self.reserve(frame_idx, len(h.updates)), h.updates, strict=True):
                    sink.put_update(entry_id, update)
                continue
            entry_id = self.reserve(frame_idx, 1)[0]
            log.info("job %s: object %d %s from frame %d%s", self.job_id, h.obj_id, h.change, frame_idx,
                     f" ({h.note})" if h.note else "")
            request_id = h.command.request_id if h.command is not None else ""
            sink.put_change(entry_id, messages.ObjectChange(
                self.job_id, h.obj_id, frame_idx, h.change, request_id=request_id,
                source=h.source, requested_frame=h.requested, note=h.note,
                label=h.label), self.command_ids.get(request_id, ""))

    def reserve(self, frame_idx: int, count: int) -> list[str]:
        """`count` entry ids just before frame `frame_idx`'s entry, after those given out so far there."""
        first = self._per_frame[frame_idx]
        self._per_frame[frame_idx] += count
        return [object_entry_id(frame_idx, first + i) for i in range(count)]
