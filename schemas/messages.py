"""Wire messages: one frozen msgspec Struct per entry type, a msgpack codec with a schema version.

Every stream entry has two fields: `type` (one of EntryType) and `data` (a msgpack map whose `v`
is the schema version). Readers accept any `v` up to SCHEMA_VERSION and ignore fields they do not
know; new fields always get defaults, so old readers keep working. Anything else raises SchemaError
naming the field (poison: dead-letter it, do not retry it).

Why msgspec: it decodes msgpack straight into typed Structs in C, and the field types (with the `Meta`
bounds below) are the checks, where the hand-written codec built a dict and then checked it in Python;
bench/bench_codec.py has the figures. The bytes written are the ones the msgpack package wrote for the
dataclasses before (field order, bin for bytes, float64), so old and new readers and writers mix.

Why no msgspec tagged union: its tag must be a field inside the encoded map, but ours is the entry's
`type` field beside `data`; copying it into `data` would change the wire. So `decode` picks a Decoder
by `type`: one dict lookup, which is what a tagged union does inside.

Why `v` is read in a first pass: msgspec fills a missing field with its default, and `v` needs a default
(writers never name it) yet must be on the wire (a map without a version is not ours). That pass
decodes only `v` (msgspec walks over the rest without building it) and checks it before any other
field, so a newer version's message is refused for its version, not for whichever field it changed.

What types cannot say is checked after decoding (`_check`): the job id's spelling (schemas.names),
prompt shapes (schemas.prompts), finite prompt coordinates and producer TTL. Constructors do not
validate, as with the dataclasses before: validation is the reader's.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

import msgspec
from msgspec import Meta

from schemas.decode_errors import check_version, entry_field, invalid, short
from schemas.errors import JobIdError, PromptError, SchemaError
from schemas.names import validate_job_id
from schemas.prompts import ObjectPrompt, check_prompt_shape
from schemas.rle import Rle

SCHEMA_VERSION = 1
TEXT_OBJ_ID = -1  # the obj_id of an `object` entry that answers a command's text (no one object)

# Bounds msgspec checks while decoding (in C; `ge` also refuses NaN). Constructors do not check them.
Count = Annotated[int, Meta(ge=0)]
Positive = Annotated[int, Meta(gt=0)]
Seconds = Annotated[float, Meta(ge=0)]


class EntryType(str, enum.Enum):
    JOB = "job"
    FRAME = "frame"
    STARTED = "started"
    PROGRESS = "progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD = "dead"
    PROMPT = "prompt"  # on vseg:control:{job_id}: prompts for a running job
    REMOVE = "remove"  # on vseg:control:{job_id}: an object to stop tracking
    OBJECT = "object"  # on the result stream and vseg:events: an object added, corrected, removed, or refused
    UPDATE = "update"  # on the result stream: an object's mask on a frame already published, computed later


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """What every entry has: its type (`TYPE`: the stream entry's `type` field, beside `data`) and the schema
    version `v`, written last."""

    TYPE: ClassVar[EntryType]
    v: int = SCHEMA_VERSION


class TimedEntry(msgspec.Struct, frozen=True, kw_only=True):
    """An entry with `at`: the Unix time it was made, written just before `v` (so not an Entry subclass,
    whose `v` would come first)."""

    TYPE: ClassVar[EntryType]
    at: float = msgspec.field(default_factory=time.time)
    v: int = SCHEMA_VERSION


class AutoOptions(msgspec.Struct, frozen=True):
    """Automatic prompts (`--auto`): SAM 2's mask generator on keyframes finds the objects nobody named."""

    every_frames: Count = 30  # processed frames between keyframes (the first frame is one)
    every_s: Seconds = 0.0  # > 0: seconds of video between keyframes instead
    max_objects: Count = 8  # automatic objects alive at once, at most
    min_area: Count = 0  # pixels a proposed mask needs; 0: the worker's auto_min_mask_region_area
    roi: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1: only objects centred in this zone
    keep: tuple[str, ...] = ()  # only automatic objects with one of these labels (needs `labels`)


class JobMessage(Entry, frozen=True):
    """A video job on `vseg:jobs`: a frame directory under STORAGE_ROOT plus the prompts."""

    TYPE: ClassVar[EntryType] = EntryType.JOB
    job_id: str
    frames_dir: str  # relative to STORAGE_ROOT
    num_frames: Positive
    width: Positive
    height: Positive
    fps: float
    prompts: tuple[ObjectPrompt, ...]
    source: str = ""  # the video's file name, for humans
    submitted_at: float = msgspec.field(default_factory=time.time)
    # Streaming hand-off: when set, frames are still being decoded and are announced on this stream
    # (vseg:frames:{job_id}); num_frames is then the producer's estimate and the end marker has the total.
    frames_stream: str = ""
    # Streamed jobs: the producer keeps Keys.producer(job_id) alive, expiring after this many seconds,
    # while it decodes, so a worker can tell a dead producer from a slow one; 0: it does not (older producers).
    producer_ttl_s: Seconds = 0.0
    render: bool = True  # False: masks only, no MP4 (Completed.render_path is then "")
    # True: a reclaimed attempt resumes after the last published frame; False: it runs again from frame 0
    resume: bool = True
    # A live job (a camera, a broadcast, `--live`): unbounded, frames announced as they are captured; the worker
    # takes the newest frame each time (skipping the others), trims its streams and renders rolling HLS
    live: bool = False
    auto: AutoOptions | None = None  # automatic prompts (worker/service/auto.py); None: only the prompts given
    labels: tuple[str, ...] = ()  # zero-shot labels for every object (CLIP, worker/model/labels.py)
    # Text prompts (SAM 3): every instance of each phrase is found and tracked, each its own object (an `object`
    # entry `added`, source `text`, label the phrase); such a job goes on vseg:jobs:text, read by SAM 3 workers
    text: tuple[str, ...] = ()


class ObjectResult(msgspec.Struct, frozen=True, omit_defaults=True):
    """One object on one frame. An object absent from the frame has an empty mask and area 0. Fields at
    their defaults (no label) are not written, so readers of the first version's objects read these too."""

    obj_id: Count
    mask: Rle
    bbox_xyxy: list[float]
    area: Count
    score: float  # SAM 2's object score as a probability (sigmoid of object_score_logits)
    label: str = ""  # jobs with labels: the object's best label (refreshed every label_every frames)
    label_score: float | None = None  # and its probability


class FrameResult(Entry, frozen=True):
    """One frame's objects. Every frame the producer announces gets exactly one entry; a live job's frame
    skipped to keep up with the source has `skipped` true and no objects."""

    TYPE: ClassVar[EntryType] = EntryType.FRAME
    job_id: str
    frame_idx: Count
    objects: tuple[ObjectResult, ...]
    random_weights: bool = False  # True when the model ran with random weights (smoke tests only)
    skipped: bool = False  # live jobs: not segmented, passed over for a newer frame (worker/sources/live.py)
    captured_at: float | None = None  # live jobs: Unix time the frame was received (None: a file's frame)
    pts_s: float | None = None  # live jobs: the frame's presentation timestamp in its source, seconds
    latency_s: float | None = None  # live jobs, processed frames: from captured_at to this entry's publication


class Started(TimedEntry, frozen=True):
    TYPE: ClassVar[EntryType] = EntryType.STARTED
    job_id: str
    worker: str
    num_frames: Count
    obj_ids: tuple[Count, ...]
    model: str = ""
    attempt: Count = 1
    random_weights: bool = False
    resume_from: Count = 0  # the first frame this attempt computes (a resumed attempt: after the last published)
    first_frame: Count | None = None  # live jobs: the frame this attempt processed first (its prompts apply there)


class Progress(TimedEntry, frozen=True):
    TYPE: ClassVar[EntryType] = EntryType.PROGRESS
    job_id: str
    frames_done: Count
    num_frames: Count
    fps: float = 0.0
    dropped: Count = 0  # live jobs: frames skipped so far to keep up with the source
    latency_p50_s: float | None = None  # live jobs: capture-to-publish latency of the recent processed frames
    latency_p95_s: float | None = None
    source_outages: Count = 0  # live jobs: times the source dropped and came back
    source_down_s: Seconds = 0.0  # live jobs: seconds the source was down, all outages together
    dropped_at_ingest: Count = 0  # live jobs: frames its producer dropped (not encoded, not announced) while its
    # buffer of untaken frames was full (live_buffer_frames): a queued job, or a worker far behind the camera
    source_state: str = ""  # live jobs: "up", or "down" from the moment an outage begins; "" for a file job
    source_down_since: float | None = None  # live jobs, while down: Unix time of the last frame before the outage
    auto_keyframes: Count = 0  # --auto jobs: keyframes the mask generator ran on so far (this attempt)
    auto_proposed: Count = 0  # --auto jobs: masks it proposed on them, all together
    auto_added: Count = 0  # --auto jobs: of those, the ones that became objects (the worker's log says why not)


class Completed(TimedEntry, frozen=True):
    TYPE: ClassVar[EntryType] = EntryType.COMPLETED
    job_id: str
    render_path: str  # relative to STORAGE_ROOT; "" when the job asked for no render
    num_frames: Count
    num_objects: Count  # objects tracked at the job's end (those on its last frame: prompted, added, automatic; not removed or lost)
    timings_s: dict[str, float] = msgspec.field(default_factory=dict)
    random_weights: bool = False


class Failed(TimedEntry, frozen=True):
    TYPE: ClassVar[EntryType] = EntryType.FAILED
    job_id: str
    error: str
    error_type: str = ""
    retryable: bool = False


class Cancelled(TimedEntry, frozen=True):
    """Terminal: the job was cancelled (`python -m producer cancel`); it is not retried."""

    TYPE: ClassVar[EntryType] = EntryType.CANCELLED
    job_id: str
    frames_done: Count = 0


class Dead(TimedEntry, frozen=True):
    """Terminal: the job ran out of attempts (or could not be decoded) and was moved to vseg:dead."""

    TYPE: ClassVar[EntryType] = EntryType.DEAD
    job_id: str
    error: str
    attempts: Count = 0


class PromptCommand(TimedEntry, frozen=True):
    """Prompts for a running job: a new object id is tracked from its prompt's frame on, an existing one
    corrected from there. `now`: from the next frame the worker processes, whatever frame the prompt names
    (its coordinates are then taken as they are)."""

    TYPE: ClassVar[EntryType] = EntryType.PROMPT
    job_id: str
    request_id: str
    prompts: tuple[ObjectPrompt, ...]
    now: bool = False
    # phrases to look for from the next frame processed on (a job with text, on a SAM 3 worker): the worker
    # answers with one `object` entry per phrase, obj_id -1 and change `text`, then `added` ones as instances show
    text: tuple[str, ...] = ()


class RemoveCommand(TimedEntry, frozen=True):
    """Stop tracking an object of a running job, from the next frame the worker processes."""

    TYPE: ClassVar[EntryType] = EntryType.REMOVE
    job_id: str
    request_id: str
    obj_id: Count


class ObjectChange(TimedEntry, frozen=True):
    """What a command did: `change` added, corrected or removed from `frame_idx` on, or refused (`note` says
    why; the job goes on unharmed). `requested_frame`: the frame the prompt named (-1: now, or a removal)."""

    TYPE: ClassVar[EntryType] = EntryType.OBJECT
    job_id: str
    obj_id: int
    frame_idx: Count
    # added | corrected | removed | refused | lost (an automatic or text object gone) | returned (a lost object seen
    # again within reid_window_s: its old id back) | text (a phrase a command asked for: obj_id TEXT_OBJ_ID)
    change: str
    request_id: str = ""
    source: str = "prompt"  # prompt (a command) | auto (the mask generator) | text (a phrase, SAM 3)
    requested_frame: int = -1
    note: str = ""
    label: str = ""  # jobs with labels: the object's label when the change was made


class FrameUpdate(Entry, frozen=True):
    """Objects' masks on a frame whose `frame` entry is already out: a prompt on a frame a file job had
    already segmented is propagated backwards from it, and each earlier frame gets one of these (frames
    keep their once-only entries). A reader replaces those objects on that frame, or adds them."""

    TYPE: ClassVar[EntryType] = EntryType.UPDATE
    job_id: str
    frame_idx: Count
    objects: tuple[ObjectResult, ...]
    request_id: str = ""  # the prompt command that led to it


Message = (JobMessage | FrameResult | Started | Progress | Completed | Failed | Cancelled | Dead | PromptCommand
           | RemoveCommand | ObjectChange | FrameUpdate)
Terminal = Completed | Failed | Cancelled | Dead
TERMINAL_TYPES = (Completed, Failed, Cancelled, Dead)

_BY_TYPE: dict[str, type[Message]] = {
    cls.TYPE.value: cls for cls in (JobMessage, FrameResult, Started, Progress, Completed, Failed, Cancelled, Dead,
                                    PromptCommand, RemoveCommand, ObjectChange, FrameUpdate)
}
_DECODERS: dict[str, msgspec.msgpack.Decoder[Any]] = {
    name: msgspec.msgpack.Decoder(cls) for name, cls in _BY_TYPE.items()
}
_ENCODER = msgspec.msgpack.Encoder()


class _Version(msgspec.Struct):
    """Only `v` of any message's map, as whatever the writer put there (checked in `_check_version`)."""

    v: Any = None


_VERSION = msgspec.msgpack.Decoder(_Version)


def to_dict(msg: Message) -> dict[str, Any]:
    """Plain map of a message, exactly as it goes on the wire (nested prompts and objects as maps, lists)."""
    data: dict[str, Any] = msgspec.msgpack.decode(_ENCODER.encode(msg))
    return data


def encode(msg: Message) -> dict[str, bytes]:
    """Stream entry fields for `msg`: {'type': ..., 'data': msgpack map}."""
    return {"type": msg.TYPE.value.encode(), "data": _ENCODER.encode(msg)}


def decode(fields: Mapping[Any, Any]) -> Message:
    """Decode stream entry fields into a message, raising SchemaError on anything malformed."""
    raw_type = entry_field(fields, "type", "stream entry")
    type_name = raw_type.decode(errors="replace") if isinstance(raw_type, (bytes, bytearray)) else str(raw_type)
    decoder = _DECODERS.get(type_name)
    if decoder is None:
        raise SchemaError(f"unknown entry type {type_name!r}; expected one of {sorted(_BY_TYPE)}")
    raw = entry_field(fields, "data", "stream entry")
    if not isinstance(raw, (bytes, bytearray, memoryview)):  # a map decoded already: back to msgpack, one path
        try:
            raw = _ENCODER.encode(raw)
        except TypeError as e:
            raise SchemaError(
                f"{type_name} entry's data must be msgpack bytes or a map, but got {short(raw)}"
            ) from e
    try:
        header = _VERSION.decode(raw)
    except msgspec.ValidationError as e:  # a non-map, or a map with a key that is not a string
        raise SchemaError(f"{type_name} data must be a map with string keys: {e}") from None
    except msgspec.DecodeError as e:
        raise SchemaError(f"{type_name} entry's data is not valid msgpack: {e}") from None
    check_version(header.v, SCHEMA_VERSION, type_name, "upgrade the worker or the client")
    try:
        msg: Message = decoder.decode(raw)
    except msgspec.ValidationError as e:
        raise invalid(type_name, e, msgspec.msgpack.decode(raw)) from None
    _check(msg)
    return msg


def _check(msg: Message) -> None:
    """The checks that msgspec's types cannot express; raises SchemaError naming the field."""
    name = msg.TYPE.value
    try:
        validate_job_id(msg.job_id)
    except JobIdError as e:
        raise SchemaError(f"{name} message field job_id: {e}") from None
    if isinstance(msg, PromptCommand):
        _check_prompts(name, msg.prompts)
        _check_text(name, msg.text)
    if not isinstance(msg, JobMessage):
        return
    if not math.isfinite(msg.producer_ttl_s):
        raise SchemaError(f"job message field producer_ttl_s must be a number of seconds >= 0, "
                          f"but got {msg.producer_ttl_s!r}")
    _check_prompts(name, msg.prompts)
    _check_text(name, msg.text)


def _check_text(name: str, text: tuple[str, ...]) -> None:
    for i, phrase in enumerate(text):
        if not phrase.strip():
            raise SchemaError(f"{name} message field text[{i}] is empty: every phrase must name something")


def _check_prompts(name: str, prompts: tuple[ObjectPrompt, ...]) -> None:
    for i, prompt in enumerate(prompts):
        try:
            coords = [c for xy in prompt.points_xy for c in xy] + list(prompt.box_xyxy or ())
            if not all(math.isfinite(c) for c in coords):
                raise PromptError(f"coordinates must be finite numbers, but got points {prompt.points_xy}, "
                                  f"box {prompt.box_xyxy}")
            check_prompt_shape(prompt)
        except PromptError as e:
            raise SchemaError(f"{name} message field prompts[{i}]: {e}") from None
