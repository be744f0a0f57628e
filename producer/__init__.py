"""Client side: decode videos into frame directories, submit jobs, follow their results.

Python API for backends (README "Python quickstart"):

    from producer import Client, AsyncClient, Prompt          # the client, its asyncio twin, prompts
    from producer import Zone, Line                           # zones and lines for events (alerts)
    from producer import Job, AsyncJob, Frame, Update, TrackedObject, Event, JobStatus  # what they hand back

The functions the command line is made of, each a thin layer the client uses too:

    from producer import submit, follow, watch, extract_frames, build_prompts
    from producer import add_prompts, remove_object, PromptReply   # prompts on a running job
    from producer import submit_live, request_stop                 # live jobs (cameras, broadcasts)

Sub-package: `ui`, the web viewer (`python -m producer ui`, `serve --http-port`): cameras and jobs, masks drawn
over the video in the browser, prompts, removals, zones (producer/ui/__init__.py).
"""

from __future__ import annotations

import importlib
from typing import Any

# Each name and the module it lives in. No module of this package is named like a name here (a test checks),
# so importing a submodule never replaces a name with a module.
_WHERE = {
    "Client": "producer.client", "Job": "producer.client", "AsyncClient": "producer.async_client",
    "AsyncJob": "producer.async_client", "Frame": "producer.client_items", "Update": "producer.client_items",
    "TrackedObject": "producer.client_items", "JobStatus": "producer.client_items", "Event": "producer.events",
    "Prompt": "schemas.prompts", "submit": "producer.submission", "follow": "producer.results",
    "watch": "producer.watching", "add_prompts": "producer.running_prompts",
    "remove_object": "producer.running_prompts", "PromptReply": "producer.running_prompts",
    "submit_live": "producer.live_submit", "request_stop": "producer.control", "extract_frames": "producer.decode",
    "build_prompts": "producer.prompts", "Zone": "producer.zones", "Line": "producer.zones",
}
_RENAMED = {"Prompt": "ObjectPrompt"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:  # lazy, so `python -m producer --help` stays fast
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'producer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value  # looked up once
    return value
