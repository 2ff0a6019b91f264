"""The pass on the H100 (`pytest -m gpu`): bf16 inference and a training step through optimized
tiny Wan, CogVideoX and HunyuanVideo (inductor), against the same model with its video
self-attention done by ``vmoba_reference`` (float64 dense mask) and the same layer schedule
("golden"). The bound is
GPU_ERROR_FACTOR x the error of the baseline (the same masked attention by SDPA in bf16), or
MODEL_REL_TOL (GRAD_REL_TOL for gradients).

The grids are larger than the CPU tests' (1024 video tokens, block 128) so that every partition
has several chunks of whole kernel blocks; head dim 16 (flex needs >= 16).
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")

import tiny_models as tm  # noqa: E402
from conftest import GPU_ERROR_FACTOR  # noqa: E402
from test_api import first, reference_forward  # noqa: E402

from vmoba_compile import VMoBAConfig, optimize  # noqa: E402
from vmoba_compile.kernels import flash_unavailable  # noqa: E402
from vmoba_compile.passes import rewrite  # noqa: E402
from vmoba_compile.passes.rewrite import UNPROVEN_MODULE  # noqa: E402

pytestmark = pytest.mark.gpu

GRID = (4, 16, 16)
CONFIG = VMoBAConfig(
    block_size=128, chunk_1d=(1,), chunk_2d=(8, 8), chunk_3d=(2, 8, 8), selection="topk", topk=1
)
# A whole model in bf16: each run recomputes its selections from its own activations, so a
# near-tie gate can flip a chunk in a later layer. Allowed: GPU_ERROR_FACTOR x the baseline's
# error, or 1% (bf16 keeps 8 bits), whichever is larger. test_attention_gpu.py holds the op
# itself to the strict criterion.
MODEL_REL_TOL = 1e-2
# Gradients: the baseline runs the model's other ops eagerly, as the golden does, while the
# optimized model runs them compiled (other bf16 roundings), and the backward adds them up again.
# On tiny HunyuanVideo (text tokens, key padding) two text-path weight gradients came out 1.13%
# and 1.30% from the golden on the H100, in the whole-model and the regional compile alike
# (torch 2.11, bf16), while in float32 on CPU every gradient of the same
# model equals the reference's within 5e-7 but one that is zero by construction. Allowed: 2%.
GRAD_REL_TOL = 2e-2


def _to(x, dtype):
    if isinstance(x, torch.Tensor):
        return x.to("cuda", dtype) if x.is_floating_point() else x.to("cuda")
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, dtype) for v in x)
    return x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / (b.double().norm() + 1e-12)).item()


# Three VMoBA layers in each family (HunyuanVideo: two double- and one single-stream block,
# its RoPE axes summing to the head dim).
OVERRIDES = {"hunyuan_video": dict(num_layers=2, num_single_layers=1, rope_axes_dim=(4, 6, 6))}


def _setup(family: str, head_dim: int = 16):
    torch._dynamo.reset()
    over = {"num_layers": 3, **OVERRIDES.get(family, {})}
    if "rope_axes_dim" in over:  # the RoPE axes sum to the head dim
        over["rope_axes_dim"] = tuple(a * head_dim // 16 for a in over["rope_axes_dim"])
    model, _, _ = tm.build(family, attention_head_dim=head_dim, **over)
    args, kwargs = tm.spec(family).make_inputs(model, GRID, torch.Generator().manual_seed(0))
    model = model.to("cuda", torch.bfloat16)
    return model, _to(args, torch.bfloat16), {k: _to(v, torch.bfloat16) for k, v in kwargs.items()}


def _grads(model, run):
    model.zero_grad(set_to_none=True)
    loss = run().float().square().mean()
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, grads


def _check(name: str, mine, golden, baseline, floor: float = MODEL_REL_TOL) -> None:
    err, bound = _rel(mine, golden), max(GPU_ERROR_FACTOR * _rel(baseline, golden), floor)
    assert err <= bound, f"{name}: {err:.2e} > {bound:.2e}"


@pytest.mark.parametrize(
    ("family", "regional", "kernel"),
    [
        ("wan", None, "auto"),
        ("cogvideox", None, "auto"),
        ("hunyuan_video", None, "auto"),
        ("wan", False, "auto"),
        ("hunyuan_video", False, "auto"),
        ("wan", None, "flash"),
        ("cogvideox", None, "flash"),
        ("hunyuan_video", None, "flash"),
    ],
)
def test_bf16_forward_and_training_step_match_reference(
    family: str, regional: bool | None, kernel: str
) -> None:
    """The default (``regional=None``: these models' blocks, three compiled variants for 1D, 2D
    and 3D) with the training step under diffusers' activation checkpointing, whose
    recomputation runs outside the forward call; and the whole-model compile. ``kernel="flash"``:
    the same through FlashAttention-4 (at these 1,024 tokens ``auto`` picks Triton for every
    call)."""
    if kernel == "flash" and flash_unavailable():
        pytest.skip(flash_unavailable())
    config = dataclasses.replace(CONFIG, kernel=kernel)
    # FA4's Hopper backward needs head dim >= 32 (vmoba_compile.kernels refuses 16 there)
    model, args, kwargs = _setup(family, head_dim=32 if kernel == "flash" else 16)
    opt = optimize(model, config, regional=regional)
    assert (opt.regional_blocks is not None) is (regional is None)
    with torch.no_grad():
        out = first(opt(*args, **kwargs))
        golden = reference_forward(model, args, kwargs, CONFIG)
        baseline = reference_forward(model, args, kwargs, CONFIG, exact=False)
        dense = first(model(*args, **kwargs))
    assert len(opt.report.rewritten) == 3, opt.report
    if kernel == "flash":
        assert {c.kernel for c in opt.report.rewritten} == {"flash"}, opt.report
    _check("forward", out, golden, baseline)
    assert _rel(dense, golden) > _rel(out, golden), "the test cannot tell VMoBA from dense"

    model.train()
    if regional is None:
        model.enable_gradient_checkpointing()
    loss, got = _grads(model, lambda: first(opt(*args, **kwargs)))
    model.disable_gradient_checkpointing()  # the reference's SDPA override is not recomputed
    _, want = _grads(model, lambda: reference_forward(model, args, kwargs, CONFIG))
    _, base = _grads(model, lambda: reference_forward(model, args, kwargs, CONFIG, exact=False))
    assert got.keys() == want.keys() and got
    for n in got:
        _check(f"grad {n}", got[n], want[n], base[n], GRAD_REL_TOL)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optim = torch.optim.AdamW(opt.parameters(), lr=1e-3)
    _grads(model, lambda: first(opt(*args, **kwargs)))
    optim.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(loss)


# ------------------------------------------------------------------ the user stacks, on CUDA


def _fuse_qkv(model: torch.nn.Module) -> None:
    model.fuse_qkv_projections()


def _group_offload_streams(model: torch.nn.Module) -> None:
    model.to("cpu")  # the hooks move each block to the GPU on a CUDA stream, ahead of its turn
    model.enable_group_offload(
        torch.device("cuda"),
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=True,
    )


def _leaf_offload_streams(model: torch.nn.Module) -> None:
    model.to("cpu")  # hooks on every leaf: each attention call runs in its processor's frame
    model.enable_group_offload(
        torch.device("cuda"),
        offload_device=torch.device("cpu"),
        offload_type="leaf_level",
        use_stream=True,
    )


def _first_block_cache(model: torch.nn.Module) -> None:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.0))


@pytest.mark.parametrize("kernel", ["triton", "flash"])
@pytest.mark.parametrize(
    "tool",
    [_fuse_qkv, _group_offload_streams, _leaf_offload_streams, _first_block_cache],
    ids=["fused_qkv", "group_offload_streams", "leaf_offload_streams", "first_block_cache"],
)
def test_user_stacks_run_vmoba_on_cuda(tool, kernel: str) -> None:
    """The CPU suite's stacks where their CUDA paths differ (tests/test_compat.py): diffusers'
    fused QKV projections (v a view at an offset into the fused output) on the Triton and FA4
    kernels; block-level and leaf-level group offloading with CUDA streams (leaf level: each
    call placed in its processor frame's local module); the first-block cache. The
    account (``report.executions``) must show VMoBA where the CPU suite shows it, on the kernel
    asked for, and the output must be the reference's with those layers (bf16 bound of the
    other tests here)."""
    if kernel == "flash" and flash_unavailable():
        pytest.skip(flash_unavailable())
    config = dataclasses.replace(CONFIG, kernel=kernel)
    model, args, kwargs = _setup("wan", head_dim=32 if kernel == "flash" else 16)
    model.eval()
    layers = [f"blocks.{i}.attn1" for i in range(3)]
    # Every layer runs VMoBA under each tool: the first-block cache runs the later blocks
    # through its hook's closure, placed by identity (tests/test_compat.py), and threshold 0
    # computes every block on the first call.
    # Calls placed by their frame's local module (hooks on every leaf) stay dense on CUDA
    # (SkipReason.LOCAL_PLACEMENT_CUDA, docs/compatibility.md): the output is dense's.
    leaf = tool is _leaf_offload_streams
    vmoba_layers = [] if leaf else layers
    dense_layers = frozenset(range(len(layers))) if leaf else frozenset()
    with torch.no_grad():
        golden = reference_forward(model, args, kwargs, CONFIG, dense_layers)
        baseline = reference_forward(model, args, kwargs, CONFIG, dense_layers, exact=False)
    tool(model)
    opt = optimize(model, config)
    scope = getattr(model, "cache_context", None)
    with torch.no_grad(), scope("gpu") if tool is _first_block_cache else contextlib.nullcontext():
        out = first(opt(*args, **kwargs))
    runs = opt.report.executions
    for m in vmoba_layers:
        assert runs[m].vmoba_forward == 1 and runs[m].dense_forward == 0, opt.report
    for m in set(layers) - set(vmoba_layers):
        assert runs[m].vmoba_forward == 0, opt.report
        assert "a placement proven on CPU only" in " ".join(runs[m].dense_causes), opt.report
    if vmoba_layers:
        assert {c.kernel for c in opt.report.rewritten if c.module in vmoba_layers} == {kernel}
    assert UNPROVEN_MODULE not in runs, opt.report
    _check(f"forward under {tool.__name__}", out, golden, baseline)


def _leaf_offload(model: torch.nn.Module) -> None:
    model.to("cpu")
    model.enable_group_offload(
        torch.device("cuda"), offload_device=torch.device("cpu"), offload_type="leaf_level"
    )


def _group_offload(model: torch.nn.Module) -> None:
    model.to("cpu")
    model.enable_group_offload(
        torch.device("cuda"),
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
    )


_LEAF = "calls placed by their frame's local module are wrong on CUDA (LOCAL_PLACEMENT_CUDA)"


@pytest.mark.parametrize(
    "tool",
    [
        # Measured wrong on an H100 (torch 2.11.0+cu130): 2.3e-2 / 8.8e-3 from the reference in
        # float32, so LOCAL_PLACEMENT_CUDA stays; strict, so a fix that makes them pass says so.
        pytest.param(_leaf_offload_streams, marks=pytest.mark.xfail(strict=True, reason=_LEAF)),
        pytest.param(_leaf_offload, marks=pytest.mark.xfail(strict=True, reason=_LEAF)),
        _group_offload_streams,
        _group_offload,
    ],
    ids=["leaf_streams", "leaf", "block_streams", "block"],
)
def test_offloaded_placement_matches_reference_in_float32(tool, monkeypatch) -> None:
    """The offloading stacks in float32 on Triton, where bf16 rounding upstream of a call cannot
    flip a near-tie selection (top-1 on a tiny random model: a flip moves a whole layer's output
    by percents in bf16): the placement and the partitions are right exactly when the output
    is the float64 reference's within float32 rounding. Leaf level places each call by its
    processor frame's local module, here with CUDA counted as proven
    (``LOCAL_PLACEMENT_PROVEN_ON``): the measurement that decides whether the rule that keeps
    those calls dense on CUDA can go; block level places each call by its block."""
    monkeypatch.setattr(rewrite, "LOCAL_PLACEMENT_PROVEN_ON", frozenset({"cpu", "cuda"}))
    config = dataclasses.replace(CONFIG, kernel="triton")
    model, args, kwargs = _setup("wan")
    model = model.float().eval()
    args, kwargs = _to(args, torch.float32), {k: _to(v, torch.float32) for k, v in kwargs.items()}
    with torch.no_grad():
        golden = reference_forward(model, args, kwargs, CONFIG)
        dense = first(model(*args, **kwargs))
    tool(model)
    opt = optimize(model, config)
    with torch.no_grad():
        out = first(opt(*args, **kwargs))
    runs = opt.report.executions
    for m in [f"blocks.{i}.attn1" for i in range(3)]:
        assert runs[m].vmoba_forward == 1 and runs[m].dense_forward == 0, opt.report
    err = _rel(out, golden)
    print(f"{tool.__name__}: float32 error {err:.3e}, dense {_rel(dense, golden):.3e}")
    assert err < 1e-4, f"{tool.__name__}: {err:.2e} from the float64 reference"
    assert _rel(dense, golden) > 100 * err, "the test cannot tell VMoBA from dense"
