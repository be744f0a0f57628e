"""Every Lua script the worker runs (in runtime/lua.py's registry), registered once per client and run by EVALSHA.

Each script checks, in the same atomic step as its write, that this worker still owns the job (the
job hash's `owner`, worker/broker/lease.py), and touches the keys of that one job only: they share a
hash slot (schemas/names.py), so every script runs on Redis Cluster too. The shared jobs stream is
never a script's key: what a job does to it (reset an entry's idle time, XACK, XDEL) is a plain command
sent after the script said the job is this worker's. Registered scripts are sent
by their SHA1 (EVALSHA), so a frame's fenced write carries its arguments and 40 bytes, not the
script's text; a server that does not know a script (restarted empty, SCRIPT FLUSH) answers NOSCRIPT,
and the script is loaded again and the call sent again (redis-py's `Script` does this for a direct
call; `run_pipeline` for a pipeline, where redis-py's own way costs a SCRIPT EXISTS round trip on
every execute).

No script spells a job state: states are arguments (JobState), so the wire strings live in one place
(schemas/names.py).
"""

from __future__ import annotations

from typing import Any

import redis
from redis.client import Pipeline
from redis.commands.core import Script

from runtime.lua import lua, register


# The fence (worker/broker/lease.py): the job hash's `owner` (a consumer name) and `lease_until` (ms, by the
# TIME of the job's own Redis node). KEYS[1] of every script here is the job hash; every other key is one of
# the same job's (its hash tag puts them all on one slot). ARGV[1] is this worker's consumer name.
# -2: the job hash is gone (Redis restarted empty, or the job expired); -1: another worker owns the job.
def _owner_check(reply: str = "%d") -> str:
    """The fence's Lua preamble: go on only if this worker (ARGV[1]) owns the job (KEYS[1]); else return -2 or -1,
    written as `reply` makes them ("%d" a number, "{%d, 0}" a pair with the cancel flag's place)."""
    return f"""
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
  if redis.call('EXISTS', KEYS[1]) == 0 then return {reply % -2} end
  return {reply % -1}
end
if owner ~= ARGV[1] then return {reply % -1} end
"""


_OWNER_CHECK = _owner_check()
_OWNER_CHECK_PAIR = _owner_check("{%d, 0}")

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Take a job after its entry was claimed (XREADGROUP or XAUTOCLAIM). KEYS: job hash. ARGV: consumer, lease ms,
# the terminal states (space-separated). 1 taken (owner = this consumer, lease_until = now + lease); 0 the job
# has already ended (its entry was left behind: drop it); -1 another worker's lease on it still runs (leave the
# entry: its owner's next renewal claims it back). A job hash that does not exist yet is taken (created): its
# producer adds the entry first and creates the hash next, field by field, keeping what a worker set
# (producer/enqueue.py), or died between the two.
TAKE_LUA = lua("take", _NOW_MS + """
local state = redis.call('HGET', KEYS[1], 'state')
if state and string.find(' ' .. ARGV[3] .. ' ', ' ' .. state .. ' ', 1, true) then return 0 end
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= '' and owner ~= ARGV[1] then
  local until_ms = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0') or 0
  if until_ms > now then return -1 end
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'lease_until', now + tonumber(ARGV[2]))
return 1
""")

# KEYS: job hash. ARGV: consumer, lease ms. 1 renewed (lease_until = now + lease), -1 lost, -2 hash gone; 2 the
# owner is confirmed but Redis is full (maxmemory, noeviction: HSET is refused, XCLAIM is not), so lease_until
# stays: the entry's idle time, reset by the caller, keeps every other worker's XAUTOCLAIM off it meanwhile, so
# a renewal passes on a full Redis as it always has. The caller then resets the entry's idle time on the jobs
# stream (XCLAIM ... JUSTID, worker/broker/lease.py).
RENEW_LUA = lua("renew", _OWNER_CHECK + _NOW_MS + """
local r = redis.pcall('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[2]))
if type(r) == 'table' and r.err then return 2 end
return 1
""")

# KEYS: job hash. ARGV: consumer. Returns {status, cancel}: 1 this worker owns the job, -1 lost, -2 hash gone;
# cancel 1 once a cancel was asked for. Run before a write to a shared stream (vseg:events), which no script
# may touch together with a job's keys.
OWNS_LUA = lua("owns", _OWNER_CHECK_PAIR + """
return {1, redis.call('HGET', KEYS[1], 'cancel') == '1' and 1 or 0}
""")

# KEYS: job hash, target stream (the job's result stream). ARGV: consumer, target entry id, a job hash field to
# set with the entry and its value ('' and '': none; frames set frames_done, object changes control_done),
# MAXLEN ('': untrimmed; a live job's results: about that many entries are kept), then the entry's field/value
# pairs. Returns {status, cancel}: status 1 written, 0 duplicate id (already there: rejected by Redis), -1 lease
# lost, -2 job hash gone (nothing written either way).
FENCED_XADD_LUA = lua("fenced_xadd", _OWNER_CHECK_PAIR + """
local status = 1
local r
if ARGV[5] ~= '' then
  r = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[5]), ARGV[2], unpack(ARGV, 6))
else
  r = redis.pcall('XADD', KEYS[2], ARGV[2], unpack(ARGV, 6))
end
if type(r) == 'table' and r.err then
  if string.find(r.err, 'equal or smaller', 1, true) then status = 0 else return redis.error_reply(r.err) end
end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], ARGV[3], ARGV[4]) end
local cancel = redis.call('HGET', KEYS[1], 'cancel')
return {status, cancel == '1' and 1 or 0}
""")

# KEYS: job hash. ARGV: consumer, then field/value pairs. 1, -1 lost or -2 hash gone.
FENCED_HSET_LUA = lua("fenced_hset", _OWNER_CHECK + """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
""")

# The terminal step's part on the job's slot: KEYS: job hash, results stream. ARGV: consumer, terminal entry id,
# ttl_s, state (a terminal JobState), error, n_fields, field/value pairs of the entry. Writes the terminal entry,
# the final state, the expiry. Returns {written, copy}: written 1, 0 already there, -1 lease lost, -2 hash gone;
# copy 1 if the terminal entry's copy on vseg:events is still to be written (`event_copied` 0: set here with a
# new terminal entry, 1 once the caller wrote the copy). The owner stays set (the job has ended: nobody takes
# it again), so that a retry of this step after a lost reply is answered 0, not "lost". The caller then writes
# the copy on vseg:events and XACKs + XDELs the job entry (shared keys: worker/broker/publish.py).
FINISH_LUA = lua("finish", _OWNER_CHECK + """
local n = tonumber(ARGV[6])
local fields = {}
for i = 7, 6 + 2 * n do fields[#fields + 1] = ARGV[i] end
local r = redis.pcall('XADD', KEYS[2], ARGV[2], unpack(fields))
local written = 1
if type(r) == 'table' and r.err then
  if string.find(r.err, 'equal or smaller', 1, true) then written = 0 else return redis.error_reply(r.err) end
end
if written == 1 then redis.call('HSET', KEYS[1], 'event_copied', '0') end
redis.call('HSET', KEYS[1], 'state', ARGV[4], 'finished_at', redis.call('TIME')[1])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[5]) end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return {written, redis.call('HGET', KEYS[1], 'event_copied') == '0' and 1 or 0}
""")

# Hand a job back on shutdown: KEYS: job hash. ARGV: consumer, state (JobState.QUEUED). Gives the attempt back,
# sets the state and clears the owner; the caller then makes the entry look idle for ten leases (XCLAIM ...
# IDLE), so that another worker's XAUTOCLAIM takes it at once. 1 handed back, -1 lease lost, -2 hash gone.
HAND_BACK_LUA = lua("hand_back", _OWNER_CHECK + """
redis.call('HINCRBY', KEYS[1], 'attempt', -1)
redis.call('HSET', KEYS[1], 'state', ARGV[2])
redis.call('HDEL', KEYS[1], 'owner', 'lease_until')
return 1
""")

# Abandon a stalled job: KEYS: job hash. ARGV: consumer, placeholder consumer, error, state (JobState.RETRYING).
# The owner becomes the placeholder with no lease (so this worker's fenced writes are refused from now on, and
# any worker may take it at once); the caller then hands the entry to the placeholder consumer, idle for ten
# leases, for any worker's XAUTOCLAIM. The attempt stays counted. 1 abandoned, -1 lease lost, -2 hash gone.
ABANDON_LUA = lua("abandon", _OWNER_CHECK + """
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'lease_until', 0, 'state', ARGV[4], 'error', ARGV[3])
return 1
""")


class Scripts:
    """The worker's scripts registered on one client (no round trip: registering only hashes the text).
    Call one as `scripts.renew(keys=[...], args=[...])`: EVALSHA, and on NOSCRIPT a SCRIPT LOAD and the
    call again."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.take: Script = register(client, "take")
        self.renew: Script = register(client, "renew")
        self.owns: Script = register(client, "owns")
        self.fenced_xadd: Script = register(client, "fenced_xadd")
        self.fenced_hset: Script = register(client, "fenced_hset")
        self.finish: Script = register(client, "finish")
        self.hand_back: Script = register(client, "hand_back")
        self.abandon: Script = register(client, "abandon")


def run_pipeline(client: redis.Redis, script: Script, calls: list[tuple[list[Any], list[Any]]]) -> list[Any]:
    """Run `script` once per (keys, args) in one pipelined round trip (no transaction), by EVALSHA. On Redis
    Cluster the pipeline sends each call to its key's node (a job's calls all go to one node).
    NOSCRIPT (the server lost its scripts) loads it and sends the whole pipeline again, so every call
    must be safe to repeat (the fenced writes are: their entry ids are fixed). Raises the first error
    any call answered, as a pipeline does."""

    def send() -> list[Any]:
        pipe: Pipeline = client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)  # a cluster pipeline blocks evalsha()
        return pipe.execute(raise_on_error=False)

    replies = send()
    if any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
        script.sha = client.script_load(script.script)
        replies = send()
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies

