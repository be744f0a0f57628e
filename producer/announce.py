"""The one way a producer announces a job's frames, for a streamed file (producer/streaming.py) and for a
live source (producer/live_submit.py): a fresh frames stream and the producer's liveness key while it
runs, frame k's announcement at id `(k+1)-0`, the end marker with the total (then the frames removed if
the worker finished first), and an announcement refused because the worker closed the stream said as
what it is (the stream and its fields: README "The contract").
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

import redis

from producer.liveness import ProducerHeartbeat
from runtime.cleanup import job_ended, remove_frames
from runtime.settings import Settings
from schemas.errors import JobFailed
from schemas.names import frame_entry_id, frames_end_entry_id

log = logging.getLogger(__name__)


class FrameAnnouncer:
    """Announcements on job `job_id`'s frames stream; `maxlen`: trimmed to about that many (a live job's)."""

    def __init__(self, client: redis.Redis, settings: Settings, job_id: str, *, maxlen: int | None = None) -> None:
        self.client = client
        self.settings = settings
        self.job_id = job_id
        self.stream = settings.keys.frames(job_id)
        self.maxlen = maxlen

    @contextmanager
    def running(self) -> Iterator[None]:
        """A fresh frames stream (one left by an earlier submit that died is not this one's), and the
        liveness key: it exists before the job is enqueued and goes only after the end (or error) marker."""
        self.client.delete(self.stream)
        with ProducerHeartbeat(self.client, self.settings.keys.producer(self.job_id), self.settings.producer_ttl_s):
            yield

    def announce(self, frames: Mapping[int, Mapping[str, Any]], what: tuple[str, str]) -> None:
        """Frames k (their fields besides `frame_idx`) announced in one round trip. A refusal because the
        worker closed the stream raises JobFailed (`what`: what the producer was doing and what stops, as
        ("its video was being decoded", "decoding")); one because frame k was announced already (a reply
        lost in an outage) is done."""
        pipe = self.client.pipeline(transaction=False)
        for k, fields in frames.items():
            pipe.xadd(self.stream, cast(Any, {"frame_idx": k, **fields}), id=frame_entry_id(k), maxlen=self.maxlen,
                      approximate=True)
        try:
            pipe.execute()
        except redis.ResponseError as e:
            self.raise_if_closed(e, what)
            if "equal or smaller" not in str(e):
                raise

    def raise_if_closed(self, error: redis.ResponseError, what: tuple[str, str]) -> None:
        """JobFailed if the stream ends with an error marker: the worker closed it (this producer's liveness
        key was gone: it was cut off from Redis or stalled)."""
        last = cast(list[tuple[bytes, dict[bytes, bytes]]], self.client.xrevrange(self.stream, count=1))
        if last and b"error" in last[0][1]:
            doing, stopping = what
            raise JobFailed(self.job_id, f"its frames stream was closed while {doing} "
                                         f"({last[0][1][b'error'].decode(errors='replace')}), so {stopping} stopped"
                            ) from error

    def end(self, total: int, **fields: int | str) -> None:
        """The end marker with the total the worker waits for (and `fields`), then the frames removed if the
        worker finished first (after the marker: see runtime/cleanup.py)."""
        pipe = self.client.pipeline(transaction=False)
        marker: dict[str, int | str] = {"end": total, **fields}
        state: dict[str, int | str] = {"num_frames": total, **fields}
        pipe.xadd(self.stream, cast(Any, marker), id=frames_end_entry_id(total))
        pipe.hset(self.settings.keys.job(self.job_id), mapping=cast(Any, state))
        pipe.expire(self.stream, self.settings.results_ttl_s)
        pipe.execute()
        try:
            if job_ended(self.client, self.settings, self.job_id):
                remove_frames(self.settings, self.job_id)
        except (redis.RedisError, OSError) as e:  # disk space, not correctness: the submit itself succeeded
            log.warning("could not check whether job %s's frames can be removed (%s)", self.job_id, e)
