"""Integration tier: every Lua script the service runs is given the keys of one hash slot, so that it runs on a
Redis Cluster (where a script over keys of two slots is refused: CROSSSLOT). Every EVALSHA the producer and the
worker send is recorded (direct calls and pipelines alike) while they go through submit, a job to its end, a
poison entry, cancel, prompts, a stop, a hand-back and a stall; each one's keys must share a slot, and every
worker script must have been seen."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.client import Pipeline
from redis.crc import key_slot

from producer.control import cancel, request_stop
from producer.running_prompts import add_prompts
from producer.submission import submit
from runtime.settings import Settings
from schemas.errors import InputError
from schemas.names import JobState
from schemas.prompts import ObjectPrompt
from tests.fakes import ColourSegmenter
from worker.broker.claim import take
from worker.broker.lease import Lease
from worker.broker.scripts import Scripts
from worker.service.loop import Worker

pytestmark = pytest.mark.integration

N = 8
SIZE = (96, 64)


@pytest.fixture
def evalsha_keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, tuple[str, ...]]]]:
    """(sha, keys) of every EVALSHA sent through redis-py, directly or in a pipeline."""
    calls: list[tuple[str, tuple[str, ...]]] = []

    def record(args: tuple[Any, ...]) -> None:
        if args and str(args[0]).upper() in ("EVALSHA", "EVAL"):
            n = int(args[2])
            calls.append((str(args[1]), tuple(k.decode() if isinstance(k, bytes) else str(k) for k in args[3:3 + n])))

    direct, queued = redis.Redis.execute_command, Pipeline.pipeline_execute_command

    def execute_command(self: redis.Redis, *args: Any, **options: Any) -> Any:
        record(args)
        return direct(self, *args, **options)

    def pipeline_execute_command(self: Pipeline, *args: Any, **options: Any) -> Any:
        record(args)
        return queued(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", execute_command)
    monkeypatch.setattr(Pipeline, "pipeline_execute_command", pipeline_execute_command)
    yield calls


def test_every_script_call_keeps_to_one_hash_slot(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis,
    evalsha_keys: list[tuple[str, tuple[str, ...]]]
) -> None:
    keys = settings.keys
    for job_id in ("done", "queued", "prompted"):
        submit(video, prompt, settings=settings, client=redis_client, job_id=job_id)
    assert cancel("queued", settings=settings, client=redis_client) == "cancelled"
    add_prompts("prompted", prompt, settings=settings, wait_s=0, client=redis_client)
    with pytest.raises(InputError):
        request_stop("prompted", settings=settings, client=redis_client)  # not a live job: its script said so
    redis_client.xadd(keys.jobs, {"type": "job", "data": b"\xc1garbage"})  # poison: dead-lettered
    worker = Worker(settings=settings, segmenter=ColourSegmenter(), client=redis_client, name="w")
    assert worker.run(burst=True) == 2  # done and prompted; the cancelled one dropped, the poison dead-lettered
    assert worker.stats.dead_lettered == 1

    scripts = Scripts(redis_client)
    for job_id, how in (("back", "hand back"), ("stalled", "abandon")):
        redis_client.hset(keys.job(job_id), mapping={"state": JobState.RUNNING.value, "attempt": 1})
        entry = redis_client.xadd(keys.jobs, {"type": "job", "data": b""}).decode()
        redis_client.xreadgroup(keys.group, "a", {keys.jobs: ">"})
        assert take(redis_client, scripts, keys, entry, job_id, "a", 5000)
        lease = Lease(redis_client, keys, entry, "a", lease_s=5, job=job_id, scripts=scripts)
        assert lease.renew()
        if how == "hand back":
            worker.hand_back(entry, job_id)
        else:
            lease._abandon()  # as its heartbeat does

    assert evalsha_keys
    for sha, call_keys in evalsha_keys:
        assert call_keys, f"script {sha} was sent with no keys: a cluster would run it on a random node"
        assert len({key_slot(k.encode()) for k in call_keys}) == 1, f"script {sha}: keys of several slots {call_keys}"
        shared = {keys.jobs, keys.events, keys.dead}
        assert not (shared & set(call_keys)) or len(call_keys) == 1, f"script {sha}: a shared key with others"
    seen = {sha for sha, _ in evalsha_keys}
    worker_scripts = {name: s.sha for name, s in vars(scripts).items() if hasattr(s, "sha")}
    assert {name for name, sha in worker_scripts.items() if sha not in seen} == set()
