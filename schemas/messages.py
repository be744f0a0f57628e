"""Wire messages: one typed dataclass per entry type, a msgpack codec with a schema version.

Every stream entry has two fields: `type` (one of EntryType) and `data` (a msgpack map whose `v`
is the schema version). Readers accept any `v` up to SCHEMA_VERSION and ignore fields they do not
know; new fields always get defaults, so old readers keep working. Anything else raises SchemaError
(poison: dead-letter it, do not retry it).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import msgpack

from schemas.errors import PromptError, SchemaError
from schemas.names import validate_job_id
from schemas.prompts import ObjectPrompt
from schemas.rle import Rle

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
