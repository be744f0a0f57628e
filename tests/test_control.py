"""Cancelling is idempotent: a job already in a terminal state is left as it is, and both the API and
`python -m producer cancel` say which state it had ended in (exit 0, as for any cancel that went
through), instead of claiming to have cancelled a queued job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from producer.control import CancelAction, CancelResult, cancel, request_cancel
from producer.submission import submit
from runtime.settings import Settings
from schemas.names import TERMINAL_STATES, JobState
from schemas.prompts import ObjectPrompt
from tests.videos import disc_center, make_video

ROOT = Path(__file__).resolve().parent.parent


def cli_cancel(settings: Settings, job_id: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": settings.redis_url, "STORAGE_ROOT": str(settings.storage_root)}
    return subprocess.run([sys.executable, "-m", "producer", "cancel", job_id], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("result, line", [
    (CancelResult("j", CancelAction.CANCELLED, "cancelled"), "job j: cancelled (it was still queued)"),
    (CancelResult("j", CancelAction.REQUESTED, "running"), "job j: cancel requested: its worker stops within a few frames"),
    (CancelResult("j", CancelAction.ALREADY_ENDED, "cancelled"), "job j: already cancelled: nothing to cancel"),
    (CancelResult("j", CancelAction.ALREADY_ENDED, "completed"), "job j: already completed: nothing to cancel"),
    (CancelResult("j", CancelAction.ALREADY_ENDED, "failed"), "job j: already failed: nothing to cancel"),
    (CancelResult("j", CancelAction.ALREADY_ENDED, "dead"), "job j: already dead: nothing to cancel"),
])
def test_each_outcome_says_what_was_done(result: CancelResult, line: str) -> None:
    assert result.describe() == line


def test_the_api_result_is_unchanged_a_state_for_a_job_that_had_ended() -> None:
    assert CancelResult("j", CancelAction.CANCELLED, "cancelled").outcome == "cancelled"
    assert CancelResult("j", CancelAction.REQUESTED, "running").outcome == "requested"
    assert CancelResult("j", CancelAction.ALREADY_ENDED, "dead").outcome == "dead"


@pytest.mark.integration
@pytest.mark.parametrize("state", [s.value for s in TERMINAL_STATES])
def test_cancel_of_a_job_already_ended_says_so_and_changes_nothing(
    state: str, settings: Settings, redis_client: redis.Redis
) -> None:
    key = settings.keys.job("over")
    redis_client.hset(key, mapping={"state": state, "attempt": 1, "frames_done": 3, "num_frames": 3})
    before = redis_client.hgetall(key)

    assert request_cancel("over", settings=settings, client=redis_client) == CancelResult(
        "over", CancelAction.ALREADY_ENDED, state)
    assert cancel("over", settings=settings, client=redis_client) == state
    out = cli_cancel(settings, "over")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"job over: already {state}: nothing to cancel", out.stdout
    assert redis_client.hgetall(key) == before  # no cancel flag, the state kept
    assert not redis_client.exists(settings.keys.results("over"))  # no second terminal entry


@pytest.mark.integration
def test_a_queued_job_cancelled_twice_says_it_was_already_cancelled(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    video = make_video(tmp_path / "v.mp4", num_frames=5, size_wh=(64, 48))
    x, y = disc_center(0, 5, (64, 48))
    submit(video, [ObjectPrompt(1, 0, ((x, y),), (1,))], settings=settings, client=redis_client, job_id="twice",
           stream=False)

    first = cli_cancel(settings, "twice")
    assert first.returncode == 0 and first.stdout.strip() == "job twice: cancelled (it was still queued)", first
    assert not (settings.storage_root / "jobs/twice/frames").exists()  # never streamed: its frames go at once
    second = cli_cancel(settings, "twice")
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "job twice: already cancelled: nothing to cancel", second.stdout
    assert redis_client.hget(settings.keys.job("twice"), "state") == JobState.CANCELLED.value.encode()
    assert redis_client.xlen(settings.keys.results("twice")) == 1  # one terminal entry, not two


@pytest.mark.integration
def test_a_job_a_worker_holds_gets_a_cancel_request(settings: Settings, redis_client: redis.Redis) -> None:
    redis_client.hset(settings.keys.job("busy"), mapping={"state": "running", "attempt": 1})
    assert request_cancel("busy", settings=settings, client=redis_client) == CancelResult(
        "busy", CancelAction.REQUESTED, "running")
    assert redis_client.hget(settings.keys.job("busy"), "cancel") == b"1"
