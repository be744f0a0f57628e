"""Unit tests of worker.output.sink.ResultSink: frames waiting in its queue are published together (one
pipelined Redis round trip), in order, each exactly once; errors reach the model's thread."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from schemas import messages
from schemas.errors import RetryableError
from worker.model.segment import FrameMasks
from worker.output.sink import ResultSink


class FakeFrames:
    dir = Path(".")
    total = 9

    def path(self, frame_idx: int) -> Path:  # pragma: no cover - not rendering here
        return self.dir / f"{frame_idx:05d}.jpg"


class FakePublisher:
    """Records each frames() call; the first one blocks until `release` is set, so frames pile up."""

    job_id = "j"
    num_frames = 9

    def __init__(self, fail_at: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.progress_calls: list[int] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        self.fail_at = fail_at

    def frames(self, results: list[messages.FrameResult], interrupt: object = None) -> int:
        self.entered.set()
        if not self.batches:
            self.release.wait(10)
        idx = [r.frame_idx for r in results]
        if self.fail_at is not None and self.fail_at in idx:
            raise RuntimeError("Redis said no")
        self.batches.append(idx)
        return len(results)

    def progress(self, frames_done: int, fps: float, interrupt: object = None) -> None:
        self.progress_calls.append(frames_done)


def masks(k: int) -> FrameMasks:
    m = np.zeros((1, 6, 8), bool)
    m[0, 1:4, 2:5] = True
    return FrameMasks(k, (1,), m, np.array([0.5], np.float32))


def test_waiting_frames_go_out_together_in_order_once() -> None:
    pub = FakePublisher()
    done: list[int] = []
    sink = ResultSink(pub, None, FakeFrames(), random_weights=True, progress_every=3,  # type: ignore[arg-type]
                      on_frame=lambda n, _skipped, _latencies: done.append(n), depth=4)
    sink.put(masks(0))
    assert pub.entered.wait(10)  # the sink took frame 0 and is blocked in its write
    for k in range(1, 5):
        sink.put(masks(k))  # 1..4 fill the queue
    pub.release.set()  # the sink drains the four waiting frames in one batch
    for k in range(5, 9):
        sink.put(masks(k))
    sink.close()
    flat = [k for batch in pub.batches for k in batch]
    assert flat == list(range(9))
    assert pub.batches[0] == [0] and pub.batches[1] == [1, 2, 3, 4]
    assert sink.batches == len(pub.batches) < 9
    assert done == list(range(1, 10)) and sink.frames_done == 9
    assert pub.progress_calls == [3, 6, 9]


def test_a_failed_write_reaches_the_models_thread() -> None:
    pub = FakePublisher(fail_at=2)
    pub.release.set()
    sink = ResultSink(pub, None, FakeFrames(), random_weights=True, progress_every=10,  # type: ignore[arg-type]
                      on_frame=lambda *_: None, depth=4)
    with pytest.raises(RuntimeError, match="Redis said no"):
        for k in range(9):
            sink.put(masks(k))
        sink.close()
    assert all(2 not in batch for batch in pub.batches)


def test_close_with_a_full_queue_and_a_dead_sink_raises_instead_of_blocking() -> None:
    """The stall of issue 18: the sink died while its queue was full; close() used to block forever on
    Queue.put. Now it re-raises the sink's error within a step."""
    pub = FakePublisher(fail_at=0)
    sink = ResultSink(pub, None, FakeFrames(), random_weights=True, progress_every=10,  # type: ignore[arg-type]
                      on_frame=lambda *_: None, depth=2)
    sink.put(masks(0))
    assert pub.entered.wait(10)  # the sink is inside its write of frame 0
    sink.put(masks(1))
    sink.put(masks(2))  # the queue is full
    pub.release.set()  # the write of frame 0 fails: the sink thread ends
    done = threading.Event()
    errors: list[BaseException] = []

    def close() -> None:
        try:
            sink.close()
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion
            errors.append(e)
        done.set()

    threading.Thread(target=close, daemon=True).start()
    assert done.wait(5), "close() blocked on a queue nobody drains"
    assert len(errors) == 1 and "Redis said no" in str(errors[0])


def test_put_and_close_run_the_jobs_check_while_they_wait() -> None:
    """A sink stuck in a write (Redis hung) does not hold the model's thread: the job's check (a lost
    lease, a shutdown deadline) is raised from put and from close while they wait."""
    pub = FakePublisher()  # its first write blocks until released
    stop = threading.Event()

    def check() -> None:
        if stop.is_set():
            raise TimeoutError("the lease is presumed lost")

    sink = ResultSink(pub, None, FakeFrames(), random_weights=True, progress_every=10,  # type: ignore[arg-type]
                      on_frame=lambda *_: None, depth=1, check=check)
    sink.put(masks(0))
    assert pub.entered.wait(10)
    sink.put(masks(1))  # fills the queue
    stop.set()
    with pytest.raises(TimeoutError, match="presumed lost"):
        sink.put(masks(2))
    with pytest.raises(TimeoutError, match="presumed lost"):
        sink.close()
    sink.abort()
    pub.release.set()


def test_a_sink_thread_that_ended_without_an_error_is_noticed() -> None:
    pub = FakePublisher()
    pub.release.set()
    sink = ResultSink(pub, None, FakeFrames(), random_weights=True, progress_every=10,  # type: ignore[arg-type]
                      on_frame=lambda *_: None, depth=1)
    sink.queue.put(object())  # not a frame: the sink skips it
    sink.abort()  # ends the thread; then pretend nothing was recorded
    sink.error = None
    sink.queue.put(masks(0))  # full again, nobody drains it
    with pytest.raises(RetryableError, match="stopped without finishing"):
        sink.put(masks(1))
