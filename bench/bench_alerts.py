"""The events consumer's cost: judging a job's frames against zones and lines (`python -m producer alerts`,
one JobFollower: read, decode every mask, judge, publish, save state, acknowledge) against the client's
`follow()` decoding every mask of the same result stream (what any consumer of masks pays at least).

A result stream of --frames `frame` entries (--objects moving ellipses each, COCO RLE at --size) is written
once to a redis-server of its own, with 3 zones and 1 line the ellipses pass through. Then, in --rounds
interleaved rounds (a shared machine's speed drifts): follow+masks, alerts (a fresh consumer group and state
each round). Prints frames/s of each (median), the ratio alerts / follow+masks, and the events per round
(the same every round: the judge is deterministic). The consumer is a process of its own, so its cost is
never the worker's; the figure says how many frames/s one consumer keeps up with.

    .venv/bin/python bench/bench_alerts.py [--frames 1000] [--objects 4] [--size 1280x720] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_client import JOB, fill, follow  # noqa: E402
from bench.common import machine  # noqa: E402
from producer import Client  # noqa: E402
from producer.alert_follow import ENDED, JobFollower  # noqa: E402
from producer.local_redis import RedisServer  # noqa: E402
from producer.zones import parse_zones  # noqa: E402
from runtime.settings import Settings  # noqa: E402


def zones_for(width: int, height: int) -> str:
    w, h = width, height
    return parse_zones([f"left:0,0,{w // 3},0,{w // 3},{h},0,{h}",
                        f"middle:{w // 3},0,{2 * w // 3},0,{2 * w // 3},{h // 2},{w // 3},{h // 2}",
                        f"right:{2 * w // 3},0,{w},0,{w},{h},{2 * w // 3},{h}"],
                       [f"gate:{w // 2},0,{w // 2},{h}"]).to_json()


def alerts_round(client: redis.Redis, settings: Settings, group: str) -> int:
    keys = settings.keys
    client.delete(keys.zone_state(JOB), keys.job_alerts(JOB), keys.alerts)
    events: list[object] = []
    follower = JobFollower(client, settings, JOB, group=group, consumer="main", on_event=events.append)
    while follower.step() != ENDED:
        pass
    return len(events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp, RedisServer(data_dir=Path(tmp)) as server:
        settings = Settings.load(environ={}, redis_url=server.url, storage_root=Path(tmp), zone_confirm_frames=2,
                                 dwell_s=3.0)
        raw = redis.Redis.from_url(server.url)
        fill(raw, settings, args.frames, args.objects, width, height)
        raw.hset(settings.keys.job(JOB), mapping={"zones": zones_for(width, height), "fps": "30"})
        client = Client(settings)
        times: dict[str, list[float]] = {"follow+masks": [], "alerts": []}
        counts: list[int] = []
        for r in range(args.rounds):
            started = time.perf_counter()
            assert follow(client, True) == args.frames + 2
            times["follow+masks"].append(time.perf_counter() - started)
            started = time.perf_counter()
            counts.append(alerts_round(raw, settings, f"bench-{r}"))
            times["alerts"].append(time.perf_counter() - started)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"machine: {machine()}")
        print(f"{args.frames} frames, {args.objects} objects each, masks {width}x{height}, 3 zones and 1 line, "
              f"{args.rounds} rounds, median:")
        for name, seconds in med.items():
            print(f"  {name:13s} {args.frames / seconds:7.0f} frames/s")
        print(f"alerts / follow+masks (time): {med['alerts'] / med['follow+masks']:.2f}x")
        print(f"events per round: {counts} (deterministic: {len(set(counts)) == 1})")
        client.close()


if __name__ == "__main__":
    main()
