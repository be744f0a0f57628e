"""A live session's frames (worker/sources/live.py): the sampling policy, the session's contiguous
numbering, and SAM 2 on the picked frames giving exactly the predictor's masks on those frames alone;
a live session's memory stays bounded however often it is prompted."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from producer.decode import extract_frames
from schemas.prompts import ObjectPrompt
from tests.test_sam2_memory import bare_predictor_masks
from tests.videos import disc_center, make_video
from worker.model.sam2.segmenter import Sam2Segmenter
from worker.sources.frames import FrameInfo
from worker.sources.live import LiveFrames, LiveResults

N = 40
SIZE = (128, 96)


class FakeStream:
    """Stands in for StreamedFrames: frames of `frames_dir` announced `per_pick` at a time (more than one:
    the source outruns the model). tests/test_live_sampling.py has a stream whose announcements the test
    makes one by one."""

    def __init__(self, frames_dir: Path, total: int, *, per_pick: int = 1) -> None:
        self.dir = frames_dir
        self._total = total
        self.per_pick = per_pick
        self.available = 0
        self.forgotten: set[int] = set()
        self.outages, self.outage_s = 0, 0.0
        self.turn_wait: Callable[[], None] | None = None

    @property
    def total(self) -> int | None:
        return self._total if self.available >= self._total else None

    def check(self) -> None:
        return None

    def wait(self, frame_idx: int) -> bool:
        if frame_idx >= self._total:
            self.available = self._total
            return False
        self.available = max(self.available, frame_idx + 1)
        return True

    def poll_now(self) -> None:  # the source went on meanwhile
        self.available = min(self._total, self.available + self.per_pick - 1)

    def info(self, frame_idx: int) -> FrameInfo | None:
        if frame_idx in self.forgotten or frame_idx >= self.available:
            return None
        return FrameInfo(at=time.time(), captured_at=time.time(), pts_s=frame_idx / 10)

    def forget(self, frame_idx: int) -> None:
        self.forgotten.add(frame_idx)

    def path(self, frame_idx: int) -> Path:
        return self.dir / f"{frame_idx:05d}.jpg"

    def taken_path(self, frame_idx: int) -> Path:  # frames here are shared by tests: taking does not rename
        return self.path(frame_idx)

    def take(self, frame_idx: int) -> bool:
        return True


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("live")
    video = make_video(root / "v.mp4", num_frames=N, size_wh=SIZE, fps=10)
    extract_frames(video, root / "frames")
    return root / "frames"


def test_a_model_that_keeps_up_with_the_source_skips_nothing(frames_dir: Path) -> None:
    live = LiveFrames(FakeStream(frames_dir, N, per_pick=1), max_latency_s=2.0)  # type: ignore[arg-type]
    assert list(live.view) == list(range(N))
    assert [live.source_index(j) for j in range(N - 20, N)] == list(range(N - 20, N))


def test_a_source_outrunning_the_model_is_sampled_at_its_newest_frame_and_counted_contiguously(
        frames_dir: Path) -> None:
    stream = FakeStream(frames_dir, N, per_pick=3)  # three frames announced per pick
    live = LiveFrames(stream, max_latency_s=2.0)  # type: ignore[arg-type]
    view = live.view
    session_frames = list(view)
    picks = [live.source_index(j) for j in session_frames]
    assert session_frames == list(range(len(picks)))  # the session sees 0, 1, 2, ...
    assert picks[0] == 2 and all(b - a == 3 for a, b in zip(picks, picks[1:-1]))  # two of every three passed over
    assert picks[-1] == N - 1  # the last frame of the source
    assert view.total == len(picks)  # known once the source ended
    assert stream.forgotten >= set(range(picks[-1]))  # the picking side forgets what it passed


def test_a_resumed_live_job_starts_at_the_live_edge(frames_dir: Path) -> None:
    stream = FakeStream(frames_dir, N, per_pick=1)
    stream.available = 30  # the producer went on while no worker held the job
    live = LiveFrames(stream, max_latency_s=2.0, start_after=9, at_edge=True)  # type: ignore[arg-type]
    assert live.view.wait(0) and live.source_index(0) == 29
    assert live.view.wait(1) and live.source_index(1) == 30


def test_results_side_removes_each_jpeg_once_published(tmp_path: Path, frames_dir: Path) -> None:
    copy = tmp_path / "frames"
    shutil.copytree(frames_dir, copy)
    stream = FakeStream(copy, N)
    results = LiveResults(stream, start_after=-1)  # type: ignore[arg-type]
    stream.available = N
    results.release_through(9)
    assert not any((copy / f"{k:05d}.jpg").exists() for k in range(10))
    assert (copy / "00010.jpg").exists() and stream.forgotten == set(range(10))
    kept = LiveResults(stream, start_after=9, remove=False)  # type: ignore[arg-type]
    kept.release_through(12)  # keep_frames=on: the JPEGs stay
    assert (copy / "00012.jpg").exists()


@pytest.mark.e2e
def test_sam2_with_skips_gives_the_predictors_masks_on_the_processed_frames_alone(
        predictor: object, frames_dir: Path, tmp_path: Path) -> None:
    """SAM 2 weighs its memories by frame-index distance: the session numbers the frames it processes
    contiguously, so its masks are exactly those of the predictor run on those frames only."""
    stream = FakeStream(frames_dir, N, per_pick=2)  # two frames announced per pick: every other one is skipped
    live = LiveFrames(stream, max_latency_s=2.0)  # type: ignore[arg-type]
    x0, y0 = disc_center(1, N, SIZE)
    prompts = [ObjectPrompt(1, 0, ((x0, y0),), (1,))]
    seg = Sam2Segmenter(predictor, name="t", random_weights=True, prune=True, encoder_batch=1)
    with seg.open_session(live.view, prompts, width=SIZE[0], height=SIZE[1]) as session:
        ours = list(session)
    picks = [live.source_index(o.frame_idx) for o in ours[-3:]]
    assert len(ours) == N // 2 and picks == [N - 5, N - 3, N - 1]
    only = tmp_path / "processed"
    only.mkdir()
    for j in range(len(ours)):  # the processed frames alone, numbered as the session saw them
        shutil.copy(frames_dir / f"{2 * j + 1:05d}.jpg", only / f"{j:05d}.jpg")
    bare = list(bare_predictor_masks(predictor, only, prompts))
    assert [o.frame_idx for o in ours] == [k for k, _ in bare] == list(range(N // 2))
    for o, (k, masks) in zip(ours, bare):
        assert np.array_equal(o.masks, masks), f"session frame {k}: masks differ from the predictor's on those frames"


@pytest.mark.e2e
def test_a_live_session_prompted_again_and_again_keeps_a_bounded_memory(predictor: object, frames_dir: Path) -> None:
    stream = FakeStream(frames_dir, N)
    live = LiveFrames(stream, max_latency_s=2.0, max_cond_frames=2)  # type: ignore[arg-type]
    seg = Sam2Segmenter(predictor, name="t", random_weights=True, prune=True, encoder_batch=1)
    x0, y0 = disc_center(0, N, SIZE)
    with seg.open_session(live.view, [ObjectPrompt(1, 0, ((x0, y0),), (1,))], width=SIZE[0],
                          height=SIZE[1]) as session:
        held = []
        for out in session:
            if out.frame_idx % 3 == 2 and out.frame_idx + 1 < N:  # a correction every third frame
                x, y = disc_center(out.frame_idx + 1, N, SIZE)
                session.add_prompts([ObjectPrompt(1, out.frame_idx + 1, ((x, y),), (1,))])
            cond = session.state["output_dict_per_obj"][0]["cond_frame_outputs"]  # type: ignore[attr-defined]
            held.append(len(cond))
    prompted = 1 + len(range(2, N - 1, 3))
    # the newest two, plus those still inside memory attention's window: not one per prompt
    assert max(held) <= 2 + seg.window // 3 + 1 < prompted
