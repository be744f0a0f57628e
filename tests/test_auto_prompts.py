"""Objects that come and go by themselves (worker/service/auto.py): with `--auto`, a mask generator on
keyframes adds what no tracked object covers, a new object shows after its confirmation frames and is
ended (`lost`) once absent long enough; `--labels` gives every object a label (CLIP, or a plugged-in
labeller), `--auto-keep` keeps only automatic objects with those labels, `--roi` and `--auto-min-area`
limit what is added. The synthetic video: a green disc crossing, and a magenta square that enters
halfway through and leaves at three quarters."""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis

from producer.cli import main as producer_main
from producer.submission import submit
from runtime.settings import Settings
from schemas import messages
from schemas.errors import ConfigError, PromptError
from tests.fakes import ChaosHooks, ColourSegmenter
from tests.videos import ENTERING_BGR, disc_prompt, draw_entering_square, entering_square, make_video
from worker.service.loop import Worker

pytestmark = pytest.mark.integration

N = 40
SIZE = (96, 64)
EVERY = 5


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("auto") / "v.mp4", num_frames=N, size_wh=SIZE, fps=10,
                      draw=draw_entering_square(N, SIZE))


@pytest.fixture
def auto_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, proposer="tests.fakes:colour_proposer",
                               labeller="tests.fakes:colour_labeller", auto_confirm_frames=2, auto_lost_frames=3,
                               label_every=5, auto_min_mask_region_area=10)


def run(settings: Settings, client: redis.Redis) -> None:
    worker = Worker(settings=settings, segmenter=ChaosHooks(ColourSegmenter()), client=client, name="auto")
    thread = threading.Thread(target=worker.run, kwargs={"burst": True}, daemon=True)
    thread.start()
    thread.join(60)


def results(client: redis.Redis, settings: Settings, job: str) -> list[messages.Message]:
    return [messages.decode(f) for _, f in client.xrange(settings.keys.results(job))]


def objects_by_frame(msgs: list[messages.Message]) -> dict[int, dict[int, messages.ObjectResult]]:
    return {m.frame_idx: {o.obj_id: o for o in m.objects if o.area} for m in msgs if isinstance(m, messages.FrameResult)}


def changes(msgs: list[messages.Message]) -> list[messages.ObjectChange]:
    return [m for m in msgs if isinstance(m, messages.ObjectChange)]


def auto(**kwargs: object) -> messages.AutoOptions:
    return messages.AutoOptions(every_frames=EVERY, **kwargs)  # type: ignore[arg-type]


def test_an_object_entering_halfway_is_added_within_a_keyframe_and_ended_after_it_leaves(
        video: Path, auto_settings: Settings, redis_client: redis.Redis) -> None:
    submit(video, [disc_prompt(1, 0, N, SIZE)], settings=auto_settings, job_id="enter", auto=auto())
    run(auto_settings, redis_client)
    msgs = results(redis_client, auto_settings, "enter")
    assert isinstance(msgs[-1], messages.Completed), msgs[-1]
    first, end = entering_square(N, SIZE)
    found = changes(msgs)
    assert [(c.obj_id, c.change, c.source) for c in found] == [(2, "added", "auto"), (2, "lost", "auto")]
    added, lost = found
    confirm = auto_settings.auto_confirm_frames
    assert first + confirm - 1 <= added.frame_idx <= first + EVERY + confirm  # within one keyframe interval
    assert end <= lost.frame_idx <= end + auto_settings.auto_lost_frames + 1
    by_frame = objects_by_frame(msgs)
    assert all(1 in by_frame[k] for k in range(N))  # the prompted disc throughout
    shown = sorted(k for k, objs in by_frame.items() if 2 in objs)
    assert shown and shown[0] == added.frame_idx and shown[-1] < lost.frame_idx  # hidden until confirmed
    assert all(not objs or set(objs) <= {1, 2} for objs in by_frame.values())


def test_with_no_prompts_at_all_every_object_is_found(video: Path, auto_settings: Settings,
                                                      redis_client: redis.Redis) -> None:
    submit(video, [], settings=auto_settings, job_id="none", auto=auto(), labels=("green", "magenta"))
    run(auto_settings, redis_client)
    msgs = results(redis_client, auto_settings, "none")
    assert isinstance(msgs[-1], messages.Completed), msgs[-1]
    added = [c for c in changes(msgs) if c.change == "added"]
    # found on frame 0 (a keyframe), tracked from frame 1, shown once present on auto_confirm_frames frames
    assert [c.obj_id for c in added] == [1, 2] and added[0].frame_idx == auto_settings.auto_confirm_frames
    assert [c.label for c in added] == ["green", "magenta"]
    labels = {o.obj_id: o.label for objs in objects_by_frame(msgs).values() for o in objs.values()}
    assert labels == {1: "green", 2: "magenta"}
    scores = [o.label_score for objs in objects_by_frame(msgs).values() for o in objs.values()]
    assert all(s is not None and 0 <= s <= 1 for s in scores)


@pytest.mark.parametrize(("options", "why"), [
    ({"keep": ("green",)}, "1 not a kept label"),  # the square is labelled magenta: not kept
    ({"roi": (40.0, 0.0, 96.0, 64.0)}, "1 outside the roi"),  # the square is in the top left, outside the zone
    ({"min_area": 1000}, "2 too small"),  # the square is smaller than that (and so is the disc)
], ids=["auto-keep", "roi", "min-area"])
def test_limits_keep_the_square_out(video: Path, auto_settings: Settings, redis_client: redis.Redis,
                                    options: dict[str, object], why: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="worker.service.auto_objects")
    submit(video, [disc_prompt(1, 0, N, SIZE)], settings=auto_settings, job_id="limited", auto=auto(**options),
           labels=("green", "magenta"))
    run(auto_settings, redis_client)
    msgs = results(redis_client, auto_settings, "limited")
    assert isinstance(msgs[-1], messages.Completed), msgs[-1]
    assert not changes(msgs)
    assert all(set(objs) <= {1} for objs in objects_by_frame(msgs).values())
    lines = keyframe_lines(caplog)  # and each keyframe says why the square was not added
    assert any("2 masks proposed, 0 became objects; not added: " in line and why in line for line in lines), lines


def keyframe_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "worker.service.auto_objects" and r.getMessage().startswith("auto keyframe ")]


def test_each_keyframe_says_what_it_found_in_the_log_the_progress_and_status(
        video: Path, auto_settings: Settings, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="worker.service.auto_objects")
    submit(video, [disc_prompt(1, 0, N, SIZE)], settings=auto_settings, job_id="told", auto=auto())
    run(auto_settings, redis_client)
    assert isinstance(results(redis_client, auto_settings, "told")[-1], messages.Completed)
    lines = keyframe_lines(caplog)
    assert len(lines) == N // EVERY  # frames 0, 5, ... 35: one line each
    assert lines[0] == "auto keyframe 1 (frame 0): 1 masks proposed, 0 became objects; not added: 1 overlapping an object"
    added = [line for line in lines if "1 became objects [2]" in line]
    assert len(added) == 1 and "2 masks proposed" in added[0] and "not added: 1 overlapping an object" in added[0]
    proposed = sum(int(line.split(": ")[1].split(" masks")[0]) for line in lines)
    progress = [m for _, f in redis_client.xrange(auto_settings.keys.events)
                if isinstance(m := messages.decode(f), messages.Progress) and m.job_id == "told"]
    assert progress[-1].frames_done == N  # the last one holds the totals, the last keyframe's too
    assert (progress[-1].auto_keyframes, progress[-1].auto_proposed, progress[-1].auto_added) == (N // EVERY, proposed, 1)
    assert all(a.auto_keyframes <= b.auto_keyframes for a, b in zip(progress, progress[1:]))
    state = {k.decode(): v.decode() for k, v in redis_client.hgetall(auto_settings.keys.job("told")).items()}
    assert (state["auto_keyframes"], state["auto_proposed"], state["auto_added"]) == (str(N // EVERY), str(proposed), "1")
    monkeypatch.setenv("REDIS_URL", auto_settings.redis_url)
    monkeypatch.setenv("VSEG_KEY_PREFIX", auto_settings.key_prefix)
    assert producer_main(["status", "told"]) == 0
    assert f"auto: {N // EVERY} keyframe(s), {proposed} masks proposed, 1 became objects" in capsys.readouterr().out


def test_prompted_objects_get_labels_too(video: Path, auto_settings: Settings, redis_client: redis.Redis) -> None:
    submit(video, [disc_prompt(1, 0, N, SIZE)], settings=auto_settings, job_id="labelled", labels=("magenta", "green"))
    run(auto_settings, redis_client)
    by_frame = objects_by_frame(results(redis_client, auto_settings, "labelled"))
    assert {o.label for objs in by_frame.values() for o in objs.values()} == {"green"}


@pytest.mark.parametrize(("argv", "why"), [
    (["--auto-keep", "car"], "--auto-keep"),
    (["--auto", "--auto-keep", "car"], "--labels"),
    (["--auto", "--labels", "car", "--auto-keep", "bus"], "bus"),
    (["--auto", "--roi", "0,0,500,10"], "--roi"),
    (["--auto", "--auto-every", "0"], "--auto-every"),
])
def test_bad_automatic_options_are_refused_before_anything_is_written(
        video: Path, auto_settings: Settings, redis_client: redis.Redis, argv: list[str], why: str,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", auto_settings.redis_url)
    monkeypatch.setenv("STORAGE_ROOT", str(auto_settings.storage_root))
    with pytest.raises(SystemExit) if "--auto-every" in why else _no_exit():
        code = producer_main(["submit", str(video), "--point", "1:10,30", "--job-id", "bad", *argv])
        assert code == 2
    assert why in capsys.readouterr().err + caplog.text  # one line saying what was wrong
    assert not redis_client.exists(auto_settings.keys.job("bad"))


class _no_exit:  # noqa: N801 - a context manager that expects nothing
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_a_job_with_no_prompts_and_no_auto_is_refused(video: Path, auto_settings: Settings) -> None:
    with pytest.raises(PromptError, match="--auto"):
        submit(video, [], settings=auto_settings, job_id="empty")


@pytest.mark.e2e
def test_sam2s_own_generator_runs_on_keyframes_end_to_end(video: Path, settings: Settings,
                                                         redis_client: redis.Redis) -> None:
    """Random weights: which masks come out means nothing, but the real path runs (SAM 2's automatic mask
    generator on the worker's shared model, between frames of a session)."""
    import torch

    from worker.model.build import build_segmenter

    torch.manual_seed(0)
    real = dataclasses.replace(settings, checkpoint="random", image_size=256, device="cpu", auto_points_per_side=4,
                               auto_pred_iou_thresh=0.0, auto_stability_score_thresh=0.0, auto_confirm_frames=1)
    segmenter = build_segmenter(real)
    submit(video, [disc_prompt(1, 0, N, SIZE)], settings=real, job_id="sam2-auto", max_frames=12,
           auto=messages.AutoOptions(every_frames=6, max_objects=2))
    worker = Worker(settings=real, segmenter=segmenter, client=redis_client, name="sam2-auto")
    worker.run(burst=True)
    msgs = results(redis_client, real, "sam2-auto")
    assert isinstance(msgs[-1], messages.Completed), msgs[-1]
    assert [m.frame_idx for m in msgs if isinstance(m, messages.FrameResult)] == list(range(12))
    ids = {o.obj_id for m in msgs if isinstance(m, messages.FrameResult) for o in m.objects}
    assert 1 in ids and ids <= {1, 2, 3}


@pytest.mark.e2e
def test_the_clip_labeller_runs_with_random_weights_and_says_what_to_fetch_offline(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    from worker.model import labels
    from worker.model.labels import ClipLabeller

    monkeypatch.setattr(labels, "_loaded", {})  # this process's loads forgotten (a worker loads once)
    labeller = ClipLabeller(["person", "car", "ball"], pretrained="random")
    image = np.full((64, 96, 3), 128, np.uint8)
    mask = np.zeros((64, 96), bool)
    mask[10:40, 20:60] = True
    label, score = labeller.label(image, mask)
    assert label in ("person", "car", "ball") and 0 <= score <= 1
    assert labeller.label(image, np.zeros_like(mask)) == ("", 0.0)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline at once (the Hub's client read its env already)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K") as failed:
        ClipLabeller(["person"], pretrained="laion2b_s34b_b79k")
    assert "VSEG_LABEL_PRETRAINED=random" in str(failed.value) and len(str(failed.value)) < 200, failed.value


def test_the_render_writes_each_label_beside_its_id() -> None:
    from worker.output.draw import draw_masks

    frame = np.full((120, 160, 3), 90, np.uint8)
    masks = np.zeros((1, 120, 160), bool)
    masks[0, 60:100, 40:80] = True
    plain = draw_masks(frame, (1,), masks)
    named = draw_masks(frame, (1,), masks, names={1: "person"})
    assert np.array_equal(plain[60:], named[60:])  # the mask is drawn the same
    assert np.count_nonzero(plain[:60] != named[:60]) > 100  # a longer label above it: "1 person"


def test_with_the_model_in_its_own_process_the_generator_runs_there(auto_settings: Settings, redis_client: redis.Redis,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The default on CUDA: the proposer is asked through the model process's open session, between frames.
    The model process runs up to 16 frames ahead of what is published, so the square stays longer here."""
    from tests.fakes import FROM_ENV
    from worker.model.process import ModelProcess

    n = 120
    video = make_video(tmp_path / "long.mp4", num_frames=n, size_wh=SIZE, fps=10, draw=draw_entering_square(n, SIZE))
    monkeypatch.setenv("VSEG_FAKE_DELAY_S", "0.01")  # read by tests.fakes.from_env in the model process
    settings = dataclasses.replace(auto_settings, model_process="on", segmenter=FROM_ENV, device="cpu")
    model = ModelProcess(settings)
    try:
        submit(video, [disc_prompt(1, 0, n, SIZE)], settings=settings, job_id="in-child", auto=auto())
        Worker(settings=settings, segmenter=model, client=redis_client, name="child").run(burst=True)
    finally:
        model.close()
    msgs = results(redis_client, settings, "in-child")
    assert isinstance(msgs[-1], messages.Completed), msgs[-1]
    assert [(c.obj_id, c.change) for c in changes(msgs)] == [(2, "added"), (2, "lost")]
    first, end = entering_square(n, SIZE)
    added, lost = changes(msgs)
    assert first <= added.frame_idx <= first + EVERY + 16 + auto_settings.auto_confirm_frames
    assert end <= lost.frame_idx <= end + auto_settings.auto_lost_frames + 1


def test_an_automatic_object_can_be_removed_by_its_id(video: Path, auto_settings: Settings,
                                                      redis_client: redis.Redis) -> None:
    """The viewer's remove button on an automatic object: the client does not know the id (the worker made
    it), so the worker decides; an id it never had is refused by it, the job unharmed."""
    from producer.running_prompts import remove_object

    submit(video, [], settings=auto_settings, job_id="rm", auto=auto())
    worker = Worker(settings=auto_settings, segmenter=ChaosHooks(ColourSegmenter(), delay_s=0.15),
                    client=redis_client, name="auto")
    thread = threading.Thread(target=worker.run, kwargs={"burst": True}, daemon=True)
    thread.start()
    wait = 30.0
    while not any(c.change == "added" for c in changes(results(redis_client, auto_settings, "rm"))) and wait > 0:
        thread.join(0.1)
        wait -= 0.1
    reply = remove_object("rm", 1, settings=auto_settings, client=redis_client)
    assert [c.change for c in reply.changes] == ["removed"], reply
    refused = remove_object("rm", 77, settings=auto_settings, client=redis_client)
    assert [c.change for c in refused.changes] == ["refused"], refused
    thread.join(60)
    msgs = results(redis_client, auto_settings, "rm")
    assert isinstance(msgs[-1], messages.Completed)
    removed_at = next(c.frame_idx for c in changes(msgs) if c.change == "removed")
    assert all(1 not in objs for k, objs in objects_by_frame(msgs).items() if k >= removed_at)


def test_an_automatic_object_that_leaves_and_comes_back_gets_its_id_back(
        tmp_path: Path, auto_settings: Settings, redis_client: redis.Redis) -> None:
    """Identities that survive (issue 30): the square leaves for 8 frames and comes back; the keyframe that
    finds it again gives it its old id (`returned`); with re-identification off it is a new object."""
    side = max(6, min(SIZE) // 5)

    def draw(k: int, img: np.ndarray) -> None:
        if 8 <= k < 18 or 26 <= k < 36:
            cv2.rectangle(img, (2, 2), (2 + side, 2 + side), ENTERING_BGR, -1)

    video = make_video(tmp_path / "back.mp4", num_frames=N, size_wh=SIZE, fps=10, draw=draw)
    for job, window in (("back", 10.0), ("back-off", 0.0)):
        settings = dataclasses.replace(auto_settings, reid_window_s=window)
        submit(video, [disc_prompt(1, 0, N, SIZE)], settings=settings, job_id=job, auto=auto())
        run(settings, redis_client)
    msgs = results(redis_client, auto_settings, "back")
    assert isinstance(msgs[-1], messages.Completed), msgs[-1]
    assert [(c.obj_id, c.change) for c in changes(msgs)] == [(2, "added"), (2, "lost"), (2, "returned"),
                                                              (2, "lost")]
    returned = changes(msgs)[2]
    assert 26 <= returned.frame_idx <= 26 + EVERY + auto_settings.auto_confirm_frames and returned.source == "auto"
    assert "reid_window_s" in returned.note
    off = results(redis_client, auto_settings, "back-off")
    assert [(c.obj_id, c.change) for c in changes(off)] == [(2, "added"), (2, "lost"), (3, "added"), (3, "lost")]
