"""Client side: decode videos into frame directories, submit jobs, follow their results.

Python API for backends:

    from producer import submit, follow, watch, extract_frames, build_prompts
    from producer import add_prompts, remove_object, PromptReply   # prompts on a running job
    from producer import submit_live, request_stop                 # live jobs (cameras, broadcasts)
"""

from __future__ import annotations

from typing import Any

__all__ = ["PromptReply", "add_prompts", "build_prompts", "extract_frames", "follow", "remove_object", "request_stop",
           "submit", "submit_live", "watch"]


def __getattr__(name: str) -> Any:  # lazy, so `python -m producer --help` stays fast
    if name == "submit":
        from producer.submission import submit

        return submit
    if name == "follow":
        from producer.results import follow

        return follow
    if name == "watch":
        from producer.watching import watch

        return watch
    if name in ("add_prompts", "remove_object", "PromptReply"):
        from producer import running_prompts

        return getattr(running_prompts, name)
    if name == "submit_live":
        from producer.live_submit import submit_live

        return submit_live
    if name == "request_stop":
        from producer.control import request_stop

        return request_stop
    if name == "extract_frames":
        from producer.decode import extract_frames

        return extract_frames
    if name == "build_prompts":
        from producer.prompts import build_prompts

        return build_prompts
    raise AttributeError(name)
