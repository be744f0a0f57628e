"""Helpers for tests that run workers as subprocesses (`python -m worker` with the fake segmenter of
tests/fakes.py, chosen by VSEG_SEGMENTER)."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from runtime.settings import Settings
from tests.fakes import FROM_ENV, ChaosHooks, ColourSegmenter
from worker.model.segment import Segmenter
from worker.service.loop import Worker

ROOT = Path(__file__).resolve().parent.parent


def worker_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ, "REDIS_URL": settings.redis_url, "STORAGE_ROOT": str(settings.storage_root),
        "VSEG_KEY_PREFIX": settings.key_prefix, "VSEG_BLOCK_MS": "200", "VSEG_RETRY_BACKOFF_S": "0.2",
        "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "VSEG_LIVE_PREVIEW_HEIGHT": str(settings.live_preview_height),
    }


def fake_env(*, delay_s: float = 0.0, busy: bool = False, faults: dict[str, dict[str, int]] | None = None) -> dict[str, str]:
    """Environment that makes `python -m worker` (and its model process) run tests.fakes:from_env."""
    return {"VSEG_SEGMENTER": FROM_ENV, "VSEG_DEVICE": "cpu", "VSEG_FAKE_DELAY_S": str(delay_s),
            "VSEG_FAKE_BUSY": "1" if busy else "", "VSEG_FAKE_FAULTS": json.dumps(faults or {})}


class LoggedProcess:
    """A process of this project (`args` run from the repository's root) with its output in `log_dir/name.log`.
    Every one started is in `STARTED` until it has exited: tests/conftest.py kills those a test left running
    (a failed assertion before its `finally`), so that none outlives its test."""

    def __init__(self, args: list[str], env: dict[str, str], log_dir: Path, name: str) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        STARTED.append(self)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout_s: float = 60) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is not None:
                self._log.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


class WorkerProcess(LoggedProcess):
    """`python -m worker` with the fake segmenter in a subprocess, its log in a file. `faults`: job id (or
    "*") to {"crash_at" | "transient_at" | "block_at": frame} (tests/fakes.py)."""

    def __init__(self, settings: Settings, name: str, log_dir: Path, *, lease_s: float = 1.0,
                 delay_s: float = 0.05, extra: list[str] | None = None, env: dict[str, str] | None = None,
                 busy: bool = False, faults: dict[str, dict[str, int]] | None = None) -> None:
        args = [sys.executable, "-m", "worker", "--name", name, "--lease", str(lease_s), *(extra or [])]
        super().__init__(args, {**worker_env(settings), **fake_env(delay_s=delay_s, busy=busy, faults=faults),
                                **(env or {})}, log_dir, name)


STARTED: list[LoggedProcess] = []


def kill_leftovers() -> list[str]:
    """Kill every LoggedProcess (a worker, a daemon) still running (a test's leftovers); their names."""
    left = [w for w in STARTED if w.alive()]
    for w in left:
        w.kill()
    STARTED.clear()
    return [w.name for w in left]


def stop_all(*workers: WorkerProcess) -> None:
    """SIGTERM every worker, then wait for each (killed if it does not exit within 30 s)."""
    for w in workers:
        w.signal(signal.SIGTERM)
    for w in workers:
        try:
            w.wait(30)
        except subprocess.TimeoutExpired:
            w.kill()


def log_time(log: str, text: str) -> float:
    """When a worker logged the first line holding `text` (Unix seconds, from the line's timestamp): a
    worker's own reaction, without the interpreter's teardown after it (the machine's speed)."""
    line = next(line for line in log.splitlines() if text in line)
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def wait_for(predicate: Callable[[], object], timeout_s: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def start_worker(settings: Settings, client: redis.Redis, delay_s: float = 0.0, *, name: str = "w",
                 segmenter: Segmenter | None = None, burst: bool = True) -> threading.Thread:
    """A worker on `segmenter` (default: the colour fake, `delay_s` a frame) running in a daemon thread; with
    `burst` it exits once the queue is empty (`running_worker` stops one that does not)."""
    worker = Worker(settings=settings, segmenter=segmenter or ChaosHooks(ColourSegmenter(), delay_s=delay_s),
                    client=client, name=name)
    thread = threading.Thread(target=worker.run, kwargs={"burst": burst}, daemon=True, name=f"worker-{name}")
    thread.worker = worker  # type: ignore[attr-defined]  # for running_worker's stop
    thread.start()
    return thread


@contextmanager
def running_worker(settings: Settings, client: redis.Redis, segmenter: Segmenter, *, name: str = "w",
                   join_s: float = 60.0) -> Iterator[Worker]:
    """A worker serving until the block ends, then stopped (its job, if any, finished) and joined."""
    thread = start_worker(settings, client, name=name, segmenter=segmenter, burst=False)
    worker: Worker = thread.worker  # type: ignore[attr-defined]
    try:
        yield worker
    finally:
        worker.shutdown.stop()
        thread.join(join_s)
        if thread.is_alive():
            raise AssertionError(f"worker {name} did not stop within {join_s} s")
