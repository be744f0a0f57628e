"""Which embedding tells identities apart best, for re-identification (issue 30 item 4)?

A synthetic clip (numpy + OpenCV, 96x128, --frames 60) over a textured background, with per-frame noise,
lighting and size changes: a red ball that leaves the picture on the right at 30% of the clip and comes
back at 60%; a second red ball that looks like it (a shade darker, a dark band); a blue-and-white striped
box; a green triangle. Identity comes from the ground-truth masks drawn, not from tracking (the tiny SAM 3
has random weights: its own instances cover most of the frame and follow nothing).

The tiny random SAM 3 TextTracker (worker.model.sam3.build.load_tiny) runs over the clip; right after each
`step` computes frame f (its features are cached then: embeddings.py says why that is the moment), each
visible object's embedding is taken from its ground-truth mask of frame f, by each candidate:

    histogram      HSV 8x8x2 colour histogram of the masked pixels, square roots (no model; the default)
    histogram-884  HSV 8x8x4, plain shares (the first try: value bins are what lighting moves)
    pooled         SAM 3 backbone features averaged under the mask, three FPN levels
    pooled-coarse  the stride-14 level alone (what the tracker's memory attention reads)
    pointer        SAM's object pointer for the mask (the one a new detection's mask conditions)
    clip           open_clip ViT-B-32 (random weights, as the service's smoke runs) on the masked crop

For each: mean cosine of same-identity and different-identity pairs, the margin (min same - max different:
> 0 means one threshold separates every pair), ROC AUC of same vs different, the threshold that lets 1% of
different pairs through and the share of same pairs it keeps, the look-alike pair's mean cosine, the
decision at the return (the ball's last good embedding before it left against its own first good one
after, and against the best of the other objects then), and wall time per embedding.

Random weights bound what this shows: a trained SAM 3 pointer or CLIP embedding encodes "which object"
far better than a random one; the histogram is what a model-free baseline does on a clip where colour is
the cue. Read the figures as "which one works with what we can run here", not as real-weights figures.

    .venv/bin/python bench/bench_reid.py [--frames 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine  # noqa: E402
from worker.model.sam3 import embeddings  # noqa: E402
from worker.model.sam3.build import load_tiny  # noqa: E402
from worker.model.sam3.tracker import TextTracker  # noqa: E402

H, W = 96, 128
BALL, LOOKALIKE, BOX, TRIANGLE = "red ball", "red look-alike", "striped box", "green triangle"
MIN_AREA = 40  # pixels: smaller slivers (at the frame's edge, behind another object) are not sampled
GOOD = 0.5  # "a good view": at least this share of the object's full area is visible
EXIT, BACK = 0.3, 0.6  # the ball is out of the picture between these fractions of the clip
SWEEP = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9)  # thresholds tried on the best embedding


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # uint8 (n, H, W, 3)
    masks: list[dict[str, np.ndarray]]  # per frame: identity -> visible mask (bool H x W), visible ones only
    full_area: list[dict[str, int]]  # per frame: identity -> its area before occlusion and cropping


def _path(u: float, keys: list[tuple[float, float]]) -> float:
    return float(np.interp(u, [k for k, _ in keys], [v for _, v in keys]))


def make_clip(n: int = 60, seed: int = 0) -> Clip:
    """The synthetic clip of the module doc; the same (n, seed), the same pixels."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(70, 150, (6, 8, 3)).astype(np.float32) * np.array([0.9, 1.0, 0.85], np.float32)
    back = cv2.resize(coarse, (W, H), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 6, (H, W, 3))
    yy, xx = np.mgrid[:H, :W].astype(np.float32)
    frames = np.empty((n, H, W, 3), np.uint8)
    masks: list[dict[str, np.ndarray]] = []
    areas: list[dict[str, int]] = []
    phase = rng.uniform(0, 2 * np.pi, 4)
    for t in range(n):
        u = t / max(1, n - 1)
        img = back.copy()
        taken = np.zeros((H, W), bool)
        shapes: list[tuple[str, np.ndarray, np.ndarray]] = []  # drawn in order: later ones occlude
        gain = 1.0 + 0.12 * np.sin(2 * np.pi * u * 1.5 + phase) + rng.normal(0, 0.03, 4)
        scale = 1.0 + 0.1 * np.sin(2 * np.pi * u + phase)

        # the red ball: right and out, away, then back in from the right
        cx = _path(u, [(0, 30), (EXIT, W + 25), (BACK, W + 25), (1, 45)])
        cy = 28 + 4 * np.sin(4 * np.pi * u + phase[0])
        r = 11 * scale[0]
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
        colour = np.broadcast_to(np.array([225, 30, 35], np.float32), (H, W, 3)).copy()
        colour[(xx - cx + 3.5) ** 2 + (yy - cy + 3.5) ** 2 <= 3.2**2] = (250, 245, 240)  # a highlight
        shapes.append((BALL, disc, colour * gain[0]))

        # its look-alike: the same kind of red, a shade darker, a dark band across
        cx, cy, r = 20 + 50 * u, 74 + 3 * np.sin(6 * np.pi * u), 10 * scale[1]
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
        colour = np.broadcast_to(np.array([200, 40, 45], np.float32), (H, W, 3)).copy()
        colour[np.abs(yy - cy) <= 1.5] = (90, 15, 20)
        shapes.append((LOOKALIKE, disc, colour * gain[1]))

        # the triangle: a loop in the middle
        cx, cy, s = 64 + 22 * np.sin(2 * np.pi * u + phase[3]), 52 + 8 * np.cos(2 * np.pi * u), 13 * scale[3]
        tri = (yy <= cy + s * 0.6) & (np.abs(xx - cx) <= (yy - (cy - s)) * 0.62)
        colour = (np.broadcast_to(np.array([45, 185, 60], np.float32), (H, W, 3))
                  + rng.normal(0, 10, (H, W, 1)).astype(np.float32))
        shapes.append((TRIANGLE, tri, colour * gain[3]))

        # the striped box: diagonally up-left, over the others
        cx, cy = _path(u, [(0, 104), (1, 62)]), _path(u, [(0, 66), (1, 22)])
        hw, hh = 11 * scale[2], 8 * scale[2]
        box = (np.abs(xx - cx) <= hw) & (np.abs(yy - cy) <= hh)
        stripes = ((xx - cx + 100) // 3).astype(int) % 2 == 0
        colour = np.where(stripes[..., None], np.array([40, 60, 220], np.float32), np.array([235, 235, 240], np.float32))
        shapes.append((BOX, box, colour * gain[2]))

        visible: dict[str, np.ndarray] = {}
        full: dict[str, int] = {}
        for name, shape, colour in reversed(shapes):  # topmost first: what it covers is hidden below
            full[name] = int(shape.sum()) if name != BALL else int(round(np.pi * (11 * scale[0]) ** 2))
            seen = shape & ~taken
            img[seen] = colour[seen]
            taken |= shape
            if seen.sum() >= MIN_AREA:
                visible[name] = seen
        frames[t] = np.clip(img + rng.normal(0, 5, (H, W, 3)), 0, 255).astype(np.uint8)
        masks.append(visible)
        areas.append(full)
    return Clip(frames, masks, areas)


@dataclass
class Samples:
    """Per embedding kind: the vectors, whose identity and frame each is, and the seconds spent."""

    vectors: dict[str, list[np.ndarray]]
    ids: dict[str, list[str]]
    frames: dict[str, list[int]]
    seconds: dict[str, float]
    skipped: list[int]  # frames whose features the library dropped (see collect): no kind sampled them


def collect(clip: Clip, seed: int) -> tuple[Samples, float]:
    """Run the tiny SAM 3 over the clip and take every visible object's embedding by each kind; the
    tracker's own seconds per frame too."""
    sam3 = load_tiny(seed=seed)
    tracker = TextTracker(sam3, ["object"], width=W, height=H, num_frames=len(clip.frames))
    s = Samples(defaultdict(list), defaultdict(list), defaultdict(list), defaultdict(float), [])
    crops: list[tuple[str, int, np.ndarray]] = []

    def take(kind: str, name: str, t: int, fn: Callable[[], np.ndarray | None]) -> None:
        start = time.perf_counter()
        vec = fn()
        s.seconds[kind] += time.perf_counter() - start
        if vec is not None:
            s.vectors[kind].append(vec)
            s.ids[kind].append(name)
            s.frames[kind].append(t)

    from worker.model.labels import masked_crop  # the labeller's crop: what CLIP sees in the service

    tracking = 0.0
    for t, frame in enumerate(clip.frames):
        start = time.perf_counter()
        tracker.step(frame)
        tracking += time.perf_counter() - start
        if tracker.session.cache.get_vision_features(t) is None:  # the last instance went: the session reset
            s.skipped.append(t)  # (and its cache with it); every kind skips the frame, to compare like with like
            continue
        for name, mask in clip.masks[t].items():
            take("histogram", name, t, lambda: embeddings.colour_histogram(frame, mask))  # noqa: B023
            take("histogram-884", name, t, lambda: embeddings.colour_histogram(  # noqa: B023
                frame, mask, bins=(8, 8, 4), hellinger=False))  # noqa: B023
            take("pooled", name, t, lambda: embeddings.pooled_features(tracker, mask, t))  # noqa: B023
            take("pointer", name, t, lambda: embeddings.mask_object_pointer(tracker, mask, t))  # noqa: B023
            crop = masked_crop(frame, mask)
            if crop is not None:
                crops.append((name, t, crop))
    tracker.close()
    coarse = 128  # the stride-14 level's width in the tiny model: the last part of `pooled`
    s.vectors["pooled-coarse"] = [v[-coarse:] for v in s.vectors["pooled"]]
    s.ids["pooled-coarse"], s.frames["pooled-coarse"] = s.ids["pooled"], s.frames["pooled"]
    s.seconds["pooled-coarse"] = s.seconds["pooled"]
    clip_embed(crops, seed, s)
    return s, tracking / len(clip.frames)


def clip_embed(crops: list[tuple[str, int, np.ndarray]], seed: int, s: Samples) -> None:
    """open_clip ViT-B-32 with random weights (no download) on the masked crops, 32 at a time."""
    import open_clip
    from PIL import Image

    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.eval()
    start = time.perf_counter()
    for i in range(0, len(crops), 32):
        batch = crops[i:i + 32]
        pixels = torch.stack([preprocess(Image.fromarray(c)) for _, _, c in batch])
        with torch.inference_mode():
            out = model.encode_image(pixels).float().numpy()
        for (name, t, _), vec in zip(batch, out):
            s.vectors["clip"].append(vec)
            s.ids["clip"].append(name)
            s.frames["clip"].append(t)
    s.seconds["clip"] = time.perf_counter() - start


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC: the chance that a random positive scores above a random negative (ties count half)."""
    both = np.concatenate([positive, negative])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based ranks, ties given their mean
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def return_frames(clip: Clip, skipped: list[int]) -> tuple[int, int]:
    """The ball's last good view before it left and its first good view after it came back (sampled frames)."""
    good = [t for t, m in enumerate(clip.masks) if BALL in m and m[BALL].sum() >= GOOD * clip.full_area[t][BALL]
            and t not in skipped]
    n = len(clip.frames)
    before = max(t for t in good if t < EXIT * n)
    after = min(t for t in good if t > BACK * n)
    return before, after


def figures(s: Samples, kind: str, clip: Clip) -> dict[str, Any]:
    x = unit(np.stack(s.vectors[kind]).astype(np.float64))
    ids = np.array(s.ids[kind])
    frames = np.array(s.frames[kind])
    sims = x @ x.T
    i, j = np.triu_indices(len(x), 1)
    same = ids[i] == ids[j]
    pos, neg = sims[i, j][same], sims[i, j][~same]
    threshold = float(np.quantile(neg, 0.99))
    look = (ids[i] == BALL) & (ids[j] == LOOKALIKE) | (ids[i] == LOOKALIKE) & (ids[j] == BALL)
    before, after = return_frames(clip, s.skipped)
    lost = x[(ids == BALL) & (frames == before)][0]
    own = float(x[(ids == BALL) & (frames == after)][0] @ lost)
    others = x[(ids != BALL) & (frames == after)] @ lost
    return {"same": float(pos.mean()), "different": float(neg.mean()), "margin": float(pos.min() - neg.max()),
            "auc": auc(pos, neg), "thr99": threshold, "kept": float((pos > threshold).mean()),
            "lookalike": float(sims[i, j][look].mean()), "own": own, "other": float(others.max()),
            "ms": 1000 * s.seconds[kind] / len(x), "n": float(len(x)), "pos": pos, "neg": neg}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    if args.frames < 20:
        parser.error(f"--frames must be at least 20 (the ball must leave and come back), but got {args.frames}")
    started = time.perf_counter()
    clip = make_clip(args.frames, args.seed)
    samples, per_frame = collect(clip, args.seed)
    before, after = return_frames(clip, samples.skipped)
    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"clip: {args.frames} frames {W}x{H}, seed {args.seed}; the ball's last good view before leaving: "
          f"frame {before}, first after coming back: frame {after}; tiny SAM 3 {1000 * per_frame:.0f} ms/frame; frames not sampled "
          f"(every instance removed, the library's session reset with its feature cache): {samples.skipped}")
    print()
    print("| embedding | dims | samples | same | different | margin | AUC | thr (1% diff) | same kept | "
          "look-alike | return: own | return: best other | ms each |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for kind in ("histogram", "histogram-884", "pooled", "pooled-coarse", "pointer", "clip"):
        f = results[kind] = figures(samples, kind, clip)
        dims = len(samples.vectors[kind][0])
        print(f"| {kind} | {dims} | {int(f['n'])} | {f['same']:.3f} | {f['different']:.3f} | {f['margin']:+.3f} | "
              f"{f['auc']:.3f} | {f['thr99']:.3f} | {f['kept']:.2f} | {f['lookalike']:.3f} | {f['own']:.3f} | "
              f"{f['other']:.3f} | {f['ms']:.2f} |")
    best = max(results, key=lambda k: (results[k]["auc"], results[k]["margin"]))
    f = results[best]
    print()
    print(f"best separation here: {best} (AUC {f['auc']:.3f}); the ball comes back at cosine {f['own']:.3f} "
          f"to itself against {f['other']:.3f} to the best other object")
    print(f"{best} at a few thresholds: share of same-identity pairs kept / of different-identity pairs let through")
    for threshold in SWEEP:
        print(f"  {threshold:.2f}: same {(f['pos'] >= threshold).mean():.2f}, different {(f['neg'] >= threshold).mean():.3f}"
              f"{', the ball comes back' if f['own'] >= threshold > f['other'] else ''}")
    print(f"total wall time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
