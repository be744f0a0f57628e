"""The model in a process of its own, so that the result path cannot slow it down (the default on CUDA).

A small model on a fast GPU is bound by the Python thread that launches its kernels: SAM 2.1 tiny at
1024 runs 27 to 55 frames/s on an H100 eagerly (about 80 with CUDA graphs, worker/model/cuda_graphs.py),
with the GPU mostly idle either way. That thread takes the GIL back
hundreds of times a frame, and every other thread of the worker (RLE encoding, MP4 rendering, Redis
writes) holds the GIL in between: in one process the model ran at about 70 to 80% of its bare speed
(bench/RESULTS.md, GPU section). Here the worker's process keeps the queue, the lease and the result
path; a spawned child process owns the model and its frame loaders and sends each frame's masks
(bit-packed) back through a pipe as soon as they are known, from a thread of its own (`_Sender`):
one frame's masks are more than a pipe buffer holds, so a send waits until the worker has read it,
and the model must not wait with it. The decoded frame is not sent: the
renderer decodes the JPEG again in the worker's process, which costs a few ms of CPU there but no
1.5 to 6 MB pipe copy per frame on the model's side.

`ModelProcess` is a Segmenter (worker/model/segment.py) and its sessions are Sessions
(worker/model/session.py), so the worker's job loop does not change; the boundary speaks the same
session protocol in typed messages (worker/model/process_messages.py; the child's side is
worker/model/process_child.py):

- the child starts once per worker, loads the model and warms it up; `ModelProcess()` returns when it
  is ready, or raises the child's own error (a bad checkpoint, no CUDA) with its message;
- `open_session()` sends the job (frame source, prompts, size); the session yields FrameMasks as they
  arrive; `add_prompts` and `remove_object` are answered by the child between two frames (it may be a
  few frames ahead of what the worker has read: `position` is the child's); a session closed early
  (cancel, lease lost, hand-back) asks the child to close it and waits for it; one session at a time;
- an error in the child (a bad prompt, CUDA out of memory) is re-raised in the worker as itself, so it
  is classified as before (retried or failed); a child that dies (killed, segfault) raises
  `ModelProcessDied`, a RetryableError: the job is retried and the next job starts a fresh child;
- the child exits when the worker closes it, or when the pipe breaks because the worker died;
- while it waits for the child, the worker runs the job's `check` (frames.check) every 0.2 s, so a
  lost lease or a shutdown deadline stops the job even while the child is blocked (waiting for a
  frame in a Redis outage); a child that does not leave the job within `stop_timeout_s` of being
  asked is killed, and `interrupt()` (a stalled job) kills it at once;
- a child that cannot be started again raises WorkerBroken: the worker hands its job back and exits
  non-zero, so that its supervisor restarts it, instead of failing job after job.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from runtime.logs import job_log_fields
from runtime.settings import Settings
from schemas.errors import RetryableError, VsegError, WorkerBroken
from worker.model.frame_masks import FrameMasks
from worker.model.process_child import serve
from worker.model.process_messages import (
    AddPrompts,
    Answer,
    Closed,
    CloseSession,
    Done,
    Error,
    Exit,
    Frame,
    FromModel,
    OpenSession,
    Propose,
    Proposed,
    Ready,
    RemoveObject,
    describe_frames,
)
from worker.model.proposals import Proposal
from worker.model.segment import GpuBudget, run_session
from worker.model.session import Prompt
from worker.sources.frames import FrameSource

log = logging.getLogger(__name__)


class ModelProcessDied(RetryableError):
    """The model's process ended unexpectedly (killed, crashed): the job is retried with a new one."""


class ModelProcess:
    """A Segmenter whose model runs in a child process (see the module doc)."""

    def __init__(self, settings: Settings, *, start_timeout_s: float = 900.0, stop_timeout_s: float = 10.0) -> None:
        self.settings = settings
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.name = ""
        self.random_weights = False
        self.device = "cpu"
        self.restarts = 0
        self.sessions_opened = 0
        self.session: ProcessSession | None = None  # the open one, if any
        self.last_gpu_memory_bytes: int | None = None  # as the child last reported it
        self.budget: GpuBudget | None = None  # the child's, when ready; its free memory as last reported
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=serve, args=(child, self.settings, logging.getLogger().level),
                                 name="vseg-model", daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        log.info("model process %d starting", self._proc.pid)
        msg = self.recv(timeout_s=self.start_timeout_s, what="start")
        if isinstance(msg, Error):
            self.close()
            raise msg.error
        if not isinstance(msg, Ready):
            self.close()
            raise ModelProcessDied(f"the model process said {type(msg).__name__} instead of Ready")
        self.name, self.random_weights, self.device = msg.name, msg.random_weights, msg.device
        self.budget = msg.budget
        log.info("model process %d ready (%s on %s)", self._proc.pid, self.name, self.device)

    def recv(self, *, timeout_s: float | None = None, what: str = "job",
             check: Callable[[], None] | None = None) -> FromModel:
        """The child's next message, running `check` every 0.2 s while it waits; ModelProcessDied if the
        child dies or (with `timeout_s`) does not answer in time."""
        conn = self._conn
        if conn is None:
            raise ModelProcessDied(f"the model process was stopped during {what}; the job is retried with a new one")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not conn.poll(0.2 if check is not None else 1.0):
            if check is not None:
                check()
            if not self._proc.is_alive():
                break
            if deadline is not None and time.monotonic() > deadline:
                self.close()
                raise ModelProcessDied(f"the model process did not {what} within {timeout_s:.0f} s")
        try:
            return conn.recv()
        except (EOFError, OSError):
            self._proc.join(5)
            code = self._proc.exitcode
            self.close()
            raise ModelProcessDied(f"the model process died during {what} (exit code {code}); "
                                   "the job is retried with a new one") from None

    def send(self, msg: OpenSession | AddPrompts | RemoveObject | Propose | CloseSession, what: str) -> None:
        if self._conn is None:
            raise ModelProcessDied(f"the model process was stopped before {what}; the job is retried with a new one")
        try:
            self._conn.send(msg)
        except OSError:  # it died just now
            self.close()
            raise ModelProcessDied(f"the model process died before {what}; the job is retried with a new one") from None

    def ensure_started(self) -> None:
        """Start a new child if the last one died (the worker calls this before it claims a job, so a restart
        never eats into a job's lease); WorkerBroken if it cannot be started."""
        if self._conn is not None and self._proc.is_alive():
            return
        if self._conn is not None:
            log.warning("model process %s ended between jobs (exit code %s); starting a new one",
                        self._proc.pid, self._proc.exitcode)
            self.close(join_s=1.0)
        self.restarts += 1
        try:
            self._start()
        except Exception as e:  # noqa: BLE001 - whatever stops it, this worker cannot serve
            raise WorkerBroken(f"the model process could not be started again ({type(e).__name__}: {e}); "
                               f"this worker cannot run jobs") from e

    def open_session(self, frames: FrameSource, prompts: Sequence[Prompt], *, width: int, height: int,
                     start_frame: int = 0) -> ProcessSession:
        if self.session is not None and not self.session.closed:
            raise RuntimeError("a model process holds one session at a time: close the open one first")
        self.ensure_started()  # died during or since the last job: start afresh
        self.sessions_opened += 1
        self.session = ProcessSession(self, self.sessions_opened, frames, prompts, width=width, height=height,
                                      start_frame=start_frame)
        return self.session

    def segment(self, frames: FrameSource, prompts: Sequence[Prompt], *, width: int,
                height: int) -> Iterator[FrameMasks]:
        return run_session(self.open_session(frames, prompts, width=width, height=height))

    def mask_proposer(self, settings: Settings) -> ProcessProposer:
        """The child's mask proposer (SAM 2's generator on its model), reached through the open session."""
        return ProcessProposer(self)

    def gpu_memory_bytes(self) -> int | None:
        return self.last_gpu_memory_bytes

    def gpu_budget(self) -> GpuBudget | None:
        return self.budget

    def interrupt(self, reason: str) -> None:
        """Kill the child now (from any thread): its job is abandoned (stalled), and the thread reading
        from it gets ModelProcessDied at once. The next job starts a new child."""
        proc = self._proc
        if proc is not None and proc.pid is not None and proc.is_alive():
            log.warning("killing model process %d: %s", proc.pid, reason)
            proc.kill()

    def close(self, join_s: float = 10.0) -> None:
        """Ask the child to exit; kill it if it does not within `join_s`."""
        conn, proc = self._conn, self._proc
        self._conn = None
        if conn is not None:
            try:
                conn.send(Exit())
            except OSError:
                pass
            conn.close()
        if proc is not None and proc.pid is not None:
            proc.join(join_s)
            if proc.is_alive():
                proc.kill()
                proc.join(5)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


class ProcessSession:
    """A session whose model runs in the model process (see the module doc). Frames that arrive while an
    answer to add_prompts or remove_object is awaited are kept, in order, for the iteration."""

    def __init__(self, model: ModelProcess, session_id: int, frames: FrameSource, prompts: Sequence[Prompt],
                 *, width: int, height: int, start_frame: int = 0) -> None:
        self.model = model
        self.id = session_id
        self.frames = frames
        self.closed = False
        self._objects = {p.obj_id for p in prompts}
        self._position = start_frame
        self._stats: dict[str, float] = {}
        self._received: collections.deque[FrameMasks] = collections.deque()
        self._ended: BaseException | None | bool = False  # False: frames still coming; None: done; else its error
        # (whatever the child sends for this session is read, in order, until it answers CloseSession)
        model.send(OpenSession(session_id, describe_frames(frames), tuple(prompts), width, height,
                               dict(job_log_fields()), start_frame), "the job started")

    @property
    def obj_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self._objects))

    @property
    def position(self) -> int:
        return self._position

    @property
    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def add_prompts(self, prompts: Sequence[Prompt]) -> None:
        """Prompts on `position` (the next frame, as far as this side knows) go on the child's own next frame,
        which may be later by now: the child computes frames while the command is on its way."""
        catch_up = bool(prompts) and all(p.frame_idx == self._position for p in prompts)
        self._ask(AddPrompts(self.id, tuple(prompts), catch_up))
        self._objects |= {p.obj_id for p in prompts}

    def remove_object(self, obj_id: int) -> None:
        self._ask(RemoveObject(self.id, obj_id))
        self._objects.discard(obj_id)

    def _ask(self, msg: AddPrompts | RemoveObject) -> None:
        if self.closed:
            raise RuntimeError("this session is closed")
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
        if self.closed:
            raise RuntimeError("this session is closed")
        self.model.send(Propose(self.id, image_rgb), "the frame to propose masks on was sent")
        while True:
            reply = self._next_message()
            if isinstance(reply, Proposed):
                if reply.error is not None:
                    raise reply.error
                masks = np.unpackbits(reply.packed, axis=-1, count=reply.shape[-1]).astype(bool).reshape(reply.shape)
                return [Proposal(m, s) for m, s in zip(masks, reply.scores)]

    def _next_message(self) -> Answer | Proposed | None:
        """Read one message for this session: a frame is kept for the iteration, the end is noted; an
        Answer or Proposed is returned."""
        msg = self.model.recv(check=self.frames.check)
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
        elif isinstance(msg, (Answer, Proposed)):
            return msg
        return None

    def __iter__(self) -> ProcessSession:
        return self

    def __next__(self) -> FrameMasks:
        while not self._received:
            if self._ended is None or self.closed:
                raise StopIteration
            if isinstance(self._ended, BaseException):
                error, self._ended = self._ended, None
                raise error
            self._next_message()
        return self._received.popleft()

    def close(self) -> None:
        """The worker stopped reading: tell the child and wait (up to stop_timeout_s) until it has closed
        the session; a child that does not (blocked waiting for a frame, wedged) is killed, and the next
        job starts a new one."""
        if self.closed:
            return
        self.closed = True
        self._received.clear()
        if self.model._conn is None:
            return  # the child is gone
        try:  # the child answers Closed whether the session is still running or has ended: read up to it
            self.model.send(CloseSession(self.id), "the session was closed")
            deadline = time.monotonic() + self.model.stop_timeout_s
            while True:
                msg = self.model.recv(timeout_s=max(0.1, deadline - time.monotonic()), what="stop")
                if isinstance(msg, Closed) and msg.session == self.id:
                    return
        except (VsegError, OSError) as e:
            log.warning("model process did not stop cleanly (%s); starting a new one for the next job", e)
            self.model.close(join_s=0)

    def __enter__(self) -> ProcessSession:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class ProcessProposer:
    """A MaskProposer whose generator runs in the model process, between frames of its open session."""

    peak_memory_bytes = 0  # measured in the child (bench/bench_auto.py runs the model in this process)

    def __init__(self, model: ModelProcess) -> None:
        self.model = model

    def propose(self, image_rgb: np.ndarray) -> list[Proposal]:
        session = self.model.session
        if session is None or session.closed:
            raise RuntimeError("masks are proposed between a session's frames: no session is open")
        return session.propose(image_rgb)


def use_model_process(settings: Settings, device: str) -> bool:
    """`model_process` auto: on for a CUDA model (launch-bound, see the module doc), off on the CPU,
    where the model's own threads use every core and a second process would only add copies."""
    if settings.model_process == "on":
        return True
    if settings.model_process == "off":
        return False
    return device.startswith("cuda")
