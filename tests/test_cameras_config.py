"""The camera fleet's file (producer/cameras.py): every refusal is one line naming the camera and the field;
a good file gives typed cameras whose password is in the URL they read and nowhere else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from producer.cameras import FOREVER_S, Camera, CameraKeys, load_cameras
from runtime.settings import Settings
from schemas.errors import ConfigError
from schemas.messages import AutoOptions
from schemas.names import validate_job_id

SETTINGS = Settings(max_latency_s=2.5, source_outage_s=45.0)
ENV = {"GATE_PW": "pa:ss@w/rd"}
GOOD: dict[str, Any] = {"name": "gate", "url": "rtsp://10.0.0.7/stream1", "prompts": ["--point 1:320,240"]}


def write(tmp_path: Path, *cameras: dict[str, Any]) -> Path:
    path = tmp_path / "cameras.yaml"
    path.write_text(yaml.safe_dump({"cameras": list(cameras)}))
    return path


def load(tmp_path: Path, *cameras: dict[str, Any]) -> dict[str, Camera]:
    return load_cameras(write(tmp_path, *cameras), SETTINGS, ENV)


def test_a_good_file_gives_typed_cameras_with_the_settings_defaults(tmp_path: Path) -> None:
    secret = tmp_path / "yard.pw"
    secret.write_text("from-a-file\n")
    cameras = load(tmp_path, {**GOOD, "username": "viewer", "password_env": "GATE_PW",
                              "prompts": ["--point 1:320,240", "--box 2:10,20,200,220", "--point=1:330,250:0"]},
                   {"name": "yard", "url": "RTSP://10.0.0.8/live", "username": "op", "password_file": str(secret),
                    "auto": {"every": "2s", "max_objects": 4, "keep": ["person"]}, "labels": ["person", "car"],
                    "fps": 5, "max_latency_s": 1, "outage_s": None, "enabled": False},
                   {"name": "dock.2", "url": "tcp://127.0.0.1:9000", "auto": True})
    assert list(cameras) == ["gate", "yard", "dock.2"]
    gate, yard, dock = cameras.values()
    assert [(p.obj_id, p.points_xy, p.labels, p.box_xyxy) for p in gate.prompts] == [
        (1, ((320.0, 240.0), (330.0, 250.0)), (1, 0), None), (2, (), (), (10.0, 20.0, 200.0, 220.0))]
    assert gate.source == "rtsp://viewer:pa%3Ass%40w%2Frd@10.0.0.7/stream1"  # in this process only
    assert "pa:ss" not in repr(gate) and gate.shown == "rtsp://10.0.0.7/stream1"
    assert gate.scrub(f"cannot open {gate.source} (pa:ss@w/rd)") == "cannot open rtsp://viewer:***@10.0.0.7/stream1 (***)"
    assert (gate.max_latency_s, gate.outage_s, gate.enabled, gate.auto, gate.fps) == (2.5, 45.0, True, None, None)
    assert yard.source == "rtsp://op:from-a-file@10.0.0.8/live" and yard.url.startswith("rtsp://")
    assert yard.auto == AutoOptions(every_frames=0, every_s=2.0, max_objects=4, keep=("person",))
    assert (yard.labels, yard.fps, yard.max_latency_s, yard.outage_s, yard.enabled) == (("person", "car"), 5.0, 1.0,
                                                                                        None, False)
    assert yard.settings_for(SETTINGS).source_outage_s == FOREVER_S  # null: waited for, for ever
    assert gate.settings_for(SETTINGS).source_outage_s == 45.0 and dock.auto == AutoOptions() and not dock.prompts
    keys = CameraKeys("vseg")
    assert (keys.seq("gate"), keys.lease("gate"), keys.state("gate")) == (
        "vseg:camera:{gate}:seq", "vseg:camera:{gate}:lease", "vseg:camera:{gate}")
    assert validate_job_id("a" * 53 + "-" + "9" * 10)  # the longest name still makes job ids


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({**GOOD, "fsp": 5}, "gate", "fsp"),
    ({**GOOD, "name": "bad name"}, "bad name", "name"),
    ({**GOOD, "name": "a" * 60}, "a" * 60, "name"),
    ({**GOOD, "name": 7}, "#1", "name"),
    ({key: v for key, v in GOOD.items() if key != "url"}, "gate", "url"),
    ({**GOOD, "url": "ftp://10.0.0.7/x"}, "gate", "url"),
    ({**GOOD, "url": "/videos/clip.mp4"}, "gate", "url"),
    ({**GOOD, "url": "rtsp://admin:hunter2@10.0.0.7/x"}, "gate", "url"),
    ({**GOOD, "username": "v", "password_env": "NOT_SET"}, "gate", "password_env"),
    ({**GOOD, "password_env": "GATE_PW"}, "gate", "password_env"),
    ({**GOOD, "username": "v", "password_env": "GATE_PW", "password_file": "/x"}, "gate", "password_file"),
    ({**GOOD, "username": "v", "password_file": "/nonexistent/pw"}, "gate", "password_file"),
    ({**GOOD, "prompts": ["--point 1:320"]}, "gate", "prompts"),
    ({**GOOD, "prompts": ["--circle 1:3,4"]}, "gate", "prompts"),
    ({**GOOD, "prompts": ["--point 1:3,4@5"]}, "gate", "prompts"),
    ({**GOOD, "prompts": "--point 1:3,4"}, "gate", "prompts"),
    ({**GOOD, "prompts": []}, "gate", "prompts"),
    ({**GOOD, "auto": {"every": "0"}}, "gate", "auto"),
    ({**GOOD, "auto": {"often": 3}}, "gate", "auto"),
    ({**GOOD, "auto": {"keep": ["dog"]}, "labels": ["cat"]}, "gate", "auto"),
    ({**GOOD, "labels": [""]}, "gate", "labels"),
    ({**GOOD, "fps": 0}, "gate", "fps"),
    ({**GOOD, "max_latency_s": "fast"}, "gate", "max_latency_s"),
    ({**GOOD, "max_latency_s": None}, "gate", "max_latency_s"),
    ({**GOOD, "outage_s": -1}, "gate", "outage_s"),
    ({**GOOD, "enabled": "no"}, "gate", "enabled"),
]


@pytest.mark.parametrize(("entry", "camera", "field"), BAD, ids=[f"{c[:10]}-{f}-{i}" for i, (_, c, f) in enumerate(BAD)])
def test_each_mistake_is_one_line_naming_the_camera_and_the_field(tmp_path: Path, entry: dict[str, Any], camera: str,
                                                                  field: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, entry)
    message = str(refused.value)
    assert "\n" not in message and "hunter2" not in message
    who = "camera #1" if camera.startswith("#") else f"camera {camera!r}"
    assert f"{who}, field {field}: " in message, message


def test_a_duplicate_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"camera 'gate', field name: the name is given twice"):
        load(tmp_path, GOOD, {**GOOD, "url": "tcp://127.0.0.1:9"})


def test_an_unreadable_password_file_says_why(tmp_path: Path) -> None:
    folder = tmp_path / "pw"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"camera 'gate', field password_file: cannot read .*pw \(Is a directory\)"):
        load(tmp_path, {**GOOD, "username": "v", "password_file": str(folder)})


@pytest.mark.parametrize("text", ["cameras: [", "- name: gate", "cameras: {gate: 1}", "cameras: []\nextra: 1"])
def test_a_file_that_is_not_a_list_of_cameras_is_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "cameras.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_cameras(path, SETTINGS, ENV)
    assert "\n" not in str(refused.value) and str(path) in str(refused.value)


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the cameras file"):
        load_cameras(tmp_path / "nope.yaml", SETTINGS, ENV)


def test_the_example_file_loads(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "configs" / "cameras.example.yaml"
    secret = tmp_path / "pw"
    secret.write_text("x")
    path = tmp_path / "cameras.yaml"
    path.write_text(example.read_text().replace("/run/secrets/yard_camera_password", str(secret)))
    cameras = load_cameras(path, SETTINGS, {"GATE_CAMERA_PASSWORD": "y"})
    assert [(c.name, c.enabled) for c in cameras.values()] == [("gate", True), ("yard", True), ("pitch", True),
                                                                ("lobby", False)]
    assert cameras["pitch"].text == ("player", "ball")


def test_equal_files_give_equal_cameras_and_a_new_password_changes_the_camera(tmp_path: Path) -> None:
    entry = {**GOOD, "username": "v", "password_env": "GATE_PW"}
    first = load_cameras(write(tmp_path, entry), SETTINGS, ENV)
    assert load_cameras(write(tmp_path, entry), SETTINGS, ENV) == first  # SIGHUP leaves it running
    assert load_cameras(write(tmp_path, entry), SETTINGS, {"GATE_PW": "new"}) != first
