"""How many CPUs this process may really use: its affinity mask, capped by a container's CPU quota.

`os.cpu_count()` gives the host's count: in a container limited with `--cpus 2` (a CFS quota) on a
16-core host it says 16, and thread pools sized from it oversubscribe the two CPUs the quota allows.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def quota_cpus(cpu_max: str | None = None, cfs_quota_us: str | None = None,
               cfs_period_us: str | None = None) -> float | None:
    """CPUs a CFS quota allows, from cgroup v2's `cpu.max` ("200000 100000", or "max 100000" for none)
    or cgroup v1's `cpu.cfs_quota_us` (-1 for none) and `cpu.cfs_period_us`; None without a quota."""
    try:
        if cpu_max is not None:
            quota, _, period = cpu_max.strip().partition(" ")
            if quota != "max" and float(quota) > 0 and float(period or 100000) > 0:
                return float(quota) / float(period or 100000)
        elif cfs_quota_us is not None and cfs_period_us is not None:
            if float(cfs_quota_us) > 0 and float(cfs_period_us) > 0:
                return float(cfs_quota_us) / float(cfs_period_us)
    except ValueError:
        return None
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset), capped by a CFS
    quota (docker --cpus) rounded up; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    quota = quota_cpus(_read(CGROUP / "cpu.max"), _read(CGROUP / "cpu" / "cpu.cfs_quota_us"),
                       _read(CGROUP / "cpu" / "cpu.cfs_period_us"))
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)
