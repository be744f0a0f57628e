"""The model process's side (worker/model/process.py has the worker's side and the why): load the model
once, then serve sessions (worker/model/session.py) as the worker opens them, speaking the typed messages
of worker/model/process_messages.py. The main thread reads the worker's commands and hands each to its
session; each session runs on a thread of its own (`_SessionThread`: one at a time for a model process per
slot, several on one shared model, taking turns and batched, worker/model/turns.py and step_batch.py).
Each frame's masks go back bit-packed from a sending thread (`_Sender`), so the model never waits on the
pipe; between frames the session's commands (add prompts, remove an object, close) are applied. A close
also ends a session's wait for a frame (its source's check raises), so one session waiting out a Redis
outage never holds up the others' close."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from runtime.logs import configure_logging, job_log_context
from runtime.settings import Settings
from schemas.errors import PromptError
from worker.model.frame_masks import FrameMasks
from worker.model.process_messages import (
    AddPrompts,
    Answer,
    Backfilled,
    BackfillPrompt,
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
    ToModel,
    open_frames,
)
from worker.model.segment import Segmenter, Session
from worker.sources.frames import FrameSource
from worker.sources.live import SessionFrames

SEND_BUFFER_BYTES = 64 << 20  # unpacked masks waiting to be sent, at most (and 2 to 16 frames)


def _portable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling (so the worker classifies it as before), else a
    RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any unpicklable error becomes a plain one
        return RuntimeError(f"{type(error).__name__}: {error}")


def serve(conn: multiprocessing.connection.Connection, settings: Settings, log_level: int) -> None:
    """The child: load the model, serve sessions until told to exit (or the worker is gone), then leave at
    once. Session threads may still be in a step or a log write then, and an interpreter shut down under
    a daemon thread holding stderr's lock aborts (SIGABRT), so the process ends with os._exit after
    flushing what was logged."""
    code = 0
    try:
        _serve(conn, settings, log_level)
    except BaseException:  # noqa: BLE001 - a bug: its trace, and a non-zero exit the worker reports
        traceback.print_exc()
        code = 1
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _serve(conn: multiprocessing.connection.Connection, settings: Settings, log_level: int) -> None:
    """The child's main loop: load the model, then serve one session per `OpenSession`."""
    # Ctrl-C reaches the whole process group: the worker handles it (finish the job, then exit) and
    # tells this process when to go
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if settings.log_format == "json":  # one JSON object a line, as the worker's (its job fields come with OpenSession)
        configure_logging(log_level <= logging.DEBUG, "json")
    else:
        logging.basicConfig(level=log_level, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s [model %(process)d] %(name)s: %(message)s")
    from worker.model.build import build_segmenter

    try:
        segmenter = build_segmenter(dataclasses.replace(settings, model_process="off"))
    except BaseException as e:  # noqa: BLE001 - reported to the worker, which exits with it
        conn.send(Error(_portable(e)))
        return
    pipe = _Pipe(conn)
    pipe.send(Ready(segmenter.name, segmenter.random_weights, segmenter.device, segmenter.gpu_budget()))
    sessions: dict[int, _SessionThread] = {}
    while True:
        try:
            msg: ToModel = conn.recv()
        except (EOFError, OSError):  # the worker is gone
            return
        try:
            if isinstance(msg, Exit):  # the session threads go with the process
                return
            for ended in [k for k, served in sessions.items() if served.finished]:
                del sessions[ended]
            if isinstance(msg, OpenSession):
                sessions[msg.session] = _SessionThread(pipe, segmenter, msg, settings)
                continue
            served = sessions.get(msg.session)
            if served is None or not served.deliver(msg):
                _answer_ended(pipe, segmenter, msg, settings)
        except _WorkerGone:
            return


class _Pipe:
    """The connection to the worker, shared by every session's sender: one message at a time."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, msg: FromModel) -> None:
        try:
            with self._lock:
                self.conn.send(msg)
        except (EOFError, OSError) as e:
            raise _WorkerGone(f"{type(e).__name__}: {e}") from e


class _SessionClosing(Exception):
    """The worker closed the session while it waited (for a frame, for a turn)."""


class _SessionThread:
    """One session served on a thread of its own, its commands handed over by the main thread."""

    def __init__(self, pipe: _Pipe, segmenter: Segmenter, msg: OpenSession, settings: Settings) -> None:
        self.pipe, self.segmenter, self.msg, self.settings = pipe, segmenter, msg, settings
        self.commands: queue.Queue[ToModel] = queue.Queue()
        self.closing = False
        self.finished = False
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"vseg-session-{msg.session}", daemon=True)
        self.thread.start()

    def deliver(self, msg: ToModel) -> bool:
        """Queue a command for the session; False once it has ended (the caller answers for it)."""
        with self._lock:
            if self.finished:
                return False
            self.commands.put(msg)
            if isinstance(msg, CloseSession):
                self.closing = True
            return True

    def check(self) -> None:
        if self.closing:
            raise _SessionClosing()

    def _run(self) -> None:
        with job_log_context(**self.msg.log_fields):
            try:
                _serve_session(self.pipe, self.segmenter, self.msg, self.settings, self)
            except _WorkerGone:
                return
            finally:
                with self._lock:
                    self.finished = True
            with contextlib.suppress(_WorkerGone):
                while True:  # commands that came while it ended: answered as for a session that has ended
                    try:
                        _answer_ended(self.pipe, self.segmenter, self.commands.get_nowait(), self.settings)
                    except queue.Empty:
                        return


def _answer_ended(pipe: _Pipe, segmenter: Segmenter, msg: ToModel, settings: Settings) -> None:
    """A command for a session that has ended (or never was)."""
    if isinstance(msg, (AddPrompts, RemoveObject)):
        pipe.send(Answer(msg.session, 0, PromptError(f"session {msg.session} has ended: its frames are all out")))
    elif isinstance(msg, BackfillPrompt):
        pipe.send(Backfilled(msg.session, msg.prompt.obj_id, 0, np.zeros((0,), np.uint8), (0,), (),
                             error=PromptError(f"session {msg.session} has ended: its frames are all out")))
    elif isinstance(msg, Propose):  # between sessions too: the proposer needs the model, not a session
        pipe.send(_propose(segmenter, msg, settings))
    elif isinstance(msg, CloseSession):
        pipe.send(Closed(msg.session))


def _free_bytes(segmenter: Segmenter) -> int | None:
    budget = segmenter.gpu_budget()
    return None if budget is None else budget.free_bytes


class _WorkerGone(Exception):
    """The pipe to the worker broke: the worker died or closed it."""


class _Sender:
    """The child's messages to the worker, sent from a thread of their own so that the model never waits
    on the pipe: one frame's masks (65 KB a 960x540 object, bit-packed) are more than a pipe buffer
    holds, so a send returns only once the worker has read it. Messages keep their order; at most
    `depth` frames wait here. A broken pipe (the worker died) is raised by the next `send`."""

    def __init__(self, pipe: _Pipe, depth: int = 16, session: int = 0,
                 gpu_memory: Callable[[], int | None] = lambda: None,
                 gpu_free: Callable[[], int | None] = lambda: None) -> None:
        self.pipe = pipe
        self.session = session
        self.gpu_memory = gpu_memory
        self.gpu_free = gpu_free
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
                    self.pipe.send(Frame(self.session, msg.frame_idx, msg.obj_ids, np.packbits(msg.masks, axis=-1),
                                         tuple(msg.masks.shape), msg.scores, self.gpu_memory(), msg.source_idx,
                                         self.gpu_free()))
                else:
                    self.pipe.send(msg)
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



def _serve_session(pipe: _Pipe, segmenter: Segmenter, msg: OpenSession, settings: Settings,
                   served: _SessionThread) -> str:
    """One session to its end; returns how it ended: done, error or closed (the worker closed it)."""
    frame_bytes = len({p.obj_id for p in msg.prompts}) * msg.width * msg.height  # one frame's masks, unpacked
    sender = _Sender(pipe, depth=max(2, min(16, SEND_BUFFER_BYTES // max(1, frame_bytes))), session=msg.session,
                     gpu_memory=segmenter.gpu_memory_bytes, gpu_free=lambda: _free_bytes(segmenter))
    session: Session | None = None
    try:
        frames = open_frames(msg.frames, settings)
        _watch(frames, served.check)
        session = segmenter.open_session(frames, msg.prompts, width=msg.width, height=msg.height,
                                         start_frame=msg.start_frame)
        while True:
            ending = _apply_commands(served, session, sender, msg.session, segmenter, settings)
            if ending is not None:
                return ending
            try:
                out = next(session)
            except StopIteration:
                break
            source_idx = frames.live.source_index(out.frame_idx) if isinstance(frames, SessionFrames) else None
            sender.send(dataclasses.replace(out, image_rgb=None, source_idx=source_idx))  # the renderer decodes its own
        session.close()
        sender.close(Done(msg.session, session.stats))
        return "done"
    except _WorkerGone:
        raise  # the caller returns
    except _SessionClosing:  # closed while it waited: what it had sent goes first, then Closed
        sender.close(Closed(msg.session))
        return "closed"
    except Exception as e:  # noqa: BLE001 - raised again in the worker
        sender.close(Error(_portable(e), msg.session))
        return "error"
    finally:
        if session is not None:
            session.close()


def _watch(frames: FrameSource, check: Callable[[], None]) -> None:
    """Make the frames' waits (and the session's turn waits) run `check`: a close ends them."""
    frames.watch(check)


def _apply_commands(served: _SessionThread, session: Session, sender: _Sender,
                    session_id: int, segmenter: Segmenter, settings: Settings) -> str | None:
    """Apply the worker's waiting commands to the session, answering each; "closed" if the session must
    end here."""
    while True:
        try:
            command = served.commands.get_nowait()
        except queue.Empty:
            return None
        if isinstance(command, CloseSession):
            sender.close(Closed(session_id))
            return "closed"
        if isinstance(command, (AddPrompts, RemoveObject)):
            error: BaseException | None = None
            try:
                if isinstance(command, AddPrompts):
                    session.add_prompts(command.prompts, or_next=command.or_next)
                else:
                    session.remove_object(command.obj_id)
            except Exception as e:  # noqa: BLE001 - refused: raised again in the worker
                error = _portable(e)
            sender.send(Answer(session_id, session.position, error))
        elif isinstance(command, BackfillPrompt):
            sender.send(_backfill(session, command))
        elif isinstance(command, Propose):
            sender.send(_propose(segmenter, command, settings))


_PROPOSERS: dict[int, Any] = {}  # the model's proposer, made once (it holds SAM 2's mask generator)
_PROPOSERS_LOCK = threading.Lock()  # sessions on several threads may ask for it first at once


def _propose(segmenter: Segmenter, msg: Propose, settings: Settings) -> Proposed:
    from worker.model.proposals import build_proposer

    try:
        with _PROPOSERS_LOCK:
            proposer = _PROPOSERS.get(id(segmenter))
            if proposer is None:
                proposer = _PROPOSERS.setdefault(id(segmenter), build_proposer(settings, segmenter))
        found = proposer.propose(msg.image_rgb)
    except Exception as e:  # noqa: BLE001 - raised again in the worker
        return Proposed(msg.session, np.zeros(0, np.uint8), (0,), (), _portable(e))
    h, w = msg.image_rgb.shape[:2]
    masks = np.stack([p.mask for p in found]) if found else np.zeros((0, h, w), dtype=bool)
    return Proposed(msg.session, np.packbits(masks, axis=-1), tuple(masks.shape), tuple(p.score for p in found))


def _backfill(session: Session, command: BackfillPrompt) -> Backfilled:
    """Session.backfill in the child, between two of its frames (at its own position)."""
    try:
        done = session.backfill(command.prompt)
    except Exception as e:  # noqa: BLE001 - refused: raised again in the worker
        return Backfilled(command.session, command.prompt.obj_id, 0, np.zeros((0,), np.uint8), (0,), (),
                          error=_portable(e))
    stacked = np.stack([done.masks[k] for k in range(done.upto)]) if done.upto else np.zeros((0, 0, 0), bool)
    return Backfilled(command.session, done.obj_id, done.upto, np.packbits(stacked, axis=-1), tuple(stacked.shape),
                      tuple(done.scores[k] for k in range(done.upto)), done.seconds)

