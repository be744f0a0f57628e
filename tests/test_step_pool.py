"""Unit tier: the bookkeeping of next steps batched across sessions (worker/model/next_steps.py NextStepPool,
worker/model/sam2/step_batch.py BatchedSteps), with the model's part replaced: whose steps a pass runs, where each
result goes, that a step another session fails to prepare is left to that session, and that one offer's two
parts (its frame to encode, its objects' steps) are each taken once."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from worker.model.next_steps import NextStepPool
from worker.model.sam2 import step_batch
from worker.model.sam2.step_batch import BatchedSteps, Step


def state(objects: int, cond: dict[int, set[int]] | None = None) -> dict[str, Any]:
    """An inference state with `objects` objects; `cond`: an object's prompted frames."""
    cond = cond or {}
    return {"output_dict_per_obj": {k: {"cond_frame_outputs": dict.fromkeys(cond.get(k, ())),
                                        "non_cond_frame_outputs": {}} for k in range(objects)}}


class Model:
    """Stands in for prepare and run_prepared: records each pass's steps; prepare fails for `broken`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.passes: list[list[tuple[int, int, int]]] = []
        self.broken: set[int] = set()
        monkeypatch.setattr(step_batch, "prepare", self.prepare)
        monkeypatch.setattr(step_batch, "run_prepared", self.run)

    def prepare(self, _predictor: Any, step: Step) -> SimpleNamespace:
        if id(step.state) in self.broken:
            raise OSError("cannot read frame")
        return SimpleNamespace(step=step)

    def run(self, _predictor: Any, prepared: list[SimpleNamespace]) -> list[tuple[dict[str, Any], torch.Tensor]]:
        steps = [p.step for p in prepared]
        self.passes.append([(id(s.state), s.obj_idx, s.frame_idx) for s in steps])
        return [({"step": (id(s.state), s.obj_idx, s.frame_idx)}, torch.zeros(1)) for s in steps]


def test_one_pass_runs_the_frames_objects_and_the_waiting_sessions_and_leaves_each_its_results(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = Model(monkeypatch)
    pool = NextStepPool(frames=1, sessions=3)
    a_state, b_state, c_state = state(2), state(3, cond={1: {7}}), state(1)
    a, b, c = BatchedSteps(a_state, pool), BatchedSteps(b_state, pool), BatchedSteps(c_state, pool)
    pool.offer(b, 7, steps=b)
    pool.offer(c, 4, steps=c)
    out, _ = a.result(None, 0, 5, False)  # a's first object on frame 5: the pass runs everything offered
    assert out["step"] == (id(a_state), 0, 5)
    assert model.passes == [[(id(a_state), 0, 5), (id(a_state), 1, 5), (id(b_state), 0, 7), (id(b_state), 2, 7),
                             (id(c_state), 0, 4)]]  # b's object 1 is prompted on 7: SAM 2 reuses its output
    assert a.result(None, 1, 5, False)[0]["step"] == (id(a_state), 1, 5)  # ready: no second pass
    assert b.result(None, 0, 7, False)[0]["step"] == (id(b_state), 0, 7)
    assert b.result(None, 2, 7, False)[0]["step"] == (id(b_state), 2, 7)
    assert c.result(None, 0, 4, False)[0]["step"] == (id(c_state), 0, 4)
    assert len(model.passes) == 1 and pool.shared_steps == 3 and pool.largest == 5
    assert (a.batched, b.batched, c.batched) == (2, 2, 1)


def test_the_pool_takes_at_most_limit_minus_one_other_sessions_and_never_the_current_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = Model(monkeypatch)
    pool = NextStepPool(frames=1, sessions=2)
    a = BatchedSteps(state(1), pool)
    others = [BatchedSteps(state(1), pool) for _ in range(3)]
    pool.offer(a, 3, steps=a)  # its own offer is not run twice
    for o in others:
        pool.offer(o, 1, steps=o)
    a.result(None, 0, 3, False)
    assert len(model.passes[0]) == 2 and pool.shared_steps == 1
    pool.withdraw(a)
    for o in others:
        pool.withdraw(o)
    assert pool.take_steps(exclude=a) == []


def test_a_step_another_session_fails_to_prepare_is_left_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A corrupt frame of b's does not fail a's pass: b's step is not run there, and b meets the error in its
    own turn (its own job's outcome)."""
    model = Model(monkeypatch)
    pool = NextStepPool(frames=1, sessions=4)
    a_state, b_state = state(1), state(2)
    a, b = BatchedSteps(a_state, pool), BatchedSteps(b_state, pool)
    model.broken.add(id(b_state))
    pool.offer(b, 2, steps=b)
    assert a.result(None, 0, 9, False)[0]["step"] == (id(a_state), 0, 9)
    assert model.passes == [[(id(a_state), 0, 9)]] and pool.shared_steps == 0
    with pytest.raises(OSError, match="cannot read frame"):
        b.result(None, 0, 2, False)


def test_results_computed_ahead_are_forgotten_when_the_objects_change(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Model(monkeypatch)
    pool = NextStepPool(frames=1, sessions=2)
    a, b = BatchedSteps(state(1), pool), BatchedSteps(state(1), pool)
    pool.offer(b, 6, steps=b)
    a.result(None, 0, 1, False)
    b.clear()  # b's objects changed (a prompt on frame 6, a removal): its next step is computed anew
    b.result(None, 0, 6, False)
    assert len(model.passes) == 2


class Cache(dict[int, object]):
    """A feature cache's part in an offer (encoder_batch.BatchedFeatures): its pixels loaded or not."""

    def __init__(self, loaded: bool = True) -> None:
        super().__init__()
        self.images = SimpleNamespace(ready=lambda _k: loaded)


def test_one_offer_gives_its_frame_to_one_encoder_pass_and_its_steps_to_one_step_pass() -> None:
    pool = NextStepPool(frames=4, sessions=3)
    me, b, c = Cache(), Cache(), Cache(loaded=False)
    b_steps, c_steps = object(), object()
    pool.offer("b", 7, features=b, steps=b_steps)
    pool.offer("c", 2, features=c, steps=c_steps)
    assert pool.take_frames(3, exclude=me) == [(b, 7)]  # c's pixels are not loaded: not taken
    assert pool.take_frames(3, exclude=me) == []  # b's frame went to one pass only
    assert pool.take_steps(exclude=object()) == [(b_steps, 7), (c_steps, 2)]
    assert pool.take_steps(exclude=object()) == []
    c.images = SimpleNamespace(ready=lambda _k: True)
    assert pool.take_frames(3, exclude=me) == [(c, 2)]  # c's frame part was still offered
    pool.offer("b", 8, features=b)
    b[8] = "encoded already"
    assert pool.take_frames(3, exclude=me) == []  # a frame already encoded is not encoded again
    pool.withdraw("b")
    assert pool.take_frames(3, exclude=me) == [] and pool.take_steps(exclude=me) == []


def test_limits_of_one_keep_a_part_out_of_the_pool() -> None:
    pool = NextStepPool(frames=1, sessions=2)
    pool.offer("b", 3, features=Cache(), steps="steps")
    assert pool.take_frames(5, exclude=None) == []
    assert pool.take_steps(exclude=None) == [("steps", 3)]
