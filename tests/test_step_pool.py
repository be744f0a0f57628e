"""Unit tier: the bookkeeping of tracking steps batched across sessions (worker/model/step_batch.py
BatchedSteps and StepPool), with the model's part replaced: whose steps a pass runs, where each result
goes, and that a step another session fails to prepare is left to that session."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from worker.model import step_batch
from worker.model.step_batch import BatchedSteps, Step, StepPool


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
    pool = StepPool(3)
    a_state, b_state, c_state = state(2), state(3, cond={1: {7}}), state(1)
    a, b, c = BatchedSteps(a_state, pool), BatchedSteps(b_state, pool), BatchedSteps(c_state, pool)
    b.offer(7)
    c.offer(4)
    out, _ = a.result(None, 0, 5, False)  # a's first object on frame 5: the pass runs everything offered
    assert out["step"] == (id(a_state), 0, 5)
    assert model.passes == [[(id(a_state), 0, 5), (id(a_state), 1, 5), (id(b_state), 0, 7), (id(b_state), 2, 7),
                             (id(c_state), 0, 4)]]  # b's object 1 is prompted on 7: SAM 2 reuses its output
    assert a.result(None, 1, 5, False)[0]["step"] == (id(a_state), 1, 5)  # ready: no second pass
    assert b.result(None, 0, 7, False)[0]["step"] == (id(b_state), 0, 7)
    assert b.result(None, 2, 7, False)[0]["step"] == (id(b_state), 2, 7)
    assert c.result(None, 0, 4, False)[0]["step"] == (id(c_state), 0, 4)
    assert len(model.passes) == 1 and pool.shared == 3 and pool.largest == 5
    assert (a.batched, b.batched, c.batched) == (2, 2, 1)


def test_the_pool_takes_at_most_limit_minus_one_other_sessions_and_never_the_current_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = Model(monkeypatch)
    pool = StepPool(2)
    a = BatchedSteps(state(1), pool)
    others = [BatchedSteps(state(1), pool) for _ in range(3)]
    a.offer(3)  # its own offer is not run twice
    for o in others:
        o.offer(1)
    a.result(None, 0, 3, False)
    assert len(model.passes[0]) == 2 and pool.shared == 1
    a.withdraw()
    for o in others:
        o.withdraw()
    assert pool.take(exclude=a) == []


def test_a_step_another_session_fails_to_prepare_is_left_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A corrupt frame of b's does not fail a's pass: b's step is not run there, and b meets the error in its
    own turn (its own job's outcome)."""
    model = Model(monkeypatch)
    pool = StepPool(4)
    a_state, b_state = state(1), state(2)
    a, b = BatchedSteps(a_state, pool), BatchedSteps(b_state, pool)
    model.broken.add(id(b_state))
    b.offer(2)
    assert a.result(None, 0, 9, False)[0]["step"] == (id(a_state), 0, 9)
    assert model.passes == [[(id(a_state), 0, 9)]] and pool.shared == 0
    with pytest.raises(OSError, match="cannot read frame"):
        b.result(None, 0, 2, False)


def test_results_computed_ahead_are_forgotten_when_the_objects_change(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Model(monkeypatch)
    pool = StepPool(2)
    a, b = BatchedSteps(state(1), pool), BatchedSteps(state(1), pool)
    b.offer(6)
    a.result(None, 0, 1, False)
    b.clear()  # b's objects changed (a prompt on frame 6, a removal): its next step is computed anew
    b.result(None, 0, 6, False)
    assert len(model.passes) == 2
