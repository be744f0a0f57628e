"""Integration tier: producer -> real redis-server -> worker (fake colour segmenter) -> results.

The fake segmenter is deterministic and finds the green disc by colour, so these tests prove that
masks land on the right pixels in masks.json and in the rendered MP4, without the cost of SAM 2.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import av
import msgpack
import numpy as np
import pytest
import redis

from producer.results import UnknownJobError, follow
from producer.submission import submit
from producer.watching import watch
from runtime.settings import Settings
from schemas import messages
from schemas.errors import JobFailed, PromptError, VideoError
from schemas.names import TERMINAL_ENTRY_ID
from schemas.prompts import ObjectPrompt
from schemas.rle import decode_mask, mask_bbox_xyxy
from schemas.storage import frame_name
from tests.fakes import ColourSegmenter
from tests.render_checks import near_box, tinted_mask
from tests.videos import disc_center, disc_mask, make_video
from worker.output.draw import colour_for
from worker.output.render_policy import render_preset, render_threads
from worker.service.loop import Worker

pytestmark = pytest.mark.integration

N_FRAMES = 16
SIZE_WH = (160, 120)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.fixture
def video(tmp_path: Path) -> Path:
    return make_video(tmp_path / "disc.mp4", num_frames=N_FRAMES, size_wh=SIZE_WH, fps=10)


def disc_prompt(frame_idx: int = 0, obj_id: int = 1) -> ObjectPrompt:
    x, y = disc_center(frame_idx, N_FRAMES, SIZE_WH)
    return ObjectPrompt(obj_id=obj_id, frame_idx=frame_idx, points_xy=((x, y),), labels=(1,))


def run_worker(settings: Settings, client: redis.Redis, **kwargs: object) -> Worker:
    worker = Worker(settings=settings, segmenter=ColourSegmenter(**kwargs), client=client, name="test-worker")  # type: ignore[arg-type]
    worker.run(burst=True)
    return worker


def test_masks_land_on_the_right_pixels(video: Path, settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    settings = dataclasses.replace(settings, keep_frames="on")  # the frames are compared with the render below
    job = submit(video, [disc_prompt(0)], settings=settings, client=redis_client, job_id="disc")
    assert job.created and job.video is not None and job.video.num_frames == N_FRAMES
    run_worker(settings, redis_client)
    result = watch("disc", tmp_path / "out", settings=settings, client=redis_client, progress=False, timeout_s=10)

    doc = json.loads(result.masks_json.read_text())
    assert [f["frame_idx"] for f in doc["frames"]] == list(range(N_FRAMES))
    frames_dir = settings.storage_root / "jobs/disc/frames"
    with av.open(str(result.render_path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        rendered = [f.to_ndarray(format="bgr24") for f in container.decode(stream)]
    assert len(rendered) == N_FRAMES
    import cv2

    for frame in doc["frames"]:
        k = frame["frame_idx"]
        truth = disc_mask(k, N_FRAMES, SIZE_WH)
        (obj,) = frame["objects"]
        mask = decode_mask(obj["mask"])
        assert mask.shape == (SIZE_WH[1], SIZE_WH[0])
        assert iou(mask, truth) >= 0.95, f"frame {k}: masks.json IoU {iou(mask, truth):.3f}"
        assert obj["bbox_xyxy"] == mask_bbox_xyxy(mask) and obj["area"] == int(mask.sum())
        original = cv2.imread(str(frames_dir / frame_name(k)))
        h, w = original.shape[:2]
        tinted = tinted_mask(rendered[k][:h, :w], original, colour_for(1)) & near_box(truth)
        assert iou(tinted, truth) >= 0.95, f"frame {k}: MP4 pixel IoU {iou(tinted, truth):.3f}"


def test_result_stream_layout(video: Path, settings: Settings, redis_client: redis.Redis) -> None:
    submit(video, [disc_prompt(0), disc_prompt(4, obj_id=7)], settings=settings, client=redis_client, job_id="lay")
    run_worker(settings, redis_client)
    entries = redis_client.xrange(settings.keys.results("lay"))
    ids = [e[0].decode() for e in entries]
    assert ids == ["0-1"] + [f"{k + 1}-0" for k in range(N_FRAMES)] + [TERMINAL_ENTRY_ID]
    decoded = [messages.decode(f) for _, f in entries]
    assert isinstance(decoded[0], messages.Started) and decoded[0].obj_ids == (1, 7)
    assert isinstance(decoded[-1], messages.Completed) and decoded[-1].num_objects == 2
    for k, msg in enumerate(decoded[1:-1]):
        assert isinstance(msg, messages.FrameResult) and msg.frame_idx == k
        assert [o.obj_id for o in msg.objects] == [1, 7]
    types = [f[b"type"] for _, f in redis_client.xrange(settings.keys.events)]
    assert types[0] == b"started" and types[-1] == b"completed" and b"progress" in types
    state = redis_client.hgetall(settings.keys.job("lay"))
    assert state[b"state"] == b"completed" and state[b"frames_done"] == str(N_FRAMES).encode()
    assert redis_client.xlen(settings.keys.jobs) == 0  # the jobs stream holds only jobs in flight
    assert 0 < redis_client.ttl(settings.keys.results("lay")) <= settings.results_ttl_s


def test_same_job_id_twice_is_one_job(video: Path, settings: Settings, redis_client: redis.Redis) -> None:
    first = submit(video, [disc_prompt()], settings=settings, client=redis_client, job_id="twice")
    second = submit(video, [disc_prompt()], settings=settings, client=redis_client, job_id="twice")
    assert first.created and not second.created
    assert redis_client.xlen(settings.keys.jobs) == 1
    assert run_worker(settings, redis_client).jobs_done == 1


@pytest.mark.parametrize(
    "prompt, match",
    [
        (ObjectPrompt(1, N_FRAMES, ((5.0, 5.0),), (1,)), "decoded video has 16 frames"),
        (ObjectPrompt(1, 0, ((500.0, 5.0),), (1,)), "outside the 160x120 frame"),
    ],
)
def test_bad_prompts_enqueue_nothing(video: Path, settings: Settings, redis_client: redis.Redis,
                                     prompt: ObjectPrompt, match: str) -> None:
    with pytest.raises(PromptError, match=match):
        submit(video, [prompt], settings=settings, client=redis_client, job_id="bad")
    assert redis_client.xlen(settings.keys.jobs) == 0 and not redis_client.exists(settings.keys.job("bad"))
    assert not (settings.storage_root / "jobs/bad/frames").exists()


def test_bad_video_enqueues_nothing(tmp_path: Path, settings: Settings, redis_client: redis.Redis) -> None:
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video")
    with pytest.raises(VideoError):
        submit(fake, [disc_prompt()], settings=settings, client=redis_client, job_id="nv")
    with pytest.raises(VideoError):
        submit(tmp_path / "missing.mp4", [disc_prompt()], settings=settings, client=redis_client)
    assert redis_client.xlen(settings.keys.jobs) == 0


def test_poison_messages_go_to_dead_letters_and_the_worker_keeps_going(
    video: Path, settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    keys = settings.keys
    future = messages.to_dict(messages.JobMessage("future", "jobs/future/frames", 3, 10, 10, 1.0,
                                                  (disc_prompt(),)))
    future["v"] = 99
    redis_client.xadd(keys.jobs, {"type": "job", "data": msgpack.packb(future)})
    redis_client.xadd(keys.jobs, {"type": "job", "data": b"\xc1garbage"})
    redis_client.xadd(keys.jobs, {"nothing": "useful"})
    submit(video, [disc_prompt()], settings=settings, client=redis_client, job_id="good")
    worker = run_worker(settings, redis_client)

    dead = redis_client.xrange(keys.dead)
    assert len(dead) == 3
    reasons = [f[b"error"].decode() for _, f in dead]
    assert "schema version 99" in reasons[0] and "msgpack" in reasons[1] and "'type'" in reasons[2]
    assert dead[0][1][b"data"] == msgpack.packb(future)  # the original message is kept
    with pytest.raises(JobFailed, match="schema version 99"):  # a watcher of the poisoned job is not left hanging
        watch("future", tmp_path / "f", settings=settings, client=redis_client, progress=False, timeout_s=5)
    assert worker.stats.outcomes == {"dead": 1, "completed": 1}
    assert watch("good", tmp_path / "g", settings=settings, client=redis_client, progress=False).num_frames == N_FRAMES
    assert redis_client.xlen(keys.jobs) == 0
    assert redis_client.xpending(keys.jobs, keys.group)["pending"] == 0


def test_missing_or_incomplete_frames_fail_the_job_not_the_worker(
    video: Path, settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    submit(video, [disc_prompt()], settings=settings, client=redis_client, job_id="gone")
    submit(video, [disc_prompt()], settings=settings, client=redis_client, job_id="holes")
    submit(video, [disc_prompt()], settings=settings, client=redis_client, job_id="fine")
    import shutil

    shutil.rmtree(settings.storage_root / "jobs/gone/frames")
    (settings.storage_root / "jobs/holes/frames" / frame_name(3)).unlink()
    run_worker(settings, redis_client)
    with pytest.raises(JobFailed, match="does not exist"):
        watch("gone", tmp_path / "a", settings=settings, client=redis_client, progress=False, timeout_s=5)
    with pytest.raises(JobFailed, match="missing 00003.jpg"):
        watch("holes", tmp_path / "b", settings=settings, client=redis_client, progress=False, timeout_s=5)
    assert watch("fine", tmp_path / "c", settings=settings, client=redis_client, progress=False).num_frames == N_FRAMES
    assert redis_client.hget(settings.keys.job("holes"), "state") == b"failed"


def test_model_failure_mid_job_fails_cleanly(video: Path, settings: Settings, redis_client: redis.Redis,
                                            tmp_path: Path) -> None:
    submit(video, [disc_prompt()], settings=settings, client=redis_client, job_id="boom")
    run_worker(settings, redis_client, fail_at_frame=5)
    msgs = list(follow("boom", settings=settings, client=redis_client, timeout_s=5))
    assert [m.frame_idx for m in msgs if isinstance(m, messages.FrameResult)] == list(range(5))
    assert isinstance(msgs[-1], messages.Failed) and "fake failure at frame 5" in msgs[-1].error
    render = settings.storage_root / "jobs/boom/render.mp4"
    assert not render.exists() and not list(render.parent.glob("*.partial*"))  # no half-written MP4


def test_follow_unknown_job(settings: Settings, redis_client: redis.Redis) -> None:
    with pytest.raises(UnknownJobError, match="no job 'nope'"):
        next(follow("nope", settings=settings, client=redis_client))


def test_renderer_leaves_the_cores_to_a_cpu_model(settings: Settings) -> None:
    """x264 would start a thread per core and more, preempting the model's OpenMP threads: on the CPU
    the worker gives it one and the fastest preset, unless the settings say otherwise; on CUDA it is
    x264's choice of threads and `superfast`."""
    assert (render_threads(settings, "cpu"), render_preset(settings, "cpu")) == (1, "ultrafast")
    assert (render_threads(settings, "cuda:0"), render_preset(settings, "cuda:0")) == (0, "superfast")
    three = dataclasses.replace(settings, render_threads=3, render_preset="veryfast")
    assert (render_threads(three, "cpu"), render_preset(three, "cpu")) == (3, "veryfast")


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_masks_only_job_draws_no_mp4(video: Path, settings: Settings, redis_client: redis.Redis, tmp_path: Path,
                                     stream: bool) -> None:
    submit(video, [disc_prompt(0)], settings=settings, client=redis_client, job_id="norender", stream=stream,
           render=False)
    run_worker(settings, redis_client)
    result = watch("norender", tmp_path / "out", settings=settings, client=redis_client, progress=False, timeout_s=10)
    doc = json.loads(result.masks_json.read_text())
    assert [f["frame_idx"] for f in doc["frames"]] == list(range(N_FRAMES))
    assert all(f["objects"][0]["area"] > 0 for f in doc["frames"])
    assert result.render_path is None and doc["render_path"] == ""
    assert not list(settings.storage_root.glob("jobs/norender/*.mp4"))
    assert not list(settings.storage_root.rglob("*.partial"))
    assert redis_client.hget(settings.keys.job("norender"), "state") == b"completed"


def test_worker_peak_rss_is_its_own_not_its_forking_parents() -> None:
    """The worker logs its own peak memory even when started by a big process (a benchmark holding a
    model): Linux's ru_maxrss would carry the parent's over the exec."""
    import subprocess
    import sys

    big = np.ones(400 * 2**20, dtype=np.uint8)  # 400 MiB resident in this process
    out = subprocess.run([sys.executable, "-c", "from worker.service.health import peak_rss_mib; print(peak_rss_mib())"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    assert float(out.stdout) < 300, out.stdout
    del big
