"""Client side: decode videos into frame directories, submit jobs, follow their results.

Python API for backends:

    from producer import submit, follow, watch, extract_frames, build_prompts
    from producer import add_prompts, remove_object, PromptReply   # prompts on a running job
"""

from __future__ import annotations

from typing import Any

__all__ = ["PromptReply", "add_prompts", "build_prompts", "extract_frames", "follow", "remove_object", "submit",
           "watch"]


def __getattr__(name: str) -> Any:  # lazy, so `python -m producer --help` stays fast
    if name == "submit":
        from producer.submit import submit

        return submit
    if name in ("follow", "watch"):
        from producer import results

        return getattr(results, name)
    if name in ("add_prompts", "remove_object", "PromptReply"):
        from producer import live_prompts

        return getattr(live_prompts, name)
    if name == "extract_frames":
        from producer.decode import extract_frames

        return extract_frames
    if name == "build_prompts":
        from producer.prompts import build_prompts

        return build_prompts
    raise AttributeError(name)
