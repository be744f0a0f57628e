"""Resume instead of restart (worker/service/resume.py): a reclaimed job goes on after its last published
frame, each object seeded with its published mask there; every frame still has exactly one entry, the
MP4 has every frame, and `started.resume_from` says where the attempt began. With resume off the job
runs again from frame 0 and gets the uninterrupted run's exact masks."""

from __future__ import annotations

import signal
from pathlib import Path

import av
import numpy as np
import pytest
import redis
import torch

from producer.submission import submit
from runtime.settings import Settings
from schemas import messages
from schemas.names import TERMINAL_ENTRY_ID
from schemas.prompts import ObjectPrompt
from schemas.rle import decode_mask
from tests.fakes import FROM_ENV, ColourSegmenter
from tests.test_fake_segmenter import N_FRAMES, green_centre, write_frames
from tests.videos import disc_center, make_video
from tests.workers import WorkerProcess, wait_for
from worker.model.process import ModelProcess
from worker.model.session import MaskPrompt
from worker.sources.frames import DirFrames

N = 24
SIZE = (96, 64)


def finished(client: redis.Redis, settings: Settings, job_id: str) -> bool:
    return client.exists(settings.keys.results(job_id)) and bool(
        client.xrange(settings.keys.results(job_id), min=TERMINAL_ENTRY_ID, max=TERMINAL_ENTRY_ID))


def frame_masks(client: redis.Redis, settings: Settings, job_id: str) -> dict[int, list[np.ndarray]]:
    out = {}
    for entry_id, fields in client.xrange(settings.keys.results(job_id)):
        msg = messages.decode(fields)
        if isinstance(msg, messages.FrameResult):
            assert entry_id.decode() == f"{msg.frame_idx + 1}-0"
            assert [o.obj_id for o in msg.objects] == [1]
            out[msg.frame_idx] = [decode_mask(o.mask) for o in msg.objects]
    return out


def attempts_started(client: redis.Redis, settings: Settings, job_id: str) -> list[messages.Started]:
    return [m for m in (messages.decode(f) for _, f in client.xrange(settings.keys.events))
            if isinstance(m, messages.Started) and m.job_id == job_id]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def frames_in(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.mark.integration
@pytest.mark.parametrize("resume", ["on", "off"])
def test_a_reclaimed_job_resumes_after_its_last_published_frame(video: Path, prompt: list[ObjectPrompt],
                                                                 settings: Settings, redis_client: redis.Redis,
                                                                 tmp_path: Path, resume: str) -> None:
    reference = f"ref-{resume}"
    job = f"crash-{resume}"
    steady = WorkerProcess(settings, "steady", tmp_path, delay_s=0.02, env={"VSEG_RESUME": resume})
    try:  # the uninterrupted run, for comparison
        submit(video, prompt, settings=settings, job_id=reference)
        wait_for(lambda: finished(redis_client, settings, reference), 60, "the reference job")
    finally:
        steady.signal(signal.SIGTERM)
        steady.wait(30)
    crasher = WorkerProcess(settings, "crasher", tmp_path, delay_s=0.02, faults={job: {"crash_at": 14}})
    submit(video, prompt, settings=settings, job_id=job)
    assert crasher.wait(60) == -signal.SIGKILL
    published_before = len(frame_masks(redis_client, settings, job))
    assert 0 < published_before <= 14
    taker = WorkerProcess(settings, "taker", tmp_path, delay_s=0.02, env={"VSEG_RESUME": resume})
    try:
        wait_for(lambda: finished(redis_client, settings, job), 60, "the reclaimed job")
    finally:
        taker.signal(signal.SIGTERM)
        taker.wait(30)
    ids = [i.decode() for i, _ in redis_client.xrange(settings.keys.results(job))]
    assert ids == ["0-1"] + [f"{k + 1}-0" for k in range(N)] + [TERMINAL_ENTRY_ID], ids  # every frame once
    started = attempts_started(redis_client, settings, job)
    assert [s.attempt for s in started] == [1, 2] and started[0].resume_from == 0
    ours, theirs = frame_masks(redis_client, settings, job), frame_masks(redis_client, settings, reference)
    done = messages.decode(redis_client.xrange(settings.keys.results(job), min=TERMINAL_ENTRY_ID)[0][1])
    assert isinstance(done, messages.Completed) and done.num_frames == N
    assert frames_in(settings.storage_root / done.render_path) == N  # the MP4 has every frame, drawn once
    if resume == "on":
        assert started[1].resume_from == published_before  # after the crasher's last published frame
        assert "resumes after frame" in taker.log()
        # the colour model seeded from the published mask: the same discs, up to a few edge pixels
        assert all(iou(ours[k][0], theirs[k][0]) > 0.95 for k in range(N)), [
            round(iou(ours[k][0], theirs[k][0]), 3) for k in range(N)]
    else:
        assert started[1].resume_from == 0
        assert all(np.array_equal(ours[k][0], theirs[k][0]) for k in range(N))  # the uninterrupted masks exactly


def test_a_session_started_later_from_masks_goes_on_from_there(tmp_path: Path) -> None:
    """The seam a resume uses: start_frame with mask prompts, in this process and across the model process;
    prompts before the start frame are refused."""
    write_frames(tmp_path / "frames")
    frames = DirFrames(tmp_path / "frames", N_FRAMES)
    alone = list(ColourSegmenter().segment(frames, [ObjectPrompt(2, 0, (green_centre(0),), (1,))],
                                           width=160, height=120))
    seed = MaskPrompt(2, 3, alone[3].masks[0])
    with ColourSegmenter().open_session(frames, [seed], width=160, height=120, start_frame=3) as s:
        assert s.position == 3
        with pytest.raises(Exception, match="prompt frame 3 or later"):
            s.add_prompts([ObjectPrompt(2, 1, (green_centre(1),), (1,))])
        here = list(s)
    assert [o.frame_idx for o in here] == list(range(3, N_FRAMES)) and {o.obj_ids for o in here} == {(2,)}
    assert all(iou(o.masks[0], a.masks[0]) > 0.95 for o, a in zip(here, alone[3:]))
    model = ModelProcess(Settings(model_process="on", segmenter=FROM_ENV, device="cpu"))
    try:
        with model.open_session(frames, [seed], width=160, height=120, start_frame=3) as remote:
            there = list(remote)
    finally:
        model.close()
    assert [o.frame_idx for o in there] == [o.frame_idx for o in here]
    assert all(np.array_equal(a.masks, b.masks) for a, b in zip(there, here))


@pytest.mark.e2e
def test_sam2_resumes_from_masks_with_the_same_object_ids(tmp_path: Path) -> None:
    from producer.decode import extract_frames
    from worker.model.sam2.checkpoints import build_predictor, get_preset
    from worker.model.sam2.segmenter import Sam2Segmenter

    n, size = 12, (128, 96)
    extract_frames(make_video(tmp_path / "v.mp4", num_frames=n, size_wh=size, fps=10), tmp_path / "frames")
    torch.manual_seed(0)
    seg = Sam2Segmenter(build_predictor(get_preset("tiny"), None, device="cpu", image_size=256),
                        name="t", random_weights=True, encoder_batch=1)
    frames = DirFrames(tmp_path / "frames", n)
    prompts = [ObjectPrompt(1, 0, (disc_center(0, n, size),), (1,)), ObjectPrompt(4, 0, ((10.0, 10.0),), (1,))]
    alone = list(seg.segment(frames, prompts, width=size[0], height=size[1]))
    seeds = [MaskPrompt(obj_id, 5, alone[5].masks[k]) for k, obj_id in enumerate(alone[5].obj_ids)]
    with seg.open_session(frames, seeds, width=size[0], height=size[1], start_frame=5) as s:
        resumed = list(s)
    assert [o.frame_idx for o in resumed] == list(range(5, n))
    assert all(o.obj_ids == (1, 4) and o.masks.shape == (2, size[1], size[0]) for o in resumed)


@pytest.mark.integration
def test_submit_no_resume_asks_for_a_rerun_from_frame_0(video: Path, settings: Settings, redis_client: redis.Redis,
                                                          tmp_path: Path) -> None:
    """`--no-resume` (the API's resume=False) rides on the job entry; a worker with resume on honours it."""
    import subprocess
    import sys

    from tests.workers import ROOT, worker_env

    cli = subprocess.run([sys.executable, "-m", "producer", "submit", str(video), "--point",
                          "1:{:.0f},{:.0f}".format(*disc_center(0, N, SIZE)), "--job-id", "no-resume", "--no-stream",
                          "--no-resume"], cwd=ROOT, env=worker_env(settings), capture_output=True, text=True,
                         timeout=60)
    assert cli.returncode == 0, cli.stderr
    entries = redis_client.xrange(settings.keys.jobs)
    jobs = [m for m in (messages.decode(f) for _, f in entries) if isinstance(m, messages.JobMessage)]
    assert [(j.job_id, j.resume) for j in jobs if j.job_id == "no-resume"] == [("no-resume", False)]
    crasher = WorkerProcess(settings, "crasher", tmp_path, delay_s=0.02, faults={"no-resume": {"crash_at": 10}})
    assert crasher.wait(60) == -signal.SIGKILL
    taker = WorkerProcess(settings, "taker", tmp_path, delay_s=0.02)
    try:
        wait_for(lambda: finished(redis_client, settings, "no-resume"), 60, "the reclaimed job")
    finally:
        taker.signal(signal.SIGTERM)
        taker.wait(30)
    assert [s.resume_from for s in attempts_started(redis_client, settings, "no-resume")] == [0, 0]
