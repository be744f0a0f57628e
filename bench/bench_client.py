"""The client's reading cost: `Job.follow()` against a bare XREAD + msgpack loop over the same result stream.

A result stream of --frames `frame` entries (--objects objects each, COCO RLE masks of a moving ellipse at
--size), between a `started` and a `completed` entry, is written once to a redis-server of its own. Then, in
--rounds interleaved rounds (bare, follow, follow+masks, ...: a shared machine's speed drifts):

- bare: XREAD COUNT 256 from the last id until the terminal id, `msgpack.unpackb` of every entry's data;
- follow: `for item in client.job(id).follow()`, the typed items, masks not touched;
- follow+masks: the same, with every object's `mask` (a numpy array) decoded.

Prints microseconds per entry (median over rounds), the ratio follow / bare (the target: at most 1.2),
and frames/s with masks decoded.

    .venv/bin/python bench/bench_client.py [--frames 2000] [--objects 4] [--size 1280x720] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import cv2
import msgpack
import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine  # noqa: E402
from producer import Client, Frame  # noqa: E402
from producer.local_redis import RedisServer  # noqa: E402
from runtime.settings import Settings  # noqa: E402
from schemas import messages  # noqa: E402
from schemas.names import TERMINAL_ENTRY_ID, frame_entry_id  # noqa: E402
from schemas.rle import encode_mask  # noqa: E402

JOB = "bench-client"


def mask(frame: int, obj: int, width: int, height: int) -> np.ndarray:
    canvas = np.zeros((height, width), np.uint8)
    cx = int((0.2 + 0.6 * ((frame * 7 + obj * 131) % 100) / 100) * width)
    cy = int((0.3 + 0.1 * obj) % 0.9 * height)
    cv2.ellipse(canvas, (cx, cy), (width // 12, height // 8), frame % 180, 0, 360, 1, -1)
    return canvas.astype(bool)


def fill(client: redis.Redis, settings: Settings, frames: int, objects: int, width: int, height: int) -> None:
    stream = settings.keys.results(JOB)
    client.hset(settings.keys.job(JOB), mapping={"state": "completed"})
    client.xadd(stream, cast(Any, messages.encode(messages.Started(JOB, "bench", frames, tuple(range(objects))))),
                id="0-1")
    pipe = client.pipeline(transaction=False)
    for k in range(frames):
        objs = []
        for o in range(objects):
            m = mask(k, o, width, height)
            ys, xs = np.nonzero(m)
            box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)] if xs.size else [0.0] * 4
            objs.append(messages.ObjectResult(o, encode_mask(m), box, int(m.sum()), 0.9))
        pipe.xadd(stream, cast(Any, messages.encode(messages.FrameResult(JOB, k, tuple(objs)))), id=frame_entry_id(k))
        if k % 200 == 199:
            pipe.execute()
    pipe.xadd(stream, cast(Any, messages.encode(messages.Completed(JOB, "", frames, objects))), id=TERMINAL_ENTRY_ID)
    pipe.execute()


def bare(client: redis.Redis, stream: str) -> int:
    last, n = "0-0", 0
    while True:
        reply = cast(list[Any], client.xread({stream: last}, count=256))
        for entry_id, fields in reply[0][1]:
            msgpack.unpackb(fields[b"data"])
            n += 1
            last = entry_id
            if entry_id == TERMINAL_ENTRY_ID.encode():
                return n


def follow(client: Client, masks: bool) -> int:
    n = 0
    for item in client.job(JOB).follow():
        n += 1
        if masks and isinstance(item, Frame):
            for obj in item.objects:
                obj.mask  # noqa: B018 - decoded here
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp, RedisServer(data_dir=Path(tmp)) as server:
        settings = Settings.load(environ={}, redis_url=server.url, storage_root=Path(tmp))
        raw = redis.Redis.from_url(server.url)
        fill(raw, settings, args.frames, args.objects, width, height)
        client = Client(settings)
        stream = settings.keys.results(JOB)
        entries = args.frames + 2
        times: dict[str, list[float]] = {"bare": [], "follow": [], "follow+masks": []}
        runs = {"bare": lambda: bare(raw, stream), "follow": lambda: follow(client, False),
                "follow+masks": lambda: follow(client, True)}
        for _ in range(args.rounds):
            for name, run in runs.items():
                started = time.perf_counter()
                assert run() == entries, name
                times[name].append(time.perf_counter() - started)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"machine: {machine()}")
        print(f"{args.frames} frame entries, {args.objects} objects each, masks {width}x{height}, "
              f"{args.rounds} rounds, median per entry:")
        for name, seconds in med.items():
            print(f"  {name:13s} {seconds / entries * 1e6:8.1f} us/entry")
        print(f"follow / bare (without mask decoding): {med['follow'] / med['bare']:.2f}x (target <= 1.2)")
        print(f"follow with masks decoded: {args.frames / med['follow+masks']:.0f} frames/s "
              f"({args.frames * args.objects / med['follow+masks']:.0f} masks/s)")
        client.close()


if __name__ == "__main__":
    main()
