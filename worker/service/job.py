"""A job as the worker runs it: a decoded job entry that passed every check, once, where it was decoded.

`validate_job` applies the worker's side of the trust boundary (a job entry is input from any
producer): the per-job limits (runtime/limits.py), the prompts against the frame size and count
(schemas/prompts.py), the frame directory and the render target resolved inside STORAGE_ROOT
(schemas/storage.py), and which kind of frame source the job has. What it returns is all the runner
needs, already checked; what it raises is a PermanentError (LimitError, PromptError, StorageError)
that fails the job without running it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from runtime.limits import check_job_limits
from runtime.settings import Settings
from schemas import messages
from schemas.errors import PermanentError
from schemas.names import POINTS, TEXT
from schemas.prompts import ObjectPrompt, object_ids, validate_prompts
from schemas.storage import job_render_rel, resolve_inside


class FrameSourceKind(str, enum.Enum):
    DIR = "dir"  # a finished frame directory of num_frames frames
    STREAM = "stream"  # frames announced on the job's frames stream while the producer decodes


@dataclass(frozen=True)
class ValidJob:
    """A job the worker can run: every path resolved inside STORAGE_ROOT, every prompt inside the video."""

    job_id: str
    frames_dir: Path
    source: FrameSourceKind
    num_frames: int  # the total for a frame directory; the producer's estimate for a stream
    width: int
    height: int
    fps: float
    prompts: tuple[ObjectPrompt, ...]
    obj_ids: tuple[int, ...]
    render_target: Path  # where the MP4 goes (and where stale partial files are looked for)
    render: bool  # False: masks only, no MP4
    resume: bool  # a reclaimed attempt resumes after the last published frame (worker/service/resume.py)
    producer_ttl_s: float  # the streaming producer's liveness key TTL; 0: it keeps none
    live: bool = False  # unbounded, real time: frames may be skipped, rolling HLS (worker/sources/live.py)
    auto: messages.AutoOptions | None = None  # automatic prompts (worker/service/auto.py)
    labels: tuple[str, ...] = ()  # zero-shot labels for every object (worker/model/labels.py)
    text: tuple[str, ...] = ()  # phrases whose every instance is tracked (SAM 3: worker/model/sam3/segmenter.py)

    @property
    def render_rel(self) -> str:
        """The render's path relative to STORAGE_ROOT as results name it (a live job's HLS playlist); "" for a
        masks-only job."""
        return job_render_rel(self.job_id, live=self.live) if self.render else ""


def validate_job(msg: messages.JobMessage, settings: Settings, capability: str = POINTS) -> ValidJob:
    """Check `msg` against the limits, its prompts, STORAGE_ROOT and what this worker's model can do
    (`capability`); raise a PermanentError saying what is wrong. A streamed job's frame count is not known yet,
    so its prompts may lie on any frame up to the frame limit (the producer checked them against the decoded
    count)."""
    if msg.text and capability != TEXT:
        raise PermanentError(f"job {msg.job_id} has text prompts ({', '.join(msg.text)}), which this worker's model "
                             "cannot take: text jobs go on the text lane, read by SAM 3 workers (--model sam3)")
    if capability == TEXT and (msg.auto is not None or not msg.text):
        raise PermanentError(f"job {msg.job_id} is not for a SAM 3 worker: it takes jobs with text (and points and "
                             "boxes beside it), not --auto or points alone: those go to a SAM 2 worker")
    check_job_limits(msg.num_frames, msg.width, msg.height, msg.prompts, settings)
    frames_dir = resolve_inside(settings.storage_root, msg.frames_dir)
    source = FrameSourceKind.STREAM if msg.frames_stream else FrameSourceKind.DIR
    if msg.auto is not None and msg.auto.keep and not msg.labels:
        raise PermanentError(f"job {msg.job_id} keeps automatic objects by label ({', '.join(msg.auto.keep)}) but has no "
                             "labels: submit it with --labels too")
    if msg.live and source is not FrameSourceKind.STREAM:
        raise PermanentError(f"job {msg.job_id} is live but has no frames stream: a live job's frames are announced "
                             "as they are captured; submit it with python -m producer submit (streaming)")
    validate_prompts(msg.prompts, width=msg.width, height=msg.height, allow_none=msg.auto is not None or bool(msg.text),
                     num_frames=settings.max_frames if source is FrameSourceKind.STREAM else msg.num_frames)
    return ValidJob(
        job_id=msg.job_id,
        frames_dir=frames_dir,
        source=source,
        num_frames=msg.num_frames,
        width=msg.width,
        height=msg.height,
        fps=msg.fps,
        prompts=msg.prompts,
        obj_ids=tuple(object_ids(msg.prompts)),
        render_target=resolve_inside(settings.storage_root, job_render_rel(msg.job_id, live=msg.live)),
        render=msg.render,
        resume=msg.resume,
        producer_ttl_s=msg.producer_ttl_s,
        live=msg.live,
        auto=msg.auto,
        labels=msg.labels,
        text=msg.text,
    )
