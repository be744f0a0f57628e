"""Unit tier: fair turns on a shared model (worker/model/turns.py), how many jobs a worker takes and when
(worker/service/capacity.py), and the job slots' bookkeeping (worker/service/slots.py)."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import pytest

from runtime.settings import Settings
from schemas.errors import ConfigError, WorkerBroken
from tests.fakes import ChaosHooks, ColourSegmenter
from worker.model.host import ModelHost
from worker.model.segment import GpuBudget
from worker.model.turns import FairTurns
from worker.service.capacity import pick_concurrency, refusal
from worker.service.context import SlotState
from worker.service.shutdown import Shutdown
from worker.service.slots import JobSlots

MIB = 1024 * 1024


def queue_behind(turns: FairTurns, order: list[str], name: str, *, live: bool) -> threading.Thread:
    def run() -> None:
        with turns.turn(live=live):
            order.append(name)

    t = threading.Thread(target=run)
    t.start()
    return t


def wait_waiting(turns: FairTurns, n: int) -> None:
    deadline = time.monotonic() + 5
    while turns.waiting < n:
        assert time.monotonic() < deadline, "threads did not queue"
        time.sleep(0.001)


def test_turns_go_in_the_order_asked_with_live_sessions_first() -> None:
    turns = FairTurns()
    order: list[str] = []
    threads = []
    with turns.turn():  # the model is busy while four sessions queue, in this order
        for k, (name, live) in enumerate([("file-a", False), ("file-b", False), ("live-c", True), ("live-d", True)]):
            threads.append(queue_behind(turns, order, name, live=live))
            wait_waiting(turns, k + 1)
    for t in threads:
        t.join(5)
    assert order == ["live-c", "live-d", "file-a", "file-b"]
    assert turns.turns == 5


def test_a_session_asking_again_goes_behind_those_waiting() -> None:
    """Round robin: two sessions stepping in a loop alternate instead of one taking every turn."""
    turns = FairTurns()
    order: list[str] = []
    start = threading.Barrier(2)

    def session(name: str) -> None:
        start.wait()
        for _ in range(20):
            with turns.turn():
                order.append(name)
                time.sleep(0.001)

    threads = [threading.Thread(target=session, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    runs = sum(1 for x, y in zip(order, order[1:]) if x == y)
    assert sorted(order) == ["a"] * 20 + ["b"] * 20
    assert runs <= 2, order  # after the first turns they strictly alternate


def test_an_interrupted_wait_gives_its_ticket_up() -> None:
    turns = FairTurns()
    holder = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with turns.turn():
            holder.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    holder.wait(5)
    cond_wait = turns._cond.wait  # noqa: SLF001 - the wait is interrupted as a KeyboardInterrupt would

    def interrupted(*_: Any, **__: Any) -> bool:
        raise KeyboardInterrupt

    turns._cond.wait = interrupted  # type: ignore[method-assign]  # noqa: SLF001
    with pytest.raises(KeyboardInterrupt), turns.turn():
        pass
    turns._cond.wait = cond_wait  # type: ignore[method-assign]  # noqa: SLF001
    assert turns.waiting == 0
    release.set()
    t.join(5)
    with turns.turn():  # nothing left behind blocks the next
        pass


def test_a_waiting_session_runs_its_check_and_leaves_when_it_raises() -> None:
    """A turn that never comes (the holder wedged): the waiter's check runs every POLL_S; when it raises (a
    forced shutdown) the waiter leaves with it and gives up its ticket."""
    from worker.model.turns import POLL_S
    from worker.service.shutdown import ForcedExit

    turns = FairTurns()
    holder, release = threading.Event(), threading.Event()

    def hold() -> None:
        with turns.turn():
            holder.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    holder.wait(5)
    calls: list[float] = []

    def check() -> None:
        calls.append(time.monotonic())
        if len(calls) >= 4:
            raise ForcedExit()

    t0 = time.monotonic()
    with pytest.raises(ForcedExit), turns.turn(check=check):
        pass
    assert len(calls) == 4 and time.monotonic() - t0 < 20 * POLL_S
    assert turns.waiting == 0
    release.set()
    t.join(5)
    with turns.turn():
        pass


def test_a_live_session_with_its_next_frame_ready_keeps_the_model_between_two_steps() -> None:
    """A file job waiting does not slip into the gap between a live session's steps when the live one said
    it comes straight back; it does once the live session's turn ends without a hold. The hold here is far
    longer than any machine takes between the two steps, so neither a loaded machine nor a slow one changes
    what is checked: the gap is real (the file job is waiting all through it), and only the hold closes it."""
    turns = FairTurns(live_hold_s=60.0)
    order: list[str] = []
    with turns.turn(live=True) as turn:
        file_job = queue_behind(turns, order, "file", live=False)
        wait_waiting(turns, 1)
        turn.hold = True
    with turns.turn(live=True) as turn:  # the live session comes back: the file job has waited through the gap
        assert turns.waiting == 1 and order == []
        order.append("live")  # no hold this time: its source has nothing new
    file_job.join(5)
    assert order == ["live", "file"]


def test_a_held_model_goes_to_the_waiting_file_job_when_the_live_session_does_not_come_back() -> None:
    """The hold is a bound, not a reservation: a live session that said it comes back and does not loses the
    model to the file job waiting once the hold is over."""
    turns = FairTurns(live_hold_s=0.05)
    order: list[str] = []
    got = threading.Event()

    def file_job() -> None:
        with turns.turn(live=False):
            order.append("file")
            got.set()

    with turns.turn(live=True) as turn:
        t = threading.Thread(target=file_job)
        t.start()
        wait_waiting(turns, 1)
        turn.hold = True
        released = time.monotonic()
    assert got.wait(5), "the file job never got the model after the hold"
    assert time.monotonic() - released >= 0.05 and order == ["file"]
    t.join(5)


def test_concurrency_set_is_taken_as_it_is_and_checked() -> None:
    k, why = pick_concurrency(Settings(concurrency=5), ModelHost(ChaosHooks(ColourSegmenter())))
    assert (k, why) == (5, "set by concurrency (VSEG_CONCURRENCY or --concurrency)")
    with pytest.raises(ConfigError, match=r"concurrency \(VSEG_CONCURRENCY\) must be 0..64"):
        Settings(concurrency=-1)
    with pytest.raises(ConfigError, match="must be 0..64"):
        Settings.load(environ={"VSEG_CONCURRENCY": "65"}, config_path=None)


def test_default_concurrency_on_cpu_is_one_and_on_cuda_what_fits() -> None:
    cpu = ChaosHooks(ColourSegmenter())
    assert pick_concurrency(Settings(), ModelHost(cpu))[0] == 1
    gpu = ChaosHooks(ColourSegmenter(), gpu_mib=(10_000, 1_000))
    k, why = pick_concurrency(Settings(), ModelHost(gpu))
    assert k == 8 and "10000 MiB free" in why and "1000 MiB" in why  # 80% of 10 GB in 1 GB sessions
    big = ChaosHooks(ColourSegmenter(), gpu_mib=(1_000_000, 100))
    assert pick_concurrency(Settings(), ModelHost(big))[0] == 16  # capped
    tiny = ChaosHooks(ColourSegmenter(), gpu_mib=(500, 1_000))
    assert pick_concurrency(Settings(), ModelHost(tiny))[0] == 1  # always at least one


def test_default_concurrency_with_a_model_process_per_slot_counts_each_model() -> None:
    class Budgeted(ChaosHooks):
        def gpu_budget(self) -> GpuBudget | None:
            return GpuBudget(10_000 * MIB, 1_000 * MIB, 1_500 * MIB)

    k, why = pick_concurrency(Settings(), ModelHost(Budgeted(ColourSegmenter()), per_slot=True))
    assert k == 4  # 8000 MiB / 2500 MiB = 3 more models and sessions, plus the first model's slot
    assert "plus a model process of 1500 MiB per slot" in why


def test_refusal_leaves_room_for_one_more_session_and_counts_sessions_still_to_open() -> None:
    budget = GpuBudget(1_000 * MIB, 300 * MIB, 0)
    assert refusal([budget], busy=0) is None  # a worker holding nothing always takes a job
    assert refusal([None], busy=3) is None  # no GPU: nothing to run out of
    assert refusal([budget], busy=1) is None  # 1000 >= 450
    assert refusal([budget], busy=1, unopened=1) is None  # 700 >= 450
    why = refusal([budget], busy=2, unopened=2)
    assert why is not None and "400 MiB free on the GPU, a session needs about 450 MiB: holding 2 job(s)" in why
    low = GpuBudget(200 * MIB, 300 * MIB, 0)
    assert refusal([budget, low], busy=1) is not None  # the lowest free figure counts (the latest)


def test_a_host_shares_one_model_or_starts_one_per_slot_and_cleans_up_on_failure() -> None:
    first = ChaosHooks(ColourSegmenter())
    assert ModelHost(first).slots(3) == [first] * 3
    started: list[ChaosHooks] = []
    closed: list[ChaosHooks] = []

    class Closing(ChaosHooks):
        def close(self) -> None:
            closed.append(self)

    def start() -> ChaosHooks:
        if len(started) == 2:
            raise RuntimeError("no more GPU")
        started.append(Closing(ColourSegmenter()))
        return started[-1]

    assert len(ModelHost(first, per_slot=True, start=start).slots(3)) == 3
    started.clear()
    with pytest.raises(RuntimeError, match="no more GPU"):
        ModelHost(first, per_slot=True, start=start).slots(4)
    assert closed == started  # those started before the failure are closed again


@dataclasses.dataclass
class Ctx:
    """The parts of a WorkerContext JobSlots touches."""

    shutdown: Shutdown
    health: Any
    slot: SlotState = dataclasses.field(default_factory=SlotState)


class NoHealth:
    def job_left(self, job_id: str) -> None:
        pass


def slots_of(n: int, handle: Any) -> JobSlots:
    shutdown = Shutdown(1.0)
    return JobSlots([Ctx(shutdown, NoHealth()) for _ in range(n)], handle=handle)  # type: ignore[misc]


def test_slots_run_entries_on_their_own_threads_and_never_hold_one_twice() -> None:
    gate = threading.Event()
    ran: list[str] = []

    def handle(ctx: Any, entry_id: str, fields: dict[Any, Any]) -> str:
        ran.append(entry_id)
        gate.wait(5)
        return "ok"

    slots = slots_of(2, handle)
    slots.start(0, "1-0", {})
    assert slots.holds("1-0") and not slots.holds("2-0") and slots.free_slot() == 1
    slots.start(1, "2-0", {})
    assert slots.free_slot() is None and slots.busy == 2 and slots.shutdown.held == 2
    with pytest.raises(RuntimeError, match="already holds"):
        slots.start(0, "3-0", {})
    gate.set()
    slots.join()
    assert sorted(ran) == ["1-0", "2-0"] and slots.busy == 0 and slots.shutdown.held == 0


def test_a_broken_slot_stops_the_others_and_redis_failures_are_noted() -> None:
    def handle(ctx: Any, entry_id: str, fields: dict[Any, Any]) -> str:
        if entry_id == "broken":
            raise WorkerBroken("the model process cannot be started again")
        if entry_id == "redis":
            return "redis"
        ctx.shutdown.wait(lambda: ctx.shutdown.forced, 5)  # a sibling: runs until told to leave
        return "ok"

    slots = slots_of(3, handle)
    slots.start(0, "redis", {})
    slots.start(1, "sibling", {})
    slots.start(2, "broken", {})
    slots.join()
    assert isinstance(slots.trouble, WorkerBroken)
    assert slots.shutdown.forced  # the sibling was told to hand back
    assert slots.take_redis_failed() and not slots.take_redis_failed()
