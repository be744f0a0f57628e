"""Building the worker's segmenter in this process: SAM 2 from the settings (preset, checkpoint, device,
image size), or the factory that the `segmenter` setting names ("module:callable", given the Settings;
tests use `tests.fakes:from_env`). The model is loaded once per worker."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import cast

from runtime.settings import Settings
from schemas.errors import ConfigError
from worker.model.models import choose_model
from worker.model.segment import Segmenter

log = logging.getLogger(__name__)


def import_factory(spec: str) -> Callable[[Settings], Segmenter]:
    """The callable named by "module.path:callable" (the `segmenter` setting)."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"segmenter {spec!r} (VSEG_SEGMENTER) cannot be imported ({e}); give module.path:callable "
                          f"importable from the worker's directory, or leave it empty for SAM 2") from e
    if not callable(factory):
        raise ConfigError(f"segmenter {spec!r} (VSEG_SEGMENTER) is not callable")
    return cast(Callable[[Settings], Segmenter], factory)


def share_cores_with_model(device: str) -> None:
    """Beside a model on the CPU, OpenCV (the renderer's drawing and colour conversion) runs on the
    calling thread only: its own thread pool would wake a thread per core for each call and preempt
    the model's OpenMP threads on every core at once. Beside a GPU model it keeps its threads.
    A CPU model's own threads are capped at the CPUs a container's quota allows (torch counts the
    host's cores: 16 OpenMP threads throttled to a 2-CPU quota stall each other)."""
    import cv2

    if not str(device).startswith("cuda"):
        import torch

        from runtime.machine import usable_cores

        cv2.setNumThreads(1)
        cores = usable_cores()
        if torch.get_num_threads() > cores:
            log.info("model threads: %d, the CPUs this worker may use (torch counted %d)", cores,
                     torch.get_num_threads())
            torch.set_num_threads(cores)


def build_segmenter(settings: Settings) -> Segmenter:
    """The segmenter itself, in this process (a model process's child calls this too)."""
    if settings.segmenter:
        return import_factory(settings.segmenter)(settings)
    choice = choose_model(settings.model_preset)
    if choice.family == "sam3":
        return build_sam3(settings)
    from worker.model.sam2.checkpoints import (
        RANDOM,
        build_predictor,
        get_preset,
        resolve_checkpoint,
        resolve_device,
    )
    from worker.model.sam2.segmenter import Sam2Segmenter

    device = resolve_device(settings.device)
    preset = get_preset(choice.preset)
    ckpt = resolve_checkpoint(preset, settings.checkpoint, settings.checkpoint_dir)
    random_weights = settings.checkpoint == RANDOM
    if random_weights:
        log.warning("!!! RANDOM WEIGHTS: model sam2.1-%s is untrained; every mask is meaningless (smoke test) !!!",
                    preset.name)
    if device.startswith("cuda:"):  # the model's thread launches on that GPU's streams (loaders, graphs)
        import torch

        torch.cuda.set_device(torch.device(device))
    predictor = build_predictor(preset, ckpt, device=device, image_size=settings.image_size)
    share_cores_with_model(str(device))
    log.info("loaded sam2.1-%s on %s (image size %d, checkpoint %s)", preset.name, device, predictor.image_size,
             ckpt or "random")
    segmenter = Sam2Segmenter(predictor, name=f"sam2.1-{preset.name}", random_weights=random_weights,
                              encoder_batch=settings.encoder_batch, cuda_graphs=settings.cuda_graphs == "on",
                              session_batch=settings.session_batch)
    log.info("warming the model up on a short synthetic clip (one-time costs and, on CUDA, the graphs' capture, "
             "kept out of the first job)")
    log.info("warmed up in %.2f s", segmenter.warm_up())
    return segmenter


def build_sam3(settings: Settings) -> Segmenter:
    """SAM 3 (`--model sam3`): the real weights from `checkpoint` (a folder; none: the Hugging Face cache), or with
    `--checkpoint random` the tiny random model (smoke tests: its masks mean nothing)."""
    from worker.model.sam2.checkpoints import RANDOM, resolve_device
    from worker.model.sam3.build import load_sam3, load_tiny
    from worker.model.sam3.segmenter import Sam3Segmenter

    device = resolve_device(settings.device)
    if settings.checkpoint == RANDOM:
        log.warning("!!! RANDOM WEIGHTS: SAM 3 is the tiny untrained model; every mask is meaningless (smoke test) !!!")
        sam3 = load_tiny(device=device)
    else:
        sam3 = load_sam3(settings.checkpoint, device=device)
    share_cores_with_model(device)
    log.info("loaded %s on %s: text prompts (jobs on the text lane)", sam3.name, device)
    return Sam3Segmenter(sam3, reid_window_s=settings.reid_window_s, reid_threshold=settings.reid_threshold)
