"""Integration tier: the worker's Lua scripts are registered once and run by EVALSHA (worker/broker/scripts.py),
and still run after the server forgot them (SCRIPT FLUSH, or Redis restarted empty): NOSCRIPT loads
them again, for a direct call and for a pipeline of fenced writes alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from producer.submission import submit
from runtime.settings import Settings
from schemas import messages
from schemas.names import TERMINAL_ENTRY_ID, JobState
from schemas.prompts import ObjectPrompt
from tests.fakes import ColourSegmenter
from worker.broker.claim import take
from worker.broker.lease import Lease
from worker.broker.publish import ResultPublisher, frame_result
from worker.broker.scripts import Scripts
from worker.model.segment import FrameMasks
from worker.service.loop import Worker

pytestmark = pytest.mark.integration

N = 12
SIZE = (96, 64)


def calls(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def masks(frame_idx: int) -> FrameMasks:
    return FrameMasks(frame_idx, (1,), np.zeros((1, 4, 4), bool), np.ones(1, "float32"))


def test_every_script_runs_again_after_script_flush(settings: Settings, redis_client: redis.Redis) -> None:
    keys = settings.keys
    redis_client.config_resetstat()
    redis_client.xgroup_create(keys.jobs, keys.group, id="0", mkstream=True)
    entry = redis_client.xadd(keys.jobs, {"type": "job", "data": b""}).decode()
    redis_client.xreadgroup(keys.group, "a", {keys.jobs: ">"})
    scripts = Scripts(redis_client)
    assert take(redis_client, scripts, keys, entry, "j", "a", 5000)  # the fence: the job hash's owner
    lease = Lease(redis_client, keys, entry, "a", lease_s=5, job="j", scripts=scripts)
    pub = ResultPublisher(redis_client, keys, "j", 3, lease, patience_s=1)
    assert lease.renew() and pub.frames([frame_result("j", masks(0), random_weights=False)]) == 1

    redis_client.script_flush()
    assert lease.renew()  # a direct call: NOSCRIPT, SCRIPT LOAD, EVALSHA again
    redis_client.script_flush()
    assert pub.frames([frame_result("j", masks(k), random_weights=False) for k in (1, 2)]) == 2  # a pipeline
    redis_client.script_flush()
    assert take(redis_client, scripts, keys, entry, "j", "a", 5000)  # taking it again: the same owner
    redis_client.script_flush()
    pub.event(messages.Progress("j", 3, 3))  # the owner check before a shared stream's write
    redis_client.script_flush()
    pub.set_state(state=JobState.RUNNING.value)
    redis_client.script_flush()
    assert pub.terminal(messages.Completed("j", "", 3, 1), ttl_s=60)
    ids = [i.decode() for i, _ in redis_client.xrange(keys.results("j"))]
    assert ids == ["1-0", "2-0", "3-0", TERMINAL_ENTRY_ID]
    assert redis_client.hget(keys.job("j"), "state") == b"completed"
    assert calls(redis_client, "eval") == 0


def test_a_worker_runs_its_scripts_by_evalsha_and_never_sends_their_text(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis
) -> None:
    """INFO commandstats on the test's own redis-server: during a job (and a job after SCRIPT FLUSH) every
    fenced write, renewal and terminal step is an EVALSHA; EVAL is never sent, SCRIPT LOAD only after the
    flush."""
    for job_id in ("first", "second"):
        submit(video, prompt, settings=settings, client=redis_client, job_id=job_id)  # the producer's own EVAL
    redis_client.config_resetstat()
    worker = Worker(settings=settings, segmenter=ColourSegmenter(), client=redis_client, name="w")
    assert worker.run(burst=True) == 2
    assert calls(redis_client, "eval") == 0
    assert calls(redis_client, "evalsha") >= 2 * (N + 2)  # at least every frame, started and the terminal step

    submit(video, prompt, settings=settings, client=redis_client, job_id="after-flush")
    redis_client.script_flush()
    redis_client.config_resetstat()
    assert Worker(settings=settings, segmenter=ColourSegmenter(), client=redis_client, name="w2").run(burst=True) == 1
    assert redis_client.hget(settings.keys.job("after-flush"), "state") == b"completed"
    assert calls(redis_client, "eval") == 0 and calls(redis_client, "evalsha") >= N + 2
    assert 1 <= calls(redis_client, "script|load") <= len(vars(Scripts(redis_client)))  # each one used, once
