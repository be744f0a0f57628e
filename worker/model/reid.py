"""Identities that survive a short absence: an object lost and seen again gets its old id back (issue 30).

When the tracker loses an automatic or text object (it leaves the picture, is hidden, or the tracker drops
it), the job files its last embedding here with `ReidBook.lost`. When a new object appears, `match` looks
for a lost one it could be: lost at most `window_s` seconds ago, with the same label when both have one (a
'ball' never becomes a 'player'), and an embedding whose cosine similarity is at least `threshold`. The
best such candidate wins and leaves the book: an id comes back once. Entries older than the window are
dropped at each call, and at most `max_lost` are kept (the oldest go first), so the book stays small
however long a live job runs.

Which embedding is filed is the caller's choice (worker/model/sam3/embeddings.py offers SAM's object
pointer, mask-pooled backbone features and a colour histogram; bench/bench_reid.py measures which
separates identities best, and bench/RESULTS.md records it: `colour_histogram`, here because a SAM 2 worker's
automatic objects use it too). Pure: numpy and OpenCV, no torch, no I/O; the
state round-trips through `to_dict`/`from_dict` so that a resumed job keeps the ids it may give back.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from schemas.errors import ConfigError, SchemaError

log = logging.getLogger(__name__)

# bench/RESULTS.md "Re-identification embeddings (issue 30)", 2026-12-06, on a synthetic clip with random-weight
# models: embeddings.colour_histogram separated identities best; at 0.8 no different-identity pair passed on
# three seeds and 93-95% of same-identity pairs did. To be measured again with real weights and real video.
RECOMMENDED_EMBEDDING = "histogram"
RECOMMENDED_THRESHOLD = 0.8
DIGITS = 6  # embeddings in the saved state are rounded to this many decimals (cosine moves by < 1e-5)


@dataclass(frozen=True)
class Match:
    """A lost object that a new one is taken to be: its id, how alike they are, how long it was gone."""

    obj_id: int
    similarity: float  # cosine, in [-1, 1]
    gone_s: float  # seconds between its loss and this sighting


@dataclass(frozen=True)
class _Lost:
    embedding: np.ndarray  # float32, unit length (or all zeros)
    at_s: float
    label: str


def embedding_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (flattened); 0.0 when either is all zeros or not finite. Vectors of
    different lengths are a caller's mistake: ValueError saying both lengths."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"embeddings must have the same length, but got {x.size} and {y.size}")
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if not (nx > 0.0 and ny > 0.0 and math.isfinite(nx) and math.isfinite(ny)):
        return 0.0
    return float(np.clip(np.dot(x, y) / (nx * ny), -1.0, 1.0))


def _unit(embedding: np.ndarray) -> np.ndarray:
    v = np.asarray(embedding, dtype=np.float32).ravel()
    if v.size == 0:
        raise ValueError("an embedding must have at least one value, but got an empty array")
    norm = float(np.linalg.norm(v))
    if not (norm > 0.0 and math.isfinite(norm)):
        return np.zeros_like(v)
    return v / norm


class ReidBook:
    """Objects lost recently, by id, waiting to be recognised (see the module doc).

    `window_s`: how long after its loss an object may still come back (>= 0). `threshold`: the least cosine
    similarity for a match, in [-1, 1]. `max_lost`: the most entries kept (>= 1); the oldest go first.
    """

    def __init__(self, window_s: float, threshold: float, max_lost: int = 64) -> None:
        if not (isinstance(window_s, (int, float)) and math.isfinite(window_s) and window_s >= 0):
            raise ConfigError(f"reid_window_s must be a number of seconds >= 0 (0 turns re-identification off), "
                              f"but got {window_s!r}")
        if not (isinstance(threshold, (int, float)) and -1.0 <= threshold <= 1.0):
            raise ConfigError(f"reid_threshold must be a cosine similarity in [-1, 1] (higher: fewer, surer "
                              f"matches), but got {threshold!r}")
        if not (isinstance(max_lost, int) and max_lost >= 1):
            raise ConfigError(f"max_lost must be an integer >= 1, but got {max_lost!r}")
        self.window_s = float(window_s)
        self.threshold = float(threshold)
        self.max_lost = max_lost
        self._lost: dict[int, _Lost] = {}

    def __len__(self) -> int:
        return len(self._lost)

    def __contains__(self, obj_id: object) -> bool:
        return obj_id in self._lost

    def lost(self, obj_id: int, embedding: np.ndarray, at_s: float, label: str = "") -> None:
        """File an object lost at `at_s` (seconds, the job's clock) with its last embedding; filing the same
        id again replaces its entry. Past `max_lost` entries, the one lost longest ago is forgotten."""
        self._lost.pop(obj_id, None)
        self._lost[obj_id] = _Lost(_unit(embedding), float(at_s), label)
        while len(self._lost) > self.max_lost:
            oldest = min(self._lost, key=lambda i: self._lost[i].at_s)
            log.debug("reid: book full (%d), forgetting object %d", self.max_lost, oldest)
            del self._lost[oldest]

    def match(self, embedding: np.ndarray, at_s: float, label: str = "") -> Match | None:
        """The lost object that an object seen at `at_s` most resembles, if any qualifies (within the window,
        the same label when both have one, similarity >= threshold); it leaves the book. None otherwise.
        Entries of another length than `embedding` (a state saved with another embedding) never match."""
        self.expire(at_s)
        query = _unit(embedding)
        best: Match | None = None
        for obj_id, entry in self._lost.items():
            if label and entry.label and label != entry.label:
                continue
            if entry.embedding.size != query.size:
                continue
            similarity = float(np.clip(np.dot(query, entry.embedding), -1.0, 1.0))
            if similarity >= self.threshold and (best is None or similarity > best.similarity):
                best = Match(obj_id, similarity, max(0.0, float(at_s) - entry.at_s))
        if best is not None:
            del self._lost[best.obj_id]
            log.debug("reid: object %d back after %.2f s (cosine %.3f)", best.obj_id, best.gone_s, best.similarity)
        return best

    def forget(self, obj_id: int) -> None:
        """Drop an entry (the tracker found the object itself, or it is gone for good); no entry: nothing."""
        self._lost.pop(obj_id, None)

    def expire(self, at_s: float) -> list[int]:
        """Drop the entries lost more than `window_s` before `at_s`; the ids dropped (gone for good)."""
        old = [i for i, e in self._lost.items() if float(at_s) - e.at_s > self.window_s]
        for obj_id in old:
            del self._lost[obj_id]
        return old

    def to_dict(self) -> dict[str, Any]:
        """The book as JSON-able data (settings and entries; embeddings rounded to DIGITS decimals)."""
        return {
            "window_s": self.window_s,
            "threshold": self.threshold,
            "max_lost": self.max_lost,
            "lost": [{"obj_id": obj_id, "at_s": e.at_s, "label": e.label,
                      "embedding": [round(float(v), DIGITS) for v in e.embedding]}
                     for obj_id, e in self._lost.items()],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReidBook:
        """A book from `to_dict`'s data; SchemaError (what was wrong) when it does not decode, ConfigError when
        its settings are out of range."""
        try:
            book = cls(data["window_s"], data["threshold"], data.get("max_lost", 64))
            entries = [(int(e["obj_id"]), np.asarray(e["embedding"], dtype=np.float32), float(e["at_s"]),
                        str(e.get("label", ""))) for e in data["lost"]]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, ConfigError):
                raise
            raise SchemaError(f"re-identification state does not decode ({type(e).__name__}: {e}): "
                              f"expected ReidBook.to_dict()'s keys window_s, threshold, lost") from e
        for obj_id, embedding, at_s, label in entries:
            book.lost(obj_id, embedding, at_s, label)
        return book

HSV_BINS = (8, 8, 2)  # hue, saturation, value: colour matters more than brightness (lighting changes)


def colour_histogram(image_rgb: np.ndarray, mask: np.ndarray, *, bins: tuple[int, int, int] = HSV_BINS,
                     hellinger: bool = True) -> np.ndarray:
    """An HSV histogram (8 hue x 8 saturation x 2 value bins) of the pixels under `mask` (bool H x W, the
    image's size), as the square roots of its shares (`hellinger`: unit length, so that cosine is the
    Bhattacharyya coefficient, and a few dominant bins weigh less); all zeros for an empty mask. No model:
    the baseline to beat. Two value bins, not more: lighting moves value first, and on bench_reid's clip
    8x8x4 plain shares kept 63% of same-identity pairs at 1% false matches, 8x8x2 square roots 96%."""
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.shape[:2] != np.shape(mask):
        raise ValueError(f"image must be H x W x 3 and mask H x W of the same size, but got {image_rgb.shape} "
                         f"and {np.shape(mask)}")
    m = np.asarray(mask, dtype=bool).astype(np.uint8)
    hsv = cv2.cvtColor(np.ascontiguousarray(image_rgb, dtype=np.uint8), cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], m, list(bins), [0, 180, 0, 256, 0, 256]).reshape(-1)
    total = float(hist.sum())
    shares = hist / total if total > 0 else hist
    return (np.sqrt(shares) if hellinger else shares).astype(np.float32)
