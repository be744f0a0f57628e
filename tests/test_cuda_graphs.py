"""worker/model/sam2/cuda_graphs.py: input signatures, buffers and scoping on the CPU (unit tier); capture, replay,
fallback and eviction on a GPU (gpu tier). The whole SAM 2 driver with graphs is compared with SAM 2's
own predictor in tests/test_sam2_memory.py (gpu tier)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from runtime.settings import Settings
from schemas.errors import ConfigError
from worker.model.sam2.cuda_graphs import (
    GRAPHED_MODULES,
    GraphCache,
    GraphedForward,
    _Buffer,
    _rebuild,
    _signature,
    graphed_modules,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_signature_tells_apart_what_a_graph_depends_on() -> None:
    a = torch.zeros(2, 3)
    tensors: list[torch.Tensor] = []
    base = _signature(((a, [a]), {"n": 3, "flag": True, "none": None}), tensors)
    assert len(tensors) == 2 and tensors[0] is a
    assert hash(base)  # usable as a dict key
    same = _signature(((torch.ones(2, 3), [torch.ones(2, 3)]), {"n": 3, "flag": True, "none": None}), [])
    assert same == base  # values do not matter, only layout
    for other in (
        ((torch.zeros(3, 2), [a]), {"n": 3, "flag": True, "none": None}),  # shape
        ((a.t().contiguous().t(), [a]), {"n": 3, "flag": True, "none": None}),  # strides
        ((a.half(), [a]), {"n": 3, "flag": True, "none": None}),  # dtype
        ((a, [a]), {"n": 4, "flag": True, "none": None}),  # a plain value
        ((a, (a,)), {"n": 3, "flag": True, "none": None}),  # structure
    ):
        assert _signature(other, []) != base


def test_signature_refuses_what_it_cannot_describe() -> None:
    from worker.model.sam2.cuda_graphs import _Unsupported

    with pytest.raises(_Unsupported):
        _signature((object(),), [])


def test_rebuild_puts_tensors_back_in_order() -> None:
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    tree = {"x": [a, (b, 7)], "y": c, "z": None}
    out = _rebuild(tree, iter([c, a, b]))
    assert out["x"][0] is c and out["x"][1][0] is a and out["x"][1][1] == 7 and out["y"] is b and out["z"] is None


def test_buffer_keeps_an_expanded_inputs_layout() -> None:
    """SAM 2's dense prompt embedding is a weight expanded over the image: the buffer stays expanded
    (same strides, so the same kernels), holding one element per expanded run."""
    weight = torch.arange(4.0).reshape(1, 4, 1, 1)
    dense = weight.expand(2, 4, 8, 8)
    buf = _Buffer.like(dense)
    assert buf is not None and buf.view.stride() == dense.stride() and buf.base.numel() == 4
    buf.fill((weight + 10).expand(2, 4, 8, 8))
    assert torch.equal(buf.view, (weight + 10).expand(2, 4, 8, 8))
    plain = torch.randn(3, 5)[:, ::2]  # a strided slice clones densely: not the same layout
    assert _Buffer.like(plain) is None
    dense_in = torch.randn(3, 5)
    buf = _Buffer.like(dense_in)
    assert buf is not None and buf.index is None and torch.equal(buf.view, dense_in)


@pytest.mark.parametrize(("fn", "flagged"), [
    (lambda x: x * 2 + 1, None),
    (lambda x: torch.repeat_interleave(x, 3, dim=0), None),  # SAM 2's mask decoder: an int count
    (lambda x: x.sum().item(), "_local_scalar_dense"),
    (lambda x: x[x > 0], "boolean mask"),
    (lambda x: x.nonzero(), "nonzero"),
    (lambda x: torch.repeat_interleave(x, torch.tensor([1, 2, 1, 2])), "repeat_interleave"),  # sized by the data
    (lambda x: x.to("meta"), "between cpu and meta"),  # a copy to another device (on a GPU: a host copy)
], ids=["arithmetic", "repeat-int", "item", "bool-mask", "nonzero", "repeat-tensor", "device-copy"])
def test_the_capture_check_flags_what_a_graph_cannot_hold(fn: Any, flagged: str | None) -> None:
    from worker.model.sam2.cuda_graphs import _CaptureCheck

    with _CaptureCheck() as check:
        fn(torch.arange(4.0) - 1)
    if flagged is None:
        assert check.found is None
    else:
        assert check.found is not None and flagged in check.found


def test_cpu_tensors_run_eagerly() -> None:
    calls = []

    def fn(x: torch.Tensor, scale: float = 1.0) -> dict[str, Any]:
        calls.append(x)
        return {"y": x * scale}

    graphed = GraphedForward(fn, "fn")
    x = torch.randn(4)
    out = graphed(x, scale=2.0)
    assert torch.equal(out["y"], x * 2) and calls == [x]
    assert graphed.stats.eager == 1 and graphed.stats.captures == 0 and not graphed.graphs


def test_graphed_modules_installs_for_the_block_and_restores_the_predictor() -> None:
    class Predictor:
        def __init__(self) -> None:
            for name in GRAPHED_MODULES:
                setattr(self, name, torch.nn.Linear(2, 2))

        def forward_image(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"x": x}

    p = Predictor()
    cache = GraphCache(p)  # type: ignore[arg-type]
    assert set(cache.all()) == {"forward_image", *GRAPHED_MODULES}
    x = torch.randn(1, 2)
    expected = p.memory_attention(x)
    with graphed_modules(p, cache):
        for name in GRAPHED_MODULES:
            assert getattr(p, name).forward is cache.modules[name]
        assert torch.equal(p.memory_attention(x), expected)  # CPU: eager through the wrapper
    for name in GRAPHED_MODULES:
        assert "forward" not in vars(getattr(p, name))  # the class's forward again
    assert cache.modules["memory_attention"].stats.eager == 1
    with pytest.raises(RuntimeError), graphed_modules(p, cache):
        raise RuntimeError("a job failed")
    assert all("forward" not in vars(getattr(p, name)) for name in GRAPHED_MODULES)


def test_cuda_graphs_setting() -> None:
    assert Settings().cuda_graphs == "on"
    assert Settings.load({"VSEG_CUDA_GRAPHS": "off"}, config_path=None).cuda_graphs == "off"
    with pytest.raises(ConfigError, match="cuda_graphs must be on or off"):
        Settings.load({"VSEG_CUDA_GRAPHS": "maybe"}, config_path=None)


def test_yaml_on_and_off_read_as_words(tmp_path: Any) -> None:
    """YAML 1.1 reads a bare on/off as a boolean; the settings take it as the word."""
    cfg = tmp_path / "service.yaml"
    cfg.write_text("cuda_graphs: off\nmodel_process: on\n")
    s = Settings.load({}, config_path=cfg)
    assert s.cuda_graphs == "off" and s.model_process == "on"


# ---- gpu tier -----------------------------------------------------------------------------------
class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)
        self.norm = torch.nn.LayerNorm(64)

    def forward(self, x: torch.Tensor, pos: list[torch.Tensor], *, scale: float) -> tuple[torch.Tensor, dict[str, Any]]:
        y = self.norm(self.lin(x) + pos[0]) * scale
        return y, {"sum": [y.sum(dim=-1)], "scale": scale}


@pytest.mark.gpu
@needs_cuda
def test_replay_gives_the_eager_numbers_and_fresh_tensors() -> None:
    torch.manual_seed(0)
    block = _Block().cuda()
    graphed = GraphedForward(block.forward, "block")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for k in range(4):
            x, pos = torch.randn(8, 64, device="cuda"), torch.randn(8, 64, device="cuda")
            expected = block(x, [pos], scale=0.5)
            got = graphed(x, [pos], scale=0.5)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1]["sum"][0], expected[1]["sum"][0])
            assert got[1]["scale"] == 0.5
            if k == 0:
                first = got[0]
                first_copy = first.clone()
        assert torch.equal(first, first_copy)  # later replays did not overwrite an earlier result
        assert graphed.stats.captures == 1 and graphed.stats.replays == 4 and not graphed.stats.failed
        graphed(torch.randn(16, 64, device="cuda"), [torch.randn(16, 64, device="cuda")], scale=0.5)  # new shape
        graphed(torch.randn(8, 64, device="cuda"), [torch.randn(8, 64, device="cuda")], scale=2.0)  # new value
        assert graphed.stats.captures == 3 and len(graphed.graphs) == 3
    with torch.inference_mode():  # autocast off: another signature
        x, pos = torch.randn(8, 64, device="cuda"), torch.randn(8, 64, device="cuda")
        assert torch.equal(graphed(x, [pos], scale=0.5)[0], block(x, [pos], scale=0.5)[0])
        assert graphed.stats.captures == 4


@pytest.mark.gpu
@needs_cuda
def test_a_function_that_cannot_be_captured_runs_eagerly_and_cuda_stays_usable() -> None:
    """An operation that waits for the GPU, or a host copy, is caught in the eager warm-up run: no
    capture is attempted (a failed one would leave PyTorch's CUDA state broken), the calls run
    eagerly, and the process goes on using CUDA, its random generator and graphs."""

    def syncs(x: torch.Tensor) -> torch.Tensor:
        return x * float(x.sum().item())

    def masks(x: torch.Tensor) -> torch.Tensor:
        return x[x > 1].sum() + x

    def uploads(x: torch.Tensor) -> torch.Tensor:
        return x + torch.ones(4).to(x.device)

    x = torch.arange(4.0, device="cuda")
    for fn, expected, why in ((syncs, x * 6, "_local_scalar_dense"), (masks, x + 5, "boolean mask"),
                              (uploads, x + 1, "between cpu and cuda")):
        graphed = GraphedForward(fn, fn.__name__)
        assert torch.equal(graphed(x), expected)
        assert graphed.stats.captures == 0 and len(graphed.stats.failed) == 1 and why in graphed.stats.failed[0]
        assert torch.equal(graphed(x), expected)  # refused signature: eager, not checked again
        assert graphed.stats.eager == 2 and len(graphed.stats.failed) == 1 and not graphed.disabled
    y = torch.randn(256, 256, device="cuda")  # the random generator was never left in capture mode
    assert torch.allclose((y @ y).sum().cpu(), (y.cpu() @ y.cpu()).sum(), rtol=1e-3)
    ok = GraphedForward(lambda t: t + 1, "ok")
    assert torch.equal(ok(x), x + 1) and ok.stats.captures == 1  # and capturing still works


@pytest.mark.gpu
@needs_cuda
def test_least_recently_used_graphs_are_evicted() -> None:
    graphed = GraphedForward(lambda t: t * 2, "double", max_graphs=2)
    for n in (1, 2, 1, 3):
        x = torch.full((n,), float(n), device="cuda")
        assert torch.equal(graphed(x), x * 2)
    assert graphed.stats.captures == 3 and len(graphed.graphs) == 2
    assert [key[0][1][0][1] for key in graphed.graphs] == [(1,), (3,)]  # shape 2 went, 1 was used since
