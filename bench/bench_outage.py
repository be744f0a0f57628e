"""Recovery from a Redis outage longer than a lease, with the real worker (issue 18's scenario).

    python bench/bench_outage.py [--frames 60] [--lease 4] [--outage 15] [--after 10] [--fake]

Runs the same job twice on a private redis-server with AOF (`appendfsync always`), each time with a
fresh `python -m worker` (SAM 2.1 tiny, random weights, 256, CPU; `--fake`: the colour segmenter):
once undisturbed, once with Redis stopped after `--after` frames were published and started again on
the same port `--outage` seconds later. Prints, side by side from the one run: total time of each,
the outage, how long after Redis came back the job completed, the time lost beyond the outage itself
(ratio to the undisturbed run), the attempts, and whether every frame is on the result stream once.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, SHARED_VIDEOS, looped_clip, machine  # noqa: E402
from producer.local_redis import RedisServer  # noqa: E402
from producer.submission import submit  # noqa: E402
from runtime.settings import Settings  # noqa: E402
from schemas.names import TERMINAL_ENTRY_ID  # noqa: E402
from schemas.prompts import ObjectPrompt  # noqa: E402
from tests.workers import wait_for  # noqa: E402


def state(client: redis.Redis, settings: Settings, job_id: str) -> dict[str, str]:
    try:
        return {k.decode(): v.decode() for k, v in client.hgetall(settings.keys.job(job_id)).items()}
    except redis.RedisError:
        return {}


def one_run(video: Path, args: argparse.Namespace, work: Path, *, outage: bool) -> dict[str, float | int | bool]:
    server = RedisServer(data_dir=work / "redis", appendonly=True)
    server.data_dir.mkdir(parents=True)
    server.start()
    storage = work / "storage"
    storage.mkdir()
    settings = Settings.load(environ={}, redis_url=server.url, storage_root=storage, block_ms=200)
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    submit(video, [ObjectPrompt(1, 0, ((80.0, 60.0),), (1,))], settings=settings, client=client, job_id="job",
           stream=False)
    env = {**os.environ, "REDIS_URL": server.url, "STORAGE_ROOT": str(storage), "VSEG_BLOCK_MS": "200",
           "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "VSEG_CHECKPOINT_DIR": str(work / "ckpt")}
    if args.fake:  # the colour segmenter of tests/fakes.py, 0.1 s a frame
        env.update({"VSEG_SEGMENTER": "tests.fakes:from_env", "VSEG_FAKE_DELAY_S": "0.1"})
    model = [] if args.fake else ["--checkpoint", "random", "--image-size", "256", "--device", "cpu"]
    log = open(work / "worker.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "worker", *model, "--lease", str(args.lease), "--name", "w"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: state(client, settings, "job").get("state") == "running", timeout_s=600, what="the worker to start")
        t0 = time.monotonic()
        back_at = t0
        if outage:
            wait_for(lambda: int(state(client, settings, "job").get("frames_done", 0)) >= args.after, timeout_s=600, what="frames")
            server.stop()
            time.sleep(args.outage)
            server.start()
            back_at = time.monotonic()
        wait_for(lambda: state(client, settings, "job").get("state") == "completed", timeout_s=900, what="the job to complete")
        done_at = time.monotonic()
        ids = [i.decode() for i, _ in client.xrange(settings.keys.results("job"))]
        once = ids == ["0-1"] + [f"{k + 1}-0" for k in range(args.frames)] + [TERMINAL_ENTRY_ID]
        attempts = int(state(client, settings, "job").get("attempt", 0))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
        server.stop()
    return {"total_s": done_at - t0, "after_back_s": done_at - back_at, "attempts": attempts, "once": once}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--lease", type=float, default=4.0)
    p.add_argument("--outage", type=float, default=15.0, help="seconds Redis stays down")
    p.add_argument("--after", type=int, default=10, help="frames published before Redis is stopped")
    p.add_argument("--fake", action="store_true", help="the colour segmenter instead of SAM 2")
    args = p.parse_args()
    video = looped_clip(SHARED_VIDEOS / "bedroom.mp4", args.frames, size_wh=(160, 120))
    with tempfile.TemporaryDirectory(prefix="vseg-outage-") as tmp:
        plain = one_run(video, args, Path(tmp) / "plain", outage=False)
        hit = one_run(video, args, Path(tmp) / "outage", outage=True)
    lost_s = hit["total_s"] - plain["total_s"] - args.outage
    print(f"machine: {machine()}")
    print(f"{args.frames} frames, lease {args.lease:g} s, Redis stopped after {args.after} frames for {args.outage:g} s, "
          f"model {'fake' if args.fake else 'sam2.1 tiny random 256 cpu'}")
    print(f"{'run':<10} {'total s':>8} {'after Redis back s':>19} {'attempts':>9} {'every frame once':>17}")
    for name, r in (("plain", plain), ("outage", hit)):
        print(f"{name:<10} {r['total_s']:>8.1f} {r['after_back_s']:>19.1f} {r['attempts']:>9} {str(r['once']):>17}")
    print(f"time lost beyond the outage: {lost_s:.1f} s ({lost_s / plain['total_s']:.2f} of the undisturbed run)")


if __name__ == "__main__":
    main()
