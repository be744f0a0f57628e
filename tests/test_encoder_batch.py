"""Unit tests of worker.model.sam2.encoder_batch: which frames go through the image encoder together, and that
each frame's features are those of encoding it alone (a fake per-sample encoder; the real model's
equality is tests/test_sam2_memory.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from worker.model.sam2.encoder_batch import BatchedFeatures


class FakeImages:
    """Frame i's pixels are all i; `ready` frames are those the prefetch has already loaded."""

    def __init__(self, num_frames: int, ready: set[int] | None = None) -> None:
        self.num_frames = num_frames
        self.ready_frames = set(range(num_frames)) if ready is None else ready
        self.taken: list[int] = []

    def __getitem__(self, frame_idx: int) -> torch.Tensor:
        if not 0 <= frame_idx < self.num_frames:
            raise IndexError(frame_idx)
        self.taken.append(frame_idx)
        return torch.full((3, 4, 4), float(frame_idx))

    def ready(self, frame_idx: int) -> bool:
        return frame_idx in self.ready_frames


class FakeEncoder:
    """Per-sample output, shaped like SAM 2's forward_image (a tensor and lists of tensors)."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, images: torch.Tensor) -> dict[str, Any]:
        self.batches.append(images.shape[0])
        return {
            "vision_features": images * 2,
            "vision_pos_enc": [torch.zeros(images.shape[0], 2, 2, 2), torch.ones(images.shape[0], 2, 1, 1)],
            "backbone_fpn": [images + 1, images.mean(dim=(1, 2, 3), keepdim=True)],
        }


def features(images: FakeImages, batch: int = 2) -> tuple[BatchedFeatures, FakeEncoder]:
    encoder = FakeEncoder()
    return BatchedFeatures(images, encoder, torch.device("cpu"), batch=batch), encoder


def assert_alone(entry: Any, frame_idx: int) -> None:
    """The entry equals what encoding frame_idx alone (batch of one) gives."""
    image, out = entry
    alone = torch.full((1, 3, 4, 4), float(frame_idx))
    ref = FakeEncoder()(alone)
    assert torch.equal(image, alone)
    assert torch.equal(out["vision_features"], ref["vision_features"])
    for key in ("vision_pos_enc", "backbone_fpn"):
        assert len(out[key]) == len(ref[key])
        for got, want in zip(out[key], ref[key]):
            assert got.shape == want.shape and torch.equal(got, want)


def test_a_run_forwards_is_encoded_two_frames_at_a_time() -> None:
    feats, encoder = features(FakeImages(7))
    for k in range(7):
        assert_alone(feats.get(k, (None, None)), k)
    # frame 0 starts the run (alone, so the first result is not delayed), then 1+2, 3+4, 5+6
    assert encoder.batches == [1, 2, 2, 2]
    assert (feats.encoded, feats.batched) == (7, 6)
    assert len(feats) <= 2  # frames already passed are dropped


def test_a_run_backwards_batches_the_frames_before() -> None:
    images = FakeImages(6)
    feats, encoder = features(images, batch=3)
    for k in range(5, -1, -1):
        assert_alone(feats.get(k, (None, None)), k)
    assert encoder.batches == [1, 3, 2]  # 5 | 4 3 2 | 1 0 (never frame -1)
    assert images.taken == [5, 4, 3, 2, 1, 0]


def test_frames_not_yet_loaded_are_not_waited_for() -> None:
    images = FakeImages(5, ready={0, 1, 3})
    feats, encoder = features(images)
    for k in range(5):
        assert_alone(feats.get(k, (None, None)), k)
    # 0 alone (first), 1 alone (2 is not loaded yet), 2+3, 4 alone (nothing after it)
    assert encoder.batches == [1, 1, 2, 1]


def test_a_jump_starts_a_new_run_and_repeated_requests_hit_the_cache() -> None:
    feats, encoder = features(FakeImages(20))
    feats.get(0)
    feats.get(0)
    feats.get(10)  # a jump (say, a prompt on frame 10): alone
    feats.get(10)
    assert encoder.batches == [1, 1]
    feats.get(11)
    assert encoder.batches == [1, 1, 2]


def test_batch_of_one_is_the_predictors_own_behaviour() -> None:
    feats, encoder = features(FakeImages(4), batch=1)
    for k in range(4):
        assert_alone(feats.get(k), k)
    assert encoder.batches == [1, 1, 1, 1] and feats.batched == 0


def test_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch must be >= 1"):
        features(FakeImages(1), batch=0)


def test_the_segmenter_rejects_a_bad_batch_size_before_touching_the_model() -> None:
    from schemas.errors import ConfigError
    from worker.model.sam2.segmenter import Sam2Segmenter

    with pytest.raises(ConfigError, match="encoder_batch must be >= 1"):
        Sam2Segmenter(object(), name="t", random_weights=True, encoder_batch=0)


def test_lazy_frames_ready_means_loaded_without_waiting(tmp_path: Path) -> None:
    """`ready` is true only for a frame the prefetch has finished loading: never for one not yet
    scheduled, and never for one past the end of the video (its load fails)."""
    import numpy as np
    from PIL import Image

    from tests.workers import wait_for
    from worker.model.sam2.lazy_frames import LazyFrames
    from worker.sources.frames import DirFrames

    for k in range(3):
        Image.fromarray(np.full((24, 32, 3), 40 * k, np.uint8)).save(tmp_path / f"{k:05d}.jpg")
    lazy = LazyFrames(DirFrames(tmp_path, 3), 32, torch.device("cpu"), prefetch=2)
    try:
        assert not lazy.ready(0) and not lazy.ready(1)
        lazy[0]  # loads 0 and schedules 1 and 2 ahead
        assert lazy.ready(0)
        wait_for(lambda: lazy.ready(1) and lazy.ready(2), timeout_s=10, what="frames 1 and 2 loaded ahead")
        assert not lazy.ready(3)  # past the end: never scheduled
    finally:
        lazy.close()
