#!/usr/bin/env bash
# Sets everything up, then runs the main job on a sample video: masks.json and a rendered MP4 under out/.
# Usage: bash scripts/demo.sh [VIDEO] [demo.py options]   (default video: ../shared/videos/bedroom.mp4)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
video="${1:-../shared/videos/bedroom.mp4}"
shift || true
exec "${VSEG_VENV:-.venv}/bin/python" scripts/demo.py "$video" "$@"
