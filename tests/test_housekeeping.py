"""Integration tier: housekeeping and an idle worker against a Redis whose jobs stream or group has vanished
(restarted empty, FLUSHALL, a failover to a replica without them): each call recreates what it needs or
skips, logs once, and never raises; the same worker then serves the next job (README "Guarantees").
The subprocess version, with a real restart, is tests/test_infra_faults.py."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.submission import submit
from runtime.connection import worker_client
from runtime.settings import Settings
from schemas.prompts import ObjectPrompt
from tests.fakes import ColourSegmenter
from tests.videos import disc_center
from tests.workers import wait_for
from worker.broker.claim import ensure_group
from worker.service.health import Housekeeping, WorkerStats
from worker.service.loop import Worker

pytestmark = pytest.mark.integration

N, SIZE = 12, (96, 64)


def housekeeping(client: redis.Redis, settings: Settings, name: str = "me") -> Housekeeping:
    return Housekeeping(client, settings.keys, name, every_s=settings.housekeeping_s, lease_s=0.01,
                        stats=WorkerStats())


def gone_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "housekeeping: the jobs stream" in r.getMessage()]


def test_housekeeping_on_an_empty_redis_recreates_the_stream_and_group_and_logs_once(
        redis_client: redis.Redis, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    keys = settings.keys
    hk = housekeeping(redis_client, settings)
    caplog.set_level(logging.INFO, logger="worker.service.health")
    hk.run(force=True)  # nothing there at all: XINFO answers "no such key"
    assert redis_client.exists(keys.jobs)
    assert [g["name"] for g in redis_client.xinfo_groups(keys.jobs)] == [keys.group.encode()]
    assert len(gone_lines(caplog)) == 1 and "recreating them" in gone_lines(caplog)[0]
    hk.run(force=True)  # found again: nothing logged
    assert len(gone_lines(caplog)) == 1 and hk.groups_recreated == 1

    redis_client.xgroup_destroy(keys.jobs, keys.group)  # the stream without its group: NOGROUP
    hk.run(force=True)
    hk.run(force=True)
    assert hk.groups_recreated == 2 and len(gone_lines(caplog)) == 2  # a new incident is logged again
    assert redis_client.xinfo_groups(keys.jobs)


def test_housekeeping_removes_dead_consumers_and_keeps_its_own_and_those_holding_entries(
        redis_client: redis.Redis, settings: Settings) -> None:
    keys = settings.keys
    ensure_group(redis_client, keys)
    for consumer in ("holder", "dead", "me"):
        redis_client.xgroup_createconsumer(keys.jobs, keys.group, consumer)
    redis_client.xadd(keys.jobs, {"x": "1"})
    redis_client.xreadgroup(keys.group, "holder", {keys.jobs: ">"}, count=1)  # holds an entry; the others nothing
    wait_for(lambda: all(c["idle"] > 30 for c in redis_client.xinfo_consumers(keys.jobs, keys.group)),
             timeout_s=5, what="the consumers idle for three leases")
    hk = housekeeping(redis_client, settings)
    hk.run(force=True)
    names = sorted(c["name"] for c in redis_client.xinfo_consumers(keys.jobs, keys.group))
    assert names == [b"holder", b"me"] and hk.stats.consumers_removed == 1


def test_housekeeping_runs_every_housekeeping_s(redis_client: redis.Redis, settings: Settings) -> None:
    hk = Housekeeping(redis_client, settings.keys, "me", every_s=3600, lease_s=1, stats=WorkerStats())
    assert hk.due()
    hk.run()  # the first round runs at once (and makes the group of this empty Redis)
    assert not hk.due() and hk.groups_recreated == 1
    redis_client.flushall()
    hk.run()  # not due: nothing is recreated yet
    assert not redis_client.exists(settings.keys.jobs) and hk.groups_recreated == 1
    hk.run(force=True)
    assert redis_client.exists(settings.keys.jobs) and hk.groups_recreated == 2


def test_an_idle_worker_blocked_on_a_stream_flushed_under_it_goes_on_and_serves_the_next_job(
        video: Path, redis_client: redis.Redis, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """FLUSHALL while the worker's XREADGROUP blocks on the stream: Redis answers UNBLOCKED (the connection
    stays up, unlike a restart); the worker recreates the group and completes a job submitted after."""
    caplog.set_level(logging.INFO)
    cfg = Settings.load(environ={}, redis_url=settings.redis_url, storage_root=settings.storage_root, block_ms=5000,
                        housekeeping_s=3600.0)  # housekeeping stays out of it: the read itself meets the flush
    worker = Worker(settings=cfg, segmenter=ColourSegmenter(), client=worker_client(cfg), name="w")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: blocked_reads(redis_client), what="the worker blocked in XREADGROUP")
        redis_client.flushall()
        wait_for(lambda: has_group(redis_client, cfg), timeout_s=20, what="the group recreated")
        x, y = disc_center(0, N, SIZE)
        submit(video, [ObjectPrompt(1, 0, ((x, y),), (1,))], settings=cfg, client=redis_client, job_id="after")
        wait_for(lambda: redis_client.hget(cfg.keys.job("after"), "state") == b"completed", timeout_s=30,
                 what="the job after the flush")
        assert thread.is_alive()
    finally:
        worker.stopping = True
        thread.join(15)
    assert not thread.is_alive() and worker.jobs_done == 1
    assert any("consumer group missing" in r.getMessage() and "UNBLOCKED" in r.getMessage() for r in caplog.records)


def blocked_reads(client: redis.Redis) -> bool:
    return any(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "") for c in client.client_list())


def has_group(client: redis.Redis, settings: Settings) -> bool:
    try:
        return bool(client.xinfo_groups(settings.keys.jobs))
    except redis.ResponseError:
        return False


@pytest.fixture(autouse=True)
def _no_leftover_stream(redis_client: redis.Redis) -> Iterator[None]:
    yield
    redis_client.flushall()
