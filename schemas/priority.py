"""Thread priority: work that runs ahead of need (the producer decoding ahead, the worker's frame
prefetch) yields the CPU to the model's step when they share a machine. (Not the result sink: at a
lower priority it falls behind, fills its queue and blocks the model, serialising the two.) Linux nice values are per
thread, and threads inherit the value of the thread that creates them (FFmpeg's and thread pools')."""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

BACKGROUND_NICE = 10


def lower_this_thread(nice: int = BACKGROUND_NICE) -> None:
    """Raise the calling thread's nice value by `nice` (best effort; a no-op where unsupported)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError) as e:  # not Linux, or not permitted
        log.debug("could not lower thread priority: %s", e)
