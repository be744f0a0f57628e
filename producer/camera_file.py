"""Writing a camera's zones and lines back into cameras.yaml (the viewer's "save", producer/ui), keeping
the file as its operator wrote it: comments, order and quoting stay (ruamel.yaml's round trip; PyYAML would
drop every comment). The new file is checked as the daemon reads it (`load_cameras`) before it replaces
the old one, atomically (a temporary file beside it, then a rename), with the old file's mode: a refused
save leaves the file unchanged and says why (ZoneError or ConfigError)."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.util import load_yaml_guess_indent

from producer.cameras import Camera, load_cameras
from producer.zones import ZoneSet
from runtime.settings import Settings
from schemas.errors import ConfigError


def _flow(points: list[list[float]]) -> CommentedSeq:
    seq = CommentedSeq([CommentedSeq([_number(v) for v in p]) for p in points])
    for item in seq:
        item.fa.set_flow_style()
    seq.fa.set_flow_style()
    return seq


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def save_camera_zones(path: Path, name: str, zones: ZoneSet, settings: Settings,
                      environ: Mapping[str, str]) -> Camera:
    """Set camera `name`'s `zones` and `lines` in `path` to `zones` (removing either when empty); returns the
    camera as the daemon now reads it."""
    yaml = YAML()  # round trip
    yaml.preserve_quotes = True
    try:
        text = path.read_text()
        _, indent, dash = load_yaml_guess_indent(text)
        doc: Any = yaml.load(text)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the cameras file ({e.strerror or e})") from e
    yaml.indent(mapping=dash or 2, sequence=indent or 2, offset=dash or 0)  # the file's own indentation
    entries = doc.get("cameras") if isinstance(doc, Mapping) else None
    entry: Any = next((c for c in entries or [] if isinstance(c, Mapping) and c.get("name") == name), None)
    if entry is None:
        raise ConfigError(f"{path}: no camera named {name!r} (it may have been removed from the file)")
    for field, items in (("zones", {z.name: [list(p) for p in z.points] for z in zones.zones}),
                         ("lines", {ln.name: [list(ln.a), list(ln.b)] for ln in zones.lines})):
        if items:
            entry[field] = CommentedMap((key, _flow(points)) for key, points in items.items())
        elif field in entry:
            del entry[field]
    out = io.StringIO()
    yaml.dump(doc, out)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(out.getvalue())
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        try:
            camera = load_cameras(Path(tmp), settings, environ)[name]  # as the daemon will read it, or refused
        except ConfigError as e:
            raise type(e)(str(e).replace(tmp, str(path))) from None
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return camera
