"""How many jobs one worker holds at once, and whether it may take one more now.

`concurrency` (VSEG_CONCURRENCY, `--concurrency K`) set: K. Left at 0, it is picked from the device and
the log says why:
  - off CUDA: 1. Sessions on one CPU model share the same cores (PyTorch already spreads one frame over
    all of them), so a second job at once adds no frames/s, only memory (bench/bench_concurrency.py);
  - on CUDA: as many as fit in the free memory with a margin: free x HEADROOM / (one session's measured
    cost, plus one model's when each slot has a model process of its own), at most MAX_AUTO.

Where the slots run is the model host's (worker/model/host.py): one model shared by the slots, or a model
process per slot, whose memory then counts once per job here.

Admission (`refusal`): a worker holding at least one job takes another only while the device has room
for one more session (ADMIT_FACTOR times its measured cost free), so that a burst of jobs waits in the
queue for another worker instead of crashing this one's into an out-of-memory error. A worker holding no
job always takes one: a single job too large for the device fails as that job's own error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from runtime.settings import Settings
from worker.model.host import ModelHost
from worker.model.segment import GpuBudget

log = logging.getLogger(__name__)

HEADROOM = 0.8  # of the free memory, what sessions may take when K is picked
MAX_AUTO = 16  # the most jobs an automatic K holds (set concurrency for more)
ADMIT_FACTOR = 1.5  # free memory a new job needs, in sessions' costs
MIB = 1024 * 1024


def pick_concurrency(settings: Settings, host: ModelHost) -> tuple[int, str]:
    """K and why (for the log)."""
    segmenter, model_per_slot = host.first, host.per_slot
    if settings.concurrency:
        return settings.concurrency, "set by concurrency (VSEG_CONCURRENCY or --concurrency)"
    budget = segmenter.gpu_budget()
    if budget is None:
        return 1, (f"the model runs on the {segmenter.device}: jobs at once would share its cores and add no "
                   f"frames/s (bench/bench_concurrency.py); set VSEG_CONCURRENCY to hold more")
    per_job = budget.session_bytes + (budget.model_bytes if model_per_slot else 0)
    fits = int(budget.free_bytes * HEADROOM // max(per_job, 1))
    k = max(1, min(MAX_AUTO, fits + (1 if model_per_slot else 0)))  # the first slot's model is loaded already
    return k, (f"{budget.free_bytes / MIB:.0f} MiB free on {segmenter.device}; a session measured at "
               f"{budget.session_bytes / MIB:.0f} MiB" + (f" plus a model process of {budget.model_bytes / MIB:.0f} "
                                                           f"MiB per slot" if model_per_slot else "")
               + f": {k} jobs at once ({HEADROOM:.0%} of the free memory, at most {MAX_AUTO})")


def refusal(budgets: Sequence[GpuBudget | None], busy: int, unopened: int = 0) -> str | None:
    """Why the worker must not take another job now (None: it may). `budgets`: its models' figures;
    `unopened`: jobs held whose sessions are not open yet, each charged one session's cost up front."""
    if busy == 0:
        return None
    known = [b for b in budgets if b is not None]
    if not known:
        return None
    session = max(b.session_bytes for b in known)
    free = min(b.free_bytes for b in known) - unopened * session  # each figure is the whole device's
    need = int(session * ADMIT_FACTOR)
    if free >= need:
        return None
    return (f"{free / MIB:.0f} MiB free on the GPU, a session needs about {need / MIB:.0f} MiB: holding {busy} "
            f"job(s), taking no more until one ends")
