"""Every job's lifecycle for a backend: `vseg:events` read through a consumer group of the backend's own.

    for event in client.events("billing", "pod-1"):     # or: client.events(...).run(handler)
        if event.type == "completed": ...

- The group is created if missing (reading from `start`: "$", events after its creation; "0", all kept).
- An event is acknowledged once its handler returned: with `run(handler)`, after `handler(event)` returns;
  iterating, when the loop asks for the next event. An event whose handler raised (or that the loop broke
  out of, or that a crash interrupted) stays pending and is delivered again: first thing when this consumer
  starts again, or to another consumer of the group once it has been pending `claim_idle_s`.
- At-least-once delivery lets a job's terminal entry (`completed`, `failed`, `cancelled`, `dead`) be copied
  to vseg:events twice (a worker that died between writing it and noting the copy). The group hands out
  one: the first copy's entry id is noted per job and group (`Keys.terminal_seen`, kept as long as the
  job's results), and a later copy is acknowledged without being delivered. The same entry delivered
  again (its handler failed) is not a duplicate and is delivered.
- Entries that do not decode are logged and acknowledged (never handed out); `started` (each attempt),
  `progress` and `object` entries are delivered as they are.

`AsyncEvents` is the asyncio twin (`async for event in client.events(...)`, `await events.run(handler)`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio

from runtime.settings import Settings
from schemas import messages
from schemas.errors import SchemaError

log = logging.getLogger(__name__)

READ_COUNT = 64


@dataclass(frozen=True)
class Event:
    """One entry of vseg:events: `msg` is a `started`, `progress`, `object` or terminal message."""

    entry_id: str
    msg: messages.Message

    @property
    def type(self) -> str:
        return self.msg.TYPE.value

    @property
    def job_id(self) -> str:
        return self.msg.job_id

    @property
    def terminal(self) -> bool:
        return isinstance(self.msg, messages.TERMINAL_TYPES)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def decode_event(entry_id: str, fields: Mapping[Any, Any] | None) -> Event | None:
    """The event of an entry, or None (logged) for one that does not decode or was trimmed away."""
    if not fields:
        log.warning("event %s is gone from the stream (trimmed): acknowledging it", entry_id)
        return None
    try:
        return Event(entry_id, messages.decode(fields))
    except SchemaError as e:
        log.error("skipping undecodable event %s: %s", entry_id, e)
        return None


def is_duplicate(event: Event, first_id: str | None) -> bool:
    """Whether a terminal event is a second copy: another entry was handed out first for its job."""
    return first_id is not None and first_id != event.entry_id


class _Group:
    """What both consumers share: names, and the phase (this consumer's own pending entries first)."""

    def __init__(self, settings: Settings, group: str, consumer: str, start: str, claim_idle_s: float) -> None:
        if not group or not consumer:
            raise ValueError("events need a group name and a consumer name, e.g. events('billing', 'pod-1')")
        self.settings = settings
        self.stream = settings.keys.events
        self.group, self.consumer, self.start = group, consumer, start
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.pending_from: str | None = "0"  # None once this consumer's own pending entries are read again

    def seen_key(self, job_id: str) -> str:
        return self.settings.keys.terminal_seen(job_id, self.group)

    def entries(self, reply: Any) -> list[tuple[str, Any]]:
        got = [(_text(i), f) for i, f in (reply[0][1] if reply else [])]
        if self.pending_from is not None:
            self.pending_from = got[-1][0] if got else None
        return got

    def claimed(self, reply: Any) -> list[tuple[str, Any]]:
        """XAUTOCLAIM's entries: those another consumer of the group left pending past claim_idle_s (it died)."""
        return [(_text(i), f) for i, f in reply[1]]

    def gone(self) -> None:
        log.warning("group %s on %s is gone (Redis restarted empty?): creating it again", self.group, self.stream)

    def read_args(self) -> dict[str, Any]:
        if self.pending_from is not None:
            return {"streams": {self.stream: self.pending_from}, "count": READ_COUNT}
        return {"streams": {self.stream: ">"}, "count": READ_COUNT, "block": self.settings.block_ms}


def _is_nogroup(error: redis.ResponseError) -> bool:
    return "NOGROUP" in str(error) or "no such key" in str(error)


class Events:
    """A consumer of vseg:events in a consumer group (see the module doc)."""

    def __init__(self, client: redis.Redis, settings: Settings, group: str, consumer: str, *, start: str = "$",
                 claim_idle_s: float = 60.0) -> None:
        self.client = client
        self.g = _Group(settings, group, consumer, start, claim_idle_s)
        self.ensure_group()

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.g.stream, self.g.group, id=self.g.start, mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def __iter__(self) -> Iterator[Event]:
        while True:
            for entry_id, fields in self._read():
                event = self._admit(entry_id, fields)
                if event is None:
                    continue
                yield event
                self.ack(event)  # the loop asked for the next one: this one was handled

    def run(self, handler: Callable[[Event], object], *, stop: threading.Event | None = None,
            max_events: int | None = None) -> int:
        """Call `handler` for each event, acknowledging it after the handler returns (an exception propagates,
        the event stays pending). Returns the number handled, once `stop` is set or after `max_events`."""
        handled = 0
        while not (stop is not None and stop.is_set()) and (max_events is None or handled < max_events):
            for entry_id, fields in self._read():
                event = self._admit(entry_id, fields)
                if event is not None:
                    handler(event)
                    self.ack(event)
                    handled += 1
                    if max_events is not None and handled >= max_events:
                        break
        return handled

    def ack(self, event: Event) -> None:
        self.client.xack(self.g.stream, self.g.group, event.entry_id)

    def _admit(self, entry_id: str, fields: Any) -> Event | None:
        event = decode_event(entry_id, fields)
        if event is not None and event.terminal:
            key = self.g.seen_key(event.job_id)
            if not self.client.set(key, entry_id, nx=True, ex=self.g.settings.results_ttl_s):
                first = self.client.get(key)
                if is_duplicate(event, None if first is None else _text(first)):
                    log.info("job %s: a second copy of its %s event (%s): not delivered", event.job_id, event.type,
                             entry_id)
                    event = None
        if event is None:
            self.client.xack(self.g.stream, self.g.group, entry_id)
        return event

    def _read(self) -> list[tuple[str, Any]]:
        backoff_s = 0.1
        while True:
            try:
                got = self.g.entries(self.client.xreadgroup(self.g.group, self.g.consumer, **self.g.read_args()))
                if not got and self.g.pending_from is None:  # nothing new: what a dead consumer left pending
                    got = self.g.claimed(self.client.xautoclaim(self.g.stream, self.g.group, self.g.consumer,
                                                                self.g.claim_idle_ms, count=READ_COUNT))
                return got
            except redis.ResponseError as e:
                if not _is_nogroup(e):
                    raise
                self.g.gone()
                self.ensure_group()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("Redis unavailable while reading events (%s); retrying in %.1f s", e, backoff_s)
                time.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)


class AsyncEvents:
    """`Events` for asyncio: `async for event in events`, `await events.run(handler)` (handler sync or async)."""

    def __init__(self, client: redis.asyncio.Redis, settings: Settings, group: str, consumer: str, *,
                 start: str = "$", claim_idle_s: float = 60.0) -> None:
        self.client = client
        self.g = _Group(settings, group, consumer, start, claim_idle_s)
        self._ready = False

    async def ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.g.stream, self.g.group, id=self.g.start, mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._ready = True

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            for entry_id, fields in await self._read():
                event = await self._admit(entry_id, fields)
                if event is None:
                    continue
                yield event
                await self.ack(event)

    async def run(self, handler: Callable[[Event], object | Awaitable[object]], *, stop: asyncio.Event | None = None,
                  max_events: int | None = None) -> int:
        handled = 0
        while not (stop is not None and stop.is_set()) and (max_events is None or handled < max_events):
            for entry_id, fields in await self._read():
                event = await self._admit(entry_id, fields)
                if event is not None:
                    result = handler(event)
                    if isinstance(result, Awaitable):
                        await result
                    await self.ack(event)
                    handled += 1
                    if max_events is not None and handled >= max_events:
                        break
        return handled

    async def ack(self, event: Event) -> None:
        await self.client.xack(self.g.stream, self.g.group, event.entry_id)

    async def _admit(self, entry_id: str, fields: Any) -> Event | None:
        event = decode_event(entry_id, fields)
        if event is not None and event.terminal:
            key = self.g.seen_key(event.job_id)
            if not await self.client.set(key, entry_id, nx=True, ex=self.g.settings.results_ttl_s):
                first = await self.client.get(key)
                if is_duplicate(event, None if first is None else _text(first)):
                    log.info("job %s: a second copy of its %s event (%s): not delivered", event.job_id, event.type,
                             entry_id)
                    event = None
        if event is None:
            await self.client.xack(self.g.stream, self.g.group, entry_id)
        return event

    async def _read(self) -> list[tuple[str, Any]]:
        if not self._ready:
            await self.ensure_group()
        backoff_s = 0.1
        while True:
            try:
                reply = await self.client.xreadgroup(self.g.group, self.g.consumer, **self.g.read_args())
                got = self.g.entries(reply)
                if not got and self.g.pending_from is None:
                    got = self.g.claimed(await self.client.xautoclaim(self.g.stream, self.g.group, self.g.consumer,
                                                                      self.g.claim_idle_ms, count=READ_COUNT))
                return got
            except redis.ResponseError as e:
                if not _is_nogroup(e):
                    raise
                self.g.gone()
                await self.ensure_group()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("Redis unavailable while reading events (%s); retrying in %.1f s", e, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
