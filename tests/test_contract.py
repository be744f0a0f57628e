"""The contract as files (schemas/contract.py): the committed schemas and AsyncAPI document are current and
well formed, the README's table of fields agrees with them, what they say is always present is what the
writer writes, and every entry of real runs validates against them: a file job given prompts and a removal
while it runs (`object` and `update` entries), a live job, an `--auto` job with labels, a queued job
cancelled, a failed job and a dead one (with the `vseg:dead` entry and the frames streams too)."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import redis
import yaml
from jsonschema import Draft202012Validator

from producer.control import cancel
from producer.live_submit import submit_live
from producer.submission import submit
from runtime.settings import Settings
from schemas import contract, messages
from schemas.errors import SchemaError
from schemas.rle import encode_mask
from tests.fakes import ChaosHooks, ColourSegmenter
from tests.videos import disc_prompt, draw_entering_square, make_video
from tests.workers import wait_for
from worker.service.loop import Worker

ROOT = Path(__file__).resolve().parent.parent
N = 30
SIZE = (96, 64)
SCHEMAS = {name: json.loads((contract.CONTRACT_DIR / f"{name}.schema.json").read_text()) for name in contract.TYPES}


def test_the_committed_files_are_current(tmp_path: Path) -> None:
    contract.write(tmp_path)
    stale = sorted(p.name for p in tmp_path.iterdir()
                   if not (contract.CONTRACT_DIR / p.name).is_file()
                   or (contract.CONTRACT_DIR / p.name).read_text() != p.read_text())
    stale += contract.stale_files()
    assert not stale, f"schemas/contract/ is stale ({sorted(set(stale))}): run python -m schemas.contract"


def test_check_names_each_stale_file_and_a_write_makes_them_current(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert contract.main(["--out", str(tmp_path)]) == 0
    assert contract.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "frame.schema.json").write_text("{}")
    (tmp_path / "asyncapi.yaml").unlink()
    (tmp_path / "gone.schema.json").write_text("{}")
    capsys.readouterr()
    assert contract.main(["--check", "--out", str(tmp_path)]) == 1
    said = capsys.readouterr().err
    assert all(f"{name} (run python -m schemas.contract)" in said
               for name in ("frame.schema.json", "asyncapi.yaml", "gone.schema.json")), said
    assert "job.schema.json" not in said
    contract.main(["--out", str(tmp_path)])
    assert contract.stale_files(tmp_path) == [] and not (tmp_path / "gone.schema.json").exists()


@pytest.mark.parametrize("file", sorted(p.name for p in contract.CONTRACT_DIR.glob("*.schema.json")))
def test_each_schema_is_a_valid_2020_12_schema(file: str) -> None:
    schema = json.loads((contract.CONTRACT_DIR / file).read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema" and schema["$id"] and schema["title"]
    Draft202012Validator.check_schema(schema)
    for name, prop in schema.get("properties", {}).items():  # every typed field says whether it is always there
        assert file in ("frames-stream.schema.json", "dead-letter.schema.json") or "x-always-present" in prop, name


def test_the_asyncapi_document_is_structurally_3_0() -> None:
    doc = yaml.safe_load((contract.CONTRACT_DIR / "asyncapi.yaml").read_text())
    assert doc["asyncapi"] == "3.0.0" and doc["info"]["title"] and doc["info"]["version"]
    components = doc["components"]["messages"]
    for name, message in components.items():
        ref = message["payload"]["schema"]["$ref"]
        file, _, pointer = ref.partition("#")
        target: Any = json.loads((contract.CONTRACT_DIR / file).read_text())  # the file exists
        for part in filter(None, pointer.split("/")):
            target = target[part]  # and so does the place in it
        assert message["payload"]["schemaFormat"] == contract.SCHEMA_FORMAT, name
    on_channels: set[str] = set()
    for cid, channel in doc["channels"].items():
        for key, ref in channel["messages"].items():
            assert ref["$ref"] == f"#/components/messages/{key}" and key in components, (cid, key)
            on_channels.add(key)
        assert set(re.findall(r"{(\w+)}", channel["address"])) == set(channel.get("parameters", {})), cid
    assert set(contract.TYPES) <= on_channels, "every entry type is on some channel"
    assert {c["address"] for c in doc["channels"].values()} == {
        "vseg:jobs", "vseg:results:{job_id}", "vseg:events", "vseg:control:{job_id}", "vseg:dead", "vseg:frames:{job_id}",
        "vseg:alerts", "vseg:job:{job_id}:alerts"}
    roles: dict[str, set[str]] = {}
    for oid, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), oid
        cid = op["channel"]["$ref"].removeprefix("#/channels/")
        assert cid in doc["channels"], oid
        for ref in op["messages"]:
            prefix = f"#/channels/{cid}/messages/"
            assert ref["$ref"].startswith(prefix) and ref["$ref"][len(prefix):] in doc["channels"][cid]["messages"], oid
        roles.setdefault(op["tags"][0]["name"], set()).add(f"{op['action']} {cid}")
    assert {"send jobs", "receive results", "receive control"} <= roles["producer"] | roles["backend"] | roles["worker"]
    assert "send jobs" in roles["producer"] and "receive jobs" in roles["worker"] and "send results" in roles["worker"]


def readme_fields() -> dict[str, set[str]]:
    """Each type's top-level field names in README's "The contract" table (`| type | `data` fields |`): the
    backticked names outside any (...), [...] or {...}."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## The contract")
    section = readme[start: readme.index("\n## ", start + 1)]
    table = section[section.index("| type | `data` fields |"):].split("\n\n")[0]
    found: dict[str, set[str]] = {}
    for row in table.splitlines()[2:]:
        cells = row.strip().strip("|").split("|", 1)
        name, text = cells[0].strip().strip("`"), cells[1]
        top, depth = [], 0
        for ch in text:
            depth += (ch in "([{") - (ch in ")]}")
            top.append(ch if depth == 0 and ch not in ")]}" else " ")
        found[name] = set(re.findall(r"`([^`]+)`", "".join(top)))
    return found


def test_the_readmes_table_names_every_field_of_every_type() -> None:
    table = readme_fields()
    assert set(table) == set(contract.TYPES), "one row per entry type"
    wrong = {name: {"README only": sorted(table[name] - (set(s["properties"]) - {"v"})),
                    "schema only": sorted(set(s["properties"]) - {"v"} - table[name])}
             for name, s in SCHEMAS.items() if table[name] != set(s["properties"]) - {"v"}}
    assert not wrong, f"README's contract table and schemas/contract/ disagree: {wrong}"


def test_always_present_is_what_the_writer_writes() -> None:
    """msgspec writes every field, except an omit_defaults Struct's fields at their defaults (ObjectResult's)."""
    plain = messages.ObjectResult(1, encode_mask(np.ones((2, 3), bool)), [0.0, 0.0, 3.0, 2.0], 6, 0.5)
    labelled = msgspec.structs.replace(plain, label="cat", label_score=0.9)
    frame = messages.FrameResult("j", 0, (plain, labelled))
    data = msgspec.msgpack.decode(messages.encode(frame)["data"])
    assert set(data) == set(SCHEMAS["frame"]["required"]) == set(SCHEMAS["frame"]["properties"])
    objects = SCHEMAS["frame"]["$defs"]["ObjectResult"]
    assert set(data["objects"][0]) == set(objects["required"]) == {"obj_id", "mask", "bbox_xyxy", "area", "score"}
    assert set(data["objects"][1]) == set(objects["properties"])
    assert [p["x-always-present"] for p in objects["properties"].values()] == [True] * 5 + [False] * 2
    contract.validate_entry(messages.encode(frame))


def test_a_bad_entry_is_refused_naming_its_type_and_field() -> None:
    rle = {"size": [2, 3], "counts": b"06"}
    entry = messages.encode(messages.FrameResult("j", 0, (messages.ObjectResult(1, rle, [0.0] * 4, 0, 0.5),)))
    data = msgspec.msgpack.decode(entry["data"])
    data["objects"][0]["score"] = "high"
    with pytest.raises(SchemaError, match=r"frame entry .*field objects\.0\.score: 'high' is not of type 'number'"):
        contract.validate_entry({b"type": b"frame", b"data": msgspec.msgpack.encode(data)})
    del data["job_id"]
    with pytest.raises(SchemaError, match="'job_id' is a required property"):
        contract.validate_entry({b"type": b"frame", b"data": msgspec.msgpack.encode(data)})
    with pytest.raises(SchemaError, match="unknown entry type 'nope'"):
        contract.validate_entry({b"type": b"nope", b"data": b"\x80"})
    with pytest.raises(SchemaError, match=r"frames stream entry .*schemas/contract/frames-stream.schema.json"):
        contract.validate_plain("frames", {b"frame_idx": b"x1", b"at": b"1.5"})
    contract.validate_plain("frames", {b"frame_idx": b"3", b"at": b"1712345678.123456"})


# Real runs: every entry they write validates.

class Seen:
    """Every entry of the streams read, validated, as JSON maps by stream kind and type."""

    def __init__(self) -> None:
        self.by_type: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def typed(self, kind: str, entries: Iterable[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for _id, fields in entries:
            contract.validate_entry(fields)
            doc = msgspec.json.decode(msgspec.json.encode(msgspec.msgpack.decode(fields[b"data"])))
            self.by_type.setdefault((kind, fields[b"type"].decode()), []).append(doc)

    def plain(self, kind: str, entries: Iterable[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for _id, fields in entries:
            contract.validate_plain(kind, fields)
            self.by_type.setdefault((kind, "plain"), []).append({k.decode(): v for k, v in fields.items()})

    def job(self, client: redis.Redis, settings: Settings, job_id: str) -> None:
        keys = settings.keys
        self.typed("results", client.xrange(keys.results(job_id)))
        self.typed("control", client.xrange(keys.control(job_id)))
        self.plain("frames", client.xrange(keys.frames(job_id)))

    def shared(self, client: redis.Redis, settings: Settings) -> None:
        self.typed("events", client.xrange(settings.keys.events))
        self.plain("dead", client.xrange(settings.keys.dead))

    def types(self, kind: str) -> set[str]:
        return {t for k, t in self.by_type if k == kind}


def run_worker(settings: Settings, client: redis.Redis, segmenter: Any = None, delay_s: float = 0.0) -> threading.Thread:
    worker = Worker(settings=settings, segmenter=segmenter or ChaosHooks(ColourSegmenter(), delay_s=delay_s),
                    client=client, name="contract")
    thread = threading.Thread(target=worker.run, kwargs={"burst": True}, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("v") / "v.mp4", num_frames=N, size_wh=SIZE, fps=30,
                      draw=draw_entering_square(N, SIZE))


def frames_done(client: redis.Redis, settings: Settings, job: str) -> int:
    return int(client.hget(settings.keys.job(job), "frames_done") or 0)


@pytest.mark.integration
def test_a_file_job_given_prompts_and_a_removal_while_it_runs(video: Path, settings: Settings,
                                                               redis_client: redis.Redis,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.service.control_reader

    monkeypatch.setattr(worker.service.control_reader, "POLL_S", 0.01)
    seen = Seen()
    submit(video, [disc_prompt(1, 0, N, SIZE)], settings=settings, job_id="file")
    seen.typed("jobs", redis_client.xrange(settings.keys.jobs))  # before a worker takes it
    thread = run_worker(settings, redis_client, delay_s=0.05)
    wait_for(lambda: frames_done(redis_client, settings, "file") >= 8, 30, "the job under way")
    for command in (messages.PromptCommand("file", uuid.uuid4().hex, (disc_prompt(5, 2, N, SIZE),)),  # backwards
                    messages.PromptCommand("file", uuid.uuid4().hex, (disc_prompt(6, 18, N, SIZE),)),  # ahead
                    messages.RemoveCommand("file", uuid.uuid4().hex, 9)):  # refused: never tracked
        redis_client.xadd(settings.keys.control("file"), messages.encode(command))
    wait_for(lambda: frames_done(redis_client, settings, "file") >= 19, 30, "past frame 18")
    redis_client.xadd(settings.keys.control("file"), messages.encode(messages.RemoveCommand("file", "r", 6)))
    thread.join(60)
    seen.job(redis_client, settings, "file")
    seen.shared(redis_client, settings)
    assert seen.types("jobs") == {"job"} and seen.types("control") == {"prompt", "remove"}
    assert seen.types("results") == {"started", "frame", "object", "update", "completed"}
    assert seen.types("events") == {"started", "progress", "object", "completed"}
    changes = {(o["obj_id"], o["change"]) for o in seen.by_type[("results", "object")]}
    assert changes == {(5, "added"), (6, "added"), (9, "refused"), (6, "removed")}
    frames = seen.by_type[("results", "frame")]
    assert all(f["skipped"] is False and f["captured_at"] is None and f["latency_s"] is None for f in frames)
    objects = [o for f in frames for o in f["objects"]]
    assert objects and not any("label" in o or "label_score" in o for o in objects)  # omit_defaults: left out
    (done,) = seen.by_type[("results", "completed")]
    assert done["num_objects"] == 2, "the objects tracked at the end: 1, and 5 added (6 added, then removed)"
    assert {p["source_state"] for p in seen.by_type[("events", "progress")]} == {""}
    assert len(seen.by_type[("frames", "plain")]) == N + 1  # N announcements and the end marker


@pytest.mark.integration
def test_a_live_job(video: Path, settings: Settings, redis_client: redis.Redis) -> None:
    live = dataclasses.replace(settings, max_latency_s=0.5, live_segment_s=1.0, live_playlist_size=3,
                               producer_ttl_s=3.0)
    seen = Seen()
    producer = threading.Thread(target=submit_live, args=(video, [disc_prompt(1, 0, N, SIZE)]),
                                kwargs={"settings": live, "job_id": "cam", "realtime": True}, daemon=True)
    producer.start()
    wait_for(lambda: redis_client.xlen(live.keys.jobs), 20, "the live job enqueued")
    seen.typed("jobs", redis_client.xrange(live.keys.jobs))
    run_worker(live, redis_client, delay_s=0.06).join(60)  # slower than the source: it skips frames
    producer.join(30)
    seen.job(redis_client, live, "cam")
    seen.shared(redis_client, live)
    (job,) = seen.by_type[("jobs", "job")]
    assert job["live"] is True and job["frames_stream"] == live.keys.frames("cam")
    assert seen.types("results") == {"started", "frame", "completed"}
    frames = seen.by_type[("results", "frame")]
    assert all(f["captured_at"] is not None for f in frames) and any(f["latency_s"] is not None for f in frames)
    assert {p["source_state"] for p in seen.by_type[("events", "progress")]} == {"up"}
    (started,) = seen.by_type[("results", "started")]
    assert started["first_frame"] is not None
    announced = [e for e in seen.by_type[("frames", "plain")] if "frame_idx" in e]
    assert announced and all("captured_at" in e and "dropped_at_ingest" in e for e in announced)


@pytest.mark.integration
def test_an_auto_job_with_labels(tmp_path: Path, settings: Settings, redis_client: redis.Redis) -> None:
    n = 40
    video = make_video(tmp_path / "auto.mp4", num_frames=n, size_wh=SIZE, fps=10, draw=draw_entering_square(n, SIZE))
    auto = dataclasses.replace(settings, proposer="tests.fakes:colour_proposer", labeller="tests.fakes:colour_labeller",
                               auto_confirm_frames=2, auto_lost_frames=3, label_every=5, auto_min_mask_region_area=10)
    seen = Seen()
    submit(video, [], settings=auto, job_id="auto", auto=messages.AutoOptions(every_frames=5),
           labels=("green", "magenta"), render=False)
    seen.typed("jobs", redis_client.xrange(auto.keys.jobs))
    run_worker(auto, redis_client).join(60)
    seen.job(redis_client, auto, "auto")
    seen.shared(redis_client, auto)
    assert seen.by_type[("jobs", "job")][0]["auto"]["every_frames"] == 5
    added = [o for o in seen.by_type[("results", "object")] if o["change"] == "added"]
    assert added and all(o["source"] == "auto" and o["label"] and o["request_id"] == "" for o in added)
    objects = [o for f in seen.by_type[("results", "frame")] for o in f["objects"]]
    assert any("label" in o and "label_score" in o for o in objects)
    (done,) = seen.by_type[("results", "completed")]
    last = max(seen.by_type[("results", "frame")], key=lambda f: f["frame_idx"])
    assert done["num_objects"] == len(last["objects"]) and done["render_path"] == ""  # tracked at the end; masks only


@pytest.mark.integration
def test_a_cancelled_a_failed_and_a_dead_job(video: Path, settings: Settings, redis_client: redis.Redis) -> None:
    seen = Seen()
    submit(video, [disc_prompt(1, 0, N, SIZE)], settings=settings, job_id="queued", max_frames=4)
    assert cancel("queued", settings=settings, client=redis_client) == "cancelled"
    submit(video, [disc_prompt(1, 0, N, SIZE)], settings=settings, job_id="broken", max_frames=6)
    seen.typed("jobs", redis_client.xrange(settings.keys.jobs))
    redis_client.xadd(settings.keys.jobs, {"type": "job", "data": msgspec.msgpack.encode({"job_id": "poison", "v": 1})})
    run_worker(settings, redis_client, segmenter=ChaosHooks(ColourSegmenter(fail_at_frame=2))).join(60)
    for job in ("queued", "broken", "poison"):
        seen.job(redis_client, settings, job)
    seen.shared(redis_client, settings)
    assert {"cancelled", "failed", "dead"} <= seen.types("results") and {"cancelled", "failed", "dead"} <= seen.types(
        "events")
    (dead,) = seen.by_type[("dead", "plain")]
    assert dead["source_stream"] == settings.keys.jobs.encode() and dead["attempts"] == b"0"
