"""Turns on a shared model: one session's step at a time, handed out fairly, live sessions first.

Several jobs' sessions share one model in a worker with concurrency > 1 (worker/service/slots.py). A step
(one frame through the model) needs the model to itself, so sessions take turns. A plain lock is not
fair: the thread that just released it often takes it again before a waiting one wakes, so one job could
run its whole video while another waits. Here every request gets a ticket, and the turn goes to the
oldest ticket of the highest class: a live session (its frames age in real time: it has a latency budget,
worker/sources/live.py) before a file job; file jobs take turns in the order they asked, so after each
step a session queues behind every session already waiting (round robin).

Between two steps a session's thread publishes the frame it got; a file job waiting would take the model
in that gap every time, and a live session would get only every other turn. So a live session that ends
its turn with its next frame already there (`Turn.hold`) keeps the model for LIVE_HOLD_S: a file job
waits that long for it to come back, a live session takes it at once. A live session waiting for its
source holds nothing (sessions wait for frames before they ask for a turn). Live sessions therefore have
the model as long as they have frames; file jobs fill what is left.

A waiting session runs its `check` every POLL_S (the job's: a lost lease, a cancel, a shutdown), so a
session whose turn never comes (another session's step wedged in the model) can still leave and be handed
back; the check also tells the job's lease that the job is waiting for the model, not stalled
(worker/service/runner.py), so only the wedged session's job stalls.

`waited_s` says how long the turns took to come (for metrics and the fairness tests).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

LIVE, FILE = 0, 1  # classes, in the order turns are given
LIVE_HOLD_S = 0.01  # how long a live session with its next frame ready keeps the model between two steps
POLL_S = 0.2  # how often a waiting session runs its check


class Turn:
    """One turn; `hold = True` before it ends: a live session comes straight back (see the module doc)."""

    def __init__(self, live: bool) -> None:
        self.live = live
        self.hold = False


class FairTurns:
    """One step at a time (not re-entrant), fairly (see the module doc)."""

    def __init__(self, *, live_hold_s: float = LIVE_HOLD_S) -> None:
        self.live_hold_s = live_hold_s
        self._cond = threading.Condition()
        self._busy = False
        self._queue: list[tuple[int, int]] = []  # (class, ticket): a heap
        self._tickets = itertools.count()
        self._held_until = 0.0  # a live session's hold (monotonic): file jobs wait until then
        self.turns = 0
        self.waited_s = 0.0

    def _mine(self, ticket: tuple[int, int]) -> bool:
        if self._busy or self._queue[0] != ticket:
            return False
        return ticket[0] == LIVE or time.monotonic() >= self._held_until

    def _wait(self, ticket: tuple[int, int], check: Callable[[], None] | None) -> None:
        while not self._mine(ticket):
            held_s = self._held_until - time.monotonic()
            timeout = held_s if held_s > 0 and not self._busy else None
            if check is not None:
                check()
                timeout = POLL_S if timeout is None else min(timeout, POLL_S)
            self._cond.wait(timeout=timeout)

    @contextmanager
    def turn(self, *, live: bool = False, check: Callable[[], None] | None = None) -> Iterator[Turn]:
        """Hold the model for one step; `live`: a live session's (served before any file job's); `check`: run
        while waiting (what it raises gives up the ticket)."""
        t0 = time.monotonic()
        ticket = (LIVE if live else FILE, next(self._tickets))
        current = Turn(live)
        with self._cond:
            heapq.heappush(self._queue, ticket)
            try:
                self._wait(ticket, check)
            except BaseException:  # interrupted while waiting: give up the ticket
                self._queue.remove(ticket)
                heapq.heapify(self._queue)
                self._cond.notify_all()
                raise
            heapq.heappop(self._queue)
            self._busy = True
            self.turns += 1
            self.waited_s += time.monotonic() - t0
        try:
            yield current
        finally:
            with self._cond:
                self._busy = False
                self._held_until = time.monotonic() + self.live_hold_s if current.live and current.hold else 0.0
                self._cond.notify_all()

    @property
    def waiting(self) -> int:
        """Sessions waiting for a turn now."""
        with self._cond:
            return len(self._queue)
