"""Smoke runs say what they do (issue 27). A worker whose CLIP labeller cannot load (weights neither cached
nor reachable, an unknown tag) says so at its first job with labels and fails that job at once, before segmenting
anything, in one short line naming VSEG_LABEL_PRETRAINED=random, and serves on; `--checkpoint random`
labels with random CLIP weights too, loudly; an --auto run on random weights that ends with no object
says why, keyframe by keyframe (worker/model/labels.py, worker/service/auto.py)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import cast

import pytest
import redis

from producer.submission import submit
from runtime.settings import Settings
from schemas import messages
from schemas.names import TERMINAL_ENTRY_ID
from tests.fakes import ColourSegmenter
from tests.videos import disc_prompt, make_video
from tests.workers import WorkerProcess, log_time, stop_all, wait_for
from worker.model import labels
from worker.service.loop import Worker

pytestmark = pytest.mark.integration

N = 12
SIZE = (96, 64)
OFFLINE_LINE = ("CLIP weights laion2b_s34b_b79k missing (not cached, HF_HUB_OFFLINE=1): `hf download "
                "laion/CLIP-ViT-B-32-laion2B-s34B-b79K` into the worker's HF_HOME, or VSEG_LABEL_PRETRAINED=random "
                "for smoke tests")


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("smoke") / "v.mp4", num_frames=N, size_wh=SIZE, fps=10)


@pytest.fixture
def checked_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's labeller checks and loads forgotten (a worker makes them once; tests make several)."""
    monkeypatch.setattr(labels, "_checked", {})
    monkeypatch.setattr(labels, "_loaded", {})


def terminal(client: redis.Redis, settings: Settings, job_id: str, timeout_s: float = 60) -> messages.Message:
    stream = settings.keys.results(job_id)
    wait_for(lambda: client.xrange(stream, min=TERMINAL_ENTRY_ID), timeout_s, f"job {job_id} to end")
    return messages.decode(client.xrange(stream, min=TERMINAL_ENTRY_ID)[0][1])


def entries(client: redis.Redis, settings: Settings, job_id: str) -> list[messages.Message]:
    return [messages.decode(f) for _, f in client.xrange(settings.keys.results(job_id))]


def job_state(client: redis.Redis, settings: Settings, job_id: str) -> dict[str, str]:
    raw = cast(dict[bytes, bytes], client.hgetall(settings.keys.job(job_id)))
    return {k.decode(): v.decode() for k, v in raw.items()}


def test_a_labels_job_on_a_worker_without_clip_weights_fails_at_once_and_the_worker_serves_on(
        video: Path, settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    """Offline with an empty Hugging Face cache: the job fails at its start, in one line, said once in the log;
    a second job with labels fails the same way without a second check."""
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    worker = WorkerProcess(settings, "no-clip", tmp_path, delay_s=0.0,
                           env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)})
    try:
        said = f"--labels jobs fail at once on this worker: {OFFLINE_LINE}"
        submit(video, [disc_prompt(1, 0, N, SIZE)], settings=settings, job_id="labelled", labels=("person", "car"))
        failed = terminal(redis_client, settings, "labelled")
        assert isinstance(failed, messages.Failed) and failed.error_type == "LabellerUnavailable", failed
        assert failed.error == OFFLINE_LINE and len(failed.error) < 200
        assert [type(m) for m in entries(redis_client, settings, "labelled")] == [messages.Failed]  # no frame, no start
        state = job_state(redis_client, settings, "labelled")
        assert state["state"] == "failed" and state["attempt"] == "1"  # never retried
        assert state["error"] == f"LabellerUnavailable: {OFFLINE_LINE}"
        log = worker.log()
        assert log.count(said) == 1
        assert log_time(log, "job labelled failed") - log_time(log, "job labelled attempt 1") < 10, log[-3000:]
        submit(video, [disc_prompt(1, 0, N, SIZE)], settings=settings, job_id="again", labels=("person",))
        again = terminal(redis_client, settings, "again")
        assert isinstance(again, messages.Failed) and again.error == OFFLINE_LINE
        log = worker.log()
        assert log.count(said) == 1  # checked once, remembered
        assert log_time(log, "job again failed") - log_time(log, "job again attempt 1") < 0.5, log[-3000:]
        submit(video, [disc_prompt(1, 0, N, SIZE)], settings=settings, job_id="plain")
        done = terminal(redis_client, settings, "plain")
        assert isinstance(done, messages.Completed) and done.num_frames == N, done
        assert worker.alive()
    finally:
        stop_all(worker)


def run_in_process(settings: Settings, client: redis.Redis) -> None:
    Worker(settings=settings, segmenter=ColourSegmenter(), client=client, name="in-process").run(burst=True)


def test_an_unknown_clip_tag_fails_labels_jobs_at_once_and_the_plugged_in_labeller_is_never_checked(
        video: Path, settings: Settings, redis_client: redis.Redis, checked_afresh: None) -> None:
    wrong = dataclasses.replace(settings, label_pretrained="no-such-tag")
    for job_id in ("first", "second"):
        submit(video, [disc_prompt(1, 0, N, SIZE)], settings=wrong, job_id=job_id, labels=("person",))
    t0 = time.monotonic()
    run_in_process(wrong, redis_client)
    assert time.monotonic() - t0 < 20
    for job_id in ("first", "second"):
        failed = terminal(redis_client, wrong, job_id)
        assert isinstance(failed, messages.Failed) and failed.error == (
            "VSEG_LABEL_PRETRAINED='no-such-tag' names no ViT-B-32 weights in open_clip: pick a tag from "
            "open_clip.list_pretrained(), or VSEG_LABEL_PRETRAINED=random for smoke tests"), failed
    plugged = dataclasses.replace(wrong, labeller="tests.fakes:colour_labeller")
    assert labels.labeller_problem(plugged) is None


def test_weights_that_do_not_load_fail_once_and_are_not_tried_again(
        video: Path, settings: Settings, redis_client: redis.Redis, tmp_path: Path, checked_afresh: None,
        caplog: pytest.LogCaptureFixture) -> None:
    garbage = tmp_path / "clip.bin"
    garbage.write_bytes(b"not a checkpoint")
    broken = dataclasses.replace(settings, label_pretrained=str(garbage))
    for job_id in ("first", "second"):
        submit(video, [disc_prompt(1, 0, N, SIZE)], settings=broken, job_id=job_id, labels=("person",))
    run_in_process(broken, redis_client)
    for job_id in ("first", "second"):
        failed = terminal(redis_client, broken, job_id)
        assert isinstance(failed, messages.Failed) and failed.error_type == "LabellerUnavailable", failed
        assert failed.error.startswith(f"CLIP weights {garbage} did not load (") and failed.error.endswith(
            "check VSEG_LABEL_MODEL and VSEG_LABEL_PRETRAINED, or VSEG_LABEL_PRETRAINED=random for smoke tests")
    assert sum("cannot load the CLIP labeller" in r.getMessage() for r in caplog.records) == 1  # the whole error, once


def test_weights_copied_into_the_cache_later_are_found_without_a_restart(
        settings: Settings, tmp_path: Path, checked_afresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert labels.labeller_problem(settings) == OFFLINE_LINE
    with pytest.raises(labels.LabellerUnavailable, match="VSEG_LABEL_PRETRAINED=random"):
        labels.check_labeller(settings)
    repo = tmp_path / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"  # what `hf download` leaves
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    assert labels.labeller_problem(settings) is None


def test_a_smoke_run_labels_with_random_clip_weights_and_says_so(
        video: Path, settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    """`python -m worker --checkpoint random` (here beside the fake segmenter): CLIP with random weights,
    said loudly when CLIP is checked; the job runs and its objects carry labels of the job's."""
    worker = WorkerProcess(settings, "smoke", tmp_path, delay_s=0.0, extra=["--checkpoint", "random"])
    try:
        submit(video, [disc_prompt(1, 0, N, SIZE)], settings=settings, job_id="smoke", labels=("person", "car"))
        done = terminal(redis_client, settings, "smoke", timeout_s=120)
        assert isinstance(done, messages.Completed), done
        found = {o.label for m in entries(redis_client, settings, "smoke") if isinstance(m, messages.FrameResult)
                 for o in m.objects if o.area}
        assert found and found <= {"person", "car"}
        log = worker.log()
        assert "!!! RANDOM WEIGHTS: the labeller CLIP ViT-B-32 is untrained; every label is meaningless" in log
        assert "labeller: CLIP ViT-B-32 (random weights) loaded on cpu" in log
    finally:
        stop_all(worker)


@pytest.mark.e2e
def test_a_random_weights_auto_run_that_finds_nothing_says_why(
        video: Path, settings: Settings, redis_client: redis.Redis, checked_afresh: None,
        caplog: pytest.LogCaptureFixture) -> None:
    """The smoke run of the report: real SAM 2 with random weights, --auto and --labels, no prompt. It ends
    with no object; each keyframe's line says what was proposed and why nothing became an object, and the
    progress (and the job hash) carry the totals."""
    import torch

    from worker.model.build import build_segmenter

    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    smoke = dataclasses.replace(settings, checkpoint="random", image_size=256, device="cpu", auto_points_per_side=4)
    segmenter = build_segmenter(smoke)
    submit(video, [], settings=smoke, job_id="smoke-auto", auto=messages.AutoOptions(every_frames=6),
           labels=("person", "car"))
    Worker(settings=smoke, segmenter=segmenter, client=redis_client, name="smoke-auto").run(burst=True)
    done = terminal(redis_client, smoke, "smoke-auto")
    assert isinstance(done, messages.Completed) and done.num_objects == 0 and done.random_weights, done
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auto keyframe ")]
    assert [line.split(":")[0] for line in lines] == ["auto keyframe 1 (frame 0)", "auto keyframe 2 (frame 6)"]
    proposed = [int(line.split(": ")[1].split(" masks")[0]) for line in lines]
    for line, n in zip(lines, proposed):
        assert "0 became objects" in line, line
        if n == 0:  # the generator's own thresholds kept nothing: the line says which, and that weights are random
            assert ("(none passed the generator's auto_pred_iou_thresh 0.7 and auto_stability_score_thresh 0.92: "
                    "RANDOM WEIGHTS, expected)") in line, line
        else:
            assert "; not added: " in line, line
    events = [messages.decode(f) for _, f in redis_client.xrange(smoke.keys.events)]
    last = [m for m in events if isinstance(m, messages.Progress) and m.job_id == "smoke-auto"][-1]
    assert (last.auto_keyframes, last.auto_proposed, last.auto_added) == (2, sum(proposed), 0)
    state = job_state(redis_client, smoke, "smoke-auto")
    assert (state["auto_keyframes"], state["auto_proposed"], state["auto_added"]) == ("2", str(sum(proposed)), "0")
    assert any("!!! RANDOM WEIGHTS: the labeller CLIP ViT-B-32" in r.getMessage() for r in caplog.records)
