"""Shared pieces of the benchmark scripts: clips, timing, machine description."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import av

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("VSEG_BENCH_CACHE", "/tmp/vseg-bench"))
SHARED_VIDEOS = ROOT.parent / "shared" / "videos"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def disk_bytes(folder: Path) -> int:
    """Bytes under `folder`; files removed while it is walked (processed JPEGs, old segments) count 0."""
    total = 0
    for f in folder.rglob("*") if folder.exists() else ():
        try:
            total += f.stat().st_size if f.is_file() else 0
        except FileNotFoundError:
            continue
    return total


def looped_clip(source: Path, num_frames: int, *, size_wh: tuple[int, int] | None = None) -> Path:
    """An H.264 clip of exactly `num_frames` frames made from `source`, played forwards then backwards
    as often as needed (ping-pong keeps motion continuous), optionally resized. Cached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tag = f"{size_wh[0]}x{size_wh[1]}" if size_wh else "src"
    out = CACHE / f"{source.stem}_{num_frames}f_{tag}.mp4"
    if out.exists():
        return out
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or Fraction(30)
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(stream)]
    cycle = frames + frames[-2:0:-1]
    tmp = out.with_suffix(".partial.mp4")
    with av.open(str(tmp), "w") as container:
        s = container.add_stream("libx264", rate=rate)
        h, w = frames[0].shape[:2]
        s.width, s.height = size_wh or (w, h)
        s.pix_fmt = "yuv420p"
        s.options = {"crf": "18", "preset": "veryfast"}
        for k in range(num_frames):
            frame = av.VideoFrame.from_ndarray(cycle[k % len(cycle)], format="bgr24")
            if size_wh:
                frame = frame.reformat(width=size_wh[0], height=size_wh[1])
            for packet in s.encode(frame):
                container.mux(packet)
        for packet in s.encode():
            container.mux(packet)
    tmp.rename(out)
    return out


def ffmpeg_exe() -> str | None:
    """The ffmpeg to compare against: $FFMPEG, else the one on PATH (Debian's, as measured here), else
    the static build of the imageio-ffmpeg wheel (for machines with no package manager, such as the
    GPU machine; a different ffmpeg version, so say which one ran)."""
    if os.environ.get("FFMPEG"):
        return os.environ["FFMPEG"]
    if shutil.which("ffmpeg"):
        return shutil.which("ffmpeg")
    try:
        import imageio_ffmpeg  # type: ignore[import-not-found]
    except ImportError:
        return None
    return str(imageio_ffmpeg.get_ffmpeg_exe())


def ffmpeg_extract(video: Path, out_dir: Path) -> None:
    """The plain way users extract frames for SAM 2 (its README's command)."""
    exe = ffmpeg_exe()
    if exe is None:
        raise SystemExit("ffmpeg is not installed: apt-get install -y ffmpeg (or pip install imageio-ffmpeg)")
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-loglevel", "error", "-i", str(video), "-q:v", "2", "-start_number", "0",
                    str(out_dir / "%05d.jpg")], check=True)
