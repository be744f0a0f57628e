"""The contract as files: a JSON Schema per entry type and an AsyncAPI document, generated from the Structs.

What: `python -m schemas.contract` writes `schemas/contract/`: `<type>.schema.json` (JSON Schema draft
2020-12) for the `data` map of each entry type (job, frame, ... update; `alert`, the zone events of
schemas/alerts.py, whose `type` field is the event's kind), two hand-written ones for the plain field/value
streams (schemas/contract_plain.py: `frames-stream.schema.json`, `dead-letter.schema.json`), and `asyncapi.yaml`
(AsyncAPI 3.0: every stream, its messages, who writes and who reads). `--check` writes nothing and exits
1 naming each stale file. `validate_entry` checks a raw stream entry against the committed schema of its
type (`validate_plain` one of a plain stream), raising SchemaError naming the type and the field.

Why: backends with their own Redis clients, in any language, read the contract with their own tools
(code generators, validators, AsyncAPI viewers) instead of from prose. Generated from schemas/messages.py,
never edited by hand, so it cannot drift from the codec; tests/test_contract.py checks the files are
current, that the README's table agrees, and that every entry of real runs validates.

How the wire maps to a schema: `required` lists the fields the current writer always writes
(`x-always-present`): every field of a Struct, except in Structs declared `omit_defaults=True`
(ObjectResult), which leave out fields at their defaults. A field that may be null has
`anyOf [..., {"type": "null"}]`. `default` is what a reader fills in for a field a writer left out; readers
ignore fields they do not know, so `additionalProperties` stays open. Each field's description is its
trailing comment in the source (the comments are the documentation). `data` is msgpack on the wire; these
schemas check its JSON form (msgspec's: bytes such as an RLE's `counts` become base64 strings).
"""

from __future__ import annotations

import argparse
import ast
import base64
import dataclasses
import functools
import inspect
import io
import json
import sys
import tokenize
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from schemas import messages
from schemas.alerts import ALERT_TYPES, AlertEvent
from schemas.contract_plain import BYTES_NOTE, DRAFT, PLAIN, dead_letter_schema, frames_schema
from schemas.errors import SchemaError
from schemas.names import JOB_ID_PATTERN
from schemas.prompts import ObjectPrompt
from schemas.rle import Rle

CONTRACT_DIR = Path(__file__).resolve().parent / "contract"
SCHEMA_FORMAT = "application/schema+json;version=draft-2020-12"
TYPES: dict[str, Any] = {**{t.value: cls for t in messages.EntryType for cls in typing.get_args(messages.Message)
                            if cls.TYPE is t}, "alert": AlertEvent}  # alert: zone and line events (schemas/alerts.py)
WIRE = {name: (name,) for name in TYPES} | {"alert": ALERT_TYPES}  # each type's `type` field: an alert's is its kind
NESTED: dict[str, Any] = {c.__name__: c for c in (ObjectPrompt, messages.AutoOptions, messages.ObjectResult, Rle)}
# The Structs without a docstring of their own, said here (the others' descriptions are their docstrings).
ABOUT = {
    "started": "An attempt of a job began (a live job's: when it processed its first frame).",
    "progress": "A job's progress, every `progress_every` frames and at the last (and from a live job's producer).",
    "completed": "Terminal: the job finished; every frame has its entry.",
    "failed": "Terminal: the job failed with a permanent error (or a transient one, out of attempts, ends `dead`).",
}

# Streams: channel id -> (address, what it holds, its messages). Who writes and who reads: OPERATIONS.
RESULTS = ["started", "frame", "object", "update", "completed", "failed", "cancelled", "dead"]
EVENTS = ["started", "progress", "object", "completed", "failed", "cancelled", "dead"]
FRAMES = ["frame_announced", "source_down", "source_up", "frames_end", "frames_error"]
CHANNELS: dict[str, tuple[str, str, list[str]]] = {
    "jobs": ("vseg:jobs", "Jobs in flight, read by the consumer group `vseg:workers`; acknowledged and deleted "
             "when done.", ["job"]),
    "results": ("vseg:results:{job_id}", "One job's results in order: `started` at id 0-1, frame k at (k+1)-0, "
                "`object` and `update` entries just before the frame they take effect on, one terminal entry at "
                "9007199254740991-0 (2^53 - 1).", RESULTS),
    "events": ("vseg:events", "Every job's `started`, `progress`, `object` and a copy of its terminal entry (at "
               "least once); read it with your own consumer group.", EVENTS),
    "control": ("vseg:control:{job_id}", "Commands for a running or queued job, applied in order.",
                ["prompt", "remove"]),
    "dead": ("vseg:dead", "Messages that could not be processed: poison, and jobs out of attempts. Plain "
             "field/value pairs, not msgpack `data`.", ["dead_letter"]),
    "frames": ("vseg:frames:{job_id}", "A streamed job's frames as they are decoded (or captured), its live "
               "source's outages, then an end or error marker. Plain field/value pairs, not msgpack `data`.", FRAMES),
    "alerts": ("vseg:alerts", "Every job's zone and line events (`python -m producer alerts`), at least once: a "
               "`key` seen before is a duplicate; read it with your own consumer group.", ["alert"]),
    "job_alerts": ("vseg:job:{job_id}:alerts", "One job's zone and line events, the same entries as on vseg:alerts; "
                   "they expire with the job's results.", ["alert"]),
}
# (role, action, channel, messages): `send` writes (XADD), `receive` reads; the README's table says the same.
OPERATIONS: list[tuple[str, str, str, list[str]]] = [
    ("producer", "send", "jobs", ["job"]),
    ("worker", "receive", "jobs", ["job"]),
    ("worker", "send", "results", RESULTS),
    ("producer", "send", "results", ["cancelled"]),  # `cancel` of a queued job
    ("backend", "receive", "results", RESULTS),
    ("worker", "send", "events", EVENTS),
    ("producer", "send", "events", ["progress", "cancelled"]),  # a live source's outages; `cancel` of a queued job
    ("backend", "receive", "events", EVENTS),
    ("producer", "send", "control", ["prompt", "remove"]),
    ("worker", "receive", "control", ["prompt", "remove"]),
    ("worker", "send", "dead", ["dead_letter"]),
    ("backend", "receive", "dead", ["dead_letter"]),
    ("producer", "send", "alerts", ["alert"]), ("producer", "send", "job_alerts", ["alert"]),  # producer/alerts.py
    ("backend", "receive", "alerts", ["alert"]), ("backend", "receive", "job_alerts", ["alert"]),
    ("producer", "send", "frames", FRAMES),
    ("worker", "send", "frames", ["frames_error"]),  # `producer lost: ...`, which closes the stream
    ("worker", "receive", "frames", FRAMES),
]


@functools.cache
def _parsed(path: str) -> tuple[list[str], dict[int, str], ast.Module]:
    """A source file's lines, its comments by line number, and its syntax tree."""
    source = Path(path).read_text()
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    return source.splitlines(), comments, ast.parse(source)


def field_comments(cls: Any) -> dict[str, str]:
    """Each field's comment in `cls`'s source: its trailing comment (and the comment lines right after it when
    the next field has one of its own), else the comment lines right above it."""
    lines, comments, tree = _parsed(inspect.getsourcefile(cls) or "")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    names = set(always_present(cls))
    fields = [n for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
              and n.target.id in names]

    def own(n: ast.AnnAssign) -> list[str]:
        return [comments[k] for k in range(n.lineno, (n.end_lineno or n.lineno) + 1) if k in comments]

    def block(first: int, step: int) -> list[str]:
        found = []
        while 0 < first <= len(lines) and lines[first - 1].strip().startswith("#"):
            found.append(comments[first])
            first += step
        return found[::step]

    out: dict[str, str] = {}
    for i, n in enumerate(fields):
        name = n.target.id  # type: ignore[union-attr]
        nxt = fields[i + 1] if i + 1 < len(fields) else None
        text = own(n)
        if text and (nxt is None or own(nxt)):
            text += block((n.end_lineno or n.lineno) + 1, 1)
        elif not text:
            text = block(n.lineno - 1, -1)
        if text:
            out[name] = " ".join(text)
    return out


def always_present(cls: Any) -> dict[str, bool]:
    """Whether the writer writes each field of `cls` whatever its value: msgspec writes every field of a Struct
    or dataclass, but a Struct with `omit_defaults` leaves out a field at its default; a TypedDict has its keys."""
    if isinstance(cls, type) and issubclass(cls, msgspec.Struct):
        omit = cls.__struct_config__.omit_defaults
        return {f.name: not omit or f.required for f in msgspec.structs.fields(cls)}
    if dataclasses.is_dataclass(cls):
        return {f.name: True for f in dataclasses.fields(cls)}
    return {name: name in cls.__required_keys__ for name in typing.get_type_hints(cls)}


def annotate(schema: dict[str, Any], cls: Any) -> None:
    """`required` and each property's `x-always-present` and description, from `cls` and its source."""
    present, said = always_present(cls), field_comments(cls)
    schema["required"] = [name for name, yes in present.items() if yes]
    for name, prop in schema["properties"].items():
        if name in said or not present[name]:
            prop["description"] = " ".join((said.get(name, ""), "" if present[name] else
                                            "(left out when at its default: omit_defaults)")).strip()
        prop["x-always-present"] = present[name]


def entry_schema(name: str) -> dict[str, Any]:
    """The JSON Schema of entry type `name`'s `data` map."""
    cls = TYPES[name]
    (_ref,), defs = msgspec.json.schema_components([cls], ref_template="#/$defs/{name}")
    top = defs.pop(cls.__name__)
    for def_name, nested in defs.items():
        if def_name not in NESTED:
            raise SchemaError(f"{cls.__name__} has a nested type {def_name} that schemas/contract.py does not know: "
                              f"add it to NESTED")
        annotate(nested, NESTED[def_name])
    annotate(top, cls)
    if "Rle" in defs:
        defs["Rle"].update(description="A mask as COCO RLE: pycocotools.mask.decode reads it. `size`: [height, width]")
        defs["Rle"]["properties"]["counts"]["description"] = f"COCO's compressed counts: {BYTES_NOTE}."
    props = top["properties"]
    props["job_id"].update(pattern=JOB_ID_PATTERN.pattern, **{"not": {"pattern": r"\.\."}},
                           description="1-64 letters, digits, '_', '.', '-', starting with a letter or digit, "
                                       "without '..' (schemas/names.py)")
    props["v"].update(minimum=1, maximum=messages.SCHEMA_VERSION,
                      description=f"schema version; readers accept 1..theirs (now {messages.SCHEMA_VERSION})")
    doc = " ".join((cls.__doc__ or ABOUT[name]).split())
    writers = sorted({role for role, action, _c, msgs in OPERATIONS if action == "send" and name in msgs})
    streams = [CHANNELS[c][0] for c, (_a, _d, msgs) in CHANNELS.items() if name in msgs]
    return {
        "$schema": DRAFT,
        "$id": f"urn:vseg:contract:v{messages.SCHEMA_VERSION}:{name}",
        "title": f"`{name}` entry data ({cls.__name__})",
        "description": f"{doc} On {', '.join(streams)}, written by {' and '.join(writers)}: the entry's `type` "
                       f"field is {' or '.join(f'`{t}`' for t in WIRE[name])} and its `data` field this map (msgpack on the wire; this schema checks "
                       f"its JSON form, where bytes are base64 strings). `required` lists the fields the current "
                       f"writer always writes (`x-always-present`); a reader fills a missing field that has a "
                       f"`default` with it, and ignores fields it does not know."
                       + (" The reader also checks what a schema does not say: prompt shapes (schemas/prompts.py)."
                          if "prompts" in props else ""),
        **{k: v for k, v in top.items() if k not in ("title", "description")},
        **({"$defs": defs} if defs else {}),
    }


def message_object(name: str) -> dict[str, Any]:
    if name in TYPES:
        schema = entry_schema(name)
        return {"name": name, "title": schema["title"], "summary": schema["description"].split(". ")[0] + ".",
                "contentType": "application/msgpack",
                "headers": {"type": "object", "required": ["type", *(["key"] if name == "alert" else [])],
                            "properties": {"type": {"const": name} if WIRE[name] == (name,) else {"enum": list(WIRE[name])},
                                           **({"key": {"type": "string"}} if name == "alert" else {})},
                            "description": "The entry's `type` field (and an alert's `key`); the payload is its `data` "
                                           "field."},
                "payload": {"schemaFormat": SCHEMA_FORMAT, "schema": {"$ref": f"./{name}.schema.json"}}}
    dead = name == "dead_letter"
    ref = "./dead-letter.schema.json" if dead else f"./frames-stream.schema.json#/$defs/{name}"
    title = dead_letter_schema()["title"] if dead else frames_schema()["$defs"][name]["title"]
    return {"name": name, "title": title, "summary": "Plain field/value pairs (not msgpack `data`).",
            "payload": {"schemaFormat": SCHEMA_FORMAT, "schema": {"$ref": ref}}}


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document: channels (streams), messages (entry types), operations (who does what)."""
    channels: dict[str, Any] = {}
    for cid, (address, about, msgs) in CHANNELS.items():
        channels[cid] = {"address": address, "description": about,
                         "messages": {m: {"$ref": f"#/components/messages/{m}"} for m in msgs}}
        if "{job_id}" in address:
            channels[cid]["parameters"] = {"job_id": {
                "description": "The job id; the braces are literal in the key (its Redis Cluster hash tag)."}}
    operations = {f"{role}_{action}_{cid}": {
        "action": action, "channel": {"$ref": f"#/channels/{cid}"}, "tags": [{"name": role}],
        "summary": f"The {role} {'writes' if action == 'send' else 'reads'} {', '.join(msgs)} "
                   f"{'to' if action == 'send' else 'from'} {CHANNELS[cid][0]}.",
        "messages": [{"$ref": f"#/channels/{cid}/messages/{m}"} for m in msgs]}
        for role, action, cid, msgs in OPERATIONS}
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "vseg: streaming video segmentation over Redis streams",
                 "version": str(messages.SCHEMA_VERSION),
                 "description": "Generated by `python -m schemas.contract` from schemas/messages.py: do not edit. "
                                "Every entry on vseg:jobs, vseg:results:{job_id}, vseg:events and vseg:control:{job_id} "
                                "has two fields, `type` (the message name) and `data` (a msgpack map, the payload); "
                                "an alert's (vseg:alerts) has a third, `key`. "
                                "Names are under `key_prefix` (`vseg`). One document for three roles, each "
                                "operation tagged with its role: producer, worker, backend (your client). `send` "
                                "writes the stream (XADD), `receive` reads it (XREAD, XREADGROUP)."},
        "defaultContentType": "application/msgpack",
        "servers": {"redis": {"host": "localhost:6379", "protocol": "redis",
                              "description": "REDIS_URL (a Redis Cluster works too: a job's keys share a slot)"}},
        "channels": channels,
        "operations": operations,
        "components": {"messages": {m: message_object(m) for c in CHANNELS.values() for m in c[2]}},
    }


def render() -> dict[str, str]:
    """Every file of schemas/contract/, by name, as `python -m schemas.contract` writes it."""
    import yaml

    files = {f"{name}.schema.json": entry_schema(name) for name in TYPES}
    files.update({file: make() for file, make in PLAIN.values()})
    out = {name: json.dumps(schema, indent=2, ensure_ascii=False) + "\n" for name, schema in files.items()}
    head = "# Generated by `python -m schemas.contract` from schemas/messages.py: do not edit.\n"
    out["asyncapi.yaml"] = head + yaml.safe_dump(asyncapi(), sort_keys=False, allow_unicode=True, width=110)
    return out


def stale_files(directory: Path = CONTRACT_DIR) -> list[str]:
    """The files of `directory` that differ from what would be generated (missing, changed, or not generated)."""
    files = render()
    stale = [name for name, text in files.items()
             if not (directory / name).is_file() or (directory / name).read_text() != text]
    extra = [p.name for p in sorted(directory.glob("*.schema.json")) if p.name not in files]
    return stale + extra


def write(directory: Path = CONTRACT_DIR) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    changed, files = stale_files(directory), render()
    for name in changed:
        if name in files:
            (directory / name).write_text(files[name])
        else:  # a type that is gone
            (directory / name).unlink()
    return changed


@functools.cache
def _validator(file: str, directory: Path = CONTRACT_DIR) -> Any:
    from jsonschema import Draft202012Validator

    path = directory / file
    if not path.is_file():
        raise SchemaError(f"no schema {path}: run python -m schemas.contract")
    return Draft202012Validator(json.loads(path.read_text()))


def _check(validator: Any, doc: Any, what: str, file: str) -> None:
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        said = "; ".join(f"field {'.'.join(map(str, e.absolute_path)) or '(the map)'}: {e.message}" for e in errors[:5])
        raise SchemaError(f"{what} does not match schemas/contract/{file}: {said}")


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)


def validate_entry(fields: Mapping[Any, Any], directory: Path = CONTRACT_DIR) -> None:
    """Check a raw stream entry (`{b"type": ..., b"data": msgpack bytes}`) against its type's committed schema,
    in its JSON form (bytes as base64); raise SchemaError naming the entry type and the failing field."""
    raw_type, data = fields.get(b"type", fields.get("type")), fields.get(b"data", fields.get("data"))
    if raw_type is None or data is None:
        raise SchemaError(f"stream entry needs `type` and `data` fields; got {sorted(map(_text, fields))}")
    name = next((n for n, wire in WIRE.items() if _text(raw_type) in wire), _text(raw_type))
    if name not in TYPES:
        raise SchemaError(f"unknown entry type {name!r}; expected one of {sorted(TYPES)}")
    try:
        doc = msgspec.json.decode(msgspec.json.encode(msgspec.msgpack.decode(data)))
    except (msgspec.DecodeError, TypeError) as e:
        raise SchemaError(f"{name} entry's data is not a msgpack map with string keys: {e}") from None
    _check(_validator(f"{name}.schema.json", directory), doc, f"{name} entry", f"{name}.schema.json")


def validate_plain(stream: str, fields: Mapping[Any, Any], directory: Path = CONTRACT_DIR) -> None:
    """Check an entry of a plain field/value stream, `frames` (vseg:frames:{job_id}) or `dead` (vseg:dead)."""
    doc = {_text(k): base64.b64encode(v).decode() if _text(k) == "data" and isinstance(v, bytes) else _text(v)
           for k, v in fields.items()}
    file = PLAIN[stream][0]
    _check(_validator(file, directory), doc, f"{stream} stream entry", file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas.contract",
                                     description="Writes schemas/contract/ from the Structs of schemas/messages.py.")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each stale file")
    parser.add_argument("--out", type=Path, default=CONTRACT_DIR, help="the folder (default: schemas/contract)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        print("".join(f"stale: {args.out / n} (run python -m schemas.contract)\n" for n in stale), end="", file=sys.stderr)
        return 1 if stale else 0
    print("".join(f"wrote {args.out / n}\n" for n in write(args.out)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
