"""What automatic prompts cost: tracking alone against `--auto --auto-every 30` on the same clip.

One SAM 2.1 tiny model (random weights unless --checkpoint), one prompted object, the clip's frames
through a session (worker/model/sam2/session.py) twice, rounds interleaved: once tracking only, once
with the automatic-prompt path of a job (worker/service/auto.py: SAM 2's automatic mask generator on
every 30th frame, new objects added as mask prompts). Prints frames/s of each, their ratio (target: auto
costs at most 1.5x tracking alone, amortised over the keyframes), the generator's time per keyframe, and
its peak memory (GPU bytes on CUDA; on the CPU the process's peak RSS before and after).

    .venv/bin/python bench/bench_auto.py [--frames 90] [--every 30] [--image-size 256] [--points-per-side 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHARED_VIDEOS, looped_clip, machine  # noqa: E402
from producer.decode import extract_frames, probe  # noqa: E402
from runtime.settings import Settings  # noqa: E402
from schemas import messages  # noqa: E402
from schemas.prompts import ObjectPrompt  # noqa: E402
from worker.model.sam2.checkpoints import build_predictor, get_preset  # noqa: E402
from worker.model.sam2.segmenter import Sam2Segmenter  # noqa: E402
from worker.service.auto import AutoTracker  # noqa: E402
from worker.sources.frames import DirFrames  # noqa: E402


def run(seg: Sam2Segmenter, frames: Path, n: int, size: tuple[int, int], settings: Settings,
        every: int | None) -> tuple[float, list[float], int]:
    """Seconds for the clip, the generator's seconds per keyframe, and objects at the end."""
    w, h = size
    prompts = [ObjectPrompt(1, 0, ((w / 2, h / 2),), (1,))]
    auto = None
    if every is not None:
        auto = AutoTracker(messages.AutoOptions(every_frames=every), settings, seg.mask_proposer(settings),
                           labeller=None, fps=30.0, known_ids=[1])
    key_s: list[float] = []
    t0 = time.perf_counter()
    with seg.open_session(DirFrames(frames, n), prompts, width=w, height=h) as session:
        for j, out in enumerate(session):
            if auto is not None and auto.keyframe(j):
                t1 = time.perf_counter()
                image = out.image_rgb
                assert image is not None
                new = auto.propose(image, out, session.position)
                if new and session.position < n:
                    session.add_prompts(new)
                key_s.append(time.perf_counter() - t1)
        objects = len(session.obj_ids)
    return time.perf_counter() - t0, key_s, objects


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=90)
    ap.add_argument("--every", type=int, default=30)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--points-per-side", type=int, default=None, help="default: the setting's (16)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    clip = looped_clip(SHARED_VIDEOS / "bedroom.mp4", args.frames)
    work = Path(tempfile.mkdtemp(prefix="bench-auto-"))
    extract_frames(clip, work / "frames")
    w, h, _ = probe(clip)
    settings = Settings.load(environ={})
    if args.points_per_side is not None:
        settings = dataclasses.replace(settings, auto_points_per_side=args.points_per_side)
    torch.manual_seed(0)
    predictor = build_predictor(get_preset("tiny"), None, device=args.device, image_size=args.image_size)
    seg = Sam2Segmenter(predictor, name="tiny", random_weights=True)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    plain: list[float] = []
    auto: list[float] = []
    keys: list[float] = []
    objects = 0
    for r in range(args.repeats):
        for every in (None, args.every) if r % 2 == 0 else (args.every, None):
            seconds, key_s, count = run(seg, work / "frames", args.frames, (w, h), settings, every)
            (plain if every is None else auto).append(seconds)
            if every is not None:
                keys += key_s
                objects = count
            print(f"round {r + 1} {'auto' if every else 'tracking':8s}: {args.frames / seconds:.2f} frames/s", flush=True)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t_plain, t_auto = statistics.median(plain), statistics.median(auto)
    print(f"\nmachine: {machine()}; device {args.device}; tiny at {args.image_size}, {w}x{h}, {args.frames} frames, "
          f"keyframes every {args.every}, points_per_side {settings.auto_points_per_side} "
          f"(points_per_batch {settings.auto_points_per_batch})")
    print(f"tracking only: {args.frames / t_plain:.2f} frames/s; with --auto: {args.frames / t_auto:.2f} frames/s; "
          f"auto costs {t_auto / t_plain:.2f}x tracking alone (target <= 1.5x)")
    print(f"generator: {statistics.median(keys):.2f} s per keyframe (median of {len(keys)}); {objects} objects at the "
          f"end of an auto run")
    if args.device.startswith("cuda"):
        print(f"generator peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB allocated")
    else:
        print(f"process peak RSS: {rss_before / 2**20:.0f} MiB before the runs, {rss_after / 2**20:.0f} MiB after "
              f"(the generator's share: {max(0, rss_after - rss_before) / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
