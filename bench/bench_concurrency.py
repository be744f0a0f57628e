"""Jobs at once on one worker: aggregate frames/s and per-job latency for K = 1, 2, 4, 8 jobs held at once
(`--concurrency K`), against the same K jobs run one after another on the same worker, from one run.

Modes (worker/service/capacity.py):
  shared     one model in the worker's process; the K sessions take fair turns on it (worker/model/turns.py)
  batched    shared, and the session whose turn it is runs the next frames of sessions waiting for their turn
             with its own (`session_batch` 8): the image encoder over their frames (worker/model/sam2/encoder_batch.py),
             memory attention, the mask decoder and the memory encoder over all their objects
             (worker/model/sam2/step_batch.py)
  processes  a model process per slot: K copies of the model, each with its own kernel-launching thread
  batched-process  batched, in one model process of its own shared by every slot (its sessions on threads
             of their own there)

For each K and mode, rounds alternate (one after another, then at once) and the medians are reported:
a shared machine's speed drifts by several percent within minutes. Each job is the same clip (the
bedroom clip of ../shared/videos, looped to --frames at --size, one object), its frames decoded before
the round starts (the producer is not timed), masks only unless --render. The model is loaded before
the clock starts. Per-job latency: from the round's start to the job's `completed` entry (the ids of
vseg:events are Redis's millisecond clock), and its own run (started to completed).

CPU (the default): SAM 2.1 tiny, random weights, image size 256, 640x360. The GPU check
(bench/gpu_checks.sh): --device cuda --image-size 1024 --size 1920x1080, and --streams to count how
many 30 fps one-object live sources one GPU sustains with no skipped frame.

    python bench/bench_concurrency.py [--ks 1,2,4,8] [--modes shared,processes] [--frames 24] [--repeats 2]
    python bench/bench_concurrency.py --streams 1,2,4,8,16,32,50 --device cuda --image-size 1024 --size 1920x1080
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.common import SHARED_VIDEOS, looped_clip, machine  # noqa: E402
from producer.local_redis import RedisServer  # noqa: E402
from producer.submission import submit  # noqa: E402
from runtime.settings import Settings  # noqa: E402
from schemas import messages  # noqa: E402
from schemas.prompts import ObjectPrompt  # noqa: E402
from worker.model.segment import Segmenter  # noqa: E402
from worker.service.loop import Worker  # noqa: E402

BATCHED_SESSION_BATCH = 8


OBJECTS = 1  # objects a job (--objects)


def prompt(width: int, height: int) -> list[ObjectPrompt]:
    """OBJECTS objects, each a point on the frame's middle row (the bench measures cost, not quality)."""
    return [ObjectPrompt(k + 1, 0, ((width * (k + 1) / (OBJECTS + 1), height / 2),), (1,)) for k in range(OBJECTS)]


def load_model(settings: Settings, mode: str) -> Segmenter:
    from worker.model.build import build_segmenter
    from worker.model.process import ModelProcess

    if mode == "processes":
        return ModelProcess(dataclasses.replace(settings, model_process="on"))
    if mode == "batched-process":
        return ModelProcess(dataclasses.replace(settings, model_process="on", session_batch=BATCHED_SESSION_BATCH),
                            shared=True)
    batch = BATCHED_SESSION_BATCH if mode == "batched" else 1
    return build_segmenter(dataclasses.replace(settings, model_process="off", session_batch=batch))


def one_round(settings: Settings, client: redis.Redis, model: Segmenter, clip: Path, k: int, concurrency: int,
              tag: str, *, frames: int, render: bool, width: int, height: int) -> dict[str, float]:
    """K jobs of `frames` frames on one worker holding `concurrency` at once: wall time and per-job figures."""
    jobs = [submit(clip, prompt(width, height), settings=settings, client=client, job_id=f"{tag}-{j}",
                   max_frames=frames, stream=False, render=render).job_id for j in range(k)]
    worker = Worker(settings=dataclasses.replace(settings, concurrency=concurrency), segmenter=model, client=client,
                    name=f"bench-{tag}")
    t0_ms = int(client.time()[0]) * 1000 + int(client.time()[1]) // 1000
    t0 = time.monotonic()
    thread = threading.Thread(target=worker.run, kwargs={"burst": True}, daemon=True)
    thread.start()
    thread.join()
    wall = time.monotonic() - t0
    started: dict[str, int] = {}
    done: dict[str, int] = {}
    for entry_id, fields in client.xrange(settings.keys.events, min=f"{t0_ms}-0"):
        msg = messages.decode(fields)
        ms = int(entry_id.decode().split("-")[0])
        if isinstance(msg, messages.Started) and msg.job_id in jobs:
            started.setdefault(msg.job_id, ms)
        elif isinstance(msg, messages.Completed) and msg.job_id in jobs:
            done[msg.job_id] = ms
    missing = [j for j in jobs if j not in done]
    if missing:
        raise RuntimeError(f"jobs {missing} did not complete (see the log)")
    latency = [(done[j] - t0_ms) / 1000 for j in jobs]
    run = [(done[j] - started[j]) / 1000 for j in jobs]
    return {"wall_s": wall, "fps": k * frames / wall, "latency_mean_s": statistics.mean(latency),
            "latency_max_s": max(latency), "run_mean_s": statistics.mean(run)}


def bench_jobs(args: argparse.Namespace, settings: Settings, client: redis.Redis, clip: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    width, height = (int(v) for v in args.size.split("x"))
    for mode in args.modes.split(","):
        model = load_model(settings, mode)
        try:
            for k in (int(v) for v in args.ks.split(",")):
                seq: list[dict[str, float]] = []
                conc: list[dict[str, float]] = []
                for r in range(args.repeats):
                    common = dict(frames=args.frames, render=args.render, width=width, height=height)
                    seq.append(one_round(settings, client, model, clip, k, 1, f"{mode}-k{k}-r{r}-seq", **common))
                    conc.append(one_round(settings, client, model, clip, k, k, f"{mode}-k{k}-r{r}-conc", **common))
                med = {name: {key: statistics.median(x[key] for x in xs) for key in xs[0]}
                       for name, xs in (("sequential", seq), ("concurrent", conc))}
                ratios = [s["wall_s"] / c["wall_s"] for s, c in zip(seq, conc)]
                row = {"mode": mode, "k": k, **{f"{n}_{key}": round(v, 3) for n, m in med.items() for key, v in m.items()},
                       "ratio": round(statistics.median(ratios), 3), "ratios": [round(x, 3) for x in ratios]}
                rows.append(row)
                print(f"{mode:9s} K={k}: {med['concurrent']['fps']:6.2f} frames/s at once vs "
                      f"{med['sequential']['fps']:6.2f} one after another = {row['ratio']:.3f}x (rounds {row['ratios']}); "
                      f"latency mean {med['concurrent']['latency_mean_s']:.1f} s vs {med['sequential']['latency_mean_s']:.1f} s, "
                      f"max {med['concurrent']['latency_max_s']:.1f} vs {med['sequential']['latency_max_s']:.1f} s",
                      flush=True)
        finally:
            model.close()
    return rows


def bench_streams(args: argparse.Namespace, settings: Settings, client: redis.Redis, clip: Path) -> list[dict[str, object]]:
    """N live 30 fps one-object sources on one worker holding N: frames skipped per stream."""
    from producer.live_submit import submit_live

    rows: list[dict[str, object]] = []
    width, height = (int(v) for v in args.size.split("x"))
    model = load_model(settings, args.modes.split(",")[0])
    try:
        for n in (int(v) for v in args.streams.split(",")):
            live = dataclasses.replace(settings, concurrency=n, max_latency_s=args.max_latency)
            worker = Worker(settings=live, segmenter=model, client=client, name=f"streams-{n}")
            thread = threading.Thread(target=worker.run, daemon=True)
            thread.start()
            producers = [threading.Thread(target=submit_live, args=(clip, prompt(width, height)), daemon=True,
                                          kwargs=dict(settings=live, job_id=f"cam{n}-{j}", realtime=True, render=False))
                         for j in range(n)]
            for p in producers:
                p.start()
            for p in producers:
                p.join()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(
                    client.hget(live.keys.job(f"cam{n}-{j}"), "state") == b"completed" for j in range(n)):
                time.sleep(0.2)
            worker.stopping = True
            thread.join(60)
            skipped = [int(client.hget(live.keys.job(f"cam{n}-{j}"), "dropped") or 0) for j in range(n)]
            p95 = [float(client.hget(live.keys.job(f"cam{n}-{j}"), "latency_p95_s") or 0) for j in range(n)]
            rows.append({"streams": n, "skipped": skipped, "latency_p95_s": p95})
            print(f"{n} streams: frames skipped {sum(skipped)} (per stream {skipped}); latency p95 max "
                  f"{max(p95):.3f} s", flush=True)
            if sum(skipped):
                break
    finally:
        model.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--modes", default="shared,batched,processes")
    ap.add_argument("--frames", type=int, default=24, help="frames a job")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--size", default="640x360", help="WxH of the clip (the GPU check: 1920x1080)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoint", default="random")
    ap.add_argument("--render", action="store_true", help="render each job's MP4 too")
    ap.add_argument("--streams", default="", help="count live 30 fps streams instead (comma-separated N to try)")
    ap.add_argument("--max-latency", type=float, default=2.0)
    ap.add_argument("--objects", type=int, default=1, help="objects a job")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    global OBJECTS
    OBJECTS = args.objects
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="vseg-bench-concurrency-") as tmp:
        root = Path(tmp)
        server = RedisServer(data_dir=root / "redis")
        server.data_dir.mkdir()
        server.start()
        try:
            settings = Settings.load(redis_url=server.url, storage_root=root / "storage", checkpoint=args.checkpoint,
                                     image_size=args.image_size, device=args.device, block_ms=200)
            client = redis.Redis.from_url(server.url)
            frames = max(args.frames, 90) if args.streams else args.frames
            clip = looped_clip(SHARED_VIDEOS / "bedroom.mp4", frames, size_wh=(width, height))
            print(f"machine: {machine()}; SAM 2.1 {settings.model_preset} at {args.image_size} on {args.device}, "
                  f"{args.size}, {frames} frames a job, {OBJECTS} object(s)", flush=True)
            rows = bench_streams(args, settings, client, clip) if args.streams else bench_jobs(args, settings, client, clip)
        finally:
            server.stop()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
