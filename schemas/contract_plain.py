"""The contract's two hand-written schemas, of the plain field/value streams (not msgpack `data`):
`vseg:frames:{job_id}` (frames-stream.schema.json) and `vseg:dead` (dead-letter.schema.json). Their entries are
Redis strings, so each field is a string, with a pattern where it holds a number. schemas/contract.py writes
them beside the generated ones and validates entries against them (`validate_plain`).
"""

from __future__ import annotations

from typing import Any

from schemas.messages import SCHEMA_VERSION

DRAFT = "https://json-schema.org/draft/2020-12/schema"
BYTES_NOTE = "msgpack bin (bytes) on the wire; a base64 string in the JSON form these schemas check"
NUMBER, COUNT = r"^-?[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?$", r"^[0-9]+$"  # numbers in a plain stream's strings


def _plain(names: dict[str, tuple[str, str]], required: list[str], title: str) -> dict[str, Any]:
    props = {k: {"type": "string", "description": d, **({"pattern": p} if p else {})} for k, (p, d) in names.items()}
    return {"title": title, "type": "object", "properties": props, "required": required}


def frames_schema() -> dict[str, Any]:
    """`vseg:frames:{job_id}`'s entries (producer/announce.py, producer/live_submit.py): one of five shapes."""
    at = (NUMBER, "Unix time the producer announced it (latency runs from it)")
    ingest = (COUNT, "a live job: frames its producer dropped at ingest so far")
    reason = ("", "why (at most 200 characters)")
    shapes = {
        "frame_announced": _plain({"frame_idx": (COUNT, "k: its JPEG is on disk (entry id (k+1)-0)"), "at": at,
                                   "captured_at": (NUMBER, "a live job: Unix time the frame was received"),
                                   "pts": (NUMBER, "a live job whose source has timestamps: its timestamp, seconds"),
                                   "dropped_at_ingest": ingest}, ["frame_idx", "at"], "A frame announced"),
        "source_down": _plain({"down_since": (NUMBER, "Unix time of the last frame before the outage"),
                               "reason": reason}, ["down_since", "reason"], "A live source's outage began (id N-1)"),
        "source_up": _plain({"outage_s": (NUMBER, "how long it was down, seconds"), "reason": reason},
                            ["outage_s", "reason"], "A live source is back (id N-2, or N-1)"),
        "frames_end": _plain({"end": (COUNT, "the total N (entry id (N+1)-0)"), "dropped_at_ingest": ingest},
                             ["end"], "The end marker"),
        "frames_error": _plain({"error": ("", "why decoding failed or stopped; a worker's `producer lost: ...`")},
                               ["error"], "The error marker: it closes the stream"),
    }
    return {"$schema": DRAFT, "$id": f"urn:vseg:contract:v{SCHEMA_VERSION}:frames-stream",
            "title": "`vseg:frames:{job_id}` entry", "description": "Plain field/value pairs (Redis strings; numbers "
            "in decimal), not msgpack `data`: one of the shapes in `$defs`.",
            "oneOf": [{"$ref": f"#/$defs/{k}"} for k in shapes], "$defs": shapes}


def dead_letter_schema() -> dict[str, Any]:
    """`vseg:dead`'s entries (worker/broker/dead_letter.py)."""
    schema = _plain({
        "type": ("", "the original entry's `type` (when it had one)"),
        "data": ("", f"the original entry's `data`: {BYTES_NOTE}"),
        "error": ("", "why it was dead-lettered"), "error_type": ("", "the error's class name"),
        "source_stream": ("", "where it came from (`vseg:jobs`)"), "source_id": ("", "its entry id there"),
        "attempts": (COUNT, "runs made; 0 for poison"), "worker": ("", "who dead-lettered it"),
        "at": (NUMBER, "Unix time")}, ["error", "error_type", "source_stream", "source_id", "attempts", "worker", "at"],
        "`vseg:dead` entry")
    schema["properties"]["data"]["contentEncoding"] = "base64"
    return {"$schema": DRAFT, "$id": f"urn:vseg:contract:v{SCHEMA_VERSION}:dead-letter", **schema,
            "description": "Plain field/value pairs, not msgpack `data`: the original entry's fields plus why. A dead "
                           "job (one whose entry names a job id) also gets a `dead` terminal entry."}


PLAIN = {"frames": ("frames-stream.schema.json", frames_schema), "dead": ("dead-letter.schema.json", dead_letter_schema)}
