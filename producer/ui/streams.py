"""The viewer's two event streams (server-sent events), as async generators of the SSE wire text.

`job_events` (GET /api/jobs/{id}/stream): one XREAD BLOCK over the job's result stream and its alerts stream
(both carry the job's hash tag, so one command on a Redis Cluster too), a second at most, sending each entry
as JSON (producer/ui/entries.py) with the `Cursor` as its event id; and once a second the job's hash, sent
as `figures` (and `zones`) when it changed. The job's processed rate (`fps` in the figures) is measured here
from its frames done less those skipped over the last few seconds, as `python -m producer cameras` does: the
hash holds every other figure (the worker copies its progress events' figures there). It ends when the job's
hash is gone (expired: a `gone` event), when the server stops, or when the client leaves (Starlette cancels
it); a Redis outage is an `error` event, then it goes on.

`overview_events` (GET /api/overview/stream): the cameras and recent jobs (data.overview) each time they
change, read once a second at most for every viewer together (`OverviewFeed`).

A comment line goes out after 15 s of silence, so that proxies keep the connection open.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio.to_thread
import redis
import redis.asyncio

from producer.ui.data import figures, overview
from producer.ui.entries import Cursor, alert_json, before, result_json, to_json
from producer.zones import ZoneSet
from runtime.faults import redis_fault
from runtime.settings import Settings
from schemas import messages
from schemas.errors import SchemaError, ZoneError
from schemas.names import STARTED_ENTRY_ID, TERMINAL_ENTRY_ID

FIGURES_EVERY_S = 1.0
PING_AFTER_S = 15.0
FPS_WINDOW_S = 5.0
READ_COUNT = 256
MAX_TAIL = 10_000
Entries = list[tuple[bytes, dict[bytes, bytes]]]


def sse(doc: dict[str, Any], event_id: str | None = None) -> bytes:
    head = b"id: " + event_id.encode() + b"\n" if event_id else b""
    return head + b"data: " + to_json(doc) + b"\n\n"


def _problem(error: redis.RedisError, settings: Settings) -> bytes:
    fault = redis_fault(error, settings.redis_url)
    return sse({"type": "error", "error": str(fault or f"Redis refused a read: {error}") + "; retrying"})


class _Rate:
    """Frames processed per second over the last FPS_WINDOW_S (None until a second has passed)."""

    def __init__(self) -> None:
        self.samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)

    def add(self, now: float, processed: int) -> float | None:
        self.samples.append((now, processed))
        while len(self.samples) > 2 and now - self.samples[1][0] >= FPS_WINDOW_S:
            self.samples.popleft()
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return round((n1 - n0) / (t1 - t0), 2) if t1 - t0 >= 1.0 else None


async def _start(r: redis.asyncio.Redis, settings: Settings, job_id: str, tail: int) -> tuple[Cursor, bytes]:
    """A cursor `tail` entries before the end of each stream, and the job's `started` entry if that skips it."""
    keys = settings.keys
    newest = cast(Entries, await r.xrevrange(keys.results(job_id), max=f"({TERMINAL_ENTRY_ID}", count=tail))
    alerts = cast(Entries, await r.xrevrange(keys.job_alerts(job_id), count=tail))
    cursor = Cursor(before(newest[-1][0].decode()) if newest else "0-0",
                    before(alerts[-1][0].decode()) if alerts else "0-0")
    started = b""
    if newest and newest[-1][0].decode() != STARTED_ENTRY_ID:
        for raw_id, fields in cast(Entries, await r.xrange(keys.results(job_id), STARTED_ENTRY_ID, STARTED_ENTRY_ID)):
            doc = _result(raw_id.decode(), fields)
            started = sse(doc) if doc is not None else b""
    return cursor, started


def _result(entry_id: str, fields: dict[bytes, bytes]) -> dict[str, Any] | None:
    try:
        return result_json(entry_id, messages.decode(fields))
    except SchemaError:
        return None


async def job_events(r: redis.asyncio.Redis, settings: Settings, job_id: str, cursor: Cursor | None, tail: int | None,
                     stopping: threading.Event) -> AsyncIterator[bytes]:
    """The job stream's SSE text (the module doc); `cursor` None: from the start, or `tail` entries back."""
    keys = settings.keys
    results, alerts = keys.results(job_id), keys.job_alerts(job_id)
    yield b"retry: 2000\n\n"
    if cursor is None and tail:
        cursor, started = await _start(r, settings, job_id, min(tail, MAX_TAIL))
        if started:
            yield started
    cursor = cursor or Cursor()
    block_ms = max(1, min(settings.block_ms, 1000))
    rate = _Rate()
    sent_figures: bytes | None = None
    sent_zones: str | None = None
    figures_due = last_sent = 0.0
    while not stopping.is_set():
        now = time.monotonic()
        out: list[bytes] = []
        try:
            if now >= figures_due:
                figures_due = now + FIGURES_EVERY_S
                fields = {k.decode(): v.decode(errors="replace")
                          for k, v in cast(dict[bytes, bytes], await r.hgetall(keys.job(job_id))).items()}
                if not fields:
                    yield sse({"type": "gone", "error": f"job {job_id} is no longer in Redis (its results expired)"})
                    return
                shown = figures(fields)
                shown["fps"] = rate.add(now, int(shown["frames_done"] or 0) - int(shown["dropped"] or 0))
                body = to_json(shown)
                if body != sent_figures:
                    sent_figures = body
                    out.append(sse({"type": "figures", **shown}))
                if fields.get("zones", "") != sent_zones:
                    sent_zones = fields.get("zones", "")
                    out.append(sse({"type": "zones", "zones": _zones(sent_zones)}))
            reply = cast(list[tuple[bytes, Entries]], await r.xread(
                {results: cursor.results, alerts: cursor.alerts}, count=READ_COUNT, block=block_ms))
        except redis.RedisError as e:
            yield _problem(e, settings)
            await asyncio.sleep(1.0)
            continue
        for stream, entries in reply or []:
            is_alerts = stream.decode() == alerts
            for raw_id, fields_ in entries:
                entry_id = raw_id.decode()
                if is_alerts:
                    cursor = Cursor(cursor.results, entry_id)
                    doc = alert_json(entry_id, fields_)
                else:
                    cursor = Cursor(entry_id, cursor.alerts)
                    doc = _result(entry_id, fields_)
                if doc is not None:
                    out.append(sse(doc, cursor.text()))
        if out:
            last_sent = time.monotonic()
            yield b"".join(out)
        elif time.monotonic() - last_sent >= PING_AFTER_S:
            last_sent = time.monotonic()
            yield b": ping\n\n"


def _zones(text: str) -> dict[str, Any]:
    try:
        return ZoneSet.from_json(text).to_dict()
    except ZoneError:
        return ZoneSet().to_dict()


class OverviewFeed:
    """One overview snapshot a second at most, shared by every viewer of the page of cameras and jobs; read
    by a worker thread (a few quick commands, none blocking) with the app's client."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client, self.settings = client, settings
        self._lock: asyncio.Lock | None = None
        self._at = float("-inf")
        self._doc: dict[str, Any] = {}

    async def snapshot(self) -> dict[str, Any]:
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if time.monotonic() - self._at >= FIGURES_EVERY_S:
                self._doc = await anyio.to_thread.run_sync(overview, self.client, self.settings)
                self._at = time.monotonic()
            return self._doc


async def overview_events(feed: OverviewFeed, settings: Settings, stopping: threading.Event) -> AsyncIterator[bytes]:
    yield b"retry: 2000\n\n"
    sent: bytes | None = None
    last_sent = time.monotonic()
    while not stopping.is_set():
        try:
            doc = await feed.snapshot()
        except redis.RedisError as e:
            yield _problem(e, settings)
            await asyncio.sleep(1.0)
            continue
        body = to_json({k: v for k, v in doc.items() if k != "at"})
        if body != sent:
            sent, last_sent = body, time.monotonic()
            yield sse({"type": "overview", **doc})
        elif time.monotonic() - last_sent >= PING_AFTER_S:
            last_sent = time.monotonic()
            yield b": ping\n\n"
        await asyncio.sleep(FIGURES_EVERY_S)
