"""E2E tier: the worker's SAM 2 driver (lazy frames, released per-frame state) gives exactly the masks
of SAM 2's own predictor (init_state preloading every frame, all state kept), frame by frame, on a
generated video with the real model (random weights, CPU, image size 256; on CUDA, the gpu tier, at
the model's own 1024 in bf16 as the worker runs it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from producer.decode import extract_frames
from schemas.prompts import ObjectPrompt
from tests.videos import disc_center, make_video
from worker.model.sam2.checkpoints import build_predictor, get_preset
from worker.model.sam2.lazy_frames import LazyFrames
from worker.model.sam2.segmenter import Sam2Segmenter
from worker.sources.frames import DirFrames

pytestmark = pytest.mark.e2e

N = 34
SIZE = (128, 96)


@pytest.fixture(scope="module")
def predictor() -> object:
    torch.manual_seed(0)
    return build_predictor(get_preset("tiny"), None, device="cpu", image_size=256)


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mem")
    video = make_video(root / "v.mp4", num_frames=N, size_wh=SIZE, fps=10)
    extract_frames(video, root / "frames")
    return root / "frames"


def bare_predictor_masks(predictor: object, frames_dir: Path, prompts: list[ObjectPrompt]) -> Iterator[tuple[int, np.ndarray]]:
    """SAM 2's own way, same pass order as the worker: backwards from the last prompt, then forwards."""
    p = predictor
    on_cuda = str(p.device).startswith("cuda")  # type: ignore[attr-defined]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        state = p.init_state(str(frames_dir))  # type: ignore[attr-defined]
        for pr in prompts:
            p.add_new_points_or_box(state, frame_idx=pr.frame_idx, obj_id=pr.obj_id,  # type: ignore[attr-defined]
                                    points=np.array(pr.points_xy, np.float32), labels=np.array(pr.labels, np.int32))
        last = max(pr.frame_idx for pr in prompts)
        out: dict[int, np.ndarray] = {}
        if last > 0:
            for k, _, logits in p.propagate_in_video(state, start_frame_idx=last, reverse=True):  # type: ignore[attr-defined]
                if k < last:
                    out[k] = (logits[:, 0] > 0).cpu().numpy()
        for k, _, logits in p.propagate_in_video(state, start_frame_idx=last):  # type: ignore[attr-defined]
            out[k] = (logits[:, 0] > 0).cpu().numpy()
    for k in sorted(out):
        yield k, out[k]


_BARE: dict[int, list[tuple[int, np.ndarray]]] = {}  # late_frame -> the unpruned predictor's masks (one module's run)


@pytest.mark.parametrize("encoder_batch", [1, 2], ids=["one-frame-encoder", "batched-encoder"])
@pytest.mark.parametrize("late_frame", [0, 6], ids=["forward-only", "backward-then-forward"])
def test_pruned_lazy_driver_matches_the_unpruned_predictor(predictor: object, frames_dir: Path, late_frame: int,
                                                           encoder_batch: int) -> None:
    """With the predictor's own one-frame encoding the masks must be bit-identical. With batched
    encoding they were bit-identical too on the machines measured (each sample takes the same
    operations), but a CPU's math library may pick other kernels for another batch size, so that case
    allows a thousandth of the pixels to flip at the threshold."""
    x0, y0 = disc_center(0, N, SIZE)
    xl, yl = disc_center(late_frame, N, SIZE)
    prompts = [ObjectPrompt(1, 0, ((x0, y0),), (1,)), ObjectPrompt(2, late_frame, ((xl, yl + 8),), (1,))]
    seg = Sam2Segmenter(predictor, name="t", random_weights=True, prune=True, encoder_batch=encoder_batch)
    assert seg.warm_up() > 0  # as the worker does at start: it must leave nothing behind that changes a job
    with seg.open_session(DirFrames(frames_dir, N), prompts, width=SIZE[0], height=SIZE[1]) as session:
        ours = list(session)
    stats = session.stats
    if late_frame not in _BARE:  # the reference depends on the prompts only: run once for both encoders
        _BARE[late_frame] = list(bare_predictor_masks(predictor, frames_dir, prompts))
    bare = _BARE[late_frame]
    assert [o.frame_idx for o in ours] == [k for k, _ in bare] == list(range(N))
    assert (stats["batched"] > 0) == (encoder_batch > 1)  # batching really happened (when asked for)
    for o, (k, masks) in zip(ours, bare):
        assert o.obj_ids == (1, 2)
        if encoder_batch == 1:
            assert np.array_equal(o.masks, masks), f"frame {k}: masks differ from the unpruned predictor"
        else:
            flipped = np.count_nonzero(o.masks != masks) / masks.size
            assert flipped <= 1e-3, f"frame {k}: {flipped:.2%} of mask pixels differ from the unpruned predictor"
    # the forward pass hands each frame, decoded once by the model's loader, on to the renderer
    handed = [o for o in ours if o.image_rgb is not None]
    assert {o.frame_idx for o in handed} >= set(range(late_frame + 1, N))
    for o in handed:
        with Image.open(frames_dir / f"{o.frame_idx:05d}.jpg") as pil:
            assert np.array_equal(o.image_rgb, np.asarray(pil.convert("RGB")))
    # state was really released: per object, at most the window (plus, in the backward pass, the frames
    # the forward pass will read) is held, not the whole video
    assert seg.window == 17
    limit = seg.window + 1 if late_frame == 0 else 2 * seg.window + 2
    assert stats["peak_frames_held"] <= limit
    if late_frame == 0:
        assert stats["peak_frames_held"] < N


def test_lazy_frames_give_the_predictors_own_pixels(frames_dir: Path) -> None:
    """The worker's loader (PIL, lookup-table normalisation, no torch) gives exactly the tensors of
    SAM 2's own frame loader."""
    from sam2.utils.misc import load_video_frames_from_jpg_images

    theirs, height, width = load_video_frames_from_jpg_images(str(frames_dir), 256, offload_video_to_cpu=True,
                                                              compute_device=torch.device("cpu"))
    assert (width, height) == SIZE
    lazy = LazyFrames(DirFrames(frames_dir, N), 256, torch.device("cpu"))
    try:
        for k in (0, 1, N // 2, N - 1):
            ours = lazy[k]
            assert ours.dtype == torch.float32 and ours.shape == (3, 256, 256)
            assert torch.equal(ours, theirs[k]), f"frame {k}: loader pixels differ from SAM 2's"
    finally:
        lazy.close()


def test_the_cuda_loaders_arithmetic_gives_the_predictors_own_pixels(frames_dir: Path, tmp_path: Path) -> None:
    """The CUDA loader's steps (simplejpeg decode, Pillow's resize in integers, the lookup table with
    torch) run here on the CPU tensor: exactly SAM 2's loader's tensors, for the producer's frames and
    for JPEGs Pillow writes (other subsampling), a grey one, and a PNG (which takes the Pillow path)."""
    from sam2.utils.misc import load_video_frames_from_jpg_images

    from worker.model.sam2.lazy_frames import _decode_rgb, model_input_on_device, normalisation_table

    odd = tmp_path / "odd"
    odd.mkdir()
    rgb = np.asarray(Image.open(frames_dir / "00003.jpg"))
    Image.fromarray(rgb).save(odd / "00000.jpg", quality=90, subsampling=0)
    Image.fromarray(rgb[:, :, 1]).save(odd / "00001.jpg")
    Image.fromarray(rgb).save(odd / "00002.png")  # SAM 2 lists only .jpg/.jpeg: compared with Pillow below
    table = torch.from_numpy(normalisation_table())
    for folder, count in ((frames_dir, N), (odd, 2)):
        theirs, _, _ = load_video_frames_from_jpg_images(str(folder), 1024, offload_video_to_cpu=True,
                                                         compute_device=torch.device("cpu"))
        for k in range(count):
            ours = model_input_on_device(torch.from_numpy(_decode_rgb(folder / f"{k:05d}.jpg")), 1024, table)
            assert torch.equal(ours, theirs[k]), f"{folder.name} frame {k}: pixels differ from SAM 2's loader"
    png = _decode_rgb(odd / "00002.png")
    assert np.array_equal(png, rgb)


@pytest.fixture(scope="module")
def cuda_predictor() -> object:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    return build_predictor(get_preset("tiny"), None, device="cuda", image_size=1024)


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["cuda-graphs", "eager"])
@pytest.mark.parametrize("encoder_batch", [1, 2], ids=["one-frame-encoder", "batched-encoder"])
def test_on_cuda_the_pruned_lazy_driver_matches_the_unpruned_predictor(cuda_predictor: object, frames_dir: Path,
                                                                       encoder_batch: int, cuda_graphs: bool) -> None:
    """The same check on the GPU, in bf16 at image size 1024, where the loader normalises on the device
    from its own CUDA streams and (the default) SAM 2's per-frame modules replay from CUDA graphs: the
    masks equal those of SAM 2's predictor holding every frame on the GPU, run eagerly."""
    late_frame = 6
    x0, y0 = disc_center(0, N, SIZE)
    xl, yl = disc_center(late_frame, N, SIZE)
    prompts = [ObjectPrompt(1, 0, ((x0, y0),), (1,)), ObjectPrompt(2, late_frame, ((xl, yl + 8),), (1,))]
    seg = Sam2Segmenter(cuda_predictor, name="t", random_weights=True, prune=True, encoder_batch=encoder_batch,
                        cuda_graphs=cuda_graphs)
    seg.warm_up()
    with seg.open_session(DirFrames(frames_dir, N), prompts, width=SIZE[0], height=SIZE[1]) as session:
        ours = list(session)
    stats = session.stats
    bare = list(bare_predictor_masks(cuda_predictor, frames_dir, prompts))
    if cuda_graphs:  # every module really replayed (the predictor itself ran eagerly: graphs are scoped)
        assert seg.graphs is not None
        for name, graphed in seg.graphs.all().items():
            assert graphed.stats.replays > 0 and not graphed.stats.failed, (name, graphed.stats)
    else:
        assert seg.graphs is None
    assert [o.frame_idx for o in ours] == [k for k, _ in bare] == list(range(N))
    assert (stats["batched"] > 0) == (encoder_batch > 1)
    flipped = [np.count_nonzero(o.masks != masks) / masks.size for o, (_, masks) in zip(ours, bare)]
    if encoder_batch == 1:
        assert max(flipped) == 0, f"masks differ from the unpruned predictor on frames {np.nonzero(flipped)[0]}"
    else:  # bf16 kernels may differ per batch size
        assert max(flipped) <= 1e-3, f"up to {max(flipped):.3%} of mask pixels differ from the unpruned predictor"
    assert stats["peak_frames_held"] <= 2 * seg.window + 2
    assert stats["loaded"] >= N


@pytest.mark.gpu
def test_on_cuda_lazy_frames_give_the_predictors_own_pixels(frames_dir: Path) -> None:
    """On CUDA the lookup runs on the GPU: still exactly the tensors SAM 2's own loader puts there."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from sam2.utils.misc import load_video_frames_from_jpg_images

    cuda = torch.device("cuda")
    theirs, _, _ = load_video_frames_from_jpg_images(str(frames_dir), 1024, offload_video_to_cpu=False,
                                                     compute_device=cuda)
    lazy = LazyFrames(DirFrames(frames_dir, N), 1024, cuda)
    try:
        for k in range(N):  # every frame, so several loader threads and streams take part
            ours = lazy[k]
            assert ours.device.type == "cuda" and ours.dtype == torch.float32 and ours.shape == (3, 1024, 1024)
            assert torch.equal(ours, theirs[k]), f"frame {k}: loader pixels differ from SAM 2's"
        assert lazy.loaded >= N and lazy.load_s > 0
    finally:
        lazy.close()
