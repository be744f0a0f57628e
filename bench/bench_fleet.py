"""A camera fleet on a small CPU machine: producer CPU per camera, disk, latency, before and after.

N cameras (default 8), each an ffmpeg MPEG-TS server over TCP sending `01_dog.mp4` (1280x720 29.97 fps
H.264) at real-time rate, looped and not re-encoded; one CPU worker (random weights, image size 256)
holding every camera's job at once (`--concurrency N`); and the producer side:

- before (the code at commit de93d21, checked out with `git worktree add /tmp/before de93d21`): one
  `python -m producer submit tcp://... --point 1:640,360` process per camera; every camera frame is
  encoded to JPEG and announced, the worker skips frames to stay within max_latency_s;
- after (this tree): one `python -m producer serve --cameras cameras.yaml` process for all cameras; a
  live producer keeps at most live_buffer_frames untaken JPEGs and frames dropped at ingest are not
  encoded; the worker takes the newest frame.

Both run against their own redis-server on a free port, with the same venv. Once every job has
published a processed frame, the script measures for `--seconds` (default 90), sampling every 2 s:
the producer processes' CPU (utime+stime from /proc, children included), the worker's CPU, the bytes
under STORAGE_ROOT/jobs (its high-water mark counts from the producers' start) and Redis used_memory.
Frames announced and dropped at ingest come from each job's frames stream, processed frames and their
capture-to-publish latency from its result stream (read with this tree's schemas/messages.py), all
over the measured window. Prints one table with before and after side by side and the after/before
ratios of producer CPU per camera and disk high-water mark.

    git -C . worktree add /tmp/before de93d21
    .venv/bin/python bench/bench_fleet.py [--cameras 8] [--seconds 90] [--which before,after]
    git -C . worktree remove --force /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CACHE, ROOT, SHARED_VIDEOS, disk_bytes, machine  # noqa: E402
from producer.local_redis import RedisServer  # noqa: E402
from schemas import messages  # noqa: E402
from schemas.names import Keys  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 2.0
POINT = "1:640,360"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """CPU seconds of a process (user + system, its waited-for children included) and its live descendants."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        # after the command: state is field 3; utime, stime, cutime, cstime are fields 14-17
        total = sum(int(x) for x in fields[11:15]) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0
    return total + sum(cpu_seconds(c) for c in children(pid))


@dataclass
class Camera:
    job_id: str
    announced: int = 0
    dropped_at_ingest: int = 0
    processed: int = 0
    skipped: int = 0
    latencies: list[float] = field(default_factory=list)


@dataclass
class Outcome:
    which: str
    cameras: list[Camera]
    seconds: float
    ready_s: float
    producer_cpu_s: float
    worker_cpu_s: float
    disk_hwm: int
    redis_hwm: int
    problems: list[str] = field(default_factory=list)


def last_frame(client: redis.Redis, stream: str) -> tuple[int, int]:
    """(frames announced so far, dropped_at_ingest so far) from a frames stream's newest frame entry."""
    for _, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrevrange(stream, count=5)):
        if b"frame_idx" in fields:
            return int(fields[b"frame_idx"]) + 1, int(fields.get(b"dropped_at_ingest", b"0"))
    return 0, 0


def run_variant(which: str, n: int, seconds: float, code: Path, ready_timeout: float) -> Outcome:
    keys = Keys()
    work = CACHE / f"fleet-{which}-{os.getpid()}"
    storage = work / "storage"
    storage.mkdir(parents=True)
    (work / "redis").mkdir()
    server = RedisServer(data_dir=work / "redis").start()
    client = redis.Redis.from_url(server.url)
    env = {**os.environ, "REDIS_URL": server.url, "STORAGE_ROOT": str(storage), "TQDM_DISABLE": "1",
           "VSEG_CONCURRENCY": str(n), "VSEG_DEVICE": "cpu", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(code)}
    video = SHARED_VIDEOS / "01_dog.mp4"
    ports = [free_port() for _ in range(n)]
    sources = [subprocess.Popen(["ffmpeg", "-v", "error", "-re", "-stream_loop", "-1", "-i", str(video), "-an",
                                 "-c", "copy", "-f", "mpegts", f"tcp://127.0.0.1:{p}?listen=1"],
                                stdout=subprocess.DEVNULL, stderr=open(work / f"ffmpeg{i}.log", "wb"))  # noqa: SIM115
               for i, p in enumerate(ports)]
    time.sleep(1.0)
    worker_log = open(work / "worker.log", "wb")  # noqa: SIM115 - closed at the end
    worker = subprocess.Popen([sys.executable, "-m", "worker", "--checkpoint", "random", "--image-size", "256",
                               "--device", "cpu", "--concurrency", str(n), "--name", f"fleet-{which}"],
                              cwd=code, env=env, stdout=worker_log, stderr=subprocess.STDOUT)
    producers: list[subprocess.Popen[bytes]] = []
    if which == "before":
        job_ids = [f"cam{i}" for i in range(n)]
        for i, p in enumerate(ports):
            producers.append(subprocess.Popen(
                [sys.executable, "-m", "producer", "submit", f"tcp://127.0.0.1:{p}", "--point", POINT,
                 "--job-id", job_ids[i]], cwd=code, env=env, stdout=subprocess.DEVNULL,
                stderr=open(work / f"producer{i}.log", "wb")))  # noqa: SIM115
    else:
        job_ids = [f"cam{i}-1" for i in range(n)]
        cams = {"cameras": [{"name": f"cam{i}", "url": f"tcp://127.0.0.1:{p}", "prompts": [f"--point {POINT}"]}
                            for i, p in enumerate(ports)]}
        (work / "cameras.yaml").write_text(json.dumps(cams, indent=1))  # JSON is YAML
        producers.append(subprocess.Popen(
            [sys.executable, "-m", "producer", "serve", "--cameras", str(work / "cameras.yaml")], cwd=code, env=env,
            stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "wb")))  # noqa: SIM115
    cams_out = {j: Camera(j) for j in job_ids}
    streams = {keys.results(j): j for j in job_ids}
    last_ids: dict[Any, Any] = {s: "0-0" for s in streams}
    jobs_dir = storage / "jobs"
    problems: list[str] = []
    disk_hwm = redis_hwm = 0
    t0 = time.monotonic()
    window_start: float | None = None
    started_with: dict[str, tuple[int, int]] = {}
    cpu0 = (0.0, 0.0)
    seen_processed: set[str] = set()
    next_sample = t0
    print(f"[{which}] {n} cameras from {code}; waiting for every job to publish a processed frame", flush=True)
    while True:
        now = time.monotonic()
        if window_start is not None and now - window_start >= seconds:
            break
        if window_start is None and (len(seen_processed) == n or now - t0 > ready_timeout):
            if len(seen_processed) < n:
                problems.append(f"only {len(seen_processed)} of {n} jobs had a processed frame after "
                                f"{ready_timeout:.0f} s; measured anyway")
            window_start = now
            started_with = {j: last_frame(client, keys.frames(j)) for j in job_ids}
            cpu0 = (sum(cpu_seconds(p.pid) for p in producers), cpu_seconds(worker.pid))
            print(f"[{which}] all running after {now - t0:.0f} s; measuring {seconds:g} s", flush=True)
        reply = cast(list[Any], client.xread(last_ids, count=1000, block=500) or [])
        for stream, entries in reply:
            job = streams[stream.decode()]
            cam = cams_out[job]
            for entry_id, fields in entries:
                last_ids[stream.decode()] = entry_id.decode()
                msg = messages.decode(fields)
                if not isinstance(msg, messages.FrameResult):
                    if isinstance(msg, (messages.Failed, messages.Cancelled, messages.Dead, messages.Completed)):
                        problems.append(f"{job} ended early: {msg.TYPE.value} {getattr(msg, 'error', '')}")
                    continue
                if not msg.skipped:
                    seen_processed.add(job)
                if window_start is None:
                    continue
                if msg.skipped:
                    cam.skipped += 1
                else:
                    cam.processed += 1
                    if msg.latency_s is not None:
                        cam.latencies.append(msg.latency_s)
        now = time.monotonic()
        if now >= next_sample:
            next_sample = now + SAMPLE_S
            disk_hwm = max(disk_hwm, disk_bytes(jobs_dir))
            redis_hwm = max(redis_hwm, int(cast(dict[str, Any], client.info("memory"))["used_memory"]))
            if window_start is not None and int(now - window_start) % 30 < SAMPLE_S:
                done = sum(c.processed for c in cams_out.values())
                print(f"  {now - window_start:5.0f} s: {done} frames processed, disk high-water "
                      f"{disk_hwm / 2**20:.1f} MB", flush=True)
    assert window_start is not None
    elapsed = time.monotonic() - window_start
    producer_cpu = sum(cpu_seconds(p.pid) for p in producers) - cpu0[0]
    worker_cpu = cpu_seconds(worker.pid) - cpu0[1]
    for j in job_ids:
        a, d = last_frame(client, keys.frames(j))
        a0, d0 = started_with.get(j, (0, 0))
        cams_out[j].announced, cams_out[j].dropped_at_ingest = a - a0, d - d0
    ready_s = window_start - t0
    # stop: the producers first (their jobs complete), then the worker; then the sources and Redis
    for p in producers:
        p.send_signal(signal.SIGTERM)
    for p in producers:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            problems.append(f"producer {p.pid} ignored SIGTERM for 60 s; killed")
            p.kill()
            p.wait()
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(90)
    except subprocess.TimeoutExpired:
        problems.append("the worker ignored SIGTERM for 90 s; killed")
        worker.kill()
        worker.wait()
    for s in sources:
        s.kill()
        s.wait()
    server.stop()
    worker_log.close()
    print(f"[{which}] stopped; logs in {work}", flush=True)
    return Outcome(which, list(cams_out.values()), elapsed, ready_s, producer_cpu, worker_cpu, disk_hwm, redis_hwm,
                   problems)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def rows(o: Outcome) -> dict[str, str]:
    n = len(o.cameras)
    lat = [x for c in o.cameras for x in c.latencies]
    per = lambda attr: [getattr(c, attr) for c in o.cameras]  # noqa: E731
    span = lambda xs: f"{sum(xs) / n:.1f} ({min(xs)}-{max(xs)})"  # noqa: E731
    return {
        "producer processes": "1 (serve)" if o.which == "after" else f"{n} (submit)",
        "time to all jobs running (s)": f"{o.ready_s:.0f}",
        "measured (s)": f"{o.seconds:.0f}",
        "producer CPU per camera (% of a core)": f"{100 * o.producer_cpu_s / o.seconds / n:.1f}",
        "producer CPU, all cameras (% of a core)": f"{100 * o.producer_cpu_s / o.seconds:.0f}",
        "worker CPU (% of a core)": f"{100 * o.worker_cpu_s / o.seconds:.0f}",
        "frames announced / camera": span(per("announced")),
        "frames processed / camera": span(per("processed")),
        "frames skipped by worker / camera": span(per("skipped")),
        "frames dropped at ingest / camera": span(per("dropped_at_ingest")),
        "latency p50 (s)": f"{pct(lat, 50):.2f}",
        "latency p95 (s)": f"{pct(lat, 95):.2f}",
        "disk high-water, STORAGE_ROOT/jobs (MB)": f"{o.disk_hwm / 1e6:.1f}",
        "Redis used_memory high-water (MB)": f"{o.redis_hwm / 1e6:.1f}",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cameras", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--which", default="before,after", help="before, after, or both (comma-separated)")
    ap.add_argument("--before-dir", type=Path, default=Path("/tmp/before"),
                    help="a worktree of commit de93d21 (git worktree add /tmp/before de93d21)")
    ap.add_argument("--ready-timeout", type=float, default=240.0,
                    help="measure anyway if some job has no processed frame after this many seconds")
    args = ap.parse_args()
    outcomes: list[Outcome] = []
    for which in [w.strip() for w in args.which.split(",") if w.strip()]:
        if which not in ("before", "after"):
            ap.error(f"--which: unknown {which!r}")
        code = args.before_dir if which == "before" else ROOT
        if not (code / "producer").is_dir():
            ap.error(f"{code} has no producer package: git worktree add {code} de93d21")
        outcomes.append(run_variant(which, args.cameras, args.seconds, code, args.ready_timeout))
    CACHE.mkdir(parents=True, exist_ok=True)
    dump = CACHE / f"fleet-{os.getpid()}.json"
    dump.write_text(json.dumps([asdict(o) for o in outcomes]))
    table = [rows(o) for o in outcomes]
    print(f"\nmachine: {machine()}")
    print(f"{args.cameras} cameras of 01_dog.mp4 (1280x720, 29.97 fps), worker: random weights, image size 256, "
          f"CPU, concurrency {args.cameras}; one point prompt per camera\n")
    names = [o.which for o in outcomes]
    width = max(len(k) for k in table[0])
    print(f"| {'':{width}s} | " + " | ".join(f"{n:>18s}" for n in names) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("-" * 20 for _ in names) + "|")
    for k in table[0]:
        print(f"| {k:{width}s} | " + " | ".join(f"{t[k]:>18s}" for t in table) + " |")
    by = {o.which: o for o in outcomes}
    if "before" in by and "after" in by:
        b, a = by["before"], by["after"]
        cpu_ratio = (a.producer_cpu_s / a.seconds) / (b.producer_cpu_s / b.seconds) if b.producer_cpu_s else float("nan")
        disk_ratio = a.disk_hwm / b.disk_hwm if b.disk_hwm else float("nan")
        print(f"\nafter/before: producer CPU per camera x{cpu_ratio:.2f}, disk high-water x{disk_ratio:.2f}")
    print("\nper camera (processed, latency p50/p95 s):")
    for o in outcomes:
        print(f"  {o.which}: " + ", ".join(f"{c.job_id} {c.processed} {pct(c.latencies, 50):.2f}/"
                                           f"{pct(c.latencies, 95):.2f}" for c in o.cameras))
        for p in o.problems:
            print(f"  {o.which}: PROBLEM: {p}")
    print(f"\nraw figures: {dump}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
