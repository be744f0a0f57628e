"""End to end with the real SAM 2 model (random weights, image size 256, CPU), through the CLIs:

    python -m producer submit -> python -m worker --burst -> python -m producer watch

Random weights make the masks meaningless, so this checks the contract, not quality: one result per
frame per object, masks at the video's size, boxes matching masks, an H.264 MP4 with every frame.
The fake-segmenter tests in test_pipeline.py check that masks land on the right pixels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import redis
import torch

from producer.local_redis import RedisServer
from schemas.contract import validate_entry
from schemas.names import Keys
from schemas.rle import decode_mask, mask_bbox_xyxy
from tests.videos import disc_center, make_video

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
N_FRAMES = 12
SIZE_WH = (160, 120)


def run(args: list[str], env: dict[str, str], timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)


@pytest.fixture
def env(redis_server: RedisServer, storage_root: Path, tmp_path: Path) -> dict[str, str]:
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    return {**os.environ, "REDIS_URL": redis_server.url, "STORAGE_ROOT": str(storage_root),
            "VSEG_CHECKPOINT_DIR": str(tmp_path / "ckpt"), "VSEG_BLOCK_MS": "200", "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize(("device", "model_process"), [
    ("cpu", "auto"),  # in the worker's process
    ("cpu", "on"),  # in a child process, as on CUDA by default
    pytest.param("cuda", "auto", marks=pytest.mark.gpu),
    pytest.param("cuda", "off", marks=pytest.mark.gpu),
])
def test_submit_worker_watch_with_real_sam2(device: str, model_process: str, env: dict[str, str], tmp_path: Path,
                                            storage_root: Path) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    env = {**env, "VSEG_MODEL_PROCESS": model_process}
    video = make_video(tmp_path / "two.mp4", num_frames=N_FRAMES, size_wh=SIZE_WH, fps=8)
    x0, y0 = disc_center(0, N_FRAMES, SIZE_WH)
    x5, y5 = disc_center(5, N_FRAMES, SIZE_WH)
    sub = run(["-m", "producer", "submit", str(video), "--job-id", "e2e",
               "--point", f"1:{x0:.1f},{y0:.1f}", "--box", f"2:{x5 - 15:.1f},{y5 - 15:.1f},{x5 + 15:.1f},{y5 + 15:.1f}@5"],
              env)
    assert sub.returncode == 0, sub.stderr
    assert sub.stdout.strip().splitlines()[-1] == "e2e"

    image_size = "1024" if device == "cuda" else "256"
    wrk = run(["-m", "worker", "--burst", "--checkpoint", "random", "--image-size", image_size, "--device", device],
              env)
    assert wrk.returncode == 0, wrk.stderr[-3000:]
    assert "RANDOM WEIGHTS" in wrk.stderr
    assert ("model process" in wrk.stderr) == (model_process == "on" or (device, model_process) == ("cuda", "auto"))

    out = tmp_path / "out"
    wat = run(["-m", "producer", "watch", "e2e", "--out", str(out), "--timeout", "60"], env)
    assert wat.returncode == 0, wat.stderr[-3000:]
    client, keys = redis.Redis.from_url(env["REDIS_URL"]), Keys()
    entries = client.xrange(keys.results("e2e")) + client.xrange(keys.events)
    assert len(entries) > N_FRAMES
    for _id, fields in entries:
        validate_entry(fields)  # the real model's entries match the committed schemas (schemas/contract/)
    doc = json.loads((out / "masks.json").read_text())
    assert doc["random_weights"] is True and doc["obj_ids"] == [1, 2]
    assert [f["frame_idx"] for f in doc["frames"]] == list(range(N_FRAMES))
    for frame in doc["frames"]:
        assert [o["obj_id"] for o in frame["objects"]] == [1, 2]
        for obj in frame["objects"]:
            mask = decode_mask(obj["mask"])
            assert mask.shape == (SIZE_WH[1], SIZE_WH[0])
            assert obj["bbox_xyxy"] == mask_bbox_xyxy(mask) and obj["area"] == int(mask.sum())
            assert 0.0 <= obj["score"] <= 1.0 and np.isfinite(obj["score"])

    render = storage_root / doc["render_path"]
    assert f"video: {render.resolve()}" in wat.stdout
    with av.open(str(render)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert sum(1 for _ in container.decode(stream)) == N_FRAMES
