"""`AsyncClient`: the asyncio twin of `producer.client.Client`, with the same names.

    from producer import AsyncClient, Prompt

    async with AsyncClient.from_url("redis://localhost:6379/0") as client:
        job = await client.submit("match.mp4", prompts=[Prompt.point(1, 320, 240)])
        async for item in job.follow():
            ...
        async for event in client.events("billing", "pod-1"):
            ...

Reading (`follow`, `wait`, `events`) is native asyncio (redis.asyncio): one task per followed job, no
thread. Submitting and commands (`submit`, `prompt`, `remove`, `cancel`, `stop`, `status`) run the sync
client's code in a worker thread (`asyncio.to_thread`): the same checks, the same errors, one implementation;
a file's decoding and a live ingest go on in their own threads as with the sync client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, cast

import redis
import redis.asyncio

from producer import control, running_prompts
from producer.client import APPEAR_S, XREAD_COUNT, Client, Job, redis_faults
from producer.client_items import BEFORE_TERMINAL, TERMINAL, Item, JobStatus, ResultCursor, Terminal
from producer.events import AsyncEvents
from producer.submission import Submitted
from runtime.connection import connect_async
from runtime.faults import redact_url
from runtime.settings import Settings
from schemas.errors import UnknownJobError
from schemas.prompts import ObjectPrompt

log = logging.getLogger(__name__)


class AsyncClient:
    """One asyncio Redis connection pool, plus a sync client for submits and commands (run in threads)."""

    def __init__(self, settings: Settings | None = None, *, redis_url: str | None = None,
                 redis_client: redis.asyncio.Redis | None = None) -> None:
        self.sync = Client(settings, redis_url=redis_url)
        self.settings = self.sync.settings
        self.redis: redis.asyncio.Redis = redis_client or connect_async(self.settings)

    @classmethod
    def from_url(cls, redis_url: str, **settings: Any) -> AsyncClient:
        return cls(Settings.load(redis_url=redis_url, **settings))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(self, video: str | Path, prompts: Sequence[ObjectPrompt] = (), **options: Any) -> AsyncJob:
        """`Client.submit`: returns once the job is enqueued; raises its errors."""
        job = await asyncio.to_thread(self.sync.submit, video, prompts, **options)
        return AsyncJob(self, job)

    def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, self.sync.job(job_id))

    def events(self, group: str, consumer: str, *, start: str = "$", claim_idle_s: float = 60.0) -> AsyncEvents:
        return AsyncEvents(self.redis, self.settings, group, consumer, start=start, claim_idle_s=claim_idle_s)

    async def close(self, timeout_s: float | None = None) -> None:
        """`Client.close`, then the connections."""
        await asyncio.to_thread(self.sync.close, timeout_s)
        await self.redis.aclose()
        self.sync.redis.close()

    aclose = close


class AsyncJob:
    """`Job` for asyncio: `async for item in job.follow()`, `await job.wait()`, `await job.prompt(...)`..."""

    def __init__(self, client: AsyncClient, job: Job) -> None:
        self.client = client
        self.sync = job
        self.id = job.id

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"

    async def follow(self, *, timeout_s: float | None = None, appear_s: float = APPEAR_S) -> AsyncIterator[Item]:
        """`Job.follow`, without a thread."""
        await self._appear(appear_s)
        cursor = ResultCursor(self.client.settings.keys.results(self.id))
        last_seen = time.monotonic()
        while not cursor.done:
            reply = await self._xread(cursor.stream, cursor.last_id)
            if not reply:
                if timeout_s is not None and time.monotonic() - last_seen > timeout_s:
                    raise TimeoutError(f"no result for job {self.id} in {timeout_s:g} s")
                continue
            last_seen = time.monotonic()
            for item in cursor.take(reply[0][1]):
                yield item

    async def wait(self, timeout_s: float | None = None, *, appear_s: float = APPEAR_S) -> Terminal:
        """`Job.wait`: the terminal entry."""
        started = time.monotonic()
        await self._appear(appear_s)
        cursor = ResultCursor(self.client.settings.keys.results(self.id), last_id=BEFORE_TERMINAL)
        while True:
            reply = await self._xread(cursor.stream, cursor.last_id)
            for item in cursor.take(reply[0][1] if reply else ()):
                if isinstance(item, TERMINAL):
                    return item
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise TimeoutError(f"job {self.id} has not ended within {timeout_s:g} s")

    async def status(self) -> JobStatus:
        return await asyncio.to_thread(self.sync.status)

    async def prompt(self, prompts: Sequence[ObjectPrompt] = (), **options: Any) -> running_prompts.PromptReply:
        return await asyncio.to_thread(self.sync.prompt, prompts, **options)

    async def remove(self, obj_id: int, *, wait_s: float = 10.0) -> running_prompts.PromptReply:
        return await asyncio.to_thread(self.sync.remove, obj_id, wait_s=wait_s)

    async def cancel(self) -> control.CancelResult:
        return await asyncio.to_thread(self.sync.cancel)

    async def stop(self) -> str:
        return await asyncio.to_thread(self.sync.stop)

    async def submit_result(self, timeout_s: float | None = None) -> Submitted | None:
        return await asyncio.to_thread(self.sync.submit_result, timeout_s)

    async def _appear(self, appear_s: float) -> None:
        keys, deadline = self.client.settings.keys, time.monotonic() + appear_s
        while not await self._exists(keys.job(self.id), keys.results(self.id)):
            if time.monotonic() > deadline:
                raise UnknownJobError(f"no job {self.id!r} in Redis at {redact_url(self.client.settings.redis_url)} "
                                      f"after {appear_s:g} s (wrong REDIS_URL or key_prefix, or expired?)")
            await asyncio.sleep(0.1)

    async def _exists(self, *keys: str) -> bool:
        with redis_faults(self.client.settings):
            return any([await self.client.redis.exists(key) for key in keys])

    async def _xread(self, stream: str, last_id: str) -> list[Any]:
        backoff_s = 0.1
        while True:
            try:
                return cast(list[Any], await self.client.redis.xread({stream: last_id}, count=XREAD_COUNT,
                                                                     block=self.client.settings.block_ms) or [])
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("Redis unavailable while following %s (%s); retrying in %.1f s", self.id, e, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)

