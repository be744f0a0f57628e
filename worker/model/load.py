"""Which segmenter a worker runs, and where: in this process (worker/model/build.py), or in a model process
of its own (worker/model/process.py; `model_process` auto: on for a CUDA model)."""

from __future__ import annotations

from runtime.settings import Settings
from worker.model.build import build_segmenter
from worker.model.process import ModelProcess, use_model_process
from worker.model.segment import Segmenter


def model_device(settings: Settings) -> str:
    """Where the model will run: SAM 2's resolved device; a factory's segmenter (`segmenter` setting)
    picks its own, so auto counts as the CPU for it."""
    if settings.segmenter:
        return "cpu" if settings.device == "auto" else settings.device
    from worker.model.checkpoints import resolve_device

    return resolve_device(settings.device)


def load_segmenter(settings: Settings) -> Segmenter:
    """The worker's segmenter per settings, loaded once: in a child process when `model_process` says so,
    shared by every slot when their steps are batched (`session_batch` > 1: batching needs the sessions on
    one model), else one such process per slot (worker/service/capacity.py)."""
    if use_model_process(settings, model_device(settings)):
        return ModelProcess(settings, shared=settings.session_batch > 1)
    return build_segmenter(settings)
