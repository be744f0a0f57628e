"""Headroom of the shared streams on one Redis node: why `vseg:jobs`, `vseg:events` and `vseg:dead` stay single
keys on one hash slot each on a Redis Cluster (README "Redis Cluster").

What a job costs the shared keys, from the code: its worker renews its lease every lease_s / 3 (a script on
the job's own slot, then one XCLAIM ... JUSTID on `vseg:jobs`); it adds a progress event to `vseg:events`
every progress_every frames (a live job: at most one a second, worker/output/sink.py), plus `started`, its
object changes and its terminal copy (a few per job); an idle worker polls `vseg:jobs` (XAUTOCLAIM, then
XREADGROUP BLOCK, which costs nothing while it waits). Every other command of a job (its frames, results,
state, fence) goes to the job's own slot, which the cluster spreads over its nodes.

Measured: how many of each shared-key command one redis-server takes a second (redis-benchmark, 50
connections, one command at a time each, as the workers send them; a real progress event's size), against
what 1,000 cameras need; printed as the ratio (the headroom).

    .venv/bin/python bench/bench_shared_streams.py [--requests 200000] [--cameras 1000]
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine  # noqa: E402
from producer.local_redis import RedisServer  # noqa: E402
from runtime.settings import Settings  # noqa: E402
from schemas import messages  # noqa: E402
from schemas.names import EVENTS_MAXLEN, Keys  # noqa: E402

PENDING = 1000  # entries pending in the group (jobs running), the renewals' targets


def benchmark(port: int, requests: int, clients: int, *command: str, rand: int = 0) -> float:
    """Requests a second redis-benchmark gets for `command` (`__rand_int__` replaced below `rand`)."""
    args = ["redis-benchmark", "-p", str(port), "-n", str(requests), "-c", str(clients), "-P", "1", "--csv"]
    if rand:
        args += ["-r", str(rand)]
    out = subprocess.run([*args, *command], check=True, capture_output=True, text=True).stdout
    rows = list(csv.reader(io.StringIO(out)))
    return float(rows[-1][1])


def prepare(client: redis.Redis, keys: Keys) -> None:
    """vseg:jobs with PENDING entries (ids 1-0 .. PENDING-0) all delivered to one consumer."""
    client.xgroup_create(keys.jobs, keys.group, id="0", mkstream=True)
    pipe = client.pipeline(transaction=False)
    for k in range(1, PENDING + 1):
        pipe.xadd(keys.jobs, {"type": "job", "data": b"x" * 400}, id=f"{k}-0")
    pipe.execute()
    client.xreadgroup(keys.group, "w", {keys.jobs: ">"}, count=PENDING)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--cameras", type=int, default=1000)
    args = ap.parse_args()
    if shutil.which("redis-benchmark") is None:
        sys.exit("redis-benchmark is needed (it ships with redis-server)")
    settings, keys = Settings(), Keys()
    progress = messages.encode(messages.Progress("cam-0001-20261201", 123_456, 0, fps=30.0, dropped=12,
                                                 latency_p50_s=0.42, latency_p95_s=0.91, source_outages=0,
                                                 source_down_s=0.0))
    data = progress["data"].hex()[: len(progress["data"])]  # the event's size, printable for the command line
    with tempfile.TemporaryDirectory() as tmp, RedisServer(data_dir=Path(tmp)) as server:
        client = redis.Redis(port=server.port)
        prepare(client, keys)
        lease_ms = int(settings.lease_s * 1000)
        n, c = args.requests, args.clients
        rates = {
            "XADD vseg:events (a progress event)": benchmark(
                server.port, n, c, "XADD", keys.events, "MAXLEN", "~", str(EVENTS_MAXLEN), "*", "type", "progress",
                "data", data),
            "XCLAIM vseg:jobs ... JUSTID (a lease renewal)": benchmark(
                server.port, n, c, "XCLAIM", keys.jobs, keys.group, "w", "0", "__rand_int__-0", "JUSTID", rand=PENDING),
            "XAUTOCLAIM vseg:jobs (an idle worker's poll)": benchmark(
                server.port, n // 4, c, "XAUTOCLAIM", keys.jobs, keys.group, "w2", str(lease_ms), "0-0", "COUNT", "1"),
            "XREADGROUP vseg:jobs > (nothing new)": benchmark(
                server.port, n, c, "XREADGROUP", "GROUP", keys.group, "w3", "COUNT", "1", "STREAMS", keys.jobs, ">"),
        }
        client.close()
    cams = args.cameras
    need = {
        "XADD vseg:events (a progress event)": cams * 1.0,  # a live job: at most one progress event a second
        "XCLAIM vseg:jobs ... JUSTID (a lease renewal)": cams / (settings.lease_s / 3),
    }
    file_jobs_events = cams * 30 / settings.progress_every  # file jobs at 30 frames/s: every progress_every frames
    print(f"machine: {machine()}; one redis-server, {c} connections, one command at a time each")
    print(f"{'command':48} {'node takes /s':>14} {'needed /s':>10} {'headroom':>9}")
    for name, rate in rates.items():
        needed = need.get(name)
        print(f"{name:48} {rate:14,.0f} {needed if needed is not None else '-':>10} "
              f"{f'{rate / needed:.0f}x' if needed else '-':>9}")
    xadd = rates["XADD vseg:events (a progress event)"]
    print(f"{cams} cameras (live jobs, lease {settings.lease_s:g} s, progress at most 1/s): vseg:events needs "
          f"{need['XADD vseg:events (a progress event)']:,.0f} XADD/s ({xadd / need['XADD vseg:events (a progress event)']:.0f}x "
          f"headroom), vseg:jobs {need['XCLAIM vseg:jobs ... JUSTID (a lease renewal)']:,.0f} renewals/s; the same "
          f"number of file jobs at 30 fps: {file_jobs_events:,.0f} events/s ({xadd / file_jobs_events:.0f}x)")


if __name__ == "__main__":
    main()
