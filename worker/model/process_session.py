"""One job's session in the model process (worker/model/process.py has the why and the lifecycle): the
session protocol (worker/model/session.py) spoken over the pipe in typed messages
(worker/model/process_messages.py), and the mask proposer reached through it."""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from runtime.logs import job_log_fields
from schemas.errors import RetryableError, VsegError
from schemas.prompts import ObjectPrompt
from worker.model.frame_masks import FrameMasks
from worker.model.process_inbox import Inboxes
from worker.model.process_messages import (
    AddPrompts,
    Answer,
    Backfilled,
    BackfillPrompt,
    Closed,
    CloseSession,
    Done,
    Error,
    Frame,
    FromModel,
    OpenSession,
    Propose,
    Proposed,
    RemoveObject,
    describe_frames,
)
from worker.model.proposals import Proposal
from worker.model.segment import GpuBudget
from worker.model.session import Backfill, Prompt, SessionShell
from worker.sources.frames import FrameSource

log = logging.getLogger(__name__)


class ModelProcessDied(RetryableError):
    """The model's process ended unexpectedly (killed, crashed): the job is retried with a new one."""


class ModelPipe(Protocol):
    """What a session uses of its model process (worker.model.process.ModelProcess)."""

    generation: int  # the child's: a session of an earlier child is told it died
    stop_timeout_s: float
    inbox: Inboxes
    last_gpu_memory_bytes: int | None
    budget: GpuBudget | None

    def connected(self) -> bool: ...

    def send(self, msg: OpenSession | AddPrompts | BackfillPrompt | RemoveObject | Propose | CloseSession,
             what: str) -> None: ...

    def recv_for(self, session: ProcessSession, *, timeout_s: float | None = None, what: str = "job",
                 check: Callable[[], None] | None = None) -> FromModel: ...

    def current_session(self) -> ProcessSession | None: ...

    def close(self, join_s: float = 10.0) -> None: ...


class ProcessSession(SessionShell):
    """A session whose model runs in the model process (see the module doc). Frames that arrive while an
    answer to add_prompts or remove_object is awaited are kept, in order, for the iteration."""

    def __init__(self, model: ModelPipe, session_id: int, frames: FrameSource, prompts: Sequence[Prompt],
                 *, width: int, height: int, start_frame: int = 0) -> None:
        super().__init__(start_frame)
        self.model = model
        self.id = session_id
        self.frames = frames
        self.generation = model.generation
        self._objects = {p.obj_id for p in prompts}
        self._received: collections.deque[FrameMasks] = collections.deque()
        self._ended: BaseException | None | bool = False  # False: frames still coming; None: done; else its error
        # (whatever the child sends for this session is read, in order, until it answers CloseSession)
        model.inbox.open(session_id)
        try:
            model.send(OpenSession(session_id, describe_frames(frames), tuple(prompts), width, height,
                                   dict(job_log_fields()), start_frame), "the job started")
        except BaseException:
            model.inbox.close(session_id)
            raise

    def _known(self) -> set[int]:
        return self._objects

    def add_prompts(self, prompts: Sequence[Prompt], *, or_next: bool = False) -> None:
        """Prompts on `position` (the next frame, as far as this side knows) go on the child's own next frame,
        which may be later by now: the child computes frames while the command is on its way."""
        self._ask(AddPrompts(self.id, tuple(prompts), or_next))  # the child resolves `or_next` at its own position
        self._objects |= {p.obj_id for p in prompts}

    def backfill(self, prompt: ObjectPrompt) -> Backfill:
        """Session.backfill, run by the child at its own position (frames it computed meanwhile are kept for
        the iteration, and come before its answer)."""
        self._check_open()
        self.model.send(BackfillPrompt(self.id, prompt), "the prompt to propagate was sent")
        while True:
            reply = self._next_message()
            if isinstance(reply, Backfilled):
                break
        if reply.error is not None:
            raise reply.error
        self._position = max(self._position, reply.upto)
        self._objects.add(prompt.obj_id)
        masks = np.unpackbits(reply.packed, axis=-1, count=reply.shape[-1]).astype(bool).reshape(reply.shape)
        return Backfill(reply.obj_id, reply.upto, {k: masks[k] for k in range(reply.upto)},
                        dict(enumerate(reply.scores)), reply.seconds)

    def remove_object(self, obj_id: int) -> None:
        self._ask(RemoveObject(self.id, obj_id))
        self._objects.discard(obj_id)

    def _ask(self, msg: AddPrompts | RemoveObject) -> None:
        self._check_open()
        self.model.send(msg, "the prompts were sent")
        while True:
            reply = self._next_message()
            if isinstance(reply, Answer):
                self._position = max(self._position, reply.position)
                if reply.error is not None:
                    raise reply.error
                return

    def propose(self, image_rgb: np.ndarray) -> list[Proposal]:
        """The model process's mask proposer on this frame (`--auto`), between two of the session's frames."""
        self._check_open()
        self.model.send(Propose(self.id, image_rgb), "the frame to propose masks on was sent")
        while True:
            reply = self._next_message()
            if isinstance(reply, Proposed):
                if reply.error is not None:
                    raise reply.error
                masks = np.unpackbits(reply.packed, axis=-1, count=reply.shape[-1]).astype(bool).reshape(reply.shape)
                return [Proposal(m, s) for m, s in zip(masks, reply.scores)]

    def _next_message(self) -> Answer | Proposed | Backfilled | None:
        """Read one message for this session: a frame is kept for the iteration, the end is noted; an
        Answer or Proposed is returned."""
        msg = self.model.recv_for(self, check=self.frames.check)
        if isinstance(msg, Frame):
            masks = np.unpackbits(msg.packed, axis=-1, count=msg.shape[-1]).astype(bool)
            self._received.append(FrameMasks(msg.frame_idx, tuple(msg.obj_ids), masks, msg.scores,
                                             source_idx=msg.source_idx))
            self._position = max(self._position, msg.frame_idx + 1)
            if msg.gpu_memory_bytes is not None:
                self.model.last_gpu_memory_bytes = msg.gpu_memory_bytes
            if msg.gpu_free_bytes is not None and self.model.budget is not None:
                self.model.budget = dataclasses.replace(self.model.budget, free_bytes=msg.gpu_free_bytes)
        elif isinstance(msg, Done):
            self._stats, self._ended = msg.stats, None
        elif isinstance(msg, Error):
            self._ended = msg.error
        elif isinstance(msg, (Answer, Proposed, Backfilled)):
            return msg
        return None

    def __next__(self) -> FrameMasks:
        while not self._received:
            if self._ended is None or self.closed:
                raise StopIteration
            if isinstance(self._ended, BaseException):
                error, self._ended = self._ended, None
                raise error
            self._next_message()
        return self._received.popleft()

    def _close(self) -> None:
        """The worker stopped reading: tell the child and wait (up to stop_timeout_s) until it has closed
        the session; a child that does not (blocked waiting for a frame, wedged) is killed, and the next
        job starts a new one."""
        self._received.clear()
        try:
            if not self.model.connected() or self.generation != self.model.generation:
                return  # the child is gone
            # the child answers Closed whether the session is still running or has ended: read up to it
            self.model.send(CloseSession(self.id), "the session was closed")
            deadline = time.monotonic() + self.model.stop_timeout_s
            while True:
                msg = self.model.recv_for(self, timeout_s=max(0.1, deadline - time.monotonic()), what="stop")
                if isinstance(msg, Closed):
                    return
        except (VsegError, OSError) as e:
            log.warning("model process did not stop cleanly (%s); starting a new one for the next job", e)
            self.model.close(join_s=0)
        finally:
            self.model.inbox.close(self.id)


class ProcessProposer:
    """A MaskProposer whose generator runs in the model process, between frames of its open session."""

    peak_memory_bytes = 0  # measured in the child (bench/bench_auto.py runs the model in this process)

    def __init__(self, model: ModelPipe) -> None:
        self.model = model

    def propose(self, image_rgb: np.ndarray) -> list[Proposal]:
        session = self.model.current_session()
        if session is None:
            raise RuntimeError("masks are proposed between a session's frames: this job has no session open")
        return session.propose(image_rgb)
