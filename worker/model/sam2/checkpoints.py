"""Model presets, checkpoint resolution and predictor construction for the SAM 2.1 video predictor.

    load_presets / get_preset   configs/models.yaml -> ModelPreset (config inside the sam2 package, file, hub repo)
    resolve_checkpoint          "random" -> None; a path -> that file; None -> checkpoint_dir/<file>, downloaded
                                from the Hugging Face Hub when missing (unless offline)
    build_predictor             the SAM2VideoPredictor, with the checkpoint loaded and checked against the preset
    resolve_device              "auto" | "cpu" | "cuda" | "cuda:N" -> a device string that exists here

Every failure is a ConfigError or CheckpointError that names what was tried and what to do next.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from runtime.settings import CONFIGS_DIR
from schemas.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

RANDOM = "random"
MODELS_YAML = CONFIGS_DIR / "models.yaml"
_TRUTHY = {"1", "ON", "YES", "TRUE"}
_MAX_KEYS_SHOWN = 3
# What torch.load and load_state_dict raise on a file that is not a SAM 2 checkpoint.
_LOAD_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    KeyError,
    TypeError,
    ValueError,
    AttributeError,
)


@dataclass(frozen=True)
class ModelPreset:
    name: str
    config: str  # Hydra config inside the sam2 package, e.g. configs/sam2.1/sam2.1_hiera_t.yaml
    file: str  # checkpoint file name, looked up in checkpoint_dir
    hf_repo: str  # Hugging Face Hub repo that holds `file`
    url: str  # direct download URL of `file`


# ---------------------------------------------------------------------------------------------- presets


def load_presets(path: Path = MODELS_YAML) -> dict[str, ModelPreset]:
    """Every preset in `path` (configs/models.yaml), by name."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read model presets {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"model presets {path} are not valid YAML: {e}") from e
    if not isinstance(loaded, dict) or not loaded:
        raise ConfigError(
            f"{path} must hold a map of preset name -> settings, but holds {type(loaded).__name__}"
        )
    return {str(name): _parse_preset(str(name), entry, path) for name, entry in loaded.items()}


def _parse_preset(name: str, entry: Any, path: Path) -> ModelPreset:
    wanted = [f.name for f in fields(ModelPreset) if f.name != "name"]
    if not isinstance(entry, Mapping):
        raise ConfigError(f"preset {name!r} in {path} must be a map with keys {wanted}, but got {entry!r}")
    missing = [k for k in wanted if not isinstance(entry.get(k), str) or not entry[k]]
    unknown = sorted(set(entry) - set(wanted))
    if missing or unknown:
        raise ConfigError(
            f"preset {name!r} in {path} must have non-empty string keys {wanted}, "
            f"but lacks {missing} and has unknown keys {unknown}"
        )
    return ModelPreset(name=name, **{k: entry[k] for k in wanted})


def get_preset(name: str, presets: Mapping[str, ModelPreset] | None = None) -> ModelPreset:
    """The preset called `name`; ConfigError listing the known names if there is none."""
    presets = load_presets() if presets is None else presets
    try:
        return presets[name]
    except KeyError:
        raise ConfigError(
            f"unknown model preset {name!r}; known presets: {', '.join(sorted(presets))} "
            f"(set --model or VSEG_MODEL)"
        ) from None


# ------------------------------------------------------------------------------------------ checkpoints


def resolve_checkpoint(
    preset: ModelPreset, checkpoint: str | None, checkpoint_dir: Path, *, allow_download: bool = True
) -> Path | None:
    """The checkpoint file to load, or None for random weights (`checkpoint == "random"`)."""
    if checkpoint == RANDOM:
        log.warning(
            "checkpoint=random: building %s with RANDOM WEIGHTS; every mask it produces is meaningless "
            "(smoke tests only)",
            preset.name,
        )
        return None
    if checkpoint is not None:
        return _explicit_checkpoint(preset, Path(checkpoint).expanduser(), checkpoint_dir)
    path = checkpoint_dir.expanduser() / preset.file
    if path.is_file():
        log.info("using checkpoint %s for preset %s", path, preset.name)
        return path
    if not allow_download:
        raise CheckpointError(_missing_preset_message(preset, path, "downloads are disabled"))
    if _hf_offline():
        raise CheckpointError(_missing_preset_message(preset, path, "HF_HUB_OFFLINE is set"))
    return _download(preset, path)


def _explicit_checkpoint(preset: ModelPreset, path: Path, checkpoint_dir: Path) -> Path:
    path = path.resolve()
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint file not found: {path}; pass an existing .pt file, or omit --checkpoint to use the "
            f"{preset.name} preset (downloaded to {checkpoint_dir.expanduser() / preset.file}), "
            f"or --checkpoint {RANDOM} for a smoke test"
        )
    log.info("using checkpoint %s for preset %s", path, preset.name)
    return path


def _hf_offline() -> bool:
    # HF_HUB_OFFLINE is huggingface_hub's own switch; read it here because the hub reads it at import time.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUTHY


def _download(preset: ModelPreset, path: Path) -> Path:
    log.info(
        "checkpoint %s not found; downloading %s from Hugging Face repo %s", path, preset.file, preset.hf_repo
    )
    try:
        from huggingface_hub import hf_hub_download

        path.parent.mkdir(parents=True, exist_ok=True)
        got = Path(hf_hub_download(repo_id=preset.hf_repo, filename=preset.file, local_dir=path.parent))
    except Exception as e:  # network, auth, disk: all end in the same advice
        raise CheckpointError(_missing_preset_message(preset, path, f"download failed: {e}")) from e
    if not got.is_file():
        raise CheckpointError(
            _missing_preset_message(preset, path, f"download returned {got}, which is not a file")
        )
    log.info("downloaded checkpoint %s (%.1f MB)", got, got.stat().st_size / 1e6)
    return got


def _missing_preset_message(preset: ModelPreset, path: Path, why: str) -> str:
    return (
        f"checkpoint for preset {preset.name} not found at {path} and not fetched from Hugging Face repo "
        f"{preset.hf_repo} ({why}); get it by hand with "
        f"`hf download {preset.hf_repo} {preset.file} --local-dir {path.parent}` or "
        f"`curl -L -o {path} {preset.url}`, or pass --checkpoint PATH to an existing file, "
        f"or run with --checkpoint {RANDOM} for a smoke test (meaningless masks)"
    )


# ------------------------------------------------------------------------------------------- predictor


def build_predictor(
    preset: ModelPreset, ckpt_path: Path | None, *, device: str, image_size: int | None
) -> Any:
    """The SAM2VideoPredictor for `preset` on `device`, with weights from `ckpt_path` (None: random).

    Built on the CPU, loaded, then moved, as sam2's own builder does; the checkpoint is loaded here rather
    than by sam2 so that a wrong file becomes a CheckpointError that says why, and a CUDA error while moving
    the model to the GPU is not mistaken for a bad checkpoint.
    """
    model = _build_model(preset, image_size)
    if ckpt_path is not None:
        _load_weights(model, preset, ckpt_path)
    model = model.to(device)
    model.eval()
    log.info(
        "built %s predictor on %s (image_size=%s, weights=%s)",
        preset.name,
        device,
        model.image_size,
        ckpt_path if ckpt_path is not None else RANDOM,
    )
    return model


def _build_model(preset: ModelPreset, image_size: int | None) -> Any:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from sam2.build_sam import build_sam2_video_predictor

    overrides = [f"++model.image_size={image_size}"] if image_size is not None else []
    try:
        return build_sam2_video_predictor(
            preset.config, ckpt_path=None, device="cpu", hydra_overrides_extra=overrides
        )
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(
            f"cannot build preset {preset.name} from sam2 config {preset.config} (overrides {overrides}): {e}; "
            f"check configs/models.yaml and that sam2==1.1.0 is installed"
        ) from e


def _load_weights(model: torch.nn.Module, preset: ModelPreset, ckpt_path: Path) -> None:
    try:
        loaded = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise _mismatch(preset, ckpt_path, f"cannot read it: {e}") from e
    except _LOAD_ERRORS as e:
        raise _mismatch(
            preset, ckpt_path, f"not a torch checkpoint: {type(e).__name__}: {_first_line(e)}"
        ) from e
    if not isinstance(loaded, Mapping) or not isinstance(loaded.get("model"), Mapping):
        keys = sorted(loaded)[:_MAX_KEYS_SHOWN] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise _mismatch(preset, ckpt_path, f"no 'model' state dict in it (found {keys})")
    state = loaded["model"]
    reason = _state_dict_mismatch(model.state_dict(), state)
    if reason:
        raise _mismatch(preset, ckpt_path, reason)
    try:
        model.load_state_dict(state)
    except _LOAD_ERRORS as e:
        raise _mismatch(preset, ckpt_path, _first_line(e)) from e
    log.info("loaded checkpoint %s into preset %s", ckpt_path, preset.name)


def _state_dict_mismatch(expected: Mapping[str, Any], got: Mapping[str, Any]) -> str:
    """A short description of how `got` differs from `expected` in keys and shapes; "" if it does not."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k} {tuple(got[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected
        if k in got and isinstance(got[k], torch.Tensor) and got[k].shape != expected[k].shape
    ]
    parts = [
        f"{len(items)} {label}, e.g. {', '.join(items[:_MAX_KEYS_SHOWN])}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        )
        if items
    ]
    return "; ".join(parts)


def _mismatch(preset: ModelPreset, ckpt_path: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {ckpt_path} does not match preset {preset.name} ({reason}); pass the {preset.file} "
        f"checkpoint from {preset.hf_repo} (or pick the preset it was trained for with --model), "
        f"or run with --checkpoint {RANDOM} for a smoke test"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------- device


def resolve_device(device: str) -> str:
    """Map "auto" to "cuda" if CUDA is available, else "cpu"; check that "cuda"/"cuda:N" exist here."""
    device = device.strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device != "cuda" and not device.startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, but got {device!r}")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} asked for, but CUDA is not available here; use --device cpu or auto"
        )
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ConfigError(
            f"device {device!r} does not exist; this machine has cuda:0..cuda:{torch.cuda.device_count() - 1}"
        )
    return device
