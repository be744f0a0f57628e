"""Whether a live worker can take a job: read from the workers' health keys, before anything is submitted.

A worker serves one model (worker/model/models.py) and reads the jobs stream of what it can do (schemas/names.py
LANES); its health key (`vseg:worker:<name>`, refreshed every second, expiring after HEALTH_TTL_S) says which
model and capabilities. A job on a lane that no live worker reads would wait in a queue nobody reads, so `submit`
refuses it at once, in one line, with what to start: `require_worker`. Jobs of the first lane (points and boxes)
are not checked: workers are often started after jobs are queued, and SAM 2 workers are the default deployment.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, cast

import redis

from runtime.faults import redact_url
from schemas.errors import VsegError
from schemas.names import POINTS, TEXT, Keys

WHAT = {TEXT: ("text prompts (--text)", "python -m worker --model sam3"),
        POINTS: ("point and box prompts", "python -m worker --model sam2.1-tiny")}


class NoCapableWorker(VsegError):
    """No live worker offers what a job needs: it would wait in a queue nobody reads."""


def live_models(client: redis.Redis, keys: Keys) -> Counter[tuple[str, str]]:
    """(model, capability) of every live worker's health key (not broken), with how many workers serve each."""
    found: Counter[tuple[str, str]] = Counter()
    for key in client.scan_iter(match=keys.worker_health("*"), count=1000):
        raw = cast(bytes | None, client.get(key))
        try:
            health: Any = json.loads(raw) if raw else None
        except ValueError:
            continue
        if not isinstance(health, dict) or health.get("state") == "broken":
            continue
        for capability in health.get("capabilities") or [POINTS]:  # a worker from before capabilities: SAM 2
            found[(str(health.get("model") or "?"), str(capability))] += 1
    return found


def require_worker(client: redis.Redis, keys: Keys, capability: str, *, url: str) -> None:
    """NoCapableWorker unless some live worker offers `capability` (only the text lane is checked)."""
    if capability == POINTS:
        return
    models = live_models(client, keys)
    if any(c == capability for _, c in models):
        return
    what, start = WHAT.get(capability, (capability, f"a worker offering {capability}"))
    others = ", ".join(f"{n} x {model}" for (model, _), n in sorted(models.items())) or "none"
    raise NoCapableWorker(f"no live worker takes {what} in Redis at {redact_url(url)} (live workers: {others}): "
                          f"start one with `{start}`, then submit again")
