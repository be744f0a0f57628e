"""Integration tier: `python -m producer stats` against a queue in a known state (a real redis-server):
every figure (waiting, pending, lag, oldest pending age, in flight, consumers, dead letters, events),
printed as a table and exported as Prometheus gauges by `--serve`; Redis down is one line, exit 1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from producer.stats import GAUGES, QueueStats, collect_stats, format_stats, serve_stats
from runtime.settings import Settings
from tests.prom import get, samples

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
AGE_S = 100.0  # the oldest pending job was enqueued this long ago (by its entry id)


def known_queue(client: redis.Redis, settings: Settings) -> None:
    """8 jobs enqueued 1 s apart, the first AGE_S + 1 s ago: 3 read by worker-a (the first done: acknowledged and
    deleted, as a worker does), 1 by worker-b, 4 waiting; 2 dead letters; 5 events."""
    keys = settings.keys
    sec, usec = client.time()
    base_ms = sec * 1000 + usec // 1000 - int((AGE_S + 1) * 1000)
    ids = [client.xadd(keys.jobs, {"type": "job", "data": f"j{i}"}, id=f"{base_ms + i * 1000}-0") for i in range(8)]
    client.xgroup_create(keys.jobs, keys.group, id="0")
    client.xreadgroup(keys.group, "worker-a", {keys.jobs: ">"}, count=3)
    client.xreadgroup(keys.group, "worker-b", {keys.jobs: ">"}, count=1)
    client.xack(keys.jobs, keys.group, ids[0])
    client.xdel(keys.jobs, ids[0])
    for i in range(2):
        client.xadd(keys.dead, {"reason": f"poison {i}"})
    for i in range(5):
        client.xadd(keys.events, {"type": "progress", "i": i})


def check_known(stats: QueueStats) -> None:
    assert (stats.length, stats.pending, stats.waiting, stats.lag, stats.lag_source) == (7, 3, 4, 4, "redis")
    assert (stats.consumers, stats.dead_letters, stats.events, stats.group_exists) == (2, 2, 5, True)
    assert stats.consumer_pending == {"worker-a": 2, "worker-b": 1}
    assert AGE_S - 0.5 <= stats.oldest_pending_s <= AGE_S + 30  # entry 1, enqueued AGE_S ago


def test_figures_of_a_queue_in_a_known_state(settings: Settings, redis_client: redis.Redis) -> None:
    known_queue(redis_client, settings)
    stats = collect_stats(redis_client, settings.keys)
    check_known(stats)
    table = format_stats(stats, settings.keys, settings.redis_url)
    for name, value in [("waiting", "4"), ("pending", "3"), ("lag", "4"), ("in flight", "7"), ("consumers", "2"),
                        ("dead letters", "2"), ("events", "5")]:
        assert re.search(rf"^  {name} +{value} ", table, re.M), (name, table)
    assert re.search(r"^  oldest pending +10\d\.\d s", table, re.M) and "worker-a" in table


def test_lag_where_redis_cannot_tell_and_before_any_worker(settings: Settings, redis_client: redis.Redis) -> None:
    keys = settings.keys
    empty = collect_stats(redis_client, keys)  # nothing at all: no stream, no group
    assert (empty.length, empty.pending, empty.waiting, empty.lag, empty.oldest_pending_s) == (0, 0, 0, 0, 0.0)
    assert not empty.group_exists and empty.consumers == 0 and empty.dead_letters == 0

    ids = [redis_client.xadd(keys.jobs, {"type": "job"}) for _ in range(3)]
    before = collect_stats(redis_client, keys)  # jobs, but no worker has created the group yet
    assert (before.length, before.waiting, before.lag, before.pending, before.group_exists) == (3, 3, 3, 0, False)

    redis_client.xgroup_create(keys.jobs, keys.group, id="0")
    redis_client.xreadgroup(keys.group, "w", {keys.jobs: ">"}, count=1)
    redis_client.xdel(keys.jobs, ids[2])  # cancelled while queued: its entry is deleted before delivery
    after = collect_stats(redis_client, keys)
    assert (after.length, after.pending, after.waiting) == (2, 1, 1)
    assert (after.lag, after.lag_source) == (1, "computed")  # Redis's lag is nil here: the count is the waiting one


def test_stats_prints_the_table_and_redis_down_is_one_line(settings: Settings, redis_client: redis.Redis) -> None:
    known_queue(redis_client, settings)
    env = {**os.environ, "REDIS_URL": settings.redis_url}
    out = subprocess.run([sys.executable, "-m", "producer", "stats"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^  waiting +4 ", out.stdout, re.M) and re.search(r"^  dead letters +2 ", out.stdout, re.M)

    down = subprocess.run([sys.executable, "-m", "producer", "stats"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**env, "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert down.returncode == 1 and not down.stdout and len(down.stderr.splitlines()) == 1
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in down.stderr


def test_serve_exports_every_figure_as_a_gauge(settings: Settings, redis_client: redis.Redis) -> None:
    known_queue(redis_client, settings)
    server = serve_stats(settings, "127.0.0.1", 0)
    try:
        status, _, body = get(f"{server.url}/metrics")
        assert status == 200
        got = samples(body)
        expected = {"vseg_queue_up": 1, "vseg_queue_length": 7, "vseg_queue_pending": 3, "vseg_queue_waiting": 4,
                    "vseg_queue_lag": 4, "vseg_queue_consumers": 2, "vseg_dead_letters": 2, "vseg_events_length": 5,
                    'vseg_queue_consumer_pending{consumer="worker-a"}': 2,
                    'vseg_queue_consumer_pending{consumer="worker-b"}': 1}
        assert {k: got[k] for k in expected} == expected
        assert AGE_S - 0.5 <= got["vseg_queue_oldest_pending_seconds"] <= AGE_S + 30
        assert set(GAUGES) <= set(got)
        redis_client.xack(settings.keys.jobs, settings.keys.group, *[e[0] for e in redis_client.xrange(settings.keys.jobs)])
        assert samples(get(f"{server.url}/metrics")[2])["vseg_queue_pending"] == 0  # read afresh at each scrape
        assert get(f"{server.url}/readyz")[0::2] == (200, f"ok: Redis at {settings.redis_url} answers\n")
        assert get(f"{server.url}/healthz")[0] == 200
    finally:
        server.close()


def test_serve_with_redis_down_says_so_and_keeps_serving() -> None:
    dead = Settings.load(environ={}, config_path=None, redis_url="redis://127.0.0.1:1/0")
    server = serve_stats(dead, "127.0.0.1", 0)
    try:
        got = samples(get(f"{server.url}/metrics")[2])
        assert got == {"vseg_queue_up": 0}  # the scrape succeeds; no figure is made up
        status, _, body = get(f"{server.url}/readyz")
        assert status == 503 and body.startswith("cannot reach Redis at redis://127.0.0.1:1/0") and body.count("\n") == 1
        assert get(f"{server.url}/healthz")[0] == 200
    finally:
        server.close()


def test_the_serve_command_runs_until_sigterm(settings: Settings, redis_client: redis.Redis) -> None:
    known_queue(redis_client, settings)
    proc = subprocess.Popen([sys.executable, "-m", "producer", "stats", "--serve", "0"], cwd=ROOT,
                            env={**os.environ, "REDIS_URL": settings.redis_url}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"serving queue metrics on (http://127\.0\.0\.1:\d+)/metrics\n", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        assert samples(get(f"{match.group(1)}/metrics")[2])["vseg_dead_letters"] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_serve_port_is_a_usage_error() -> None:
    out = subprocess.run([sys.executable, "-m", "producer", "stats", "--serve", "70000"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "a port must be 0..65535" in out.stderr
