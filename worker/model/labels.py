"""Zero-shot labels for objects (`--labels person,car,ball`): what each tracked mask shows.

A Labeller takes a frame and one object's mask and returns the best of the job's labels with its
probability. The real one is CLIP through open_clip (ViT-B-32, LAION-2B weights by default): the
object's masked crop (background greyed out, the guide's pattern) against "a photo of a {label}".
open_clip rather than transformers' CLIPModel because its tokenizer's vocabulary ships inside the
package and a model is built from its name alone, so the whole path runs offline with random
weights in the tests; the weights themselves come through the Hugging Face Hub, like SAM 2's
checkpoints (`HF_HOME` cache; offline, the error says which repository to fetch).

Whether CLIP can load here is checked once per worker (`labeller_problem`, at the start of its first job
with labels: importing open_clip alone takes about 3 s of CPU, too much to spend at every worker's start
for jobs that may never come) and remembered: weights neither in the Hugging Face cache nor reachable
(offline, HF_HUB_OFFLINE), an unknown tag. A job with labels then fails at once, before anything runs,
with one short line naming what to fetch or to set (LabellerUnavailable), said in the log once. The
network itself is loaded once per worker, at its first job with labels, and shared by its jobs. A smoke
run (`--checkpoint random`) labels with random weights too, said loudly when CLIP is checked (`label_weights`).

The seam: the `labeller` setting names a `module:callable` building another from (settings, labels):
a backend's own detector or classifier.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from runtime.settings import Settings
from schemas.errors import ConfigError, LabellerUnavailable

log = logging.getLogger(__name__)

CROP_PAD = 0.1  # the crop around a mask's box, as a fraction of its size (a little context helps CLIP)
RANDOM = "random"  # label_pretrained: random weights (smoke runs and tests: the labels are meaningless)
PROBE_S = 5.0  # weights not in the cache: how long the check waits for the Hugging Face Hub to answer
SMOKE = "or VSEG_LABEL_PRETRAINED=random for smoke tests"


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
    weights (the labels are meaningless). The network is this worker's one copy (`_network`)."""

    def __init__(self, labels: Sequence[str], *, model: str = "ViT-B-32", pretrained: str = "laion2b_s34b_b79k",
                 device: str = "cpu") -> None:
        import open_clip

        self.labels = tuple(labels)
        if not self.labels:
            raise ConfigError("no labels given: --labels takes a comma-separated list such as person,car,ball")
        self.device = torch.device(device)
        clip = _network(model, pretrained, device)
        self.model: Any = clip.model
        self.preprocess = clip.preprocess
        self._lock = clip.lock
        tokenizer = open_clip.get_tokenizer(model)
        with self._lock, torch.inference_mode():
            text = self.model.encode_text(tokenizer([f"a photo of a {label}" for label in self.labels]).to(self.device))
            self.text = text / text.norm(dim=-1, keepdim=True)

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


@dataclass(frozen=True)
class _Clip:
    model: Any
    preprocess: Any
    lock: threading.Lock  # one image through the network at a time, whichever job it is for


_guard = threading.Lock()  # one check, one load at a time (jobs beside each other wait for it)
_checked: dict[tuple[str, str], str | None] = {}  # (model, weights) -> why they cannot load; None: they can
_loaded: dict[tuple[str, str, str], _Clip | str] = {}  # (model, weights, device) -> the network, or why it failed


def label_weights(settings: Settings) -> str:
    """The CLIP weights this worker labels with: random beside a SAM 2 with random weights (`--checkpoint
    random`, the smoke run: the labels mean as little as the masks), else `label_pretrained`."""
    return RANDOM if settings.checkpoint == RANDOM else settings.label_pretrained


def check_labeller(settings: Settings) -> None:
    """Raise LabellerUnavailable (one short line) if this worker's labeller cannot load: at a job's start."""
    problem = labeller_problem(settings)
    if problem is not None:
        raise LabellerUnavailable(problem)


def labeller_problem(settings: Settings) -> str | None:
    """Why this worker's CLIP labeller cannot load, as one short line saying what to do; None when it can (or
    another labeller is plugged in). Checked once per worker, said in its log, and remembered; weights
    missing from the cache are looked for there again (locally) at each ask, so copying them in is enough."""
    if settings.labeller:
        return None
    key = (settings.label_model, label_weights(settings))
    with _guard:
        if key not in _checked:
            _checked[key] = _check(*key)
        elif _checked[key] is not None and _cached(*key):
            log.info("labels: CLIP %s weights %s are in the Hugging Face cache now", *key)
            _checked[key] = None
        return _checked[key]


def _check(model: str, weights: str) -> str | None:
    import open_clip

    problem: str | None
    if open_clip.get_model_config(model) is None:
        problem = f"VSEG_LABEL_MODEL={model!r} is no open_clip model: pick one of open_clip.list_models()"
    elif weights == RANDOM:
        log.warning("!!! RANDOM WEIGHTS: the labeller CLIP %s is untrained; every label is meaningless (smoke test) !!!",
                    model)
        return None
    elif Path(weights).is_file():
        return None
    elif not open_clip.get_pretrained_cfg(model, weights):
        problem = (f"VSEG_LABEL_PRETRAINED={weights!r} names no {model} weights in open_clip: pick a tag from "
                   f"open_clip.list_pretrained(), {SMOKE}")
    else:
        problem = _fetchable(model, weights)
    if problem is not None:
        log.warning("--labels jobs fail at once on this worker: %s", problem)
    return problem


def _cached(model: str, weights: str) -> bool:
    """The weights named by an open_clip tag are in the Hugging Face cache (a local look, no network)."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    repo, name = _hub(open_clip.get_pretrained_cfg(model, weights))
    names = [name] if name else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return bool(repo) and any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)


def _fetchable(model: str, weights: str) -> str | None:
    """Why the weights of a known tag cannot be had: None when cached, or when the Hub answers (PROBE_S)."""
    import open_clip
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    repo, name = _hub(open_clip.get_pretrained_cfg(model, weights))
    if not repo:  # weights from a plain URL (open_clip's own cache): the load says what went wrong
        return None
    if _cached(model, weights):
        log.info("labels: CLIP %s weights %s are in the Hugging Face cache (loaded at the first job with labels)",
                 model, weights)
        return None
    why = "not cached, HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else ""
    if not why:
        try:
            get_hf_file_metadata(hf_hub_url(repo, name or "open_clip_pytorch_model.bin"), timeout=PROBE_S)
        except HfHubHTTPError:  # the Hub answered: the download says what is wrong
            pass
        except Exception as e:  # noqa: BLE001 - offline, no DNS, a firewall: the Hub cannot be reached
            log.debug("the Hugging Face Hub does not answer: %s", e)
            why = "not cached, Hub unreachable"
    if not why:
        log.info("labels: CLIP %s weights %s are not in the Hugging Face cache yet: the first job with labels "
                 "downloads them (%s)", model, weights, repo)
        return None
    return f"CLIP weights {weights} missing ({why}): `hf download {repo}` into the worker's HF_HOME, {SMOKE}"


def _network(model: str, weights: str, device: str) -> _Clip:
    """This worker's one copy of the network (loaded at its first use); a load that failed is not tried again."""
    import open_clip

    key = (model, weights, device)
    with _guard:
        if key not in _loaded:
            try:
                net, _, preprocess = open_clip.create_model_and_transforms(
                    model, pretrained=None if weights == RANDOM else weights, device=torch.device(device))
                _loaded[key] = _Clip(net.eval(), preprocess, threading.Lock())
                log.info("labeller: CLIP %s (%s weights) loaded on %s", model, weights, device)
            except Exception as e:  # noqa: BLE001 - a download refused offline, an unknown name: say what to do
                log.warning("%s", _weights_error(model, weights, e))
                _loaded[key] = (f"CLIP weights {weights} did not load ({type(e).__name__}, in the log): "
                                f"{_fetch(model, weights)}, {SMOKE}")
        found = _loaded[key]
    if isinstance(found, str):
        raise LabellerUnavailable(found)
    return found


def _weights_error(model: str, pretrained: str, error: BaseException) -> str:
    return f"cannot load the CLIP labeller {model} ({pretrained}): {type(error).__name__}: {error}"


def _hub(cfg: dict[str, Any]) -> tuple[str, str]:
    """(repository, file) of a pretrained config's weights on the Hub, as open_clip splits them: file "" for
    open_clip's default names; ("", "") for weights from a plain URL."""
    repo, name = os.path.split(str(cfg.get("hf_hub", "")))
    return repo, name


def _fetch(model: str, weights: str) -> str:
    """What to do about weights that did not load (a short clause)."""
    try:
        import open_clip

        repo, _ = _hub(open_clip.get_pretrained_cfg(model, weights))
    except Exception:  # noqa: BLE001 - only for the message
        repo = ""
    return f"`hf download {repo}` into the worker's HF_HOME" if repo else "check VSEG_LABEL_MODEL and VSEG_LABEL_PRETRAINED"


def build_labeller(settings: Settings, labels: Sequence[str], device: str = "cpu") -> Labeller:
    """The job's labeller: the `labeller` setting's factory, else CLIP (label_model, `label_weights`), whose
    network this worker loads once."""
    if settings.labeller:
        module, _, name = settings.labeller.partition(":")
        factory = getattr(importlib.import_module(module), name)
        return factory(settings, tuple(labels))
    check_labeller(settings)
    return ClipLabeller(labels, model=settings.label_model, pretrained=label_weights(settings), device=device)
