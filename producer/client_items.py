"""What `Job.follow()` yields, and the pure reading of a result stream both clients share (no I/O here).

A result stream holds, in order: `started`, then per frame any `object` entries (what a command did) and
`update` entries (masks on a frame already published, from a prompt on an earlier frame), then the
`frame` entry, and one terminal entry. `follow()` yields each in stream order:

- `Frame` for a `frame` entry: its objects' masks decode lazily (`obj.mask`, a boolean H×W numpy array,
  decoded on first access and kept);
- `Update` for an `update` entry, yielded as such, not merged: it names a frame already yielded, and a
  reader that kept that frame replaces those objects on it (or adds them). A reader that keeps nothing
  may ignore updates;
- the `started` and `object` entries and the terminal entry (`Completed`, `Failed`, `Cancelled`, `Dead`)
  as the msgspec Structs of `schemas.messages`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from schemas import messages
from schemas.errors import SchemaError
from schemas.names import TERMINAL_ENTRY_ID, TERMINAL_STATES
from schemas.rle import Rle

log = logging.getLogger(__name__)

Started = messages.Started
ObjectChange = messages.ObjectChange
Completed = messages.Completed
Failed = messages.Failed
Cancelled = messages.Cancelled
Dead = messages.Dead
Terminal = messages.Terminal
TERMINAL = messages.TERMINAL_TYPES
# XREAD returns entries after this id: only the terminal entry (frame k is at (k+1)-0, far below it).
BEFORE_TERMINAL = f"{int(TERMINAL_ENTRY_ID.split('-')[0]) - 1}-18446744073709551615"


@dataclass(frozen=True, eq=False)
class TrackedObject:
    """One object on one frame. An object absent from the frame has an empty mask and area 0."""

    obj_id: int
    rle: Rle  # COCO RLE {size: [h, w], counts}: pycocotools.mask.decode(rle) is `mask`
    bbox_xyxy: list[float]  # tight box, right and bottom edges exclusive; [0, 0, 0, 0] for an empty mask
    area: int  # pixels in the mask
    score: float  # SAM 2's object presence score as a probability
    label: str = ""  # jobs with labels: the object's best label
    label_score: float | None = None

    @cached_property
    def mask(self) -> np.ndarray:
        """The mask as a boolean H×W array at the video's resolution (decoded on first access, then kept)."""
        return np.asarray(mask_utils.decode(dict(self.rle)), dtype=bool)

    @classmethod
    def of(cls, obj: messages.ObjectResult) -> TrackedObject:
        return cls(obj.obj_id, obj.mask, obj.bbox_xyxy, obj.area, obj.score, obj.label, obj.label_score)


@dataclass(frozen=True, eq=False)
class _Masks:
    """What a `frame` and an `update` entry have alike: a frame of one job, and objects with lazy masks."""

    entry: messages.FrameResult | messages.FrameUpdate
    entry_id: str  # its id on the result stream

    @property
    def job_id(self) -> str:
        return self.entry.job_id

    @property
    def frame_idx(self) -> int:
        return self.entry.frame_idx

    @cached_property
    def objects(self) -> tuple[TrackedObject, ...]:
        return tuple(TrackedObject.of(o) for o in self.entry.objects)

    def masks(self) -> dict[int, np.ndarray]:
        """Each object's mask by object id (decoded now)."""
        return {o.obj_id: o.mask for o in self.objects}


@dataclass(frozen=True, eq=False)
class Frame(_Masks):
    """A `frame` entry: every announced frame gets exactly one. A live job's frame passed over for a newer
    one has `skipped` true and no objects."""

    entry: messages.FrameResult

    @property
    def skipped(self) -> bool:
        return self.entry.skipped

    @property
    def captured_at(self) -> float | None:
        """Live jobs: Unix time the frame was received (None for a file's frame)."""
        return self.entry.captured_at

    @property
    def latency_s(self) -> float | None:
        """Live jobs, processed frames: capture to publication, seconds."""
        return self.entry.latency_s

    @property
    def random_weights(self) -> bool:
        return self.entry.random_weights


@dataclass(frozen=True, eq=False)
class Update(_Masks):
    """An `update` entry: objects' masks on frame `frame_idx`, already yielded, that a prompt on a later frame
    changed. Replace those objects on that frame, or add them."""

    entry: messages.FrameUpdate

    @property
    def request_id(self) -> str:
        return self.entry.request_id


Item = Started | Frame | Update | ObjectChange | Completed | Failed | Cancelled | Dead


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


@dataclass
class ResultCursor:
    """Where a reader of one job's result stream stands: the last entry id read, and whether the terminal
    entry was seen. `take` turns one XREAD's entries into items; entries that do not decode are logged and
    passed over (a reader must not stop on one bad entry)."""

    stream: str
    last_id: str = "0-0"
    done: bool = False

    def read(self, entries: Iterable[tuple[Any, Mapping[Any, Any]]]) -> list[tuple[str, messages.Message]]:
        """One XREAD's entries as (entry id, message), up to the terminal entry."""
        out: list[tuple[str, messages.Message]] = []
        for raw_id, fields in entries:
            if self.done:
                break
            entry_id = self.last_id = _text(raw_id)
            try:
                msg = messages.decode(fields)
            except SchemaError as e:
                log.error("skipping undecodable entry %s on %s: %s", entry_id, self.stream, e)
                continue
            out.append((entry_id, msg))
            self.done = isinstance(msg, TERMINAL)
        return out

    def take(self, entries: Iterable[tuple[Any, Mapping[Any, Any]]]) -> list[Item]:
        """`read`, as the items `follow` yields."""
        return [item for entry_id, msg in self.read(entries) if (item := item_of(msg, entry_id)) is not None]


def item_of(msg: messages.Message, entry_id: str) -> Item | None:
    """The item `follow` yields for a result-stream message (None for a type that has no place there)."""
    if isinstance(msg, messages.FrameResult):
        return Frame(msg, entry_id)
    if isinstance(msg, messages.FrameUpdate):
        return Update(msg, entry_id)
    if isinstance(msg, (Started, ObjectChange, *TERMINAL)):
        return msg
    log.warning("ignoring a %s entry (%s) on a result stream", msg.TYPE.value, entry_id)
    return None


def status_fields(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _int(fields: Mapping[str, str], name: str) -> int:
    try:
        return int(float(fields.get(name) or 0))
    except ValueError:
        return 0


@dataclass(frozen=True)
class JobStatus:
    """A job's state hash, typed (`fields` has every field as Redis holds it)."""

    job_id: str
    state: str  # queued, running, retrying, or a terminal state: completed, failed, cancelled, dead
    attempt: int
    frames_done: int
    num_frames: int  # a streamed job still decoding: the producer's estimate
    worker: str
    error: str  # the last error ("" if none)
    render_path: str  # relative to STORAGE_ROOT, once completed with a render
    live: bool
    fields: dict[str, str]

    @property
    def ended(self) -> bool:
        return self.state in {s.value for s in TERMINAL_STATES}

    @classmethod
    def of(cls, job_id: str, fields: dict[str, str]) -> JobStatus:
        return cls(job_id=job_id, state=fields.get("state", ""), attempt=_int(fields, "attempt"),
                   frames_done=_int(fields, "frames_done"), num_frames=_int(fields, "num_frames"),
                   worker=fields.get("worker", ""), error=fields.get("error", ""),
                   render_path=fields.get("render_path", ""), live=fields.get("live") == "1", fields=fields)
