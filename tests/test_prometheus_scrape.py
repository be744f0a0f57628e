"""Integration tier: a real Prometheus server (Debian's `prometheus` package, installed by scripts/setup.sh
where apt-get can) scrapes the queue exporter, `python -m producer stats --serve`, and its query API
returns the queue's figures."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from producer.stats import serve_stats
from runtime.settings import Settings
from tests.prom import PROMETHEUS, prometheus, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary on PATH (apt-get install prometheus)"),
]


def test_prometheus_scrapes_the_queue_exporter(settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    keys = settings.keys
    for i in range(5):
        redis_client.xadd(keys.jobs, {"type": "job", "data": f"j{i}"})
    redis_client.xgroup_create(keys.jobs, keys.group, id="0")
    redis_client.xreadgroup(keys.group, "worker-a", {keys.jobs: ">"}, count=2)
    redis_client.xadd(keys.dead, {"reason": "poison"})

    started = time.monotonic()
    exporter = serve_stats(settings, "127.0.0.1", 0)
    try:
        with prometheus({"vseg-queue": [f"127.0.0.1:{exporter.port}"]}, tmp_path) as url:
            (pending,) = wait_for(url, "vseg_queue_pending", deadline_s=15, log=tmp_path / "prometheus.log")
            assert pending["metric"] == {"__name__": "vseg_queue_pending", "instance": f"127.0.0.1:{exporter.port}",
                                         "job": "vseg-queue"}
            assert pending["value"][1] == "2"
            figures = {name: wait_for(url, name, deadline_s=5)[0]["value"][1]
                       for name in ("vseg_queue_waiting", "vseg_queue_lag", "vseg_dead_letters", "vseg_queue_up",
                                    'up{job="vseg-queue"}')}
            assert figures == {"vseg_queue_waiting": "3", "vseg_queue_lag": "3", "vseg_dead_letters": "1",
                               "vseg_queue_up": "1", 'up{job="vseg-queue"}': "1"}
    finally:
        exporter.close()
    assert time.monotonic() - started < 20
