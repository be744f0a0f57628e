"""A full disk (ENOSPC, EDQUOT) under STORAGE_ROOT: one clear line, retried at the worker, nothing half-written kept.

The disk is a real tmpfs a few dozen KiB big, mounted over the test's STORAGE_ROOT (the tests run as root
in CI). Where mounting is not allowed, the same tests run with the writes patched to fail with ENOSPC.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest
import redis

from producer.decode import extract_frames
from producer.submission import submit
from runtime.faults import disk_fault, redact_url, redis_fault
from runtime.logs import exit_code
from runtime.settings import Settings
from schemas import messages
from schemas.errors import (
    DiskFull,
    InfrastructureError,
    RedisFull,
    RedisUnavailable,
    RetryableError,
    VsegError,
)
from schemas.names import TERMINAL_ENTRY_ID
from schemas.prompts import ObjectPrompt
from tests.fakes import ColourSegmenter
from tests.videos import disc_center, make_video
from tests.workers import ROOT, wait_for, worker_env
from worker.model.segment import InProcessModel, Session
from worker.output.draw import partial_path
from worker.output.render import MaskVideoWriter
from worker.service.loop import Worker
from worker.sources.frames import FrameSource

N = 24
SIZE = (160, 120)  # each frame's JPEG (< 2 KiB) takes one 4 KiB page of a tmpfs; the MP4 about 20 KiB


# ---- a small disk ---------------------------------------------------------------------------------

class Disk:
    """A file system at `root` that a test fills and frees: a tmpfs (`mounted`), or, where mounting is
    not allowed, a flag that patched writes obey."""

    def __init__(self, root: Path, mounted: bool) -> None:
        self.root = root
        self.mounted = mounted
        self.full = False
        self.filler = root / ".filler"

    def fill(self, leave_bytes: int = 0) -> None:
        """Take all the free space but `leave_bytes` (rounded to pages on a tmpfs)."""
        self.full = True
        if not self.mounted:
            return
        reserve = self.root / ".reserve"
        if leave_bytes:
            reserve.write_bytes(b"\0" * leave_bytes)
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        finally:
            os.close(fd)
        reserve.unlink(missing_ok=True)

    def free(self) -> None:
        self.full = False
        self.filler.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free


@contextmanager
def small_disk(root: Path, size_kib: int, kind: str = "any") -> Iterator[Disk]:
    """A tmpfs of `size_kib` mounted at `root` (unmounted after). `kind` "any": an unmounted Disk (patched
    writes) where mount fails; "patched": never mounted; "tmpfs": mounted or the test does not run, loudly:
    skipped with mount's reason as a user without the right to mount, failed as root (CI runs as root, so
    the checks that need a real disk, such as space coming back once a file is closed, always run there)."""
    mounted, why = False, "patched writes asked for"
    if kind != "patched":
        try:
            mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(root)],
                                   capture_output=True, text=True, timeout=30)
            mounted, why = mount.returncode == 0, mount.stderr.strip() or f"mount exited {mount.returncode}"
        except (OSError, subprocess.SubprocessError) as e:
            why = str(e)
    if kind == "tmpfs" and not mounted:
        message = f"this check needs a real small disk and mounting a tmpfs failed: {why}"
        if os.geteuid() == 0:
            pytest.fail(message + " (running as root, as CI does: the mount must work here)")
        pytest.skip(message + " (run as root to mount one)")
    try:
        yield Disk(root, mounted)
    finally:
        if mounted and subprocess.run(["umount", str(root)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(root)], capture_output=True, timeout=30)


class _FullContainer:
    """Without a tmpfs: an output container whose writes fail as PyAV's do on a full disk."""

    def __init__(self, real: Any, disk: Disk) -> None:
        self._real, self._disk = real, disk

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _enospc(self) -> OSError:
        return av.error.OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._real.name)

    def mux(self, packet: Any) -> None:
        if self._disk.full:
            raise self._enospc()
        self._real.mux(packet)

    def close(self) -> None:
        self._real.close()
        if self._disk.full:
            raise self._enospc()


def patch_renders_unless_mounted(disk: Disk, monkeypatch: pytest.MonkeyPatch) -> None:
    if disk.mounted:
        return
    real_open = av.open

    def open_(*args: Any, **kwargs: Any) -> Any:
        container = real_open(*args, **kwargs)
        return _FullContainer(container, disk) if kwargs.get("mode") == "w" else container

    monkeypatch.setattr(av, "open", open_)


# Without a tmpfs the producer's process runs this: every JPEG after the first few fails with ENOSPC.
_PRODUCER_ON_A_FULL_DISK = """
import errno, os, sys, threading
import producer.decode as decode
real, lock, written = decode._write_file, threading.Lock(), [0]
def write_file(path, payload, shown=None):
    with lock:
        written[0] += 1
        full = written[0] > int(os.environ["VSEG_TEST_FULL_AFTER"])
    if full:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(shown or path))
    real(path, payload, shown)
decode._write_file = write_file
from producer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_producer(disk: Disk, settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m producer ARGS` against `settings`' Redis and STORAGE_ROOT (warnings and errors only)."""
    env = {**worker_env(settings), "VSEG_LOG_LEVEL": "WARNING", "VSEG_TEST_FULL_AFTER": "8"}
    program = ["-m", "producer"] if disk.mounted else ["-c", _PRODUCER_ON_A_FULL_DISK]
    return subprocess.run([sys.executable, *program, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


_PROGRESS_BAR = re.compile(r"^decode \S+: +\d+%\|")  # tqdm's bar (the CLI asks for one whatever TQDM_DISABLE says)


def assert_one_disk_full_line(stderr: str, storage_root: Path) -> str:
    """stderr says it in one line (beside the decoder's progress bar), with no traceback."""
    lines = [line for line in stderr.strip().splitlines() if line.strip() and not _PROGRESS_BAR.match(line)]
    assert len(lines) == 1, stderr
    line = lines[0]
    assert "Traceback" not in stderr and "ERROR" in line, stderr
    assert f"no space left on the disk of STORAGE_ROOT {storage_root} (" in line, line
    assert "MiB free" in line and "free space there or point STORAGE_ROOT at a larger volume" in line, line
    return line


# ---- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """More frames than a 64 KiB disk holds."""
    return make_video(tmp_path_factory.mktemp("v") / "long.mp4", num_frames=80, size_wh=SIZE, fps=10)


def state(client: redis.Redis, settings: Settings, job_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(settings.keys.job(job_id)).items()}


def results(client: redis.Redis, settings: Settings, job_id: str) -> list[tuple[str, messages.Message]]:
    return [(i.decode(), messages.decode(f)) for i, f in client.xrange(settings.keys.results(job_id))]


def partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if "partial" in p.name or p.name.endswith(".tmp")]


class FreesSpaceOnAttempt(InProcessModel):
    """ColourSegmenter that frees the disk when attempt `attempt` starts (None: never)."""

    name = ColourSegmenter.name
    random_weights = False
    device = "cpu"

    def __init__(self, disk: Disk, attempt: int | None) -> None:
        self.disk, self.attempt, self.calls = disk, attempt, 0
        self.inner = ColourSegmenter()

    def open_session(self, frames: FrameSource, prompts: Sequence[ObjectPrompt], *, width: int = 0,
                     height: int = 0, start_frame: int = 0) -> Session:
        self.calls += 1
        if self.calls == self.attempt:
            self.disk.free()
        return self.inner.open_session(frames, prompts, width=width, height=height, start_frame=start_frame)


class RetryLog(logging.Handler):
    """Collects the worker's records, and what is on disk when the retry is logged (the attempt is over)."""

    def __init__(self, disk: Disk) -> None:
        super().__init__(logging.DEBUG)
        self.disk = disk
        self.records: list[logging.LogRecord] = []
        self.at_retry: list[tuple[list[Path], int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if record.levelno >= logging.WARNING and "transient DiskFull" in record.getMessage():
            self.at_retry.append((partials(self.disk.root), self.disk.free_bytes()))


@contextmanager
def worker_log(disk: Disk) -> Iterator[RetryLog]:
    handler = RetryLog(disk)
    logger = logging.getLogger("worker")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def assert_one_line_records(log: RetryLog) -> None:
    """Everything the worker said at WARNING and above is one line without a stack trace."""
    for record in log.records:
        if record.levelno >= logging.WARNING:
            assert record.exc_info is None and "\n" not in record.getMessage(), record.getMessage()


# ---- unit: runtime/faults.py ----------------------------------------------------------------------

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_fault_names_storage_root_free_space_and_the_fix(tmp_path: Path, code: int) -> None:
    where = tmp_path / "jobs/j/frames/00003.jpg"
    full = disk_fault(OSError(code, os.strerror(code)), where, tmp_path)
    assert isinstance(full, DiskFull) and isinstance(full, RetryableError) and isinstance(full, OSError)
    assert full.errno == code and exit_code(full) == 1
    text = str(full)
    assert "\n" not in text and "Errno" not in text
    assert f"STORAGE_ROOT {tmp_path} (" in text and f"writing {where})" in text
    assert " MiB free;" in text and "point STORAGE_ROOT at a larger volume" in text
    assert disk_fault(full, where, tmp_path) is full  # already classified: unchanged
    assert f"STORAGE_ROOT {where} (" in str(disk_fault(OSError(code, "full"), where))  # no root given: where


def test_disk_fault_ignores_other_errors(tmp_path: Path) -> None:
    assert disk_fault(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
    assert disk_fault(FileNotFoundError(errno.ENOENT, "gone"), tmp_path) is None
    assert disk_fault(OSError("no errno"), tmp_path) is None
    assert disk_fault(ValueError("not an OSError"), tmp_path) is None


def test_disk_fault_with_free_space_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_usage(path: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(shutil, "disk_usage", no_usage)
    full = disk_fault(OSError(errno.ENOSPC, "full"), tmp_path / "x", tmp_path)
    assert full is not None and "free space unknown" in str(full)


@pytest.mark.parametrize("url, shown", [
    ("redis://user:s3cret@redis.example:6380/0", "redis://user:***@redis.example:6380/0"),
    ("rediss://:s3cret@redis.example/2", "rediss://:***@redis.example/2"),
    ("redis://default:s3cret@10.0.0.5", "redis://default:***@10.0.0.5"),
    ("redis://localhost:6379/0", "redis://localhost:6379/0"),
    ("redis://user@localhost:6379/0", "redis://user@localhost:6379/0"),
])
def test_redact_url_never_shows_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)


def test_redis_fault_classifies_and_redacts() -> None:
    url = "redis://app:s3cret@redis.example:6380/0"
    down = redis_fault(redis.ConnectionError("Error 111 connecting to redis.example:6380. Connection refused."), url)
    assert isinstance(down, RedisUnavailable) and isinstance(down, RetryableError)
    assert "redis://app:***@redis.example:6380/0" in str(down) and "Connection refused" in str(down)
    assert "check that redis-server is running" in str(down)
    hung = redis_fault(redis.TimeoutError("Timeout reading from socket"), url)
    assert isinstance(hung, RedisUnavailable)
    for oom in (redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"),
                redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'.")):
        full = redis_fault(oom, url)
        assert isinstance(full, RedisFull) and "maxmemory" in str(full) and "VSEG_RESULTS_TTL_S" in str(full)
    for fault in (down, hung, full):
        assert fault is not None and "s3cret" not in str(fault) and "\n" not in str(fault)
    assert redis_fault(redis.ResponseError("WRONGTYPE Operation against a key"), url) is None
    assert redis_fault(ValueError("not Redis"), url) is None
    already = RedisFull("already one line")
    assert redis_fault(already, url) is already
    assert isinstance(already, InfrastructureError) and isinstance(already, VsegError)


# ---- unit: the decoder and the renderer on a full disk --------------------------------------------

def test_extract_frames_into_a_full_disk_raises_disk_full_and_keeps_nothing(
        long_video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "disk"
    root.mkdir()
    with small_disk(root, 64) as disk:
        if not disk.mounted:
            import producer.decode as decode

            real, calls = decode._write_file, [0]

            def write_file(path: Path, payload: bytes, shown: Path | None = None) -> None:
                calls[0] += 1
                if calls[0] > 8:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))  # a file begun, as a full disk leaves it
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(shown or path))
                real(path, payload, shown)

            monkeypatch.setattr(decode, "_write_file", write_file)
        for atomic in (True, False):
            out = root / f"frames-{atomic}"
            with pytest.raises(DiskFull) as raised:
                extract_frames(long_video, out, atomic=atomic, storage_root=root)
            assert f"STORAGE_ROOT {root} (" in str(raised.value) and "MiB free" in str(raised.value)
            assert raised.value.errno == errno.ENOSPC and isinstance(raised.value.__cause__, OSError)
            assert not partials(root), partials(root)  # no half JPEG, no hidden partial directory
            if atomic:
                assert not out.exists()
            else:  # streaming: the whole JPEGs written stay for the caller (submit) to announce or remove
                assert all(cv2.imread(str(p)) is not None for p in out.iterdir())
                shutil.rmtree(out)


def _noise(rng: np.random.Generator, k: int) -> np.ndarray:
    return rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)


@pytest.mark.parametrize("disk_kind", ["tmpfs", "patched"])
@pytest.mark.parametrize("fails_in", ["write", "close"])
def test_mask_video_writer_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails_in: str,
                                          disk_kind: str) -> None:
    """ENOSPC while muxing frames (PyAV's buffer flushed) or while writing the trailer on close: DiskFull
    naming STORAGE_ROOT, the `.partial` file gone and (on the tmpfs) its space freed (the container closed too)."""
    root = tmp_path / "storage"
    (root / "jobs/j").mkdir(parents=True)
    rng = np.random.default_rng(0)
    masks = np.zeros((1, 240, 320), bool)
    with small_disk(root / "jobs/j", 64, disk_kind) as disk:
        patch_renders_unless_mounted(disk, monkeypatch)
        free_before = disk.free_bytes()
        writer = MaskVideoWriter(root / "jobs/j/render.mp4", fps=10, width=320, height=240, partial_tag="w1")
        tmp = partial_path(root / "jobs/j/render.mp4", "w1")
        with pytest.raises(DiskFull) as raised:
            if fails_in == "write":  # noise frames: 64 KiB is full within a few frames
                disk.full = True
                for k in range(200):
                    writer.write(_noise(rng, k), [1], masks)
            else:  # one noise frame leaves the encoder only when it is flushed, on close
                writer.write(_noise(rng, 0), [1], masks)
                disk.full = True
                writer.close()
        text = str(raised.value)
        assert f"STORAGE_ROOT {root} (" in text and f"writing {tmp})" in text and "MiB free" in text
        assert isinstance(raised.value.__cause__, av.error.OSError) and raised.value.__cause__.errno == errno.ENOSPC
        assert not tmp.exists() and not (root / "jobs/j/render.mp4").exists()
        if disk_kind == "tmpfs":
            assert disk.mounted and disk.free_bytes() == free_before  # the file's pages are back: descriptor closed
        writer.abort()  # what the job runner does next: harmless
        with pytest.raises(ValueError, match="aborted"):
            writer.close()  # never pretends the MP4 is there


# ---- integration: the producer --------------------------------------------------------------------

@pytest.fixture(scope="module")
def longer_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Long enough (a few seconds of decoding) for a test to fill the disk while it is decoded."""
    return make_video(tmp_path_factory.mktemp("v") / "longer.mp4", num_frames=1500, size_wh=SIZE, fps=25)


@pytest.mark.integration
def test_submit_onto_a_full_disk_prints_one_line_and_the_job_fails(
        long_video: Path, longer_video: Path, settings: Settings, redis_client: redis.Redis) -> None:
    """The disk fills up after the streamed job was enqueued (filled by the test once the job exists:
    deterministic, where a disk that fills by itself may do so before the first frame is reported,
    and then nothing is enqueued at all)."""
    root = settings.storage_root
    with small_disk(root, 4096) as disk:
        x, y = disc_center(0, 80, SIZE)
        if disk.mounted:
            env = {**worker_env(settings), "VSEG_LOG_LEVEL": "WARNING"}
            proc = subprocess.Popen([sys.executable, "-m", "producer", "submit", str(longer_video), "--point",
                                     f"1:{x:.0f},{y:.0f}", "--job-id", "full"], cwd=ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            wait_for(lambda: redis_client.exists(settings.keys.job("full")), timeout_s=30, what="the job enqueued")
            disk.fill()
            out, err = proc.communicate(timeout=60)
            done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        else:
            done = run_producer(disk, settings, "submit", str(long_video), "--point", f"1:{x:.0f},{y:.0f}",
                                "--job-id", "full")
        assert done.returncode == 1, done.stderr
        assert done.stdout == ""  # no job id printed: the submit failed
        line = assert_one_disk_full_line(done.stderr, root)
        assert f"writing {root}/jobs/full/frames/" in line

        # the job was enqueued with its first frames, then the error marker told the worker
        markers = [f for _, f in redis_client.xrange(settings.keys.frames("full"))]
        assert markers and b"error" in markers[-1] and b"DiskFull: no space left" in markers[-1][b"error"]
        assert not partials(root), partials(root)

        disk.free()  # the worker's own writes are not what this test is about
        Worker(settings=settings, segmenter=ColourSegmenter(), client=redis_client, name="w").run(burst=True)
        job = state(redis_client, settings, "full")
        assert job["state"] == "failed", job
        assert "the producer failed while decoding: DiskFull: no space left on the disk of STORAGE_ROOT" in job["error"]
        assert isinstance(results(redis_client, settings, "full")[-1][1], messages.Failed)
        assert not (root / "jobs/full/frames").exists()  # removed once both sides were done
        assert not partials(root), partials(root)


@pytest.mark.integration
def test_submit_no_stream_onto_a_full_disk_enqueues_nothing(
        long_video: Path, settings: Settings, redis_client: redis.Redis) -> None:
    root = settings.storage_root
    with small_disk(root, 64) as disk:
        done = run_producer(disk, settings, "submit", str(long_video), "--point", "1:20,60", "--job-id", "whole",
                            "--no-stream")
        assert done.returncode == 1, done.stderr
        assert_one_disk_full_line(done.stderr, root)
        assert not redis_client.exists(settings.keys.job("whole"))
        assert not (root / "jobs/whole/frames").exists() and not partials(root)


def test_extract_into_a_full_dir_prints_one_line(long_video: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with small_disk(out, 64) as disk:  # no Redis needed: `extract` only decodes
        done = run_producer(disk, Settings.load(environ={}, storage_root=tmp_path / "unused"), "extract",
                            str(long_video), str(out / "frames"))
        assert done.returncode == 1, done.stderr
        assert_one_disk_full_line(done.stderr, out / "frames")  # `extract` has no STORAGE_ROOT: names DIR
        assert not list(out.iterdir())  # no partial directory left


# ---- integration: the worker ----------------------------------------------------------------------

def _submit_then_fill(disk: Disk, video: Path, prompt: list[ObjectPrompt], settings: Settings,
                      client: redis.Redis, job_id: str) -> None:
    """The whole video's frames on the disk, then the disk filled but 8 KiB: the MP4 does not fit."""
    submit(video, prompt, settings=settings, client=client, job_id=job_id, stream=False)
    disk.fill(leave_bytes=8192)


@pytest.mark.integration
@pytest.mark.parametrize("disk_kind", ["tmpfs", "patched"])
def test_render_onto_a_full_disk_is_retried_and_completes_once_space_is_freed(
        video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis,
        monkeypatch: pytest.MonkeyPatch, disk_kind: str) -> None:
    root = settings.storage_root
    # resume off: the retry runs the model again from frame 0 (the resumed path: tests/test_resume.py)
    fast = replace(settings, retry_backoff_s=0.01, max_attempts=3, resume="off")
    with small_disk(root, 256, disk_kind) as disk:
        patch_renders_unless_mounted(disk, monkeypatch)
        _submit_then_fill(disk, video, prompt, fast, redis_client, "retry")
        free_when_full = disk.free_bytes()
        segmenter = FreesSpaceOnAttempt(disk, attempt=2)
        with worker_log(disk) as log:
            Worker(settings=fast, segmenter=segmenter, client=redis_client, name="w").run(burst=True)

        assert segmenter.calls == 2
        job = state(redis_client, fast, "retry")
        assert job["state"] == "completed" and job["attempt"] == "2", job
        ids = [i for i, _ in results(redis_client, fast, "retry")]
        assert ids == ["0-1"] + [f"{k + 1}-0" for k in range(N)] + [TERMINAL_ENTRY_ID], ids
        done = results(redis_client, fast, "retry")[-1][1]
        assert isinstance(done, messages.Completed) and done.num_frames == N
        assert (root / done.render_path).is_file() and (root / done.render_path).stat().st_size > 8192
        assert not partials(root), partials(root)

        retries = [r.getMessage() for r in log.records
                   if r.levelno == logging.WARNING and "transient DiskFull" in r.getMessage()]
        assert len(retries) == 1, retries
        assert retries[0].startswith("job retry attempt 1: transient DiskFull: no space left on the disk of "
                                     f"STORAGE_ROOT {root} ("), retries[0]
        assert "MiB free" in retries[0] and "retrying in" in retries[0]
        assert_one_line_records(log)
        # when attempt 1 was over: no partial MP4, and the space it had taken back
        (left, free_then), = log.at_retry
        assert left == [], left
        if disk_kind == "tmpfs":
            assert disk.mounted and free_then >= free_when_full


@pytest.mark.integration
def test_render_onto_a_disk_that_stays_full_ends_dead_with_the_disk_full_error(
        video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    root = settings.storage_root
    fast = replace(settings, retry_backoff_s=0.01, max_attempts=2, resume="off")
    with small_disk(root, 256) as disk:
        patch_renders_unless_mounted(disk, monkeypatch)
        _submit_then_fill(disk, video, prompt, fast, redis_client, "stuck")
        segmenter = FreesSpaceOnAttempt(disk, attempt=None)
        with worker_log(disk) as log:
            Worker(settings=fast, segmenter=segmenter, client=redis_client, name="w").run(burst=True)

        assert segmenter.calls == 2  # max_attempts runs, then dead-lettered
        job = state(redis_client, fast, "stuck")
        assert job["state"] == "dead", job
        assert job["error"].startswith(f"DiskFull: no space left on the disk of STORAGE_ROOT {root} ("), job
        dead = results(redis_client, fast, "stuck")[-1][1]
        assert isinstance(dead, messages.Dead) and "DiskFull: no space left" in dead.error and dead.attempts == 2
        (_, letter), = redis_client.xrange(fast.keys.dead)
        assert b"DiskFull: no space left" in letter[b"error"] and letter[b"attempts"] == b"2"
        assert not partials(root), partials(root)
        assert not (root / "jobs/stuck/render.mp4").exists()
        assert not (root / "jobs/stuck/frames").exists()  # a dead job's frames go too
        assert len(log.at_retry) == 2 and all(left == [] for left, _ in log.at_retry), log.at_retry
        assert_one_line_records(log)
