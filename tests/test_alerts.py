"""The events consumer (producer/alerts.py) against a real Redis.

In this process, on result streams written by the test (every mask known): the events on `vseg:alerts` and the
job's stream in order, with their keys, valid against the contract; the job's alerts and state set to expire
after its terminal entry; a crash between publishing and acknowledging gives the same keys again and none
missing; a job started while the consumer was down is found when it starts; a job without zones costs no
decoding until the viewer gives it zones; Redis restarted (with its data, then empty) is waited out.

As `python -m producer alerts` beside a worker whose fake segmenter follows the test clip's moving disc through
a zone and across a line: the events the judge gives for the published masks, on both streams and at the
webhook (signed); a kill -9 midway and a restart lose none; metrics; SIGTERM exits 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import http.server
import json
import signal
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import msgspec
import numpy as np
import pytest
import redis

import producer.alert_follow
from producer.alerts import AlertsService
from producer.local_redis import RedisServer, free_port
from producer.submission import submit
from producer.zone_judge import FrameIn, ObjectMask, Rules, ZoneJudge
from producer.zones import ZoneSet, parse_zones
from runtime.connection import connect
from runtime.settings import Settings
from schemas import alerts, contract, messages
from schemas.alerts import AlertEvent
from schemas.names import STARTED_ENTRY_ID, TERMINAL_ENTRY_ID, frame_entry_id
from schemas.rle import encode_mask, mask_bbox_xyxy
from tests.videos import disc_prompt
from tests.workers import LoggedProcess, start_worker, wait_for, worker_env

pytestmark = pytest.mark.integration

W, H = 100, 60
ZONES = parse_zones(["right:50,0,100,0,100,60,50,60"], ["mid:50,0,50,60"])
WALK = [10, 20, 30, 40, 45, 50, 60, 70, 70, 70, 70, 70, 40, 30]  # a 10x10 box's left edge, frame by frame


def box(x: int | None) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    if x is not None:
        mask[25:35, x:x + 10] = True
    return mask


def start_job(client: redis.Redis, settings: Settings, job_id: str, zones: ZoneSet | None = ZONES) -> None:
    keys = settings.keys
    client.hset(keys.job(job_id), mapping={"state": "running", "fps": "10", "camera": "gate",
                                           **({"zones": zones.to_json()} if zones else {})})
    started = messages.encode(messages.Started(job_id, "w1", len(WALK), (1,)))
    client.xadd(keys.results(job_id), cast(Any, started), id=STARTED_ENTRY_ID)
    client.xadd(keys.events, cast(Any, started))


def write_frames(client: redis.Redis, settings: Settings, job_id: str, positions: list[int | None],
                 start: int = 0) -> None:
    for k, x in enumerate(positions, start):
        mask = box(x)
        obj = messages.ObjectResult(1, encode_mask(mask), mask_bbox_xyxy(mask), int(mask.sum()), 1.0)
        client.xadd(settings.keys.results(job_id), cast(Any, messages.encode(messages.FrameResult(job_id, k, (obj,)))),
                    id=frame_entry_id(k))


def finish(client: redis.Redis, settings: Settings, job_id: str) -> None:
    done = messages.encode(messages.Completed(job_id, "", len(WALK), 1))
    client.xadd(settings.keys.results(job_id), cast(Any, done), id=TERMINAL_ENTRY_ID)
    client.hset(settings.keys.job(job_id), "state", "completed")


def expected(job_id: str, positions: list[int | None], rules: Rules, zones: ZoneSet = ZONES,
             start: int = 0) -> list[AlertEvent]:
    judge = ZoneJudge(job_id, rules, camera="gate")
    return [e for k, x in enumerate(positions, start)
            for e in judge.judge(FrameIn(k, k / 10, W, H, [ObjectMask(1, box(x))]), zones, at=0.0)]


def published(client: redis.Redis, key: str, *, validate: bool = False) -> list[AlertEvent]:
    out = []
    for _id, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(key)):
        if validate:
            contract.validate_entry(fields)
        event = alerts.decode(fields)
        assert fields[b"type"].decode() == event.type and fields[b"key"].decode() == event.key
        out.append(msgspec.structs.replace(event, at=0.0))
    return out


def following(client: redis.Redis, settings: Settings, group: str = "alerts") -> set[bytes]:
    return cast(set[bytes], client.smembers(settings.keys.alerts_jobs(group)))


class Crash(Exception):
    """The crash a test injects into the service's thread."""


@contextmanager
def service(settings: Settings, **kwargs: Any) -> Iterator[AlertsService]:
    svc = AlertsService(settings, **kwargs)
    stop = threading.Event()

    def run() -> None:
        try:
            svc.run(stop)
        except Crash:
            pass  # the test's crash: this "process" is gone

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: svc.started or not thread.is_alive(), 10, "the service's groups")
        yield svc
    finally:
        stop.set()
        thread.join(10)


def test_events_in_order_on_both_streams_then_the_job_expires_with_its_results(settings: Settings,
                                                                                 redis_client: redis.Redis) -> None:
    keys, want = settings.keys, expected("j1", WALK, Rules.of(settings))
    assert [(e.type, e.frame_idx) for e in want] == [("zone_enter", 4), ("line_cross", 5), ("zone_leave", 12),
                                                     ("line_cross", 12)]
    with service(settings) as svc:
        start_job(redis_client, settings, "j1")
        write_frames(redis_client, settings, "j1", WALK)
        wait_for(lambda: redis_client.xlen(keys.job_alerts("j1")) >= len(want), 10, "the job's events")
        finish(redis_client, settings, "j1")
        wait_for(lambda: not following(redis_client, settings), 10, "the job's end")
        assert svc.followers == {}
    assert published(redis_client, keys.alerts, validate=True) == want
    assert published(redis_client, keys.job_alerts("j1"), validate=True) == want
    assert len({e.key for e in want}) == len(want) and want[1].key == "j1:5:1:line_cross:mid"
    assert [want[1].direction, want[3].direction] == ["out", "in"]
    assert want[0].camera == "gate" and want[0].t_s == pytest.approx(0.4) and want[0].overlap == 0.5
    for key in (keys.job_alerts("j1"), keys.zone_state("j1")):
        assert 0 < redis_client.ttl(key) <= settings.results_ttl_s
    state = msgspec.json.decode(redis_client.get(keys.zone_state("j1")))
    assert state["last_id"] == frame_entry_id(len(WALK) - 1) and state["fps"] == 10.0
    assert redis_client.xpending(keys.results("j1"), "alerts")["pending"] == 0


def test_a_crash_between_publishing_and_acknowledging_gives_the_same_keys_again(
        settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    keys, want = settings.keys, expected("j1", WALK, Rules.of(settings))
    real = producer.alert_follow.JobFollower._publish

    def crash_after_the_shared_stream(self: Any, events: list[AlertEvent], *args: Any) -> None:
        if events:  # the crash: vseg:alerts written, the job's stream, state and acknowledgements not
            for event in events:
                redis_client.xadd(keys.alerts, cast(Any, alerts.encode(event)))
            raise Crash
        real(self, events, *args)

    monkeypatch.setattr(producer.alert_follow.JobFollower, "_publish", crash_after_the_shared_stream)
    with service(settings):
        start_job(redis_client, settings, "j1")
        write_frames(redis_client, settings, "j1", WALK[:6])  # in the zone from frame 4, confirmed at 5
        wait_for(lambda: redis_client.xlen(keys.alerts) >= 1, 10, "the first event")
    assert redis_client.xlen(keys.job_alerts("j1")) == 0  # its state saved before that batch, if any
    monkeypatch.setattr(producer.alert_follow.JobFollower, "_publish", real)
    with service(settings):  # a restart: the pending entries read again and judged from the saved state
        write_frames(redis_client, settings, "j1", WALK[6:], start=6)
        finish(redis_client, settings, "j1")
        wait_for(lambda: not following(redis_client, settings), 10, "the job's end")
    shared = published(redis_client, keys.alerts)
    again = len(shared) - len(want)  # the crashed batch's events, published twice under the same keys
    assert again >= 1 and shared[:again] == want[:again] and shared[again:] == want
    assert published(redis_client, keys.job_alerts("j1")) == want


def test_a_job_started_while_the_consumer_was_down_is_found_when_it_starts(settings: Settings,
                                                                             redis_client: redis.Redis) -> None:
    with service(settings):
        pass  # the groups exist from now on
    start_job(redis_client, settings, "late")
    write_frames(redis_client, settings, "late", WALK)
    finish(redis_client, settings, "late")
    with service(settings):
        wait_for(lambda: redis_client.xlen(settings.keys.job_alerts("late")) == 4, 10, "the late job's events")
        wait_for(lambda: not following(redis_client, settings), 10, "the job's end")


def test_a_job_without_zones_is_not_decoded_until_it_gets_some(settings: Settings, redis_client: redis.Redis,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    keys, decoded = settings.keys, []
    real = messages.decode

    def counted(fields: Any) -> messages.Message:
        msg = real(fields)
        if isinstance(msg, messages.FrameResult):
            decoded.append(msg.frame_idx)
        return msg

    monkeypatch.setattr(producer.alert_follow.messages, "decode", counted)
    with service(settings):
        start_job(redis_client, settings, "plain", zones=None)
        write_frames(redis_client, settings, "plain", WALK[:8])
        wait_for(lambda: redis_client.xpending(keys.results("plain"), "alerts")["pending"] == 0
                 and redis_client.xinfo_groups(keys.results("plain"))[0]["last-delivered-id"] == b"8-0", 10,
                 "the frames read")
        assert decoded == [] and redis_client.xlen(keys.alerts) == 0
        redis_client.hset(keys.job("plain"), "zones", ZONES.to_json())  # the viewer draws a zone: judged from now
        write_frames(redis_client, settings, "plain", WALK[8:], start=8)
        finish(redis_client, settings, "plain")
        wait_for(lambda: not following(redis_client, settings), 10, "the job's end")
    # judged from frame 8 on, where the box is in the zone already, on the line's left
    want = expected("plain", WALK[8:], Rules.of(settings), start=8)
    assert [(e.type, e.frame_idx) for e in want] == [("zone_enter", 8), ("zone_leave", 12), ("line_cross", 12)]
    assert published(redis_client, keys.job_alerts("plain")) == want
    assert decoded == list(range(8, len(WALK)))


def test_redis_restarted_with_its_data_then_empty_is_waited_out(tmp_path: Path, storage_root: Path) -> None:
    server = RedisServer(data_dir=tmp_path / "redis", appendonly=True)
    server.data_dir.mkdir()
    server.start()
    settings = Settings.load(environ={}, redis_url=server.url, storage_root=storage_root, block_ms=200,
                             socket_timeout_s=2.0)
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    keys = settings.keys
    try:
        with service(settings, client=connect(settings, retries=1)) as svc:  # fails fast: the test's time
            start_job(client, settings, "j1")
            write_frames(client, settings, "j1", WALK[:8])
            wait_for(lambda: client.xlen(keys.job_alerts("j1")) == 2, 10, "the events before the outage")
            server.stop()  # a clean stop: appendonly, the data comes back
            wait_for(lambda: not svc.redis_ok, 10, "the outage seen")
            server.start()
            wait_for(lambda: svc.redis_ok, 20, "Redis seen back")
            write_frames(client, settings, "j1", WALK[8:], start=8)
            finish(client, settings, "j1")
            wait_for(lambda: not following(client, settings), 20, "the job's end after the outage")
            assert [e.key for e in published(client, keys.job_alerts("j1"))] == [
                e.key for e in expected("j1", WALK, Rules.of(settings))]
            server.kill()
            wait_for(lambda: not svc.redis_ok, 10, "the second outage seen")
            server = RedisServer(port=server.port, data_dir=tmp_path / "empty")
            server.data_dir.mkdir()
            server.start()  # empty: no group, no job; the next job is found all the same
            wait_for(lambda: svc.redis_ok and group_ready(client, settings, "alerts"), 20, "the group made again")
            start_job(client, settings, "j2")
            write_frames(client, settings, "j2", WALK)
            wait_for(lambda: client.xlen(keys.job_alerts("j2")) == 4, 20, "the next job's events")
    finally:
        client.close()
        server.stop()


def test_a_live_jobs_skipped_frames_are_passed_over_and_its_times_are_its_timestamps(
        settings: Settings, redis_client: redis.Redis) -> None:
    keys, rules = settings.keys, Rules.of(settings)
    with service(settings):
        start_job(redis_client, settings, "cam-1")
        processed = []
        for k, x in enumerate(WALK + [70]):  # every third frame skipped (no objects: it would leave the zone)
            skipped = k % 3 == 2
            mask = box(x)
            objects = () if skipped else (messages.ObjectResult(1, encode_mask(mask), mask_bbox_xyxy(mask),
                                                                int(mask.sum()), 1.0),)
            frame = messages.FrameResult("cam-1", k, objects, skipped=skipped, captured_at=1e9 + k / 10,
                                         pts_s=100 + k / 10)
            redis_client.xadd(keys.results("cam-1"), cast(Any, messages.encode(frame)), id=frame_entry_id(k))
            if not skipped:
                processed.append(FrameIn(k, 100 + k / 10, W, H, [ObjectMask(1, mask)], 1e9 + k / 10))
        judge = ZoneJudge("cam-1", rules, camera="gate")
        want = [e for f in processed for e in judge.judge(f, ZONES, at=0.0)]
        wait_for(lambda: redis_client.xlen(keys.job_alerts("cam-1")) >= len(want), 10, "the live job's events")
    got = published(redis_client, keys.job_alerts("cam-1"))
    assert got == want and len(want) == 4
    assert got[0].t_s == pytest.approx(100.4) and got[0].captured_at == pytest.approx(1e9 + 0.4)


def test_on_a_redis_cluster_jobs_on_every_node(tmp_path: Path, storage_root: Path) -> None:
    from tests.cluster import RedisClusterNodes

    nodes = RedisClusterNodes(tmp_path / "cluster").start()
    try:
        settings = Settings.load(environ={}, redis_url=nodes.url, redis_cluster="on", storage_root=storage_root,
                                 block_ms=200)
        client = connect(settings)
        jobs = [f"job{i}" for i in range(6)]
        assert len({client.get_node_from_key(settings.keys.results(j)).port for j in jobs}) == 3  # type: ignore[attr-defined]
        with service(settings):
            for job_id in jobs:
                start_job(client, settings, job_id)
                write_frames(client, settings, job_id, WALK)
                finish(client, settings, job_id)
            # every job's events out, then none followed (the consumer may find the last job after the others end)
            wait_for(lambda: client.xlen(settings.keys.alerts) >= 4 * len(jobs) and not following(client, settings),
                     30, "every job's events and end")
        for job_id in jobs:
            assert published(client, settings.keys.job_alerts(job_id)) == expected(job_id, WALK, Rules.of(settings))
        assert client.xlen(settings.keys.alerts) == 4 * len(jobs)
    finally:
        nodes.stop()


def test_the_command_line_refuses_a_bad_webhook_or_group_in_one_line(settings: Settings,
                                                                     caplog: pytest.LogCaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from producer.cli import main

    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    assert main(["alerts", "--webhook", "ftp://example.com/x"]) == 2
    assert main(["alerts", "--group", "no spaces"]) == 2
    assert "--webhook must be an http:// or https:// URL" in caplog.text and "--group must be 1-64" in caplog.text


# As a process of its own, beside a worker: the test clip's disc moves left to right through a band and a line.

N, SIZE, FPS = 40, (96, 64), 10
DISC = parse_zones(["band:30,0,60,0,60,64,30,64"], ["mid:48,0,48,64"])
ENV = {"VSEG_DWELL_S": "0.5", "VSEG_WEBHOOK_SECRET": "s3cret", "VSEG_RETRY_BACKOFF_S": "0.05"}


def alerts_process(settings: Settings, log_dir: Path, name: str, *extra: str) -> LoggedProcess:
    return LoggedProcess([sys.executable, "-m", "producer", "alerts", *extra], {**worker_env(settings), **ENV},
                         log_dir, name)


def group_ready(client: redis.Redis, settings: Settings, group: str) -> bool:
    try:
        return any(g["name"].decode() == group for g in client.xinfo_groups(settings.keys.events))
    except redis.ResponseError:
        return False


def run_worker(settings: Settings, client: redis.Redis, delay_s: float) -> threading.Thread:
    return start_worker(settings, client, delay_s, name="w")


def judged(client: redis.Redis, settings: Settings, job_id: str) -> list[AlertEvent]:
    """What the judge gives for the masks the worker published (the process must give the same)."""
    judge, out = ZoneJudge(job_id, Rules.of(dataclasses.replace(settings, dwell_s=0.5))), []
    for _id, fields in client.xrange(settings.keys.results(job_id)):
        msg = messages.decode(fields)
        if isinstance(msg, messages.FrameResult):
            objects = [ObjectMask(o.obj_id, o.mask) for o in msg.objects]
            out += judge.judge(FrameIn(msg.frame_idx, msg.frame_idx / FPS, SIZE[0], SIZE[1], objects), DISC, at=0.0)
    return out


class Receiver(http.server.BaseHTTPRequestHandler):
    got: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:
        Receiver.got.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_beside_a_worker_with_a_webhook_and_metrics_then_sigterm(video: Path, settings: Settings,
                                                                  redis_client: redis.Redis, tmp_path: Path) -> None:
    keys = settings.keys
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    Receiver.got = []
    port = free_port()
    proc = alerts_process(settings, tmp_path, "alerts", "--metrics-port", str(port), "--webhook",
                          f"http://127.0.0.1:{receiver.server_address[1]}/hook")
    try:
        wait_for(lambda: group_ready(redis_client, settings, "alerts"), 30, "the alerts process's group")
        submit(video, [disc_prompt(1, 0, N, SIZE)], settings=settings, job_id="walk", zones=DISC)
        run_worker(settings, redis_client, 0.0).join(60)
        want = judged(redis_client, settings, "walk")
        assert sorted({e.type for e in want}) == ["dwell", "line_cross", "zone_enter", "zone_leave"]
        wait_for(lambda: not following(redis_client, settings) and len(Receiver.got) >= len(want), 30,
                 f"the job's end and its events at the webhook\n{proc.log()}")
        for stream in (keys.alerts, keys.job_alerts("walk")):
            assert [msgspec.structs.replace(e, at=0.0, camera="") for e in published(redis_client, stream,
                                                                                      validate=True)] == want
        assert [json.loads(body)["key"] for _h, body in Receiver.got] == [e.key for e in want]
        for headers, body in Receiver.got:
            assert headers["X-Vseg-Signature"] == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
            assert headers["X-Vseg-Event-Key"] == json.loads(body)["key"]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'vseg_zone_events_total{type="line_cross",zone="mid"} 1.0' in metrics
        assert 'vseg_zone_events_total{type="dwell",zone="band"} 1.0' in metrics
        assert f'vseg_webhook_deliveries_total{{outcome="delivered"}} {float(len(want))}' in metrics
        assert "vseg_alerts_jobs_followed 0.0" in metrics
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status == 200
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 0, proc.log()
        assert "line_cross mid out" in proc.log() and "stopped" in proc.log()
    finally:
        proc.kill()
        receiver.shutdown()


def test_kill_9_midway_and_a_restart_lose_no_event(video: Path, settings: Settings, redis_client: redis.Redis,
                                                   tmp_path: Path) -> None:
    keys = settings.keys
    first = alerts_process(settings, tmp_path, "alerts-1")
    wait_for(lambda: group_ready(redis_client, settings, "alerts"), 30, "the alerts process's group")
    submit(video, [disc_prompt(1, 0, N, SIZE)], settings=settings, job_id="walk", zones=DISC)
    worker = run_worker(settings, redis_client, 0.1)
    wait_for(lambda: redis_client.xlen(keys.job_alerts("walk")) >= 1, 30, f"a first event\n{first.log()}")
    first.kill()
    frames_done = int(redis_client.hget(keys.job("walk"), "frames_done") or 0)
    second = alerts_process(settings, tmp_path, "alerts-2")
    try:
        worker.join(60)
        want = judged(redis_client, settings, "walk")
        wait_for(lambda: not following(redis_client, settings), 30, f"the job's end\n{second.log()}")
        for stream in (keys.alerts, keys.job_alerts("walk")):
            got = [msgspec.structs.replace(e, at=0.0, camera="") for e in published(redis_client, stream)]
            assert {e.key for e in got} == {e.key for e in want}, "every event at least once, and no other"
            by_key = {e.key: e for e in want}
            assert all(e == by_key[e.key] for e in got), "a duplicate is the same event"
        assert frames_done < N, "killed while the job ran"
    finally:
        second.signal(signal.SIGTERM)
        assert second.wait(15) == 0


def test_a_new_group_follows_the_jobs_already_running_from_their_newest_frame(settings: Settings,
                                                                              redis_client: redis.Redis) -> None:
    """`alerts` started for the first time while cameras run: their jobs are judged from now on (no past
    replayed), and a job that already ended is not followed."""
    start_job(redis_client, settings, "running")
    write_frames(redis_client, settings, "running", WALK[:6])  # entered and crossed before the consumer came
    start_job(redis_client, settings, "ended")
    write_frames(redis_client, settings, "ended", WALK)
    finish(redis_client, settings, "ended")
    with service(settings) as svc:
        wait_for(lambda: following(redis_client, settings) == {b"running"}, 10, "the running job adopted")
        assert not redis_client.xlen(settings.keys.alerts)  # nothing of the past
        write_frames(redis_client, settings, "running", WALK[6:], start=6)  # judged from here, afresh
        want = expected("running", WALK[6:], Rules.of(settings), start=6)
        assert [e.type for e in want] == ["zone_enter", "zone_leave", "line_cross"]  # seen inside first: entered
        wait_for(lambda: redis_client.xlen(settings.keys.job_alerts("running")) >= len(want), 10, "judged from now")
        assert svc.started
    assert published(redis_client, settings.keys.job_alerts("running")) == want
    assert not redis_client.exists(settings.keys.job_alerts("ended"))
