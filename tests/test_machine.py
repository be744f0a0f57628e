"""Unit tier: the CPUs a process may use (affinity capped by a container's CPU quota)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime import machine


@pytest.mark.parametrize(
    "cpu_max, quota, period, cpus",
    [
        ("200000 100000\n", None, None, 2.0),
        ("150000 100000", None, None, 1.5),
        ("max 100000\n", None, None, None),
        (None, "-1\n", "100000\n", None),
        (None, "50000", "100000", 0.5),
        ("garbage", None, None, None),
        (None, None, None, None),
    ],
)
def test_quota_cpus(cpu_max: str | None, quota: str | None, period: str | None, cpus: float | None) -> None:
    assert machine.quota_cpus(cpu_max, quota, period) == cpus


def test_usable_cores_is_capped_by_a_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(machine, "CGROUP", tmp_path)
    assert machine.usable_cores() == affinity  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: rounds up to one
    assert machine.usable_cores() == 1
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(range(16)))
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert machine.usable_cores() == 3
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert machine.usable_cores() == 16
