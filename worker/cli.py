"""`python -m worker`: run a worker; `python -m worker check`: exit 0 if a worker on this host is healthy."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from collections.abc import Callable

from runtime.connection import quick_client
from runtime.logs import EXIT_BROKEN, configure_logging, report
from runtime.settings import Settings
from schemas.errors import VsegError, WorkerBroken

log = logging.getLogger("worker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m worker", description="SAM 2 / SAM 3 video segmentation worker")
    p.add_argument("command", nargs="?", default="run", choices=["run", "check"],
                   help="run (default): process jobs; check: exit 0 if a worker on this host is healthy")
    p.add_argument("--model", dest="model_preset",
                   help="the model this worker serves (VSEG_MODEL): sam2.1-tiny (default), sam2.1-small, "
                        "sam2.1-base-plus, sam2.1-large (points and boxes, jobs from vseg:jobs), or sam3 (text "
                        "prompts, jobs from vseg:jobs:text; --checkpoint DIR of facebook/sam3, or random)")
    p.add_argument("--checkpoint", help="checkpoint .pt path, or 'random' for a smoke test with random weights")
    p.add_argument("--image-size", type=int, help="model input size (default: the model's, 1024; CPU tests use 256)")
    p.add_argument("--device", help="auto (default), cuda, cuda:N or cpu")
    p.add_argument("--burst", action="store_true", help="process what is queued, then exit")
    p.add_argument("--name", help="consumer name (default: host-pid-random)")
    p.add_argument("--lease", type=float, dest="lease_s", help="lease in seconds (VSEG_LEASE_S, default 30)")
    p.add_argument("--max-attempts", type=int, help="runs of a job before it is dead-lettered (VSEG_MAX_ATTEMPTS)")
    p.add_argument("--grace", type=float, dest="grace_s", help="SIGTERM grace period in seconds (VSEG_GRACE_S)")
    p.add_argument("--stall", type=float, dest="stall_s",
                   help="abandon a job with no progress for this many seconds (VSEG_STALL_S, default 300)")
    p.add_argument("--concurrency", type=int,
                   help="jobs held at once (VSEG_CONCURRENCY; default: 1 on the CPU, from free memory on CUDA)")
    p.add_argument("--metrics-port", type=int, dest="metrics_port",
                   help="serve /metrics, /healthz and /readyz on this port (VSEG_METRICS_PORT; default off)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def check(settings: Settings) -> int:
    """0 if some worker on this host refreshed its health key recently and none on it is broken, else 1.

    A worker whose own machinery failed writes `"state": "broken"` and a `"reason"` into its health key:
    that is reported (one line) and is unhealthy even beside live workers, so a supervisor restarts it.
    Redis unreachable or hung: one line on stderr naming the URL (password hidden), exit 1, within seconds.
    """
    import redis

    from runtime.faults import redact_url, redis_fault
    from worker.service.health import HEALTH_TTL_S

    host = socket.gethostname()
    url = redact_url(settings.redis_url)
    client = quick_client(settings)  # about 5 s against a hung Redis, well inside a healthcheck's timeout
    live: list[str] = []
    broken: list[str] = []
    try:
        for key in client.scan_iter(match=settings.keys.worker_health("*"), count=1000):
            raw = client.get(key)
            try:
                health = json.loads(raw) if raw else None
            except ValueError:
                continue
            if not isinstance(health, dict) or health.get("host") != host:
                continue
            name = str(health.get("worker") or (key.decode(errors="replace") if isinstance(key, bytes) else key))
            if health.get("state") == "broken":
                broken.append(f"worker {name} on {host} is broken: {health.get('reason') or 'no reason given'}")
            else:
                live.append(name)
    except redis.RedisError as e:
        fault = redis_fault(e, settings.redis_url)
        log.error("unhealthy: %s", fault if fault is not None else f"Redis at {url} answered with an error: {e}")
        return 1
    finally:
        client.close()
    if broken:
        print(f"unhealthy: {'; '.join(broken)}")
        return 1
    if live:
        print(f"healthy: {len(live)} worker(s) on {host}")
        return 0
    print(f"unhealthy: 0 live worker(s) on {host} (0 broken) in Redis at {url}: none has written its health key "
          f"within the last {HEALTH_TTL_S} s")
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run or check; errors go through `runtime.logs.report`, the CLIs' one error path (one line; exit 1,
    2 for bad settings, EXIT_BROKEN for WorkerBroken, 130 for Ctrl-C)."""
    args = build_parser().parse_args(argv)  # argparse's own errors: its usage line, exit 2
    configure_logging(args.verbose)
    try:
        settings = Settings.load(
            model_preset=args.model_preset, checkpoint=args.checkpoint, image_size=args.image_size, device=args.device,
            lease_s=args.lease_s, max_attempts=args.max_attempts, grace_s=args.grace_s, stall_s=args.stall_s,
            metrics_port=args.metrics_port, concurrency=args.concurrency,
        )
        configure_logging(args.verbose, settings.log_format)
        if args.command == "check":
            return check(settings)
        return serve(settings, name=args.name, burst=args.burst)
    except (VsegError, KeyboardInterrupt) as e:
        return report(e, log, codes={WorkerBroken: EXIT_BROKEN})


def serve(settings: Settings, *, name: str | None, burst: bool) -> int:
    """Load the model and run the worker, with its metrics endpoint (when metrics_port is set) up from the
    start: alive while the model loads, ready once the worker serves."""
    from prometheus_client import CollectorRegistry

    from runtime.connection import worker_client
    from runtime.logs import job_log_context
    from runtime.metrics import MetricsServer
    from worker.model.host import ModelHost
    from worker.service.loop import Worker, default_worker_name

    name = name or default_worker_name()
    registry = CollectorRegistry(auto_describe=True)
    probes: dict[str, Callable[[], tuple[bool, str]]] = {
        "health": lambda: (True, "loading the model"), "ready": lambda: (False, "loading the model")}
    server = None
    if settings.metrics_port:
        server = MetricsServer(registry, host=settings.metrics_host, port=settings.metrics_port,
                               health=lambda: probes["health"](), ready=lambda: probes["ready"]()).start()
    try:
        with job_log_context(worker=name):
            host = ModelHost.load(settings)
            try:
                worker = Worker(settings=settings, segmenter=host, client=worker_client(settings), name=name,
                                registry=registry)
                probes.update(health=worker.health.alive, ready=worker.ready)
                worker.install_signal_handlers()
                worker.run(burst=burst)
            finally:
                host.close()  # the model's process, if it has one
        return 0
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    sys.exit(main())
