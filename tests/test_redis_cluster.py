"""Integration tier: the service on a real Redis Cluster (three masters on free ports, VSEG_REDIS_CLUSTER=on, the
URL naming one node): submit -> worker -> watch, a kill -9 reclaim, cancel of a queued and of a running job.
Every script touches one job's keys (one slot), so nothing here is CROSSSLOT; and the jobs' keys land on
different nodes, which is the point of a cluster."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.control import cancel, status
from producer.migrate import migrate
from producer.stats import collect_stats
from producer.submission import submit
from runtime.connection import connect, is_cluster
from runtime.settings import Settings
from schemas import messages
from schemas.errors import LayoutError
from schemas.names import LAYOUT_VERSION, TERMINAL_ENTRY_ID
from schemas.prompts import ObjectPrompt
from tests.cluster import RedisClusterNodes
from tests.videos import disc_center
from tests.workers import ROOT, WorkerProcess, wait_for, worker_env

pytestmark = pytest.mark.integration

N = 16
SIZE = (96, 64)
CLUSTER_ENV = {"VSEG_REDIS_CLUSTER": "on"}


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes(tmp_path_factory.mktemp("cluster")).start()
    yield nodes
    nodes.stop()


@pytest.fixture
def csettings(redis_cluster: RedisClusterNodes, storage_root: Path) -> Settings:
    redis_cluster.flush()
    return Settings.load(environ={}, redis_url=redis_cluster.url, redis_cluster="on", storage_root=storage_root,
                         block_ms=200, progress_every=5)


@pytest.fixture
def client(csettings: Settings) -> Iterator[redis.Redis]:
    c = connect(csettings)
    yield c
    c.close()


def state(client: redis.Redis, settings: Settings, job_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(settings.keys.job(job_id)).items()}


def node_of(client: redis.Redis, key: str) -> int:
    return int(client.get_node_from_key(key).port)  # type: ignore[attr-defined]


def ids_on_every_node(client: redis.Redis, settings: Settings, n: int = 3) -> list[str]:
    """Job ids whose keys land on `n` different nodes (picked by their hash slot, so the test does not hope)."""
    by_node: dict[int, str] = {}
    k = 0
    while len(by_node) < n:
        by_node.setdefault(node_of(client, settings.keys.job(f"cl-{k}")), f"cl-{k}")
        k += 1
    return list(by_node.values())


def assert_complete_exactly_once(client: redis.Redis, settings: Settings, job_id: str) -> None:
    ids = [i.decode() for i, _ in client.xrange(settings.keys.results(job_id))]
    assert ids == ["0-1"] + [f"{k + 1}-0" for k in range(N)] + [TERMINAL_ENTRY_ID], ids
    last = messages.decode(client.xrange(settings.keys.results(job_id))[-1][1])
    assert isinstance(last, messages.Completed) and (settings.storage_root / last.render_path).is_file()


def terminal_events(client: redis.Redis, settings: Settings) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for _, fields in client.xrange(settings.keys.events):
        msg = messages.decode(fields)
        if isinstance(msg, messages.Terminal):
            out.setdefault(msg.job_id, []).append(msg.TYPE.value)
    return out


def cli(args: list[str], settings: Settings, cluster: str = "on") -> subprocess.CompletedProcess[str]:
    env = {**worker_env(settings), "VSEG_REDIS_CLUSTER": cluster, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "producer", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_submit_worker_watch_on_a_cluster_with_jobs_on_every_node(
    video: Path, prompt: list[ObjectPrompt], csettings: Settings, client: redis.Redis, tmp_path: Path
) -> None:
    assert is_cluster(client)
    keys = csettings.keys
    jobs = ids_on_every_node(client, csettings)
    x, y = disc_center(0, N, SIZE)
    out = cli(["submit", str(video), "--point", f"1:{x:.0f},{y:.0f}", "--job-id", jobs[0]], csettings)
    assert out.returncode == 0 and out.stdout.strip() == jobs[0], out.stderr[-2000:]
    for job_id in jobs[1:]:
        assert submit(video, prompt, settings=csettings, client=client, job_id=job_id).created
    assert client.get(keys.layout) == LAYOUT_VERSION.encode()
    w = WorkerProcess(csettings, "w", tmp_path, lease_s=1.0, delay_s=0.01, env=CLUSTER_ENV,
                      extra=["--concurrency", "3"])  # the three jobs, on three nodes, held at once
    try:
        for job_id in jobs:
            wait_for(lambda j=job_id: state(client, csettings, j).get("state") == "completed", timeout_s=60,  # type: ignore[misc]
                     what=f"{job_id} completes")
        watched = cli(["watch", jobs[0], "--out", str(tmp_path / "out")], csettings)
        assert watched.returncode == 0, watched.stderr[-2000:]
        masks = json.loads((tmp_path / "out" / "masks.json").read_text())
        assert len(masks["frames"]) == N
    finally:
        w.signal(signal.SIGTERM)
        w.wait()
    assert "CROSSSLOT" not in w.log() and "Traceback" not in w.log(), w.log()[-3000:]
    for job_id in jobs:
        assert_complete_exactly_once(client, csettings, job_id)
        own = {node_of(client, k) for k in (keys.job(job_id), keys.results(job_id), keys.frames(job_id))}
        assert len(own) == 1  # one job's keys: one slot, one node
    assert len({node_of(client, keys.job(j)) for j in jobs}) == 3  # the jobs themselves: spread over the nodes
    assert {j: v for j, v in terminal_events(client, csettings).items() if j in jobs} == {j: ["completed"] for j in jobs}
    assert client.xlen(keys.jobs) == 0
    stats = collect_stats(client, keys)
    assert (stats.length, stats.pending, stats.group_exists) == (0, 0, True) and stats.events > 0


def test_killed_worker_job_is_reclaimed_on_a_cluster_with_every_frame_once(
    video: Path, prompt: list[ObjectPrompt], csettings: Settings, client: redis.Redis, tmp_path: Path
) -> None:
    submit(video, prompt, settings=csettings, client=client, job_id="crash")
    a = WorkerProcess(csettings, "a", tmp_path, lease_s=1.0, delay_s=0.15, env=CLUSTER_ENV)
    wait_for(lambda: int(state(client, csettings, "crash").get("frames_done", 0)) >= 4, what="a publishes frames")
    a.kill()
    assert state(client, csettings, "crash")["owner"] == "a"
    b = WorkerProcess(csettings, "b", tmp_path, lease_s=1.0, delay_s=0.01, env=CLUSTER_ENV)
    try:
        wait_for(lambda: state(client, csettings, "crash").get("state") == "completed", what="b completes")
    finally:
        b.signal(signal.SIGTERM)
        b.wait()
    assert_complete_exactly_once(client, csettings, "crash")
    st = state(client, csettings, "crash")
    assert st["attempt"] == "2" and st["owner"] == "b"
    assert "reclaimed job entry" in b.log() and "Traceback" not in b.log(), b.log()[-3000:]
    assert terminal_events(client, csettings)["crash"] == ["completed"]


def test_cancel_of_a_queued_and_of_a_running_job_on_a_cluster(
    video: Path, prompt: list[ObjectPrompt], csettings: Settings, client: redis.Redis, tmp_path: Path
) -> None:
    keys = csettings.keys
    submit(video, prompt, settings=csettings, client=client, job_id="queued")
    assert cancel("queued", settings=csettings, client=client) == "cancelled"
    assert client.xlen(keys.jobs) == 0 and status("queued", settings=csettings, client=client)["state"] == "cancelled"
    assert terminal_events(client, csettings)["queued"] == ["cancelled"]

    submit(video, prompt, settings=csettings, client=client, job_id="running")
    w = WorkerProcess(csettings, "w", tmp_path, lease_s=1.0, delay_s=0.2, env=CLUSTER_ENV)
    try:
        wait_for(lambda: int(state(client, csettings, "running").get("frames_done", 0)) >= 2, what="frames")
        assert cancel("running", settings=csettings, client=client) == "requested"
        wait_for(lambda: state(client, csettings, "running").get("state") == "cancelled", what="cancelled")
    finally:
        w.signal(signal.SIGTERM)
        w.wait()
    last = messages.decode(client.xrange(keys.results("running"))[-1][1])
    assert isinstance(last, messages.Cancelled) and last.frames_done < N
    assert client.xlen(keys.jobs) == 0 and terminal_events(client, csettings)["running"] == ["cancelled"]
    assert "Traceback" not in w.log(), w.log()[-3000:]


def test_migrate_refuses_a_cluster_and_a_client_without_cluster_mode_is_told_to_turn_it_on(
    csettings: Settings, client: redis.Redis
) -> None:
    with pytest.raises(LayoutError, match="is a cluster"):
        migrate(client, csettings.keys)
    out = cli(["migrate"], csettings)
    assert out.returncode == 1 and "is a cluster" in out.stderr and "Traceback" not in out.stderr, out.stderr
    plain = cli(["cancel", "some-job"], csettings, cluster="off")  # a plain client meets MOVED
    assert plain.returncode == 2 and "VSEG_REDIS_CLUSTER=on" in plain.stderr, plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1
