"""Unit tier: a job entry is validated once, where it is decoded (worker/service/job.py): limits, prompts,
paths inside STORAGE_ROOT and the kind of frame source; what fails says what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.limits import LimitError
from runtime.settings import Settings
from schemas import messages
from schemas.errors import PermanentError, PromptError, StorageError
from schemas.names import Keys
from schemas.prompts import ObjectPrompt
from worker.service.job import FrameSourceKind, validate_job


@pytest.fixture
def cfg(tmp_path: Path) -> Settings:
    return Settings.load(environ={}, storage_root=tmp_path, max_frames=100)


def job(**changes: object) -> messages.JobMessage:
    fields: dict[str, object] = {
        "job_id": "j1", "frames_dir": "jobs/j1/frames", "num_frames": 10, "width": 96, "height": 64, "fps": 10.0,
        "prompts": (ObjectPrompt(2, 0, ((5.0, 5.0),), (1,)), ObjectPrompt(1, 3, box_xyxy=(1, 1, 9, 9))),
    }
    return messages.JobMessage(**{**fields, **changes})  # type: ignore[arg-type]


def test_a_valid_job_has_its_paths_resolved_inside_storage_and_its_source_kind(cfg: Settings) -> None:
    valid = validate_job(job(), cfg)
    assert valid.frames_dir == (cfg.storage_root / "jobs/j1/frames").resolve()
    assert valid.render_target == (cfg.storage_root / "jobs/j1/render.mp4").resolve()
    assert valid.source is FrameSourceKind.DIR and valid.obj_ids == (1, 2) and valid.render_rel == "jobs/j1/render.mp4"
    streamed = validate_job(job(frames_stream=Keys().frames("j1"), render=False,
                                prompts=(ObjectPrompt(1, 50, ((5.0, 5.0),), (1,)),)), cfg)
    assert streamed.source is FrameSourceKind.STREAM and streamed.render_rel == ""  # frame 50: not decoded yet


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"frames_dir": "../outside"}, StorageError, "stay inside it"),
        ({"frames_dir": "/etc"}, StorageError, "stay inside it"),
        ({"num_frames": 10**6}, LimitError, "over the limit"),
        ({"prompts": (ObjectPrompt(1, 12, ((5.0, 5.0),), (1,)),)}, PromptError, "the decoded video has 10 frames"),
        ({"prompts": (ObjectPrompt(1, 0, ((500.0, 5.0),), (1,)),)}, PromptError, "outside the 96x64 frame"),
        ({"frames_stream": "s", "prompts": (ObjectPrompt(1, 100, ((5.0, 5.0),), (1,)),)}, PromptError, "100 frames"),
    ],
)
def test_an_invalid_job_raises_a_permanent_error_saying_what_is_wrong(
    cfg: Settings, changes: dict[str, object], error: type[PermanentError], match: str
) -> None:
    with pytest.raises(error, match=match):
        validate_job(job(**changes), cfg)
