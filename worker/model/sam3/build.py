"""SAM 3 loaded once: the model, its processor, where it runs; offline, always.

    load_sam3(checkpoint, device=, dtype=)  the real `facebook/sam3` weights from a local folder (or, with no
                                            folder, the Hugging Face cache); a missing checkpoint is a one-line
                                            CheckpointError giving the `hf download` command
    load_tiny(seed=)                        the tiny random model of `tiny.py` (tests, smoke runs)
    make_processor(config)                  the processor built from the model's config, with the offline
                                            CLIP tokenizer of `text_tokens.py`

Nothing here reaches the network: weights are read with `local_files_only`, the tokenizer comes from
open_clip's package, and transformers' first forward would otherwise try to download the
`kernels-community/cv-utils` kernel (NMS and hole filling on CUDA) from the Hub: `disable_kernel_download`
marks it as unavailable, the path transformers itself takes when the kernel cannot load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import Sam2VideoVideoProcessor, Sam3ImageProcessor, Sam3VideoModel, Sam3VideoProcessor
from transformers.models.sam3_video import modeling_sam3_video

from schemas.errors import CheckpointError, ConfigError
from worker.model.sam3.text_tokens import clip_tokenizer
from worker.model.sam3.tiny import tiny_model

log = logging.getLogger(__name__)

SAM3_REPO = "facebook/sam3"
TINY = "sam3-tiny-random"
_GET = f"run `hf download {SAM3_REPO} --local-dir DIR` (a gated repository: accept its licence on huggingface.co first)"
# what from_pretrained raises on a folder that is not a SAM 3 checkpoint
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError)


@dataclass(frozen=True)
class Sam3:
    """A loaded SAM 3: the model (shared, stateless between jobs), its processor, where it runs."""

    model: Sam3VideoModel
    processor: Sam3VideoProcessor
    name: str  # for logs and results: "facebook/sam3" or "sam3-tiny-random"
    random_weights: bool  # True for the tiny model: its masks mean nothing
    device: str
    dtype: torch.dtype


def disable_kernel_download() -> None:
    """transformers would fetch `kernels-community/cv-utils` from the Hub at the first forward: never."""
    modeling_sam3_video.cv_utils_kernel = False  # type: ignore[assignment]  # False: tried, unavailable


def make_processor(model: Sam3VideoModel) -> Sam3VideoProcessor:
    """The processor for this model's sizes: frames resized to its square input, normalised to [-1, 1]
    (SAM 3's mean and std are 0.5), masks at its low resolution; phrases tokenized offline."""
    size = int(model.config.image_size)
    mask = int(model.config.low_res_mask_size)
    square = {"height": size, "width": size}
    half = [0.5, 0.5, 0.5]
    return Sam3VideoProcessor(
        image_processor=Sam3ImageProcessor(size=square, mask_size={"height": mask, "width": mask},
                                           image_mean=half, image_std=half),
        video_processor=Sam2VideoVideoProcessor(size=square, image_mean=half, image_std=half),
        tokenizer=clip_tokenizer(),
        target_size=size,
    )


def resolve_checkpoint(checkpoint: str | Path | None, *, cache_dir: str | Path | None = None) -> Path:
    """The folder holding SAM 3's `config.json` and weights: `checkpoint` itself, or `facebook/sam3` in the
    Hugging Face cache (`cache_dir`, else HF_HUB_CACHE) when None. CheckpointError (one line, what to
    download) when it is not there."""
    if checkpoint is None:
        cached = try_to_load_from_cache(SAM3_REPO, "config.json", cache_dir=cache_dir)
        if not isinstance(cached, str):
            raise CheckpointError(f"SAM 3 weights are not in the Hugging Face cache: {_GET}, then pass DIR")
        return Path(cached).parent
    folder = Path(checkpoint).expanduser()
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"no SAM 3 checkpoint at {folder} (no config.json): {_GET.replace('DIR', str(folder))}")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise CheckpointError(f"no SAM 3 weights in {folder} (no *.safetensors): {_GET.replace('DIR', str(folder))}")
    return folder


def load_sam3(checkpoint: str | Path | None = None, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
              cache_dir: str | Path | None = None) -> Sam3:
    """The real SAM 3 (about 860 M parameters) from a local folder or the Hugging Face cache, offline."""
    folder = resolve_checkpoint(checkpoint, cache_dir=cache_dir)
    disable_kernel_download()
    try:
        model = Sam3VideoModel.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except _LOAD_ERRORS as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load SAM 3 from {folder} ({first}): {_GET.replace('DIR', str(folder))}") from e
    model = _placed(model, device)
    log.info("SAM 3 loaded from %s on %s (%s)", folder, device, dtype)
    return Sam3(model=model, processor=make_processor(model), name=SAM3_REPO, random_weights=False,
                device=device, dtype=dtype)


def load_tiny(seed: int = 0, *, image_size: int = 112, max_num_objects: int = 6, device: str = "cpu") -> Sam3:
    """The tiny random SAM 3 (tests): the same seed gives the same weights and the same masks."""
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', but got {device!r}")
    disable_kernel_download()
    model = _placed(tiny_model(seed, image_size, max_num_objects), device)
    log.warning("SAM 3 with random weights (%s, seed %d): its masks mean nothing", TINY, seed)
    return Sam3(model=model, processor=make_processor(model), name=TINY, random_weights=True, device=device,
                dtype=torch.float32)


def _placed(model: Sam3VideoModel, device: str) -> Sam3VideoModel:
    """The model on `device`, in eval mode (nn.Module.to: transformers' own `to` is typed for other uses)."""
    return cast(Sam3VideoModel, torch.nn.Module.to(model, device).eval())
