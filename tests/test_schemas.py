"""Unit tier: the wire contract (no Redis, no model)."""

from __future__ import annotations

from contextlib import nullcontext as does_not_raise
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import yaml
from pycocotools import mask as mask_utils
from redis.crc import key_slot

from runtime.settings import Settings
from schemas import messages
from schemas.errors import ConfigError, JobIdError, PromptError, SchemaError, StorageError
from schemas.names import (
    EVENTS_MAXLEN,
    TERMINAL_ENTRY_ID,
    TERMINAL_STATES,
    JobState,
    Keys,
    frame_entry_id,
    frames_end_entry_id,
    validate_job_id,
)
from schemas.prompts import ObjectPrompt, validate_prompts
from schemas.rle import decode_mask, encode_mask, mask_bbox_xyxy, rle_area, rle_bbox_xyxy, rle_to_json
from schemas.storage import check_frame_dir, frame_index, frame_name, job_frames_rel, resolve_inside

PROMPTS = (
    ObjectPrompt(obj_id=1, frame_idx=0, points_xy=((10.0, 20.0), (30.5, 40.0)), labels=(1, 0)),
    ObjectPrompt(obj_id=2, frame_idx=5, box_xyxy=(1.0, 2.0, 50.0, 60.0)),
)


def _job(**overrides: Any) -> messages.JobMessage:
    base = dict(job_id="job-1", frames_dir="jobs/job-1/frames", num_frames=20, width=160, height=120, fps=10.0,
                prompts=PROMPTS, source="clip.mp4", submitted_at=1700000000.0)
    base.update(overrides)
    return messages.JobMessage(**base)  # type: ignore[arg-type]


def _frame() -> messages.FrameResult:
    mask = np.zeros((12, 16), dtype=bool)
    mask[2:5, 3:9] = True
    rle = encode_mask(mask)
    obj = messages.ObjectResult(obj_id=1, mask=rle, bbox_xyxy=rle_bbox_xyxy(rle), area=rle_area(rle), score=0.9)
    return messages.FrameResult(job_id="job-1", frame_idx=3, objects=(obj,))


@pytest.mark.parametrize(
    "msg",
    [
        _job(),
        _frame(),
        messages.Started("job-1", "w1", 20, (1, 2), model="sam2.1-tiny", random_weights=True),
        messages.Progress("job-1", 10, 20, fps=3.5),
        messages.Completed("job-1", "jobs/job-1/render.mp4", 20, 2, {"total_s": 1.5}),
        messages.Failed("job-1", "boom", "RuntimeError"),
    ],
    ids=lambda m: m.TYPE.value,
)
def test_every_message_round_trips(msg: messages.Message) -> None:
    fields = messages.encode(msg)
    assert fields["type"] == msg.TYPE.value.encode()
    assert messages.decode(fields) == msg
    # the same with str keys, as a client with decode_responses would hand them over
    assert messages.decode({"type": msg.TYPE.value, "data": fields["data"]}) == msg


def _fields(data: Any, type_: str = "job") -> dict[bytes, bytes]:
    return {b"type": type_.encode(), b"data": msgpack.packb(data, use_bin_type=True)}


def _job_data(**changes: Any) -> dict[str, Any]:
    data = messages.to_dict(_job())
    data.update(changes)
    return data


@pytest.mark.parametrize(
    "fields, match",
    [
        ({b"data": b"x"}, "no 'type' field"),
        ({b"type": b"job"}, "no 'data' field"),
        ({b"type": b"nonsense", b"data": b"\x80"}, "unknown entry type"),
        ({b"type": b"job", b"data": b"\xc1"}, "not valid msgpack"),
        (_fields([1, 2]), "must be a map"),
        (_fields(_job_data(v=2)), "schema version 2"),
        (_fields(_job_data(v=0)), "schema version 0"),
        (_fields({k: v for k, v in _job_data().items() if k != "v"}), "schema version"),
        (_fields({k: v for k, v in _job_data().items() if k != "num_frames"}), "missing required field `num_frames`"),
        (_fields(_job_data(num_frames=-3)), "field num_frames = -3: Expected `int` >= 1"),
        (_fields(_job_data(producer_ttl_s=-1.0)), "field producer_ttl_s = -1.0: Expected `float` >= 0.0"),
        (_fields(_job_data(producer_ttl_s="10")), "field producer_ttl_s = '10': Expected `float`, got `str`"),
        (_fields(_job_data(job_id="../etc")), "field job_id: job id must be"),
        (_fields(_job_data(prompts=[{"obj_id": 1, "points_xy": [[1, 2]], "labels": [7]}])), r"field prompts\[0\]: .*label"),
        (_fields(_job_data(prompts=[{"frame_idx": 0}])), r"field prompts\[0\] .*missing required field `obj_id`"),
    ],
)
def test_malformed_entries_raise_schema_error(fields: dict[bytes, bytes], match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        messages.decode(fields)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    assert messages.decode(_fields(_job_data(added_in_v2="x"))) == _job()


def test_a_job_from_an_older_producer_has_no_liveness_ttl() -> None:
    """Fields added later have defaults: a job without producer_ttl_s (no liveness key) still decodes."""
    old = {k: v for k, v in _job_data().items() if k != "producer_ttl_s"}
    job = messages.decode(_fields(old))
    assert isinstance(job, messages.JobMessage) and job.producer_ttl_s == 0.0


def test_rle_round_trip_matches_pycocotools() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    rle = encode_mask(mask)
    assert rle["size"] == [37, 53] and isinstance(rle["counts"], bytes)
    assert np.array_equal(decode_mask(rle), mask)
    assert np.array_equal(mask_utils.decode(rle), mask.astype(np.uint8))  # what a backend does
    assert rle_area(rle) == int(mask.sum())
    assert np.array_equal(decode_mask(rle_to_json(rle)), mask)


def _masks_of_every_kind() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    masks = [np.zeros((20, 30), bool), np.ones((20, 30), bool), np.zeros((1, 1), bool), np.ones((1, 1), bool),
             np.zeros((0, 4), bool), rng.random((540, 960)) > 0.5, rng.random((61, 17)) > 0.97]
    first = np.zeros((9, 7), bool)
    first[0, 0] = True  # a mask starting with foreground: counts begin with an empty run
    last = np.zeros((9, 7), bool)
    last[-1, -1] = True
    disc = np.hypot(*np.mgrid[-270:270, -480:480]) < 200
    return [*masks, first, last, disc, np.asfortranarray(disc), disc[::2, ::3], disc.astype(np.uint8)]


@pytest.mark.parametrize("k", range(13))
def test_rle_bytes_equal_pycocotools_encode(k: int) -> None:
    """Our run-length path gives exactly pycocotools' own encoding, for any layout, size and content."""
    mask = _masks_of_every_kind()[k]
    ours = encode_mask(mask)
    theirs = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert ours["size"] == [int(v) for v in theirs["size"]] and ours["counts"] == theirs["counts"]
    if mask.size:
        assert mask_bbox_xyxy(mask.astype(bool)) == rle_bbox_xyxy(ours)


def test_bbox_is_tight_and_exclusive() -> None:
    mask = np.zeros((20, 30), dtype=bool)
    mask[4:9, 7:12] = True
    assert rle_bbox_xyxy(encode_mask(mask)) == [7.0, 4.0, 12.0, 9.0] == mask_bbox_xyxy(mask)
    empty = encode_mask(np.zeros((20, 30), dtype=bool))
    assert rle_bbox_xyxy(empty) == [0.0, 0.0, 0.0, 0.0] and rle_area(empty) == 0


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 4), bool), np.zeros(5, bool), [[1, 0]]])
def test_rle_rejects_non_2d(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"2D np.ndarray of shape \(H, W\)"):
        encode_mask(bad)


@pytest.mark.parametrize(
    "prompts, expectation",
    [
        (PROMPTS, does_not_raise()),
        ((ObjectPrompt(1, 0, ((160.0, 120.0),), (1,)),), does_not_raise()),  # the far corner is inside
        ((), pytest.raises(PromptError, match="no prompts")),
        ((ObjectPrompt(1, 20, ((1.0, 1.0),), (1,)),), pytest.raises(PromptError, match="decoded video has 20 frames")),
        ((ObjectPrompt(1, 0, ((161.0, 1.0),), (1,)),), pytest.raises(PromptError, match="outside the 160x120 frame")),
        ((ObjectPrompt(1, 0, ((-1.0, 1.0),), (1,)),), pytest.raises(PromptError, match="outside")),
        ((ObjectPrompt(1, 0, box_xyxy=(0.0, 0.0, 10.0, 130.0)),), pytest.raises(PromptError, match="outside")),
        ((ObjectPrompt(1, 0, box_xyxy=(10.0, 0.0, 5.0, 10.0)),), pytest.raises(PromptError, match="X1 > X0")),
        ((ObjectPrompt(1, 0),), pytest.raises(PromptError, match="at least one point or a box")),
        ((ObjectPrompt(1, 0, ((1.0, 1.0),), ()),), pytest.raises(PromptError, match="1 points but 0 labels")),
        ((ObjectPrompt(-1, 0, ((1.0, 1.0),), (1,)),), pytest.raises(PromptError, match="obj_id must be >= 0")),
        (
            (ObjectPrompt(1, 0, ((1.0, 1.0),), (1,)), ObjectPrompt(1, 0, box_xyxy=(0.0, 0.0, 5.0, 5.0))),
            pytest.raises(PromptError, match="two prompts on frame 0"),
        ),
    ],
)
def test_validate_prompts(prompts: tuple[ObjectPrompt, ...], expectation: Any) -> None:
    with expectation:
        validate_prompts(prompts, width=160, height=120, num_frames=20)


def test_frame_names_round_trip_and_sort() -> None:
    assert frame_name(0) == "00000.jpg" and frame_name(123) == "00123.jpg"
    assert frame_index("00123.jpg") == 123 and frame_index(frame_name(100000)) == 100000
    for bad in ("123.png", "abc.jpg", "00001"):
        with pytest.raises(ValueError, match="00042.jpg"):
            frame_index(bad)
    with pytest.raises(ValueError):
        frame_name(-1)


def test_check_frame_dir(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        check_frame_dir(tmp_path / "nope", 3)
    for i in (0, 2):
        (tmp_path / frame_name(i)).write_bytes(b"x")
    with pytest.raises(StorageError, match="missing 00001.jpg"):
        check_frame_dir(tmp_path, 3)
    (tmp_path / frame_name(1)).write_bytes(b"x")
    check_frame_dir(tmp_path, 3)


@pytest.mark.parametrize("rel", ["/etc/passwd", "../outside", "jobs/../../x", ""])
def test_resolve_inside_rejects_escapes(tmp_path: Path, rel: str) -> None:
    with pytest.raises(StorageError):
        resolve_inside(tmp_path, rel)


def test_resolve_inside_rejects_symlink_out(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(StorageError, match="outside STORAGE_ROOT"):
        resolve_inside(tmp_path / "root", "link/secret")
    assert resolve_inside(tmp_path / "root", "jobs/a/frames") == (tmp_path / "root" / "jobs/a/frames").resolve()


@pytest.mark.parametrize("job_id", ["a", "job-1.2_x", "A" * 64])
def test_good_job_ids(job_id: str) -> None:
    assert validate_job_id(job_id) == job_id
    assert job_frames_rel(job_id) == f"jobs/{job_id}/frames"


@pytest.mark.parametrize("job_id", ["", "-lead", "a/b", "a..b", "A" * 65, "sp ace", "x:y"])
def test_bad_job_ids(job_id: str) -> None:
    with pytest.raises(JobIdError, match="job id"):
        validate_job_id(job_id)


def test_keys_and_entry_ids() -> None:
    keys = Keys()
    assert (keys.jobs, keys.group, keys.events, keys.dead) == ("vseg:jobs", "vseg:workers", "vseg:events", "vseg:dead")
    assert keys.results("j") == "vseg:results:{j}" and Keys("other").jobs == "other:jobs"
    assert frame_entry_id(0) == "1-0" and frames_end_entry_id(20) == "21-0" and keys.frames("j") == "vseg:frames:{j}"
    # layout 2: every key of one job under its hash tag, so that they share one Redis Cluster slot
    job_keys = [keys.job("j"), keys.results("j"), keys.frames("j"), keys.control("j"), keys.producer("j"),
                keys.submit_lock("j")]
    assert job_keys == ["vseg:job:{j}", "vseg:results:{j}", "vseg:frames:{j}", "vseg:control:{j}",
                        "vseg:producer:{j}", "vseg:job:{j}:submit-lock"]
    assert len({key_slot(k.encode()) for k in job_keys}) == 1 and keys.layout == "vseg:layout"
    assert int(frame_entry_id(10**9).split("-")[0]) < int(TERMINAL_ENTRY_ID.split("-")[0])


def test_the_shipped_service_yaml_restates_no_default() -> None:
    """configs/service.yaml holds only what a deployment changes: a key equal to its default in
    runtime/settings.py would hide a later change of that default."""
    from runtime.settings import SERVICE_YAML

    doc = yaml.safe_load(SERVICE_YAML.read_text()) or {}
    defaults = Settings.load(environ={}, config_path=None)
    restated = [k for k, v in doc.items()
                if getattr(Settings.load(environ={}, config_path=None, **{k: v}), k) == getattr(defaults, k)]
    assert not restated, f"configs/service.yaml restates the defaults of {restated}: keep them in runtime/settings.py"


def test_settings_precedence(tmp_path: Path) -> None:
    yaml_file = tmp_path / "service.yaml"
    yaml_file.write_text("key_prefix: fromyaml\nimage_size: 512\n")
    s = Settings.load({"VSEG_IMAGE_SIZE": "256", "STORAGE_ROOT": str(tmp_path)}, config_path=yaml_file)
    assert (s.key_prefix, s.image_size, s.storage_root) == ("fromyaml", 256, tmp_path)
    assert Settings.load({"VSEG_IMAGE_SIZE": "256"}, config_path=yaml_file, image_size=1024).image_size == 1024


@pytest.mark.parametrize(
    "env, match",
    [
        ({"VSEG_IMAGE_SIZE": "big"}, "VSEG_IMAGE_SIZE"),
        ({"VSEG_IMAGE_SIZE": "250"}, "multiple of 16"),
        ({"VSEG_JPEG_QUALITY": "0"}, "jpeg_quality"),
        ({"VSEG_BLOCK_MS": "60000"}, "shorter than socket_timeout_s"),
        ({"VSEG_RENDER_PRESET": "turbo"}, "render_preset must be auto or one of ultrafast"),
        ({"VSEG_RENDER_THREADS": "-1"}, "render_threads must be >= 0"),
        ({"VSEG_DECODE_THREADS": "-2"}, "decode_threads must be >= 0"),
        ({"VSEG_PRODUCER_TTL_S": "0"}, r"producer_ttl_s \(VSEG_PRODUCER_TTL_S\) must be positive"),
        ({"VSEG_ENCODER_BATCH": "0"}, "encoder_batch must be 1..64"),
        ({"VSEG_ENCODER_BATCH": "two"}, "VSEG_ENCODER_BATCH"),
    ],
)
def test_bad_settings(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Settings.load(env, config_path=None)


def test_job_states_are_the_wire_strings() -> None:
    assert [s.value for s in JobState] == ["queued", "running", "retrying", "completed", "failed", "cancelled", "dead"]
    assert str(JobState.QUEUED) == f"{JobState.QUEUED}" == "queued" and JobState.DEAD == "dead"
    assert "cancelled" in TERMINAL_STATES and "retrying" not in TERMINAL_STATES
    assert {s.value for s in TERMINAL_STATES} == {t.TYPE.value for t in messages.TERMINAL_TYPES}


def _lua_in_the_code() -> dict[str, list[str]]:
    """Every string literal in the packages that holds Lua (a `redis.call`), by module, after importing each
    module that holds one (so that its scripts are in the registry)."""
    import ast
    import importlib

    from tests.test_layout import modules

    found: dict[str, list[str]] = {}
    for name, path in modules().items():
        tree = ast.parse(path.read_text(), str(path))
        texts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                 and "redis.call(" in n.value]
        if texts:
            importlib.import_module(name)
            found[name] = texts
    return found


def test_every_lua_script_is_in_the_one_registry_and_none_spells_a_job_state() -> None:
    """runtime/lua.py's registry holds every script (a Lua text anywhere in the code outside it fails here),
    only it registers scripts with redis-py, and no script spells a job state or the events stream's length:
    states are arguments (JobState), so the wire strings live in one place."""
    import ast

    from runtime.lua import SCRIPTS
    from tests.test_layout import modules

    in_code = _lua_in_the_code()
    assert {"producer.enqueue", "producer.running_prompts", "producer.control", "worker.broker.scripts"} <= set(in_code), \
        sorted(in_code)
    outside = [(module, text.strip().splitlines()[0]) for module, texts in in_code.items() for text in texts
               if not any(text in script for script in SCRIPTS.values())]
    assert not outside, f"Lua outside runtime/lua.py's registry (define it with lua(name, text)): {outside}"
    assert len(SCRIPTS) >= 12, sorted(SCRIPTS)
    for name, script in SCRIPTS.items():
        for state in JobState:
            assert f"'{state.value}'" not in script and f'"{state.value}"' not in script, (name, state)
        assert str(EVENTS_MAXLEN) not in script, name
    allowed = {("worker.broker.scripts", "script_load")}  # run_pipeline loads a registered Script after NOSCRIPT
    callers = sorted({(name, n.attr) for name, path in modules().items() if name != "runtime.lua"
                      for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)
                      and n.attr in {"register_script", "evalsha", "eval_ro", "evalsha_ro", "script_load"}} - allowed)
    assert not callers, f"scripts registered or sent outside runtime/lua.py's register(): {callers}"


def test_the_registry_refuses_an_unknown_script_and_a_second_text_under_one_name() -> None:
    import fakeredis

    from runtime.lua import SCRIPTS, lua, register

    with pytest.raises(KeyError, match="no Lua script named 'nope'"):
        register(fakeredis.FakeRedis(), "nope")
    lua("test_only_script", "return redis.call('PING')")
    lua("test_only_script", "return redis.call('PING')")  # the same text again (a module reloaded) is fine
    try:
        with pytest.raises(ValueError, match="two Lua scripts are named 'test_only_script'"):
            lua("test_only_script", "return 1")
    finally:
        SCRIPTS.pop("test_only_script")


@pytest.mark.parametrize("shape", [(720, 1280), (7, 5), (1, 1), (64, 96)])
def test_rle_runs_and_centroid_match_the_decoded_mask(shape: tuple[int, int]) -> None:
    from schemas.rle import rle_centroid, rle_runs

    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.02, 0.5, 1.0):
        mask = rng.random(shape) < density
        rle = encode_mask(mask)
        runs = rle_runs(rle)
        assert runs.sum() == mask.size and runs[1::2].sum() == mask.sum()
        ys, xs = np.nonzero(mask)
        got = rle_centroid(rle)
        if xs.size == 0:
            assert got is None
        else:
            assert got == pytest.approx((xs.mean() + 0.5, ys.mean() + 0.5), abs=1e-9)
