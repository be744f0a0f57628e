"""The web viewer's HTTP API (producer/ui) against a real Redis: every endpoint, the refusal of each wrong input
(unknown job, point outside the frame, bad zone, zone outside the frame, bad JSON, a write from another site),
access with and without the token, paths that try to leave STORAGE_ROOT, the event streams and their resume,
and `python -m producer ui` as a process.

Most requests go through Starlette's TestClient (the app in this process, no socket); the event streams, the
raw paths and the command run against the real server (`start_ui`: uvicorn in a thread)."""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import redis
from starlette.testclient import TestClient

from producer.cameras import CameraKeys
from producer.enqueue import enqueue
from producer.submission import submit
from producer.ui.app import build_app
from producer.ui.auth import Auth, host_of, is_loopback
from producer.ui.entries import Cursor, alert_json, before, result_json
from producer.ui.media import media_path
from producer.ui.server import start_ui
from producer.zones import ZoneSet, parse_zones
from runtime.settings import Settings
from schemas import messages
from schemas.errors import ConfigError, InputError, StorageError, ZoneError
from schemas.names import frame_entry_id
from schemas.rle import encode_mask, mask_bbox_xyxy
from tests.videos import disc_mask, disc_prompt
from tests.workers import ROOT, wait_for, worker_env

pytestmark = pytest.mark.integration

N = 20
SIZE = (64, 48)
JOB = "j1"
LOOPBACK = "http://127.0.0.1"


@pytest.fixture
def job(settings: Settings, video: Path, redis_client: redis.Redis) -> str:
    """A queued file job (no worker) with a zone, its frames on disk."""
    submit(video, [disc_prompt(1, 0, N, SIZE)], settings=settings, job_id=JOB, client=redis_client,
           zones=parse_zones(["door:0,0,30,0,30,30"]))
    return JOB


def publish(client: redis.Redis, settings: Settings, job_id: str, frames: range) -> None:
    """What a worker would write: `started`, then each frame with the disc as object 1."""
    results = settings.keys.results(job_id)
    if not client.exists(results):
        client.xadd(results, messages.encode(messages.Started(job_id, "w", N, (1,))), id="0-1")
    for k in frames:
        mask = disc_mask(k, N, SIZE)
        obj = messages.ObjectResult(1, encode_mask(mask), mask_bbox_xyxy(mask), int(mask.sum()), 0.99)
        client.xadd(results, messages.encode(messages.FrameResult(job_id, k, (obj,))), id=frame_entry_id(k))


def alert(client: redis.Redis, settings: Settings, job_id: str, frame_idx: int, kind: str = "zone_enter") -> str:
    key = f"{job_id}:{frame_idx}:1:{kind}:door"
    data = {"v": 1, "key": key, "type": kind, "job_id": job_id, "camera": "", "obj_id": 1, "zone": "door",
            "frame_idx": frame_idx, "t_s": frame_idx / 10, "captured_at": None, "at": time.time(), "overlap": 0.8,
            "direction": "", "dwell_s": None, "label": ""}
    return client.xadd(settings.keys.job_alerts(job_id), {"type": kind, "key": key, "data": msgpack.packb(data)}).decode()


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    app = build_app(settings, auth=Auth("127.0.0.1", ""), reply_wait_s=0)
    with TestClient(app, base_url=LOOPBACK) as client:
        yield client


class Cameras:
    """A CameraConfig that records what it was asked to save (or refuses, with `refuse`)."""

    def __init__(self, refuse: Exception | None = None) -> None:
        self.saved: list[tuple[str, ZoneSet]] = []
        self.refuse = refuse

    def save_zones(self, camera: str, zones: ZoneSet) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.saved.append((camera, zones))


def live_job(client: redis.Redis, settings: Settings, job_id: str = "cam-1") -> str:
    """A live camera job as its producer enqueues it (no ingest: its hash and its entry)."""
    msg = messages.JobMessage(job_id=job_id, frames_dir=f"jobs/{job_id}/frames", num_frames=1, width=SIZE[0],
                              height=SIZE[1], fps=10.0, prompts=(disc_prompt(1, 0, N, SIZE),), live=True)
    enqueue(client, settings.keys, msg, {"width": str(SIZE[0]), "height": str(SIZE[1]), "fps": "10", "live": "1",
                                         "camera": "gate", "preview": f"jobs/{job_id}/preview/index.m3u8"})
    return job_id


# --- reading ------------------------------------------------------------------------------------------------

def test_a_jobs_info_has_its_size_rate_zones_and_picture(api: TestClient, job: str, video: Path) -> None:
    info = api.get(f"/api/jobs/{job}").json()
    assert (info["width"], info["height"], info["fps"], info["live"], info["camera"]) == (*SIZE, 10.0, False, None)
    assert info["state"] == "queued" and info["writable"] and info["source"] == video.name
    assert info["zones"] == {"zones": [{"name": "door", "points": [[0, 0], [30, 0], [30, 30]]}], "lines": []}
    assert info["media"]["source"] == f"/api/jobs/{job}/video" and info["media"]["render"] is None
    assert info["media"]["frames"] == f"/api/jobs/{job}/frames/{{idx}}.jpg" and info["media"]["preview"] is None
    assert info["prompts"][0]["obj_id"] == 1 and info["fields"]["source_path"] == str(video.resolve())
    assert info["figures"]["num_frames"] == N and info["figures"]["live"] is False and info["start_s"] == 0


def test_the_size_comes_from_the_job_message_then_from_the_masks(api: TestClient, job: str, settings: Settings,
                                                                   redis_client: redis.Redis) -> None:
    redis_client.hdel(settings.keys.job(job), "width", "height", "fps")  # a job submitted by an older producer
    info = api.get(f"/api/jobs/{job}").json()
    assert (info["width"], info["height"], info["fps"]) == (*SIZE, 10.0)
    publish(redis_client, settings, job, range(2))
    redis_client.hdel(settings.keys.job(job), "entry_id")  # its entry gone (the job ended)
    info = api.get(f"/api/jobs/{job}").json()
    assert (info["width"], info["height"], info["fps"]) == (*SIZE, None)


@pytest.mark.parametrize("path", ["", "/video", "/render", "/frames/0.jpg", "/stream"])
def test_an_unknown_job_is_404_and_a_malformed_id_400(api: TestClient, path: str, redis_client: redis.Redis) -> None:
    reply = api.get(f"/api/jobs/nothing-here{path}")
    assert reply.status_code == 404 and "no job 'nothing-here'" in reply.json()["error"]
    reply = api.get(f"/api/jobs/..bad{path}")
    assert reply.status_code == 400 and "job id must be" in reply.json()["error"]


def test_the_source_video_is_served_with_range_requests(api: TestClient, job: str, video: Path) -> None:
    whole = video.read_bytes()
    reply = api.get(f"/api/jobs/{job}/video", headers={"Range": "bytes=100-199"})
    assert reply.status_code == 206 and reply.content == whole[100:200]
    assert reply.headers["content-range"] == f"bytes 100-199/{len(whole)}"
    assert api.get(f"/api/jobs/{job}/video").content == whole


def test_a_source_that_is_not_a_video_file_is_never_served(api: TestClient, job: str, settings: Settings,
                                                           redis_client: redis.Redis, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the viewer")
    redis_client.hset(settings.keys.job(job), "source_path", str(secret))
    reply = api.get(f"/api/jobs/{job}/video")
    assert reply.status_code == 404 and "no source video" in reply.json()["error"]
    assert api.get(f"/api/jobs/{job}").json()["media"]["source"] is None


def test_the_render_is_served_once_written(api: TestClient, job: str, settings: Settings,
                                           redis_client: redis.Redis) -> None:
    reply = api.get(f"/api/jobs/{job}/render")
    assert reply.status_code == 404 and "no render" in reply.json()["error"]
    render = settings.storage_root / "jobs" / job / "render.mp4"
    render.write_bytes(b"\0" * 1000)
    redis_client.hset(settings.keys.job(job), mapping={"render_path": f"jobs/{job}/render.mp4", "state": "completed"})
    reply = api.get(f"/api/jobs/{job}/render", headers={"Range": "bytes=0-9"})
    assert reply.status_code == 206 and reply.headers["content-type"] == "video/mp4" and len(reply.content) == 10
    info = api.get(f"/api/jobs/{job}").json()
    assert info["media"]["render"] == f"/api/jobs/{job}/render" and not info["writable"]


def test_frames_while_they_exist(api: TestClient, job: str, settings: Settings, redis_client: redis.Redis) -> None:
    reply = api.get(f"/api/jobs/{job}/frames/3.jpg")
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/jpeg" and reply.content[:2] == b"\xff\xd8"
    reply = api.get(f"/api/jobs/{job}/frames/{N + 5}.jpg")
    assert reply.status_code == 404 and f"frame {N + 5} of job {job} is not on disk" in reply.json()["error"]
    assert api.get(f"/api/jobs/{job}/frames/x1.jpg").status_code == 400
    live = live_job(redis_client, settings)
    folder = settings.storage_root / "jobs" / live / "frames"
    folder.mkdir(parents=True)
    (folder / "00007.taken.jpg").write_bytes(b"\xff\xd8taken")
    (folder / "00009.jpg").write_bytes(b"\xff\xd8newest")
    reply = api.get(f"/api/jobs/{live}/frames/latest.jpg")
    assert reply.status_code == 200 and reply.headers["x-frame-idx"] == "9" and reply.content.endswith(b"newest")
    assert api.get(f"/api/jobs/{live}/frames/7.jpg").content.endswith(b"taken")


def test_a_live_jobs_info_names_its_preview_and_camera(api: TestClient, settings: Settings,
                                                       redis_client: redis.Redis) -> None:
    live = live_job(redis_client, settings)
    info = api.get(f"/api/jobs/{live}").json()
    assert info["live"] and info["camera"] == "gate" and info["media"]["source"] is None
    assert info["media"]["preview"] == f"/media/jobs/{live}/preview/index.m3u8" and not info["media"]["preview_ready"]
    playlist = settings.storage_root / "jobs" / live / "preview" / "index.m3u8"
    playlist.parent.mkdir(parents=True)
    playlist.write_text("#EXTM3U\n")
    (playlist.parent / "segment_000001.ts").write_bytes(b"G" * 188)
    assert api.get(f"/api/jobs/{live}").json()["media"]["preview_ready"]
    reply = api.get(f"/media/jobs/{live}/preview/index.m3u8")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/vnd.apple.mpegurl")
    assert reply.headers["cache-control"] == "no-cache"
    reply = api.get(f"/media/jobs/{live}/preview/segment_000001.ts")
    assert reply.status_code == 200 and reply.headers["content-type"] == "video/mp2t"
    reply = api.get(f"/media/jobs/{live}/preview/segment_000000.ts")
    assert reply.status_code == 404 and "keeps its last segments" in reply.json()["error"]


def test_media_paths_never_leave_storage_root(settings: Settings, tmp_path: Path, redis_client: redis.Redis) -> None:
    outside = tmp_path / "outside.m3u8"
    outside.write_text("#EXTM3U\nsecret\n")
    (settings.storage_root / "jobs").mkdir()
    (settings.storage_root / "jobs" / "link.m3u8").symlink_to(outside)
    (settings.storage_root / "jobs" / "frame.jpg").write_bytes(b"\xff\xd8")
    for rel in ("../outside.m3u8", "jobs/../../outside.m3u8", str(outside), "jobs/link.m3u8"):
        with pytest.raises(StorageError):
            media_path(settings, rel)
    with pytest.raises(StorageError, match="HLS"):
        media_path(settings, "jobs/frame.jpg")
    with start_ui(settings, "127.0.0.1", 0) as ui:  # raw request lines: no client tidies the path first
        for path in ("/media/../outside.m3u8", "/media/jobs/%2e%2e/%2e%2e/outside.m3u8", "/media//etc/passwd",
                     "/media/jobs/link.m3u8", "/media/jobs/frame.jpg"):
            status, body = raw_get(ui.port, path)
            assert status in (400, 404) and b"secret" not in body and b"root:" not in body, (path, status, body)


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_pages_and_static_files(api: TestClient, job: str) -> None:
    for path in ("/", f"/jobs/{job}"):
        reply = api.get(path)
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
        assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]  # no clickjacking of writes
        assert reply.headers["x-content-type-options"] == "nosniff"
    assert "window.Hls" in api.get("/static/player.js").text
    vendored = api.get("/static/vendor/hls.min.js")
    assert vendored.status_code == 200 and len(vendored.content) > 100_000
    reply = api.get("/api/nothing")
    assert reply.status_code == 404 and "error" in reply.json()


def test_the_overview_lists_cameras_and_recent_jobs(api: TestClient, job: str, settings: Settings,
                                                    redis_client: redis.Redis) -> None:
    keys = CameraKeys(settings.key_prefix)
    redis_client.hset(keys.state("gate"), mapping={"camera": "gate", "state": "streaming", "job": "gate-1",
                                                   "fps": "12.5", "daemon": "host:1"})
    redis_client.zadd(keys.index, {"gate": time.time()})
    redis_client.xadd(settings.keys.events, messages.encode(messages.Progress("old-job", 5, 10)))
    redis_client.hset(settings.keys.job("old-job"), mapping={"state": "running", "frames_done": "5", "num_frames": "10"})
    doc = api.get("/api/overview").json()
    assert [c["camera"] for c in doc["cameras"]] == ["gate"] and doc["cameras"][0]["state_text"] == "streaming"
    rows = {row["job_id"]: row for row in doc["jobs"]}
    assert rows[job]["state"] == "queued" and rows[job]["num_frames"] == N
    assert rows["old-job"]["frames_done"] == 5 and list(rows) == [job, "old-job"]  # in flight first


# --- writing ------------------------------------------------------------------------------------------------

def control(client: redis.Redis, settings: Settings, job_id: str) -> list[messages.Message]:
    return [messages.decode(f) for _, f in client.xrange(settings.keys.control(job_id))]


def test_a_point_starts_a_new_object_with_the_next_free_id_on_the_frame_shown(
        api: TestClient, job: str, settings: Settings, redis_client: redis.Redis) -> None:
    reply = api.post(f"/api/jobs/{job}/prompt", json={"x": 40, "y": 20.5, "obj_id": None, "frame": 3})
    assert reply.status_code == 200, reply.text
    doc = reply.json()
    assert doc["obj_id"] == 2 and doc["now"] is False and doc["pending"] == [2] and "sent" in doc["message"]
    (command,) = control(redis_client, settings, job)
    assert isinstance(command, messages.PromptCommand) and not command.now
    assert command.prompts[0].obj_id == 2 and command.prompts[0].frame_idx == 3
    assert command.prompts[0].points_xy == ((40.0, 20.5),) and command.prompts[0].labels == (1,)
    reply = api.post(f"/api/jobs/{job}/prompt", json={"x": 5, "y": 6, "obj_id": 2, "frame": 4, "positive": False})
    assert reply.json()["obj_id"] == 2 and control(redis_client, settings, job)[-1].prompts[0].labels == (0,)
    assert api.post(f"/api/jobs/{job}/prompt", json={"x": 1, "y": 1}).json()["obj_id"] == 3  # frame null: now
    assert control(redis_client, settings, job)[-1].now


def test_a_point_on_a_live_job_applies_now(api: TestClient, settings: Settings, redis_client: redis.Redis) -> None:
    live = live_job(redis_client, settings)
    doc = api.post(f"/api/jobs/{live}/prompt", json={"x": 10, "y": 10, "obj_id": None, "frame": 7}).json()
    assert doc["now"] and doc["obj_id"] == 2
    command = control(redis_client, settings, live)[-1]
    assert isinstance(command, messages.PromptCommand) and command.now and command.prompts[0].frame_idx == 0


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"x": 1000, "y": 10}, 400, "outside the 64x48 frame"),
    ({"x": 10, "y": -1}, 400, "outside the 64x48 frame"),
    ({"x": 10, "y": 10, "frame": N + 3}, 400, f"frame {N + 3}"),
    ({"x": "ten", "y": 10}, 400, "field 'x' must be a finite number"),
    ({"x": 10, "y": 10, "obj_id": -1}, 400, "field 'obj_id' must be an integer >= 0"),
    ({"x": 10, "y": 10, "obj_id": True}, 400, "field 'obj_id'"),
    ({"x": 10, "y": 10, "positive": "yes"}, 400, "field 'positive'"),
    ({"x": 10, "y": 10, "positive": False}, 400, "a negative point"),
    ({"x": 10, "y": 10, "z": 1}, 400, "unknown field(s) ['z']"),
    ([10, 10], 400, "must be a JSON object"),
])
def test_a_wrong_point_is_refused_with_what_to_do(api: TestClient, job: str, body: Any, status: int, says: str,
                                                  settings: Settings, redis_client: redis.Redis) -> None:
    reply = api.post(f"/api/jobs/{job}/prompt", json=body)
    assert reply.status_code == status and says in reply.json()["error"], reply.text
    assert not control(redis_client, settings, job)  # nothing sent


def test_bad_json_a_form_post_and_another_sites_write_are_refused(api: TestClient, job: str, settings: Settings,
                                                                  redis_client: redis.Redis) -> None:
    url = f"/api/jobs/{job}/prompt"
    reply = api.post(url, content=b"{x: 1", headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]
    reply = api.post(url, content=b"x=1&y=2", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status_code == 415 and "Content-Type: application/json" in reply.json()["error"]
    reply = api.post(url, json={"x": 1, "y": 1}, headers={"Origin": "http://evil.example"})
    assert reply.status_code == 403 and "another site" in reply.json()["error"]
    reply = api.post(url, json={"x": 1, "y": 1}, headers={"Sec-Fetch-Site": "cross-site"})
    assert reply.status_code == 403
    assert not control(redis_client, settings, job)
    assert api.post(url, json={"x": 1, "y": 1}, headers={"Origin": LOOPBACK}).status_code == 200


def test_writes_to_an_unknown_or_ended_job(api: TestClient, job: str, settings: Settings,
                                           redis_client: redis.Redis) -> None:
    for path, body in (("prompt", {"x": 1, "y": 1}), ("remove", {"obj_id": 1}),
                       ("zones", {"zones": [], "lines": []})):
        send = api.put if path == "zones" else api.post
        reply = send(f"/api/jobs/nothing/{path}", json=body)
        assert reply.status_code == 404 and "no job 'nothing'" in reply.json()["error"]
    redis_client.hset(settings.keys.job(job), "state", "completed")
    for path, body in (("prompt", {"x": 1, "y": 1}), ("remove", {"obj_id": 1}),
                       ("zones", {"zones": [], "lines": []})):
        send = api.put if path == "zones" else api.post
        reply = send(f"/api/jobs/{job}/{path}", json=body)
        assert reply.status_code == 409 and "completed" in reply.json()["error"], (path, reply.text)


def test_remove(api: TestClient, job: str, settings: Settings, redis_client: redis.Redis) -> None:
    reply = api.post(f"/api/jobs/{job}/remove", json={"obj_id": 7})
    assert reply.status_code == 404 and "has no object 7" in reply.json()["error"]
    assert api.post(f"/api/jobs/{job}/remove", json={"obj_id": "1"}).status_code == 400
    reply = api.post(f"/api/jobs/{job}/remove", json={"obj_id": 1})
    assert reply.status_code == 200 and reply.json()["pending"] == [1]
    (command,) = control(redis_client, settings, job)
    assert isinstance(command, messages.RemoveCommand) and command.obj_id == 1


def test_a_prompt_the_worker_refuses_is_422(settings: Settings, job: str, redis_client: redis.Redis) -> None:
    def refuse() -> None:  # a worker's reply: `object` refused, for the command's request id
        wait_for(lambda: redis_client.xlen(settings.keys.control(job)), 10, "the command")
        command = control(redis_client, settings, job)[0]
        assert isinstance(command, messages.PromptCommand)
        change = messages.ObjectChange(job, 2, 0, "refused", command.request_id, note="no such thing here")
        redis_client.xadd(settings.keys.results(job), messages.encode(change), id="1-2")

    threading.Thread(target=refuse, daemon=True).start()
    app = build_app(settings, auth=Auth("127.0.0.1", ""), reply_wait_s=5)
    with TestClient(app, base_url=LOOPBACK) as client:
        reply = client.post(f"/api/jobs/{job}/prompt", json={"x": 1, "y": 1, "frame": 0})
    assert reply.status_code == 422 and "object 2 refused: no such thing here" in reply.json()["error"]


def test_zones_are_checked_then_saved_on_the_job(api: TestClient, job: str, settings: Settings,
                                                 redis_client: redis.Redis) -> None:
    body = {"zones": [{"name": "bed", "points": [[0, 0], [64, 0], [64, 48]]}],
            "lines": [{"name": "gate", "points": [[10, 0], [10, 48]]}]}
    reply = api.put(f"/api/jobs/{job}/zones", json=body)
    assert reply.status_code == 200 and reply.json()["message"] == f"saved 1 zone(s) and 1 line(s) on job {job}"
    assert ZoneSet.from_json(redis_client.hget(settings.keys.job(job), "zones")).to_dict() == \
        ZoneSet.from_dict(body).to_dict()


@pytest.mark.parametrize(("body", "says"), [
    ({"zones": [{"name": "z", "points": [[0, 0], [10, 0]]}]}, "a zone needs 3 points or more"),
    ({"zones": [{"name": "z", "points": [[0, 0], [10, 0], [70, 10]]}]}, "point (70, 10) lies outside the 64x48 frame"),
    ({"lines": [{"name": "l", "points": [[0, 0], [0, 49]]}]}, "line l: point (0, 49) lies outside"),
    ({"zones": [{"name": "z", "points": [[0, 0], [1, 1], [2, 2]]}]}, "enclose no area"),
    ({"zones": [{"name": "a b", "points": [[0, 0], [10, 0], [0, 10]]}]}, "zone name 'a b'"),
    ({"zones": [{"name": "z", "points": [[0, 0], [10, 0], [0, 10]]}], "lines": [{"name": "z", "points": [[0, 0], [5, 5]]}]},
     "the name 'z' is given to two"),
    ({"polygons": []}, "zones must be"),
    ([], "zones must be"),
])
def test_a_bad_zone_is_refused_and_nothing_changes(api: TestClient, job: str, body: Any, says: str,
                                                   settings: Settings, redis_client: redis.Redis) -> None:
    before_ = redis_client.hget(settings.keys.job(job), "zones")
    reply = api.put(f"/api/jobs/{job}/zones", json=body)
    assert reply.status_code == 400 and says in reply.json()["error"], reply.text
    assert redis_client.hget(settings.keys.job(job), "zones") == before_


def test_a_camera_jobs_zones_go_into_its_configuration_first(settings: Settings, redis_client: redis.Redis) -> None:
    live = live_job(redis_client, settings)
    body = {"zones": [{"name": "door", "points": [[0, 0], [20, 0], [20, 20]]}], "lines": []}
    cameras = Cameras()
    with TestClient(build_app(settings, auth=Auth("127.0.0.1", ""), cameras=cameras), base_url=LOOPBACK) as client:
        doc = client.put(f"/api/jobs/{live}/zones", json=body).json()
        assert doc["on_job"] and doc["in_camera_config"] and "camera gate's configuration" in doc["message"]
        assert [(name, zones.to_dict()) for name, zones in cameras.saved] == [("gate", ZoneSet.from_dict(body).to_dict())]
        redis_client.hset(settings.keys.job(live), "state", "completed")  # an ended camera job: its camera still
        doc = client.put(f"/api/jobs/{live}/zones", json=body).json()
        assert not doc["on_job"] and "has ended (completed); saved" in doc["message"] and len(cameras.saved) == 2
    redis_client.hset(settings.keys.job(live), "state", "running")
    refusing = Cameras(ConfigError("cameras.yaml: no camera named 'gate'"))
    with TestClient(build_app(settings, auth=Auth("127.0.0.1", ""), cameras=refusing), base_url=LOOPBACK) as client:
        other = {"zones": [{"name": "x", "points": [[0, 0], [9, 0], [9, 9]]}], "lines": []}
        reply = client.put(f"/api/jobs/{live}/zones", json=other)
        assert reply.status_code == 400 and "no camera named 'gate'" in reply.json()["error"]
        assert "door" in redis_client.hget(settings.keys.job(live), "zones").decode()  # the job kept its zones
    with TestClient(build_app(settings, auth=Auth("127.0.0.1", "")), base_url=LOOPBACK) as client:
        doc = client.put(f"/api/jobs/{live}/zones", json=body).json()
        assert doc["on_job"] and not doc["in_camera_config"] and "on job cam-1 only" in doc["message"]


def test_redis_down_is_503_with_what_to_do(settings: Settings) -> None:
    down = dataclasses.replace(settings, redis_url="redis://127.0.0.1:9/0")
    with TestClient(build_app(down, auth=Auth("127.0.0.1", "")), base_url=LOOPBACK) as client:
        for reply in (client.get(f"/api/jobs/{JOB}"), client.get("/api/overview"),
                      client.post(f"/api/jobs/{JOB}/prompt", json={"x": 1, "y": 1})):
            assert reply.status_code == 503 and "cannot reach Redis at redis://127.0.0.1:9/0" in reply.json()["error"]


# --- access -------------------------------------------------------------------------------------------------

def test_a_public_address_needs_a_token_to_start(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="set VSEG_UI_TOKEN"):
        Auth("0.0.0.0", "")
    with pytest.raises(ConfigError, match="set VSEG_UI_TOKEN"):
        start_ui(settings, "0.0.0.0", 0)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.8.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.com")
    assert host_of("[::1]:8080") == "::1" and host_of("127.0.0.1:80") == "127.0.0.1" and host_of("localhost") == "localhost"


def test_with_a_token_every_request_needs_it(settings: Settings, job: str, redis_client: redis.Redis) -> None:
    app = build_app(settings, auth=Auth("0.0.0.0", "s3cret-token"), reply_wait_s=0)
    with TestClient(app, base_url="http://10.1.2.3:8080") as client:
        for path in (f"/api/jobs/{job}", f"/api/jobs/{job}/stream", "/api/overview", f"/api/jobs/{job}/video",
                     "/media/jobs/x.m3u8"):
            reply = client.get(path)
            assert reply.status_code == 401 and "needs its token (VSEG_UI_TOKEN)" in reply.json()["error"], path
        page = client.get(f"/jobs/{job}", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == f"/login?next=/jobs/{job}"
        for method, path, body in (("POST", "prompt", {"x": 1, "y": 1}), ("PUT", "zones", {"zones": []})):
            reply = client.request(method, f"/api/jobs/{job}/{path}", json=body)
            assert reply.status_code == 401, path
            reply = client.request(method, f"/api/jobs/{job}/{path}", json=body, headers={"Authorization": "Bearer nope"})
            assert reply.status_code == 403 and "not this viewer's" in reply.json()["error"]
        assert not control(redis_client, settings, job)
        bearer = {"Authorization": "Bearer s3cret-token"}
        assert client.get(f"/api/jobs/{job}", headers=bearer).status_code == 200
        assert client.post(f"/api/jobs/{job}/prompt", json={"x": 1, "y": 1}, headers=bearer).status_code == 200
        assert client.get("/login?token=wrong").status_code == 403
        form = client.get("/login?next=/jobs/j1")
        assert form.status_code == 200 and 'name="token"' in form.text and 'value="/jobs/j1"' in form.text
        signed = client.get(f"/login?token=s3cret-token&next=/jobs/{job}", follow_redirects=False)
        assert signed.status_code == 303 and signed.headers["location"] == f"/jobs/{job}"
        cookie = signed.cookies["vseg_ui"]
        assert "s3cret-token" not in cookie and "HttpOnly" in signed.headers["set-cookie"]
        assert "SameSite=strict" in signed.headers["set-cookie"]
        assert client.get(f"/api/jobs/{job}").status_code == 200  # the client keeps the cookie
        assert client.put(f"/api/jobs/{job}/zones", json={"zones": []}).status_code == 200
        assert client.get("/login?token=s3cret-token&next=//evil.example", follow_redirects=False) \
            .headers["location"] == "/"
        posted = client.post("/login", data={"token": "s3cret-token", "next": "/"}, follow_redirects=False)
        assert posted.status_code == 303 and posted.cookies["vseg_ui"] == cookie  # the form posts it
        assert client.post("/login", data={"token": "nope"}).status_code == 403
        client.cookies.clear()
        client.cookies.set("vseg_ui", "forged")
        assert client.get(f"/api/jobs/{job}").status_code == 403


def test_on_loopback_no_token_is_needed_but_only_loopback_names_are_answered(settings: Settings, job: str) -> None:
    app = build_app(settings, auth=Auth("127.0.0.1", "ignored-here"))
    with TestClient(app, base_url="http://localhost:8080") as client:
        assert client.get(f"/api/jobs/{job}").status_code == 200
        assert client.get("/login", follow_redirects=False).status_code == 303
        reply = client.get(f"/api/jobs/{job}", headers={"Host": "rebound.example:8080"})  # DNS rebinding
        assert reply.status_code == 403 and "127.0.0.1, ::1 or localhost only" in reply.json()["error"]


# --- the event streams, over real HTTP --------------------------------------------------------------------

def events(url: str, count: int, headers: dict[str, str] | None = None, timeout_s: float = 10) -> list[tuple[str, dict[str, Any]]]:
    """The first `count` data events of an SSE stream: (event id or "", JSON data)."""
    out: list[tuple[str, dict[str, Any]]] = []
    event_id = ""
    with httpx.stream("GET", url, headers=headers, timeout=timeout_s) as reply:
        assert reply.status_code == 200, reply.read()
        assert reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                out.append((event_id, json.loads(line[6:])))
                event_id = ""
                if len(out) >= count:
                    break
    return out


def results_of(got: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(i, d) for i, d in got if d["type"] not in ("figures", "zones")]


def test_the_job_stream_sends_results_alerts_and_figures_and_resumes(settings: Settings, job: str,
                                                                     redis_client: redis.Redis) -> None:
    publish(redis_client, settings, job, range(8))
    first_alert = alert(redis_client, settings, job, 3)
    with start_ui(settings, "127.0.0.1", 0) as ui:
        url = f"{ui.url}/api/jobs/{job}/stream"
        got = events(url, 12)
        assert [d["type"] for _, d in got[:2]] == ["figures", "zones"]
        assert got[0][1]["state"] == "queued" and got[1][1]["zones"]["zones"][0]["name"] == "door"
        results = results_of(got)
        assert [d["type"] for _, d in results] == ["started"] + ["frame"] * 8 + ["alert"]
        frame = results[1][1]
        assert frame["frame_idx"] == 0 and frame["objects"][0]["obj_id"] == 1
        assert frame["objects"][0]["mask"]["size"] == [SIZE[1], SIZE[0]] and isinstance(frame["objects"][0]["mask"]["counts"], str)
        assert results[-1][1]["alert"]["type"] == "zone_enter" and results[-1][1]["alert"]["zone"] == "door"
        assert results[-1][0] == f"{frame_entry_id(7)}/{first_alert}"  # the cursor: results and alerts
        assert results[5][0] == f"{frame_entry_id(4)}/0-0"
        # a browser reconnecting sends the last id it saw: it gets what came after, nothing twice
        resumed = results_of(events(url, 6, headers={"Last-Event-ID": results[5][0]}))
        assert [d.get("frame_idx") for _, d in resumed] == [5, 6, 7, None] and resumed[-1][1]["type"] == "alert"
        assert [d["frame_idx"] for _, d in results_of(events(f"{url}?after={frame_entry_id(6)}", 4))[:1]] == [7]
        tail = results_of(events(f"{url}?tail=3", 6))
        assert [d["type"] for _, d in tail][:4] == ["started", "frame", "frame", "frame"]
        assert [d["frame_idx"] for _, d in tail[1:4]] == [5, 6, 7]
        # new entries arrive as they are written
        follow = threading.Thread(target=lambda: (time.sleep(0.5), publish(redis_client, settings, job, range(8, 9)),
                                                  alert(redis_client, settings, job, 8, "zone_leave")))
        follow.start()
        live = results_of(events(f"{url}?after={results[-1][0]}", 4))
        follow.join()
        assert [d["type"] for _, d in live] == ["frame", "alert"] and live[0][1]["frame_idx"] == 8
        assert live[1][1]["alert"]["type"] == "zone_leave"


def test_the_job_stream_refuses_a_bad_cursor_and_ends_when_the_job_is_gone(settings: Settings, job: str,
                                                                           redis_client: redis.Redis) -> None:
    with start_ui(settings, "127.0.0.1", 0) as ui:
        url = f"{ui.url}/api/jobs/{job}/stream"
        for query, says in (("?after=yesterday", "after (a result entry id)"), ("?tail=0", "tail must be"),
                            ("?after=1-0/x", "alerts part")):
            reply = httpx.get(url + query)
            assert reply.status_code == 400 and says in reply.json()["error"]
        threading.Timer(0.5, lambda: redis_client.delete(settings.keys.job(job))).start()
        with httpx.stream("GET", url, timeout=10) as reply:
            lines = [line for line in reply.iter_lines() if line.startswith("data: ")]  # ends by itself
        assert json.loads(lines[-1][6:])["type"] == "gone"


def test_the_overview_stream_sends_a_snapshot_when_something_changes(settings: Settings, job: str,
                                                                      redis_client: redis.Redis) -> None:
    with start_ui(settings, "127.0.0.1", 0) as ui:
        threading.Timer(1.5, lambda: redis_client.hset(settings.keys.job(job), "state", "running")).start()
        got = events(f"{ui.url}/api/overview/stream", 2, timeout_s=15)
    assert [d["type"] for _, d in got] == ["overview", "overview"]
    assert [j["state"] for j in got[0][1]["jobs"]] == ["queued"] and [j["state"] for j in got[1][1]["jobs"]] == ["running"]


def test_the_viewer_leaves_the_processs_signal_handlers_alone(settings: Settings) -> None:
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    with start_ui(settings, "127.0.0.1", 0) as ui:
        assert httpx.get(f"{ui.url}/api/overview").status_code == 200
        assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_a_port_in_use_is_one_line(settings: Settings) -> None:
    with start_ui(settings, "127.0.0.1", 0) as ui:
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{ui.port}"):
            start_ui(settings, "127.0.0.1", ui.port)


def test_python_m_producer_ui_serves_until_sigterm_or_sigint(settings: Settings, job: str) -> None:
    env = {**worker_env(settings), "VSEG_UI_TOKEN": ""}
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([sys.executable, "-m", "producer", "ui", "--http-port", "0"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            assert line.startswith("web viewer on http://127.0.0.1:"), (line, proc.stderr.read() if proc.stderr else "")
            url = line.split()[-1]
            assert httpx.get(f"{url}/api/jobs/{job}").json()["job_id"] == job
            proc.send_signal(sig)
            assert proc.wait(15) == 0
        finally:
            proc.kill()
    refused = subprocess.run([sys.executable, "-m", "producer", "ui", "--host", "0.0.0.0", "--http-port", "0"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "set VSEG_UI_TOKEN" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


# --- pure pieces --------------------------------------------------------------------------------------------

def test_cursor_and_entry_ids() -> None:
    assert Cursor.parse("12-0/1700000000000-3") == Cursor("12-0", "1700000000000-3")
    assert Cursor.parse("12") == Cursor("12-0", "0-0") and Cursor("5-1", "0-0").text() == "5-1/0-0"
    for bad in ("", "a-1", "1-2-3", "-1", "1/2/3"):
        with pytest.raises(InputError):
            Cursor.parse(bad)
    assert before("5-3") == "5-2" and before("5-0") == "4-18446744073709551615" and before("0-0") == "0-0"


def test_entries_as_the_page_reads_them() -> None:
    mask = disc_mask(2, N, SIZE)
    obj = messages.ObjectResult(4, encode_mask(mask), mask_bbox_xyxy(mask), int(mask.sum()), 0.5, label="ball",
                                label_score=0.9)
    doc = result_json("3-0", messages.FrameResult("j", 2, (obj,), captured_at=1.5, latency_s=0.1))
    assert doc is not None and doc["type"] == "frame" and doc["captured_at"] == 1.5
    assert doc["objects"][0]["mask"]["counts"] == encode_mask(mask)["counts"].decode()
    assert doc["objects"][0]["label"] == "ball" and doc["objects"][0]["bbox"] == mask_bbox_xyxy(mask)
    change = result_json("3-2", messages.ObjectChange("j", 4, 2, "added", "r1"))
    assert change is not None and change["change"] == "added" and "v" not in change
    assert result_json("1-0", messages.Progress("j", 1, 2)) is None
    good = {b"type": b"dwell", b"key": b"k1", b"data": msgpack.packb({"v": 1, "type": "dwell", "key": "k1",
                                                                       "obj_id": 3, "new_field": b"x"})}
    assert alert_json("9-0", good) == {"type": "alert", "entry_id": "9-0",
                                       "alert": {"type": "dwell", "key": "k1", "obj_id": 3, "new_field": "x"}}
    assert alert_json("9-1", {b"type": b"dwell", b"data": b"\xc1"}) is None
    assert alert_json("9-2", {b"type": b"dwell", b"data": msgpack.packb([1, 2])}) is None


def test_zone_error_is_an_input_error() -> None:
    assert issubclass(ZoneError, InputError)  # the API's 400 for a bad zone rests on it
