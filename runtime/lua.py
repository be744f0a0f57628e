"""Every Lua script the service sends to Redis, in one registry.

A module defines its script with `lua(name, text)` at import time and sends it through `register(client,
name)`, the only place that calls redis-py's `register_script` (EVALSHA; on NOSCRIPT a SCRIPT LOAD and
the call again). `register` refuses a name the registry does not hold, so a script cannot run without
being in `SCRIPTS`, and tests/test_schemas.py checks every script there (none spells a job state or a
stream length: those are arguments) and that no Lua text in the code lies outside it.
"""

from __future__ import annotations

import redis
from redis.commands.core import Script

SCRIPTS: dict[str, str] = {}  # name -> the script's text


def lua(name: str, text: str) -> str:
    """Add the script `name` to the registry and give its text back (a module's constant)."""
    if SCRIPTS.get(name, text) != text:
        raise ValueError(f"two Lua scripts are named {name!r}: give the new one a name of its own")
    SCRIPTS[name] = text
    return text


def register(client: redis.Redis, name: str) -> Script:
    """The registered script `name` on `client`, called as `script(keys=[...], args=[...])` (no round trip:
    registering only hashes the text)."""
    try:
        text = SCRIPTS[name]
    except KeyError:
        raise KeyError(f"no Lua script named {name!r} in runtime/lua.py's registry: define it with lua()") from None
    return client.register_script(text)
