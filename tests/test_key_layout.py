"""Integration tier: the key layout marker (runtime/layout.py) and `python -m producer migrate`.

A Redis with jobs of the old key layout (1: `vseg:job:id`, no hash tag) is refused by submit and by a worker
with a message that says what to do, nothing written; `migrate` renames the keys, after which a queued job
and one whose worker was killed mid-job both run to their end under layout 2, every frame once. An empty
Redis just gets the marker. The old layout is made here by renaming a real job's keys back to their old
names (the entries on the jobs stream are the same in both layouts)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from producer.migrate import migrate
from producer.submission import submit
from runtime.layout import ensure_layout
from runtime.settings import Settings
from schemas.errors import LayoutError
from schemas.names import LAYOUT_VERSION, TERMINAL_ENTRY_ID
from schemas.prompts import ObjectPrompt
from tests.fakes import ColourSegmenter
from tests.videos import disc_center
from tests.workers import ROOT, WorkerProcess, wait_for, worker_env
from worker.service.loop import Worker

pytestmark = pytest.mark.integration

N = 12
SIZE = (96, 64)


def downgrade(client: redis.Redis, settings: Settings) -> list[str]:
    """Rename every job key to its layout-1 name (fence fields dropped: layout 1 had none), remove the marker and
    the (killed) workers' health keys: a Redis as the previous version left it. Returns the old names."""
    old = []
    for raw in list(client.scan_iter(match=f"{settings.key_prefix}:*{{*}}*")):
        key = raw.decode()
        name = key.replace("{", "").replace("}", "")
        if key.startswith(settings.keys.job("")[:-2]) and not key.endswith("submit-lock"):
            client.hdel(key, "owner", "lease_until", "event_copied")
        client.rename(key, name)
        old.append(name)
    client.delete(settings.keys.layout, *client.keys(settings.keys.worker_health("*")))
    return sorted(old)


def results(client: redis.Redis, settings: Settings, job_id: str) -> list[str]:
    return [i.decode() for i, _ in client.xrange(settings.keys.results(job_id))]


def test_an_empty_redis_gets_the_marker(settings: Settings, redis_client: redis.Redis) -> None:
    assert redis_client.get(settings.keys.layout) is None
    ensure_layout(redis_client, settings.keys)
    assert redis_client.get(settings.keys.layout) == LAYOUT_VERSION.encode()
    assert migrate(redis_client, settings.keys).moved == []  # idempotent: nothing to move


def test_old_layout_is_refused_then_migrated_and_its_jobs_complete(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    keys = settings.keys
    submit(video, prompt, settings=settings, client=redis_client, job_id="inflight")
    a = WorkerProcess(settings, "a", tmp_path, lease_s=1.0, delay_s=0.15)
    wait_for(lambda: int(redis_client.hget(keys.job("inflight"), "frames_done") or 0) >= 3, what="a publishes")
    a.kill()
    submit(video, prompt, settings=settings, client=redis_client, job_id="queued")
    old = downgrade(redis_client, settings)
    assert "vseg:job:queued" in old and "vseg:results:inflight" in old and redis_client.xlen(keys.jobs) == 2

    with pytest.raises(LayoutError, match="python -m producer migrate"):
        submit(video, prompt, settings=settings, client=redis_client, job_id="new")
    env = {**worker_env(settings), "HF_HUB_OFFLINE": "1"}
    x, y = disc_center(0, N, SIZE)
    out = subprocess.run([sys.executable, "-m", "producer", "submit", str(video), "--point", f"1:{x:.0f},{y:.0f}",
                          "--job-id", "new"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "old key layout" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    with pytest.raises(LayoutError, match="old key layout"):
        Worker(settings=settings, segmenter=ColourSegmenter(), client=redis_client, name="w").run(burst=True)
    assert not redis_client.exists(keys.job("new"), keys.layout) and not (settings.storage_root / "jobs/new").exists()
    assert sorted(k.decode() for k in redis_client.scan_iter(match="vseg:*{*")) == []  # nothing of layout 2 written

    redis_client.set(keys.worker_health("old-worker"), "{}", ex=30)
    with pytest.raises(LayoutError, match="stop every worker"):
        migrate(redis_client, keys)
    redis_client.delete(keys.worker_health("old-worker"))
    out = subprocess.run([sys.executable, "-m", "producer", "migrate"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "vseg:job:queued -> vseg:job:{queued}" in out.stdout and "moved to key layout 2" in out.stdout
    assert redis_client.get(keys.layout) == LAYOUT_VERSION.encode()
    assert migrate(redis_client, keys).moved == []  # again: nothing left to move

    b = WorkerProcess(settings, "b", tmp_path, lease_s=1.0, delay_s=0.01)
    try:
        for job_id in ("queued", "inflight"):
            wait_for(lambda j=job_id: redis_client.hget(keys.job(j), "state") == b"completed",  # type: ignore[misc]
                     timeout_s=60, what=f"{job_id} completes")
    finally:
        b.signal(signal.SIGTERM)
        b.wait()
    for job_id in ("queued", "inflight"):
        assert results(redis_client, settings, job_id) == ["0-1"] + [f"{k + 1}-0" for k in range(N)] + [TERMINAL_ENTRY_ID]
    assert redis_client.hget(keys.job("inflight"), "attempt") == b"2" and "reclaimed" in b.log()
    assert redis_client.xlen(keys.jobs) == 0 and "Traceback" not in b.log(), b.log()[-3000:]
