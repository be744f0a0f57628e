"""Client side: decode videos into frame directories, submit jobs, follow their results.

Python API for backends:

    from producer import submit, follow, watch, extract_frames, build_prompts
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_prompts", "extract_frames", "follow", "submit", "watch"]


def __getattr__(name: str) -> Any:  # lazy, so `python -m producer --help` stays fast
    if name == "submit":
        from producer.submit import submit

        return submit
    if name in ("follow", "watch"):
        from producer import results

        return getattr(results, name)
    if name == "extract_frames":
        from producer.decode import extract_frames

        return extract_frames
    if name == "build_prompts":
        from producer.prompts import build_prompts

        return build_prompts
    raise AttributeError(name)
