"""Building the worker's Segmenter from the settings (the model is loaded once per worker)."""

from __future__ import annotations

import logging

from schemas.settings import Settings
from worker.segment import Segmenter

log = logging.getLogger(__name__)


def share_cores_with_model(device: str) -> None:
    """Beside a model on the CPU, OpenCV (the renderer's drawing and colour conversion) runs on the
    calling thread only: its own thread pool would wake a thread per core for each call and preempt
    the model's OpenMP threads on every core at once. Beside a GPU model it keeps its threads.
    A CPU model's own threads are capped at the CPUs a container's quota allows (torch counts the
    host's cores: 16 OpenMP threads throttled to a 2-CPU quota stall each other)."""
    import cv2

    if not str(device).startswith("cuda"):
        import torch

        from schemas.machine import usable_cores

        cv2.setNumThreads(1)
        cores = usable_cores()
        if torch.get_num_threads() > cores:
            log.info("model threads: %d, the CPUs this worker may use (torch counted %d)", cores,
                     torch.get_num_threads())
            torch.set_num_threads(cores)


def load_segmenter(settings: Settings, *, fake: bool = False, fake_delay_s: float = 0.0,
                   fake_busy: bool = False) -> Segmenter:
    """SAM 2 per settings (preset, checkpoint, device, image size); `fake` gives the colour segmenter
    wrapped in the fault-injection hooks of worker/chaos_hooks.py (tests only). With `model_process`
    (auto: on CUDA) the model runs in a child process (worker/model_process.py)."""
    from worker.model_process import ModelProcess, use_model_process

    if fake:
        device = "cpu"
    else:
        from worker.checkpoints import resolve_device

        device = resolve_device(settings.device)
    if use_model_process(settings, device):
        return ModelProcess(settings, fake={"fake_delay_s": fake_delay_s, "fake_busy": fake_busy} if fake else None)
    if fake:
        from worker.chaos_hooks import ChaosHooks
        from worker.fake_segmenter import ColourSegmenter

        log.warning("using the FAKE colour segmenter: for plumbing tests only")
        return ChaosHooks(ColourSegmenter(), delay_s=fake_delay_s, busy=fake_busy)
    from worker.checkpoints import RANDOM, build_predictor, get_preset, resolve_checkpoint
    from worker.sam2_segmenter import Sam2Segmenter

    preset = get_preset(settings.model_preset)
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
                              encoder_batch=settings.encoder_batch, cuda_graphs=settings.cuda_graphs == "on")
    log.info("warming the model up on a short synthetic clip (one-time costs and, on CUDA, the graphs' capture, "
             "kept out of the first job)")
    log.info("warmed up in %.2f s", segmenter.warm_up())
    return segmenter
