"""The whole service on one machine, for a first run: Redis (embedded if none answers), submit a video,
run a worker in burst mode, follow the results to masks.json and an MP4.

    python scripts/demo.py VIDEO [--point OBJ:X,Y ...] [--box ...] [--checkpoint random] [--image-size 256]

With no prompt given, it puts one point on the frame's centre (object 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from producer.decode import probe  # noqa: E402
from producer.local_redis import ensure_redis  # noqa: E402
from producer.prompts import build_prompts  # noqa: E402
from producer.results import WatchResult  # noqa: E402
from producer.submission import new_job_id, submit  # noqa: E402
from producer.watching import watch  # noqa: E402
from runtime.logs import configure_logging  # noqa: E402
from runtime.settings import Settings  # noqa: E402
from schemas.errors import VsegError  # noqa: E402

log = logging.getLogger("demo")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", type=Path)
    p.add_argument("--point", action="append", default=[])
    p.add_argument("--box", action="append", default=[])
    p.add_argument("--max-frames", type=int, default=60)
    p.add_argument("--checkpoint", help="a .pt path, or 'random' for a smoke test without weights")
    p.add_argument("--image-size", type=int)
    p.add_argument("--model", help="tiny (default), small, base_plus, large")
    p.add_argument("--out", type=Path, default=ROOT / "out")
    args = p.parse_args(argv)
    configure_logging()
    settings = Settings.load()
    url, stop_redis = ensure_redis(settings.redis_url)
    settings = dataclasses.replace(settings, redis_url=url)
    try:
        points = args.point
        if not points and not args.box:
            width, height, _ = probe(args.video)
            points = [f"1:{width / 2:.0f},{height / 2:.0f}"]
            log.info("no prompt given: object 1 is the point at the frame's centre (%s)", points[0])
        prompts = build_prompts(points=points, boxes=args.box)
        job_id = new_job_id()
        env = {**os.environ, "REDIS_URL": url, "STORAGE_ROOT": str(settings.storage_root), "TQDM_DISABLE": "1"}
        cmd = [sys.executable, "-m", "worker", "--name", f"demo-{job_id}"]
        for flag, value in (("--checkpoint", args.checkpoint), ("--image-size", args.image_size), ("--model", args.model)):
            if value is not None:
                cmd += [flag, str(value)]
        worker = subprocess.Popen(cmd, cwd=ROOT, env=env)  # loads the model while the video decodes
        try:
            # streaming hand-off: the job is enqueued after the first frames, decoding goes on meanwhile
            submit(args.video, prompts, settings=settings, job_id=job_id, max_frames=args.max_frames, progress=True)
            log.info("job %s: all frames decoded; following its results", job_id)
            outcome: dict[str, object] = {}

            def follow_job() -> None:
                try:
                    outcome["result"] = watch(job_id, args.out / job_id, settings=settings, progress=True)
                except VsegError as e:
                    outcome["error"] = e

            watcher = threading.Thread(target=follow_job, daemon=True)
            watcher.start()
            while watcher.is_alive() and worker.poll() is None:
                watcher.join(0.5)
            if worker.poll() is not None and watcher.is_alive():  # e.g. no checkpoint: the worker said why
                log.error("the worker exited with %d (see its log above); job %s is still queued",
                          worker.returncode, job_id)
                return worker.returncode or 1
        finally:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                worker.wait(60)
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        result = outcome["result"]
        assert isinstance(result, WatchResult)
        print(f"masks: {result.masks_json}")
        print(f"video: {result.render_path}")
        return 0
    except VsegError as e:
        log.error("%s", e)
        return 1
    finally:
        stop_redis()


if __name__ == "__main__":
    sys.exit(main())
