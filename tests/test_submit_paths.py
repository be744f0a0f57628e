"""Both submits, streamed and `--no-stream`, go through one enqueue path (`producer.submit`); what
differs is the hand-off object it calls: `StreamingEnqueue` (per decoded batch: announce, enqueue once
the prompted frames are on disk) or `EnqueueWhenDecoded` (decode everything, then enqueue)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis

import producer.submission as submit_module
from producer.decode import VideoInfo
from producer.handoff import EnqueueWhenDecoded
from producer.streaming import StreamingEnqueue
from runtime.settings import Settings
from schemas import messages
from schemas.errors import JobFailed, PromptError, VideoError
from schemas.prompts import ObjectPrompt
from tests.videos import disc_center

N = 12
SIZE = (64, 48)


def prompt(frame_idx: int = 0, obj_id: int = 1) -> ObjectPrompt:
    x, y = disc_center(frame_idx, N, SIZE)
    return ObjectPrompt(obj_id, frame_idx, ((x, y),), (1,))


def header_job(*prompts: ObjectPrompt, job_id: str = "j") -> messages.JobMessage:
    return messages.JobMessage(job_id=job_id, frames_dir=f"jobs/{job_id}/frames", num_frames=N, width=SIZE[0],
                               height=SIZE[1], fps=10.0, prompts=prompts or (prompt(),), source="v.mp4")


class Recorder:
    """An enqueue that only records the jobs it was given."""

    def __init__(self, result: bool = True) -> None:
        self.jobs: list[messages.JobMessage] = []
        self.result = result

    def __call__(self, job: messages.JobMessage) -> bool:
        self.jobs.append(job)
        return self.result


# ---- the --no-stream hand-off: pure ------------------------------------------------------------------

def test_no_stream_enqueues_the_exact_job_once_decoded(tmp_path: Path) -> None:
    enqueue = Recorder()
    handoff = EnqueueWhenDecoded(header_job(), tmp_path / "frames", enqueue)
    assert handoff.decoded(VideoInfo(num_frames=7, width=62, height=46, fps=5.0, source="v.mp4"))
    [job] = enqueue.jobs
    assert (job.num_frames, job.width, job.height, job.fps) == (7, 62, 46, 5.0)
    assert job.frames_stream == "" and job.producer_ttl_s == 0  # not streamed: the worker reads a finished dir
    assert handoff.enqueued and handoff.tried_enqueue


def test_no_stream_says_when_the_job_already_existed(tmp_path: Path) -> None:
    handoff = EnqueueWhenDecoded(header_job(), tmp_path / "frames", Recorder(result=False))
    assert not handoff.decoded(VideoInfo(num_frames=N, width=SIZE[0], height=SIZE[1], fps=10.0, source="v.mp4"))


@pytest.mark.parametrize("tried, error, frames_stay", [
    (False, VideoError("corrupt"), False),  # never enqueued: nothing may stay
    (False, KeyboardInterrupt(), False),
    (True, redis.exceptions.OutOfMemoryError("OOM"), False),  # the script refused it: never enqueued
    (True, PromptError("bad"), False),
    (True, redis.ConnectionError("reset"), True),  # may have been enqueued: a worker may need them
    (True, KeyboardInterrupt(), True),
])
def test_no_stream_abandon_removes_the_frames_of_a_job_never_enqueued(
    tmp_path: Path, tried: bool, error: BaseException, frames_stay: bool
) -> None:
    frames_dir = tmp_path / "jobs/j/frames"
    frames_dir.mkdir(parents=True)
    handoff = EnqueueWhenDecoded(header_job(), frames_dir, Recorder())
    handoff.tried_enqueue = tried
    handoff.abandon(error)
    assert frames_dir.exists() == frames_stay
    assert (tmp_path / "jobs/j").exists() == frames_stay  # the emptied job directory goes too


# ---- the streaming hand-off, one decoded batch at a time -------------------------------------------

@pytest.mark.integration
def test_streaming_announces_each_batch_and_enqueues_once_the_prompted_frames_are_there(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    enqueue = Recorder()
    handoff = StreamingEnqueue(redis_client, settings, header_job(prompt(0), prompt(4, obj_id=2)),
                               tmp_path / "frames", enqueue)
    stream = settings.keys.frames("j")
    assert handoff.need == 5
    handoff.on_frames(3)
    assert not enqueue.jobs and handoff.announced == 3
    handoff.on_frames(6)
    handoff.on_frames(9)
    [job] = enqueue.jobs  # once, with the frames stream and the liveness key's TTL the worker checks
    assert job.frames_stream == stream and job.producer_ttl_s == settings.producer_ttl_s
    ids = [i.decode() for i, _ in redis_client.xrange(stream)]  # type: ignore[union-attr]
    assert ids == [f"{k + 1}-0" for k in range(9)], ids
    assert handoff.decoded(VideoInfo(num_frames=9, width=SIZE[0], height=SIZE[1], fps=10.0, source="v.mp4"))
    assert len(enqueue.jobs) == 1  # already enqueued: not again


@pytest.mark.integration
def test_a_short_video_is_enqueued_when_decoded(settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    """Every frame fits in the first batch, before the last prompt's: the job is enqueued at the end."""
    enqueue = Recorder()
    handoff = StreamingEnqueue(redis_client, settings, header_job(prompt(0), prompt(8, obj_id=2)),
                               tmp_path / "frames", enqueue)
    handoff.on_frames(4)
    assert not enqueue.jobs
    handoff.decoded(VideoInfo(num_frames=4, width=SIZE[0], height=SIZE[1], fps=10.0, source="v.mp4"))
    assert len(enqueue.jobs) == 1


@pytest.mark.integration
def test_an_interrupted_submit_stops_the_decode_at_its_next_batch(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    handoff = StreamingEnqueue(redis_client, settings, header_job(), tmp_path / "frames", Recorder())
    handoff.on_frames(2)
    handoff.interrupted.set()
    with pytest.raises(VideoError, match="submit was interrupted"):
        handoff.on_frames(4)
    assert handoff.announced == 2 and redis_client.xlen(settings.keys.frames("j")) == 2


@pytest.mark.integration
def test_a_job_that_ended_stops_the_decode(settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    handoff = StreamingEnqueue(redis_client, settings, header_job(), tmp_path / "frames", Recorder())
    handoff.on_frames(1)
    redis_client.hset(settings.keys.job("j"), mapping={"state": "cancelled"})
    handoff.checked_at -= 2  # a second has passed since the last look
    with pytest.raises(JobFailed, match="it ended cancelled while its video was being decoded"):
        handoff.on_frames(2)


# ---- one enqueue path for both submits -------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_both_submits_enqueue_through_the_one_atomic_enqueue(
    stream: bool, video: Path, settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = submit_module.enqueue_job
    calls: list[messages.JobMessage] = []

    def spy(client: redis.Redis, keys: object, job: messages.JobMessage, extra: object = None) -> bool:
        calls.append(job)
        return real(client, keys, job, extra)  # type: ignore[arg-type]

    monkeypatch.setattr(submit_module, "enqueue_job", spy)
    done = submit_module.submit(video, [prompt()], settings=settings, client=redis_client, job_id="one", stream=stream)
    assert done.created and done.video is not None and done.video.num_frames == N
    [job] = calls
    assert bool(job.frames_stream) == stream
    assert redis_client.hget(settings.keys.job("one"), "num_frames") == str(N).encode()
    assert redis_client.exists(settings.keys.frames("one")) == stream
    assert not redis_client.exists(settings.keys.producer("one"))  # the liveness key is gone at the end
    assert len(list((settings.storage_root / "jobs/one/frames").glob("*.jpg"))) == N


@pytest.mark.integration
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_the_same_job_id_again_decodes_nothing(
    stream: bool, video: Path, settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert submit_module.submit(video, [prompt()], settings=settings, client=redis_client, job_id="again",
                                stream=stream).created

    def must_not_decode(*args: object, **kwargs: object) -> VideoInfo:
        raise AssertionError("decoded a job that already exists")

    monkeypatch.setattr(submit_module, "extract_frames", must_not_decode)
    again = submit_module.submit(video, [prompt()], settings=settings, client=redis_client, job_id="again",
                                 stream=not stream)
    assert again == submit_module.Submitted("again", created=False)
    assert redis_client.xlen(settings.keys.jobs) == 1


@pytest.mark.integration
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_a_prompt_past_the_end_leaves_nothing_either_way(
    stream: bool, video: Path, settings: Settings, redis_client: redis.Redis
) -> None:
    with pytest.raises(PromptError, match=f"decoded video has {N} frames"):
        submit_module.submit(video, [prompt(), ObjectPrompt(2, N + 3, ((5.0, 5.0),), (1,))], settings=settings,
                             client=redis_client, job_id="past", stream=stream)
    assert not redis_client.exists(settings.keys.job("past"), settings.keys.frames("past"),
                                   settings.keys.producer("past"))
    assert not (settings.storage_root / "jobs/past").exists()


@pytest.mark.integration
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_a_decode_that_fails_before_the_enqueue_leaves_nothing_either_way(
    stream: bool, video: Path, settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    import producer.decode as decode

    real = decode.write_jpeg

    def breaks(path: Path, data: object, quality: int, whole: bool = True) -> None:
        if path.name == "00000.jpg":
            raise VideoError("cannot write 00000.jpg")
        real(path, data, quality, whole)  # type: ignore[arg-type]

    monkeypatch.setattr(decode, "write_jpeg", breaks)
    with pytest.raises(VideoError, match="cannot write"):
        submit_module.submit(video, [prompt()], settings=settings, client=redis_client, job_id="broke", stream=stream)
    assert not redis_client.exists(settings.keys.job("broke"), settings.keys.frames("broke"))
    assert not (settings.storage_root / "jobs/broke").exists()
    assert not [p for p in (settings.storage_root / "jobs").iterdir()]  # no partial directory either


def test_the_decode_runs_off_the_callers_thread_only_when_streamed(tmp_path: Path) -> None:
    """Streamed, decoding ahead runs at a lowered priority in its own thread; `--no-stream` decodes in
    the caller's thread, atomically (a hidden directory renamed when complete), as before."""
    seen: list[tuple[str, bool, bool]] = []
    info = VideoInfo(num_frames=1, width=SIZE[0], height=SIZE[1], fps=10.0, source="v.mp4")

    def extract(*, atomic: bool = True, on_frames: object = None) -> VideoInfo:
        seen.append((threading.current_thread().name, atomic, on_frames is not None))
        return info

    EnqueueWhenDecoded(header_job(), tmp_path, Recorder()).decode(extract)
    StreamingEnqueue(redis.Redis(), Settings.load(environ={}, config_path=None, storage_root=tmp_path),
                     header_job(), tmp_path, Recorder()).decode(extract)
    assert seen == [(threading.current_thread().name, True, False), ("decode", False, True)]
