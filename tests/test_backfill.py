"""Prompts on frames a file job has already published (Session.backfill, worker/model/session.py): the object's masks
on the earlier frames are propagated backwards from the prompt's frame and published as `update`
entries; the object goes on in the job's session from the next frame; the other objects' masks stay
exactly those of the same job without the prompt; `watch` merges the updates into masks.json; with
SAM 2 the updates are the predictor's own masks for that prompt over those frames."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from producer.decode import extract_frames
from producer.submission import submit
from producer.watching import watch
from runtime.settings import Settings
from schemas import messages
from schemas.prompts import ObjectPrompt
from schemas.rle import decode_mask
from tests.fakes import FROM_ENV, ChaosHooks, ColourSegmenter
from tests.test_sam2_memory import bare_predictor_masks
from tests.videos import disc_center, disc_prompt, make_video
from tests.workers import wait_for
from worker.model.process import ModelProcess
from worker.model.sam2.checkpoints import build_predictor, get_preset
from worker.model.sam2.segmenter import Sam2Segmenter
from worker.model.segment import Segmenter
from worker.service.loop import Worker
from worker.sources.frames import DirFrames

N = 30
SIZE = (96, 64)


def start(settings: Settings, client: redis.Redis, model: Segmenter | None = None) -> threading.Thread:
    worker = Worker(settings=settings, segmenter=model or ChaosHooks(ColourSegmenter(), delay_s=0.05), client=client,
                    name="backfill")
    thread = threading.Thread(target=worker.run, kwargs={"burst": True}, daemon=True)
    thread.start()
    return thread


def entries(client: redis.Redis, settings: Settings, job: str) -> list[messages.Message]:
    return [messages.decode(f) for _, f in client.xrange(settings.keys.results(job))]


def masks_of(msgs: list[messages.Message], obj_id: int, kind: type = messages.FrameResult) -> dict[int, np.ndarray]:
    return {m.frame_idx: decode_mask(o.mask) for m in msgs if isinstance(m, kind)
            for o in m.objects if o.obj_id == obj_id}


@pytest.mark.integration
@pytest.mark.parametrize("obj_id, host", [(5, "in-process"), (1, "in-process"), (5, "model-process")],
                         ids=["new-object", "correction", "new-object-model-process"])
def test_a_prompt_on_a_published_frame_updates_the_earlier_frames(video: Path, settings: Settings,
                                                                  redis_client: redis.Redis, tmp_path: Path,
                                                                  obj_id: int, host: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With the model in its own process the child runs the backfill at its own position, ahead of what the
    worker has published: the updates still cover every frame before the object's start, and come after them."""
    submit(video, [disc_prompt(1, 0, N, SIZE)], settings=settings, job_id="plain")
    start(settings, redis_client).join(60)
    submit(video, [disc_prompt(1, 0, N, SIZE)], settings=settings, job_id="late")
    model: Segmenter | None = None
    if host == "model-process":
        monkeypatch.setenv("VSEG_FAKE_DELAY_S", "0.05")
        model = ModelProcess(dataclasses.replace(settings, model_process="on", segmenter=FROM_ENV, device="cpu"))
    thread = start(settings, redis_client, model)
    wait_for(lambda: int(redis_client.hget(settings.keys.job("late"), "frames_done") or 0) >= 12, 30, "under way")
    command = messages.PromptCommand("late", uuid.uuid4().hex, (disc_prompt(obj_id, 3, N, SIZE, dy=3),))
    redis_client.xadd(settings.keys.control("late"), messages.encode(command))
    result = watch("late", tmp_path / "out", settings=settings, client=redis_client, progress=False)
    thread.join(30)
    if model is not None:
        model.close()
    msgs = entries(redis_client, settings, "late")
    (change,) = [m for m in msgs if isinstance(m, messages.ObjectChange)]
    p = change.frame_idx
    assert change.change == ("added" if obj_id == 5 else "corrected") and change.requested_frame == 3
    assert 12 <= p < N and "updated" in change.note
    updates = [m for m in msgs if isinstance(m, messages.FrameUpdate)]
    assert [u.frame_idx for u in updates] == list(range(p)) and all(u.request_id == command.request_id
                                                                   for u in updates)
    assert all(u.objects[0].obj_id == obj_id and u.objects[0].area > 0 for u in updates)
    frame_ids = [m.frame_idx for m in msgs if isinstance(m, messages.FrameResult)]
    assert frame_ids == list(range(N))  # every frame still exactly once
    if obj_id == 5:  # the other object is exactly what it is without the prompt
        plain, late = masks_of(entries(redis_client, settings, "plain"), 1), masks_of(msgs, 1)
        assert all(np.array_equal(plain[k], late[k]) for k in range(N))
    doc = json.loads(result.masks_json.read_text())
    shown = {f["frame_idx"] for f in doc["frames"] for o in f["objects"] if o["obj_id"] == obj_id and o["area"]}
    assert shown == set(range(N)), "watch merged the updates: the object is on every frame of masks.json"


@pytest.mark.e2e
def test_with_sam2_the_updates_are_the_predictors_own_masks(tmp_path: Path) -> None:
    """The backfill is SAM 2's predictor with that one prompt over frames 0..P, bit for bit."""
    video = make_video(tmp_path / "v.mp4", num_frames=20, size_wh=(128, 96), fps=10)
    extract_frames(video, tmp_path / "frames")
    torch.manual_seed(0)
    predictor = build_predictor(get_preset("tiny"), None, device="cpu", image_size=256)
    seg = Sam2Segmenter(predictor, name="t", random_weights=True, encoder_batch=1)
    x, y = disc_center(4, 20, (128, 96))
    prompt = ObjectPrompt(7, 4, ((x, y),), (1,))
    frames = DirFrames(tmp_path / "frames", 20)
    with seg.open_session(frames, [ObjectPrompt(1, 0, (disc_center(0, 20, (128, 96)),), (1,))], width=128,
                          height=96) as session:
        for _ in range(10):
            next(session)
        done = session.backfill(prompt)  # at the session's position, frame 10
        assert done.upto == 10 and session.obj_ids == (1, 7)
        assert next(session).obj_ids == (1, 7)  # frame 10: the object from the backfill's seed on
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    for k in range(11):
        shutil.copy(tmp_path / "frames" / f"{k:05d}.jpg", prefix / f"{k:05d}.jpg")
    bare = dict(bare_predictor_masks(predictor, prefix, [prompt]))
    assert sorted(done.masks) == list(range(10))
    for k in range(10):
        assert np.array_equal(done.masks[k], bare[k][0]), f"frame {k}"
    assert done.seed is not None and np.array_equal(done.seed, bare[10][0])  # the seed: SAM 2's own mask on 10
