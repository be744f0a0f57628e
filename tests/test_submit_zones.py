"""Zones and lines on submit: the command line's --zone/--line and Client.submit's zones/lines reach the job
hash (with the displayed size, rate and source path the viewer reads), a zone outside the frame is refused
before anything is written, and cameras.yaml's zones are read, and saved back with the file's comments kept."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from producer import Client
from producer.camera_file import save_camera_zones
from producer.cameras import load_cameras
from producer.submission import submit
from producer.zones import ZoneSet, parse_zones
from runtime.settings import Settings
from schemas.errors import ConfigError, ZoneError
from tests.videos import disc_prompt
from tests.workers import ROOT

pytestmark = pytest.mark.integration
N = 6
SIZE = (96, 64)


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": settings.redis_url, "STORAGE_ROOT": str(settings.storage_root),
           "VSEG_KEY_PREFIX": settings.key_prefix}
    return subprocess.run([sys.executable, "-m", "producer", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_zones_reach_the_job_hash(video: Path, settings: Settings, redis_client: redis.Redis) -> None:
    out = cli(settings, "submit", str(video), "--point", "1:48,32", "--job-id", "zoned", "--zone",
              "door:0,0,48,0,48,64,0,64", "--line", "gate:0,32,96,32")
    assert out.returncode == 0, out.stderr
    job = {k.decode(): v.decode() for k, v in redis_client.hgetall(settings.keys.job("zoned")).items()}
    assert ZoneSet.from_json(job["zones"]) == parse_zones(["door:0,0,48,0,48,64,0,64"], ["gate:0,32,96,32"])
    assert (job["width"], job["height"], float(job["fps"])) == ("96", "64", 10.0)
    assert job["source_path"] == str(video.resolve())


def test_a_zone_outside_the_frame_is_refused_before_anything_is_written(video: Path, settings: Settings,
                                                                         redis_client: redis.Redis) -> None:
    out = cli(settings, "submit", str(video), "--point", "1:48,32", "--job-id", "outside", "--zone",
              "door:0,0,200,0,200,64")
    assert out.returncode != 0
    assert "zone door: point (200, 0) lies outside the 96x64 frame" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not redis_client.exists(settings.keys.job("outside"))
    assert not (settings.storage_root / "jobs" / "outside").exists()
    bad = cli(settings, "submit", str(video), "--point", "1:48,32", "--line", "gate:0,0,5")
    assert bad.returncode != 0 and "a line is two points, 4 numbers" in bad.stderr


def test_client_submit_takes_specs_or_zones(video: Path, settings: Settings, redis_client: redis.Redis) -> None:
    from producer import Line, Zone

    with Client(settings) as client:
        job = client.submit(video, [disc_prompt(1, 0, N, SIZE)], job_id="client-zoned",
                            zones=["door:0,0,48,0,48,64"], lines=[Line("gate", (0, 32), (96, 32))])
        job.submit_result()
        with pytest.raises(ZoneError, match="outside"):
            client.submit(video, [disc_prompt(1, 0, N, SIZE)], job_id="client-outside",
                          zones=[Zone("big", ((0, 0), (500, 0), (500, 500)))])
    stored = ZoneSet.from_json(redis_client.hget(settings.keys.job("client-zoned"), "zones"))
    assert [z.name for z in stored.zones] == ["door"] and [ln.name for ln in stored.lines] == ["gate"]
    assert not redis_client.exists(settings.keys.job("client-outside"))


def test_a_job_without_zones_has_no_zones_field(video: Path, settings: Settings, redis_client: redis.Redis) -> None:
    submit(video, [disc_prompt(1, 0, N, SIZE)], settings=dataclasses.replace(settings), job_id="plain")
    assert redis_client.hget(settings.keys.job("plain"), "zones") is None
    assert redis_client.hget(settings.keys.job("plain"), "width") == b"96"


CAMERAS = """\
# the gate and the yard
cameras:
  - name: gate              # the front gate
    url: rtsp://10.0.0.7/stream1
    prompts: ["--point 1:320,240"]
    zones: {door: [[0, 0], [200, 0], [200, 300]]}
  - name: yard
    url: rtsp://10.0.0.8/live
    auto: true
"""


def test_cameras_yaml_zones_are_read_and_saved_with_comments_kept(tmp_path: Path) -> None:
    path = tmp_path / "cameras.yaml"
    path.write_text(CAMERAS)
    path.chmod(0o640)
    cameras = load_cameras(path, Settings(), {})
    assert cameras["gate"].zones == parse_zones(["door:0,0,200,0,200,300"])
    assert cameras["yard"].zones == ZoneSet()
    before = cameras["gate"]
    saved = save_camera_zones(path, "yard", parse_zones(["lot:10,10,50,10,50,50"], ["exit:0,5,20,5.5"]),
                              Settings(), {})
    text = path.read_text()
    assert "# the gate and the yard" in text and "# the front gate" in text  # comments kept
    assert "\n  - name: gate" in text and "\n  - name: yard" in text  # and the file's indentation
    assert 'prompts: ["--point 1:320,240"]' in text  # and its quotes
    assert "lot: [[10, 10], [50, 10], [50, 50]]" in text and "exit: [[0, 5], [20, 5.5]]" in text
    assert path.stat().st_mode & 0o777 == 0o640
    again = load_cameras(path, Settings(), {})
    assert again["yard"] == saved and again["yard"].zones.lines[0].b == (20, 5.5)
    assert again["gate"] == before and again["gate"].zones == before.zones
    save_camera_zones(path, "gate", ZoneSet(), Settings(), {})  # emptied: the fields go
    assert "door" not in path.read_text() and "zones" not in path.read_text().split("yard")[0]
    assert json.loads(ZoneSet().to_json()) == {"zones": [], "lines": []}


def test_a_refused_save_leaves_the_file_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "cameras.yaml"
    path.write_text(CAMERAS)
    with pytest.raises(ConfigError, match="no camera named 'nope'"):
        save_camera_zones(path, "nope", ZoneSet(), Settings(), {})
    broken = CAMERAS.replace("auto: true", "auto: 7")  # the file itself is wrong: the save is refused
    path.write_text(broken)
    with pytest.raises(ConfigError, match=f"{path}: camera 'yard', field auto"):
        save_camera_zones(path, "gate", ZoneSet(), Settings(), {})
    assert path.read_text() == broken
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cameras.yaml"]
    with pytest.raises(ConfigError, match="field zones"):
        load_cameras(_write(tmp_path, CAMERAS.replace("[200, 300]]", "[200, 0]]")), Settings(), {})


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "other.yaml"
    path.write_text(text)
    return path


def test_the_fleet_saves_the_viewers_zones_into_its_file_and_reloads(tmp_path: Path, settings: Settings,
                                                                      redis_client: redis.Redis) -> None:
    from producer.fleet import Fleet

    path = tmp_path / "cameras.yaml"
    path.write_text(CAMERAS)
    fleet = Fleet(path, settings, {})
    zones = parse_zones(["lot:10,10,50,10,50,50"])
    fleet.save_zones("yard", zones)  # what the viewer calls (producer/ui/actions.py's CameraConfig)
    assert fleet.reload_requested.is_set() and "# the front gate" in path.read_text()
    fleet.reload()
    assert fleet.cameras["yard"].zones == zones
    with pytest.raises(ConfigError, match="no camera named 'gone'"):
        fleet.save_zones("gone", zones)
