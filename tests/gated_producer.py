"""`python -m tests.gated_producer GATE AFTER ARGS...`: `python -m producer ARGS`, except that each JPEG after
the first AFTER waits until the file GATE exists. A test that must signal the producer mid-stream opens the
gate (creates the file) only after its signal, so decoding outlasts the test's step on any machine, however
fast: no sleep or polling window stands in for that event."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from pathlib import Path
from typing import Any

import producer.decode as decode
from producer.cli import main


def gate_jpeg_writes(gate: Path, after: int) -> None:
    real = decode.write_jpeg
    written, lock = itertools.count(), threading.Lock()

    def gated(path: Path, data: Any, quality: int, whole: bool = True) -> None:
        with lock:
            k = next(written)
        while k >= after and not gate.exists():
            time.sleep(0.01)  # the gate is a file (another process opens it); a signal interrupts this sleep
        real(path, data, quality, whole)

    decode.write_jpeg = gated  # type: ignore[assignment]


if __name__ == "__main__":
    gate_jpeg_writes(Path(sys.argv[1]), int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
