"""What an error raised while a job runs means for the job, decided here (`outcome_of`) and acted on where
the job's state lives: the runner writes `cancelled` or `failed` (worker/service/runner.py), the entry
retries, hands back or stops (worker/service/entry.py). The only other place an error is read is the entry's
guard around Redis (entry.py `_guarded`): any Redis error escaping an entry's handling leaves its job
pending, taken again once Redis can take it.
"""

from __future__ import annotations

import enum

import redis

from schemas.errors import PermanentError, WorkerBroken
from worker.broker.attempts import is_transient
from worker.broker.lease import JobVanished, LeaseLost
from worker.broker.publish import JobCancelled
from worker.service.shutdown import ForcedExit, HandBack


class Outcome(enum.Enum):
    CANCELLED = "cancelled: the job ends `cancelled`"
    VANISHED = "the job's keys are gone (Redis restarted empty): nothing to write"
    LEASE_LOST = "another worker may hold the job: stop, write nothing more"
    FORCED_EXIT = "a second shutdown signal: hand the job back within two seconds, then exit"
    HAND_BACK = "a shutdown: hand the job back, claimable at once, its attempt not counted"
    BROKEN = "the worker is broken: hand the job back, then the worker exits"
    REDIS = "Redis fails under the job: it stays pending, taken again once Redis can take it"
    RETRY = "transient: another attempt after a backoff, up to max_attempts"
    FAIL = "permanent, or a bug: the job ends `failed` with the error"
    RAISE = "not the job's: an interrupt or an exit of the process"


def outcome_of(error: BaseException) -> Outcome:
    """What `error`, raised while a job runs, means for the job."""
    for kind, outcome in ((JobCancelled, Outcome.CANCELLED), (JobVanished, Outcome.VANISHED),
                          (LeaseLost, Outcome.LEASE_LOST), (ForcedExit, Outcome.FORCED_EXIT),
                          (HandBack, Outcome.HAND_BACK), (WorkerBroken, Outcome.BROKEN),
                          ((redis.ConnectionError, redis.TimeoutError), Outcome.REDIS)):
        if isinstance(error, kind):
            return outcome
    if not isinstance(error, Exception):
        return Outcome.RAISE
    if is_transient(error) and not isinstance(error, PermanentError):
        return Outcome.RETRY
    return Outcome.FAIL


# the attempt stops here: nothing more is published for it (a cancel's own entry aside)
STOPPED = frozenset({Outcome.CANCELLED, Outcome.VANISHED, Outcome.LEASE_LOST, Outcome.FORCED_EXIT,
                     Outcome.HAND_BACK, Outcome.BROKEN})
