"""What msgspec refused while decoding an entry, as a SchemaError that names the field, the value found
there and msgspec's reason (schemas/messages.py; only on the error path), and the two reads every entry codec shares: a field, the version."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec

from schemas.errors import SchemaError

_STEP = re.compile(r"\.([A-Za-z_]\w*)|\[(\d+)\]")
_NOT_FOUND = object()


def invalid(name: str, error: msgspec.ValidationError, data: Any) -> SchemaError:
    """SchemaError for what msgspec refused: the field's path, the value there, and msgspec's reason.

    msgspec says `Expected `int` >= 1 - at `$.prompts[0].obj_id``; the value is looked up in the
    untyped map (only on this, the error path)."""
    reason, _, where = str(error).partition(" - at `$")
    path = where.rstrip("`")
    if not path:
        return SchemaError(f"{name} message: {reason}")
    value, pos = data, 0
    for step in _STEP.finditer(path):
        if step.start() != pos:  # a step we cannot follow, e.g. a map's key shown as [...]
            value = _NOT_FOUND
            break
        key, index = step.groups()
        pos = step.end()
        try:
            value = value[key] if key is not None else value[int(index)]
        except (LookupError, TypeError):
            value = _NOT_FOUND
            break
    shown = "" if value is _NOT_FOUND or pos != len(path) else f" = {short(value)}"
    return SchemaError(f"{name} message field {path.lstrip('.')}{shown}: {reason}")


def short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def entry_field(fields: Mapping[Any, Any], name: str, what: str) -> Any:
    """Field `name` of a stream entry (str or bytes keys); SchemaError naming it and `what` the entry is."""
    value = fields.get(name, fields.get(name.encode()))
    if value is None:
        raise SchemaError(f"{what} has no {name!r} field; fields present: {sorted(map(str, fields))}")
    return value


def check_version(version: Any, newest: int, what: str, upgrade: str) -> None:
    """A message's schema version `v`: an integer in 1..newest, else SchemaError (`upgrade`: what to do)."""
    if not isinstance(version, int) or isinstance(version, bool):
        raise SchemaError(f"{what} data has no integer schema version 'v' (got {version!r})")
    if version < 1 or version > newest:
        raise SchemaError(f"{what} message has schema version {version}, but this reader supports 1..{newest}; "
                          f"{upgrade}")
