"""Fault injection around a Segmenter, for reliability tests only (`python -m worker --fake-segmenter`).

Marker files in a job's directory (the parent of its frame directory) make its runs misbehave:
  crash-worker     holding N: the worker SIGKILLs itself on frame N (a job that kills its worker)
  transient-once   holding N: RetryableError on frame N, once (the file is removed), like a CUDA OOM
  block-forever    holding N: the model never returns from frame N (a wedged model or driver)
Per-frame `delay_s` slows the job down; with `busy` the delay is spent in a Python loop that holds
the GIL, to show the lease heartbeat is not starved by the model's work.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from schemas.errors import RetryableError
from schemas.prompts import ObjectPrompt
from worker.frames import FrameSource
from worker.segment import FrameMasks, Segmenter


def _marker(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return None


class ChaosHooks:
    def __init__(self, inner: Segmenter, *, delay_s: float = 0.0, busy: bool = False) -> None:
        self.inner = inner
        self.name = inner.name
        self.random_weights = inner.random_weights
        self.delay_s = delay_s
        self.busy = busy

    def _wait(self) -> None:
        if self.delay_s <= 0:
            return
        if not self.busy:
            time.sleep(self.delay_s)
            return
        end = time.perf_counter() + self.delay_s
        x = 0
        while time.perf_counter() < end:
            x += sum(range(2000))  # pure Python: holds the GIL between switch intervals

    def segment(self, frames: FrameSource, prompts: Sequence[ObjectPrompt], *, width: int,
                height: int) -> Iterator[FrameMasks]:
        job_dir = frames.dir.parent
        crash_at = _marker(job_dir / "crash-worker")
        transient_at = _marker(job_dir / "transient-once")
        block_at = _marker(job_dir / "block-forever")
        for out in self.inner.segment(frames, prompts, width=width, height=height):
            self._wait()
            if crash_at is not None and out.frame_idx == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if transient_at is not None and out.frame_idx == transient_at:
                (job_dir / "transient-once").unlink(missing_ok=True)
                raise RetryableError(f"injected transient failure at frame {out.frame_idx}")
            if block_at is not None and out.frame_idx == block_at:
                threading.Event().wait()  # forever: nothing in this thread can stop it
            yield out
