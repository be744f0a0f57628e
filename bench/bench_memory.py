"""Worker peak RSS on a 300-frame job against a 3,000-frame job (target: at most 1.1x).

Each job runs in a fresh `python -m worker --burst` (real SAM 2.1 tiny, random weights) against a
private redis-server; the worker logs its peak RSS when it exits. Frames are small (192x108) and the
model input is --image-size (default 128) so 3,000 frames finish in minutes on 2 cores: the model's
per-frame state (what grows in SAM 2's own predictor) does not depend on the video's resolution.

    python bench/bench_memory.py [--short 300] [--long 3000] [--image-size 128]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import SHARED_VIDEOS, looped_clip, machine  # noqa: E402
from producer.local_redis import RedisServer  # noqa: E402
from producer.prompts import build_prompts  # noqa: E402
from producer.submission import submit  # noqa: E402
from runtime.settings import Settings  # noqa: E402


def run_job(num_frames: int, image_size: int) -> tuple[float, float]:
    """(worker peak RSS MiB, seconds) for one job of `num_frames` frames."""
    clip = looped_clip(SHARED_VIDEOS / "bedroom.mp4", num_frames, size_wh=(192, 108))
    with tempfile.TemporaryDirectory() as tmp, RedisServer(data_dir=Path(tmp)) as server:
        settings = Settings.load(environ={}, redis_url=server.url, storage_root=Path(tmp) / "storage",
                                 max_frames=100_000)
        submit(clip, build_prompts(points=["1:96,54"]), settings=settings, job_id=f"mem{num_frames}")
        env = {**os.environ, "REDIS_URL": server.url, "STORAGE_ROOT": str(settings.storage_root),
               "TQDM_DISABLE": "1", "VSEG_MAX_FRAMES": "100000"}
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "worker", "--burst", "--checkpoint", "random", "--image-size",
                               str(image_size), "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True)
        elapsed = time.monotonic() - t0
        match = re.search(r"peak RSS (\d+) MiB", proc.stderr)
        if proc.returncode != 0 or not match or "completed" not in proc.stderr:
            raise SystemExit(f"worker failed:\n{proc.stderr[-3000:]}")
        return float(match.group(1)), elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", type=int, default=300)
    ap.add_argument("--long", type=int, default=3000)
    ap.add_argument("--image-size", type=int, default=128)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    short_rss, short_s = run_job(args.short, args.image_size)
    long_rss, long_s = run_job(args.long, args.image_size)
    print(f"{'frames':>8} {'peak RSS MiB':>13} {'seconds':>8} {'frames/s':>9}")
    print(f"{args.short:>8} {short_rss:>13.0f} {short_s:>8.1f} {args.short / short_s:>9.2f}")
    print(f"{args.long:>8} {long_rss:>13.0f} {long_s:>8.1f} {args.long / long_s:>9.2f}")
    print(f"ratio peak RSS {args.long}/{args.short} frames: {long_rss / short_rss:.3f} (target <= 1.1)")


if __name__ == "__main__":
    main()
