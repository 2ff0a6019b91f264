"""Composability: the tools users stack on a diffusers model, applied before ``optimize``.

Criterion per tool (by the execution account, ``report.executions``, which counts what ran):
an output-neutral tool gives the output of ``optimize`` on the model without it and runs VMoBA
in every video self-attention layer; a tool that changes the numbers runs VMoBA; a tool that
makes VMoBA unprovable runs dense with the reason that says so (never "rewritten" while dense,
never a silent dense run).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import pytest
import tiny_models as tm
import torch
from compat_rows import compat_row
from conftest import ATOL_F32, max_err
from test_api import _CHUNKS, first

from vmoba_compile import SkipReason, VMoBAConfig, optimize
from vmoba_compile.passes.rewrite import UNPROVEN_MODULE

pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # the account's no-graph warnings
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

CONFIG = VMoBAConfig(**_CHUNKS)
SELF_ATTENTION = ("blocks.0.attn1", "blocks.1.attn1")
UNPROVEN = SkipReason.MODULE_UNPROVEN.value


def _layerwise_casting(model: torch.nn.Module) -> None:
    model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)


def _group_offload(kind: str) -> Callable[[torch.nn.Module], None]:
    def apply(model: torch.nn.Module) -> None:
        extra = {"num_blocks_per_group": 1} if kind == "block_level" else {}
        model.enable_group_offload(torch.device("cpu"), offload_type=kind, **extra)

    return apply


def _pyramid_broadcast(model: torch.nn.Module) -> None:
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500
    )
    apply_pyramid_attention_broadcast(model, config)


def _first_block_cache(model: torch.nn.Module) -> None:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.0))


def _accelerate_offload(model: torch.nn.Module) -> None:
    cpu_offload = pytest.importorskip("accelerate").cpu_offload

    cpu_offload(model, execution_device=torch.device("cpu"))


def _run_twice(opt: Any, model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    scope = getattr(model, "cache_context", None)
    with torch.no_grad(), scope("compat") if scope else contextlib.nullcontext():
        out = first(opt(*args, **kwargs))
        first(opt(*args, **kwargs))
    return out


@pytest.fixture(scope="module")
def plain() -> dict[str, Any]:
    """The model without a tool: its optimized output (the criterion) and its dense output."""
    model, args, kwargs = tm.build("wan")
    model.eval()
    weights = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        dense = first(model(*args, **kwargs))
    opt = optimize(model, CONFIG, lowering="aot_eager")
    return dict(out=_run_twice(opt, model, args, kwargs), dense=dense, weights=weights)


def _with_tool(plain: dict, tool: Callable[[torch.nn.Module], None]) -> tuple[Any, torch.Tensor]:
    torch._dynamo.reset()
    model, args, kwargs = tm.build("wan")
    model.load_state_dict(plain["weights"])
    model.eval()
    tool(model)
    opt = optimize(model, CONFIG, lowering="aot_eager")
    return opt, _run_twice(opt, model, args, kwargs)


@pytest.mark.parametrize(
    "tool",
    [
        pytest.param(
            _group_offload("block_level"),
            id="group_block",
            marks=compat_row(
                tool="group offloading, block level "
                '(`enable_group_offload(offload_type="block_level")`)',
                packages=("diffusers",),
                result="VMoBA, output equal",
            ),
        ),
        pytest.param(
            _layerwise_casting,
            id="cast",
            marks=compat_row(
                tool="layerwise casting (`enable_layerwise_casting`, bf16 storage)",
                packages=("diffusers",),
                result="VMoBA",
            ),
        ),
    ],
)
def test_hooks_on_blocks_run_vmoba(plain: dict, tool: Callable) -> None:
    """Hooks that wrap each block's or leaf's forward (the module is reached through the hook's
    ``fn_ref.original_forward.__self__``, or from an attention processor's frame): placed by
    identity, every video self-attention layer runs VMoBA at every call."""
    opt, out = _with_tool(plain, tool)
    runs = opt.report.executions
    for module in SELF_ATTENTION:
        assert runs[module].vmoba_forward == 2 and runs[module].dense_forward == 0, opt.report
    assert "?" not in runs and UNPROVEN_MODULE not in runs, opt.report
    assert max_err(plain["out"], plain["dense"]) > 1e-4, "the test cannot tell VMoBA from dense"
    tol = ATOL_F32 * 10 if tool is not _layerwise_casting else 2e-2  # bf16 weights
    assert max_err(out, plain["out"]) < tol


@compat_row(
    tool="pyramid attention broadcast",
    packages=("diffusers",),
    result='VMoBA where it computes; reused calls counted "no graph"',
)
def test_pyramid_broadcast_reuse_is_counted_not_hidden(plain: dict) -> None:
    """PAB reuses the attention output on some steps: VMoBA where it computes, and the reused
    calls counted as planned calls no graph ran (not as VMoBA runs)."""
    opt, _ = _with_tool(plain, _pyramid_broadcast)
    runs = opt.report.executions
    for module in SELF_ATTENTION:
        assert runs[module].vmoba_forward >= 1 and runs[module].dense_forward == 0, opt.report
        assert runs[module].vmoba_forward + runs[module].no_graph == 2, opt.report


@pytest.mark.parametrize(
    "tool",
    [
        pytest.param(
            _group_offload("leaf_level"),
            id="group_leaf",
            marks=compat_row(
                tool="group offloading, leaf level",
                packages=("diffusers",),
                result="dense, with the reason (`MODULE_UNPROVEN`)",
            ),
        ),
        pytest.param(
            _accelerate_offload,
            id="accelerate_cpu_offload",
            marks=compat_row(
                tool="`accelerate.cpu_offload`",
                packages=("accelerate",),
                result="dense, with the reason (`MODULE_UNPROVEN`)",
            ),
        ),
    ],
)
def test_hooks_on_every_leaf_stay_dense_with_the_reason(plain: dict, tool: Callable) -> None:
    """Hooks on every leaf module break the graph so that the attention's frame holds none of
    its module's parameters: its module is unproven, so the call is dense and the account says
    why (not "not a video self-attention module")."""
    opt, out = _with_tool(plain, tool)
    runs = opt.report.executions
    assert runs.get(UNPROVEN_MODULE) is not None, opt.report
    causes = " ".join(runs[UNPROVEN_MODULE].dense_causes)
    assert UNPROVEN.split(":")[0] in causes and "not a video self-attention" not in causes
    assert sum(e.vmoba_forward for e in runs.values()) == 0
    assert max_err(out, plain["dense"]) < ATOL_F32 * 10


@compat_row(
    tool="first-block cache",
    packages=("diffusers",),
    result="VMoBA in the first block; the blocks its hook runs through a closure dense "
    "(`MODULE_UNPROVEN`)",
)
def test_first_block_cache_runs_vmoba_in_the_first_block(plain: dict) -> None:
    """First-block cache: the first block (hooked as a block) runs VMoBA; the blocks its hook
    runs through a closure are reached by a name the graph does not prove, so they are dense
    with that reason, or counted as not run."""
    opt, _ = _with_tool(plain, _first_block_cache)
    runs = opt.report.executions
    assert runs["blocks.0.attn1"].vmoba_forward == 2, opt.report
    for e in runs.values():
        assert all("not a video self-attention" not in c for c in e.dense_causes), opt.report


def _lora_model() -> tuple[torch.nn.Module, tuple, dict]:
    LoraConfig = pytest.importorskip("peft").LoraConfig  # noqa: N806 (a class)

    torch._dynamo.reset()
    model, args, kwargs = tm.build("wan", num_layers=1)
    model.eval()
    lora = LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    model.add_adapter(lora)
    return model, args, kwargs


@compat_row(
    tool='LoRA strength sweep (`attention_kwargs={"scale": s}`)',
    packages=("peft",),
    result="VMoBA at every strength (one compile each, up to `recompile_limit`, default 64)",
)
def test_lora_strength_sweep_runs_vmoba_at_every_strength() -> None:
    """Each LoRA strength (``attention_kwargs={"scale": s}``) is a constant the graph reads, so
    it compiles a version: past Dynamo's default limit (8) every strength still runs VMoBA, by
    the account; and below optimize's own ``recompile_limit`` the dense runs are counted with
    that cause, not reported as VMoBA."""
    model, args, kwargs = _lora_model()
    opt = optimize(model, CONFIG, lowering="aot_eager")
    outs = []
    with torch.no_grad():
        for i in range(10):
            outs.append(first(opt(*args, attention_kwargs={"scale": 0.1 * (i + 1)}, **kwargs)))
    runs = opt.report.executions["blocks.0.attn1"]
    assert (runs.vmoba_forward, runs.dense_forward, runs.no_graph) == (10, 0, 0), opt.report
    assert max_err(outs[0], outs[-1]) > 1e-4, "the strength changed nothing"

    model, args, kwargs = _lora_model()
    opt = optimize(model, CONFIG, lowering="aot_eager", recompile_limit=2)
    with torch.no_grad():
        for i in range(3):
            opt(*args, attention_kwargs={"scale": 0.1 * (i + 1)}, **kwargs)
    runs = opt.report.executions["blocks.0.attn1"]
    assert (runs.vmoba_forward, runs.dense_forward) == (2, 1), opt.report
    assert any("recompile limit 2" in c for c in runs.dense_causes), runs.dense_causes


@compat_row(
    tool="MagCache (`torch.compiler.disable`d hooks)",
    packages=("diffusers",),
    result="dense, with the reason (disabled hook)",
)
def test_mag_cache_disabled_hooks_run_dense_with_the_cause(plain: dict) -> None:
    """MagCache's hooks are ``torch.compiler.disable``d: the blocks run eagerly, dense; the
    account says so with that cause (never counted as VMoBA, never silent)."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    def mag(model: torch.nn.Module) -> None:
        apply_mag_cache(model, MagCacheConfig(num_inference_steps=2, mag_ratios=[1.0] * 2))

    opt, out = _with_tool(plain, mag)
    runs = opt.report.executions
    assert sum(e.vmoba_forward for e in runs.values()) == 0, opt.report
    for module in SELF_ATTENTION:
        causes = " ".join(runs[module].dense_causes)
        assert runs[module].dense_forward >= 1 and "torch.compiler.disable" in causes, opt.report
    assert max_err(out, plain["dense"]) < ATOL_F32 * 10
