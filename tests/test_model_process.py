"""The model in its own process (worker/model/process.py), driven through the fake colour segmenter
and its fault-injection hooks: same results as in the worker's process, early stops, errors that
keep their type, a child that dies mid-job, and a child that cannot start."""

from __future__ import annotations

import json
import os
import pickle
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from runtime.connection import worker_socket_timeout_s
from runtime.settings import Settings
from schemas.errors import ConfigError, RetryableError
from tests.fakes import FROM_ENV, ChaosHooks, ColourSegmenter
from tests.test_fake_segmenter import prompts, write_frames
from worker.model.host import ModelHost
from worker.model.process import ModelProcess, ModelProcessDied, use_model_process
from worker.model.process_messages import (
    DirSpec,
    Done,
    Frame,
    OpenSession,
    StreamSpec,
    describe_frames,
    open_frames,
)
from worker.model.segment import FrameMasks
from worker.sources.frames import DirFrames, StreamedFrames

N = 8
FAKE = Settings(model_process="on", segmenter=FROM_ENV, device="cpu")  # tests.fakes in the child, faults from its env


@pytest.fixture(scope="module")
def model() -> Iterator[ModelProcess]:
    proc = ModelProcess(FAKE)
    yield proc
    proc.close()


@pytest.fixture
def frames(tmp_path: Path) -> DirFrames:
    write_frames(tmp_path / "frames")
    return DirFrames(tmp_path / "frames", N)


def test_results_equal_those_of_the_segmenter_in_this_process(model: ModelProcess, frames: DirFrames) -> None:
    assert model.name == ColourSegmenter().name and model.device == "cpu" and model.pid != os.getpid()
    ours = list(model.segment(frames, prompts(), width=160, height=120))
    theirs = list(ColourSegmenter().segment(frames, prompts(), width=160, height=120))
    assert [o.frame_idx for o in ours] == [t.frame_idx for t in theirs] == list(range(N))
    for o, t in zip(ours, theirs):
        assert o.obj_ids == t.obj_ids
        assert o.masks.dtype == bool and np.array_equal(o.masks, t.masks)  # bit-packed across, unpacked exactly
        assert np.array_equal(o.scores, t.scores)


def test_a_job_stopped_early_leaves_the_process_ready_for_the_next(model: ModelProcess, frames: DirFrames) -> None:
    pid = model.pid
    outputs = model.segment(frames, prompts(), width=160, height=120)
    assert [next(outputs).frame_idx for _ in range(2)] == [0, 1]
    outputs.close()  # what the worker's loop does on cancel, lost lease or hand-back
    assert [o.frame_idx for o in model.segment(frames, prompts(), width=160, height=120)] == list(range(N))
    assert model.pid == pid and model.restarts == 0


def test_an_error_in_the_model_process_is_raised_as_itself(frames: DirFrames, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VSEG_FAKE_FAULTS", json.dumps({"*": {"transient_at": 3}}))  # RetryableError on frame 3, once
    model = ModelProcess(FAKE)
    try:
        seen = []
        with pytest.raises(RetryableError, match="injected transient"):
            for out in model.segment(frames, prompts(), width=160, height=120):
                seen.append(out.frame_idx)
        assert seen == [0, 1, 2]
        assert len(list(model.segment(frames, prompts(), width=160, height=120))) == N  # the retry runs
    finally:
        model.close()


def test_a_model_process_that_dies_fails_the_attempt_and_a_new_one_takes_over(
    frames: DirFrames, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VSEG_FAKE_FAULTS", json.dumps({"*": {"crash_at": 4}}))  # the child SIGKILLs itself on frame 4
    model = ModelProcess(FAKE)
    try:
        first = model.pid
        with pytest.raises(ModelProcessDied, match=r"died during job \(exit code -9\)"):
            list(model.segment(frames, prompts(), width=160, height=120))
        assert issubclass(ModelProcessDied, RetryableError)  # so the worker retries the job
        monkeypatch.setenv("VSEG_FAKE_FAULTS", "{}")  # the next child is started without the fault
        assert len(list(model.segment(frames, prompts(), width=160, height=120))) == N
        assert model.restarts == 1 and model.pid != first
    finally:
        model.close()


def test_a_model_process_killed_between_jobs_is_replaced_before_the_next(frames: DirFrames) -> None:
    model = ModelProcess(FAKE)
    try:
        first = model._proc
        os.kill(first.pid, signal.SIGKILL)
        first.join(10)
        assert len(list(model.segment(frames, prompts(), width=160, height=120))) == N  # no attempt lost
        assert model.restarts == 1 and model.pid != first.pid
        # dying in the instant between that check and the job's hand-over fails the attempt (retried)
        second = model._proc
        os.kill(second.pid, signal.SIGKILL)
        second.join(10)
        second.is_alive = lambda: True  # type: ignore[method-assign] - as if it died right after the check
        with pytest.raises(ModelProcessDied, match="before the job started"):
            list(model.segment(frames, prompts(), width=160, height=120))
        assert len(list(model.segment(frames, prompts(), width=160, height=120))) == N
        assert model.restarts == 2
    finally:
        model.close()


def test_closing_mid_job_ends_the_model_process_promptly(frames: DirFrames, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that exits in the middle of a job (an error, a second SIGTERM) closes its model
    process: the child leaves the job at its next frame and exits, nothing is left running."""
    import time

    monkeypatch.setenv("VSEG_FAKE_DELAY_S", "0.2")
    model = ModelProcess(FAKE)
    outputs = model.segment(frames, prompts(), width=160, height=120)
    assert next(outputs).frame_idx == 0
    proc = model._proc
    t0 = time.monotonic()
    model.close()
    assert time.monotonic() - t0 < 5 and not proc.is_alive() and proc.exitcode == 0  # it exited, not killed


def test_a_model_that_cannot_load_reports_why(tmp_path: Path) -> None:
    settings = Settings(model_process="on", checkpoint=str(tmp_path / "missing.pt"), device="cpu")
    with pytest.raises(ConfigError, match="missing.pt"):
        ModelProcess(settings)


def test_frame_sources_cross_the_process_boundary(tmp_path: Path) -> None:
    """As typed specs: the child opens the same source, a streamed one with a worker client of its own
    (bounded timeouts) for the same settings."""
    d_spec = describe_frames(DirFrames(tmp_path, 5, verify=False))
    assert d_spec == DirSpec(str(tmp_path), 5)
    d = open_frames(d_spec, Settings())
    assert isinstance(d, DirFrames) and d.dir == tmp_path and d.total == 5
    client = redis.Redis(host="127.0.0.1", port=6390, db=3, socket_timeout=7.0)
    spec = describe_frames(StreamedFrames(client, "vseg:frames:j", tmp_path, block_ms=150, stall_s=9.0,
                                          producer_key="vseg:producer:j", producer_ttl_s=4.0))
    assert spec == StreamSpec("vseg:frames:j", str(tmp_path), 150, 9.0, "vseg:producer:j", 4.0)
    assert pickle.loads(pickle.dumps(OpenSession(1, spec, tuple(prompts()), 160, 120))).frames == spec
    settings = Settings(redis_url="redis://127.0.0.1:6390/3", lease_s=6.0, block_ms=150)
    s = open_frames(spec, settings)
    assert isinstance(s, StreamedFrames) and (s.stream, s.dir, s.block_ms, s.stall_s) == ("vseg:frames:j", tmp_path, 150, 9.0)
    assert (s.producer_key, s.producer_ttl_s) == ("vseg:producer:j", 4.0)
    kwargs = s.client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 6390, 3)
    assert kwargs["socket_timeout"] == worker_socket_timeout_s(settings) == 2.0
    with pytest.raises(TypeError, match="cannot hand"):
        describe_frames(object())  # type: ignore[arg-type]


def test_model_process_setting() -> None:
    assert use_model_process(Settings(), "cuda:0") and not use_model_process(Settings(), "cpu")
    assert use_model_process(Settings(model_process="on"), "cpu")
    assert not use_model_process(Settings(model_process="off"), "cuda")
    with pytest.raises(ConfigError, match="model_process must be auto, on or off"):
        Settings(model_process="sometimes")
    beside_fake = ModelHost.load(Settings(segmenter=FROM_ENV)).first  # auto beside a factory's segmenter: in process
    assert isinstance(beside_fake, ChaosHooks) and not isinstance(beside_fake, ModelProcess)
    with pytest.raises(ConfigError, match="module.path:callable"):
        Settings(segmenter="not a factory")
    with pytest.raises(ConfigError, match="cannot be imported"):
        ModelHost.load(Settings(segmenter="tests.no_such_module:make"))


def test_the_sender_never_makes_the_model_wait_on_the_pipe() -> None:
    """Frames larger than a pipe buffer are queued and sent by a thread, in order; the model's send
    returns at once even while the worker reads nothing."""
    import multiprocessing
    import threading
    import time

    from worker.model.process_child import _Pipe, _Sender

    here, there = multiprocessing.Pipe()
    sender = _Sender(_Pipe(there), depth=8)
    masks = np.ones((2, 540, 960), dtype=bool)  # 2 x 65 KB packed: more than a pipe buffer holds
    t0 = time.monotonic()
    for k in range(6):
        sender.send(FrameMasks(k, (1, 2), masks, np.zeros(2, np.float32)))
    assert time.monotonic() - t0 < 2.0  # nothing was read yet, and no send waited for the reader
    closing = threading.Thread(target=sender.close, args=(Done(0, {}),))
    closing.start()
    received = [here.recv() for _ in range(7)]
    closing.join()
    assert [m.frame_idx for m in received[:6]] == list(range(6)) and received[6] == Done(0, {})
    first = received[0]
    assert isinstance(first, Frame) and first.obj_ids == (1, 2) and first.shape == masks.shape
    assert np.array_equal(np.unpackbits(first.packed, axis=-1, count=first.shape[-1]).astype(bool), masks)
    here.close()
    there.close()


def test_the_sender_reports_a_worker_that_went_away() -> None:
    import multiprocessing

    from worker.model.process_child import _Pipe, _Sender, _WorkerGone

    here, there = multiprocessing.Pipe()
    here.close()  # the worker is gone
    sender = _Sender(_Pipe(there), depth=2)
    sender.send(FrameMasks(0, (1,), np.ones((1, 8, 8), bool), np.zeros(1, np.float32)))
    with pytest.raises(_WorkerGone):
        for k in range(1, 100):  # the broken pipe surfaces on a later send, never as a hang
            sender.send(FrameMasks(k, (1,), np.ones((1, 8, 8), bool), np.zeros(1, np.float32)))
    with pytest.raises(_WorkerGone):
        sender.close(Done(0, {}))
    there.close()


def test_the_model_process_logs_json_with_the_jobs_fields(frames: DirFrames, capfd: pytest.CaptureFixture[str]) -> None:
    """With log_format json the child writes JSON lines too, and its records about a session carry the
    job's log fields, sent with OpenSession from the worker's context."""
    import logging

    from runtime.logs import job_log_context

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)  # the child logs at the worker's level: its per-object record is DEBUG
    try:
        model = ModelProcess(Settings(model_process="on", segmenter=FROM_ENV, device="cpu", log_format="json"))
    finally:
        root.setLevel(level)
    try:
        with job_log_context(job_id="j-logs", attempt=2, worker="w1"):
            assert len(list(model.segment(frames, prompts(), width=160, height=120))) == N
    finally:
        model.close()
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    about = [r for r in records if "reference colour" in r["message"]]
    assert about and all((r["job_id"], r["attempt"], r["worker"]) == ("j-logs", 2, "w1") for r in about)
    assert any("FAKE colour segmenter" in r["message"] and "job_id" not in r for r in records)
