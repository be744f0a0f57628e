"""The camera fleet's file (`cameras.yaml`, read by `python -m producer serve`): one typed `Camera` per
entry, every field checked when the file is read; a camera's Redis keys (`CameraKeys`: its job counter,
state and lease) and its lease (`Leases`: which daemon runs it).

    cameras:
      - name: gate                      # unique; its jobs are gate-1, gate-2, ...
        url: rtsp://10.0.0.7/stream1    # a live URL (or /dev/videoN), without a password in it
        username: viewer                # credentials by reference: password_env or password_file
        password_env: GATE_PASSWORD
        prompts: ["--point 1:320,240", "--box 2:10,20,200,220"]
        auto: {every: 2s, max_objects: 4}   # or auto: true; labels: [person, car]
        text: [person, car]             # or: every instance of each phrase (SAM 3), instead of prompts and auto
        max_latency_s: 1.0              # default VSEG_MAX_LATENCY_S
        outage_s: null                  # null: wait for the source for ever; default VSEG_SOURCE_OUTAGE_S
        enabled: true
        zones: {door: [[0, 0], [200, 0], [200, 300], [0, 300]]}   # events: python -m producer alerts
        lines: {gate: [[0, 400], [640, 400]]}   # in: from its left to its right, looking from its 1st point

A refusal is one line naming the file, the camera and the field (ConfigError). The password is read
when the file is (at start and on SIGHUP) and put into the URL in this process only (`Camera.source`):
it is never in a repr, a log line, argv or Redis (`Camera.shown` is the URL redacted).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import redis
import yaml

from producer.auto_args import every
from producer.live_source import LIVE_SCHEMES, redacted, with_credentials
from producer.prompts import build_prompts
from producer.zones import NO_ZONES, ZoneSet, from_config
from runtime.lua import lua, register
from runtime.settings import Settings
from schemas.errors import ConfigError, JobIdError, PromptError, ZoneError
from schemas.messages import AutoOptions
from schemas.names import hash_tag, validate_job_id
from schemas.prompts import ObjectPrompt

FOREVER_S = 10 * 365 * 24 * 3600.0  # `outage_s: null`: the source is waited for, for all practical purposes, for ever
FIELDS = ("name", "url", "username", "password_env", "password_file", "prompts", "auto", "labels", "text", "fps",
          "max_latency_s", "outage_s", "enabled", "zones", "lines")
AUTO_FIELDS = ("every", "max_objects", "min_area", "roi", "keep")
_DEVICE = re.compile(r"/dev/video\d+")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)$")
_LONGEST_SEQ = "9999999999"  # a name leaves room for this many digits of job number in a 64-character job id


@dataclass(frozen=True)
class Camera:
    """One camera as the file says it, checked. Equal cameras (password included) are left running on SIGHUP."""

    name: str
    url: str  # as written: no password in it
    username: str = ""
    password: str = field(default="", repr=False)  # read from password_env or password_file
    prompts: tuple[ObjectPrompt, ...] = ()
    auto: AutoOptions | None = None
    labels: tuple[str, ...] = ()
    text: tuple[str, ...] = ()  # phrases whose every instance is tracked (SAM 3 workers)
    fps: float | None = None  # None: the source's own rate
    max_latency_s: float = 2.0
    outage_s: float | None = 60.0  # None: wait for the source for ever
    enabled: bool = True
    # Not compared: new zones (SIGHUP, the viewer's save) are handed to the running job, which runs on
    zones: ZoneSet = field(default=NO_ZONES, compare=False)

    @property
    def source(self) -> str:
        """The URL with the credentials in it: for this process's reader only, never shown."""
        return with_credentials(self.url, self.username, self.password) if self.username else self.url

    @property
    def shown(self) -> str:
        """The URL as logs and Redis may show it."""
        return redacted(self.url)

    def scrub(self, text: str) -> str:
        """`text` (an error's message) with this camera's password and credentials hidden."""
        if self.password:
            text = text.replace(self.password, "***").replace(quote(self.password, safe=""), "***")
        return redacted(text)

    def settings_for(self, settings: Settings) -> Settings:
        """The settings this camera's jobs run with: its latency budget and its outage limit."""
        return dataclasses.replace(settings, max_latency_s=self.max_latency_s,
                                   source_outage_s=FOREVER_S if self.outage_s is None else self.outage_s)


@dataclass(frozen=True)
class CameraKeys:
    """A camera's Redis keys, under the service's prefix and the camera's hash tag (each is used alone)."""

    prefix: str

    @property
    def index(self) -> str:
        """Sorted set of the camera names the daemons serve, scored by when one last said so (Unix time)."""
        return f"{self.prefix}:cameras"

    def state(self, name: str) -> str:
        """Hash with the camera's state as its daemon publishes it (expires unless refreshed)."""
        return f"{self.prefix}:camera:{hash_tag(name)}"

    def seq(self, name: str) -> str:
        """Counter of the camera's jobs: job `<name>-<n>` for n = INCR."""
        return f"{self.prefix}:camera:{hash_tag(name)}:seq"

    def lease(self, name: str) -> str:
        """Which daemon runs the camera: its owner id, with a TTL of one lease."""
        return f"{self.prefix}:camera:{hash_tag(name)}:lease"


# KEYS: the camera's lease. ARGV: this daemon's id, the lease in ms. 1: renewed; 0: another holds it (or none).
_RENEW_LUA = lua("camera_lease_renew", """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
""")
# KEYS: the camera's lease. ARGV: this daemon's id. 1: released; 0: not ours (nothing done).
_RELEASE_LUA = lua("camera_lease_release", """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""")


class Leases:
    """Which daemon runs a camera: `lease(name)` holds its id (SET NX PX), renewed by compare-and-set; the
    holder stops the camera once a renewal is refused (producer/fleet.py)."""

    def __init__(self, client: redis.Redis, keys: CameraKeys, owner: str, lease_s: float) -> None:
        self.client, self.keys, self.owner, self.lease_ms = client, keys, owner, int(lease_s * 1000)
        self._renew = register(client, "camera_lease_renew")
        self._release = register(client, "camera_lease_release")

    def acquire(self, name: str) -> bool:
        return bool(self.client.set(self.keys.lease(name), self.owner, nx=True, px=self.lease_ms))

    def renew(self, name: str) -> bool:
        return int(cast(int, self._renew(keys=[self.keys.lease(name)], args=[self.owner, self.lease_ms]))) == 1

    def release(self, name: str) -> None:
        self._release(keys=[self.keys.lease(name)], args=[self.owner])


def load_cameras(path: Path, settings: Settings, environ: Mapping[str, str]) -> dict[str, Camera]:
    """The cameras of `path`, by name, in the file's order; ConfigError (one line) for anything wrong.
    `settings` gives the defaults (max_latency_s, source_outage_s); `environ` the password_env values."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the cameras file ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from e
    if not isinstance(doc, dict) or set(doc) != {"cameras"} or not isinstance(doc["cameras"], list):
        raise ConfigError(f"{path}: must hold one key, `cameras`, with a list of cameras")
    cameras: dict[str, Camera] = {}
    for i, entry in enumerate(doc["cameras"]):
        camera = _Entry(path, i, entry, settings, environ).camera()
        if camera.name in cameras:
            raise ConfigError(f"{path}: camera {camera.name!r}, field name: the name is given twice")
        cameras[camera.name] = camera
    return cameras


class _Entry:
    """One entry of the file, read field by field; every refusal names the camera and the field."""

    def __init__(self, path: Path, index: int, raw: object, settings: Settings, environ: Mapping[str, str]) -> None:
        self.path, self.settings, self.environ = path, settings, environ
        self.who = f"camera #{index + 1}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: {self.who}: must be a map of fields ({', '.join(FIELDS)})")
        self.raw: dict[str, Any] = raw
        if isinstance(raw.get("name"), str):
            self.who = f"camera {raw['name']!r}"

    def fail(self, name: str, why: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.who}, field {name}: {why}")

    def camera(self) -> Camera:
        unknown = sorted(str(k) for k in self.raw if k not in FIELDS)
        if unknown:
            raise self.fail(unknown[0], f"unknown field (known: {', '.join(FIELDS)})")
        name = self._name()
        url = self._url()
        username = self._text("username", "")
        password = self._password(username)
        auto, labels, text = self._auto(), self._labels(), self._phrases()
        prompts = self._prompts(auto is not None or bool(text))
        if text and (prompts or auto is not None):
            raise self.fail("text", "finds the objects itself: give text, or prompts and auto, not both")
        if auto is not None and (missing := [k for k in auto.keep if k not in labels]):
            raise self.fail("auto", f"keep names {', '.join(missing)}, not among labels {list(labels)}")
        return Camera(name=name, url=url, username=username, password=password, prompts=prompts, auto=auto,
                      labels=labels, text=text, fps=self._optional_seconds("fps", None),
                      max_latency_s=self._seconds("max_latency_s", self.settings.max_latency_s),
                      outage_s=self._optional_seconds("outage_s", self.settings.source_outage_s),
                      enabled=self._flag("enabled", True), zones=self._zones())

    def _name(self) -> str:
        name = self.raw.get("name")
        if not isinstance(name, str) or not name:
            raise self.fail("name", "required, a string")
        try:
            validate_job_id(f"{name}-{_LONGEST_SEQ}")
        except JobIdError:
            raise self.fail("name", f"must be 1-{63 - len(_LONGEST_SEQ)} characters of letters, digits, '_', '.', "
                                    "'-', starting with a letter or digit, without '..' (it starts the camera's "
                                    "job ids)") from None
        return name

    def _url(self) -> str:
        url = self.raw.get("url")
        if not isinstance(url, str) or not url.strip():
            raise self.fail("url", "required, a string")
        if _DEVICE.fullmatch(url):
            return url
        match = _URL.match(url)
        if match is None or match.group(1).lower() not in LIVE_SCHEMES:
            raise self.fail("url", f"{redacted(url)} is not a live source: use a URL starting "
                                   f"{', '.join(s + '://' for s in LIVE_SCHEMES)}, or a capture device /dev/videoN")
        if "@" in match.group(2):
            raise self.fail("url", f"{redacted(url)} has credentials in it: put the user in `username` and the "
                                   "password in `password_env` or `password_file`")
        return match.group(1).lower() + url[len(match.group(1)):]

    def _password(self, username: str) -> str:
        env, file = self._text("password_env", ""), self._text("password_file", "")
        if env and file:
            raise self.fail("password_file", "give password_env or password_file, not both")
        if (env or file) and not username:
            raise self.fail("password_env" if env else "password_file", "a password needs a `username`")
        if username and _DEVICE.fullmatch(self.raw["url"]):
            raise self.fail("username", "a capture device takes no credentials")
        if env:
            password = self.environ.get(env, "")
            if not password:
                raise self.fail("password_env", f"the environment variable {env} is not set (or is empty)")
            return password
        if file:
            try:
                password = next(iter(Path(file).read_text().splitlines()), "")  # its first line, as submit's
            except (OSError, UnicodeDecodeError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise self.fail("password_file", f"cannot read {file} ({why})") from None
            if not password:
                raise self.fail("password_file", f"{file} is empty")
            return password
        return ""

    def _prompts(self, auto: bool) -> tuple[ObjectPrompt, ...]:
        specs = self.raw.get("prompts", [])
        if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
            raise self.fail("prompts", 'a list of strings such as "--point 1:320,240" or "--box 2:10,20,200,220"')
        points: list[str] = []
        boxes: list[str] = []
        for spec in specs:
            kind, _, value = spec.strip().lstrip("-").replace("=", " ", 1).partition(" ")
            if kind not in ("point", "box") or not value.strip():
                raise self.fail("prompts", f'{spec!r} is not "--point OBJ:X,Y[:LABEL]" or "--box OBJ:X0,Y0,X1,Y1"')
            (points if kind == "point" else boxes).append(value.strip())
        try:
            prompts = tuple(build_prompts(points=points, boxes=boxes))
        except PromptError as e:
            raise self.fail("prompts", str(e)) from None
        if later := sorted({p.frame_idx for p in prompts if p.frame_idx != 0}):
            raise self.fail("prompts", f"a live job's prompts are on its first frame, but some name frames {later}: "
                                       "drop the @FRAME part")
        if not prompts and not auto:
            raise self.fail("prompts", "none given: a camera needs prompts, `auto` or `text`")
        return prompts

    def _auto(self) -> AutoOptions | None:
        raw = self.raw.get("auto", False)
        if raw is False or raw is None:
            return None
        if raw is True:
            return AutoOptions()
        if not isinstance(raw, dict):
            raise self.fail("auto", f"true, false, or a map of {', '.join(AUTO_FIELDS)}")
        if unknown := sorted(str(k) for k in raw if k not in AUTO_FIELDS):
            raise self.fail("auto", f"unknown option {unknown[0]} (known: {', '.join(AUTO_FIELDS)})")
        try:
            frames, seconds = every(str(raw.get("every", 30)))
        except argparse.ArgumentTypeError as e:
            raise self.fail("auto", f"every {e}") from None
        max_objects, min_area = raw.get("max_objects", 8), raw.get("min_area", 0)
        if not _is_int(max_objects) or max_objects < 1 or not _is_int(min_area) or min_area < 0:
            raise self.fail("auto", "max_objects must be an integer >= 1 and min_area an integer >= 0")
        roi = raw.get("roi")
        if roi is not None and (not isinstance(roi, list) or len(roi) != 4 or not all(_is_number(v) for v in roi)
                                or not (roi[0] < roi[2] and roi[1] < roi[3])):
            raise self.fail("auto", f"roi must be [x0, y0, x1, y1] in pixels with x1 > x0 and y1 > y0, not {roi!r}")
        keep = raw.get("keep", [])
        if not isinstance(keep, list) or not all(isinstance(k, str) and k.strip() for k in keep):
            raise self.fail("auto", "keep must be a list of labels")
        return AutoOptions(every_frames=frames, every_s=seconds, max_objects=max_objects, min_area=min_area,
                           roi=None if roi is None else (float(roi[0]), float(roi[1]), float(roi[2]), float(roi[3])),
                           keep=tuple(k.strip() for k in keep))

    def _zones(self) -> ZoneSet:
        try:
            return from_config(self.raw.get("zones"), self.raw.get("lines"), f"{self.path}: {self.who}")
        except ZoneError as e:
            raise ConfigError(str(e)) from None

    def _phrases(self) -> tuple[str, ...]:
        return self._words("text", "a list of phrases such as [person, red car]")

    def _labels(self) -> tuple[str, ...]:
        return self._words("labels", "a list of labels such as [person, car]")

    def _words(self, name: str, expected: str) -> tuple[str, ...]:
        """A field holding a list of non-empty strings (or one comma-separated string); `expected` says what."""
        raw = self.raw.get(name, [])
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, list) or not all(isinstance(x, str) and x.strip() for x in items):
            raise self.fail(name, expected)
        return tuple(x.strip() for x in items)

    def _text(self, name: str, default: str) -> str:
        value = self.raw.get(name, default)
        if not isinstance(value, str) or (name in self.raw and not value.strip()):
            raise self.fail(name, "must be a non-empty string")
        return value.strip()

    def _seconds(self, name: str, default: float) -> float:
        value = self.raw.get(name, default)
        if not _is_number(value) or not 0 < value < float("inf"):
            raise self.fail(name, f"must be a number > 0, but got {value!r}")
        return float(value)

    def _optional_seconds(self, name: str, default: float | None) -> float | None:
        """A number > 0, or null (None); `default` when the field is not there."""
        if name not in self.raw or self.raw[name] is None:
            return default if name not in self.raw else None
        value = self.raw[name]
        if not _is_number(value) or not 0 < value < float("inf"):
            raise self.fail(name, f"must be a number > 0 or null, but got {value!r}")
        return float(value)

    def _flag(self, name: str, default: bool) -> bool:
        value = self.raw.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, but got {value!r}")
        return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
