"""`watch` on a live job (producer/watch_live.py): frames.ndjson appended as the result entries arrive, memory
bounded whatever the number of frames, a restarted watch resuming without duplicates (a line cut short by a
kill truncated away), summary.json at the end; a file job still gets masks.json.

Integration tier: the result streams are written here, as a worker writes them (the message types and
codec of schemas/messages.py, at the entry ids of schemas/names.py), against the real redis-server the
tests start; the last test runs the real pieces (a live ingest and a worker with the fake segmenter)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from producer.enqueue import enqueue
from producer.live_submit import submit_live
from producer.results import FRAMES_NDJSON, SUMMARY_JSON, is_live
from producer.watching import watch
from runtime.settings import Settings
from schemas import messages
from schemas.errors import JobFailed, VsegError
from schemas.names import STARTED_ENTRY_ID, TERMINAL_ENTRY_ID, frame_entry_id, object_entry_id
from schemas.rle import encode_mask, rle_to_json
from tests.fakes import ChaosHooks, ColourSegmenter
from tests.videos import disc_prompt, make_video
from tests.workers import wait_for
from worker.service.loop import Worker

pytestmark = pytest.mark.integration


def noisy_object(obj_id: int, side: int = 64, seed: int = 0) -> messages.ObjectResult:
    """An object whose RLE is long (a noisy mask: a few KB of counts), like a real mask's, only bigger."""
    mask = np.random.default_rng(seed).random((side, side)) < 0.5
    return messages.ObjectResult(obj_id, encode_mask(mask), [0.0, 0.0, float(side), float(side)],
                                 int(mask.sum()), 0.9)


OBJ = noisy_object(1, side=16)


def live_job(client: redis.Redis, settings: Settings, job_id: str) -> None:
    client.hset(settings.keys.job(job_id), mapping={"state": "running", "live": "1"})


def put(client: Any, settings: Settings, job_id: str, entry_id: str, msg: messages.Message) -> None:
    """`msg` at `entry_id` on the job's result stream, as a worker writes it (`client`: a Redis or a pipeline)."""
    client.xadd(settings.keys.results(job_id), messages.encode(msg), id=entry_id)


def frame(job_id: str, k: int, *, skipped: bool = False, obj: messages.ObjectResult = OBJ) -> messages.FrameResult:
    if skipped:
        return messages.FrameResult(job_id, k, (), skipped=True, captured_at=1000.0 + k, pts_s=k / 25)
    return messages.FrameResult(job_id, k, (obj,), captured_at=1000.0 + k, pts_s=k / 25, latency_s=0.05)


def started(job_id: str) -> messages.Started:
    return messages.Started(job_id, "w1", 1, (1,))


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def frame_indices(path: Path) -> list[int]:
    return [line["frame_idx"] for line in lines(path) if line["type"] == "frame"]


def test_frame_lines_appear_while_the_job_runs(settings: Settings, redis_client: redis.Redis,
                                               tmp_path: Path) -> None:
    """The publisher holds the terminal entry back until the observer has read the first frames' lines
    from frames.ndjson, so those lines were written while the job was running."""
    job_id = "cam"
    live_job(redis_client, settings, job_id)
    out = tmp_path / "out"
    seen = threading.Event()  # set by the observer once it has read the 10 frames' lines
    terminal_sent = threading.Event()
    observed: dict[str, Any] = {}
    publisher_client = redis.Redis.from_url(str(settings.redis_url))

    def publish() -> None:
        put(publisher_client, settings, job_id, STARTED_ENTRY_ID, started(job_id))
        for k in range(10):
            if k == 3:
                put(publisher_client, settings, job_id, object_entry_id(3, 0),
                    messages.ObjectChange(job_id, 7, 3, "added", source="auto", label="cat"))
            put(publisher_client, settings, job_id, frame_entry_id(k), frame(job_id, k, skipped=k == 5))
        observed["gate_opened"] = seen.wait(60)  # the job goes on only once the lines were seen
        terminal_sent.set()
        put(publisher_client, settings, job_id, TERMINAL_ENTRY_ID, messages.Completed(job_id, "", 10, 1))

    def observe() -> None:  # `tail -f`: reads the file as it grows, until the 10 frames' lines are there
        path = out / FRAMES_NDJSON
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not terminal_sent.is_set():
            text = path.read_text() if path.exists() else ""
            complete = [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]
            if sum(line["type"] == "frame" for line in complete) == 10:
                observed["lines"] = complete
                observed["before_terminal"] = not terminal_sent.is_set()
                seen.set()
                return
            time.sleep(0.01)  # polling interval of the tail, not a wait for the writer

    threads = [threading.Thread(target=publish), threading.Thread(target=observe)]
    for t in threads:
        t.start()
    try:
        result = watch(job_id, out, settings=settings, client=redis_client, progress=False, timeout_s=60)
    finally:
        seen.set()
        for t in threads:
            t.join(60)
        publisher_client.close()
    assert observed.get("before_terminal") is True and observed["gate_opened"], observed.keys()
    seen_lines = observed["lines"]
    assert seen_lines[0] == {"type": "job", "job_id": job_id}
    assert [line["type"] for line in seen_lines] == ["job", "frame", "frame", "frame", "object", *["frame"] * 7]
    assert [line["frame_idx"] for line in seen_lines[1:]] == [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9]
    first = seen_lines[1]
    assert first == {"type": "frame", "frame_idx": 0, "objects": [{
        "obj_id": 1, "mask": rle_to_json(OBJ.mask), "bbox_xyxy": OBJ.bbox_xyxy, "area": OBJ.area, "score": 0.9}],
        "captured_at": 1000.0, "pts_s": 0.0, "latency_s": 0.05}
    assert seen_lines[7] == {"type": "frame", "frame_idx": 5, "objects": [], "skipped": True,
                             "captured_at": 1005.0, "pts_s": 0.2}
    assert seen_lines[4] | {"at": 0} == {
        "type": "object", "obj_id": 7, "frame_idx": 3, "change": "added", "note": "", "source": "auto",
        "label": "cat", "request_id": "", "requested_frame": -1, "at": 0, "entry_id": object_entry_id(3, 0)}
    assert lines(out / FRAMES_NDJSON) == seen_lines  # the terminal entry added no line
    assert result.masks_json == out / FRAMES_NDJSON and result.num_frames == 10 and result.render_path is None
    summary = json.loads((out / SUMMARY_JSON).read_text())
    assert summary["state"] == "completed" and summary["error"] is None and summary["last_frame_idx"] == 9
    assert not (out / "masks.json").exists()


def _traced_peak(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_bounded_over_thousands_of_frames(settings: Settings, redis_client: redis.Redis,
                                                       tmp_path: Path) -> None:
    """Peak Python memory while watching N frames does not grow with N: 3000 frames' watch peaks at about
    what 600 frames' does, and far below the JSON those frames make (which masks.json would hold)."""
    big = noisy_object(1, side=64)  # about 2 KB of JSON a frame

    def publish(job_id: str, n: int) -> None:
        live_job(redis_client, settings, job_id)
        pipe = redis_client.pipeline(transaction=False)
        put(pipe, settings, job_id, STARTED_ENTRY_ID, started(job_id))
        for k in range(n):
            put(pipe, settings, job_id, frame_entry_id(k), frame(job_id, k, obj=big))
        put(pipe, settings, job_id, TERMINAL_ENTRY_ID, messages.Completed(job_id, "", n, 1))
        pipe.execute()

    peaks = {}
    for job_id, n in (("small", 600), ("large", 3000)):
        publish(job_id, n)
        out = tmp_path / job_id
        peaks[n] = _traced_peak(lambda job_id=job_id, out=out: watch(
            job_id, out, settings=settings, client=redis_client, progress=False, timeout_s=60))
        assert frame_indices(out / FRAMES_NDJSON) == list(range(n))
    written = (tmp_path / "large" / FRAMES_NDJSON).stat().st_size
    assert written > 5_000_000, written  # the test means something: 3000 frames are megabytes of JSON
    assert peaks[3000] < written / 6, (peaks, written)
    assert peaks[3000] < 1.5 * peaks[600] + 200_000, peaks  # 5x the frames, not 5x the memory


def test_restarted_watch_resumes_after_a_kill_without_duplicates(settings: Settings, redis_client: redis.Redis,
                                                                 tmp_path: Path) -> None:
    """A watch stopped while the job runs (here by its timeout), the file then left with a half-written line
    (as a kill mid-write leaves it), the job going on meanwhile: the next watch cuts the half line and
    appends the rest, every frame once."""
    job_id = "cam"
    live_job(redis_client, settings, job_id)
    out = tmp_path / "out"
    put(redis_client, settings, job_id, STARTED_ENTRY_ID, started(job_id))
    for k in range(5):
        put(redis_client, settings, job_id, frame_entry_id(k), frame(job_id, k))
    with pytest.raises(TimeoutError):
        watch(job_id, out, settings=settings, client=redis_client, progress=False, timeout_s=0.3)
    path = out / FRAMES_NDJSON
    assert frame_indices(path) == [0, 1, 2, 3, 4]
    whole = path.read_bytes()
    with path.open("ab") as f:
        f.write(b'{"type":"frame","frame_idx":5,"objects":[{"obj_id":1,"ma')  # killed mid-write
    for k in range(5, 10):
        put(redis_client, settings, job_id, frame_entry_id(k), frame(job_id, k))
    put(redis_client, settings, job_id, TERMINAL_ENTRY_ID, messages.Completed(job_id, "", 10, 1))

    result = watch(job_id, out, settings=settings, client=redis_client, progress=False, timeout_s=30)
    assert path.read_bytes().startswith(whole)
    assert frame_indices(path) == list(range(10)) and result.num_frames == 10
    assert [line["type"] for line in lines(path)].count("job") == 1


def _cut_stream(redis_client: redis.Redis, settings: Settings, job_id: str) -> None:
    """A live job's whole stream: frames, object changes between them (two on one frame), a skipped frame."""
    live_job(redis_client, settings, job_id)
    put(redis_client, settings, job_id, STARTED_ENTRY_ID, started(job_id))
    for k in range(6):
        if k == 3:
            put(redis_client, settings, job_id, object_entry_id(3, 0), messages.ObjectChange(job_id, 2, 3, "added"))
            put(redis_client, settings, job_id, object_entry_id(3, 1),
                messages.ObjectChange(job_id, 3, 3, "refused", note="no"))
        if k == 5:
            put(redis_client, settings, job_id, object_entry_id(5, 0), messages.ObjectChange(job_id, 2, 5, "lost"))
        put(redis_client, settings, job_id, frame_entry_id(k), frame(job_id, k, skipped=k == 4))
    put(redis_client, settings, job_id, TERMINAL_ENTRY_ID, messages.Completed(job_id, "", 6, 2))


def test_resume_from_every_cut_gives_the_same_file(settings: Settings, redis_client: redis.Redis,
                                                   tmp_path: Path) -> None:
    """Cut a complete frames.ndjson after each of its lines, with and without half of the next line: the
    restarted watch makes exactly the complete file again (whatever kind of line it resumes after)."""
    job_id = "cam"
    _cut_stream(redis_client, settings, job_id)
    watch(job_id, tmp_path / "whole", settings=settings, client=redis_client, progress=False, timeout_s=30)
    whole = (tmp_path / "whole" / FRAMES_NDJSON).read_bytes()
    whole_lines = whole.splitlines(keepends=True)
    assert [json.loads(line)["type"] for line in whole_lines] == [
        "job", "frame", "frame", "frame", "object", "object", "frame", "frame", "object", "frame"]
    for k in range(len(whole_lines) + 1):
        for half in (False, True):
            if half and k == len(whole_lines):
                continue
            out = tmp_path / f"cut{k}{'h' if half else ''}"
            out.mkdir()
            cut = b"".join(whole_lines[:k]) + (whole_lines[k][: len(whole_lines[k]) // 2] if half else b"")
            (out / FRAMES_NDJSON).write_bytes(cut)
            watch(job_id, out, settings=settings, client=redis_client, progress=False, timeout_s=30)
            assert (out / FRAMES_NDJSON).read_bytes() == whole, (k, half)


@pytest.mark.parametrize("theirs, message", [
    (b'{"type":"job","job_id":"other"}\n{"type":"frame","frame_idx":0,"objects":[]}\n',
     "holds the results of job 'other'"),
    (b'{"type":"frame","frame_idx":0,"objects":[]}\n', "does not start with the `job` line"),
    (b'{"type":"job","job_id":"cam"}\nnot json\n', "its last line is not one this watch wrote"),
])
def test_a_file_watch_did_not_write_is_not_appended_to(settings: Settings, redis_client: redis.Redis,
                                                       tmp_path: Path, theirs: bytes, message: str) -> None:
    _cut_stream(redis_client, settings, "cam")
    out = tmp_path / "out"
    out.mkdir()
    (out / FRAMES_NDJSON).write_bytes(theirs)
    with pytest.raises(VsegError, match=message):
        watch("cam", out, settings=settings, client=redis_client, progress=False, timeout_s=30)
    assert (out / FRAMES_NDJSON).read_bytes() == theirs


@pytest.mark.parametrize("terminal, state, error", [
    (messages.Failed("cam", "the source was down for 30 s", "SourceLost"), "failed", "the source was down for 30 s"),
    (messages.Dead("cam", "boom", attempts=3), "dead", "dead-lettered after 3 attempts: boom"),
    (messages.Cancelled("cam", frames_done=5), "cancelled", "cancelled after 5 frames"),
])
def test_a_live_job_that_fails_ends_with_its_summary(settings: Settings, redis_client: redis.Redis, tmp_path: Path,
                                                     terminal: messages.Terminal, state: str, error: str) -> None:
    job_id = "cam"
    live_job(redis_client, settings, job_id)
    put(redis_client, settings, job_id, STARTED_ENTRY_ID, started(job_id))
    for k in range(5):
        put(redis_client, settings, job_id, frame_entry_id(k), frame(job_id, k))
    put(redis_client, settings, job_id, TERMINAL_ENTRY_ID, terminal)
    out = tmp_path / "out"

    with pytest.raises(JobFailed) as failed:
        watch(job_id, out, settings=settings, client=redis_client, progress=False, timeout_s=30)
    assert failed.value.error == error
    summary = json.loads((out / SUMMARY_JSON).read_text())
    assert summary == {
        "job_id": job_id, "state": state, "error": error, "error_type": failed.value.error_type, "num_frames": 5,
        "last_frame_idx": 4, "frames_file": FRAMES_NDJSON, "render_path": None, "random_weights": False,
        "timings_s": {}}
    assert frame_indices(out / FRAMES_NDJSON) == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in out.iterdir()) == [FRAMES_NDJSON, SUMMARY_JSON]  # no temporary file left


def test_a_completed_live_job_names_its_render(settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    job_id = "cam"
    live_job(redis_client, settings, job_id)
    put(redis_client, settings, job_id, frame_entry_id(0), frame(job_id, 0))
    put(redis_client, settings, job_id, TERMINAL_ENTRY_ID,
        messages.Completed(job_id, "renders/cam/index.m3u8", 1, 1, random_weights=True))
    result = watch(job_id, tmp_path / "out", settings=settings, client=redis_client, progress=False, timeout_s=30)
    render = (settings.storage_root / "renders/cam/index.m3u8").resolve()
    assert result.render_path == render and result.random_weights
    summary = json.loads((tmp_path / "out" / SUMMARY_JSON).read_text())
    assert summary["render_path"] == str(render) and summary["state"] == "completed" and summary["random_weights"]


def test_frames_trimmed_before_watch_read_them_are_a_warning(settings: Settings, redis_client: redis.Redis,
                                                            tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A live job's result stream is trimmed: a watch that comes late starts at the oldest frame still there."""
    job_id = "cam"
    live_job(redis_client, settings, job_id)
    for k in range(100, 103):
        put(redis_client, settings, job_id, frame_entry_id(k), frame(job_id, k))
    put(redis_client, settings, job_id, TERMINAL_ENTRY_ID, messages.Completed(job_id, "", 103, 1))
    watch(job_id, tmp_path / "out", settings=settings, client=redis_client, progress=False, timeout_s=30)
    assert frame_indices(tmp_path / "out" / FRAMES_NDJSON) == [100, 101, 102]
    assert "frames 0..99 were trimmed" in caplog.text


def test_a_live_job_is_told_by_its_job_message_too(settings: Settings, redis_client: redis.Redis) -> None:
    """Before the producer has set the hash's `live` field, the job message on the jobs stream says it."""
    for job_id, live in (("cam", True), ("file", False)):
        job = messages.JobMessage(job_id, f"frames/{job_id}", 1, 64, 48, 25.0, (), live=live)
        assert enqueue(redis_client, settings.keys, job)
        assert not redis_client.hexists(settings.keys.job(job_id), "live")
        assert is_live(job_id, settings=settings, client=redis_client) is live
    redis_client.hset(settings.keys.job("file"), "live", "1")
    assert is_live("file", settings=settings, client=redis_client)


def test_a_file_job_still_writes_masks_json(settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    job_id = "clip"
    redis_client.hset(settings.keys.job(job_id), mapping={"state": "running"})
    put(redis_client, settings, job_id, STARTED_ENTRY_ID, messages.Started(job_id, "w1", 3, (1,)))
    for k in range(3):
        if k == 2:
            put(redis_client, settings, job_id, object_entry_id(2, 0),
                messages.ObjectChange(job_id, 2, 0, "added", request_id="r1"))
            put(redis_client, settings, job_id, object_entry_id(2, 1),
                messages.FrameUpdate(job_id, 0, (noisy_object(2, side=8, seed=1),), request_id="r1"))
        put(redis_client, settings, job_id, frame_entry_id(k), messages.FrameResult(job_id, k, (OBJ,)))
    put(redis_client, settings, job_id, TERMINAL_ENTRY_ID,
        messages.Completed(job_id, "renders/clip.mp4", 3, 2, timings_s={"total": 1.5}))

    out = tmp_path / "out"
    result = watch(job_id, out, settings=settings, client=redis_client, progress=False, timeout_s=30)
    assert result.masks_json == out / "masks.json" and result.num_frames == 3
    assert result.render_path == (settings.storage_root / "renders/clip.mp4").resolve()
    obj = {"obj_id": 1, "mask": rle_to_json(OBJ.mask), "bbox_xyxy": OBJ.bbox_xyxy, "area": OBJ.area, "score": 0.9}
    late = noisy_object(2, side=8, seed=1)
    late_json = {"obj_id": 2, "mask": rle_to_json(late.mask), "bbox_xyxy": late.bbox_xyxy, "area": late.area,
                 "score": 0.9}
    assert json.loads(result.masks_json.read_text()) == {
        "job_id": job_id, "num_frames": 3, "obj_ids": [1], "random_weights": False,
        "render_path": "renders/clip.mp4", "timings_s": {"total": 1.5},
        "frames": [{"frame_idx": 0, "objects": [obj, late_json]}, {"frame_idx": 1, "objects": [obj]},
                   {"frame_idx": 2, "objects": [obj]}],
        "changes": [{"obj_id": 2, "frame_idx": 0, "change": "added", "note": ""}]}
    assert sorted(p.name for p in out.iterdir()) == ["masks.json"]


def test_watch_follows_a_real_live_job_from_ingest_to_its_end(settings: Settings, redis_client: redis.Redis,
                                                              tmp_path: Path) -> None:
    """The real pieces: a file played at its own rate as a live job, a worker slower than the source (so it
    may skip frames), and watch writing every frame's line once, in order (skipped ones too), then the summary."""
    n, size = 60, (96, 64)
    video = make_video(tmp_path / "v.mp4", num_frames=n, size_wh=size, fps=30)
    settings = dataclasses.replace(settings, max_latency_s=0.5, live_segment_s=1.0, live_playlist_size=3,
                                   producer_ttl_s=3.0)
    ingest = threading.Thread(target=submit_live, args=(video, [disc_prompt(1, 0, n, size)]), daemon=True,
                              kwargs={"settings": settings, "job_id": "cam", "realtime": True, "render": False})
    ingest.start()
    wait_for(lambda: redis_client.hget(settings.keys.job("cam"), "live") == b"1", 20, "the live job enqueued")
    worker = Worker(settings=settings, segmenter=ChaosHooks(ColourSegmenter(), delay_s=0.08), client=redis_client,
                    name="live-worker")
    worker_thread = threading.Thread(target=worker.run, kwargs={"burst": True}, daemon=True)
    worker_thread.start()
    out = tmp_path / "out"
    try:
        result = watch("cam", out, settings=settings, client=redis_client, progress=False, timeout_s=30)
    finally:
        ingest.join(30)
        worker_thread.join(60)
    frame_lines = [line for line in lines(out / FRAMES_NDJSON) if line["type"] == "frame"]
    assert 0 < result.num_frames <= n  # the frames the producer announced (it may drop some the worker never took)
    assert [line["frame_idx"] for line in frame_lines] == list(range(result.num_frames))
    assert any(line["objects"] for line in frame_lines)
    summary = json.loads((out / SUMMARY_JSON).read_text())
    assert summary["state"] == "completed" and summary["num_frames"] == result.num_frames
    assert result.render_path is None and summary["render_path"] is None  # masks only: watch is what is tested
