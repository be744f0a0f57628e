"""The queue seen from Redis, for the whole system: `python -m producer stats` prints it, `--serve PORT`
exports it to Prometheus, read afresh at each scrape.

The jobs stream's figures come from one MULTI/EXEC of XINFO GROUPS, XPENDING (summary form), XLEN and TIME
on the node that holds it (a consistent snapshot, O(1) in the queue's size; nothing is scanned), the
dead letters' and events' lengths from one XLEN each (other slots of a Redis Cluster):

    length        XLEN vseg:jobs: the jobs in flight (a worker deletes a job's entry when it ends it)
    pending       delivered to a worker and not yet acknowledged (running, or held by a dead worker
                  until its lease expires and another worker reclaims it)
    waiting       not yet delivered to any worker: length - pending
    lag           the consumer group's lag as Redis reports it (XINFO GROUPS, Redis >= 7); where Redis
                  cannot tell (before 7, or a job cancelled while queued left a deleted entry ahead of the
                  group) it is `waiting`, which for this stream is the same count (lag_source says which).
                  With no consumer group yet (no worker ever started) every entry is lag.
    oldest pending age   seconds since the oldest pending job was enqueued: the timestamp of the smallest
                  pending entry id (an entry keeps its id across retries and reclaims), against Redis's own
                  clock (TIME), so the host clocks do not matter; 0 when nothing is pending
    consumers     consumers in the group (each worker that ever read, until removed)
    dead letters  XLEN vseg:dead
    events        XLEN vseg:events (trimmed to about EVENTS_MAXLEN)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from runtime.connection import node_client, quick_client
from runtime.faults import redact_url, redis_fault
from runtime.metrics import MetricsServer
from runtime.settings import Settings
from schemas.names import Keys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueStats:
    """The queue's figures at one instant (see the module's docstring)."""

    length: int
    pending: int
    waiting: int
    lag: int
    lag_source: str  # "redis" (XINFO GROUPS) or "computed" (waiting: Redis could not tell)
    oldest_pending_s: float
    consumers: int
    dead_letters: int
    events: int
    group_exists: bool
    consumer_pending: dict[str, int] = field(default_factory=dict)  # consumer name -> its pending entries


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ms(entry_id: Any) -> int:
    return int(_str(entry_id).split("-", 1)[0])


def _field(mapping: dict[Any, Any], name: str) -> Any:
    return mapping.get(name, mapping.get(name.encode()))


def _missing(reply: object, *markers: str) -> bool:
    """True if `reply` is the error of a key or group that does not exist yet; other errors raise."""
    if isinstance(reply, Exception):
        if isinstance(reply, redis.ResponseError) and any(m in str(reply) for m in markers):
            return True
        raise reply
    return False


def collect_stats(client: redis.Redis, keys: Keys) -> QueueStats:
    """The queue's figures (see the module doc); redis.RedisError if Redis does not answer."""
    pipe = node_client(client, keys.jobs).pipeline(transaction=True)  # one key, its node's own clock
    pipe.time()
    pipe.xlen(keys.jobs)
    pipe.xinfo_groups(keys.jobs)
    pipe.xpending(keys.jobs, keys.group)
    now, length, groups, summary = pipe.execute(raise_on_error=False)
    for reply in (now, length):
        if isinstance(reply, Exception):
            raise reply
    dead, events = int(client.xlen(keys.dead)), int(client.xlen(keys.events))
    now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
    group: dict[Any, Any] | None = None
    if not _missing(groups, "no such key"):
        group = next((g for g in groups if _str(_field(g, "name")) == keys.group), None)
    if _missing(summary, "NOGROUP", "no such key") or group is None:
        # no worker has created the group yet: nothing delivered, every entry waits
        return QueueStats(length=length, pending=0, waiting=length, lag=length, lag_source="computed",
                          oldest_pending_s=0.0, consumers=0, dead_letters=dead, events=events, group_exists=False)
    pending = int(summary["pending"])
    waiting = max(0, length - pending)
    redis_lag = _field(group, "lag")
    oldest = max(0.0, (now_ms - _ms(summary["min"])) / 1000) if pending and summary.get("min") else 0.0
    consumer_pending = {_str(c["name"]): int(c["pending"]) for c in summary.get("consumers") or ()}
    return QueueStats(
        length=length, pending=pending, waiting=waiting,
        lag=int(redis_lag) if redis_lag is not None else waiting,
        lag_source="redis" if redis_lag is not None else "computed",
        oldest_pending_s=oldest, consumers=int(_field(group, "consumers") or 0), dead_letters=dead,
        events=events, group_exists=True, consumer_pending=consumer_pending,
    )


def format_stats(stats: QueueStats, keys: Keys, url: str) -> str:
    """The figures as a table for a person."""
    group = keys.group if stats.group_exists else f"{keys.group} (not created yet: no worker has started)"
    lag_note = "XINFO GROUPS" if stats.lag_source == "redis" else "computed: Redis cannot tell, = waiting"
    rows = [
        ("waiting", f"{stats.waiting}", "jobs not yet delivered to a worker"),
        ("pending", f"{stats.pending}", "delivered to a worker, not yet acknowledged"),
        ("lag", f"{stats.lag}", f"consumer-group lag ({lag_note})"),
        ("oldest pending", f"{stats.oldest_pending_s:.1f} s", "since the oldest pending job was enqueued"),
        ("in flight", f"{stats.length}", f"entries on {keys.jobs} (waiting + pending)"),
        ("consumers", f"{stats.consumers}", f"in group {keys.group}"),
        ("dead letters", f"{stats.dead_letters}", f"entries on {keys.dead}"),
        ("events", f"{stats.events}", f"entries on {keys.events}"),
    ]
    lines = [f"queue {keys.jobs}, group {group}, at {redact_url(url)}"]
    lines += [f"  {name:<15} {value:>9}   {note}" for name, value, note in rows]
    if stats.consumer_pending:
        lines.append("  pending by consumer:")
        lines += [f"    {name:<30} {n:>6}" for name, n in sorted(stats.consumer_pending.items())]
    return "\n".join(lines)


# metric name -> (help, QueueStats attribute); vseg_queue_up and vseg_queue_consumer_pending come on top
GAUGES: dict[str, tuple[str, str]] = {
    "vseg_queue_length": ("Job entries on the jobs stream: waiting plus pending (XLEN)", "length"),
    "vseg_queue_pending": ("Jobs delivered to a worker and not yet acknowledged (XPENDING)", "pending"),
    "vseg_queue_waiting": ("Jobs not yet delivered to any worker (XLEN - pending)", "waiting"),
    "vseg_queue_lag": ("Consumer-group lag: entries not yet delivered to the group (XINFO GROUPS lag; "
                       "where Redis cannot tell, the waiting count)", "lag"),
    "vseg_queue_oldest_pending_seconds": ("Seconds since the oldest pending job was enqueued (0: none pending)",
                                          "oldest_pending_s"),
    "vseg_queue_consumers": ("Consumers in the workers' consumer group", "consumers"),
    "vseg_dead_letters": ("Entries on the dead-letter stream (XLEN)", "dead_letters"),
    "vseg_events_length": ("Entries on the lifecycle events stream (XLEN)", "events"),
}


class QueueCollector(Collector):
    """The queue's gauges, read from Redis at each scrape. Redis down: vseg_queue_up 0 and nothing else (the
    scrape itself succeeds), with one warning per outage in the log."""

    def __init__(self, client: redis.Redis, keys: Keys, url: str) -> None:
        self.client = client
        self.keys = keys
        self.url = url
        self._down = False

    def describe(self) -> Iterable[Any]:
        return []  # registering must not query Redis

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("vseg_queue_up", "1 if Redis answered this scrape's queue queries, else 0")
        try:
            stats = collect_stats(self.client, self.keys)
        except redis.RedisError as e:
            if not self._down:
                fault = redis_fault(e, self.url)
                log.warning("queue metrics: %s", fault if fault is not None else f"Redis refused a command: {e}")
            self._down = True
            up.add_metric([], 0)
            yield up
            return
        if self._down:
            log.info("queue metrics: Redis at %s answers again", redact_url(self.url))
        self._down = False
        up.add_metric([], 1)
        yield up
        for name, (help_text, attr) in GAUGES.items():
            yield GaugeMetricFamily(name, help_text, value=float(getattr(stats, attr)))
        by_consumer = GaugeMetricFamily("vseg_queue_consumer_pending", "Pending jobs held by each consumer",
                                        labels=["consumer"])
        for consumer, n in sorted(stats.consumer_pending.items()):
            by_consumer.add_metric([consumer], n)
        yield by_consumer


def stats_registry(client: redis.Redis, settings: Settings) -> CollectorRegistry:
    """A registry holding only the queue's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(client, settings.keys, settings.redis_url))
    return registry


def redis_ready(client: redis.Redis, url: str) -> tuple[bool, str]:
    """The exporter's readiness: Redis answers a PING."""
    try:
        client.ping()
    except redis.RedisError as e:
        fault = redis_fault(e, url)
        return False, str(fault) if fault is not None else f"Redis at {redact_url(url)} refused PING: {e}"
    return True, f"Redis at {redact_url(url)} answers"


def serve_stats(settings: Settings, host: str, port: int) -> MetricsServer:
    """Start the exporter: /metrics (the queue's gauges), /healthz (it runs), /readyz (Redis answers).
    It starts whether or not Redis answers, and follows it going down and coming back."""
    client = quick_client(settings)
    ok, reason = redis_ready(client, settings.redis_url)
    if not ok:
        log.warning("%s; serving vseg_queue_up 0 until it answers", reason)
    server = MetricsServer(stats_registry(client, settings), host=host, port=port,
                           health=lambda: (True, "serving queue metrics"),
                           ready=lambda: redis_ready(client, settings.redis_url))
    return server.start()
