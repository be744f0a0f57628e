"""Text prompts served (issue 30): `--model`, the text lane, SAM 3 behind the Segmenter and Session seams,
identities that survive, and the whole path through Redis with a SAM 3 worker on the tiny random model.

The session must be a faithful driver too: over a job's JPEG frames it gives the library's own masks, scores and
instances (`propagate_in_video_iterator` on the same frames and weights), bit for bit, the ids renumbered to the
job's (from 1, in the order instances first show)."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis
import torch

from producer.cameras import load_cameras
from producer.capabilities import NoCapableWorker, live_models
from producer.client import Client
from producer.live_submit import submit_live
from producer.running_prompts import JobEndedError
from producer.submission import check_text
from runtime.settings import Settings
from schemas import messages
from schemas.errors import ConfigError, PromptError
from schemas.names import Keys
from schemas.prompts import ObjectPrompt
from tests.videos import draw_disc_frame, make_video
from tests.workers import running_worker, wait_for
from worker.model.models import choose_model
from worker.model.sam3.build import Sam3, load_tiny
from worker.model.sam3.identities import Identities
from worker.model.sam3.segmenter import Sam3Segmenter
from worker.model.sam3.tracker import TextFrame
from worker.model.session import MaskPrompt
from worker.sources.frames import DirFrames

PHRASES = ["player", "ball"]
W, H = 128, 96


@pytest.fixture(scope="module")
def sam3() -> Sam3:
    torch.set_num_threads(2)
    return load_tiny(seed=0, max_num_objects=4)


# ---- names, lanes, checks ---------------------------------------------------------------------------------
def test_model_names_choose_a_family_a_preset_and_a_lane() -> None:
    assert choose_model("sam2.1-tiny") == choose_model("tiny")
    assert choose_model("sam2.1-base-plus").preset == "base_plus" == choose_model("base_plus").preset
    assert choose_model("sam2.1-large").lane == ""
    sam3 = choose_model("sam3")
    assert (sam3.family, sam3.capability, sam3.lane) == ("sam3", "text", "text")
    with pytest.raises(ConfigError, match="unknown model 'huge': give --model"):
        choose_model("huge")


def test_each_lane_has_its_jobs_stream_and_shares_every_other_key() -> None:
    keys = Keys()
    text = keys.for_lane("text")
    assert (keys.jobs, text.jobs) == ("vseg:jobs", "vseg:jobs:text")
    assert (text.group, text.events, text.job("j")) == (keys.group, keys.events, keys.job("j"))
    assert [k.jobs for k in keys.all_lanes()] == ["vseg:jobs", "vseg:jobs:text"]
    with pytest.raises(ValueError, match="unknown jobs lane"):
        keys.for_lane("colour")


def test_text_takes_points_beside_it_but_not_auto_or_empty_phrases() -> None:
    check_text(["player"], [], None)
    check_text(["player"], [ObjectPrompt(obj_id=1, frame_idx=0, points_xy=((1.0, 1.0),), labels=(1,))], None)
    with pytest.raises(PromptError, match="give one of them"):
        check_text(["player"], [], messages.AutoOptions())
    with pytest.raises(PromptError, match="empty phrase"):
        check_text(["player", " "], [], None)


def test_a_camera_takes_text_instead_of_prompts(tmp_path: Path) -> None:
    path = tmp_path / "cameras.yaml"
    path.write_text("cameras:\n  - name: pitch\n    url: rtsp://10.0.0.9/s\n    text: [player, ball]\n")
    camera = load_cameras(path, Settings.load(environ={}), {})["pitch"]
    assert camera.text == ("player", "ball") and camera.prompts == ()
    path.write_text('cameras:\n  - name: pitch\n    url: rtsp://10.0.0.9/s\n    text: [player]\n'
                    '    prompts: ["--point 1:5,5"]\n')
    with pytest.raises(ConfigError, match="text.*give text, or prompts and auto, not both"):
        load_cameras(path, Settings.load(environ={}), {})


def test_a_live_text_jobs_later_attempt_numbers_its_objects_in_a_block_of_its_own() -> None:
    from worker.service.resume import LIVE_ID_BLOCK, text_ids_above

    @dataclasses.dataclass
    class Job:
        obj_ids: tuple[int, ...]
        live: bool

    assert text_ids_above(Job((), False), 3) == 0  # a file job runs again from frame 0: the same ids
    assert text_ids_above(Job((), True), 1) == 0
    assert text_ids_above(Job((), True), 3) == 2 * LIVE_ID_BLOCK


# ---- identities ---------------------------------------------------------------------------------------------
def frame(k: int, ids: list[int], boxes: list[tuple[int, int, int, int]], labels: dict[int, str]) -> TextFrame:
    masks = np.zeros((len(ids), 40, 40), bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    return TextFrame(k, tuple(ids), masks, np.full(len(ids), 0.9, np.float32), labels)


def image(colours: list[tuple[tuple[int, int, int, int], tuple[int, int, int]]]) -> np.ndarray:
    rgb = np.full((40, 40, 3), 20, np.uint8)
    for (x0, y0, x1, y1), colour in colours:
        rgb[y0:y1, x0:x1] = colour
    return rgb


def test_instances_become_job_objects_and_a_lost_one_comes_back_with_its_id() -> None:
    ids = Identities(window_s=5.0, threshold=0.9, first_id=3)
    red, blue = (0, 0, 10, 10), (20, 20, 30, 30)
    look = image([(red, (230, 30, 30)), (blue, (30, 30, 230))])
    got = ids.see(frame(0, [0, 1], [red, blue], {0: "player", 1: "ball"}), look, 0.0)
    assert got.obj_ids == (3, 4) and got.changes == ((3, "added", "player"), (4, "added", "ball"))
    assert got.labels == {3: ("player", pytest.approx(0.9)), 4: ("ball", pytest.approx(0.9))}
    got = ids.see(frame(1, [1], [blue], {1: "ball"}), look, 1.0)  # the player left
    assert got.obj_ids == (4,) and got.changes == ((3, "lost", "player"),)
    # the library found it again as a new instance: it looks the same, so it is object 3 again
    got = ids.see(frame(2, [1, 7], [blue, red], {1: "ball", 7: "player"}), look, 2.0)
    assert got.obj_ids == (3, 4) and got.changes == ((3, "returned", "player"),)
    assert got.keep == (1, 0)  # object 3 is the frame's second instance
    # a player that looks different is a new object; a returned id is given back once only
    green = image([((0, 0, 10, 10), (30, 230, 30)), (blue, (30, 30, 230))])
    ids.see(frame(3, [1], [blue], {1: "ball"}), look, 3.0)  # 3 lost again
    got = ids.see(frame(4, [1, 8], [blue, red], {1: "ball", 8: "player"}), green, 4.0)
    assert got.changes == ((5, "added", "player"),)
    ids.hide(4)
    assert ids.see(frame(5, [1, 8], [blue, red], {1: "ball", 8: "player"}), green, 5.0).obj_ids == (5,)


def test_a_lost_object_past_the_window_or_of_another_label_is_not_matched() -> None:
    ids = Identities(window_s=1.0, threshold=0.9)
    red = (0, 0, 10, 10)
    look = image([(red, (230, 30, 30))])
    ids.see(frame(0, [0], [red], {0: "player"}), look, 0.0)
    ids.see(frame(1, [], [], {}), look, 0.5)
    assert ids.see(frame(2, [1], [red], {1: "ball"}), look, 0.6).changes == ((2, "added", "ball"),)
    ids.see(frame(3, [], [], {}), look, 0.7)  # object 2 lost
    assert ids.see(frame(4, [2], [red], {2: "player"}), look, 5.0).changes == ((3, "added", "player"),)
    off = Identities(window_s=0.0, threshold=0.9)  # no re-identification: every instance is new
    off.see(frame(0, [0], [red], {0: "player"}), look, 0.0)
    off.see(frame(1, [], [], {}), look, 0.1)
    assert off.see(frame(2, [1], [red], {1: "player"}), look, 0.2).changes == ((2, "added", "player"),)


# ---- the session behind the seam -----------------------------------------------------------------------
def jpeg_clip(folder: Path, n: int) -> np.ndarray:
    """The tests' moving disc (tests/videos.py), written as the job's JPEGs; returns the frames as decoded (RGB).
    On it the tiny random model keeps two instances from the first frame on (on other clips its hot start may
    remove every instance it finds)."""
    folder.mkdir(parents=True, exist_ok=True)
    decoded = []
    for t in range(n):
        cv2.imwrite(str(folder / f"{t:05d}.jpg"), draw_disc_frame(t, n, (W, H)), [cv2.IMWRITE_JPEG_QUALITY, 95])
        decoded.append(cv2.cvtColor(cv2.imread(str(folder / f"{t:05d}.jpg")), cv2.COLOR_BGR2RGB))
    return np.stack(decoded)


def test_the_session_gives_the_librarys_masks_in_the_jobs_ids(sam3: Sam3, tmp_path: Path) -> None:
    video = jpeg_clip(tmp_path / "frames", 20)
    session = sam3.processor.init_video_session(video=video, inference_device="cpu")
    sam3.processor.add_text_prompt(session, PHRASES)
    library = {out.frame_idx: sam3.processor.postprocess_outputs(session, out)
               for out in sam3.model.propagate_in_video_iterator(inference_session=session)}

    model = Sam3Segmenter(sam3, reid_window_s=0.0)
    with model.open_session(DirFrames(tmp_path / "frames", 20), [], width=W, height=H) as ours:
        ours.add_text(PHRASES)
        out = list(ours)
    assert [o.frame_idx for o in out] == list(range(20))
    job_of: dict[int, int] = {}
    for o in out:
        ref = library[o.frame_idx]
        shown = [(i, m, s) for i, m, s in zip(ref["object_ids"].tolist(), ref["masks"].numpy(),
                                              ref["scores"].numpy(), strict=True) if m.any()]
        for lib_id, _, _ in shown:
            job_of.setdefault(lib_id, len(job_of) + 1)
        assert o.obj_ids == tuple(sorted(job_of[i] for i, _, _ in shown)), o.frame_idx
        by_job = {job_of[i]: (m, s) for i, m, s in shown}
        for k, obj_id in enumerate(o.obj_ids):
            assert np.array_equal(o.masks[k], by_job[obj_id][0]) and o.scores[k] == by_job[obj_id][1]
        phrase_of = {i: p for p, ids in ref["prompt_to_obj_ids"].items() for i in ids}
        assert o.labels == {job_of[i]: (phrase_of[i], pytest.approx(float(s))) for i, _, s in shown}
    assert sum(len(o.obj_ids) for o in out) > 0, "the clip must show objects, or the comparison proves nothing"
    first_seen: dict[int, int] = {}
    for o in out:
        for obj_id in o.obj_ids:
            first_seen.setdefault(obj_id, o.frame_idx)
    added = {c[0]: o.frame_idx for o in out for c in o.changes if c[1] == "added"}
    assert added == first_seen, "each object is `added` on the frame it first shows on"


def test_the_session_needs_text_and_takes_no_masks(sam3: Sam3, tmp_path: Path) -> None:
    jpeg_clip(tmp_path / "f", 3)
    model = Sam3Segmenter(sam3)
    with pytest.raises(PromptError, match="no mask prompts"):
        model.open_session(DirFrames(tmp_path / "f", 3), [MaskPrompt(1, 0, np.ones((H, W), bool))], width=W, height=H)
    with model.open_session(DirFrames(tmp_path / "f", 3), [], width=W, height=H) as session:
        with pytest.raises(PromptError, match="needs text"):
            next(session)
    with model.open_session(DirFrames(tmp_path / "f", 3), [], width=W, height=H) as session:
        with pytest.raises(PromptError, match="non-empty"):
            session.add_text(["", "ball"])
        with pytest.raises(PromptError, match="no object 9 to remove"):
            session.remove_object(9)
        with pytest.raises(PromptError, match="the video has 3 frames"):
            session.add_prompts([point(5, 3)])


def point(obj_id: int, frame_idx: int, xy: tuple[float, float] = (30.0, 40.0)) -> ObjectPrompt:
    return ObjectPrompt(obj_id=obj_id, frame_idx=frame_idx, points_xy=(xy,), labels=(1,))


def test_points_and_boxes_mix_with_text_on_sam3s_own_tracker(sam3: Sam3, tmp_path: Path) -> None:
    """A point object from frame 0 and a box object from frame 5 beside the text's instances: their ids kept, the
    text's above them, each present from its prompt's frame on; a point on a text object's id is refused, a
    correction of a point object and its removal are taken."""
    jpeg_clip(tmp_path / "f", 24)
    box = ObjectPrompt(obj_id=7, frame_idx=5, box_xyxy=(10.0, 10.0, 60.0, 50.0))
    with Sam3Segmenter(sam3).open_session(DirFrames(tmp_path / "f", 24), [point(3, 0), box], width=W,
                                          height=H) as session:
        session.add_text(PHRASES)
        out = [next(session)]
        text_ids = sorted({o for f in out for o in f.obj_ids} - {3, 7})
        with pytest.raises(PromptError, match="found by the text"):
            session.add_prompts([point(text_ids[0], session.position)])
        session.add_prompts([point(3, session.position, (60.0, 50.0))])  # a correction, from the next frame
        at = session.position
        session.remove_object(7)
        out += list(session)
    assert [f.frame_idx for f in out] == list(range(24))
    assert all(3 in f.obj_ids for f in out), "the point object from its frame on"
    assert [7 in f.obj_ids for f in out[:at]] == [k >= 5 for k in range(at)], "the box object from frame 5 on"
    assert all(7 not in f.obj_ids for f in out[at:]), "removed"
    assert text_ids and min(text_ids) > 7, "the text's ids above the prompted ones"
    for f in out:
        k = f.obj_ids.index(3)
        assert f.masks[k].shape == (H, W) and f.masks[k].any() and 0 <= f.scores[k] <= 1
        assert 3 not in (f.labels or {}), "a point object has no phrase"


def test_a_removed_text_object_stays_gone(sam3: Sam3, tmp_path: Path) -> None:
    jpeg_clip(tmp_path / "f", 24)
    with Sam3Segmenter(sam3).open_session(DirFrames(tmp_path / "f", 24), [], width=W, height=H) as session:
        session.add_text(["player"])
        first = next(o for o in session if o.obj_ids)
        gone, position = first.obj_ids[0], session.position
        session.remove_object(gone)
        assert gone not in session.obj_ids
        after = [o for o in session if o.frame_idx >= position]  # frames computed after the removal
    assert after and all(gone not in o.obj_ids for o in after)
    assert all(gone != c[0] for o in after for c in o.changes), "a removed object is neither lost nor returned"


# ---- through Redis ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("tv") / "t.mp4", num_frames=24, size_wh=(W, H), fps=10)


@pytest.mark.integration
def test_a_text_job_is_refused_at_submit_while_no_worker_takes_text(settings: Settings, redis_client: redis.Redis,
                                                                     text_video: Path) -> None:
    with Client(settings) as client:
        with pytest.raises(NoCapableWorker, match=r"no live worker takes text prompts \(--text\).*"
                                                  r"python -m worker --model sam3"):
            client.submit(text_video, text="player, ball", job_id="t-refused")
    assert not redis_client.exists(settings.keys.job("t-refused"), settings.keys.for_lane("text").jobs)
    assert not (settings.storage_root / "jobs" / "t-refused").exists()


@pytest.mark.integration
def test_a_text_job_runs_on_a_sam3_worker_with_labelled_objects_and_a_point_object(settings: Settings, redis_client: redis.Redis,
                                                                 text_video: Path, sam3: Sam3) -> None:
    with running_worker(settings, redis_client, Sam3Segmenter(sam3), name="sam3-w"):
        wait_for(lambda: ("sam3-tiny-random", "text") in live_models(redis_client, settings.keys), 20,
                 "the SAM 3 worker's health key")
        health = json.loads(redis_client.get(settings.keys.worker_health("sam3-w")) or b"{}")
        assert health["capabilities"] == ["text"] and health["model"] == "sam3-tiny-random"
        with Client(settings) as client:
            job = client.submit(text_video, text="player, ball", points=["1:30,40"], job_id="t-file")
            assert redis_client.hget(settings.keys.job("t-file"), "lane") == b"text"
            ended = job.wait(timeout_s=120)
            assert isinstance(ended, messages.Completed), ended
            with pytest.raises(JobEndedError):
                job.prompt(text="referee")
    entries = [messages.decode(f) for _, f in redis_client.xrange(settings.keys.results("t-file"))]
    changes = [e for e in entries if isinstance(e, messages.ObjectChange)]
    frames = [e for e in entries if isinstance(e, messages.FrameResult)]
    assert len(frames) == 24
    added = {c.obj_id: c.label for c in changes if c.change == "added"}
    assert added and all(c.source == "text" for c in changes) and set(added.values()) <= set(PHRASES)
    assert min(added) == 2, "the text's ids start above the prompted object's"
    assert all(any(o.obj_id == 1 and o.area for o in f.objects) for f in frames), "the point object on every frame"
    shown = {(o.obj_id, o.label) for f in frames for o in f.objects if o.obj_id != 1}
    assert shown and all(label == added[obj_id] for obj_id, label in shown), "each object labelled with its phrase"
    assert all(0 <= o.score <= 1 for f in frames for o in f.objects)


@pytest.mark.integration
def test_a_live_text_job_takes_a_phrase_while_it_runs(settings: Settings, redis_client: redis.Redis,
                                                       tmp_path: Path, sam3: Sam3) -> None:
    video = make_video(tmp_path / "live.mp4", num_frames=150, size_wh=(W, H), fps=25)
    settings = dataclasses.replace(settings, live_preview_height=0)
    with running_worker(settings, redis_client, Sam3Segmenter(sam3), name="sam3-live"):
        wait_for(lambda: live_models(redis_client, settings.keys), 20, "the worker's health key")
        ingest = threading.Thread(target=submit_live, args=(video, []), daemon=True, kwargs=dict(
            settings=settings, job_id="t-live", realtime=True, text=("player",)))
        ingest.start()
        wait_for(lambda: redis_client.hget(settings.keys.job("t-live"), "state") == b"running", 30, "the job runs")
        with Client(settings) as client:
            points_job = client.submit(video, points=["1:5,5"], job_id="t-points")  # a job of the other lane
            with pytest.raises(PromptError, match="without --text"):
                points_job.prompt(text="ball")
            points_job.cancel()
            reply = client.job("t-live").prompt(text="ball", wait_s=30)
        ingest.join(60)
    assert [(c.obj_id, c.change, c.label) for c in reply.changes] == [(messages.TEXT_OBJ_ID, "text", "ball")]
    assert "text 'ball' looked for from frame" in reply.describe()
    entries = [messages.decode(f) for _, f in redis_client.xrange(settings.keys.results("t-live"))]
    assert isinstance(entries[-1], messages.Completed)
    labels = {c.label for c in entries if isinstance(c, messages.ObjectChange) and c.change == "added"}
    # Whether the random model finds a `ball` that is not one of the `player` tracks depends on the frame the
    # phrase lands on (its masks cover the frame: a new detection matches an old track); that a phrase added
    # mid-run brings new labelled ids is checked frame by frame in tests/test_sam3_text.py.
    assert "player" in labels and labels <= {"player", "ball"}
