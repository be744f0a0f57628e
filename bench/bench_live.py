"""A live job for many minutes: does the service keep up, and do its resources stay flat?

A 30 fps 720p MPEG-TS source over TCP (ffmpeg at real-time rate, the clip looped), a live job on it
(`python -m producer submit tcp://...`), and one CPU worker (SAM 2.1 tiny, random weights unless a
checkpoint is given). A consumer follows the result stream by XREAD from its last id, as the README
says a backend should. Every 10 s the script samples the worker's RSS (with its children), the job's
files under STORAGE_ROOT and Redis's used memory.

Prints the capture-to-publish latency p50/p95 of the processed frames, the fraction of frames
processed (the rest skipped to stay within max_latency_s), and RSS, disk and Redis memory at minute 1
and at the last minute, with their growth (target: at most 5%).

    .venv/bin/python bench/bench_live.py [--minutes 10] [--image-size 256] [--max-latency 2]
    python3 bench/bench_live.py --device cuda --image-size 1024 --size 1920x1080 --minutes 3   # GPU check:
        no skips, p95 under 100 ms
    .venv/bin/python bench/bench_live.py --fleet --cameras 8 --seconds 90 --which before,after   # the fleet
        mode (bench/bench_fleet.py): 8 cameras of 720p30, producer CPU per camera, disk, latency
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CACHE, ROOT, SHARED_VIDEOS, disk_bytes, looped_clip, machine  # noqa: E402
from producer.local_redis import RedisServer  # noqa: E402
from schemas import messages  # noqa: E402
from schemas.names import Keys  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    """RSS of a process and its children (the worker, and a model process if it has one)."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def main() -> int:
    if "--fleet" in sys.argv[1:]:  # many cameras through `producer serve`, before and after: bench/bench_fleet.py
        from bench import bench_fleet

        sys.argv = [sys.argv[0], *(a for a in sys.argv[1:] if a != "--fleet")]
        return bench_fleet.main()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--max-latency", type=float, default=2.0)
    ap.add_argument("--checkpoint", default="random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--maxlen", type=int, default=1500,
                    help="live_results_maxlen and live_frames_maxlen: 50 s at 30 fps, so minute 1 is steady already")
    ap.add_argument("--size", default="1280x720", help="WxH of the source (the GPU check: 1920x1080)")
    args = ap.parse_args()
    width, height = (int(x) for x in args.size.split("x"))
    clip = looped_clip(SHARED_VIDEOS / "bedroom.mp4", 300, size_wh=(width, height))
    work = CACHE / f"live-{os.getpid()}"
    storage = work / "storage"
    storage.mkdir(parents=True)
    (work / "redis").mkdir()
    server = RedisServer(data_dir=work / "redis").start()
    port = free_port()
    env = {**os.environ, "REDIS_URL": server.url, "STORAGE_ROOT": str(storage), "TQDM_DISABLE": "1",
           "VSEG_MAX_LATENCY_S": str(args.max_latency), "VSEG_DEVICE": args.device,
           "VSEG_LIVE_RESULTS_MAXLEN": str(args.maxlen), "VSEG_LIVE_FRAMES_MAXLEN": str(args.maxlen), "PYTHONUNBUFFERED": "1"}
    source = subprocess.Popen(["ffmpeg", "-v", "error", "-re", "-stream_loop", "-1", "-i", str(clip), "-c", "copy",
                               "-f", "mpegts", f"tcp://127.0.0.1:{port}?listen=1"], stdout=subprocess.DEVNULL)
    time.sleep(1.0)
    logs = open(work / "worker.log", "wb")  # noqa: SIM115 - closed at the end
    worker = subprocess.Popen([sys.executable, "-m", "worker", "--checkpoint", args.checkpoint, "--image-size",
                               str(args.image_size), "--name", "bench-live"], cwd=ROOT, env=env, stdout=logs,
                              stderr=subprocess.STDOUT)
    seconds = args.minutes * 60
    producer = subprocess.Popen([sys.executable, "-m", "producer", "submit", f"tcp://127.0.0.1:{port}", "--point",
                                 f"1:{width // 2},{height // 2}", "--duration", str(seconds), "--job-id", "bench-live"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=open(work / "producer.log", "wb"))  # noqa: SIM115
    client = redis.Redis.from_url(server.url)
    assert producer.stdout is not None
    job_id = producer.stdout.readline().decode().strip()
    print(f"live job {job_id}: {seconds / 60:g} min of {width}x{height} at 30 fps on {args.device}, image size "
          f"{args.image_size}, max_latency_s {args.max_latency}, streams trimmed to {args.maxlen}", flush=True)
    results = Keys().results(job_id)
    last_id = "0-0"
    latencies: list[float] = []
    processed = skipped = 0
    samples: list[tuple[float, int, int, int]] = []
    started = time.monotonic()
    next_sample = started + 10
    done = False
    while not done:
        reply = client.xread({results: last_id}, count=500, block=1000) or []
        for _, entries in reply:
            for entry_id, fields in entries:
                last_id = entry_id.decode()
                msg = messages.decode(fields)
                if isinstance(msg, messages.FrameResult):
                    if msg.skipped:
                        skipped += 1
                    else:
                        processed += 1
                        if msg.latency_s is not None:
                            latencies.append(msg.latency_s)
                elif isinstance(msg, (messages.Completed, messages.Failed, messages.Cancelled, messages.Dead)):
                    print(f"job ended: {msg.TYPE.value} {getattr(msg, 'error', '')}", flush=True)
                    done = True
        now = time.monotonic()
        if now >= next_sample:
            next_sample += 10
            info = client.info("memory")
            samples.append((now - started, rss_bytes(worker.pid), disk_bytes(storage / "jobs" / job_id),
                            int(info["used_memory"])))
            t, rss, disk, mem = samples[-1]
            print(f"  {t / 60:5.1f} min: {processed + skipped} frames ({processed} processed), worker RSS "
                  f"{rss / 2**20:.0f} MiB, disk {disk / 2**20:.1f} MiB, Redis {mem / 2**20:.1f} MiB", flush=True)
        if now - started > seconds + 120:
            print("the job did not end two minutes after its duration", flush=True)
            break
    producer.wait(60)
    worker.terminate()
    worker.wait(60)
    source.terminate()
    server.stop()
    logs.close()
    total = processed + skipped
    p50, p95 = np.percentile(latencies, [50, 95]) if latencies else (float("nan"), float("nan"))
    print(f"\nmachine: {machine()}")
    print(f"frames: {total} announced, {processed} processed ({processed / max(total, 1):.1%}), {skipped} skipped")
    print(f"latency capture -> publish: p50 {p50:.3f} s, p95 {p95:.3f} s (max_latency_s {args.max_latency})")
    # each figure averaged over a minute of samples: the HLS window and the JPEGs in flight vary by a few MiB
    first = [x for x in samples if 60 <= x[0] < 120] or samples[:6]
    last = [x for x in samples if x[0] >= samples[-1][0] - 60] if samples else []
    if first and last:
        for name, k in (("worker RSS", 1), ("disk", 2), ("Redis memory", 3)):
            a, b = (sum(x[k] for x in window) / len(window) for window in (first, last))
            growth = (b - a) / a if a else float("nan")
            print(f"{name:13s} minute {first[0][0] / 60:4.1f}-{first[-1][0] / 60:4.1f}: {a / 2**20:8.1f} MiB   minute "
                  f"{last[0][0] / 60:4.1f}-{last[-1][0] / 60:4.1f}: {b / 2**20:8.1f} MiB   growth {growth:+.1%} "
                  "(target <= +5%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
