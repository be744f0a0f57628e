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

`ModelProcess` is a Segmenter (worker/model/segment.py), so the worker's job loop does not change:

- the child starts once per worker, loads the model and warms it up; `ModelProcess()` returns when it
  is ready, or raises the child's own error (a bad checkpoint, no CUDA) with its message;
- `segment()` sends the job (frame source, prompts, size) and yields FrameMasks as they arrive; a
  generator closed early (cancel, lease lost, hand-back) asks the child to stop and waits for it;
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

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import pickle
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.settings import Settings
from schemas.errors import RetryableError, VsegError, WorkerBroken
from schemas.prompts import ObjectPrompt, object_ids
from worker.model.process_messages import (
    DirSpec,
    Done,
    Error,
    Exit,
    Frame,
    FramesSpec,
    FromModel,
    Ready,
    Segment,
    Stop,
    Stopped,
    StreamSpec,
    ToModel,
)
from worker.model.segment import FrameMasks, Segmenter
from worker.sources.frames import DirFrames, FrameSource, StreamedFrames

log = logging.getLogger(__name__)


class ModelProcessDied(RetryableError):
    """The model's process ended unexpectedly (killed, crashed): the job is retried with a new one."""


# ---- frame sources across the process boundary --------------------------------------------------
def describe_frames(frames: FrameSource) -> FramesSpec:
    """What the child needs to open the same frame source (a Redis client cannot be pickled: the child
    makes its own from the same settings)."""
    if isinstance(frames, StreamedFrames):
        return StreamSpec(frames.stream, str(frames.dir), frames.block_ms, frames.stall_s, frames.producer_key,
                          frames.producer_ttl_s)
    if isinstance(frames, DirFrames):
        return DirSpec(str(frames.dir), int(frames.total or 0))
    raise TypeError(f"cannot hand a {type(frames).__name__} to the model process")


def open_frames(spec: FramesSpec, settings: Settings) -> FrameSource:
    if isinstance(spec, DirSpec):
        return DirFrames(Path(spec.dir), spec.total, verify=False)  # the worker checked it
    from worker.broker.redis_client import worker_client

    return StreamedFrames(worker_client(settings), spec.stream, Path(spec.dir), block_ms=spec.block_ms,
                          stall_s=spec.stall_s, producer_key=spec.producer_key, producer_ttl_s=spec.producer_ttl_s)


def _portable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling (so the worker classifies it as before), else a
    RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any unpicklable error becomes a plain one
        return RuntimeError(f"{type(error).__name__}: {error}")


# ---- the child ----------------------------------------------------------------------------------
def _serve(conn: multiprocessing.connection.Connection, settings: Settings, log_level: int) -> None:
    """The child's main loop: load the model, then run one job per `segment` message."""
    # Ctrl-C reaches the whole process group: the worker handles it (finish the job, then exit) and
    # tells this process when to go
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [model %(process)d] %(name)s: %(message)s")
    from worker.model.build import build_segmenter

    try:
        segmenter = build_segmenter(dataclasses.replace(settings, model_process="off"))
    except BaseException as e:  # noqa: BLE001 - reported to the worker, which exits with it
        conn.send(Error(_portable(e)))
        return
    conn.send(Ready(segmenter.name, segmenter.random_weights, segmenter.device))
    while True:
        try:
            msg: ToModel = conn.recv()
        except (EOFError, OSError):  # the worker is gone
            return
        if isinstance(msg, Exit):
            return
        if isinstance(msg, Segment):
            try:
                if _run_job(conn, segmenter, msg, settings) == "exit":
                    return
            except (_WorkerGone, EOFError, OSError):  # the worker is gone
                return


SEND_BUFFER_BYTES = 64 << 20  # unpacked masks waiting to be sent, at most (and 2 to 16 frames)


class _WorkerGone(Exception):
    """The pipe to the worker broke: the worker died or closed it."""


def _command(conn: multiprocessing.connection.Connection) -> ToModel | None:
    """The worker's command, if one is waiting (Stop or Exit)."""
    try:
        return conn.recv() if conn.poll() else None
    except (EOFError, OSError) as e:
        raise _WorkerGone(str(e)) from e


class _Sender:
    """The child's messages to the worker, sent from a thread of their own so that the model never waits
    on the pipe: one frame's masks (65 KB a 960x540 object, bit-packed) are more than a pipe buffer
    holds, so a send returns only once the worker has read it. Messages keep their order; at most
    `depth` frames wait here. A broken pipe (the worker died) is raised by the next `send`."""

    def __init__(self, conn: multiprocessing.connection.Connection, depth: int = 16) -> None:
        self.conn = conn
        self.queue: queue.Queue[FrameMasks | FromModel | None] = queue.Queue(depth)
        self.error: _WorkerGone | None = None
        self.thread = threading.Thread(target=self._run, name="vseg-model-send", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (msg := self.queue.get()) is not None:
            if self.error is not None:
                continue  # the worker is gone: drop the rest
            try:
                if isinstance(msg, FrameMasks):  # packed here, off the model's thread
                    self.conn.send(Frame(msg.frame_idx, msg.obj_ids, np.packbits(msg.masks, axis=-1),
                                         tuple(msg.masks.shape), msg.scores))
                else:
                    self.conn.send(msg)
            except BaseException as e:  # noqa: BLE001 - a broken pipe, or a message that cannot be sent
                self.error = _WorkerGone(f"{type(e).__name__}: {e}")

    def send(self, msg: FrameMasks | FromModel | None) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(msg, timeout=1.0)
                return
            except queue.Full:
                if not self.thread.is_alive():
                    raise _WorkerGone("the sending thread ended") from None

    def close(self, last: FromModel) -> None:
        """Send what is queued and then `last` (how the job ended), then stop the thread."""
        self.send(last)
        self.send(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        """Stop without waiting: the worker is closing this process and reads nothing more."""
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)


def _run_job(conn: multiprocessing.connection.Connection, segmenter: Segmenter, job: Segment,
             settings: Settings) -> str:
    """One job; returns how it ended: done, error, stopped (the worker stopped reading) or exit (the
    worker is closing this process)."""
    frame_bytes = len(object_ids(job.prompts)) * job.width * job.height  # one frame's masks before packing
    sender = _Sender(conn, depth=max(2, min(16, SEND_BUFFER_BYTES // max(1, frame_bytes))))
    outputs = segmenter.segment(open_frames(job.frames, settings), job.prompts, width=job.width, height=job.height)
    try:
        for out in outputs:
            sender.send(dataclasses.replace(out, image_rgb=None))  # the renderer decodes its own copy
            command = _command(conn)
            if isinstance(command, (Stop, Exit)):
                outputs.close()  # type: ignore[attr-defined]  # a generator
                if isinstance(command, Exit):
                    sender.abandon()
                    return "exit"
                sender.close(Stopped())
                return "stopped"
    except _WorkerGone:
        raise  # the caller returns
    except Exception as e:  # noqa: BLE001 - raised again in the worker
        sender.close(Error(_portable(e)))
        return "error"
    sender.close(Done())
    return "done"


# ---- the worker's side ---------------------------------------------------------------------------
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
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self.settings, logging.getLogger().level),
                                 name="vseg-model", daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        log.info("model process %d starting", self._proc.pid)
        msg = self._recv(timeout_s=self.start_timeout_s, what="start")
        if isinstance(msg, Error):
            self.close()
            raise msg.error
        if not isinstance(msg, Ready):
            self.close()
            raise ModelProcessDied(f"the model process said {type(msg).__name__} instead of Ready")
        self.name, self.random_weights, self.device = msg.name, msg.random_weights, msg.device
        log.info("model process %d ready (%s on %s)", self._proc.pid, self.name, self.device)

    def _recv(self, *, timeout_s: float | None = None, what: str = "job",
              check: Callable[[], None] | None = None) -> FromModel:
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

    def segment(self, frames: FrameSource, prompts: Sequence[ObjectPrompt], *, width: int,
                height: int) -> Iterator[FrameMasks]:
        self.ensure_started()  # died during or since the last job: start afresh
        assert self._conn is not None
        try:
            self._conn.send(Segment(describe_frames(frames), tuple(prompts), width, height))
        except OSError:  # it died just now
            self.close()
            raise ModelProcessDied("the model process died before the job started; the job is retried with "
                                   "a new one") from None
        finished = False
        try:
            check = getattr(frames, "check", None)
            while True:
                msg = self._recv(check=check)
                if isinstance(msg, Frame):
                    masks = np.unpackbits(msg.packed, axis=-1, count=msg.shape[-1]).astype(bool)
                    yield FrameMasks(msg.frame_idx, tuple(msg.obj_ids), masks, msg.scores)
                elif isinstance(msg, Done):
                    finished = True
                    return
                elif isinstance(msg, Error):
                    finished = True
                    raise msg.error
        finally:
            if not finished and self._conn is not None:
                self._stop_job()

    def _stop_job(self) -> None:
        """The worker stopped reading: tell the child and wait (up to stop_timeout_s) until it has left the
        job; a child that does not (blocked waiting for a frame, wedged) is killed, and the next job
        starts a new one."""
        assert self._conn is not None
        try:
            self._conn.send(Stop())
            deadline = time.monotonic() + self.stop_timeout_s
            while True:
                msg = self._recv(timeout_s=max(0.1, deadline - time.monotonic()), what="stop")
                if isinstance(msg, (Stopped, Done, Error)):
                    return
        except (VsegError, OSError) as e:
            log.warning("model process did not stop cleanly (%s); starting a new one for the next job", e)
            self.close(join_s=0)

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
