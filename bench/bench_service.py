"""The whole service against the plain way, on the same model, clip and prompt, from one run.

Plain: `ffmpeg -i V -q:v 2 -start_number 0 DIR/%05d.jpg`, then SAM 2's init_state (loads every frame),
add_new_points_or_box, propagate_in_video (bench/plain_sam2.py, in its own process).
Ours: a worker already running (model loaded, like the plain loop's timer which starts after the model
is built), then submit (streaming hand-off) and follow the result stream to the last frame.

Reports time to first result, total wall time, frames/s, peak RSS and CPU seconds, side by side with
ratios: the medians of --repeats interleaved rounds (plain, service, masks only), because a shared
machine's speed drifts by several percent within minutes.
CPU: SAM 2.1 tiny with random weights at --image-size 256 (default); on a GPU pass --device cuda
--image-size 1024.

    python bench/bench_service.py [--frames 300] [--image-size 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import SHARED_VIDEOS, ffmpeg_exe, looped_clip, machine  # noqa: E402
from producer.local_redis import RedisServer  # noqa: E402
from producer.prompts import build_prompts  # noqa: E402
from producer.results import follow  # noqa: E402
from producer.submission import submit  # noqa: E402
from runtime.settings import Settings  # noqa: E402
from schemas import messages  # noqa: E402


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a running process has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its live descendants (the worker and its model process)."""
    total = _cpu_s(pid)
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children = task.read_text().split()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        for child in children:
            try:
                total += _tree_cpu_s(int(child))
            except FileNotFoundError:  # a child that ended meanwhile
                continue
    return total


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_plain(clip: Path, image_size: int, device: str, point: str) -> dict[str, float]:
    cpu0 = _children_cpu_s()
    out = subprocess.run([sys.executable, str(ROOT / "bench/plain_sam2.py"), str(clip), "--image-size",
                          str(image_size), "--device", device, "--point", point],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        raise SystemExit(f"plain loop failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["cpu_s"] = _children_cpu_s() - cpu0  # the plain process and its ffmpeg child
    return result


def run_service(clip: Path, image_size: int, device: str, point: str, *, render: bool = True,
                env_extra: dict[str, str] | None = None, staged: bool = False) -> dict[str, float]:
    """Submit to the job's last result with a worker already running. staged (a diagnostic): the
    video is decoded and the job queued before the worker starts, and the clock starts when the
    worker is ready, so nothing else runs beside the model."""
    with tempfile.TemporaryDirectory() as tmp, RedisServer(data_dir=Path(tmp)) as server:
        storage = Path(tmp) / "storage"
        settings = Settings.load(environ={}, redis_url=server.url, storage_root=storage, block_ms=100)
        if staged:
            submit(clip, build_prompts(points=[f"1:{point}"]), settings=settings, job_id="bench", render=render,
                   stream=False)
        env = {**os.environ, "REDIS_URL": server.url, "STORAGE_ROOT": str(storage), "TQDM_DISABLE": "1",
               "VSEG_BLOCK_MS": "100", **(env_extra or {})}
        worker = subprocess.Popen([sys.executable, "-m", "worker", "--checkpoint", "random", "--image-size",
                                   str(image_size), "--device", device, "--name", "bench"],
                                  cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        log: list[str] = []
        ready = threading.Event()

        def read_log() -> None:
            assert worker.stderr is not None
            for line in worker.stderr:
                log.append(line)
                if "worker bench ready" in line:
                    ready.set()

        threading.Thread(target=read_log, daemon=True).start()
        if not ready.wait(300):
            raise SystemExit("worker did not start:\n" + "".join(log[-30:]))
        worker_cpu0, redis_cpu0, own_cpu0 = _tree_cpu_s(worker.pid), _cpu_s(server.proc.pid), time.process_time()
        t0 = time.monotonic()
        submitted: dict[str, float] = {}

        def run_submit() -> None:
            submit(clip, build_prompts(points=[f"1:{point}"]), settings=settings, job_id="bench", render=render)
            submitted["done"] = time.monotonic()

        if not staged:
            threading.Thread(target=run_submit, daemon=True).start()
        first = None
        frames = 0
        while True:
            try:
                for msg in follow("bench", settings=settings, timeout_s=600):
                    if isinstance(msg, messages.FrameResult):
                        frames += 1
                        first = first or time.monotonic() - t0
                    elif isinstance(msg, messages.Failed):
                        raise SystemExit(f"job failed: {msg.error}")
                break
            except Exception as e:  # the job hash may not exist yet in the first milliseconds
                if "no job" not in str(e):
                    raise
                time.sleep(0.005)
        total = time.monotonic() - t0
        cpu = {"worker_cpu_s": _tree_cpu_s(worker.pid) - worker_cpu0, "redis_cpu_s": _cpu_s(server.proc.pid) - redis_cpu0,
               "producer_cpu_s": time.process_time() - own_cpu0}
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        time.sleep(0.2)
        match = re.search(r"peak RSS (\d+) MiB", "".join(log))
        waited = re.findall(r"the model waited ([\d.]+) s", "".join(log))
        return {"first_result_s": first or 0.0, "total_s": total, "frames": frames,
                "waited_s": float(waited[-1]) if waited else 0.0,
                "submit_s": submitted.get("done", t0) - t0, **cpu,
                "cpu_s": sum(cpu.values()), "peak_rss_mib": float(match.group(1)) if match else 0.0}


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the rounds (the runs are interleaved, so drift hits all three alike)."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of plain, service, masks only (medians reported)")
    ap.add_argument("--video", type=Path, default=SHARED_VIDEOS / "bedroom.mp4")
    args = ap.parse_args()
    clip = looped_clip(args.video, args.frames)
    point = "480,300" if args.video.name == "bedroom.mp4" else "640,360"
    print(f"machine: {machine()}; ffmpeg: {ffmpeg_exe()}")
    print(f"clip: {clip.name} ({args.frames} frames), SAM 2.1 tiny random weights, image size {args.image_size}, "
          f"{args.device}, one object (point {point} on frame 0); {args.repeats} interleaved rounds, medians")
    rounds: list[tuple[dict[str, float], dict[str, float], dict[str, float]]] = []
    for k in range(args.repeats):
        plain = run_plain(clip, args.image_size, args.device, point)
        ours = run_service(clip, args.image_size, args.device, point)
        masks_only = run_service(clip, args.image_size, args.device, point, render=False)
        for run in (plain, ours, masks_only):
            run["fps"] = run["frames"] / run["total_s"]
        rounds.append((plain, ours, masks_only))
        print(f"round {k + 1}: frames/s plain {plain['fps']:.2f}, service {ours['fps']:.2f} "
              f"({ours['fps'] / plain['fps']:.3f}), masks only {masks_only['fps']:.2f} "
              f"({masks_only['fps'] / plain['fps']:.3f}); first result {plain['first_result_s']:.2f} / "
              f"{ours['first_result_s']:.2f} / {masks_only['first_result_s']:.2f} s", flush=True)
    plain, ours, masks_only = (median_run([r[i] for r in rounds]) for i in range(3))
    rows = [
        ("time to first result (s)", "first_result_s"),
        ("total wall time (s)", "total_s"),
        ("frames/s end to end", "fps"),
        ("peak RSS (MiB)", "peak_rss_mib"),
        ("CPU time, all processes (s)", "cpu_s"),
    ]
    print("service: with the MP4 render (the default); masks only: submitted with render=False, like the plain "
          "loop, which draws no video")
    print(f"{'median of the rounds':28} {'plain':>8} {'service':>8} {'masks only':>10} {'service/plain':>14} "
          f"{'masks only/plain':>17}")
    for name, key in rows:
        p, o, m = plain[key], ours[key], masks_only[key]
        print(f"{name:28} {p:>8.2f} {o:>8.2f} {m:>10.2f} {o / p:>14.3f} {m / p:>17.3f}")
    fps_ratios = [(o["fps"] / p["fps"], m["fps"] / p["fps"]) for p, o, m in rounds]
    print(f"frames/s ratio per round: service {', '.join(f'{a:.3f}' for a, _ in fps_ratios)}; "
          f"masks only {', '.join(f'{b:.3f}' for _, b in fps_ratios)}")
    print(f"(plain: ffmpeg took {plain['extract_s']:.2f} s; service: submit returned after {ours['submit_s']:.2f} s; "
          f"frames {plain['frames']:.0f} / {ours['frames']:.0f} / {masks_only['frames']:.0f}; service peak RSS is the "
          f"worker's; total = submit to the job's terminal entry, after the MP4 is closed)")
    for name, run in (("service", ours), ("masks only", masks_only)):
        print(f"{name} CPU seconds: worker {run['worker_cpu_s']:.1f}, producer (this process) "
              f"{run['producer_cpu_s']:.1f}, redis-server {run['redis_cpu_s']:.1f}")


if __name__ == "__main__":
    main()
