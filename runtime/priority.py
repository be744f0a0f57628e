"""Thread priority: the producer decoding ahead yields the CPU to a worker's model step when they share
a machine. (Not the worker's own helpers, the result sink or the frame prefetch: at a lower priority
they fall behind and block the model, serialising the two; measured in bench/RESULTS.md.) Linux nice values are per
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
