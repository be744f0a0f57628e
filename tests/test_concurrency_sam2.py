"""e2e tier: jobs held at once by one worker on the real SAM 2 (random weights, CPU, image size 256) get
the masks and scores each gets alone, bit for bit: sessions on the shared model take turns frame by
frame (worker/model/turns.py) and never batch, so every kernel runs as it does for a job alone."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis
import torch

from producer.submission import submit
from runtime.settings import Settings
from schemas import messages
from tests.videos import disc_prompt, make_video
from worker.model.sam2.checkpoints import build_predictor, get_preset
from worker.model.sam2.segmenter import Sam2Segmenter
from worker.service.loop import Worker

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SIZE = (128, 96)
CLIPS = {"a": 6, "b": 8, "c": 5}  # three videos of their own lengths


@pytest.fixture(scope="module")
def model(predictor: object) -> Sam2Segmenter:
    return Sam2Segmenter(predictor, name="sam2.1-tiny", random_weights=True, encoder_batch=1)


def results(client: redis.Redis, settings: Settings, job_id: str) -> list[tuple[int, tuple[messages.ObjectResult, ...]]]:
    out = []
    for _, fields in client.xrange(settings.keys.results(job_id)):
        msg = messages.decode(fields)
        if isinstance(msg, messages.FrameResult):
            out.append((msg.frame_idx, msg.objects))
    return out


def run_jobs(model: Sam2Segmenter, settings: Settings, client: redis.Redis, tmp_path: Path, tag: str,
             concurrency: int) -> dict[str, list[tuple[int, tuple[messages.ObjectResult, ...]]]]:
    """Submit every clip as job `<clip>-<tag>` and run them on one worker holding `concurrency` at once."""
    jobs = {}
    for clip, n in CLIPS.items():
        video = tmp_path / f"{clip}.mp4"
        if not video.exists():
            make_video(video, num_frames=n, size_wh=SIZE, fps=10)
        prompts = [disc_prompt(1, 0, n, SIZE), disc_prompt(2, n // 2, n, SIZE, dy=4)]
        jobs[clip] = submit(video, prompts, settings=settings, client=client, job_id=f"{clip}-{tag}", render=False).job_id
    worker = Worker(settings=Settings.load(environ={}, config_path=None, redis_url=settings.redis_url,
                                           storage_root=settings.storage_root, block_ms=200, concurrency=concurrency),
                    segmenter=model, client=client, name=f"w-{tag}")
    thread = threading.Thread(target=worker.run, kwargs={"burst": True}, daemon=True)
    thread.start()
    thread.join(300)
    assert not thread.is_alive(), "the worker did not finish its jobs"
    for job_id in jobs.values():
        state = client.hget(settings.keys.job(job_id), "state")
        assert state == b"completed", (job_id, state)
    return {clip: results(client, settings, job_id) for clip, job_id in jobs.items()}


def test_two_and_three_jobs_at_once_get_the_masks_each_gets_alone(
    model: Sam2Segmenter, settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    alone = run_jobs(model, settings, redis_client, tmp_path, "alone", 1)
    three = run_jobs(model, settings, redis_client, tmp_path, "three", 3)
    two = run_jobs(model, settings, redis_client, tmp_path, "two", 2)
    for clip, n in CLIPS.items():
        assert [k for k, _ in alone[clip]] == list(range(n))
        assert any(o.area for _, objs in alone[clip] for o in objs)  # something to compare
        assert three[clip] == alone[clip], f"clip {clip}: masks differ with three jobs at once"
        assert two[clip] == alone[clip], f"clip {clip}: masks differ with two jobs at once"
    assert model.turns.turns > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_warm_up_measures_a_session_and_k_comes_from_free_memory() -> None:
    from worker.model.host import ModelHost
    from worker.service.capacity import pick_concurrency, refusal

    torch.manual_seed(0)
    predictor = build_predictor(get_preset("tiny"), None, device="cuda", image_size=1024)
    seg = Sam2Segmenter(predictor, name="sam2.1-tiny", random_weights=True)
    assert seg.gpu_budget() is None  # not measured before the warm-up
    seg.warm_up()
    budget = seg.gpu_budget()
    assert budget is not None and budget.session_bytes > 0 and budget.model_bytes > 0 and budget.free_bytes > 0
    k, why = pick_concurrency(Settings(), ModelHost(seg))
    assert 1 <= k <= 16 and "MiB free on cuda" in why
    assert refusal([budget], busy=1) is None or budget.free_bytes < 1.5 * budget.session_bytes
