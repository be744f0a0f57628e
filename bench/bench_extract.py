"""Frame extraction: our producer against the ffmpeg command SAM 2's README uses and an OpenCV loop.

    python bench/bench_extract.py [--frames 150] [--rounds 5] [--frame-threads]

For a 720p clip (01_dog.mp4) and a 1080p clip (01_dog.mp4 upscaled, made once and cached), each
method writes JPEGs of the first --frames frames into a new directory, once per round, over --rounds
interleaved rounds (the order rotates); it prints median frames/s and CPU per frame, and the median and
every round's ratio of ours to each method (each round's runs share the machine's state of that moment).
Quality: mean PSNR of each method's JPEGs against the frames PyAV decodes from the source.
ffmpeg must be installed (apt-get install -y ffmpeg); without it that column is skipped.
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
import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CACHE, SHARED_VIDEOS, ffmpeg_exe, machine  # noqa: E402
from producer.decode import extract_frames  # noqa: E402
from runtime.machine import usable_cores  # noqa: E402


def upscaled_1080p(source: Path) -> Path:
    out = CACHE / f"{source.stem}_1080p.mp4"
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with av.open(str(source)) as src, av.open(str(out), "w") as dst:
        stream = src.streams.video[0]
        enc = dst.add_stream("libx264", rate=stream.average_rate)
        enc.width, enc.height, enc.pix_fmt = 1920, 1080, "yuv420p"
        enc.options = {"crf": "18", "preset": "veryfast"}
        for frame in src.decode(stream):
            for packet in enc.encode(frame.reformat(width=1920, height=1080, format="yuv420p")):
                dst.mux(packet)
        for packet in enc.encode():
            dst.mux(packet)
    return out


def ours(video: Path, out: Path, n: int) -> None:
    extract_frames(video, out, max_frames=n, jpeg_quality=95)


def ours_frame_threads(video: Path, out: Path, n: int) -> None:
    """Ours with FFmpeg's frame threads (cores + 1, FFmpeg's own automatic count) whatever the machine."""
    extract_frames(video, out, max_frames=n, jpeg_quality=95, decode_threads=usable_cores() + 1)


def ffmpeg(video: Path, out: Path, n: int) -> None:
    out.mkdir()
    subprocess.run([str(ffmpeg_exe()), "-loglevel", "error", "-i", str(video), "-frames:v", str(n), "-q:v", "2",
                    "-start_number", "0", str(out / "%05d.jpg")], check=True)


def opencv(video: Path, out: Path, n: int) -> None:
    out.mkdir()
    cap = cv2.VideoCapture(str(video))
    for k in range(n):
        ok, img = cap.read()
        if not ok:
            break
        cv2.imwrite(str(out / f"{k:05d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    cap.release()


def psnr(out: Path, reference: list[np.ndarray]) -> float:
    values = []
    for k, ref in enumerate(reference):
        img = cv2.imread(str(out / f"{k:05d}.jpg"))
        mse = float(np.mean((img.astype(np.float64) - ref.astype(np.float64)) ** 2))
        values.append(99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse))
    return float(np.mean(values))


def _cpu_s() -> float:
    """CPU seconds of this process (all its threads) and of its finished children (the ffmpeg runs)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(fn: Callable[[Path, Path, int], None], video: Path, n: int, out: Path) -> tuple[float, float]:
    """(frames/s, CPU ms per frame) of one run writing `n` frames into `out` (which must not exist)."""
    cpu, t0 = _cpu_s(), time.perf_counter()
    fn(video, out, n)
    seconds = time.perf_counter() - t0
    return n / seconds, (_cpu_s() - cpu) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each method runs once a round")
    ap.add_argument("--frame-threads", action="store_true",
                    help="also run ours with FFmpeg's frame threads (the choice decode_threads=0 makes on >2 cores)")
    args = ap.parse_args()
    n = args.frames
    print(f"machine: {machine()}")
    methods: list[Callable[[Path, Path, int], None]] = [ours, opencv]
    if args.frame_threads:
        methods.insert(1, ours_frame_threads)
    if ffmpeg_exe():
        methods.insert(1, ffmpeg)
        print(f"ffmpeg: {ffmpeg_exe()}")
    else:
        print("ffmpeg not found (apt-get install -y ffmpeg): its column is skipped")
    clips = {"720p": SHARED_VIDEOS / "01_dog.mp4", "1080p": upscaled_1080p(SHARED_VIDEOS / "01_dog.mp4")}
    print("1080p clip: 01_dog.mp4 upscaled to 1920x1080 (libx264 crf 18), cached in", CACHE)
    width = max(len(fn.__name__) for fn in methods)
    print(f"{args.rounds} interleaved rounds (the order rotates each round); medians, and ours / method per round")
    print(f"{'clip':6} {'method':{width}} {'frames/s':>9} {'CPU ms/f':>9} {'PSNR dB':>8} {'ours/this':>10}  per round")
    for name, video in clips.items():
        with av.open(str(video)) as c:
            reference = [f.to_ndarray(format="bgr24") for _, f in zip(range(n), c.decode(video=0))]
        fps: dict[str, list[float]] = {fn.__name__: [] for fn in methods}
        cpu: dict[str, list[float]] = {fn.__name__: [] for fn in methods}
        quality: dict[str, float] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for fn in methods[r % len(methods):] + methods[: r % len(methods)]:
                    out = Path(tmp) / f"{fn.__name__}-{r}"
                    f, c = measure(fn, video, len(reference), out)
                    fps[fn.__name__].append(f)
                    cpu[fn.__name__].append(c)
                    if fn.__name__ not in quality:
                        quality[fn.__name__] = psnr(out, reference)
                    shutil.rmtree(out)
        for method in fps:
            ratios = [a / b for a, b in zip(fps["ours"], fps[method])]
            rounds = " ".join(f"{x:.2f}" for x in ratios)
            print(f"{name:6} {method:{width}} {statistics.median(fps[method]):>9.1f} {statistics.median(cpu[method]):>9.2f} "
                  f"{quality[method]:>8.2f} {statistics.median(ratios):>10.2f}  {rounds}")


if __name__ == "__main__":
    main()
