"""What the worker and its model process say to each other (worker/model/process.py), one dataclass a
message; every message is pickled whole through the pipe. Frame sources cross as specs: the child opens
the same source itself (a streamed one with its own Redis client, from the same settings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.settings import Settings
from schemas.prompts import ObjectPrompt
from worker.model.segment import GpuBudget
from worker.model.session import Prompt
from worker.sources.frames import DirFrames, FrameSource, StreamedFrames
from worker.sources.live import LiveFrames, SessionFrames


# ---- frame sources ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DirSpec:
    """A finished frame directory (worker/sources/frames.py DirFrames), already checked by the worker."""

    dir: str
    total: int


@dataclass(frozen=True)
class StreamSpec:
    """A directory still being filled, announced on a frames stream (worker/sources/frames.py StreamedFrames)."""

    stream: str
    dir: str
    block_ms: int
    stall_s: float
    producer_key: str
    producer_ttl_s: float
    live_source: bool = False  # a live job's: frames may be given up or taken (StreamedFrames.live_source)


@dataclass(frozen=True)
class LiveSpec:
    """A live job's frames as its session reads them (worker/sources/live.py): the picking happens where
    the model runs, so it is as fresh as the frame the model is about to take."""

    stream: StreamSpec
    max_latency_s: float
    start_after: int
    at_edge: bool
    max_cond_frames: int


FramesSpec = DirSpec | StreamSpec | LiveSpec


def describe_frames(frames: FrameSource) -> FramesSpec:
    """What the child needs to open the same frame source (a Redis client cannot be pickled: the child
    makes its own from the same settings)."""
    if isinstance(frames, SessionFrames):
        live = frames.live
        return LiveSpec(_stream_spec(live.streamed), live.max_latency_s, live.start_after, live.at_edge,
                        live.max_cond_frames)
    if isinstance(frames, StreamedFrames):
        return _stream_spec(frames)
    if isinstance(frames, DirFrames):
        return DirSpec(str(frames.dir), int(frames.total or 0))
    raise TypeError(f"cannot hand a {type(frames).__name__} to the model process")


def _stream_spec(frames: StreamedFrames) -> StreamSpec:
    return StreamSpec(frames.stream, str(frames.dir), frames.block_ms, frames.stall_s, frames.producer_key,
                      frames.producer_ttl_s, frames.live_source)


def open_frames(spec: FramesSpec, settings: Settings) -> FrameSource:
    if isinstance(spec, DirSpec):
        return DirFrames(Path(spec.dir), spec.total, verify=False)  # the worker checked it
    if isinstance(spec, LiveSpec):
        live = LiveFrames(_open_stream(spec.stream, settings), max_latency_s=spec.max_latency_s,
                          start_after=spec.start_after, at_edge=spec.at_edge, max_cond_frames=spec.max_cond_frames)
        return live.view
    return _open_stream(spec, settings)


def _open_stream(spec: StreamSpec, settings: Settings) -> StreamedFrames:
    from runtime.connection import worker_client

    return StreamedFrames(worker_client(settings), spec.stream, Path(spec.dir), block_ms=spec.block_ms,
                          stall_s=spec.stall_s, producer_key=spec.producer_key, producer_ttl_s=spec.producer_ttl_s,
                          live_source=spec.live_source)


# ---- worker -> model process: the session protocol (worker/model/session.py) -------------------------
@dataclass(frozen=True)
class OpenSession:
    """Open session `session` on these frames with these first prompts; its frames come as `Frame`s, then
    `Done` (or `Error`). The model process holds one session at a time, or (shared) several."""

    session: int
    frames: FramesSpec
    prompts: tuple[Prompt, ...]
    width: int
    height: int
    log_fields: dict[str, Any] = field(default_factory=dict)  # the job's log fields (job_id, attempt, worker)
    start_frame: int = 0  # a resumed job's first frame (worker/model/session.py)


@dataclass(frozen=True)
class AddPrompts:
    """Session.add_prompts: answered by an `Answer` (with the error, if the prompts were refused)."""

    session: int
    prompts: tuple[Prompt, ...]
    or_next: bool = False  # Session.add_prompts's: a frame the child has computed meanwhile moves to its position


@dataclass(frozen=True)
class BackfillPrompt:
    """Session.backfill: run in the child, at its own position; answered by a `Backfilled`."""

    session: int
    prompt: ObjectPrompt


@dataclass(frozen=True)
class RemoveObject:
    """Session.remove_object: answered by an `Answer`."""

    session: int
    obj_id: int


@dataclass(frozen=True)
class CloseSession:
    """Session.close (the worker stopped reading it): answered by `Closed`."""

    session: int


@dataclass(frozen=True)
class Exit:
    """Close the session, if any, and exit."""


@dataclass(frozen=True)
class Propose:
    """Run the mask proposer (`--auto`, worker/model/proposals.py) on this frame: answered by `Proposed`."""

    session: int
    image_rgb: np.ndarray


ToModel = OpenSession | AddPrompts | BackfillPrompt | RemoveObject | Propose | CloseSession | Exit


# ---- model process -> worker ------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    """The model is loaded and warmed up."""

    name: str
    random_weights: bool
    device: str
    budget: GpuBudget | None = None  # on CUDA: free memory and a session's measured cost (worker/service/capacity.py)


@dataclass(frozen=True)
class Frame:
    """One frame's masks, bit-packed along the last axis (`np.unpackbits(packed, axis=-1, count=shape[-1])`)."""

    session: int
    frame_idx: int
    obj_ids: tuple[int, ...]
    packed: np.ndarray
    shape: tuple[int, ...]
    scores: np.ndarray
    gpu_memory_bytes: int | None = None  # the model process's, when it runs on CUDA (for the worker's metrics)
    source_idx: int | None = None  # a live session's frame: which frame of the source it is
    gpu_free_bytes: int | None = None  # free on the device, on CUDA (admission: worker/service/capacity.py)


@dataclass(frozen=True)
class Answer:
    """AddPrompts or RemoveObject done (`error` None) or refused (`error`, raised in the worker as itself);
    `position` is the session's position in the model process when it answered."""

    session: int
    position: int
    error: BaseException | None = None


@dataclass(frozen=True)
class Done:
    """The session's last frame was sent."""

    session: int
    stats: dict[str, float]


@dataclass(frozen=True)
class Closed:
    """The session was closed, as asked."""

    session: int


@dataclass(frozen=True)
class Error:
    """Loading the model (`session` None), or a session, failed with `error` (re-raised in the worker as
    itself)."""

    error: BaseException
    session: int | None = None


@dataclass(frozen=True)
class Proposed:
    """The masks a `Propose` found, bit-packed along the last axis as a Frame's, best first; or its error."""

    session: int
    packed: np.ndarray
    shape: tuple[int, ...]
    scores: tuple[float, ...]
    error: BaseException | None = None


@dataclass(frozen=True)
class Backfilled:
    """What a `BackfillPrompt` did: the object's masks on frames 0..upto-1, bit-packed along the last axis as a
    Frame's, and their scores (the object is in the child's session from `upto` on); or its error."""

    session: int
    obj_id: int
    upto: int
    packed: np.ndarray
    shape: tuple[int, ...]
    scores: tuple[float, ...]
    seconds: float = 0.0
    error: BaseException | None = None


FromModel = Ready | Frame | Answer | Proposed | Backfilled | Done | Closed | Error
