"""The producer on a phone clip: extraction frames/s of a video with a 90° display matrix against the same
video without one, ours and the ffmpeg command (autorotating, as it does by default), from one run.

    .venv/bin/python bench/bench_rotation.py [VIDEO] [--rounds 5]

The rotated copy is the same packets remuxed with a display matrix (nothing re-encoded), so the two
differ only in the turn. Prints frames/s and CPU ms a frame per method, and the ratios per round.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from producer.decode import extract_frames  # noqa: E402

DEFAULT = Path(__file__).resolve().parent.parent.parent / "shared" / "videos" / "bedroom.mp4"


def cpu_s() -> float:
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def remux_rotated(src: Path, dst: Path, degrees: int = 270) -> Path:
    """`src`'s video packets into `dst` with a display matrix turning them `degrees` counter-clockwise."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream_in = inp.streams.video[0]
        stream_out = out.add_stream_from_template(stream_in)
        stream_out.set_display_rotation(degrees)
        for packet in inp.demux(stream_in):
            if packet.dts is None:
                continue
            packet.stream = stream_out
            out.mux(packet)
    return dst


def frames_of(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def ours(video: Path, out: Path) -> None:
    extract_frames(video, out, jpeg_quality=95)


def ffmpeg(video: Path, out: Path) -> None:
    out.mkdir()
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(video), "-q:v", "2", "-start_number", "0",
                    str(out / "%05d.jpg")], check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("video", type=Path, nargs="?", default=DEFAULT)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if shutil.which("ffmpeg") is None:
        sys.exit("needs ffmpeg on PATH (apt-get install ffmpeg)")
    with tempfile.TemporaryDirectory(prefix="vseg-rot-") as tmp:
        plain = args.video
        rotated = remux_rotated(plain, Path(tmp) / "rotated.mp4")
        n = frames_of(plain)
        methods: list[tuple[str, Callable[[Path, Path], None], Path]] = [
            ("ours plain", ours, plain), ("ours rotated", ours, rotated),
            ("ffmpeg plain", ffmpeg, plain), ("ffmpeg rotated", ffmpeg, rotated)]
        fps: dict[str, list[float]] = {m[0]: [] for m in methods}
        cpu: dict[str, list[float]] = {m[0]: [] for m in methods}
        for r in range(args.rounds):
            for name, fn, video in methods[r % 4:] + methods[:r % 4]:
                out = Path(tmp) / "out"
                c0, t0 = cpu_s(), time.perf_counter()
                fn(video, out)
                fps[name].append(n / (time.perf_counter() - t0))
                cpu[name].append(1000 * (cpu_s() - c0) / n)
                shutil.rmtree(out)
    print(f"clip: {args.video.name} ({n} frames), a 270° display matrix on the remuxed copy; {args.rounds} rounds")
    for name in fps:
        print(f"{name:15} {statistics.median(fps[name]):7.1f} frames/s {statistics.median(cpu[name]):6.2f} CPU ms/frame")
    for a, b in (("ours rotated", "ours plain"), ("ours rotated", "ffmpeg rotated")):
        per = [x / y for x, y in zip(fps[a], fps[b])]
        print(f"{a} / {b}: median {statistics.median(per):.3f} (rounds {' '.join(f'{x:.3f}' for x in per)})")


if __name__ == "__main__":
    main()
