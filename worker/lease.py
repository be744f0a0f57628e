"""A worker's lease on a job entry, and the fenced writes that only land while the lease holds.

The lease is the entry's place in the consumer group's pending list (PEL): the owner is the consumer
that holds it, and its age is the entry's idle time. A heartbeat thread renews it every lease_s / 3
with a Lua script that checks ownership and resets the idle time in one atomic step (XCLAIM alone has
no owner check). Another worker may take the entry (XAUTOCLAIM) only once it has been idle for
lease_s, i.e. only after its owner stopped renewing: crashed, frozen (SIGSTOP), or cut off.

Every write a worker makes for a job goes through a script that first checks that the worker still
owns the entry, so a stale worker that wakes up after losing its lease writes nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

from schemas.names import Keys

log = logging.getLogger(__name__)

_OWNER_CHECK = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return -1 end
"""

# KEYS: jobs stream. ARGV: group, entry id, consumer. 1 renewed, -1 lost.
RENEW_LUA = _OWNER_CHECK + """
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"""

# KEYS: jobs stream, target stream, job hash. ARGV: group, entry id, consumer, target entry id,
# frames_done (or '' to leave it), then field/value pairs. Returns {status, cancel}: status 1 written,
# 0 duplicate id (already there: rejected by Redis), -1 lease lost (nothing written).
FENCED_XADD_LUA = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return {-1, 0} end
local status = 1
local r = redis.pcall('XADD', KEYS[2], ARGV[4], unpack(ARGV, 6))
if type(r) == 'table' and r.err then
  if string.find(r.err, 'equal or smaller', 1, true) then status = 0 else return redis.error_reply(r.err) end
end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[3], 'frames_done', ARGV[5]) end
local cancel = redis.call('HGET', KEYS[3], 'cancel')
return {status, cancel == '1' and 1 or 0}
"""

# KEYS: jobs stream, job hash. ARGV: group, entry id, consumer, then field/value pairs. 1 or -1 lost.
FENCED_HSET_LUA = _OWNER_CHECK + """
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
return 1
"""

# The one terminal step: KEYS: jobs stream, results stream, job hash, events stream. ARGV: group, entry id, consumer,
# terminal entry id, ttl_s, state, error, n_fields, field/value pairs of the entry.
# Writes the terminal entry, the final state, the expiry, acknowledges and deletes the job entry.
FINISH_LUA = _OWNER_CHECK + """
local n = tonumber(ARGV[8])
local fields = {}
for i = 9, 8 + 2 * n do fields[#fields + 1] = ARGV[i] end
local r = redis.pcall('XADD', KEYS[2], ARGV[4], unpack(fields))
local written = 1
if type(r) == 'table' and r.err then
  if string.find(r.err, 'equal or smaller', 1, true) then written = 0 else return redis.error_reply(r.err) end
end
if written == 1 then redis.call('XADD', KEYS[4], 'MAXLEN', '~', 100000, '*', unpack(fields)) end
redis.call('HSET', KEYS[3], 'state', ARGV[6], 'finished_at', redis.call('TIME')[1])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[3], 'error', ARGV[7]) end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[5]))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return written
"""

# Hand a job back on shutdown: KEYS: jobs stream, job hash. ARGV: group, entry id, consumer, idle ms.
# Gives the attempt back and makes the entry look idle for a whole lease, so another worker's
# XAUTOCLAIM takes it at once.
HAND_BACK_LUA = _OWNER_CHECK + """
redis.call('HINCRBY', KEYS[2], 'attempt', -1)
redis.call('HSET', KEYS[2], 'state', 'queued')
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'IDLE', ARGV[4], 'JUSTID')
return 1
"""


class LeaseLost(Exception):
    """This worker no longer owns the job: another worker took it. Stop and write nothing."""


class Lease:
    """Ownership of one job entry, renewed by a background thread while the job runs."""

    def __init__(self, client: redis.Redis, keys: Keys, entry_id: str, consumer: str, lease_s: float) -> None:
        self.client = client
        self.keys = keys
        self.entry_id = entry_id
        self.consumer = consumer
        self.lease_s = lease_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.renewals = 0

    def args(self) -> list[Any]:
        return [self.keys.group, self.entry_id, self.consumer]

    def renew(self) -> bool:
        ok = self.client.eval(RENEW_LUA, 1, self.keys.jobs, *self.args()) == 1
        if ok:
            self.renewals += 1
        else:
            self.lost.set()
        return ok

    def _run(self) -> None:
        interval = self.lease_s / 3
        while not self._stop.wait(interval):
            try:
                if not self.renew():
                    log.warning("lost the lease on %s: another worker owns it now", self.entry_id)
                    return
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("could not renew the lease on %s (%s); retrying", self.entry_id, e)

    def __enter__(self) -> Lease:
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"lease-{self.entry_id}")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(f"lease lost on job entry {self.entry_id}")


def wait_with_lease(seconds: float, lease: Lease) -> None:
    """Sleep (e.g. a retry backoff) while the lease thread keeps the job ours."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        lease.check()
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
