"""The Session seam (worker/model/session.py): one model, several sessions that never touch each other,
and objects that come and go between frames.

Unit tier on the colour segmenter and across the model process; e2e tier on the real SAM 2 (random
weights, CPU, image size 256), where every comparison is bit for bit against SAM 2's own predictor
driven the same way (init_state with every frame, nothing released).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from producer.decode import extract_frames
from runtime.settings import Settings
from schemas.errors import PromptError
from schemas.prompts import ObjectPrompt
from tests.fakes import FROM_ENV, ColourSegmenter
from tests.test_fake_segmenter import N_FRAMES, green_centre, prompts, red_centre, write_frames
from tests.videos import disc_prompt, make_video
from worker.model.frame_masks import FrameMasks
from worker.model.process import ModelProcess
from worker.model.segment import Segmenter, Session
from worker.sources.frames import DirFrames

W, H = 160, 120


def green(frame: int) -> ObjectPrompt:
    x, y = green_centre(frame)
    return ObjectPrompt(2, frame, ((x, y),), (1,))


def red(frame: int, obj_id: int = 7) -> ObjectPrompt:
    x, y = red_centre(frame)
    return ObjectPrompt(obj_id, frame, ((x, y),), (1,))


@pytest.fixture
def frames(tmp_path: Path) -> DirFrames:
    write_frames(tmp_path / "frames")
    return DirFrames(tmp_path / "frames", N_FRAMES)


def interleave(sessions: list[Session]) -> list[list[FrameMasks]]:
    """Take one frame from each session in turn until all have ended."""
    results: list[list[FrameMasks]] = [[] for _ in sessions]
    live = set(range(len(sessions)))
    for k in itertools.cycle(range(len(sessions))):
        if not live:
            break
        if k not in live:
            continue
        try:
            results[k].append(next(sessions[k]))
        except StopIteration:
            live.discard(k)
    return results


def same(a: list[FrameMasks], b: list[FrameMasks]) -> bool:
    return len(a) == len(b) and all(
        x.frame_idx == y.frame_idx and x.obj_ids == y.obj_ids and np.array_equal(x.masks, y.masks)
        and np.array_equal(x.scores, y.scores) for x, y in zip(a, b))


# ---- unit: the protocol on the colour segmenter ------------------------------------------------------
def test_two_sessions_on_one_colour_model_do_not_touch_each_other(frames: DirFrames) -> None:
    model = ColourSegmenter()
    alone_a = list(model.segment(frames, prompts(), width=W, height=H))
    alone_b = list(model.segment(frames, [red(2)], width=W, height=H))
    with model.open_session(frames, prompts(), width=W, height=H) as a, \
            model.open_session(frames, [red(2)], width=W, height=H) as b:
        both = interleave([a, b])
    assert same(both[0], alone_a) and same(both[1], alone_b)
    assert [o.obj_ids for o in alone_b] == [(7,)] * N_FRAMES


def test_objects_come_and_go_between_frames(frames: DirFrames) -> None:
    with ColourSegmenter().open_session(frames, [green(0)], width=W, height=H) as s:
        assert s.obj_ids == (2,) and s.position == 0
        got = [next(s), next(s)]
        assert s.position == 2
        s.add_prompts([red(4)])  # a new object, ahead: it appears when its frame comes
        assert s.obj_ids == (2, 7)
        got += [next(s), next(s), next(s)]
        s.remove_object(2)  # gone from the next frame on
        got += list(s)
    assert [o.obj_ids for o in got] == [(2,)] * 4 + [(2, 7)] + [(7,)] * (N_FRAMES - 5)
    assert got[4].masks[1].any() and got[-1].masks[0].any()


def test_prompts_for_frames_already_out_are_refused_and_change_nothing(frames: DirFrames) -> None:
    with ColourSegmenter().open_session(frames, [green(0)], width=W, height=H) as s:
        next(s), next(s), next(s)
        with pytest.raises(PromptError, match="frames up to 2 are already segmented: prompt frame 3 or later"):
            s.add_prompts([red(5), red(1)])  # all or nothing
        with pytest.raises(PromptError, match="the video has 8 frames"):
            s.add_prompts([red(8)])
        with pytest.raises(PromptError, match="no object 9 to remove: the session tracks \\[2\\]"):
            s.remove_object(9)
        assert s.obj_ids == (2,)
        assert {o.obj_ids for o in s} == {(2,)}
    with pytest.raises(RuntimeError, match="closed"):
        next(s)


def test_or_next_puts_a_prompt_on_a_frame_already_computed_on_the_next_one(frames: DirFrames) -> None:
    """`or_next`: the session, not its caller, resolves "from the next frame you compute"."""
    with ColourSegmenter().open_session(frames, [green(0)], width=W, height=H) as s:
        next(s), next(s), next(s)
        s.add_prompts([red(1)], or_next=True)  # frame 1 is out: from frame 3 on
        s.add_prompts([red(5, obj_id=8)], or_next=True)  # a frame still ahead stays where it is
        rest = list(s)
    assert [o.obj_ids for o in rest] == [(2, 7), (2, 7), (2, 7, 8), (2, 7, 8), (2, 7, 8)]


def test_a_session_whose_objects_are_all_gone_yields_empty_frames_until_one_comes_back(frames: DirFrames) -> None:
    with ColourSegmenter().open_session(frames, [green(0)], width=W, height=H) as s:
        first = next(s)
        s.remove_object(2)
        empty = next(s)
        s.add_prompts([red(3)])
        rest = list(s)
    assert first.obj_ids == (2,) and empty.obj_ids == () and empty.masks.shape == (0, H, W)
    assert [o.obj_ids for o in rest] == [()] + [(7,)] * (N_FRAMES - 3)


def test_a_session_over_the_model_process_takes_the_same_commands(frames: DirFrames,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The same protocol across the process boundary; answers come between the child's frames, and the
    child's position (it may be ahead of what the worker has read) decides what is refused."""
    monkeypatch.setenv("VSEG_FAKE_DELAY_S", "0.3")  # the child a frame per 0.3 s: frame 6 is well ahead of it
    model = ModelProcess(Settings(model_process="on", segmenter=FROM_ENV, device="cpu"))
    try:
        local = ColourSegmenter().open_session(frames, [green(0)], width=W, height=H)
        remote = model.open_session(frames, [green(0)], width=W, height=H)
        with pytest.raises(RuntimeError, match="one session at a time"):
            model.open_session(frames, [green(0)], width=W, height=H)
        for s in (local, remote):
            next(s)
            s.add_prompts([red(6)])
        with pytest.raises(PromptError, match="already segmented"):
            remote.add_prompts([red(0)])
        assert remote.obj_ids == (2, 7) and remote.position >= 1
        assert same([next(remote)], [next(local)])
        remote.remove_object(7)  # from the child's position on, which may be ahead of the frames read
        at = remote.position
        assert 2 <= at <= N_FRAMES
        b = [next(local) for _ in range(at - local.position)]
        local.remove_object(7)
        a, b = list(remote), b + list(local)
        assert same(a, b) and [o.obj_ids for o in a][at - 2:] == [(2,)] * (N_FRAMES - at)
        remote.close()
        local.close()
        assert remote.stats == {}  # the colour model keeps no figures; SAM 2's come back with Done
        again = list(model.segment(frames, [red(0)], width=W, height=H))  # the next session on the same child
        assert len(again) == N_FRAMES
        half = model.open_session(frames, [red(0)], width=W, height=H)
        next(half)
        half.close()  # closed early: the child leaves it and takes the next
        assert len(list(model.segment(frames, [red(0)], width=W, height=H))) == N_FRAMES
    finally:
        model.close()


def test_over_the_model_process_or_next_is_resolved_by_the_child(frames: DirFrames,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker reads frame 0 while the child has computed more: a prompt meant "from the next frame" on
    frame 0 takes effect on the child's next frame, which its answer tells (`position`), with no retry."""
    monkeypatch.setenv("VSEG_FAKE_DELAY_S", "0.2")  # the child a frame per 0.2 s: far from the video's end
    model = ModelProcess(Settings(model_process="on", segmenter=FROM_ENV, device="cpu"))
    try:
        with model.open_session(frames, [green(0)], width=W, height=H) as remote:
            first = next(remote)
            remote.add_prompts([red(0)], or_next=True)
            at = remote.position  # the child's position when it took the prompt
            rest = [first, *remote]
        assert 1 <= at < N_FRAMES
        assert [o.obj_ids for o in rest] == [(2,)] * at + [(2, 7)] * (N_FRAMES - at)
    finally:
        model.close()


# ---- e2e: SAM 2, bit for bit ------------------------------------------------------------------------
N = 14
SIZE = (128, 96)


@pytest.fixture(scope="module")
def sam2(predictor: object) -> Segmenter:
    from worker.model.sam2.segmenter import Sam2Segmenter

    return Sam2Segmenter(predictor, name="t", random_weights=True, encoder_batch=1)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sessions")
    dirs = []
    for name, size, n in (("a", SIZE, N), ("b", (96, 128), N - 3)):  # another size and length
        video = make_video(root / f"{name}.mp4", num_frames=n, size_wh=size, fps=10)
        extract_frames(video, root / name)
        dirs.append(root / name)
    return dirs[0], dirs[1]


def bare(predictor: object, frames_dir: Path, steps: list[tuple[int, str, object]]) -> Iterator[tuple[int, tuple[int, ...], np.ndarray]]:
    """SAM 2's own predictor driven forward from frame 0: at each (frame, what, arg) step, before that frame,
    `add` prompts or `remove` an object, then propagation starts again from that frame."""
    p: object = predictor
    with torch.inference_mode():
        state = p.init_state(str(frames_dir))  # type: ignore[attr-defined]
        total = state["num_frames"]
        bounds = sorted({f for f, _, _ in steps if f > 0} | {total})
        start = 0
        for stop in bounds:  # the steps at `start`, then propagation up to the next step's frame
            for f, what, arg in steps:
                if f != start:
                    continue
                if what == "add":
                    for pr in arg:  # type: ignore[attr-defined]
                        p.add_new_points_or_box(state, frame_idx=pr.frame_idx, obj_id=pr.obj_id,  # type: ignore[attr-defined]
                                                points=np.array(pr.points_xy, np.float32),
                                                labels=np.array(pr.labels, np.int32))
                else:
                    p.remove_object(state, arg, need_output=False)  # type: ignore[attr-defined]
            for k, ids, logits in p.propagate_in_video(state, start_frame_idx=start,  # type: ignore[attr-defined]
                                                       max_frame_num_to_track=stop - start - 1):
                order = np.argsort(ids)
                yield k, tuple(sorted(int(i) for i in ids)), (logits[:, 0] > 0).cpu().numpy()[order]
            start = stop


@pytest.mark.e2e
def test_two_sam2_sessions_interleaved_give_each_exactly_its_masks_alone(sam2: Segmenter, videos: tuple[Path, Path]) -> None:
    """The acceptance test of the seam: one model, two sessions (different videos, sizes, prompts; one with
    a backward pass), frames taken in turn; each gets exactly what it gets alone."""
    a_dir, b_dir = videos
    a_prompts = [disc_prompt(1, 0, N, SIZE), disc_prompt(2, 4, N, SIZE, dy=8)]
    b_prompts = [disc_prompt(3, 0, N - 3, (96, 128))]
    alone_a = list(sam2.segment(DirFrames(a_dir, N), a_prompts, width=SIZE[0], height=SIZE[1]))
    alone_b = list(sam2.segment(DirFrames(b_dir, N - 3), b_prompts, width=96, height=128))
    with sam2.open_session(DirFrames(a_dir, N), a_prompts, width=SIZE[0], height=SIZE[1]) as a, \
            sam2.open_session(DirFrames(b_dir, N - 3), b_prompts, width=96, height=128) as b:
        got_a, got_b = interleave([a, b])
    assert [o.frame_idx for o in got_a] == list(range(N)) and [o.frame_idx for o in got_b] == list(range(N - 3))
    assert same(got_a, alone_a) and same(got_b, alone_b)
    assert any(o.masks.any() for o in got_a) and any(o.masks.any() for o in got_b)


@pytest.mark.e2e
def test_sam2_objects_added_and_removed_mid_session_match_the_predictor(predictor: object, sam2: Segmenter,
                                                                       videos: tuple[Path, Path]) -> None:
    """A second object prompted on frame 5 while frames flow, the first removed before frame 9: every
    frame's masks equal SAM 2's own predictor doing the same (propagate, add, propagate again, remove)."""
    a_dir, _ = videos
    first, late = disc_prompt(1, 0, N, SIZE), disc_prompt(2, 5, N, SIZE, dy=8)
    ours: list[FrameMasks] = []
    with sam2.open_session(DirFrames(a_dir, N), [first], width=SIZE[0], height=SIZE[1]) as s:
        ours += [next(s) for _ in range(3)]
        s.add_prompts([late])  # ahead of the model: applied when frame 5 comes
        ours += [next(s) for _ in range(6)]
        assert s.position == 9
        s.remove_object(1)
        ours += list(s)
    theirs = list(bare(predictor, a_dir, [(0, "add", [first]), (5, "add", [late]), (9, "remove", 1)]))
    assert [o.frame_idx for o in ours] == [k for k, _, _ in theirs] == list(range(N))
    assert [o.obj_ids for o in ours] == [ids for _, ids, _ in theirs] == [(1,)] * 5 + [(1, 2)] * 4 + [(2,)] * 5
    for o, (k, _, masks) in zip(ours, theirs):
        assert np.array_equal(o.masks, masks), f"frame {k}: masks differ from SAM 2's predictor"
