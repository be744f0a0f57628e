"""The message codec: the hand-written one (baseline) against msgspec Structs (schemas/messages.py).

Encodes and decodes a realistic `job` entry (5 prompts) and `frame` entry (4 objects with COCO RLE masks
of a 960x540 frame) --n times each, in --rounds interleaved rounds (old, new, old, new, ...: a shared
machine's speed drifts), and prints the median microseconds per entry and the ratio old / new (above 1:
the new codec is faster). Both write the same bytes (checked first).

    .venv/bin/python bench/bench_codec.py [--n 20000] [--rounds 5]

The baseline below is schemas/messages.py at commit 845ff02 (dataclasses, msgpack, from_dict in Python),
copied verbatim from SCHEMA_VERSION down; tests/test_messages_codec.py also uses it as "the old code"
for the compatibility tests (old writer -> new reader and back).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import msgpack
import msgspec
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from schemas import messages  # noqa: E402
from schemas.errors import PromptError, SchemaError  # noqa: E402
from schemas.names import Keys, validate_job_id  # noqa: E402
from schemas.prompts import ObjectPrompt  # noqa: E402
from schemas.rle import Rle, encode_mask, mask_bbox_xyxy  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# BASELINE: the hand-written codec, schemas/messages.py at commit 845ff02, verbatim (`git show
# 845ff02:schemas/messages.py`, from SCHEMA_VERSION to the end). Not used by the service.
# ---------------------------------------------------------------------------------------------------

SCHEMA_VERSION = 1


class EntryType(str, enum.Enum):
    JOB = "job"
    FRAME = "frame"
    STARTED = "started"
    PROGRESS = "progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD = "dead"


@dataclass(frozen=True)
class JobMessage:
    """A video job on `vseg:jobs`: a frame directory under STORAGE_ROOT plus the prompts."""

    TYPE: ClassVar[EntryType] = EntryType.JOB
    job_id: str
    frames_dir: str  # relative to STORAGE_ROOT
    num_frames: int
    width: int
    height: int
    fps: float
    prompts: tuple[ObjectPrompt, ...]
    source: str = ""  # the video's file name, for humans
    submitted_at: float = field(default_factory=time.time)
    # Streaming hand-off: when set, frames are still being decoded and are announced on this stream
    # (vseg:frames:{job_id}); num_frames is then the producer's estimate and the end marker has the total.
    frames_stream: str = ""
    # Streamed jobs: the producer keeps Keys.producer(job_id) alive, expiring after this many seconds,
    # while it decodes, so a worker can tell a dead producer from a slow one; 0: it does not (older producers).
    producer_ttl_s: float = 0.0
    render: bool = True  # False: masks only, no MP4 (Completed.render_path is then "")
    v: int = SCHEMA_VERSION


@dataclass(frozen=True)
class ObjectResult:
    """One object on one frame. An object absent from the frame has an empty mask and area 0."""

    obj_id: int
    mask: Rle
    bbox_xyxy: list[float]
    area: int
    score: float  # SAM 2's object score as a probability (sigmoid of object_score_logits)


@dataclass(frozen=True)
class FrameResult:
    TYPE: ClassVar[EntryType] = EntryType.FRAME
    job_id: str
    frame_idx: int
    objects: tuple[ObjectResult, ...]
    random_weights: bool = False  # True when the model ran with random weights (smoke tests only)
    v: int = SCHEMA_VERSION


@dataclass(frozen=True)
class Started:
    TYPE: ClassVar[EntryType] = EntryType.STARTED
    job_id: str
    worker: str
    num_frames: int
    obj_ids: tuple[int, ...]
    model: str = ""
    attempt: int = 1
    random_weights: bool = False
    at: float = field(default_factory=time.time)
    v: int = SCHEMA_VERSION


@dataclass(frozen=True)
class Progress:
    TYPE: ClassVar[EntryType] = EntryType.PROGRESS
    job_id: str
    frames_done: int
    num_frames: int
    fps: float = 0.0
    at: float = field(default_factory=time.time)
    v: int = SCHEMA_VERSION


@dataclass(frozen=True)
class Completed:
    TYPE: ClassVar[EntryType] = EntryType.COMPLETED
    job_id: str
    render_path: str  # relative to STORAGE_ROOT; "" when the job asked for no render
    num_frames: int
    num_objects: int
    timings_s: dict[str, float] = field(default_factory=dict)
    random_weights: bool = False
    at: float = field(default_factory=time.time)
    v: int = SCHEMA_VERSION


@dataclass(frozen=True)
class Failed:
    TYPE: ClassVar[EntryType] = EntryType.FAILED
    job_id: str
    error: str
    error_type: str = ""
    retryable: bool = False
    at: float = field(default_factory=time.time)
    v: int = SCHEMA_VERSION


@dataclass(frozen=True)
class Cancelled:
    """Terminal: the job was cancelled (`python -m producer cancel`); it is not retried."""

    TYPE: ClassVar[EntryType] = EntryType.CANCELLED
    job_id: str
    frames_done: int = 0
    at: float = field(default_factory=time.time)
    v: int = SCHEMA_VERSION


@dataclass(frozen=True)
class Dead:
    """Terminal: the job ran out of attempts (or could not be decoded) and was moved to vseg:dead."""

    TYPE: ClassVar[EntryType] = EntryType.DEAD
    job_id: str
    error: str
    attempts: int = 0
    at: float = field(default_factory=time.time)
    v: int = SCHEMA_VERSION


Message = JobMessage | FrameResult | Started | Progress | Completed | Failed | Cancelled | Dead
Terminal = Completed | Failed | Cancelled | Dead
TERMINAL_TYPES = (Completed, Failed, Cancelled, Dead)
M = TypeVar("M", JobMessage, FrameResult, Started, Progress, Completed, Failed, Cancelled, Dead)

_BY_TYPE: dict[str, type[Any]] = {
    cls.TYPE.value: cls for cls in (JobMessage, FrameResult, Started, Progress, Completed, Failed, Cancelled, Dead)
}


def to_dict(msg: Message) -> dict[str, Any]:
    """Plain map of a message (nested prompts and objects as maps)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if f.name == "prompts":
            value = [p.to_dict() for p in value]
        elif f.name == "objects":
            value = [dataclasses.asdict(o) for o in value]
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def encode(msg: Message) -> dict[str, bytes]:
    """Stream entry fields for `msg`: {'type': ..., 'data': msgpack map}."""
    return {"type": msg.TYPE.value.encode(), "data": msgpack.packb(to_dict(msg), use_bin_type=True)}


def _field(fields: Mapping[Any, Any], name: str) -> Any:
    value = fields.get(name, fields.get(name.encode()))
    if value is None:
        raise SchemaError(f"stream entry has no {name!r} field; fields present: {sorted(map(str, fields))}")
    return value


def decode(fields: Mapping[Any, Any]) -> Message:
    """Decode stream entry fields into a message, raising SchemaError on anything malformed."""
    raw_type = _field(fields, "type")
    type_name = raw_type.decode() if isinstance(raw_type, bytes) else str(raw_type)
    cls = _BY_TYPE.get(type_name)
    if cls is None:
        raise SchemaError(f"unknown entry type {type_name!r}; expected one of {sorted(_BY_TYPE)}")
    raw = _field(fields, "data")
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=False) if isinstance(raw, (bytes, bytearray)) else raw
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise SchemaError(f"{type_name} entry's data is not valid msgpack: {e}") from e
    return from_dict(cls, data)


def from_dict(cls: type[M], data: Any) -> M:
    """Build message class `cls` from a decoded map, checking version, required fields and types."""
    name = cls.TYPE.value
    if not isinstance(data, dict):
        raise SchemaError(f"{name} data must be a map, but got {type(data).__name__}")
    version = data.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SchemaError(f"{name} data has no integer schema version 'v' (got {version!r})")
    if version < 1 or version > SCHEMA_VERSION:
        raise SchemaError(
            f"{name} message has schema version {version}, but this reader supports 1..{SCHEMA_VERSION}; "
            f"upgrade the worker or the client"
        )
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in known}
    missing = [
        f.name
        for f in known.values()
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise SchemaError(f"{name} message is missing required fields {missing}")
    try:
        if "job_id" in kwargs:
            validate_job_id(kwargs["job_id"])
        if cls is JobMessage:
            kwargs["prompts"] = tuple(ObjectPrompt.from_dict(p) for p in kwargs["prompts"])
            for key in ("num_frames", "width", "height"):
                if not isinstance(kwargs[key], int) or kwargs[key] <= 0:
                    raise SchemaError(f"job field {key} must be a positive integer, but got {kwargs[key]!r}")
            if not isinstance(kwargs["frames_dir"], str):
                raise SchemaError(f"job field frames_dir must be a string, got {kwargs['frames_dir']!r}")
            ttl = kwargs.get("producer_ttl_s", 0.0)
            if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 <= ttl < math.inf:
                raise SchemaError(f"job field producer_ttl_s must be a number of seconds >= 0, but got {ttl!r}")
        elif cls is FrameResult:
            kwargs["objects"] = tuple(ObjectResult(**o) for o in kwargs["objects"])
        elif cls is Started:
            kwargs["obj_ids"] = tuple(kwargs["obj_ids"])
        return cls(**kwargs)
    except SchemaError:
        raise
    except (PromptError, TypeError, ValueError, KeyError) as e:
        raise SchemaError(f"{name} message is malformed: {e}") from e


# ---------------------------------------------------------------------------------------------------
# End of the baseline. The benchmark.
# ---------------------------------------------------------------------------------------------------

WIDTH, HEIGHT = 960, 540


def sample_job(mod: Any) -> Any:
    """A job with 5 prompts (points with labels, boxes, both), built with module `mod`'s classes."""
    prompts = (
        ObjectPrompt(1, 0, ((412.0, 233.5), (440.0, 260.0), (300.0, 100.0)), (1, 1, 0)),
        ObjectPrompt(2, 0, box_xyxy=(610.0, 180.0, 790.0, 470.0)),
        ObjectPrompt(3, 12, ((120.5, 400.0),), (1,), (60.0, 330.0, 200.0, 520.0)),
        ObjectPrompt(4, 30, ((850.0, 90.0), (870.0, 120.0)), (1, 1)),
        ObjectPrompt(5, 45, box_xyxy=(10.0, 10.0, 140.0, 95.5)),
    )
    return mod.JobMessage("clip-20261201-0001", "jobs/clip-20261201-0001/frames", 1800, WIDTH, HEIGHT, 29.97,
                          prompts, source="street_crossing.mp4", submitted_at=1796000000.25,
                          frames_stream=Keys().frames("clip-20261201-0001"), producer_ttl_s=30.0)


def _blob(cx: float, cy: float, r: float, wobble: float) -> np.ndarray:
    """A mask like SAM 2's: one smooth blob with a wavy outline."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    angle = np.arctan2(yy - cy, xx - cx)
    radius = r * (1 + wobble * np.sin(5 * angle) + 0.5 * wobble * np.cos(3 * angle + 1))
    return np.hypot(xx - cx, yy - cy) < radius


MASKS = [_blob(430, 250, 120, 0.12), _blob(700, 320, 150, 0.2), _blob(130, 430, 70, 0.3), _blob(860, 105, 25, 0.1)]


def sample_frame(mod: Any) -> Any:
    """A frame result with 4 objects, their masks COCO RLE of a 960x540 frame, built with `mod`'s classes."""
    objects = tuple(
        mod.ObjectResult(obj_id=i + 1, mask=encode_mask(m), bbox_xyxy=mask_bbox_xyxy(m), area=int(m.sum()),
                         score=0.97 - 0.1 * i)
        for i, m in enumerate(MASKS)
    )
    return mod.FrameResult("clip-20261201-0001", 417, objects)


def _per_entry_us(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def _steps(old: Any, new: messages.Message) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """Each step as (the baseline's call, the new codec's call)."""
    old_fields, new_fields = encode(old), messages.encode(new)
    return {
        "encode": (lambda: encode(old), lambda: messages.encode(new)),
        "decode": (lambda: decode(old_fields), lambda: messages.decode(new_fields)),
        "round trip": (lambda: decode(encode(old)), lambda: messages.decode(messages.encode(new))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="entries encoded and decoded per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    old_module = sys.modules[__name__]
    print(f"machine: {machine()}; msgpack {'.'.join(map(str, msgpack.version))}, "
          f"msgspec {msgspec.__version__}; n={args.n}, rounds={args.rounds}")
    print(f"{'entry':6} {'step':10} {'bytes':>6} {'old us':>8} {'new us':>8} {'old/new':>8}  rounds")
    for kind, make in (("job", sample_job), ("frame", sample_frame)):
        old, new = make(old_module), make(messages)
        old_fields, new_fields = encode(old), messages.encode(new)
        assert old_fields == new_fields, f"{kind}: the two codecs write different bytes"
        assert messages.decode(old_fields) == new and decode(new_fields) == old
        for step, (old_fn, new_fn) in _steps(old, new).items():
            times: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(args.rounds):
                times["old"].append(_per_entry_us(old_fn, args.n))
                times["new"].append(_per_entry_us(new_fn, args.n))
            ratios = " ".join(f"{o / n:.2f}" for o, n in zip(times["old"], times["new"]))
            old_us, new_us = statistics.median(times["old"]), statistics.median(times["new"])
            print(f"{kind:6} {step:10} {len(new_fields['data']):6d} {old_us:8.2f} {new_us:8.2f} "
                  f"{old_us / new_us:8.2f}  ({ratios})")


if __name__ == "__main__":
    main()
