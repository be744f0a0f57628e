"""The jobs one worker holds at once: `concurrency` slots, each running one entry's handling.

With one slot (the CPU's default) the entry runs on the loop's own thread, as a single-job worker always
did. With K > 1 each entry runs on a thread of its own (`job-<slot>`), under its own lease, heartbeat,
fencing, attempts and cancel (worker/service/entry.py: nothing of one job is shared with another), and
the loop goes on claiming while a slot is free (worker/service/loop.py). Each slot has its context: the
same shared model for every slot (sessions take fair turns on it, worker/model/turns.py), or a model
process of its own per slot (worker/service/capacity.py).

What a job's thread cannot settle itself it leaves here for the loop: Redis failing under it (the loop
backs off before its next claim), a forced exit (every other job is handed back too), a broken worker
(the others are handed back, then the worker exits non-zero), or an error nobody expected (the others
are handed back and the worker stops with it). A job failing as jobs fail (`failed`, retried, dead) is
the job's own outcome and touches no other slot.

The loop never starts an entry a slot already holds: an entry whose lease ran out under a Redis outage
comes back from XAUTOCLAIM to this same consumer, and two attempts under one consumer name would both
pass the fence.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runtime.logs import ContextThread
from worker.broker.dead_letter import peek
from worker.service import entry
from worker.service.context import SlotState, WorkerContext
from worker.service.outcomes import Outcome, outcome_of

log = logging.getLogger(__name__)


@dataclass
class Held:
    entry_id: str
    job_id: str
    thread: threading.Thread | None  # None: running on the loop's thread


class JobSlots:
    """`len(contexts)` slots; slot k runs its entries with `contexts[k]` (see the module doc)."""

    def __init__(self, contexts: list[WorkerContext], *, handle: Callable[[WorkerContext, str, dict[Any, Any]], str]
                 = entry.handle) -> None:
        if not contexts:
            raise ValueError("a worker needs at least one slot")
        self.contexts = [dataclasses.replace(c, slot=SlotState()) for c in contexts]  # each slot its own state
        self.handle = handle
        self.shutdown = contexts[0].shutdown
        self.health = contexts[0].health
        self._held: dict[int, Held] = {}
        self._lock = threading.Lock()
        self.redis_failed = False  # a job's handling said Redis failed under it: back off before claiming
        self.trouble: BaseException | None = None  # WorkerBroken, or an unexpected error: the worker stops

    @property
    def size(self) -> int:
        return len(self.contexts)

    @property
    def busy(self) -> int:
        with self._lock:
            return len(self._held)

    def free_slot(self) -> int | None:
        with self._lock:
            return next((k for k in range(self.size) if k not in self._held), None)

    def holds(self, entry_id: str) -> bool:
        with self._lock:
            return any(h.entry_id == entry_id for h in self._held.values())

    def jobs(self) -> list[str]:
        with self._lock:
            return [h.job_id for h in self._held.values()]

    def unopened(self) -> int:
        """Jobs held whose session is not open yet (their memory is still to come)."""
        with self._lock:
            return sum(1 for k in self._held if not self.contexts[k].slot.session_open)

    def take_redis_failed(self) -> bool:
        failed, self.redis_failed = self.redis_failed, False
        return failed

    def start(self, slot: int, entry_id: str, fields: dict[Any, Any]) -> None:
        """Run the entry in `slot`: on this thread with one slot (its errors raised here, as before), else
        on a thread of its own (this returns at once)."""
        job_id = peek(fields).job_id or entry_id
        with self._lock:
            if slot in self._held:
                raise RuntimeError(f"slot {slot} already holds entry {self._held[slot].entry_id}")
            held = Held(entry_id, job_id, None)
            self._held[slot] = held
            self.contexts[slot].slot.session_open = False
        self.shutdown.hold()
        if self.size == 1:
            try:
                self._note(self.handle(self.contexts[slot], entry_id, fields))
            finally:
                self._leave(slot, job_id)
            return
        held.thread = ContextThread(target=self._run, args=(slot, entry_id, fields, job_id), daemon=True,
                                    name=f"job-{slot}")
        held.thread.start()

    def _run(self, slot: int, entry_id: str, fields: dict[Any, Any], job_id: str) -> None:
        try:
            self._note(self.handle(self.contexts[slot], entry_id, fields))
        except BaseException as e:  # noqa: BLE001 - what it means: worker/service/outcomes.py
            outcome = outcome_of(e)
            if outcome is Outcome.BROKEN:
                self._fail(e, f"slot {slot} (job {job_id}): the worker is broken: {e}; handing back every other job")
            elif outcome is not Outcome.FORCED_EXIT:  # (handed back: the loop leaves once every slot has)
                log.exception("slot %d (job %s): unexpected error; handing back every other job", slot, job_id)
                self._fail(e, "")  # a bug: the others are handed back, the loop raises it
        finally:
            self._leave(slot, job_id)

    def _note(self, outcome: str) -> None:
        if outcome == "redis":
            self.redis_failed = True

    def _fail(self, error: BaseException, message: str) -> None:
        if message:
            log.error("%s", message)
        if self.trouble is None:
            self.trouble = error
        self.shutdown.force()  # every other job: handed back at its next check

    def _leave(self, slot: int, job_id: str) -> None:
        with self._lock:
            self._held.pop(slot, None)
        self.health.job_left(job_id)
        self.shutdown.release()

    def wait_for_change(self, timeout_s: float) -> None:
        """Until a slot frees, a shutdown request, or `timeout_s`."""
        busy = self.busy
        self.shutdown.wait(lambda: self.busy < busy or self.trouble is not None, timeout_s)

    def join(self) -> None:
        """Wait for every job's thread to leave its job (each finishes, or hands back past the grace)."""
        while True:
            with self._lock:
                threads = [h.thread for h in self._held.values() if h.thread is not None]
            if not threads:
                return
            for thread in threads:
                thread.join()
