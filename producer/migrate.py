"""`python -m producer migrate`: a Redis of the old key layout (1) renamed to this one (2, runtime/layout.py).

Every per-job key without a hash tag (`vseg:job:j1`, `vseg:results:j1`, `vseg:frames:j1`,
`vseg:control:j1`, `vseg:producer:j1`, the submit lock `vseg:job:j1:submit-lock`) is renamed to its
tagged name (`vseg:job:{j1}` ...) with RENAME, which keeps its value and expiry; then the marker
`vseg:layout` is set. The jobs stream, the events and dead-letter streams keep their names, and job
entries are the same in both layouts, so a queued job, or one whose worker was stopped mid-job (its entry
pending), runs to its end under the new layout: the next worker reclaims it after its lease.

Single Redis only: RENAME of a key to another hash slot is refused by a cluster (CROSSSLOT), and the old
layout never ran on one. Idempotent: a second run finds nothing to move and only sets the marker. It
refuses while workers' health keys exist (workers of the previous version would write old keys again)
unless `force`. A key whose new name already exists is left, and reported, rather than overwritten.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import cast

import redis

from runtime.connection import is_cluster
from runtime.layout import describe, old_keys
from schemas.errors import LayoutError
from schemas.names import LAYOUT_VERSION, Keys

log = logging.getLogger(__name__)


@dataclass
class Migration:
    """What `migrate` did: the keys renamed (old, new) and those left because the new name was taken."""

    moved: list[tuple[str, str]] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)

    def describe(self, where: str) -> str:
        """Lines for a person (what `python -m producer migrate` prints)."""
        lines = [f"{old} -> {new}" for old, new in self.moved]
        lines += [f"left {old}: {new} already exists (compare them and remove one, then run migrate again)"
                  for old, new in self.conflicts]
        jobs = len({new.split("{", 1)[1] for _old, new in self.moved})
        lines.append(f"Redis at {where}: {len(self.moved)} keys of {jobs} jobs moved to key layout {LAYOUT_VERSION}"
                     + (f", {len(self.conflicts)} left" if self.conflicts else "")
                     + ("" if self.conflicts else f"; {'marker set' if self.moved else 'nothing to move, marker set'}"))
        return "\n".join(lines)


def migrate(client: redis.Redis, keys: Keys, *, force: bool = False) -> Migration:
    """Rename every old-layout key, then set the layout marker (see the module doc). Raises LayoutError on a
    cluster, while workers are alive (unless `force`), or when the Redis holds a layout this version does not
    know; the marker is not set while a conflict is left."""
    where = describe(client)
    if is_cluster(client):
        raise LayoutError(f"the Redis at {where} is a cluster: migrate renames keys to other hash slots, which a cluster "
                          f"refuses; the old key layout never ran on a cluster: migrate on the single Redis it ran on, "
                          f"then move to the cluster (or drain its jobs with the previous version)")
    raw = cast(bytes | None, client.get(keys.layout))
    marker = raw.decode() if raw is not None else None
    if marker is not None and marker != LAYOUT_VERSION:
        raise LayoutError(f"the Redis at {where} holds key layout {marker!r}; this version migrates layout 1 "
                          f"to {LAYOUT_VERSION} only")
    workers = [k.decode() for k in client.scan_iter(match=keys.worker_health("*"), count=1000)]
    if workers and not force:
        raise LayoutError(f"workers are running against the Redis at {where} ({', '.join(sorted(workers)[:5])}"
                          f"{', ...' if len(workers) > 5 else ''}): stop every worker and producer of the previous "
                          f"version first (their health keys expire within seconds), or pass --force")
    done = Migration()
    for old, new in list(old_keys(client, keys)):
        if client.renamenx(old, new):
            done.moved.append((old, new))
            log.info("renamed %s to %s", old, new)
        elif client.exists(old):
            done.conflicts.append((old, new))
    if not done.conflicts:
        client.set(keys.layout, LAYOUT_VERSION)
    return done
