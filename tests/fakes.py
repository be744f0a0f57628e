"""Test doubles for the worker's Segmenter seam (worker/model/segment.py); tests only, never imported by the service.

`ColourSegmenter`: a deterministic segmenter for plumbing tests. An object is "the blob of its
prompt's colour": its reference colour is read at its prompt (first foreground point, else the box
centre) on its earliest prompt frame, and on every frame its mask is the largest connected region of
pixels within `tolerance` (max absolute BGR difference) of that colour. No model, no GPU.

`ChaosHooks`: fault injection around a segmenter, per job id (the name of the job's directory), from
the test's own configuration (never from files in a job's folder):
  crash_at N      the process SIGKILLs itself on frame N (a job that kills its worker, or its model process)
  transient_at N  RetryableError on frame N, once per process (like a CUDA out of memory)
  block_at N      the model never returns from frame N, holding its turn (a wedged model or driver)
Per-frame `delay_s` slows jobs down, spent in a turn on the pretend shared model (worker/model/turns.py: jobs
held at once take turns, as on SAM 2); with `busy` the delay is spent in a Python loop that holds the GIL.
`gpu_mib` (VSEG_FAKE_GPU_MIB=FREE,EACH) pretends to be a GPU with FREE MiB free less EACH per open session.

`from_env`: the factory a worker started by a test names in its settings
(`VSEG_SEGMENTER=tests.fakes:from_env`); it reads VSEG_FAKE_DELAY_S, VSEG_FAKE_BUSY (1) and
VSEG_FAKE_GPU_MIB, VSEG_FAKE_FAULTS (JSON: job id, or "*" for every job, to {"crash_at": N, ...}).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import cv2
import numpy as np

from runtime.settings import Settings
from schemas.errors import PromptError, RetryableError, StorageError
from schemas.prompts import ObjectPrompt
from worker.model.proposals import Proposal
from worker.model.segment import FrameMasks, GpuBudget, InProcessModel, MaskPrompt, Prompt, Segmenter, Session
from worker.model.session import Backfill, Opens, SessionBase
from worker.model.turns import FairTurns
from worker.sources.frames import FrameSource, frame_ready, turn_wait_check

logger = logging.getLogger(__name__)


def read_frame(frames: FrameSource, frame_idx: int) -> np.ndarray:
    """Read frame `frame_idx` of `frames` as BGR uint8, or raise StorageError."""
    path = frames.path(frame_idx)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise StorageError(f"cannot read frame {path}: missing or not a JPEG image")
    return image


def prompt_xy(prompt: ObjectPrompt) -> tuple[float, float]:
    """Where to sample an object's colour: its first foreground point, else its box centre, else its first point."""
    for (x, y), label in zip(prompt.points_xy, prompt.labels):
        if label == 1:
            return x, y
    if prompt.box_xyxy is not None:
        x0, y0, x1, y1 = prompt.box_xyxy
        return (x0 + x1) / 2, (y0 + y1) / 2
    if prompt.points_xy:
        return prompt.points_xy[0]
    raise PromptError(f"object {prompt.obj_id} on frame {prompt.frame_idx}: a prompt needs a point or a box")


def sample_colour(image: np.ndarray, x: float, y: float) -> np.ndarray:
    """Median BGR colour of the 3x3 neighbourhood of (x, y), clamped to the image (robust to JPEG noise)."""
    height, width = image.shape[:2]
    col = min(max(int(round(x)), 0), width - 1)
    row = min(max(int(round(y)), 0), height - 1)
    patch = image[max(row - 1, 0) : row + 2, max(col - 1, 0) : col + 2].reshape(-1, 3)
    return np.median(patch, axis=0).astype(np.int16)


def colour_mask(image: np.ndarray, colour: np.ndarray, tolerance: int) -> np.ndarray:
    """Largest 8-connected region of pixels within `tolerance` of `colour` (max abs BGR difference)."""
    close = np.abs(image.astype(np.int16) - colour).max(axis=2) <= tolerance
    count, labels, stats, _ = cv2.connectedComponentsWithStats(close.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros(close.shape, dtype=bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == largest


def first_prompts(prompts: Sequence[ObjectPrompt]) -> dict[int, ObjectPrompt]:
    """Each object's prompt on its earliest frame."""
    first: dict[int, ObjectPrompt] = {}
    for prompt in prompts:
        current = first.get(prompt.obj_id)
        if current is None or prompt.frame_idx < current.frame_idx:
            first[prompt.obj_id] = prompt
    return first


class ColourSegmenter(InProcessModel):
    """Segmenter that tracks each object as the largest blob of its prompt's colour."""

    name = "fake-colour"
    random_weights = False
    device = "cpu"

    def __init__(
        self, tolerance: int = 60, *, delay_s: float = 0.0, fail_at_frame: int | None = None
    ) -> None:
        if not 0 <= tolerance <= 255:
            raise ValueError(f"tolerance must be in 0..255 (max abs BGR difference), but got {tolerance}")
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, but got {delay_s}")
        self.tolerance = tolerance
        self.delay_s = delay_s
        self.fail_at_frame = fail_at_frame

    def open_session(self, frames: FrameSource, prompts: Sequence[Prompt], *, width: int = 0,
                     height: int = 0, start_frame: int = 0) -> ColourSession:
        return ColourSession(self, frames, prompts, start_frame)


class ColourSession(SessionBase):
    """One job on the ColourSegmenter: an object's reference colour is sampled at its first prompt (and
    again at a later prompt for it, a correction); frames are segmented as they arrive."""

    def __init__(self, model: ColourSegmenter, frames: FrameSource, prompts: Sequence[Prompt],
                 start_frame: int = 0) -> None:
        super().__init__(start_frame)
        self.model = model
        self.frames = frames
        self.colours: dict[int, np.ndarray] = {}
        self.add_prompts(prompts)

    def _total(self) -> int | None:
        return self.frames.total

    def _backfill_on(self) -> tuple[Opens, FrameSource, int, int]:
        height, width = read_frame(self.frames, 0).shape[:2]
        return self.model, self.frames, width, height

    def _sample(self, prompts: Sequence[Prompt]) -> None:
        for p in prompts:
            if isinstance(p, MaskPrompt):  # a seed: the median colour under its mask (none: it matches nothing)
                image = read_frame(self.frames, p.frame_idx)
                self.colours[p.obj_id] = (np.median(image[p.mask], axis=0).astype(np.int16) if p.mask.any()
                                          else np.full(3, 10_000, np.int16))
                self.book.tracked.add(p.obj_id)
        prompts = [p for p in prompts if isinstance(p, ObjectPrompt)]
        for obj_id, prompt in sorted(first_prompts(prompts).items()):
            if not self.frames.wait(prompt.frame_idx):
                raise PromptError(
                    f"prompt for object {obj_id} is on frame {prompt.frame_idx}, but the video has "
                    f"{self.frames.total} frames (0..{(self.frames.total or 0) - 1})"
                )
            x, y = prompt_xy(prompt)
            self.colours[obj_id] = sample_colour(read_frame(self.frames, prompt.frame_idx), x, y)
            self.book.tracked.add(obj_id)
            logger.debug("object %d: reference colour %s from frame %d", obj_id, self.colours[obj_id].tolist(),
                         prompt.frame_idx)

    def _run(self) -> Iterator[FrameMasks]:
        # every object from its first prompt, whatever its frame (a resumed session: from its seeds)
        self._sample(self.book.take_until(1 << 30 if self.start_frame == 0 else self.start_frame))
        frame_idx = self.start_frame
        while self.frames.wait(frame_idx):
            for obj_id in self.book.removals:
                self.colours.pop(obj_id, None)
                self.book.tracked.discard(obj_id)
            self.book.removals.clear()
            self._sample(self.book.take(frame_idx))
            if self.model.fail_at_frame is not None and frame_idx == self.model.fail_at_frame:
                raise RuntimeError(f"fake failure at frame {frame_idx}")
            if self.model.delay_s:
                time.sleep(self.model.delay_s)
            image = read_frame(self.frames, frame_idx)
            obj_ids = tuple(sorted(self.colours))
            masks = np.stack([colour_mask(image, self.colours[i], self.model.tolerance) for i in obj_ids]) \
                if obj_ids else np.zeros((0, *image.shape[:2]), dtype=bool)
            scores = cast(np.ndarray, masks.any(axis=(1, 2)).astype(np.float32))
            frame_idx += 1
            self._position = frame_idx
            yield FrameMasks(frame_idx=frame_idx - 1, obj_ids=obj_ids, masks=masks, scores=scores)


@dataclass(frozen=True)
class Faults:
    """What goes wrong in one job's runs (frame indices; None: nothing)."""

    crash_at: int | None = None
    transient_at: int | None = None
    block_at: int | None = None


class ChaosHooks(InProcessModel):
    """Fault injection around a Segmenter, per job id (see the module doc)."""

    def __init__(self, inner: Segmenter, *, delay_s: float = 0.0, busy: bool = False,
                 faults: Mapping[str, Faults] | None = None, gpu_mib: tuple[int, int] | None = None) -> None:
        self.inner = inner
        self.turns = FairTurns()  # the delay is one step on a shared model: sessions take turns, as on SAM 2's
        self.gpu_mib = gpu_mib  # a pretend GPU: (free MiB with no session open, MiB each open session takes)
        self.open_sessions = 0
        self.name = inner.name
        self.random_weights = inner.random_weights
        self.device = "cpu"
        self.delay_s = delay_s
        self.busy = busy
        self.faults = dict(faults or {})
        self._transient_done: set[str] = set()

    def gpu_budget(self) -> GpuBudget | None:
        if self.gpu_mib is None:
            return None
        free, each = self.gpu_mib
        return GpuBudget((free - each * self.open_sessions) * MIB, each * MIB, 0)

    def _wait(self, frames: FrameSource, live: bool = False, ready: Callable[[], bool] | None = None) -> None:
        """One step's time, in a turn; `ready`: whether a live session's next frame is there, asked at the end
        of the step as worker/model/sam2/session.py asks it (then it holds the model)."""
        if self.delay_s <= 0:
            return
        with self.turns.turn(live=live, check=turn_wait_check(frames)) as turn:
            self._spend()
            turn.hold = ready is not None and ready()

    def _spend(self) -> None:
        if not self.busy:
            time.sleep(self.delay_s)
            return
        end = time.perf_counter() + self.delay_s
        x = 0
        while time.perf_counter() < end:
            x += sum(range(2000))  # pure Python: holds the GIL between switch intervals

    def open_session(self, frames: FrameSource, prompts: Sequence[Prompt], *, width: int, height: int,
                     start_frame: int = 0) -> Session:
        job = frames.dir.parent.name  # STORAGE_ROOT/jobs/<job id>/frames
        faults = self.faults.get(job) or self.faults.get("*") or Faults()
        inner = self.inner.open_session(frames, prompts, width=width, height=height, start_frame=start_frame)
        self.open_sessions += 1
        return ChaosSession(self, inner, job, faults, frames)


class ChaosSession:
    """An inner session's frames, with its job's faults injected."""

    def __init__(self, hooks: ChaosHooks, inner: Session, job: str, faults: Faults, frames: FrameSource) -> None:
        self.hooks, self.inner, self.job, self.faults, self.frames = hooks, inner, job, faults, frames
        self.live = bool(getattr(frames, "realtime", False))  # a live job's frames: its turns come first
        self._closed = False

    obj_ids = property(lambda self: self.inner.obj_ids)
    position = property(lambda self: self.inner.position)
    stats = property(lambda self: self.inner.stats)

    def add_prompts(self, prompts: Sequence[ObjectPrompt], *, or_next: bool = False) -> None:
        self.inner.add_prompts(prompts, or_next=or_next)

    def add_text(self, phrases: Sequence[str], *, fps: float | None = None) -> None:
        self.inner.add_text(phrases, fps=fps)

    def reserve_ids(self, upto: int) -> None:
        self.inner.reserve_ids(upto)

    def remove_object(self, obj_id: int) -> None:
        self.inner.remove_object(obj_id)

    def backfill(self, prompt: ObjectPrompt) -> Backfill:
        return self.inner.backfill(prompt)

    def __iter__(self) -> ChaosSession:
        return self

    def __next__(self) -> FrameMasks:
        out = next(self.inner)
        self.hooks._wait(self.frames, self.live,
                         (lambda: frame_ready(self.frames, self.inner.position)) if self.live else None)
        if out.frame_idx == self.faults.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if out.frame_idx == self.faults.transient_at and self.job not in self.hooks._transient_done:
            self.hooks._transient_done.add(self.job)
            raise RetryableError(f"injected transient failure at frame {out.frame_idx}")
        if out.frame_idx == self.faults.block_at:
            with self.hooks.turns.turn():  # forever, holding the model: nothing in this thread can stop it
                threading.Event().wait()
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.hooks.open_sessions -= 1
        self.inner.close()

    def __enter__(self) -> ChaosSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def faults_from_json(text: str) -> dict[str, Faults]:
    return {job: Faults(**spec) for job, spec in json.loads(text or "{}").items()}


def from_env(settings: Settings) -> Segmenter:
    """The segmenter of a worker started by a test (`VSEG_SEGMENTER=tests.fakes:from_env`)."""
    logger.warning("using the FAKE colour segmenter (tests.fakes): for plumbing tests only")
    gpu = os.environ.get("VSEG_FAKE_GPU_MIB", "")
    return ChaosHooks(ColourSegmenter(), delay_s=float(os.environ.get("VSEG_FAKE_DELAY_S", "0") or 0),
                      busy=os.environ.get("VSEG_FAKE_BUSY", "") == "1",
                      faults=faults_from_json(os.environ.get("VSEG_FAKE_FAULTS", "")),
                      gpu_mib=(int(gpu.split(",")[0]), int(gpu.split(",")[1])) if gpu else None)


FROM_ENV = "tests.fakes:from_env"
MIB = 1024 * 1024


class ColourProposer:
    """A MaskProposer for plumbing tests (worker/model/proposals.py): every blob of saturated colour of at
    least `min_area` pixels is an object, the largest first."""

    peak_memory_bytes = 0

    def __init__(self, min_area: int = 20) -> None:
        self.min_area = min_area
        self.calls = 0

    def propose(self, image_rgb: np.ndarray) -> list[Proposal]:
        self.calls += 1
        saturated = (cv2.cvtColor(image_rgb, cv2.COLOR_RGB2HSV)[:, :, 1] > 100).astype(np.uint8)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(saturated, connectivity=8)
        found = [(int(stats[k, cv2.CC_STAT_AREA]), k) for k in range(1, count)
                 if stats[k, cv2.CC_STAT_AREA] >= self.min_area]
        return [Proposal(labels == k, 1.0) for _, k in sorted(found, reverse=True)]


def colour_proposer(settings: Settings) -> ColourProposer:
    """VSEG_PROPOSER=tests.fakes:colour_proposer."""
    return ColourProposer()


NAMED_RGB = {"green": (0, 255, 0), "magenta": (255, 0, 255), "red": (255, 0, 0), "blue": (0, 0, 255)}


class ColourLabeller:
    """A Labeller for plumbing tests (worker/model/labels.py): the job's label whose colour name is nearest
    the object's median colour."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = tuple(labels)

    def label(self, image_rgb: np.ndarray, mask: np.ndarray) -> tuple[str, float]:
        if not mask.any():
            return "", 0.0
        colour = np.median(image_rgb[mask], axis=0)
        named = [(float(np.abs(colour - NAMED_RGB.get(label, (128, 128, 128))).sum()), label) for label in self.labels]
        return min(named)[1], 0.9


def colour_labeller(settings: Settings, labels: Sequence[str]) -> ColourLabeller:
    """VSEG_LABELLER=tests.fakes:colour_labeller."""
    return ColourLabeller(labels)
