"""Live jobs end to end (producer/live_submit.py, worker/sources/live.py): a file played at its own rate
(`--live`) stands in for a camera. A worker slower than the source stays within max_latency_s by
skipping frames, and every announced frame gets exactly one entry; JPEGs go as they are processed and
the result stream is trimmed; the render is a rolling HLS playlist ended by #EXT-X-ENDLIST; stop and
--duration end a job gracefully; a prompt on a live job applies at the next frame processed; a worker
killed mid-job is followed by one that resumes at the live edge with the same object ids."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from bench.bench_live import disk_bytes, rss_bytes
from producer.control import request_stop
from producer.live_submit import submit_live
from runtime.settings import Settings
from schemas import messages
from schemas.errors import InputError, PromptError, SourceUnavailable
from schemas.names import TERMINAL_ENTRY_ID
from schemas.prompts import ObjectPrompt
from tests.videos import disc_prompt, make_video
from tests.workers import ROOT, WorkerProcess, start_worker, wait_for, worker_env

pytestmark = pytest.mark.integration

FPS = 30
N = 90  # 3 s at 30 fps
SIZE = (96, 64)


@pytest.fixture
def live_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, max_latency_s=0.5, live_segment_s=1.0, live_playlist_size=3,
                               producer_ttl_s=3.0)


def point(obj_id: int = 1) -> ObjectPrompt:
    return disc_prompt(obj_id, 0, N, SIZE)


def entries(client: redis.Redis, settings: Settings, job: str) -> list[messages.Message]:
    return [messages.decode(f) for _, f in client.xrange(settings.keys.results(job))]


def frames_of(results: list[messages.Message]) -> list[messages.FrameResult]:
    return [m for m in results if isinstance(m, messages.FrameResult)]


def terminal(client: redis.Redis, settings: Settings, job: str) -> messages.Message | None:
    got = client.xrange(settings.keys.results(job), min=TERMINAL_ENTRY_ID, max=TERMINAL_ENTRY_ID)
    return messages.decode(got[0][1]) if got else None



def ingest(settings: Settings, video: Path, job: str, **kwargs: object) -> threading.Thread:
    def run() -> None:
        submit_live(video, [point()], settings=settings, job_id=job, realtime=True, **kwargs)  # type: ignore[arg-type]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_worker_slower_than_the_source_keeps_up_by_skipping(video: Path, live_settings: Settings,
                                                               redis_client: redis.Redis,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    settings = dataclasses.replace(live_settings, live_results_maxlen=40)
    producer = ingest(settings, video, "cam")
    wait_for(lambda: redis_client.exists(settings.keys.job("cam")), 20, "the live job enqueued")
    worker = start_worker(settings, redis_client, delay_s=0.08, name="live-worker")  # about 12 frames/s against 30
    frames_dir = settings.storage_root / "jobs" / "cam" / "frames"
    held = []
    while producer.is_alive():
        held.append(len(list(frames_dir.glob("*.jpg"))) if frames_dir.exists() else 0)
        time.sleep(0.1)
    worker.join(60)
    done = terminal(redis_client, settings, "cam")
    assert isinstance(done, messages.Completed), done
    state = redis_client.hgetall(settings.keys.job("cam"))
    dropped_at_ingest = int(state.get(b"dropped_at_ingest", 0))  # while the worker was not taking frames yet
    assert done.num_frames + dropped_at_ingest == N and done.render_path == "jobs/cam/live/index.m3u8"
    announced = done.num_frames
    results = frames_of(entries(redis_client, settings, "cam"))
    # the stream is trimmed to about live_results_maxlen (Redis trims whole nodes of 100 entries)
    assert len(results) <= announced and redis_client.xlen(settings.keys.results("cam")) <= 40 + 100
    assert [r.frame_idx for r in results] == list(range(announced - len(results), announced))  # newest, once each
    skipped = [r for r in results if r.skipped]
    processed = [r for r in results if not r.skipped]
    assert processed and (skipped or dropped_at_ingest), "a worker at 12 frames/s against 30 fps cannot take all"
    assert all(not r.objects and r.captured_at is not None and r.latency_s is None for r in skipped)
    for r in processed:
        assert [o.obj_id for o in r.objects] == [1]
        assert r.captured_at is not None and r.pts_s is not None and r.latency_s is not None
        assert r.latency_s <= settings.max_latency_s + 0.5, f"frame {r.frame_idx}: {r.latency_s:.2f} s behind"
    progress = [m for m in (messages.decode(f) for _, f in redis_client.xrange(settings.keys.events))
                if isinstance(m, messages.Progress) and m.job_id == "cam"]
    assert progress and progress[-1].latency_p95_s is not None
    assert progress[-1].latency_p50_s <= progress[-1].latency_p95_s <= settings.max_latency_s + 0.5
    state = redis_client.hgetall(settings.keys.job("cam"))
    assert int(state[b"dropped"]) == progress[-1].dropped and state[b"live"] == b"1"
    # the final figures: the last progress event and the hash agree with `completed`
    assert progress[-1].frames_done == int(state[b"frames_done"]) == done.num_frames
    assert progress[-1].source_state == "up" and state[b"source_state"] == b"up"
    assert progress[-1].dropped_at_ingest <= dropped_at_ingest  # as of the last frame announced
    from producer.cli import main as producer_main

    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    assert producer_main(["status", "cam"]) == 0  # `producer status` shows what keeping up cost
    shown = capsys.readouterr().out
    dropped = progress[-1].dropped
    assert f"live: processed {announced - dropped:,} of {announced:,} frames published ({announced:,} announced); " \
           f"{dropped:,} skipped to keep up, {dropped_at_ingest:,} dropped at ingest" in shown, shown
    assert "latency: p50 " in shown and "source state: up; down 0 time(s) in all" in shown, shown
    # JPEGs go as frames are processed (and are bounded: live_buffer_frames untaken); all once the job is over
    assert max(held) <= 2 * settings.live_buffer_frames + 6, held
    assert not frames_dir.exists()
    playlist = settings.storage_root / done.render_path
    text = playlist.read_text()
    assert "#EXT-X-ENDLIST" in text and len(list(playlist.parent.glob("*.ts"))) <= settings.live_playlist_size + 1


def test_a_queued_live_job_holds_at_most_live_buffer_frames_and_starts_at_the_live_edge(
        video: Path, live_settings: Settings, redis_client: redis.Redis) -> None:
    """No worker for its first 1.5 s (a job waiting in the queue): its producer never holds more than
    live_buffer_frames JPEGs and drops the rest at ingest (counted); the worker then starts at a fresh frame,
    not at frame 0, and its `started` entry says which (the submit-time prompt applied there)."""
    settings = dataclasses.replace(live_settings, live_buffer_frames=4)
    frames_dir = settings.storage_root / "jobs" / "queued" / "frames"
    producer = ingest(settings, video, "queued")
    wait_for(lambda: redis_client.exists(settings.keys.job("queued")), 20, "the live job enqueued")
    held: list[int] = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        held.append(len(list(frames_dir.glob("*.jpg"))))
        time.sleep(0.02)
    assert max(held) <= 4, held
    worker = start_worker(settings, redis_client, delay_s=0.0, name="live-worker")
    producer.join(30)
    worker.join(30)
    done = terminal(redis_client, settings, "queued")
    assert isinstance(done, messages.Completed), done
    state = redis_client.hgetall(settings.keys.job("queued"))
    dropped_at_ingest = int(state[b"dropped_at_ingest"])
    assert dropped_at_ingest > 0 and done.num_frames + dropped_at_ingest == N
    results = entries(redis_client, settings, "queued")
    started = [m for m in results if isinstance(m, messages.Started)]
    frames = frames_of(results)
    first = next(r for r in frames if not r.skipped)
    assert len(started) == 1 and started[0].first_frame == first.frame_idx > 0
    assert all(r.skipped for r in frames[:first.frame_idx])  # passed over: the stale frames of the wait
    assert [o.obj_id for o in first.objects] == [1]  # the submit-time prompt, applied at the first frame processed


def test_a_file_job_never_skips(video: Path, live_settings: Settings, redis_client: redis.Redis) -> None:
    from producer.submission import submit

    submit(video, [point()], settings=live_settings, job_id="file")
    start_worker(live_settings, redis_client, delay_s=0.02, name="live-worker").join(60)
    results = frames_of(entries(redis_client, live_settings, "file"))
    assert len(results) == N and not any(r.skipped for r in results)
    assert all(r.captured_at is None and r.latency_s is None for r in results)


def test_stop_ends_a_live_job_gracefully(video: Path, live_settings: Settings, redis_client: redis.Redis) -> None:
    producer = ingest(live_settings, video, "stopped")
    wait_for(lambda: redis_client.exists(live_settings.keys.job("stopped")), 20, "the live job enqueued")
    worker = start_worker(live_settings, redis_client, delay_s=0.0, name="live-worker")
    wait_for(lambda: int(redis_client.hget(live_settings.keys.job("stopped"), "frames_done") or 0) >= 10, 20,
             "frames published")
    assert "stop requested" in request_stop("stopped", settings=live_settings, client=redis_client)
    producer.join(10)
    assert not producer.is_alive(), "the producer stops ingesting within a second or so"
    worker.join(30)
    done = terminal(redis_client, live_settings, "stopped")
    assert isinstance(done, messages.Completed) and 10 <= done.num_frames < N
    results = frames_of(entries(redis_client, live_settings, "stopped"))
    assert [r.frame_idx for r in results] == list(range(done.num_frames))  # the last frames published too
    assert "#EXT-X-ENDLIST" in (live_settings.storage_root / done.render_path).read_text()
    assert "already completed" in request_stop("stopped", settings=live_settings, client=redis_client)


def test_stop_refuses_a_file_job_and_an_unknown_one(video: Path, live_settings: Settings,
                                                    redis_client: redis.Redis) -> None:
    from producer.submission import submit
    from schemas.errors import UnknownJobError

    submit(video, [point()], settings=live_settings, job_id="a-file")
    with pytest.raises(InputError, match="not a live job.*producer cancel a-file"):
        request_stop("a-file", settings=live_settings, client=redis_client)
    with pytest.raises(UnknownJobError):
        request_stop("nothing-here", settings=live_settings, client=redis_client)


def test_duration_ends_a_live_job_after_that_many_seconds(video: Path, live_settings: Settings,
                                                          redis_client: redis.Redis) -> None:
    producer = ingest(live_settings, video, "short", duration_s=1.0)
    wait_for(lambda: redis_client.exists(live_settings.keys.job("short")), 20, "the live job enqueued")
    worker = start_worker(live_settings, redis_client, delay_s=0.0, name="live-worker")
    producer.join(20)
    worker.join(30)
    done = terminal(redis_client, live_settings, "short")
    assert isinstance(done, messages.Completed)
    assert FPS * 0.7 <= done.num_frames <= FPS * 1.3 + 1  # about one second of a 30 fps source


def test_a_prompt_on_a_live_job_applies_at_the_next_frame_processed(video: Path, live_settings: Settings,
                                                                    redis_client: redis.Redis) -> None:
    from producer.running_prompts import add_prompts

    producer = ingest(live_settings, video, "prompted")
    wait_for(lambda: redis_client.exists(live_settings.keys.job("prompted")), 20, "the live job enqueued")
    worker = start_worker(live_settings, redis_client, delay_s=0.02, name="live-worker")
    wait_for(lambda: int(redis_client.hget(live_settings.keys.job("prompted"), "frames_done") or 0) >= 10, 20,
             "frames published")
    reply = add_prompts("prompted", [disc_prompt(2, 3, N, SIZE, dy=4)], settings=live_settings,
                        client=redis_client, wait_s=10)
    producer.join(20)
    worker.join(30)
    changes = [m for m in entries(redis_client, live_settings, "prompted") if isinstance(m, messages.ObjectChange)]
    assert [c.change for c in changes] == ["added"] and changes[0].obj_id == 2
    assert changes[0].frame_idx > 10 and "next frame it processes" in changes[0].note
    assert "next frame it processes" in reply.describe()  # the client is told where it applied
    after = [r for r in frames_of(entries(redis_client, live_settings, "prompted"))
             if r.frame_idx >= changes[0].frame_idx and not r.skipped]
    assert after and all([o.obj_id for o in r.objects] == [1, 2] for r in after)


def test_a_live_job_takes_prompts_on_its_first_frame_only(video: Path, live_settings: Settings,
                                                          redis_client: redis.Redis) -> None:
    with pytest.raises(PromptError, match="first frame.*producer prompt JOB --now"):
        submit_live(video, [disc_prompt(1, 5, N, SIZE)], settings=live_settings, job_id="late", realtime=True)
    assert not redis_client.exists(live_settings.keys.job("late"))
    assert not (live_settings.storage_root / "jobs" / "late").exists()


def test_a_source_that_cannot_be_opened_leaves_nothing(live_settings: Settings, redis_client: redis.Redis) -> None:
    settings = dataclasses.replace(live_settings, source_open_timeout_s=1.0)
    with pytest.raises(SourceUnavailable, match="127.0.0.1:9"):
        submit_live("tcp://user:secret@127.0.0.1:9", [point()], settings=settings, job_id="nothing")
    assert not redis_client.exists(settings.keys.job("nothing"))
    assert not (settings.storage_root / "jobs" / "nothing").exists()


def test_the_command_line_prints_the_live_job_id_at_once_and_keeps_ingesting(video: Path, live_settings: Settings,
                                                                             redis_client: redis.Redis) -> None:
    env = {**worker_env(live_settings), "VSEG_PRODUCER_TTL_S": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "producer", "submit", str(video), "--live", "--duration", "30",
                             "--point", "1:20,20", "--job-id", "cli-live"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "cli-live"  # before the ingest ends
        assert proc.poll() is None
        assert redis_client.hget(live_settings.keys.job("cli-live"), "live") == b"1"
        proc.send_signal(signal.SIGINT)  # Ctrl-C on a live job stops it: the end marker, exit 0
        assert proc.wait(15) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
    last = redis_client.xrevrange(live_settings.keys.frames("cli-live"), count=1)
    assert b"end" in last[0][1]


def test_sigterm_to_a_live_submit_ends_its_job_gracefully(video: Path, live_settings: Settings,
                                                          redis_client: redis.Redis) -> None:
    """What `docker stop` and systemd send: the end marker, exit 0, and the worker completes the job (no
    "producer lost" 20 s later)."""
    env = {**worker_env(live_settings), "VSEG_PRODUCER_TTL_S": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "producer", "submit", str(video), "--live", "--duration", "60",
                             "--point", "1:20,20", "--job-id", "term-live"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker: threading.Thread | None = None
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "term-live"
        worker = start_worker(live_settings, redis_client, delay_s=0.0, name="live-worker")  # burst: it ends with the job
        wait_for(lambda: int(redis_client.hget(live_settings.keys.job("term-live"), "frames_done") or 0) >= 3,
                 timeout_s=30, what="frames published")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, proc.stderr.read() if proc.stderr else ""
        err = proc.stderr.read() if proc.stderr else ""
        assert "SIGTERM: stopping the job" in err and "Traceback" not in err, err
        worker.join(30)
        assert not worker.is_alive()
    finally:
        proc.kill()
    done = terminal(redis_client, live_settings, "term-live")
    assert isinstance(done, messages.Completed), done
    assert b"end" in redis_client.xrevrange(live_settings.keys.frames("term-live"), count=1)[0][1]


def test_credentials_by_reference_never_reach_argv_logs_or_redis(live_settings: Settings, tmp_path: Path) -> None:
    """--username with --password-env: the password is put into the URL in the producer only. The source here
    refuses the connection, so the submit exits 3 with the URL in its message: redacted."""
    from tests.live_servers import free_port

    url = f"tcp://127.0.0.1:{free_port()}"
    env = {**worker_env(live_settings), "VSEG_SOURCE_OPEN_TIMEOUT_S": "1", "CAM_PW": "pa:ss/w@rd"}
    done = subprocess.run([sys.executable, "-m", "producer", "-v", "submit", url, "--username", "viewer", "--password-env",
                           "CAM_PW", "--point", "1:20,20"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 3, done.stderr
    assert "pa:ss" not in done.stderr and "pa%3Ass" not in done.stderr and "viewer" not in done.stderr, done.stderr
    assert "tcp://***@127.0.0.1:" in done.stderr, done.stderr
    for argv, says in [(["--username", "u", "--password-env", "NOPE"], "--password-env NOPE: that environment variable"),
                       (["--password-env", "CAM_PW"], "a password needs --username"),
                       (["--username", "u", "--password-file", str(tmp_path / "missing")], "cannot read it")]:
        bad = subprocess.run([sys.executable, "-m", "producer", "submit", url, *argv, "--point", "1:20,20"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and says in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    from producer.source_urls import has_password, with_credentials

    assert with_credentials("rtsp://cam:554/s", "a b", "p@ss") == "rtsp://a%20b:p%40ss@cam:554/s"
    assert has_password("rtsp://u:p@cam/s") and not has_password("rtsp://u@cam/s")
    with pytest.raises(InputError, match="already has credentials"):
        with_credentials("rtsp://u:p@cam/s", "v", "w")


@pytest.mark.parametrize("args, code, says", [
    (["--duration", "0"], 2, "seconds must be > 0"),
    (["ftp://user:secret@host/v.mp4"], 2, "ftp:// is not a source this service reads"),
    (["tcp://127.0.0.1:{port}"], 3, "cannot open live source tcp://127.0.0.1:"),
    (["RTSP://127.0.0.1:{port}/cam"], 3, "cannot open live source rtsp://127.0.0.1:"),  # not "protocol not found"
])
def test_bad_live_input_exits_2_and_an_unreachable_source_3(args: list[str], code: int, says: str,
                                                           video: Path, live_settings: Settings) -> None:
    from tests.live_servers import free_port

    port = free_port()
    argv = [a.format(port=port) for a in args]
    if argv[0].startswith("--"):
        argv = [str(video), "--live", *argv]
    env = {**worker_env(live_settings), "VSEG_SOURCE_OPEN_TIMEOUT_S": "1"}
    done = subprocess.run([sys.executable, "-m", "producer", "submit", *argv, "--point", "1:20,20"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == code and says in done.stderr, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "secret" not in done.stderr and done.stdout == ""


@pytest.mark.slow
def test_kill_9_mid_live_resumes_at_the_live_edge_with_the_same_objects(video: Path, live_settings: Settings,
                                                                       redis_client: redis.Redis,
                                                                       tmp_path: Path) -> None:
    long_video = make_video(tmp_path / "long.mp4", num_frames=240, size_wh=SIZE, fps=FPS)
    env = {"VSEG_MAX_LATENCY_S": "0.5", "VSEG_LIVE_SEGMENT_S": "1"}
    first = WorkerProcess(live_settings, "w1", tmp_path, lease_s=1.0, delay_s=0.02, env=env)
    try:
        _resumed_at_the_live_edge(live_settings, redis_client, tmp_path, long_video, first, env)
    finally:
        first.kill()


def _resumed_at_the_live_edge(live_settings: Settings, redis_client: redis.Redis, tmp_path: Path, long_video: Path,
                              first: WorkerProcess, env: dict[str, str]) -> None:
    wait_for(lambda: redis_client.exists(live_settings.keys.worker_health("w1")), 60, "the first worker started")
    producer = threading.Thread(target=lambda: submit_live(
        long_video, [disc_prompt(1, 0, 240, SIZE)], settings=live_settings, job_id="resumed", realtime=True),
        daemon=True)
    producer.start()
    try:
        wait_for(lambda: int(redis_client.hget(live_settings.keys.job("resumed"), "frames_done") or 0) >= 30, 30,
                 "the first worker under way")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{first.log()[-3000:]}") from None
    second = WorkerProcess(live_settings, "w2", tmp_path, lease_s=1.0, delay_s=0.02, env=env)  # idle: w1 holds it
    try:
        wait_for(lambda: redis_client.exists(live_settings.keys.worker_health("w2")), 60, "the second worker started")
        first.kill()
        killed_at = int(redis_client.hget(live_settings.keys.job("resumed"), "frames_done") or 0)
        announced_at_kill = redis_client.xlen(live_settings.keys.frames("resumed"))
        # the source goes on meanwhile: a dozen frames announced past the kill, whatever the machine's speed
        wait_for(lambda: redis_client.xlen(live_settings.keys.frames("resumed")) >= announced_at_kill + 12, 20,
                 "frames announced after the kill")
        producer.join(30)
        wait_for(lambda: terminal(redis_client, live_settings, "resumed") is not None, 30, "the job ended")
        second.signal(signal.SIGTERM)
        second.wait(20)
    finally:
        second.kill()
    done = terminal(redis_client, live_settings, "resumed")
    assert isinstance(done, messages.Completed), (done, second.log())
    results = entries(redis_client, live_settings, "resumed")
    frames = frames_of(results)
    dropped_at_ingest = int(redis_client.hget(live_settings.keys.job("resumed"), "dropped_at_ingest") or 0)
    assert done.num_frames + dropped_at_ingest == 240  # every frame of the source announced or dropped at ingest
    assert [r.frame_idx for r in frames] == list(range(done.num_frames))  # every announced frame exactly once
    started = [m for m in (messages.decode(f) for _, f in redis_client.xrange(live_settings.keys.events))
               if isinstance(m, messages.Started) and m.job_id == "resumed"]
    assert started[-1].attempt == 2 and started[-1].resume_from >= killed_at
    gap = [r for r in frames if r.frame_idx >= started[-1].resume_from]
    first_processed = next(r for r in gap if not r.skipped)
    assert first_processed.frame_idx > started[-1].resume_from + 10, "resumed at the live edge, not where it stopped"
    assert all(r.skipped for r in gap if r.frame_idx < first_processed.frame_idx)
    assert all([o.obj_id for o in r.objects] == [1] for r in gap if not r.skipped)  # the same object id goes on


@pytest.mark.slow
def test_six_thousand_live_frames_keep_disk_rss_and_redis_memory_flat(live_settings: Settings,
                                                                      redis_client: redis.Redis,
                                                                      tmp_path: Path) -> None:
    """A short version of bench/bench_live.py (its soak runs longer): 6,000 frames of a small source at 250 fps."""
    total, fps, size = 6_000, 250, (64, 48)
    video = make_video(tmp_path / "long.mp4", num_frames=total, size_wh=size, fps=fps)
    settings = dataclasses.replace(live_settings, live_results_maxlen=500, live_frames_maxlen=500,
                                   progress_every=250)
    producer = threading.Thread(target=lambda: submit_live(
        video, [disc_prompt(1, 0, total, size)], settings=settings, job_id="soak", realtime=True), daemon=True)
    producer.start()
    wait_for(lambda: redis_client.exists(settings.keys.job("soak")), 20, "the live job enqueued")
    env = {"VSEG_LIVE_RESULTS_MAXLEN": "500", "VSEG_LIVE_FRAMES_MAXLEN": "500", "VSEG_PROGRESS_EVERY": "250",
           "VSEG_MAX_LATENCY_S": "0.5"}
    worker = WorkerProcess(settings, "soak", tmp_path, lease_s=2.0, delay_s=0.0, env=env)
    job_dir = settings.storage_root / "jobs" / "soak"
    samples: list[tuple[int, int, int, int]] = []  # frames announced, worker RSS, disk, Redis memory
    try:
        while producer.is_alive():
            announced = int((redis_client.xrevrange(settings.keys.frames("soak"), count=1) or [(b"0-0", {})])[0][0]
                            .split(b"-")[0])
            samples.append((announced, rss_bytes(worker.proc.pid), disk_bytes(job_dir),
                            int(redis_client.info("memory")["used_memory"])))
            time.sleep(1.0)
        wait_for(lambda: terminal(redis_client, settings, "soak") is not None, 60, "the job ended")
        worker.signal(signal.SIGTERM)
        worker.wait(20)
    finally:
        worker.kill()  # never left running to take the next test's jobs
    done = terminal(redis_client, settings, "soak")
    dropped_at_ingest = int(redis_client.hget(settings.keys.job("soak"), "dropped_at_ingest") or 0)
    assert isinstance(done, messages.Completed) and done.num_frames + dropped_at_ingest == total, \
        (done, worker.log()[-2000:])
    early = next(s for s in samples if s[0] >= 1_500)
    late = samples[-1]
    assert late[0] >= 0.9 * done.num_frames
    assert late[1] <= early[1] * 1.10 + 8 * 2**20, f"worker RSS grew from {early[1]} to {late[1]} bytes"
    assert max(s[2] for s in samples) <= 20 * 2**20, "the job's files (JPEGs, HLS window) stay bounded"
    assert late[3] <= early[3] * 1.10 + 2**20, f"Redis memory grew from {early[3]} to {late[3]} bytes"
    assert redis_client.xlen(settings.keys.results("soak")) <= 500 + 200


def test_on_a_live_job_adding_correcting_and_removing_an_object_leaves_the_others_exact(video: Path, live_settings: Settings,
                                                                          redis_client: redis.Redis) -> None:
    """Exactness on a live job: the disc's masks are the same whether or not another object was added,
    corrected and removed meanwhile, on every frame both runs processed (a live job samples its source at
    the model's pace, so the frames processed may differ a little between two runs)."""
    from producer.running_prompts import add_prompts, remove_object
    from schemas.rle import decode_mask

    settings = dataclasses.replace(live_settings, max_latency_s=30.0)
    masks: dict[str, dict[int, object]] = {}
    for job in ("alone", "changed"):
        producer = ingest(settings, video, job)
        wait_for(lambda job=job: redis_client.exists(settings.keys.job(job)), 20, "the live job enqueued")
        worker = start_worker(settings, redis_client, delay_s=0.0, name="live-worker")
        if job == "changed":
            wait_for(lambda: int(redis_client.hget(settings.keys.job("changed"), "frames_done") or 0) >= 20, 20, "frames")
            add_prompts(job, [disc_prompt(2, 0, N, SIZE, dy=3)], settings=settings, client=redis_client, wait_s=10)
            wait_for(lambda: int(redis_client.hget(settings.keys.job("changed"), "frames_done") or 0) >= 35, 20, "frames")
            add_prompts(job, [disc_prompt(2, 0, N, SIZE, dy=-3)], settings=settings, client=redis_client, wait_s=10)
            wait_for(lambda: int(redis_client.hget(settings.keys.job("changed"), "frames_done") or 0) >= 50, 20, "frames")
            remove_object(job, 2, settings=settings, client=redis_client, wait_s=10)
        producer.join(20)
        worker.join(30)
        results = frames_of(entries(redis_client, settings, job))
        done = terminal(redis_client, settings, job)
        assert isinstance(done, messages.Completed) and [r.frame_idx for r in results] == list(range(done.num_frames))
        # by the frame's place in the source (its pts): frames dropped at ingest differ between two runs
        masks[job] = {round(r.pts_s or 0, 3): decode_mask(o.mask) for r in results for o in r.objects if o.obj_id == 1}
    changed = [c for c in entries(redis_client, settings, "changed") if isinstance(c, messages.ObjectChange)]
    assert [c.change for c in changed] == ["added", "corrected", "removed"]
    both = sorted(masks["alone"].keys() & masks["changed"].keys())
    assert len(both) >= N // 2, both
    assert all((masks["alone"][k] == masks["changed"][k]).all() for k in both)  # type: ignore[attr-defined]
