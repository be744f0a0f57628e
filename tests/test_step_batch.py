"""E2E tier: tracking steps batched across objects and sessions (worker/model/sam2/step_batch.py) on the real SAM 2
(random weights, CPU, image size 256) against SAM 2's own per-object loop.

- A batch of one is SAM 2's own step, bit for bit (the copy of its memory selection is exact).
- A batch of several objects (one session's, or several sessions') may take other kernels: the logits are
  compared against a stated tolerance (TOLERANCE), and the masks may flip no more than a thousandth of the pixels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from producer.decode import extract_frames
from runtime.settings import Settings
from schemas.prompts import ObjectPrompt
from tests.test_concurrency_sam2 import CLIPS, run_jobs
from tests.videos import disc_center, make_video
from worker.model.next_steps import NextStepPool
from worker.model.sam2 import step_batch
from worker.model.sam2.segmenter import Sam2Segmenter

pytestmark = pytest.mark.e2e

N = 16
SIZE = (128, 96)
TOLERANCE = 1e-3  # the largest logit difference allowed between a batched step and SAM 2's own (measured: below)


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("steps")
    video = make_video(root / "v.mp4", num_frames=N, size_wh=SIZE, fps=10)
    extract_frames(video, root / "frames")
    return root / "frames"


def prompts_for(objects: int) -> list[ObjectPrompt]:
    x0, y0 = disc_center(0, N, SIZE)
    spots = [(x0, y0), (x0, y0 + 10), (20.0, 20.0)]
    return [ObjectPrompt(k + 1, 0, (spots[k],), (1,)) for k in range(objects)]


def propagate(predictor: object, frames_dir: Path, prompts: list[ObjectPrompt], *, batched: bool
              ) -> Iterator[tuple[int, torch.Tensor]]:
    """SAM 2's own loop over its own inference state; `batched`: its per-object steps through BatchedSteps."""
    p: object = predictor
    with torch.inference_mode():
        state = p.init_state(str(frames_dir))  # type: ignore[attr-defined]
        for pr in prompts:
            p.add_new_points_or_box(state, frame_idx=pr.frame_idx, obj_id=pr.obj_id,  # type: ignore[attr-defined]
                                    points=np.array(pr.points_xy, np.float32), labels=np.array(pr.labels, np.int32))
        routed = step_batch.installed(p) if batched else contextlib.nullcontext()
        if batched:
            state[step_batch.STATE_KEY] = steps = step_batch.BatchedSteps(state, NextStepPool(frames=1, sessions=1))
        with routed:
            for k, _, logits in p.propagate_in_video(state):  # type: ignore[attr-defined]
                yield k, logits.clone()
        if batched:
            assert steps.batched == (len(prompts) * (N - 1) if len(prompts) > 1 else 0)


def test_a_batch_of_one_is_sam2s_own_step_bit_for_bit(predictor: object, frames_dir: Path) -> None:
    own = list(propagate(predictor, frames_dir, prompts_for(1), batched=False))
    ours = list(propagate(predictor, frames_dir, prompts_for(1), batched=True))
    assert [k for k, _ in ours] == list(range(N))
    for (k, a), (_, b) in zip(own, ours, strict=True):
        assert torch.equal(a, b), f"frame {k}: max difference {float((a - b).abs().max())}"


def test_one_sessions_objects_in_one_batch_are_within_the_tolerance(predictor: object, frames_dir: Path) -> None:
    own = list(propagate(predictor, frames_dir, prompts_for(3), batched=False))
    ours = list(propagate(predictor, frames_dir, prompts_for(3), batched=True))
    worst, flipped, pixels = 0.0, 0, 0
    for (_, a), (_, b) in zip(own, ours, strict=True):
        worst = max(worst, float((a - b).abs().max()))
        flipped += int(((a > 0) != (b > 0)).sum())
        pixels += a.numel()
    print(f"objects batched: largest logit difference {worst:.3g}, {flipped} of {pixels} mask pixels flipped")
    assert worst <= TOLERANCE
    assert flipped <= pixels / 1000
    assert any(bool((a > 0).any()) for _, a in own)  # something to compare


def test_a_model_that_cannot_batch_says_why(predictor: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(predictor, "non_overlap_masks_for_mem_enc", True)
    assert "non_overlap" in (step_batch.supported(predictor) or "")
    seg = Sam2Segmenter(predictor, name="t", random_weights=True, session_batch=4)
    assert seg.pool.sessions == 1  # steps stay out of the pool: SAM 2's own loop


def test_jobs_at_once_with_their_steps_batched_get_their_masks_within_the_tolerance(
    predictor: object, settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """session_batch 3 with three jobs held: frames encoded and objects tracked in one pass for several jobs."""
    alone_model = Sam2Segmenter(predictor, name="sam2.1-tiny", random_weights=True, encoder_batch=1)
    batched = Sam2Segmenter(predictor, name="sam2.1-tiny", random_weights=True, encoder_batch=1, session_batch=3)
    alone = run_jobs(alone_model, settings, redis_client, tmp_path, "one", 1)
    three = run_jobs(batched, settings, redis_client, tmp_path, "steps", 3)
    assert batched.pool.shared_frames > 0, "no frame was encoded in another session's pass"
    assert batched.pool.shared_steps > 0, "no step was run in another session's pass"
    assert batched.pool.largest >= 3
    for clip in CLIPS:
        assert [k for k, _ in three[clip]] == [k for k, _ in alone[clip]]
        for (k, a), (_, b) in zip(alone[clip], three[clip], strict=True):
            assert [o.obj_id for o in a] == [o.obj_id for o in b]
            for x, y in zip(a, b, strict=True):  # areas within a thousandth of the frame, boxes within a pixel
                assert abs(x.area - y.area) <= SIZE[0] * SIZE[1] / 1000, (clip, k, x.obj_id)
                assert abs(x.score - y.score) <= TOLERANCE, (clip, k, x.obj_id)
