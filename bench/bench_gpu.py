"""The service on a GPU against the bare model loop, side by side from one run.

Bare loop: the frames already on the GPU (SAM 2's own init_state, which loads every frame onto the
device, untimed), then add_new_points_or_box + propagate_in_video, each frame's masks thresholded and
copied to the host as any consumer needs them: the fastest SAM 2 itself can go.
Driver only: our SAM 2 driver (Sam2Segmenter.segment: lazy loading from the JPEG directory, batched
encoder, released state) in this process, no Redis: what the model path costs before publishing.
Service: the whole service, submit from the video file to the job's last result
(bench_service.run_service), with the MP4 render (the default) and masks only. Our driver and the
service run SAM 2's per-frame modules from CUDA graphs (worker/model/sam2/cuda_graphs.py, the default); the
"eager" runs turn that off, to show what the graphs add and what the rest of the service costs.

All runs use SAM 2.1 tiny with random weights in bf16 (autocast, as the worker does) at --image-size
(1024, the model's own size, by default), one object prompted by a point on frame 0. Rounds are
interleaved and medians reported. Needs no ffmpeg (frames are extracted with our own producer).

    python bench/bench_gpu.py [--frames 300] [--image-size 1024] [--repeats 3] [--video V] [--runs a,b]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_service import run_service  # noqa: E402
from bench.common import SHARED_VIDEOS, looped_clip, machine  # noqa: E402
from producer.decode import extract_frames  # noqa: E402
from schemas.prompts import ObjectPrompt  # noqa: E402
from worker.model.sam2.checkpoints import build_predictor, get_preset  # noqa: E402
from worker.model.sam2.segmenter import Sam2Segmenter  # noqa: E402
from worker.sources.frames import DirFrames  # noqa: E402


def run_bare(predictor: object, frames_dir: Path, point: tuple[float, float]) -> dict[str, float]:
    """SAM 2's own loop with every frame already on the GPU; timed from the prompt to the last mask."""
    p = predictor
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        state = p.init_state(str(frames_dir))  # type: ignore[attr-defined]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        p.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=np.array([point], np.float32),  # type: ignore[attr-defined]
                                labels=np.array([1], np.int32))
        first, n = 0.0, 0
        for _k, _ids, logits in p.propagate_in_video(state):  # type: ignore[attr-defined]
            _ = (logits[:, 0] > 0).cpu().numpy()
            n += 1
            first = first or time.perf_counter() - t0
        total = time.perf_counter() - t0
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20
    del state
    torch.cuda.empty_cache()
    return {"first_result_s": first, "total_s": total, "frames": n, "gpu_peak_mib": gpu_peak}


def run_driver(seg: Sam2Segmenter, frames_dir: Path, num_frames: int, point: tuple[float, float],
               size_wh: tuple[int, int]) -> dict[str, float]:
    """Our driver over the JPEG directory (frames loaded lazily by its threads), no Redis."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    first, n = 0.0, 0
    prompt = ObjectPrompt(1, 0, (point,), (1,))
    with seg.open_session(DirFrames(frames_dir, num_frames), [prompt], width=size_wh[0],
                          height=size_wh[1]) as session:
        for _out in session:
            n += 1
            first = first or time.perf_counter() - t0
    total = time.perf_counter() - t0
    stats = session.stats
    return {"first_result_s": first, "total_s": total, "frames": n, "waited_s": stats["waited_s"],
            "load_ms": stats["load_ms"], "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20}


RUNS = ("bare", "driver", "driver eager", "driver compiled", "service", "service eager", "masks only", "staged",
        "one process")
COMPILED = ("image_encoder", "memory_attention", "memory_encoder", "sam_mask_decoder", "sam_prompt_encoder")


def compiled_predictor(image_size: int) -> object:
    """Another predictor (same seed, so the same random weights) whose per-frame modules run through
    torch.compile(mode="max-autotune") instead of our CUDA graphs (issue 16 asks for the comparison)."""
    torch.manual_seed(0)
    predictor = build_predictor(get_preset("tiny"), None, device="cuda", image_size=image_size)
    for name in COMPILED:
        module = getattr(predictor, name)
        module.forward = torch.compile(module.forward, mode="max-autotune", dynamic=False)
    return predictor
DEFAULT_RUNS = "bare,driver,driver eager,service,service eager,masks only,staged"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--video", type=Path, default=SHARED_VIDEOS / "bedroom.mp4")
    ap.add_argument("--encoder-batch", type=int, default=2)
    ap.add_argument("--runs", default=DEFAULT_RUNS,
                    help=f"comma-separated, from: {', '.join(RUNS)} (bare is always run: the ratios' base)")
    args = ap.parse_args()
    wanted = ["bare"] + [r for r in args.runs.split(",") if r and r != "bare"]
    unknown = sorted(set(wanted) - set(RUNS))
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs CUDA; on a CPU use bench/bench_service.py")
    clip = looped_clip(args.video, args.frames)
    point_s = "480,300" if args.video.name == "bedroom.mp4" else "640,360"
    point = tuple(float(v) for v in point_s.split(","))
    print(f"machine: {machine()}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"clip: {clip.name} ({args.frames} frames), SAM 2.1 tiny random weights, bf16, image size "
          f"{args.image_size}, one object (point {point_s} on frame 0); {args.repeats} interleaved rounds, medians")
    print("runs: bare = SAM 2's own loop, frames already on the GPU, eager (the target's base); driver = our "
          "driver in this process (CUDA graphs on, the default), driver eager = the same with cuda_graphs off; "
          "driver compiled = cuda_graphs off and the per-frame modules through torch.compile(max-autotune); "
          "service = the whole service (model process and CUDA graphs: the defaults), service eager = with "
          "VSEG_CUDA_GRAPHS=off, masks only = without the MP4, staged = video decoded and queued before the "
          "worker starts (producer not running beside the model), one process = VSEG_MODEL_PROCESS=off", flush=True)
    torch.manual_seed(0)
    predictor = build_predictor(get_preset("tiny"), None, device="cuda", image_size=args.image_size)
    segs = {"driver": Sam2Segmenter(predictor, name="tiny", random_weights=True, encoder_batch=args.encoder_batch),
            "driver eager": Sam2Segmenter(predictor, name="tiny", random_weights=True,
                                          encoder_batch=args.encoder_batch, cuda_graphs=False)}
    if "driver compiled" in wanted:
        segs["driver compiled"] = Sam2Segmenter(compiled_predictor(args.image_size), name="tiny", random_weights=True,
                                                encoder_batch=args.encoder_batch, cuda_graphs=False)
    for name, seg in segs.items():
        if name in wanted:
            print(f"{name}: warmed up in {seg.warm_up():.1f} s", flush=True)
    services: dict[str, dict[str, Any]] = {
        "service": {},
        "service eager": {"env_extra": {"VSEG_CUDA_GRAPHS": "off"}},
        "masks only": {"render": False},
        "staged": {"staged": True},
        "one process": {"env_extra": {"VSEG_MODEL_PROCESS": "off"}},
    }
    rounds: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        frames_dir = Path(tmp) / "frames"
        extract_frames(clip, frames_dir)
        with Image.open(frames_dir / "00000.jpg") as first_frame:
            size_wh = first_frame.size
        for k in range(args.repeats):
            runs: dict[str, dict[str, float]] = {}
            for name in wanted:
                if name == "bare":
                    runs[name] = run_bare(predictor, frames_dir, point)
                elif name in segs:
                    runs[name] = run_driver(segs[name], frames_dir, args.frames, point, size_wh)
                else:
                    runs[name] = run_service(clip, args.image_size, "cuda", point_s, **services[name])
                runs[name]["fps"] = runs[name]["frames"] / runs[name]["total_s"]
            rounds.append(runs)
            bare = runs["bare"]["fps"]
            print(f"round {k + 1}: frames/s " + ", ".join(f"{name} {run['fps']:.1f} ({run['fps'] / bare:.3f})"
                                                          for name, run in runs.items()), flush=True)
    names = list(rounds[0])
    med = {name: {key: statistics.median(r[name][key] for r in rounds) for key in rounds[0][name]} for name in names}
    ratios = {name: statistics.median(r[name]["fps"] / r["bare"]["fps"] for r in rounds) for name in names}
    print(f"{'median of the rounds':26}" + "".join(f"{n:>14}" for n in names))
    for label, key in (("frames/s", "fps"), ("time to first result (s)", "first_result_s"), ("total (s)", "total_s")):
        print(f"{label:26}" + "".join(f"{med[n][key]:>14.3f}" for n in names))
    print(f"{'frames/s / bare (median)':26}" + "".join(f"{ratios[n]:>14.3f}" for n in names))
    waited = ", ".join(f"{n} {med[n]['waited_s']:.2f}" for n in names if "waited_s" in med[n])
    print(f"the model waited for frames (s): {waited}")
    gpu = ", ".join(f"{n} {med[n]['gpu_peak_mib']:.0f}" for n in names if "gpu_peak_mib" in med[n])
    print(f"GPU memory peak (MiB): {gpu} (bare: every frame on the device)")
    if "driver" in segs and segs["driver"].graphs is not None:
        print(f"driver's CUDA graphs: {segs['driver'].graphs.summary()}")
    for name in names:
        if "worker_cpu_s" in med[name]:
            run = med[name]
            print(f"{name} CPU seconds: worker {run['worker_cpu_s']:.1f} (with its model process), producer "
                  f"{run['producer_cpu_s']:.1f}, redis-server {run['redis_cpu_s']:.1f}; worker peak RSS "
                  f"{run['peak_rss_mib']:.0f} MiB (the worker's process alone)")


if __name__ == "__main__":
    main()
