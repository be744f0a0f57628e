"""The model in a process of its own, so that the result path cannot slow it down (the default on CUDA).

A small model on a fast GPU is bound by the Python thread that launches its kernels: SAM 2.1 tiny at
1024 runs 27 to 55 frames/s on an H100 eagerly (about 80 with CUDA graphs, worker/model/sam2/cuda_graphs.py),
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
  (cancel, lease lost, hand-back) asks the child to close it and waits for it (a close also ends the
  child's wait for a frame); one session at a time, or with `shared` (`session_batch` > 1, so that
  several jobs' steps can be batched on one model: worker/model/sam2/step_batch.py) every slot's at once, each
  on a thread of its own in the child, their messages sorted by session on this side
  (worker/model/process_inbox.py);
- an error in the child (a bad prompt, CUDA out of memory) is re-raised in the worker as itself, so it
  is classified as before (retried or failed); a child that dies (killed, segfault) raises
  `ModelProcessDied`, a RetryableError, in every session open on it: their jobs are retried and the next
  job starts a fresh child;
- the child exits when the worker closes it, or when the pipe breaks because the worker died;
- while it waits for the child, the worker runs the job's `check` (frames.check) every 0.2 s, so a
  lost lease or a shutdown deadline stops the job even while the child is blocked (waiting for a
  frame in a Redis outage); a child that does not leave the job within `stop_timeout_s` of being
  asked is killed, and `interrupt()` (a stalled job) kills it at once (in a shared child, the other
  sessions with it: a wedged model costs their jobs a retry);
- a child that cannot be started again raises WorkerBroken: the worker hands its job back and exits
  non-zero, so that its supervisor restarts it, instead of failing job after job.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from runtime.settings import Settings
from schemas.errors import WorkerBroken
from schemas.names import POINTS
from worker.model.frame_masks import FrameMasks
from worker.model.process_child import serve
from worker.model.process_inbox import Inboxes
from worker.model.process_messages import (
    AddPrompts,
    BackfillPrompt,
    CloseSession,
    Error,
    Exit,
    FromModel,
    OpenSession,
    Propose,
    Ready,
    RemoveObject,
)
from worker.model.process_session import ModelProcessDied, ProcessProposer, ProcessSession
from worker.model.segment import GpuBudget, run_session
from worker.model.session import Prompt
from worker.sources.frames import FrameSource

log = logging.getLogger(__name__)

INBOX_LIMIT = 32  # messages waiting for one session of a shared model process, at most (recv_for)


class ModelProcess:
    """A Segmenter whose model runs in a child process (see the module doc)."""

    def __init__(self, settings: Settings, *, start_timeout_s: float = 900.0, stop_timeout_s: float = 10.0,
                 shared: bool = False) -> None:
        self.settings = settings
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.shared = shared  # holds every slot's session at once (see the module doc), else one at a time
        self.name = ""
        self.random_weights = False
        self.capability = POINTS  # a model process runs SAM 2 (SAM 3 runs in the worker's process)
        self.device = "cpu"
        self.restarts = 0
        self.sessions_opened = 0
        self.generation = 0  # one per child started: a session of an earlier child is told it died
        self._local = threading.local()  # the session each job's thread opened (the proposer's)
        self.inbox = Inboxes(INBOX_LIMIT)  # each open session's messages (worker/model/process_inbox.py)
        self._start_lock = threading.Lock()
        self._send_lock = threading.Lock()
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
        self.generation += 1
        self.inbox.clear()
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

    def recv(self, *, timeout_s: float | None = None, what: str = "job") -> FromModel:
        """The child's next message, whoever it is for (its start: no session is open yet)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (msg := self._read(1.0, what)) is None:
            if deadline is not None and time.monotonic() > deadline:
                self.close()
                raise ModelProcessDied(f"the model process did not {what} within {timeout_s:.0f} s")
        return msg

    def recv_for(self, session: ProcessSession, *, timeout_s: float | None = None, what: str = "job",
                 check: Callable[[], None] | None = None) -> FromModel:
        """The child's next message for `session` (worker/model/process_inbox.py: the sessions of a shared
        process take turns reading the pipe), running `check` every 0.2 s while it waits; ModelProcessDied if
        the child dies or (with `timeout_s`) does not answer in time."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if session.generation != self.generation or self._conn is None:
                raise ModelProcessDied(f"the model process was stopped during {what}; the job is retried with a "
                                       "new one")
            msg = self.inbox.next_for(session.id, lambda poll_s: self._read(poll_s, what))
            if msg is not None:
                return msg
            if check is not None:
                check()
            if deadline is not None and time.monotonic() > deadline:
                self.close()
                raise ModelProcessDied(f"the model process did not {what} within {timeout_s:.0f} s")

    def _read(self, poll_s: float, what: str) -> FromModel | None:
        """One message if one comes within `poll_s`; ModelProcessDied if the child is gone."""
        conn = self._conn
        if conn is None:
            raise ModelProcessDied(f"the model process was stopped during {what}; the job is retried with a new one")
        try:
            if not conn.poll(poll_s) and self._proc.is_alive():
                return None
            return conn.recv()  # a dead child's pipe: EOF once what it sent is read
        except (EOFError, OSError):
            self._proc.join(5)
            code = self._proc.exitcode
            self.close()
            raise ModelProcessDied(f"the model process died during {what} (exit code {code}); "
                                   "the job is retried with a new one") from None

    def connected(self) -> bool:
        return self._conn is not None

    def send(self, msg: OpenSession | AddPrompts | BackfillPrompt | RemoveObject | Propose | CloseSession,
             what: str) -> None:
        if self._conn is None:
            raise ModelProcessDied(f"the model process was stopped before {what}; the job is retried with a new one")
        try:
            with self._send_lock:  # the job threads of a shared process send from several threads
                self._conn.send(msg)
        except OSError:  # it died just now
            self.close()
            raise ModelProcessDied(f"the model process died before {what}; the job is retried with a new one") from None

    def ensure_started(self) -> None:
        """Start a new child if the last one died (the worker calls this before it claims a job, so a restart
        never eats into a job's lease); WorkerBroken if it cannot be started."""
        with self._start_lock:
            self._ensure_started()

    def _ensure_started(self) -> None:
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
        if not self.shared and self.inbox.count():
            raise RuntimeError("this model process holds one session at a time: close the open one first")
        self.ensure_started()  # died during or since the last job: start afresh
        with self._start_lock:
            self.sessions_opened += 1
            session_id = self.sessions_opened
        session = ProcessSession(self, session_id, frames, prompts, width=width, height=height,
                                 start_frame=start_frame)
        self._local.session = session
        return session

    def current_session(self) -> ProcessSession | None:
        """The session this thread (a job's) opened last, if it is still open."""
        session: ProcessSession | None = getattr(self._local, "session", None)
        return session if session is not None and not session.closed else None

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


def use_model_process(settings: Settings, device: str) -> bool:
    """`model_process` auto: on for a CUDA model (launch-bound, see the module doc), off on the CPU,
    where the model's own threads use every core and a second process would only add copies."""
    if settings.model_process == "on":
        return True
    if settings.model_process == "off":
        return False
    return device.startswith("cuda")
