"""Integration tier: the command-line edges say what was wrong and exit non-zero."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from producer.local_redis import RedisServer

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def env(redis_server: RedisServer, tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": redis_server.url, "STORAGE_ROOT": str(tmp_path / "storage"),
            "VSEG_CHECKPOINT_DIR": str(tmp_path / "ckpt"), "HF_HUB_OFFLINE": "1"}


def test_worker_without_checkpoint_names_the_path_and_how_to_get_it(env: dict[str, str], tmp_path: Path) -> None:
    out = run(["-m", "worker", "--burst", "--device", "cpu"], env)
    assert out.returncode == 2
    assert str(tmp_path / "ckpt" / "sam2.1_hiera_tiny.pt") in out.stderr
    assert "facebook/sam2.1-hiera-tiny" in out.stderr and "--checkpoint random" in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "huge"], "unknown model preset 'huge'"),
        (["--checkpoint", "/nope/model.pt"], "checkpoint file not found: /nope/model.pt"),
        (["--image-size", "250"], "multiple of 16"),
    ],
)
def test_worker_refuses_bad_settings_at_start(env: dict[str, str], args: list[str], message: str) -> None:
    out = run(["-m", "worker", "--burst", "--device", "cpu", *args], env)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize(
    "args, message",
    [
        (["submit", "missing.mp4", "--point", "1:1,1"], "video file not found"),
        (["submit", "x.mp4", "--point", "1:1"], "bad --point '1:1'"),
        (["submit", "x.mp4", "--box", "1:1,2,3"], "bad --box"),
        (["submit", "x.mp4", "--point", "1:1,1", "--job-id", "a/b"], "job id"),
        (["watch", "nope", "--out", "o"], "no job 'nope'"),
        (["cancel", "nope"], "no job 'nope'"),
    ],
)
def test_producer_errors(env: dict[str, str], args: list[str], message: str) -> None:
    out = run(["-m", "producer", *args], env)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]


def test_submit_no_render_puts_a_masks_only_job_on_the_queue(env: dict[str, str], tmp_path: Path) -> None:
    import redis

    from schemas import messages
    from tests.videos import make_video

    video = make_video(tmp_path / "v.mp4", num_frames=6, size_wh=(64, 48), fps=10)
    out = run(["-m", "producer", "submit", str(video), "--point", "1:20,20", "--job-id", "nr", "--no-render"], env)
    assert out.returncode == 0, out.stderr[-2000:]
    client = redis.Redis.from_url(env["REDIS_URL"])
    entries = client.xrange("vseg:jobs")
    jobs = [messages.decode(fields) for _, fields in entries]
    (job,) = [j for j in jobs if isinstance(j, messages.JobMessage) and j.job_id == "nr"]
    assert job.render is False
