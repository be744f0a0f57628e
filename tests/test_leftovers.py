"""Integration tier: what a finished job leaves behind, seen as a user sees it (issue 27's leftovers): no empty
job folder, no `--out` folder for a job that failed, and `submit --watch` with the job id alone on stdout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis

from producer.submission import submit
from runtime.settings import Settings
from schemas.errors import JobFailed
from tests.videos import disc_prompt
from tests.workers import ROOT, WorkerProcess, stop_all, wait_for, worker_env

pytestmark = pytest.mark.integration

N, SIZE = 8, (96, 64)


def point() -> str:
    x, y = disc_prompt(1, 0, N, SIZE).points_xy[0]
    return f"1:{x:.0f},{y:.0f}"


def test_submit_watch_prints_the_job_id_alone_and_a_masks_only_job_leaves_no_folder(
        video: Path, settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    worker = WorkerProcess(settings, "w", tmp_path, delay_s=0.0)
    try:
        done = subprocess.run([sys.executable, "-m", "producer", "submit", str(video), "--point", point(), "--job-id",
                               "quiet", "--no-render", "--watch", str(tmp_path / "out")], cwd=ROOT,
                              env=worker_env(settings), capture_output=True, text=True, timeout=120)
    finally:
        stop_all(worker)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "quiet\n"  # JOB=$(python -m producer submit ... --watch DIR) gets the id
    assert "masks: " in done.stderr and "video: none" in done.stderr
    assert (tmp_path / "out" / "masks.json").is_file()
    wait_for(lambda: not (settings.storage_root / "jobs" / "quiet").exists(), 10, "the job folder removed")
    assert not (settings.storage_root / "jobs" / "quiet").exists()  # frames gone, and the folder they left


def test_watch_of_a_job_that_failed_creates_no_out_folder(video: Path, settings: Settings, redis_client: redis.Redis,
                                                          tmp_path: Path) -> None:
    from producer.watching import watch

    x, y = disc_prompt(1, 0, N, SIZE).points_xy[0]
    from schemas.prompts import ObjectPrompt

    submit(video, [ObjectPrompt(1, 0, ((x, y),), (1,))], settings=settings, client=redis_client, job_id="doomed")
    worker = WorkerProcess(settings, "w", tmp_path, delay_s=0.0, faults={"doomed": {"transient_at": 2}},
                           env={"VSEG_MAX_ATTEMPTS": "1"})
    try:
        with pytest.raises(JobFailed):
            watch("doomed", tmp_path / "out", settings=settings, client=redis_client, progress=False, timeout_s=60)
    finally:
        stop_all(worker)
    assert not (tmp_path / "out").exists()
