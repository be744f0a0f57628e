"""The model host: where the worker's model runs and how its jobs' sessions reach it, decided once, here.

One notion, three forms, each serving the worker's S slots (one session a slot):
- in this process (the default off CUDA): one model, every slot's sessions taking turns on it
  (worker/model/turns.py);
- one model process shared by the slots (a CUDA model with `session_batch` > 1: batching across jobs needs
  their sessions on one model);
- a model process per slot (the CUDA default): one Python thread per process launches the kernels, the
  bottleneck of a small model on a fast GPU (worker/model/process.py), so S processes keep S of them busy,
  and a crash or a hang costs one job.
`model_process` (auto: on for a CUDA model) and `session_batch` choose; nothing else asks which form it is.
The worker asks the host how many jobs fit (worker/service/capacity.py `pick_concurrency`) and for its
slots' segmenters (`slots`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from runtime.settings import Settings
from worker.model.build import build_segmenter
from worker.model.models import choose_model
from worker.model.process import ModelProcess, use_model_process
from worker.model.segment import Segmenter


def model_device(settings: Settings) -> str:
    """Where the model will run: SAM 2's resolved device; a factory's segmenter (`segmenter` setting)
    picks its own, so auto counts as the CPU for it."""
    if settings.segmenter:
        return "cpu" if settings.device == "auto" else settings.device
    from worker.model.sam2.checkpoints import resolve_device

    return resolve_device(settings.device)


@dataclass
class ModelHost:
    """The worker's model, loaded once (see the module doc). `first` is slot 0's segmenter (the one model of
    the shared forms); `per_slot`: each further slot starts a model process of its own with `start`."""

    first: Segmenter
    per_slot: bool = False
    start: Callable[[], Segmenter] | None = None

    @classmethod
    def load(cls, settings: Settings) -> ModelHost:
        """The host the settings ask for, its first model loaded."""
        if not settings.segmenter and choose_model(settings.model_preset).family == "sam3":
            return cls(build_segmenter(settings))  # SAM 3 runs in the worker's process (no model process for it)
        if use_model_process(settings, model_device(settings)):
            shared = settings.session_batch > 1
            return cls(ModelProcess(settings, shared=shared), per_slot=not shared,
                       start=None if shared else (lambda: ModelProcess(settings)))
        return cls(build_segmenter(settings))

    @classmethod
    def of(cls, settings: Settings, segmenter: Segmenter | ModelHost) -> ModelHost:
        """The host of a segmenter made elsewhere (a test's, a factory's): a model process not shared is one
        per slot; anything else serves every slot."""
        if isinstance(segmenter, ModelHost):
            return segmenter
        if isinstance(segmenter, ModelProcess) and not segmenter.shared:
            return cls(segmenter, per_slot=True, start=lambda: ModelProcess(settings))
        return cls(segmenter)

    @property
    def form(self) -> str:
        """Which form, for the log."""
        if self.per_slot:
            return "a model process per slot"
        if isinstance(self.first, ModelProcess):
            return "one model process shared by the slots"
        return "in this process, shared by the slots"

    def slots(self, k: int) -> list[Segmenter]:
        """The k slots' segmenters: `first` for every slot, or `first` and k - 1 model processes started now
        (those started are closed again if one fails to start)."""
        if not self.per_slot or self.start is None:
            return [self.first] * k
        models = [self.first]
        try:
            for _ in range(k - 1):
                models.append(self.start())
        except BaseException:
            for model in models[1:]:
                model.close()
            raise
        return models

    def close(self) -> None:
        self.first.close()
