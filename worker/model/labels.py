"""Zero-shot labels for objects (`--labels person,car,ball`): what each tracked mask shows.

A Labeller takes a frame and one object's mask and returns the best of the job's labels with its
probability. The real one is CLIP through open_clip (ViT-B-32, LAION-2B weights by default): the
object's masked crop (background greyed out, the guide's pattern) against "a photo of a {label}".
open_clip rather than transformers' CLIPModel because its tokenizer's vocabulary ships inside the
package and a model is built from its name alone, so the whole path runs offline with random
weights in the tests; the weights themselves come through the Hugging Face Hub, like SAM 2's
checkpoints (`HF_HOME` cache; offline, the error says which repository to fetch).

The seam: the `labeller` setting names a `module:callable` building another from (settings, labels):
a backend's own detector or classifier.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from runtime.settings import Settings
from schemas.errors import ConfigError

log = logging.getLogger(__name__)

CROP_PAD = 0.1  # the crop around a mask's box, as a fraction of its size (a little context helps CLIP)


class Labeller(Protocol):
    labels: tuple[str, ...]

    def label(self, image_rgb: np.ndarray, mask: np.ndarray) -> tuple[str, float]:
        """The label of the object under `mask` (bool H x W) on this frame, and its probability."""
        ...


def masked_crop(image_rgb: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """The object's box (padded a little) with everything outside its mask grey; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    h, w = mask.shape
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    px, py = int((x1 - x0) * CROP_PAD) + 1, int((y1 - y0) * CROP_PAD) + 1
    x0, x1, y0, y1 = max(0, x0 - px), min(w, x1 + px), max(0, y0 - py), min(h, y1 + py)
    crop = image_rgb[y0:y1, x0:x1].copy()
    crop[~mask[y0:y1, x0:x1]] = 128
    return crop


class ClipLabeller:
    """CLIP zero-shot classification of masked crops (see the module doc). `pretrained` "random": random
    weights (tests only: the labels are meaningless)."""

    def __init__(self, labels: Sequence[str], *, model: str = "ViT-B-32", pretrained: str = "laion2b_s34b_b79k",
                 device: str = "cpu") -> None:
        import open_clip

        self.labels = tuple(labels)
        if not self.labels:
            raise ConfigError("no labels given: --labels takes a comma-separated list such as person,car,ball")
        self.device = torch.device(device)
        try:
            net, _, self.preprocess = open_clip.create_model_and_transforms(
                model, pretrained=None if pretrained == "random" else pretrained, device=self.device)
        except Exception as e:  # noqa: BLE001 - a download refused offline, an unknown name: say what to do
            raise ConfigError(_weights_error(model, pretrained, e)) from e
        self.model: Any = net.eval()
        tokenizer = open_clip.get_tokenizer(model)
        with torch.inference_mode():
            text = self.model.encode_text(tokenizer([f"a photo of a {label}" for label in self.labels]).to(self.device))
            self.text = text / text.norm(dim=-1, keepdim=True)
        self._lock = threading.Lock()

    def label(self, image_rgb: np.ndarray, mask: np.ndarray) -> tuple[str, float]:
        crop = masked_crop(image_rgb, mask)
        if crop is None:
            return "", 0.0
        pixels = self.preprocess(Image.fromarray(crop)).unsqueeze(0).to(self.device)
        with self._lock, torch.inference_mode():
            image = self.model.encode_image(pixels)
            image = image / image.norm(dim=-1, keepdim=True)
            probs = (100.0 * image @ self.text.T).softmax(dim=-1)[0].float().cpu().numpy()
        best = int(probs.argmax())
        return self.labels[best], float(probs[best])


def _weights_error(model: str, pretrained: str, error: BaseException) -> str:
    try:
        import open_clip

        hub = open_clip.get_pretrained_cfg(model, pretrained).get("hf_hub", "").rstrip("/")
    except Exception:  # noqa: BLE001 - only for the message
        hub = ""
    fetch = (f"fetch them where the Hub is reachable with `huggingface-cli download {hub}` and copy the Hugging Face "
             "cache (HF_HOME) to this machine" if hub else "check VSEG_LABEL_MODEL and VSEG_LABEL_PRETRAINED against "
             "open_clip.list_pretrained()")
    return f"cannot load the CLIP labeller {model} ({pretrained}): {type(error).__name__}: {error}; {fetch}"


def build_labeller(settings: Settings, labels: Sequence[str], device: str = "cpu") -> Labeller:
    """The job's labeller: the `labeller` setting's factory, else CLIP (label_model, label_pretrained)."""
    if settings.labeller:
        module, _, name = settings.labeller.partition(":")
        factory = getattr(importlib.import_module(module), name)
        return factory(settings, tuple(labels))
    return ClipLabeller(labels, model=settings.label_model, pretrained=settings.label_pretrained, device=device)
