"""bench/gpu_checks.sh, dry: the same five steps the GPU machine runs, on the CPU at toy sizes, in under five
minutes (each step bounded: a loaded 2-core CI box runs the streams step for about a minute), so the script is known to work before GPU time is at hand (it comes rarely and briefly)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.workers import ROOT

pytestmark = pytest.mark.slow

STEPS = ("streams", "concurrency", "live", "service", "gpu_tests")


def test_the_dry_run_runs_every_step_on_the_cpu_in_under_five_minutes(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    started = time.monotonic()
    done = subprocess.run(["bash", "bench/gpu_checks.sh", "--dry-run", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=480, env={**os.environ, "PYTHON": sys.executable})
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in STEPS:
        log = (out / f"{step}.log").read_text()
        assert f"{step} rc=0" in log, log[-2000:]
    summary = done.stdout
    assert "K=2:" in summary and "latency capture -> publish" in summary and "service/plain" in summary
    assert "streams: frames skipped" in summary or "1 streams:" in summary
    assert took < 300, f"the dry run took {took:.0f} s"
