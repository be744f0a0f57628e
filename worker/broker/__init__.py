"""The worker's side of Redis: claiming and handing back job entries, leases, fenced writes (Lua registered
once, run by EVALSHA), result entries, retry bookkeeping, dead letters, the worker's client."""
