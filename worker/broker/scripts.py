"""Every Lua script the worker runs, registered once per client and run by EVALSHA.

Each script checks, in the same atomic step as its write, that this worker still owns the job entry
(its place in the consumer group's pending list, worker/broker/lease.py). Registered scripts are sent
by their SHA1 (EVALSHA), so a frame's fenced write carries its arguments and 40 bytes, not the
script's text; a server that does not know a script (restarted empty, SCRIPT FLUSH) answers NOSCRIPT,
and the script is loaded again and the call sent again (redis-py's `Script` does this for a direct
call; `run_pipeline` for a pipeline, where redis-py's own way costs a SCRIPT EXISTS round trip on
every execute).

No script spells a job state or the events stream's length: both are arguments (JobState,
EVENTS_MAXLEN), so the wire strings live in one place (schemas/names.py).
"""

from __future__ import annotations

from typing import Any

import redis
from redis.client import Pipeline
from redis.commands.core import Script

_OWNER_CHECK = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return -1 end
"""

# KEYS: jobs stream. ARGV: group, entry id, consumer. 1 renewed, -1 lost.
RENEW_LUA = _OWNER_CHECK + """
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"""

# KEYS: jobs stream, target stream, job hash. ARGV: group, entry id, consumer, target entry id, a job hash
# field to set with the entry and its value ('' and '': none; frames set frames_done, object changes
# control_done), MAXLEN ('': untrimmed; a live job's results: about that many entries are kept), then the
# entry's field/value pairs. Returns {status, cancel}: status 1 written, 0 duplicate id (already there:
# rejected by Redis), -1 lease lost (nothing written).
FENCED_XADD_LUA = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return {-1, 0} end
local status = 1
local r
if ARGV[7] ~= '' then
  r = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[7]), ARGV[4], unpack(ARGV, 8))
else
  r = redis.pcall('XADD', KEYS[2], ARGV[4], unpack(ARGV, 8))
end
if type(r) == 'table' and r.err then
  if string.find(r.err, 'equal or smaller', 1, true) then status = 0 else return redis.error_reply(r.err) end
end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[3], ARGV[5], ARGV[6]) end
local cancel = redis.call('HGET', KEYS[3], 'cancel')
return {status, cancel == '1' and 1 or 0}
"""

# KEYS: jobs stream, job hash. ARGV: group, entry id, consumer, then field/value pairs. 1 or -1 lost.
FENCED_HSET_LUA = _OWNER_CHECK + """
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
return 1
"""

# The one terminal step: KEYS: jobs stream, results stream, job hash, events stream. ARGV: group, entry id, consumer,
# terminal entry id, ttl_s, state (a terminal JobState), error, events MAXLEN (EVENTS_MAXLEN), n_fields, field/value
# pairs of the entry. Writes the terminal entry (and its copy on the events stream), the final state, the expiry,
# acknowledges and deletes the job entry. Returns 1 written, 0 already there, -1 lease lost.
FINISH_LUA = _OWNER_CHECK + """
local n = tonumber(ARGV[9])
local fields = {}
for i = 10, 9 + 2 * n do fields[#fields + 1] = ARGV[i] end
local r = redis.pcall('XADD', KEYS[2], ARGV[4], unpack(fields))
local written = 1
if type(r) == 'table' and r.err then
  if string.find(r.err, 'equal or smaller', 1, true) then written = 0 else return redis.error_reply(r.err) end
end
if written == 1 then redis.call('XADD', KEYS[4], 'MAXLEN', '~', tonumber(ARGV[8]), '*', unpack(fields)) end
redis.call('HSET', KEYS[3], 'state', ARGV[6], 'finished_at', redis.call('TIME')[1])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[3], 'error', ARGV[7]) end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[5]))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return written
"""

# Hand a job back on shutdown: KEYS: jobs stream, job hash. ARGV: group, entry id, consumer, idle ms, state
# (JobState.QUEUED). Gives the attempt back, sets the state, and makes the entry look idle for a whole lease,
# so another worker's XAUTOCLAIM takes it at once. 1 handed back, -1 lease lost.
HAND_BACK_LUA = _OWNER_CHECK + """
redis.call('HINCRBY', KEYS[2], 'attempt', -1)
redis.call('HSET', KEYS[2], 'state', ARGV[5])
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'IDLE', ARGV[4], 'JUSTID')
return 1
"""

# Abandon a stalled job: KEYS: jobs stream, job hash. ARGV: group, entry id, consumer, placeholder consumer,
# idle ms, error, state (JobState.RETRYING). Hands the entry to the placeholder consumer (so this worker's fenced
# writes are refused from now on), idle long enough for any worker's XAUTOCLAIM to take it at once. The attempt
# stays counted. 1 abandoned, -1 lease lost.
ABANDON_LUA = _OWNER_CHECK + """
redis.call('HSET', KEYS[2], 'state', ARGV[7], 'error', ARGV[6])
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[4], 0, ARGV[2], 'IDLE', ARGV[5], 'JUSTID')
return 1
"""


class Scripts:
    """The worker's scripts registered on one client (no round trip: registering only hashes the text).
    Call one as `scripts.renew(keys=[...], args=[...])`: EVALSHA, and on NOSCRIPT a SCRIPT LOAD and the
    call again."""

    def __init__(self, client: redis.Redis) -> None:
        self.renew: Script = client.register_script(RENEW_LUA)
        self.fenced_xadd: Script = client.register_script(FENCED_XADD_LUA)
        self.fenced_hset: Script = client.register_script(FENCED_HSET_LUA)
        self.finish: Script = client.register_script(FINISH_LUA)
        self.hand_back: Script = client.register_script(HAND_BACK_LUA)
        self.abandon: Script = client.register_script(ABANDON_LUA)


def run_pipeline(client: redis.Redis, script: Script, calls: list[tuple[list[Any], list[Any]]]) -> list[Any]:
    """Run `script` once per (keys, args) in one pipelined round trip (no transaction), by EVALSHA.
    NOSCRIPT (the server lost its scripts) loads it and sends the whole pipeline again, so every call
    must be safe to repeat (the fenced writes are: their entry ids are fixed). Raises the first error
    any call answered, as a pipeline does."""

    def send() -> list[Any]:
        pipe: Pipeline = client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        return pipe.execute(raise_on_error=False)

    replies = send()
    if any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
        script.sha = client.script_load(script.script)
        replies = send()
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies

