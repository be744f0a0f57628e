"""The worker's side of Redis: leases and fenced writes (Lua registered once, run by EVALSHA), result entries,
the worker's client."""
