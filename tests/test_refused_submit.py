"""A refused submit leaves nothing behind: no `STORAGE_ROOT/jobs/<id>` (not even an empty one) and nothing
in Redis (no job hash, no frames stream, no liveness key, no submit lock), streamed or `--no-stream`,
from the Python API and from the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import redis

import producer.submission as submit_module
from runtime.limits import LimitError
from runtime.settings import Settings
from schemas.errors import PromptError, VideoError
from schemas.prompts import ObjectPrompt
from tests.videos import make_audio_only, make_rotated_video, make_video

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
N = 12
SIZE = (64, 48)
POINT = ObjectPrompt(1, 0, ((10.0, 10.0),), (1,))
MODES = pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])


def assert_nothing_left(settings: Settings, client: redis.Redis) -> None:
    jobs = settings.storage_root / "jobs"
    left = sorted(str(p.relative_to(settings.storage_root)) for p in jobs.rglob("*")) if jobs.exists() else []
    assert left == [], f"a refused submit left {left} on disk"
    assert client.keys("*") == [], f"a refused submit left {client.keys('*')} in Redis"


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("refused")
    not_video = d / "notes.mp4"
    not_video.write_text("these are not the frames you are looking for\n" * 50)
    empty = d / "empty.mp4"
    empty.write_bytes(b"")
    return {
        "video": make_video(d / "v.mp4", num_frames=N, size_wh=SIZE, fps=10),
        "audio": make_audio_only(d / "audio.m4a"),
        "not_video": not_video,
        "empty": empty,
        "missing": d / "missing.mp4",
        "directory": d,
        "rotated": make_rotated_video(d / "rotated.mp4", 270, stored_wh=SIZE, num_frames=N),
    }


CASES: list[tuple[str, str, list[ObjectPrompt], type[Exception], str]] = [
    ("audio-only", "audio", [POINT], VideoError, "has no video stream"),
    ("not-a-video", "not_video", [POINT], VideoError, "cannot open"),
    ("empty-file", "empty", [POINT], VideoError, "cannot open"),
    ("missing", "missing", [POINT], VideoError, "video file not found"),
    ("a-directory", "directory", [POINT], VideoError, "not a file"),
    ("point-outside", "video", [ObjectPrompt(1, 0, ((70.0, 10.0),), (1,))], PromptError, "outside the 64x48 frame"),
    ("box-outside", "video", [ObjectPrompt(1, 0, box_xyxy=(0.0, 0.0, 10.0, 49.0))], PromptError, "outside"),
    ("frame-past-the-end", "video", [POINT, ObjectPrompt(2, N + 3, ((5.0, 5.0),), (1,))], PromptError,
     f"decoded video has {N} frames"),
    ("no-prompts", "video", [], PromptError, "no prompts"),
    ("outside-as-displayed", "rotated", [ObjectPrompt(1, 0, ((60.0, 10.0),), (1,))], PromptError,
     "outside the 48x64 frame"),
]


@MODES
@pytest.mark.parametrize("video_key, prompts, error, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_refused_submit_leaves_nothing(
    stream: bool, video_key: str, prompts: list[ObjectPrompt], error: type[Exception], message: str,
    videos: dict[str, Path], settings: Settings, redis_client: redis.Redis,
) -> None:
    with pytest.raises(error, match=message):
        submit_module.submit(videos[video_key], prompts, settings=settings, client=redis_client, job_id="refused",
                             stream=stream)
    assert_nothing_left(settings, redis_client)


@pytest.mark.parametrize("stream, limit", [(True, "header"), (False, "header"), (False, "decoded")],
                         ids=["streamed-header", "not-streamed-header", "not-streamed-decoded"])
def test_a_video_over_the_frame_limit_leaves_nothing(
    stream: bool, limit: str, videos: dict[str, Path], settings: Settings, redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over VSEG_MAX_FRAMES by what its header says (refused before decoding), or (`--no-stream`: the
    count is checked once decoded) by what decodes when its header says nothing. (Streamed, a video
    whose header says nothing is enqueued before its count is known: past the limit, the producer
    stops and marks its frames stream with the error, and the worker fails the job.)"""
    if limit == "decoded":
        real = submit_module.probe_header
        monkeypatch.setattr(submit_module, "probe_header", lambda v: replace(real(v), estimate=0))
    small = replace(settings, max_frames=N // 2)
    with pytest.raises(LimitError, match=f"over the limit of {N // 2}"):
        submit_module.submit(videos["video"], [POINT], settings=small, client=redis_client, job_id="long",
                             stream=stream)
    assert_nothing_left(settings, redis_client)


@MODES
def test_a_video_over_the_pixel_limit_leaves_nothing(
    stream: bool, videos: dict[str, Path], settings: Settings, redis_client: redis.Redis
) -> None:
    with pytest.raises(LimitError, match="pixels per frame"):
        submit_module.submit(videos["video"], [POINT], settings=replace(settings, max_pixels=100),
                             client=redis_client, job_id="big", stream=stream)
    assert_nothing_left(settings, redis_client)


@MODES
def test_a_decode_that_fails_midway_leaves_nothing(
    stream: bool, videos: dict[str, Path], settings: Settings, redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A prompt on the last frame: a streamed job is not enqueued before the decode fails either."""
    import producer.decode as decode

    real: Callable[..., None] = decode.write_jpeg

    def breaks(path: Path, *args: object) -> None:
        if path.name == "00005.jpg":
            raise VideoError("cannot write 00005.jpg")
        real(path, *args)

    monkeypatch.setattr(decode, "write_jpeg", breaks)
    with pytest.raises(VideoError, match="cannot write"):
        submit_module.submit(videos["video"], [ObjectPrompt(1, N - 1, ((10.0, 10.0),), (1,))], settings=settings,
                             client=redis_client, job_id="broke", stream=stream)
    assert_nothing_left(settings, redis_client)


@pytest.mark.parametrize("flag", [[], ["--no-stream"]], ids=["streamed", "not-streamed"])
@pytest.mark.parametrize("video_key, message", [("audio", "has no video stream"), ("not_video", "cannot open")])
def test_the_command_line_refuses_in_one_line_and_leaves_nothing(
    flag: list[str], video_key: str, message: str, videos: dict[str, Path], settings: Settings,
    redis_client: redis.Redis,
) -> None:
    env = {**os.environ, "REDIS_URL": settings.redis_url, "STORAGE_ROOT": str(settings.storage_root)}
    out = subprocess.run([sys.executable, "-m", "producer", "submit", str(videos[video_key]), "--point", "1:10,10",
                          "--job-id", "cli", *flag], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.splitlines()) == 1, out.stderr[-2000:]
    assert_nothing_left(settings, redis_client)


@MODES
def test_an_interrupt_while_the_hand_off_is_set_up_leaves_nothing(
    stream: bool, videos: dict[str, Path], settings: Settings, redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C after the checks, before the decode starts: the frames directory is made only inside the
    part of the path that removes it again."""

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(submit_module, "StreamingEnqueue" if stream else "EnqueueWhenDecoded", interrupted)
    with pytest.raises(KeyboardInterrupt):
        submit_module.submit(videos["video"], [POINT], settings=settings, client=redis_client, job_id="ctrl-c",
                             stream=stream)
    assert_nothing_left(settings, redis_client)
