"""Unit tier: what an error raised while a job runs means for it (worker/service/outcomes.py), the one place
that decides; the runner, the entry and the slots act on it."""

from __future__ import annotations

import pytest
import redis

from schemas.errors import DiskFull, PromptError, RedisUnavailable, RetryableError, VideoError, WorkerBroken
from worker.broker.lease import JobStalled, JobVanished, LeaseLost
from worker.broker.publish import JobCancelled
from worker.service.outcomes import STOPPED, Outcome, outcome_of
from worker.service.shutdown import ForcedExit, HandBack


@pytest.mark.parametrize("error, outcome", [
    (JobCancelled(), Outcome.CANCELLED),
    (JobVanished("gone"), Outcome.VANISHED),
    (JobStalled("stalled"), Outcome.LEASE_LOST),
    (LeaseLost("lost"), Outcome.LEASE_LOST),
    (ForcedExit(), Outcome.FORCED_EXIT),
    (HandBack(), Outcome.HAND_BACK),
    (WorkerBroken("wedged"), Outcome.BROKEN),
    (redis.ConnectionError("refused"), Outcome.REDIS),
    (redis.TimeoutError("hung"), Outcome.REDIS),
    (RetryableError("try again"), Outcome.RETRY),
    (RedisUnavailable("down"), Outcome.RETRY),
    (DiskFull("full"), Outcome.RETRY),
    (VideoError("corrupt"), Outcome.FAIL),
    (PromptError("outside"), Outcome.FAIL),
    (redis.ResponseError("WRONGTYPE"), Outcome.FAIL),
    (ValueError("a bug"), Outcome.FAIL),
    (KeyboardInterrupt(), Outcome.RAISE),
])
def test_each_error_has_one_meaning(error: BaseException, outcome: Outcome) -> None:
    assert outcome_of(error) is outcome


def test_what_stops_an_attempt_publishes_nothing_more() -> None:
    assert STOPPED == {Outcome.CANCELLED, Outcome.VANISHED, Outcome.LEASE_LOST, Outcome.FORCED_EXIT,
                       Outcome.HAND_BACK, Outcome.BROKEN}
