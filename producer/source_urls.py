"""Live source URLs: which schemes are live, the one form FFmpeg is given (the scheme in lower case),
credentials put in by reference, and the redacted form every log line, error and Redis field shows."""

from __future__ import annotations

import re
from urllib.parse import quote

from schemas.errors import InputError

LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "tcp", "udp", "srt")
# Protocols whose `timeout` option is the socket I/O timeout in microseconds (rtmp's is a listen timeout).
_SOCKET_TIMEOUT_SCHEMES = ("tcp", "rtsp", "rtsps", "udp", "srt")
_DEVICE = re.compile(r"/dev/video\d+")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")
_SECRET_QUERY = re.compile(r"(?i)([?&;][\w.-]*?(?:pass(?:word|wd)?|pwd|token|secret|key|auth|sig(?:nature)?)=)[^&;#]*")


def scheme_of(source: str) -> str:
    match = _SCHEME.match(source)
    return match.group(1).lower() if match else ""


def is_live_source(source: str) -> bool:
    """A URL with one of LIVE_SCHEMES (in any case: RTSP:// is rtsp://), or a capture device /dev/videoN."""
    return scheme_of(source) in LIVE_SCHEMES or _DEVICE.fullmatch(source) is not None


def check_source(source: str) -> str:
    """`source` as FFmpeg is given it (the scheme in lower case: FFmpeg knows no RTSP://), or InputError
    naming an unsupported scheme (ftp://, file://, ...) and the ones there are."""
    match = _SCHEME.match(source)
    if match is None:
        return source
    scheme = match.group(1).lower()
    if scheme not in LIVE_SCHEMES:
        raise InputError(f"unsupported source {redacted(source)}: {scheme}:// is not a source this service reads; "
                         f"give a video file path, a capture device /dev/videoN, or a URL starting "
                         f"{', '.join(s + '://' for s in LIVE_SCHEMES)}")
    return scheme + source[len(match.group(1)):]


def redacted(source: str) -> str:
    """`source` as logs and job records may show it: a URL's user:password (and query values named like
    secrets: password, token, key, signature, ...) replaced by ***."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", source))


def with_credentials(source: str, username: str, password: str = "") -> str:
    """`source` (a URL without credentials) with `username` and `password` put in, percent-encoded, for this
    process's reader only: never shown (`redacted`), never in argv. InputError if the URL already has some."""
    match = _SCHEME.match(source)
    if match is None or not source.startswith(match.group(0)):
        raise InputError(f"credentials need a URL (rtsp://host/path and so on), but the source is {redacted(source)}")
    rest = source[len(match.group(0)):]
    if "@" in rest.split("/", 1)[0]:
        raise InputError(f"{redacted(source)} already has credentials in it: give them once, by reference "
                         "(--username with --password-env or --password-file)")
    secret = quote(username, safe="") + (f":{quote(password, safe='')}" if password else "")
    return f"{match.group(0)}{secret}@{rest}"


def has_password(source: str) -> bool:
    """A URL with user:password in it (visible in `ps` when given on a command line)."""
    match = _USERINFO.match(source)
    return match is not None and ":" in source[len(match.group(1)):].split("@", 1)[0]


def av_settings(source: str, kind: str, *, read_timeout_s: float,
                rtsp_transport: str) -> tuple[str | None, dict[str, str]]:
    """PyAV's `format` and FFmpeg options for `source`: v4l2 for a device; for a network source the
    socket timeouts its protocol has (in microseconds), RTSP's transport (video only), UDP's buffer
    overruns survived."""
    if kind == "device":
        return "v4l2", {}
    if kind == "file":
        return None, {}
    scheme = scheme_of(source)
    timeout_us = str(int(read_timeout_s * 1_000_000))
    settings = {"rw_timeout": timeout_us}  # any URL protocol's I/O timeout (what http, rtmp have)
    if scheme in _SOCKET_TIMEOUT_SCHEMES:
        settings["timeout"] = timeout_us
    if scheme in ("rtsp", "rtsps"):
        settings.update(rtsp_transport=rtsp_transport, allowed_media_types="video")
    if scheme == "udp":
        settings["overrun_nonfatal"] = "1"
    return None, settings
