"""Per-job limits (settings max_frames, max_pixels, max_objects, max_prompts), checked at submit and
again at the worker, so an oversized job is refused before it costs anything."""

from __future__ import annotations

from collections.abc import Sequence

from runtime.settings import Settings
from schemas.errors import InputError
from schemas.prompts import ObjectPrompt, object_ids


class LimitError(InputError):
    """A job exceeds a per-job limit."""


def check_job_limits(num_frames: int, width: int, height: int, prompts: Sequence[ObjectPrompt],
                     settings: Settings) -> None:
    """Raise LimitError naming the limit, the value and the setting that raises it."""
    checks = (
        ("frames", num_frames, settings.max_frames, "VSEG_MAX_FRAMES", "use --max-frames, --stride or --start/--end"),
        ("pixels per frame", width * height, settings.max_pixels, "VSEG_MAX_PIXELS", "downscale the video"),
        ("objects", len(object_ids(prompts)), settings.max_objects, "VSEG_MAX_OBJECTS", "split the objects over jobs"),
        ("prompts", len(prompts), settings.max_prompts, "VSEG_MAX_PROMPTS", "give fewer prompts"),
    )
    for what, value, limit, var, hint in checks:
        if value > limit:
            raise LimitError(f"job has {value} {what}, over the limit of {limit} ({var}); {hint}")
