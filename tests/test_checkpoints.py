"""Unit tier (no Redis): presets, checkpoint resolution, and loading real SAM 2.1 weights from a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sam2
import torch
import yaml

from schemas.errors import CheckpointError, ConfigError
from worker.model.sam2.checkpoints import (
    RANDOM,
    ModelPreset,
    build_predictor,
    get_preset,
    load_presets,
    resolve_checkpoint,
    resolve_device,
)

PRESET_NAMES = {"tiny", "small", "base_plus", "large"}


@pytest.fixture(scope="module")
def presets() -> dict[str, ModelPreset]:
    return load_presets()


@pytest.fixture(scope="module")
def tiny(presets: dict[str, ModelPreset]) -> ModelPreset:
    return presets["tiny"]


# ---------------------------------------------------------------------------------------------- presets


def test_all_presets_load_and_their_configs_ship_with_sam2(presets: dict[str, ModelPreset]) -> None:
    assert set(presets) == PRESET_NAMES
    for name, preset in presets.items():
        assert preset.name == name
        assert (Path(sam2.__file__).parent / preset.config).is_file(), preset.config
        assert preset.file.endswith(".pt") and preset.url.endswith(preset.file)
        assert preset.hf_repo.startswith("facebook/sam2.1-hiera-")


def test_unknown_preset_lists_the_known_ones(presets: dict[str, ModelPreset]) -> None:
    with pytest.raises(ConfigError) as info:
        get_preset("huge", presets)
    for name in PRESET_NAMES:
        assert name in str(info.value)
    assert get_preset("tiny").file == "sam2.1_hiera_tiny.pt"


@pytest.mark.parametrize(
    "text",
    [
        "tiny: [unclosed",
        "- just a list",
        "tiny: not-a-map",
        "tiny: {config: c.yaml, file: f.pt, hf_repo: r}",
        "tiny: {config: c.yaml, file: f.pt, hf_repo: r, url: u, extra: x}",
    ],
)
def test_malformed_presets_are_config_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="models.yaml"):
        load_presets(path)


def test_missing_presets_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_presets(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------------------ resolution


def test_random_means_no_checkpoint(
    tiny: ModelPreset, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert resolve_checkpoint(tiny, RANDOM, tmp_path) is None
    assert "meaningless" in caplog.text


def test_missing_explicit_path_says_what_to_do(tiny: ModelPreset, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(tiny, str(missing), tmp_path)
    message = str(info.value)
    assert str(missing.resolve()) in message
    assert "--checkpoint random" in message
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(tiny, str(tmp_path), tmp_path)  # a directory is not a checkpoint file


def test_existing_explicit_path_is_used(tiny: ModelPreset, tmp_path: Path) -> None:
    path = tmp_path / "mine.pt"
    path.write_bytes(b"x")
    assert resolve_checkpoint(tiny, str(path), tmp_path / "elsewhere") == path.resolve()


def test_preset_file_in_checkpoint_dir_is_used_without_download(
    tiny: ModelPreset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _forbidden_download)
    (tmp_path / tiny.file).write_bytes(b"x")
    assert resolve_checkpoint(tiny, None, tmp_path) == tmp_path / tiny.file


def test_offline_and_missing_names_the_repo_and_the_path(
    tiny: ModelPreset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _forbidden_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(tiny, None, tmp_path)
    _assert_says_how_to_get_it(str(info.value), tiny, tmp_path)


def test_download_disabled_and_missing(
    tiny: ModelPreset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _forbidden_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(tiny, None, tmp_path, allow_download=False)
    _assert_says_how_to_get_it(str(info.value), tiny, tmp_path)


def test_missing_preset_file_is_downloaded(
    tiny: ModelPreset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    calls: list[dict[str, Any]] = []

    def fake_download(*, repo_id: str, filename: str, local_dir: Path | str) -> str:
        calls.append({"repo_id": repo_id, "filename": filename, "local_dir": Path(local_dir)})
        path = Path(local_dir) / filename
        path.write_bytes(b"weights")
        return str(path)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    checkpoint_dir = tmp_path / "new" / "dir"  # created on demand
    got = resolve_checkpoint(tiny, None, checkpoint_dir)
    assert got == checkpoint_dir / tiny.file and got.read_bytes() == b"weights"
    assert calls == [{"repo_id": tiny.hf_repo, "filename": tiny.file, "local_dir": checkpoint_dir}]


def test_failed_download_says_how_to_get_it(
    tiny: ModelPreset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    def no_network(**_: Any) -> str:
        raise OSError("Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(CheckpointError, match="Network is unreachable") as info:
        resolve_checkpoint(tiny, None, tmp_path)
    _assert_says_how_to_get_it(str(info.value), tiny, tmp_path)
    assert isinstance(info.value.__cause__, OSError)


def _forbidden_download(**kwargs: Any) -> str:
    raise AssertionError(f"unexpected download {kwargs}")


def _assert_says_how_to_get_it(message: str, preset: ModelPreset, checkpoint_dir: Path) -> None:
    assert str(checkpoint_dir / preset.file) in message
    assert preset.hf_repo in message
    assert f"hf download {preset.hf_repo} {preset.file} --local-dir {checkpoint_dir}" in message
    assert f"curl -L -o {checkpoint_dir / preset.file} {preset.url}" in message
    assert "--checkpoint random" in message


# ------------------------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def saved_tiny(
    tiny: ModelPreset, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, torch.Tensor]]:
    """The real sam2.1 tiny model with random weights, saved as a checkpoint file: (path, state dict)."""
    model = build_predictor(tiny, None, device="cpu", image_size=256)
    assert model.image_size == 256
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / tiny.file
    torch.save({"model": state}, path)
    return path, state


def test_checkpoint_round_trips_into_the_model(
    tiny: ModelPreset, saved_tiny: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    path, state = saved_tiny
    model = build_predictor(
        tiny, resolve_checkpoint(tiny, str(path), path.parent), device="cpu", image_size=256
    )
    assert type(model).__name__ == "SAM2VideoPredictor"
    assert not model.training
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key


def test_garbage_file_is_a_checkpoint_error(tiny: ModelPreset, tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"{path} does not match preset tiny") as info:
        build_predictor(tiny, path, device="cpu", image_size=256)
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("content", [{"state_dict": {}}, ["model"], {"model": "nope"}])
def test_checkpoint_without_a_model_state_dict(tiny: ModelPreset, tmp_path: Path, content: Any) -> None:
    path = tmp_path / "nomodel.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="no 'model' state dict"):
        build_predictor(tiny, path, device="cpu", image_size=256)


def test_partial_state_dict_names_missing_keys(
    tiny: ModelPreset, saved_tiny: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    _, state = saved_tiny
    partial = dict(list(state.items())[1:])
    partial["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pt"
    torch.save({"model": partial}, path)
    with pytest.raises(CheckpointError, match="1 missing keys.*1 unexpected keys, e.g. extra.weight"):
        build_predictor(tiny, path, device="cpu", image_size=256)


def test_weights_of_another_preset_do_not_load(
    presets: dict[str, ModelPreset], saved_tiny: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    path, _ = saved_tiny
    with pytest.raises(CheckpointError, match="does not match preset small.*missing keys"):
        build_predictor(presets["small"], path, device="cpu", image_size=256)


def test_unknown_sam2_config_is_a_config_error(tiny: ModelPreset) -> None:
    bad = ModelPreset("bad", "configs/sam2.1/nope.yaml", tiny.file, tiny.hf_repo, tiny.url)
    with pytest.raises(ConfigError, match="nope.yaml"):
        build_predictor(bad, None, device="cpu", image_size=256)


# ---------------------------------------------------------------------------------------------- device


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="auto, cpu, cuda"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device(device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_device("cuda:1")


def test_models_yaml_is_plain_yaml() -> None:
    from runtime.settings import CONFIGS_DIR

    assert set(yaml.safe_load((CONFIGS_DIR / "models.yaml").read_text())) == PRESET_NAMES


def test_opencv_runs_single_threaded_beside_a_cpu_model() -> None:
    """OpenCV's thread pool would preempt a CPU model's OpenMP threads on every core at once."""
    import cv2

    from worker.model.build import share_cores_with_model

    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(2)
        share_cores_with_model("cuda:0")
        assert cv2.getNumThreads() == 2  # a GPU model leaves the CPU to OpenCV
        share_cores_with_model("cpu")
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(before)


def test_cpu_model_threads_are_capped_at_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a container whose CPU quota allows fewer CPUs than torch counts, the model uses that many."""
    import cv2
    import torch

    from runtime import machine
    from worker.model.build import share_cores_with_model

    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    try:
        torch.set_num_threads(4)
        monkeypatch.setattr(machine, "usable_cores", lambda: 1)
        share_cores_with_model("cuda:0")
        assert torch.get_num_threads() == 4  # a GPU model: the CPU threads are left alone
        share_cores_with_model("cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
