"""Retry bookkeeping: what the job's state hash says before an attempt, the attempt counter, which errors
are worth another attempt and how long to wait before it.

Every run counts as an attempt, a run whose worker crashed included (the counter is raised before the
run, and only a hand-back gives it back); past max_attempts the job is dead-lettered with its last error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

import redis

from schemas.errors import RedisFull, RetryableError
from schemas.names import TERMINAL_STATES, JobState, Keys
from worker.broker.publish import ResultPublisher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobRecord:
    """The job's state hash as it stands before an attempt."""

    state: str
    cancel: bool
    frames_done: int
    error: str

    @property
    def finished(self) -> bool:
        """Already in a terminal state (its entry was left behind)."""
        return self.state in TERMINAL_STATES


def read_record(client: redis.Redis, keys: Keys, job_id: str) -> JobRecord:
    raw = {k.decode(): v.decode() for k, v in cast(dict[bytes, bytes], client.hgetall(keys.job(job_id))).items()}
    return JobRecord(state=raw.get("state", ""), cancel=raw.get("cancel") == "1",
                     frames_done=int(raw.get("frames_done", 0)), error=raw.get("error", ""))


def count_attempt(client: redis.Redis, keys: Keys, job_id: str) -> int:
    """Count one more attempt (before it runs, so that a crash counts too); returns its number."""
    return int(client.hincrby(keys.job(job_id), "attempt", 1))


def is_transient(error: BaseException) -> bool:
    """Worth another attempt: a RetryableError, Redis gone, CUDA out of memory."""
    if isinstance(error, (RetryableError, redis.ConnectionError, redis.TimeoutError)):
        return True
    try:
        import torch

        return isinstance(error, torch.cuda.OutOfMemoryError)
    except ImportError:  # pragma: no cover
        return False


def retry_delay_s(backoff_s: float, attempt: int) -> float:
    """Exponential backoff: `backoff_s` after the first attempt, doubling after each one."""
    return backoff_s * 2 ** (attempt - 1)


def note_retry(pub: ResultPublisher, error: BaseException) -> None:
    """Record the error in the job's state, best effort: with Redis full the record itself is refused, and
    the retry must not wait on it."""
    try:
        pub.set_state(error=f"{type(error).__name__}: {error}", state=JobState.RETRYING.value, best_effort=True)
    except (redis.RedisError, RedisFull) as e:
        log.warning("job %s: could not record the error (%s)", pub.job_id, e)
