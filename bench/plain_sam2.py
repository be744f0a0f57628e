"""The plain way, as SAM 2's README does it: ffmpeg to JPEGs, then init_state (loads every frame),
add prompts, propagate_in_video. Prints one JSON line: first_result_s, total_s, frames, peak_rss_mib.
Timing starts after the model is built (the service's worker also has its model loaded already).

    python bench/plain_sam2.py VIDEO --image-size 256 [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ffmpeg_extract  # noqa: E402
from worker.model.sam2.checkpoints import build_predictor, get_preset  # noqa: E402
from worker.model.sam2.segmenter import _cast_memory_to_query_dtype  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("video", type=Path)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--point", default=None, help="X,Y of object 1 on frame 0 (default: frame centre)")
    args = ap.parse_args()
    torch.manual_seed(0)
    predictor = build_predictor(get_preset("tiny"), None, device=args.device, image_size=args.image_size)
    if args.device == "cpu":
        predictor.memory_attention.register_forward_pre_hook(_cast_memory_to_query_dtype, with_kwargs=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode(), autocast:
        t0 = time.monotonic()
        ffmpeg_extract(args.video, Path(tmp))
        t_extract = time.monotonic() - t0
        state = predictor.init_state(tmp)
        w, h = state["video_width"], state["video_height"]
        x, y = (float(v) for v in args.point.split(",")) if args.point else (w / 2, h / 2)
        predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=np.array([[x, y]], np.float32),
                                        labels=np.array([1], np.int32))
        first = None
        n = 0
        for _k, _ids, logits in predictor.propagate_in_video(state):
            _ = (logits[:, 0] > 0).cpu().numpy()
            n += 1
            if first is None:
                first = time.monotonic() - t0
        total = time.monotonic() - t0
    print(json.dumps({"first_result_s": first, "total_s": total, "frames": n, "extract_s": t_extract,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
