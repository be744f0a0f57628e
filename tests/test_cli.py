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
        (["--model", "huge"], "unknown model 'huge': give --model (VSEG_MODEL) one of sam2.1-tiny"),
        (["--checkpoint", "/nope/model.pt"], "checkpoint file not found: /nope/model.pt"),
        (["--image-size", "250"], "multiple of 16"),
    ],
)
def test_worker_refuses_bad_settings_at_start(env: dict[str, str], args: list[str], message: str) -> None:
    out = run(["-m", "worker", "--burst", "--device", "cpu", *args], env)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.splitlines()) == 1, out.stderr[-2000:]


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    """The one line a CLI wrote on stderr (and nothing on stdout)."""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and not out.stdout, (out.stdout, out.stderr[-2000:])
    return lines[0]


# Exit status (runtime/logs.py): 2 when the command line is wrong (a bad flag, file, video, prompt or job id),
# 1 when it is well-formed but fails: an unknown job is a well-formed id that Redis has no job for.
@pytest.mark.parametrize(
    "args, code, message",
    [
        (["submit", "missing.mp4", "--point", "1:1,1"], 2, "video file not found"),
        (["submit", "x.mp4", "--point", "1:1"], 2, "bad --point '1:1'"),
        (["submit", "x.mp4", "--box", "1:1,2,3"], 2, "bad --box"),
        (["submit", "x.mp4", "--point", "1:1,1", "--job-id", "a/b"], 2, "job id"),
        (["status", "a/b"], 2, "job id"),
        (["status", "nope"], 1, "no job 'nope'"),
        (["cancel", "nope"], 1, "no job 'nope'"),
    ],
)
def test_producer_errors_are_one_line(env: dict[str, str], args: list[str], code: int, message: str) -> None:
    out = run(["-m", "producer", *args], env)
    assert out.returncode == code and message in one_line(out), (out.returncode, out.stderr[-2000:])


def test_watch_of_an_unknown_job_fails_without_creating_its_folder(env: dict[str, str], tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out = run(["-m", "producer", "watch", "nope", "--out", str(out_dir)], env)
    assert out.returncode == 1 and "no job 'nope'" in one_line(out), out.stderr[-2000:]
    assert not out_dir.exists()


@pytest.mark.parametrize("content, message", [
    (None, "prompts file not found"),
    ("{not json", "is not valid JSON"),
    ('{"obj_id": 1}', "must hold a JSON list"),
    ('[{"points": [[1, 1]]}]', "missing obj_id"),
    ("", "cannot be read"),  # a directory
])
def test_a_bad_prompts_file_is_one_line_and_exit_2(env: dict[str, str], tmp_path: Path, content: str | None,
                                                    message: str) -> None:
    prompts = tmp_path / "prompts.json"
    if content == "":
        prompts.mkdir()
    elif content is not None:
        prompts.write_text(content)
    out = run(["-m", "producer", "submit", "x.mp4", "--prompts", str(prompts)], env)
    assert out.returncode == 2 and message in one_line(out), out.stderr[-2000:]


@pytest.mark.parametrize("cli, args", [
    ("producer", ["submit", "x.mp4", "--stride", "two"]),
    ("producer", ["watch", "j"]),  # --out missing
    ("producer", ["frobnicate"]),
    ("worker", ["--lease", "long"]),
    ("worker", ["--no-such-flag"]),
])
def test_a_bad_flag_exits_2_with_the_usage_and_one_error_line(env: dict[str, str], cli: str, args: list[str]) -> None:
    out = run(["-m", cli, *args], env)
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and lines[0].startswith("usage: ") and "error: " in lines[-1], out.stderr[-2000:]
    assert sum("error: " in line for line in lines) == 1, out.stderr[-2000:]


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
