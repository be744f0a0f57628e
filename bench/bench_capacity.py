"""Redis's share of a frame: commands and bytes per frame and per object, measured (the README's
"Capacity on paper" table starts from these).

A private redis-server, one worker (the fake colour segmenter of tests/fakes.py: the model does not
change what Redis sees), and the same job run with 1 and with 5 objects on a 960x540 clip of a moving
disc (each object a blob of the disc, so each mask's RLE is a realistic blob's). Redis's own counters
(INFO stats, commandstats) are read before and after each job; the difference between the two runs,
divided by 4, is what one more object costs per frame, and what remains of the 1-object run is the
frame's own cost. Also the JPEG bytes a frame costs on the shared storage (written by the producer,
read by the worker).

    .venv/bin/python bench/bench_capacity.py [--frames 300]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, machine  # noqa: E402
from producer.local_redis import RedisServer  # noqa: E402
from producer.submission import submit  # noqa: E402
from runtime.settings import Settings  # noqa: E402
from schemas.prompts import ObjectPrompt  # noqa: E402
from tests.fakes import FROM_ENV  # noqa: E402
from tests.videos import disc_center, make_video  # noqa: E402

SIZE = (960, 540)


def counters(client: redis.Redis) -> dict[str, float]:
    stats: dict[str, Any] = client.info("stats")
    commands: dict[str, Any] = client.info("commandstats")
    return {"commands": float(stats["total_commands_processed"]), "net_in": float(stats["total_net_input_bytes"]),
            "net_out": float(stats["total_net_output_bytes"]),
            "evalsha": float(commands.get("cmdstat_evalsha", {}).get("calls", 0))}


def run(settings: Settings, client: redis.Redis, video: Path, frames: int, objects: int, job_id: str,
        env: dict[str, str]) -> tuple[dict[str, float], int, int]:
    x, y = disc_center(0, frames, SIZE)
    prompts = [ObjectPrompt(k + 1, 0, ((x, y + k),), (1,)) for k in range(objects)]
    before = counters(client)
    submit(video, prompts, settings=settings, job_id=job_id, render=False)
    subprocess.run([sys.executable, "-m", "worker", "--burst", "--name", f"cap-{job_id}"], cwd=ROOT, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = counters(client)
    stream_bytes = int(client.memory_usage(settings.keys.results(job_id)) or 0)
    jpeg = sum(f.stat().st_size for f in (settings.storage_root / "jobs").rglob("*.jpg"))
    return {k: after[k] - before[k] for k in before}, stream_bytes, jpeg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=300)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    (work / "redis").mkdir()
    server = RedisServer(data_dir=work / "redis").start()
    try:
        client = redis.Redis.from_url(server.url)
        settings = Settings.load(environ={}, redis_url=server.url, storage_root=work / "storage", keep_frames="on")
        env = {**os.environ, "REDIS_URL": server.url, "STORAGE_ROOT": str(settings.storage_root), "TQDM_DISABLE": "1",
               "VSEG_SEGMENTER": FROM_ENV, "VSEG_DEVICE": "cpu", "VSEG_KEEP_FRAMES": "on"}
        video = make_video(work / "disc.mp4", num_frames=args.frames, size_wh=SIZE, fps=30)
        n = args.frames
        runs = {}
        for objects in (1, 5):
            t0 = time.monotonic()
            runs[objects] = run(settings, client, video, n, objects, f"cap{objects}", env)
            print(f"{objects} object(s): {time.monotonic() - t0:.1f} s", flush=True)
            for f in (settings.storage_root / "jobs").rglob("*.jpg"):  # the next run counts its own
                f.unlink()
        (one, stream1, jpeg), (five, stream5, _) = runs[1], runs[5]
    finally:
        server.stop()
    print(f"\nmachine: {machine()}; {n} frames of {SIZE[0]}x{SIZE[1]}, masks only (no render), progress every "
          f"{settings.progress_every} frames")
    print(f"{'per frame':28s} {'the frame':>12s} {'each object':>12s}")
    for key, name in (("commands", "Redis commands"), ("evalsha", "of them EVALSHA (fenced)"),
                      ("net_in", "bytes into Redis"), ("net_out", "bytes out of Redis")):
        per_object = (five[key] - one[key]) / 4 / n
        print(f"{name:28s} {one[key] / n - per_object:12.1f} {per_object:12.1f}")
    per_object_stream = (stream5 - stream1) / 4 / n
    print(f"{'result stream bytes (kept)':28s} {stream1 / n - per_object_stream:12.1f} {per_object_stream:12.1f}")
    print(f"{'JPEG bytes on shared storage':28s} {jpeg / n:12.0f} {'':>12s} (written once, read once or twice)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
