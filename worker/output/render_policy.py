"""How the renderer shares the machine with the model, and what it cleans up before a job renders.

x264's defaults (a thread per core and more, `superfast`) suit a GPU model, which leaves the CPU to the
renderer. Beside a CPU model every core the encoder takes is taken from the model, and x264's threads
would preempt the model's OpenMP threads and stall them, so it gets one thread and `ultrafast` (half
the encoding CPU of `superfast`, a larger file). Either can be set (VSEG_RENDER_PRESET,
VSEG_RENDER_THREADS).
"""

from __future__ import annotations

import logging
from pathlib import Path

from runtime.settings import Settings
from worker.output.draw import partial_path

log = logging.getLogger(__name__)


def render_preset(settings: Settings, device: str) -> str:
    """The x264 preset: as set, or (auto) `superfast` beside a CUDA model and `ultrafast` beside a CPU one."""
    if settings.render_preset != "auto":
        return settings.render_preset
    return "superfast" if device.startswith("cuda") else "ultrafast"


def render_threads(settings: Settings, device: str) -> int:
    """x264 threads: as set, or x264's own choice (0) beside a CUDA model and one beside a CPU one."""
    if settings.render_threads:
        return settings.render_threads
    return 0 if device.startswith("cuda") else 1


def remove_stale_partials(target: Path, tag: str) -> None:
    """Delete half-written MP4s that earlier owners of the job left beside `target` (a worker killed with
    -9 cannot clean up); `tag` is this worker's, whose own partial file is left alone. This worker owns
    the job now; a frozen earlier owner that wakes up finds its lease gone before it could rename its
    file into place."""
    for stale in target.parent.glob(f".{target.name}.*.partial"):
        if stale != partial_path(target, tag):
            log.info("removing %s, left by an earlier run of this job", stale.name)
            stale.unlink(missing_ok=True)
