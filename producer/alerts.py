"""`python -m producer alerts`: the events consumer, a process of its own that turns objects' masks into zone and
line events (`zone_enter`, `zone_leave`, `line_cross`, `dwell`) on `vseg:alerts` and each job's
`vseg:job:{id}:alerts`, and optionally POSTs them to a webhook (producer/webhook.py).

It never slows a worker down: it only reads what workers publish, through consumer groups of its own (group
`--group`, default `alerts`):
- jobs are found through the group on `vseg:events` (each `started` entry; jobs started while the process was
  down come on its restart) and noted in `Keys.alerts_jobs(group)`, so a restart follows them again; when
  the group is made (the first start), the jobs already running (their `started` entries among the last
  ADOPT_SCAN of `vseg:events`) are followed too, from their newest frame on: a camera running for days
  gets its events from now, not its past replayed;
- each job's result stream is read through the group on that stream (producer/alert_follow.py: judged in
  order, published, the judge's state saved, then acknowledged; at least once, with an idempotency key).

One loop takes the jobs in turn, one XREADGROUP per stream and none blocking (a Redis Cluster holds different
jobs' streams on different slots); when nothing came, it waits on `vseg:events` for up to IDLE_MS. Redis
down or full is waited out with backoff (every job then reloads its saved state and reads its pending
entries again); a group gone with an emptied Redis is made again. SIGTERM or SIGINT stops it cleanly (exit 0).
Run one process per group: two would split each stream's entries between them. Metrics (counts per zone and
event type, webhook deliveries, jobs followed), /healthz and /readyz on --metrics-port (metrics_port).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge

from producer.alert_follow import BUSY, ENDED, GONE, JobFollower
from producer.webhook import WebhookSender, check_url
from runtime.connection import connect
from runtime.faults import is_redis_full, redact_url
from runtime.metrics import MetricsServer
from runtime.settings import Settings
from schemas import messages
from schemas.alerts import AlertEvent
from schemas.errors import ConfigError, SchemaError
from schemas.names import TERMINAL_STATES

log = logging.getLogger(__name__)

CONSUMER = "main"  # one consumer a group: a restart reads the pending entries its predecessor left
IDLE_MS = 100  # how long an idle round waits on vseg:events
ADOPT_SCAN = 10_000  # entries of vseg:events read back for the jobs already running when the group is made
STATUS_EVERY_S = 60.0
OUTCOMES = ("delivered", "retried", "given_up")


class AlertMetrics:
    """The alerts process's Prometheus metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.events = Counter("vseg_zone_events", "Zone and line events published, by zone (or line) and type",
                              ["zone", "type"], registry=self.registry)
        self.deliveries = Counter("vseg_webhook_deliveries", "Webhook POSTs of events, by outcome (retried: one "
                                  "failed POST to be tried again)", ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:
            self.deliveries.labels(outcome=outcome)
        self.jobs = Gauge("vseg_alerts_jobs_followed", "Jobs whose result streams the events consumer follows",
                          registry=self.registry)


class AlertsService:
    """The events consumer's loop (see the module doc): `run(stop)` until `stop` is set."""

    def __init__(self, settings: Settings, *, group: str = "alerts", client: redis.Redis | None = None,
                 metrics: AlertMetrics | None = None, on_event: Callable[[AlertEvent], None] | None = None) -> None:
        self.settings, self.group = settings, group
        self.client = client if client is not None else connect(settings)
        self.metrics = metrics if metrics is not None else AlertMetrics()
        self.on_event = on_event
        self.keys = settings.keys
        self.registry_key = self.keys.alerts_jobs(group)
        self.followers: dict[str, JobFollower] = {}
        self.events_from = "0"  # this consumer's pending entries on vseg:events first
        self.started = False
        self.healthy_at = time.monotonic()
        self.redis_ok = False
        self.published = 0
        self.webhook: threading.Thread | None = None  # the webhook sender's thread, when there is one

    def run(self, stop: threading.Event) -> None:
        backoff_s, down_since = 0.1, None
        status_at = time.monotonic()
        while not stop.is_set():
            try:
                busy = self._round()
                self._discover(None if busy else IDLE_MS)  # new jobs; when idle, the short wait for anything new
                if down_since is not None:
                    log.info("Redis at %s answers again after %.0f s: going on", redact_url(self.settings.redis_url),
                             time.monotonic() - down_since)
                backoff_s, down_since, self.redis_ok = 0.1, None, True
                self.healthy_at = time.monotonic()
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as e:
                if isinstance(e, redis.ResponseError) and not is_redis_full(e):
                    raise
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("Redis at %s %s (%s): waiting it out, then every job resumes from its saved state",
                                redact_url(self.settings.redis_url), "is full" if is_redis_full(e) else
                                "is unavailable", e)
                self._reset()
                self.healthy_at = time.monotonic()
                stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
            if time.monotonic() - status_at >= STATUS_EVERY_S:
                status_at = time.monotonic()
                log.info("following %d jobs; %d events published since the start", len(self.followers),
                         self.published)
        log.info("stopped: following %d jobs, %d events published", len(self.followers), self.published)

    def _reset(self) -> None:
        self.redis_ok, self.started, self.events_from = False, False, "0"
        for follower in self.followers.values():
            follower.reset()

    def _start(self) -> None:
        """The group on vseg:events (made at its end the first time: jobs started from now on), then the jobs the
        group already follows."""
        try:
            self.client.xgroup_create(self.keys.events, self.group, id="$", mkstream=True)
            self._adopt_running()
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        for raw in cast(set[bytes], self.client.smembers(self.registry_key)):
            self._follow(raw.decode())
        self.started = True

    def _adopt_running(self) -> None:
        """The group is new: note the jobs running now (started, not ended), each one's group on its result
        stream made at its newest entry, so that they are judged from now on."""
        adopted: list[str] = []
        for _, fields in cast(list[tuple[bytes, dict[bytes, bytes]]],
                              self.client.xrevrange(self.keys.events, count=ADOPT_SCAN)):
            if fields.get(b"type") != b"started":
                continue
            try:
                job_id = messages.decode(fields).job_id
            except SchemaError:
                continue
            state = cast(bytes | None, self.client.hget(self.keys.job(job_id), "state"))
            if job_id in adopted or state is None or state.decode() in set(TERMINAL_STATES):
                continue
            try:
                self.client.xgroup_create(self.keys.results(job_id), self.group, id="$")
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e) and "requires the key to exist" not in str(e):
                    raise
            self.client.sadd(self.registry_key, job_id)
            adopted.append(job_id)
        if adopted:
            log.info("group %s is new: following the %d job(s) already running from their newest frame on: %s",
                     self.group, len(adopted), ", ".join(adopted[:20]) + (" ..." if len(adopted) > 20 else ""))

    def _round(self) -> bool:
        """Every job's step once: whether any job had entries."""
        if not self.started:
            self._start()
        busy = False
        for job_id, follower in list(self.followers.items()):
            outcome = follower.step()
            busy = busy or outcome == BUSY
            if outcome in (ENDED, GONE):
                self.client.srem(self.registry_key, job_id)
                del self.followers[job_id]
                self.metrics.jobs.set(len(self.followers))
                log.info("job %s: %s; no longer followed", job_id, "ended" if outcome == ENDED else
                         "its keys are gone (expired, or Redis was emptied)")
        return busy

    def _discover(self, block_ms: int | None) -> bool:
        """The jobs that started (`started` entries on vseg:events); the others are acknowledged unread."""
        block = block_ms if self.events_from == ">" else None
        try:
            reply = self.client.xreadgroup(self.group, CONSUMER, {self.keys.events: self.events_from}, count=64,
                                           block=block)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            log.warning("group %s on %s is gone (Redis restarted empty?): making it again", self.group,
                        self.keys.events)
            self.started = False
            return True
        entries = [(i.decode() if isinstance(i, bytes) else str(i), f) for i, f in _entries(reply)]
        if self.events_from != ">":
            self.events_from = entries[-1][0] if entries else ">"
        for entry_id, fields in entries:
            if fields and fields.get(b"type") == b"started":
                try:
                    job_id = messages.decode(fields).job_id
                except SchemaError as e:
                    log.error("skipping undecodable event %s: %s", entry_id, e)
                else:
                    self.client.sadd(self.registry_key, job_id)
                    self._follow(job_id)
        if entries:
            self.client.xack(self.keys.events, self.group, *[i for i, _ in entries])
        return bool(entries)

    def _follow(self, job_id: str) -> None:
        if job_id in self.followers:
            return
        self.followers[job_id] = JobFollower(self.client, self.settings, job_id, group=self.group, consumer=CONSUMER,
                                             on_event=self._published)
        self.metrics.jobs.set(len(self.followers))
        log.info("job %s: following its results", job_id)

    def _published(self, event: AlertEvent) -> None:
        self.published += 1
        self.metrics.events.labels(zone=event.zone, type=event.type).inc()
        detail = (f" {event.direction}" if event.direction else "") + (
            f" after {event.dwell_s:.1f} s" if event.dwell_s is not None else "")
        log.info("job %s: object %d %s %s%s at frame %d (t %.2f s) [%s]", event.job_id, event.obj_id, event.type,
                 event.zone, detail, event.frame_idx, event.t_s, event.key)
        if self.on_event is not None:
            self.on_event(event)

    def health(self) -> tuple[bool, str]:
        age_s = time.monotonic() - self.healthy_at
        limit_s = max(30.0, 3 * self.settings.socket_timeout_s)
        return age_s < limit_s, f"loop last turned {age_s:.1f} s ago"

    def ready(self) -> tuple[bool, str]:
        if self.webhook is not None and not self.webhook.is_alive():
            return False, "the webhook sender's thread has died (its error is in the log)"
        return self.redis_ok, f"following {len(self.followers)} jobs" if self.redis_ok else "Redis does not answer"


def add_alerts_parser(subparsers: Any) -> None:
    """`alerts`: the events consumer."""
    a = subparsers.add_parser("alerts", help="judge every job's objects against its zones and lines; publish zone_enter, "
                                             "zone_leave, line_cross and dwell events on vseg:alerts (until SIGTERM)")
    a.add_argument("--webhook", metavar="URL", help="also POST each event to URL, as JSON (signed with "
                   "VSEG_WEBHOOK_SECRET, retried with backoff)")
    a.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve metrics, /healthz and /readyz on PORT (default VSEG_METRICS_PORT; 0: none)")
    a.add_argument("--group", default="alerts", metavar="NAME",
                   help="the consumer groups' name (default alerts): one process per group; a restart goes on "
                        "where the group stopped")


def run_alerts(args: argparse.Namespace, settings: Settings) -> int:
    """Run the events consumer until SIGTERM or SIGINT (exit 0)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", args.group):
        raise ConfigError(f"--group must be 1-64 letters, digits, '_', '.', '-', but got {args.group!r}")
    if args.metrics_port is not None:
        if not 0 <= args.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port must be 0..65535 (0: none), but got {args.metrics_port}")
        settings = dataclasses.replace(settings, metrics_port=args.metrics_port)
    url = check_url(args.webhook, settings.webhook_secret) if args.webhook else None
    stop = threading.Event()
    service = AlertsService(settings, group=args.group)
    server = None
    if settings.metrics_port:
        server = MetricsServer(service.metrics.registry, host=settings.metrics_host, port=settings.metrics_port,
                               health=service.health, ready=service.ready).start()
    sender = None
    if url is not None:
        sender = WebhookSender(connect(settings), settings, url, group=f"{args.group}-webhook",
                               on_outcome=lambda outcome: service.metrics.deliveries.labels(outcome=outcome).inc())

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if sender is not None:
            try:
                sender.ensure_group()  # before any event is published: the first start sends them all
            except (redis.ConnectionError, redis.TimeoutError):
                pass  # Redis down: the sender's thread makes the group once it answers
            service.webhook = sender.start(stop)
        log.info("alerts: group %s on %s%s", args.group, redact_url(settings.redis_url),
                 f", webhook {redact_url(url)}" if url else "")
        service.run(stop)
        if service.webhook is not None:
            service.webhook.join(settings.webhook_timeout_s + 5)
    finally:
        stop.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.close()
    return 0


def _entries(reply: Any) -> list[tuple[Any, Any]]:
    """XREADGROUP's entries of its one stream: (id, fields; None or empty when trimmed away)."""
    return list(cast(list[tuple[Any, list[tuple[Any, Any]]]], reply)[0][1]) if reply else []
