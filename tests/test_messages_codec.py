"""Unit tier: the msgspec codec against the hand-written one it replaced (no Redis, no model).

"The old code" is schemas/messages.py at commit 845ff02, kept verbatim as the baseline of
bench/bench_codec.py: dataclasses, `msgpack.packb(to_dict(msg), use_bin_type=True)`, from_dict in Python.
Entries written by either must decode with the other, to equal messages.
"""

from __future__ import annotations

import math
import time
from types import ModuleType
from typing import Any

import msgpack
import msgspec
import pytest

from bench import bench_codec as old_code
from schemas import messages
from schemas.errors import SchemaError
from schemas.prompts import ObjectPrompt

AT = 1796000000.5


def samples(mod: ModuleType) -> list[Any]:
    """One message of every type, built with module `mod`'s classes (the same signatures in both)."""
    return [
        old_code.sample_job(mod),
        mod.JobMessage("j2", "jobs/j2/frames", 3, 10, 10, 25, (ObjectPrompt(0, 0, ((1, 2),), (1,)),),
                       submitted_at=AT, render=False),  # ints where floats go, as some writers send them
        old_code.sample_frame(mod),
        mod.FrameResult("j2", 0, (), random_weights=True),
        mod.Started("j2", "host:1", 3, (0, 4), "sam2.1-tiny", 2, True, at=AT),
        mod.Progress("j2", 2, 3, 4.5, at=AT),
        mod.Completed("j2", "jobs/j2/render.mp4", 3, 2, {"total_s": 1.25, "segment_s": 1}, False, at=AT),
        mod.Failed("j2", "boom", "RuntimeError", True, at=AT),
        mod.Cancelled("j2", 2, at=AT),
        mod.Dead("j2", "out of attempts", 3, at=AT),
    ]


PAIRS = list(zip(samples(old_code), samples(messages)))
IDS = [f"{new.TYPE.value}{i}" for i, (_, new) in enumerate(PAIRS)]


# Fields added since the codec changed (new fields get defaults; an old reader ignores them).
ADDED = {"resume", "resume_from", "live", "auto", "labels", "skipped", "captured_at", "pts_s", "latency_s", "dropped",
         "latency_p50_s", "latency_p95_s", "source_outages", "source_down_s", "label", "label_score", "first_frame",
         "dropped_at_ingest", "source_state", "source_down_since", "auto_keyframes", "auto_proposed", "auto_added", "text"}


def _without_added(data: dict[str, Any]) -> dict[str, Any]:
    """The map less the added fields, also inside a frame's objects."""
    return {k: [_without_added(o) for o in v] if k == "objects" else v for k, v in data.items() if k not in ADDED}


@pytest.mark.parametrize("old, new", PAIRS, ids=IDS)
def test_both_codecs_write_the_same_entries(old: Any, new: messages.Message) -> None:
    """Byte for byte, once the fields added since are left out (the same keys, values and order)."""
    ours, theirs = messages.encode(new), old_code.encode(old)
    assert ours["type"] == theirs["type"]
    ours_data = _without_added(msgpack.unpackb(ours["data"], raw=False))
    assert msgpack.packb(ours_data, use_bin_type=True) == theirs["data"]
    assert _without_added(messages.to_dict(new)) == old_code.to_dict(old)


@pytest.mark.parametrize("old, new", PAIRS, ids=IDS)
def test_old_writer_new_reader_and_back(old: Any, new: messages.Message) -> None:
    written_by_old = {b"type": old.TYPE.value.encode(), b"data": msgpack.packb(old_code.to_dict(old), use_bin_type=True)}
    assert messages.decode(written_by_old) == new
    assert old_code.decode(messages.encode(new)) == old


def test_a_map_decoded_already_is_accepted_too() -> None:
    job = old_code.sample_job(messages)
    assert messages.decode({"type": "job", "data": messages.to_dict(job)}) == job
    with pytest.raises(SchemaError, match="must be msgpack bytes or a map"):
        messages.decode({"type": "job", "data": object()})


@pytest.mark.parametrize("cls", [messages.Started, messages.Progress, messages.Completed, messages.Failed,
                                 messages.Cancelled, messages.Dead])
def test_fields_a_writer_leaves_out_get_their_defaults(cls: type[Any]) -> None:
    required = {f.name: f for f in msgspec.structs.fields(cls) if f.required}
    values = {"job_id": "j", "worker": "w", "num_frames": 3, "obj_ids": [1], "frames_done": 1, "render_path": "",
              "num_objects": 1, "error": "e"}
    msg = messages.decode({"type": cls.TYPE.value, "data": msgpack.packb({**{k: values[k] for k in required}, "v": 1})})
    for f in msgspec.structs.fields(cls):
        if not f.required and f.name != "at":
            assert getattr(msg, f.name) == (f.default if f.default_factory is msgspec.NODEFAULT else f.default_factory())
    assert abs(getattr(msg, "at", 0.0) - time.time()) < 60


def test_messages_are_frozen_and_positional_like_the_dataclasses() -> None:
    dead, cancelled, failed = messages.Dead("j", "err", 3), messages.Cancelled("j", 7), messages.Failed("j", "e", "OSError")
    assert (dead.error, dead.attempts, cancelled.frames_done, failed.error_type) == ("err", 3, 7, "OSError")
    with pytest.raises(AttributeError):
        dead.error = "other"  # type: ignore[misc]
    assert msgspec.structs.replace(dead, attempts=4).attempts == 4
    assert {cls.TYPE for cls in messages.TERMINAL_TYPES} == {messages.EntryType(t) for t in
                                                             ("completed", "failed", "cancelled", "dead")}


def _frame_data(**changes: Any) -> dict[str, Any]:
    return {**messages.to_dict(old_code.sample_frame(messages)), **changes}


def _object(**changes: Any) -> dict[str, Any]:
    return {**_frame_data()["objects"][0], **changes}


def _prompt(**changes: Any) -> dict[str, Any]:
    return {"obj_id": 1, "frame_idx": 0, "points_xy": [[1.0, 2.0]], "labels": [1], "box_xyxy": None, **changes}


def _job_data(**changes: Any) -> dict[str, Any]:
    return {**messages.to_dict(old_code.sample_job(messages)), **changes}


@pytest.mark.parametrize(
    "type_, data, match",
    [
        ("frame", _frame_data(frame_idx=-1), "field frame_idx = -1: Expected `int` >= 0"),
        ("frame", _frame_data(job_id="a b"), "field job_id: job id must be"),
        ("frame", _frame_data(objects=[_object(mask={"size": [2, 2], "counts": "abc"})]),
         r"field objects\[0\].mask.counts = 'abc': Expected `bytes`, got `str`"),
        ("frame", _frame_data(objects=[{"obj_id": 1}]), r"field objects\[0\] = \{'obj_id': 1\}: .*required field `mask`"),
        ("frame", _frame_data(objects=[_object(score="high")]), r"field objects\[0\].score = 'high'"),
        ("frame", _frame_data(objects=[_object(area=-5)]), r"field objects\[0\].area = -5: Expected `int` >= 0"),
        ("job", _job_data(num_frames=True), "field num_frames = True: Expected `int`, got `bool`"),
        ("job", _job_data(fps="fast"), "field fps = 'fast'"),
        ("job", _job_data(producer_ttl_s=math.inf), "producer_ttl_s must be a number of seconds >= 0, but got inf"),
        ("job", _job_data(producer_ttl_s=math.nan), "field producer_ttl_s = nan"),
        ("job", _job_data(prompts=[_prompt(points_xy=[[math.nan, 2.0]])]), r"prompts\[0\]: coordinates must be finite"),
        ("job", _job_data(prompts=[_prompt(frame_idx=-1)]), r"prompts\[0\]: frame index must be >= 0"),
        ("job", _job_data(prompts=[_prompt(points_xy=[[1, 2, 3]])]), r"prompts\[0\].points_xy\[0\] = \[1, 2, 3\]"),
        ("job", _job_data(prompts=[_prompt(box_xyxy=[5, 5, 1, 1])]), "X1 > X0"),
        ("job", _job_data(prompts="all"), "field prompts = 'all': Expected `array`, got `str`"),
        ("started", {"job_id": "j", "worker": "w", "num_frames": 1, "obj_ids": [-1], "v": 1},
         r"field obj_ids\[0\] = -1"),
        ("completed", {"job_id": "j", "render_path": "", "num_frames": 1, "num_objects": 1, "v": 1,
                       "timings_s": {"total_s": "slow"}}, r"field timings_s\[...\]: Expected `float`, got `str`"),
        ("dead", {"job_id": "j", "error": "e", "attempts": -1, "v": 1}, "field attempts = -1"),
        ("dead", {"job_id": "j", "error": "e", "v": 1.0}, r"no integer schema version 'v' \(got 1.0\)"),
        ("dead", {1: "e", "v": 1}, "must be a map with string keys"),
        ("dead", {"job_id": "j", "v": 2, "error": 7}, "schema version 2"),  # the version is refused first
    ],
)
def test_poison_names_the_field_and_the_value(type_: str, data: Any, match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        messages.decode({b"type": type_.encode(), b"data": msgpack.packb(data, use_bin_type=True)})


def test_a_long_bad_value_is_shortened_in_the_error() -> None:
    data = _frame_data(objects=[_object(mask={"size": [2, 2], "counts": "x" * 10_000})])
    with pytest.raises(SchemaError, match=r"\.\.\. \(10002 characters\)") as e:
        messages.decode({"type": "frame", "data": msgpack.packb(data)})
    assert len(str(e.value)) < 300
