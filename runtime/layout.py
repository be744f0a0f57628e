"""Which key layout a Redis holds, checked before anything is written to it.

Layout 2 (schemas/names.py) puts a job's keys under its hash tag (`vseg:job:{id}`); layout 1, before it,
named them `vseg:job:id`. The two must never be mixed silently: a worker of this version would not see
the jobs of the old one, and the other way round. So `vseg:layout` holds "2", and `ensure_layout` (run
by a worker when it connects, worker/broker/claim.py `ensure_group`, and by the producer's commands
before they write) checks it:

  - "2": this layout, nothing more to do (one GET);
  - missing: the Redis is looked over once for data of layout 1 (a SCAN of the key space for per-job keys
    without a hash tag, on every node of a cluster, stopping at the first one: every job of layout 1 has
    its hash, so the jobs stream need not be read). Found: LayoutError, naming what
    to do (`python -m producer migrate`, or drain the jobs with the previous version); nothing written.
    Nothing found: the marker is set (SET NX) and the Redis is this layout's from then on;
  - anything else: a layout this version does not know (a newer one): LayoutError.

Stop the previous version's producers and workers before starting this one: one still running after the
marker is set would write keys of the old layout again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import redis

from runtime.connection import is_cluster
from runtime.faults import redact_url
from schemas.errors import ConfigError, LayoutError
from schemas.names import LAYOUT_VERSION, Keys, validate_job_id

log = logging.getLogger(__name__)

SCAN_COUNT = 1000  # keys a SCAN call looks at


def describe(client: redis.Redis) -> str:
    """The Redis a client talks to, for messages (no password: the URL is not kept by redis-py)."""
    try:
        if is_cluster(client):
            node = client.get_default_node()  # type: ignore[attr-defined]
            return redact_url(f"redis://{node.host}:{node.port}") + " (Redis Cluster)"
        kwargs = client.connection_pool.connection_kwargs
        return redact_url(f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}")
    except Exception:  # noqa: BLE001 - a wrapper or a fake client: the message goes on without the address
        return "REDIS_URL"


def old_name(keys: Keys, key: str) -> tuple[str, str] | None:
    """(job id, this layout's name) for a per-job key of layout 1 (`vseg:results:j1` -> `vseg:results:{j1}`),
    else None: a key of this layout, or not a per-job key of this prefix."""
    if "{" in key:
        return None
    for kind, start in zip(("job", "results", "frames", "control", "producer"), keys.job_key_kinds()):
        if not key.startswith(start):
            continue
        rest = key[len(start):]
        lock = kind == "job" and rest.endswith(":submit-lock")
        job_id = rest[: -len(":submit-lock")] if lock else rest
        try:
            validate_job_id(job_id)
        except ValueError:
            return None
        if lock:
            return job_id, keys.submit_lock(job_id)
        return job_id, {"job": keys.job, "results": keys.results, "frames": keys.frames, "control": keys.control,
                        "producer": keys.producer}[kind](job_id)
    return None


def old_keys(client: redis.Redis, keys: Keys) -> Iterator[tuple[str, str]]:
    """Every per-job key of layout 1, as (old name, new name), by SCAN (every node of a cluster)."""
    for raw in client.scan_iter(match=f"{keys.prefix}:*", count=SCAN_COUNT):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        found = old_name(keys, key)
        if found is not None:
            yield key, found[1]


def old_data(client: redis.Redis, keys: Keys) -> str:
    """What of layout 1 this Redis holds (the first key found), or ''. Every job of layout 1, queued ones
    too, has its hash (`vseg:job:id`, written with its entry in one step), so the keys tell it all: the
    jobs stream's entries are the same in both layouts."""
    for key, _new in old_keys(client, keys):
        return f"key {key}"
    return ""


def cluster_node_error(where: str) -> ConfigError:
    """A plain client sent to a Redis Cluster node (it answered MOVED)."""
    return ConfigError(f"the Redis at {where} is a Redis Cluster node (it answered MOVED): set VSEG_REDIS_CLUSTER=on")


def layout_error(where: str, found: str) -> LayoutError:
    return LayoutError(
        f"the Redis at {where} holds jobs in the old key layout (layout 1, before Redis Cluster support: {found}) "
        f"and no layout marker: stop the previous version's producers and workers, then run `python -m producer "
        f"migrate` (renames them to layout {LAYOUT_VERSION}, single Redis only), or drain them with the previous "
        f"version first")


def ensure_layout(client: redis.Redis, keys: Keys, *, mark: bool = True) -> None:
    """Check (and on an empty Redis set) the layout marker before anything is written (see the module doc).
    `mark` False only checks: a command that may still be refused for its own reasons (a submit, before its
    video is checked) writes nothing; it marks when it creates the job. Raises LayoutError; redis-py's
    errors as they come."""
    try:
        marker = client.get(keys.layout)
    except redis.exceptions.MovedError:
        raise cluster_node_error(describe(client)) from None
    value = marker.decode() if isinstance(marker, bytes) else marker
    if value == LAYOUT_VERSION:
        return
    where = describe(client)
    if value is not None:
        raise LayoutError(f"the Redis at {where} holds key layout {value!r} ({keys.layout}); this version uses layout "
                          f"{LAYOUT_VERSION}: run the version that wrote it, or a newer one")
    found = old_data(client, keys)
    if found:
        raise layout_error(where, found)
    if mark and client.set(keys.layout, LAYOUT_VERSION, nx=True):
        log.debug("Redis at %s: key layout %s (%s set)", where, LAYOUT_VERSION, keys.layout)
