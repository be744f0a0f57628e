"""SAM 3 text tracking (worker/model/sam3/) on the tiny random model, on the CPU.

The TextTracker must be a faithful driver of transformers' Sam3VideoModel: frame by frame, with its memory
pruned, it gives the masks, ids and scores of the library's own `propagate_in_video_iterator`, bit for bit.
Random weights detect without looking (every query is a detection, its mask near the whole frame), so a
disc entering the clip cannot be what makes a new id: new ids come from the hot start replacing removed
duplicates, and from a phrase added mid-clip; the id bookkeeping is checked on both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.errors import CheckpointError
from worker.model.sam3.bounded import BoundedSession, held_entries, prune
from worker.model.sam3.build import Sam3, load_sam3, load_tiny
from worker.model.sam3.tracker import TextFrame, TextTracker

ROOT = Path(__file__).resolve().parent.parent
PHRASES = ["player", "ball"]
H, W = 96, 128


def clip(n: int) -> np.ndarray:
    """Discs moving over a grey field; a third one enters at frame 10."""
    yy, xx = np.mgrid[:H, :W]
    video = np.full((n, H, W, 3), 30, np.uint8)
    for t in range(n):
        video[t][(xx - 20 - 3 * t % 90) ** 2 + (yy - 30) ** 2 <= 12**2] = (255, 255, 255)
        video[t][(xx - 100 + 2 * t % 80) ** 2 + (yy - 60 - t % 30) ** 2 <= 9**2] = (255, 60, 60)
        if t >= 10:
            video[t][(xx - 60) ** 2 + (yy - 75) ** 2 <= 10**2] = (60, 255, 60)
    return video


@pytest.fixture(scope="module")
def sam3() -> Sam3:
    torch.set_num_threads(2)
    return load_tiny(seed=0)


@pytest.fixture(scope="module")
def video() -> np.ndarray:
    return clip(24)


@pytest.fixture(scope="module")
def library(sam3: Sam3, video: np.ndarray) -> dict[int, dict]:
    """The library's own whole-video run: its session over every frame, then its iterator."""
    session = sam3.processor.init_video_session(video=video, inference_device="cpu")
    sam3.processor.add_text_prompt(session, PHRASES)
    return {out.frame_idx: sam3.processor.postprocess_outputs(session, out)
            for out in sam3.model.propagate_in_video_iterator(inference_session=session)}


def track(sam3: Sam3, video: np.ndarray, num_frames: int | None) -> list[TextFrame]:
    tracker = TextTracker(sam3, PHRASES, width=W, height=H, num_frames=num_frames)
    frames = [f for frame in video for f in tracker.step(frame)] + tracker.finish()
    tracker.close()
    return frames


def assert_same_as_library(frames: list[TextFrame], library: dict[int, dict]) -> None:
    assert [f.frame_idx for f in frames] == sorted(library)
    for f in frames:
        ref = library[f.frame_idx]
        assert list(f.obj_ids) == ref["object_ids"].tolist(), f.frame_idx
        assert np.array_equal(f.masks, ref["masks"].numpy()), f.frame_idx
        assert np.array_equal(f.scores, ref["scores"].numpy()), f.frame_idx
        assert f.labels == {i: p for p, ids in ref["prompt_to_obj_ids"].items() for i in ids}
    assert sum(len(f.obj_ids) for f in frames) > 0, "the clip must show objects, or the comparison proves nothing"


@pytest.mark.e2e
def test_a_file_jobs_masks_equal_the_librarys_iterator_bit_for_bit(sam3: Sam3, video: np.ndarray,
                                                                  library: dict[int, dict]) -> None:
    frames = track(sam3, video, num_frames=len(video))
    assert_same_as_library(frames, library)
    assert frames[0].masks.shape[1:] == (H, W) and frames[-1].masks.dtype == bool


@pytest.mark.e2e
def test_frames_are_held_back_for_the_hot_start_and_released_in_order(sam3: Sam3, video: np.ndarray) -> None:
    tracker = TextTracker(sam3, PHRASES, width=W, height=H, num_frames=len(video))
    released = [[f.frame_idx for f in tracker.step(frame)] for frame in video]
    delay = sam3.model.hotstart_delay
    assert released[: delay - 1] == [[]] * (delay - 1)  # nothing final before 15 frames are in
    assert released[delay - 1] == [0]
    assert released[-1] == list(range(len(video) - delay, len(video)))  # the file's last frame flushes the rest
    assert tracker.finish() == []
    with pytest.raises(Exception, match="one too many"):
        tracker.step(video[0])


@pytest.mark.e2e
def test_a_live_job_is_the_library_too_while_nothing_old_is_needed(sam3: Sam3, video: np.ndarray,
                                                                  library: dict[int, dict]) -> None:
    """num_frames=None (unbounded), finish() at the end: the same masks as the whole-video run."""
    assert_same_as_library(track(sam3, video, num_frames=None), library)


@pytest.mark.e2e
def test_ids_are_stable_never_reused_and_new_and_removed_ids_follow_them(sam3: Sam3, video: np.ndarray) -> None:
    frames = track(sam3, video, num_frames=len(video))
    seen: set[int] = set()
    previous: tuple[int, ...] = ()
    label: dict[int, str] = {}
    for f in frames:
        assert f.new_ids == tuple(i for i in f.obj_ids if i not in seen)
        assert f.removed_ids == tuple(i for i in previous if i not in f.obj_ids)
        for obj_id in f.obj_ids:
            assert label.setdefault(obj_id, f.labels[obj_id]) == f.labels[obj_id]  # one object, one phrase
        if f.new_ids and seen:
            assert min(f.new_ids) > max(seen)  # a new instance: a fresh id, never an old one back
        seen.update(f.obj_ids)
        previous = f.obj_ids
    born = {i: next(f.frame_idx for f in frames if i in f.obj_ids) for i in seen}
    assert any(frame_idx > 0 for frame_idx in born.values()), "the clip must show an id born mid-clip"
    for obj_id, first in born.items():  # stable: from its first frame on, on every frame (nothing is lost here)
        assert all(obj_id in f.obj_ids for f in frames if f.frame_idx >= first)
    assert set(label.values()) == set(PHRASES)


@pytest.mark.e2e
def test_a_phrase_added_mid_clip_brings_new_ids_labelled_with_it(sam3: Sam3, video: np.ndarray) -> None:
    tracker = TextTracker(sam3, PHRASES, width=W, height=H, num_frames=len(video))
    frames = [f for frame in video[:12] for f in tracker.step(frame)]
    tracker.add_phrases(["referee", "ball"])  # "ball" again: looked for once
    assert tracker.phrases == ("player", "ball", "referee")
    frames += [f for frame in video[12:] for f in tracker.step(frame)]
    before = {i for f in frames if f.frame_idx < 12 for i in f.obj_ids}
    referees = {i for f in frames for i, p in f.labels.items() if p == "referee"}
    assert referees, "the added phrase found nothing"
    assert min(referees) > max(before, default=-1)
    first = min(f.frame_idx for f in frames if referees & set(f.obj_ids))
    assert first >= 12
    assert all(tracker.label_of(i) == "referee" for i in referees)


@pytest.mark.e2e
def test_a_live_jobs_memory_stops_growing(sam3: Sam3) -> None:
    tracker = TextTracker(sam3, PHRASES, width=W, height=H, num_frames=None)
    held = {}
    for i, frame in enumerate(clip(60)):
        tracker.step(frame)
        held[i] = held_entries(tracker.session)
    objects = len(tracker.session.obj_ids)
    assert objects > 0
    assert held[29] == held[44] == held[59], held  # past the warm-up, nothing grows with the frames
    assert held[59]["frames"] == 1 and held[59]["frame_scores"] == 1 and held[59]["suppressed"] == 1
    assert held[59]["tracked_outputs"] <= 16 * objects
    assert held[59]["cond_outputs"] <= sam3.model.config.tracker_config.max_cond_frame_num * objects
    assert len(tracker.finish()) == sam3.model.hotstart_delay - 1


def test_a_live_session_keeps_the_newest_conditioning_outputs_and_a_file_session_all() -> None:
    """Re-conditioning (every 16 frames, on a confident detection) does not happen with random weights:
    prune's handling of conditioning outputs is checked on a session filled by hand."""
    for keep_cond, kept in ((2, [32, 48]), (None, [0, 16, 32, 48])):
        session = BoundedSession(None)
        session.obj_id_to_idx(7)
        outputs = session.output_dict_per_obj[0]
        outputs["cond_frame_outputs"].update({f: {} for f in (0, 16, 32, 48)})
        outputs["non_cond_frame_outputs"].update({f: {} for f in range(49, 70)})
        prune(session, 69, keep_outputs=16, hotstart_delay=15, keep_cond=keep_cond)
        assert sorted(outputs["cond_frame_outputs"]) == kept
        assert sorted(outputs["non_cond_frame_outputs"]) == list(range(54, 70))
        assert session.num_frames == 10**9


def test_the_tokenizer_and_the_model_build_and_run_offline_with_open_clips_ids() -> None:
    """With HF_HUB_OFFLINE=1 and every socket refused: the tokenizer builds, its ids are open_clip's, and the
    tiny model tracks a frame (transformers' kernel download is off)."""
    script = """
import socket
def refuse(*a, **k):
    raise OSError("network used")
socket.socket.connect = refuse
socket.create_connection = refuse
import numpy as np
from open_clip.tokenizer import SimpleTokenizer
from worker.model.sam3.build import load_tiny
from worker.model.sam3.text_tokens import clip_tokenizer
from worker.model.sam3.tracker import TextTracker
hf, oc = clip_tokenizer(), SimpleTokenizer()
for text in ["player", "ball", "a red car", "Goal-keeper's GLOVES!", "naïve café 42"]:
    enc = hf(text, padding="max_length", max_length=32)
    ours = [i for i, m in zip(enc.input_ids, enc.attention_mask) if m]
    theirs = [i for i in oc(text, context_length=32)[0].tolist() if i]
    assert ours == theirs, (text, ours, theirs)
tracker = TextTracker(load_tiny(), ["player"], width=32, height=24, num_frames=1)
assert len(tracker.step(np.zeros((24, 32, 3), np.uint8))) == 1
print("offline ok")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "offline ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("make", ["empty", "no-weights", "garbage", "cache"])
def test_real_weights_missing_give_one_line_saying_what_to_download(tmp_path: Path, make: str) -> None:
    folder = tmp_path / "sam3"
    folder.mkdir()
    if make in ("no-weights", "garbage"):
        (folder / "config.json").write_text("{not json" if make == "garbage" else "{}")
    if make == "garbage":
        (folder / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError) as caught:
        if make == "cache":
            load_sam3(None, cache_dir=tmp_path / "hub")
        else:
            load_sam3(folder)
    message = str(caught.value)
    assert "\n" not in message
    assert "hf download facebook/sam3 --local-dir" in message
