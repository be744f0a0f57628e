"""Frame extraction: our producer against the ffmpeg command SAM 2's README uses and an OpenCV loop.

    python bench/bench_extract.py [--frames 150]

For a 720p clip (01_dog.mp4) and a 1080p clip (01_dog.mp4 upscaled, made once and cached), each
method writes JPEGs of the first --frames frames; wall time is the best of two runs. Quality: mean
PSNR of each method's JPEGs against the frames PyAV decodes from the source.
ffmpeg must be installed (apt-get install -y ffmpeg); without it that column is skipped.
"""

from __future__ import annotations

import argparse
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


def timed(fn: Callable[[Path, Path, int], None], video: Path, n: int, tmp: Path) -> tuple[float, Path]:
    best = float("inf")
    out = tmp
    for attempt in range(2):
        out = tmp / f"{fn.__name__}-{attempt}"
        t0 = time.perf_counter()
        fn(video, out, n)
        best = min(best, time.perf_counter() - t0)
        if attempt == 0:
            continue
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=150)
    args = ap.parse_args()
    n = args.frames
    print(f"machine: {machine()}")
    methods: list[Callable[[Path, Path, int], None]] = [ours, opencv]
    if ffmpeg_exe():
        methods.insert(1, ffmpeg)
    else:
        print("ffmpeg not found (apt-get install -y ffmpeg): its column is skipped")
    clips = {"720p": SHARED_VIDEOS / "01_dog.mp4", "1080p": upscaled_1080p(SHARED_VIDEOS / "01_dog.mp4")}
    print("1080p clip: 01_dog.mp4 upscaled to 1920x1080 (libx264 crf 18), cached in", CACHE)
    print(f"{'clip':6} {'method':8} {'frames/s':>9} {'PSNR dB':>8} {'ours/this':>10}")
    for name, video in clips.items():
        with av.open(str(video)) as c:
            reference = [f.to_ndarray(format="bgr24") for _, f in zip(range(n), c.decode(video=0))]
        with tempfile.TemporaryDirectory() as tmp:
            results = {}
            for fn in methods:
                seconds, out = timed(fn, video, len(reference), Path(tmp))
                results[fn.__name__] = (len(reference) / seconds, psnr(out, reference))
            for method, (fps, quality) in results.items():
                ratio = results["ours"][0] / fps
                print(f"{name:6} {method:8} {fps:>9.1f} {quality:>8.2f} {ratio:>10.2f}")


if __name__ == "__main__":
    main()
