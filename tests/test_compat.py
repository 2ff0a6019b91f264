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
import functools
import importlib.metadata
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from compat_rows import compat_row
from conftest import ATOL_F32, max_err
from test_api import _CHUNKS, first, reference_forward

from vmoba_compile import SkipReason, VideoLayout, VMoBAConfig, optimize
from vmoba_compile.accounting import UNPROVEN_RAN
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


def _with_tool(
    plain: dict, tool: Callable[[torch.nn.Module], None], **options: Any
) -> tuple[Any, torch.Tensor]:
    torch._dynamo.reset()
    model, args, kwargs = tm.build("wan")
    model.load_state_dict(plain["weights"])
    model.eval()
    tool(model)
    opt = optimize(model, CONFIG, lowering="aot_eager", **options)
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
                result="on CPU: VMoBA, output equal (block by block, the default); with the "
                "whole model compiled, dense with the reason (`LOCAL_MODULE_SHARED`); on CUDA: "
                "dense with the reason (`LOCAL_PLACEMENT_CUDA`, see above)",
            ),
        ),
        pytest.param(
            _accelerate_offload,
            id="accelerate_cpu_offload",
            marks=compat_row(
                tool="`accelerate.cpu_offload`",
                packages=("accelerate",),
                result="on CPU: VMoBA, output equal (block by block, the default); with the "
                "whole model compiled, dense with the reason (`LOCAL_MODULE_SHARED`); on CUDA: "
                "dense with the reason (`LOCAL_PLACEMENT_CUDA`, see above)",
            ),
        ),
    ],
)
def test_hooks_on_every_leaf_run_vmoba_block_by_block(plain: dict, tool: Callable) -> None:
    """Hooks on every leaf module break the graph around each leaf, so the attention call is
    compiled in its processor's frame, with no module around it and none of its module's
    parameters: its module is the processor's local ``attn``, by identity. Compiled block by
    block, each variant's graph holds its own partition, so every layer runs VMoBA and the
    output is the plain optimized model's. With the whole model compiled, one graph of that
    frame would serve every layer: dense, and the account says why."""
    opt, out = _with_tool(plain, tool)
    runs = opt.report.executions
    for module in SELF_ATTENTION:
        assert runs[module].vmoba_forward == 2 and runs[module].dense_forward == 0, opt.report
    assert UNPROVEN_MODULE not in runs, opt.report
    assert max_err(out, plain["out"]) < ATOL_F32 * 10

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt, out = _with_tool(plain, tool, regional=False)
    runs = opt.report.executions
    assert sum(e.vmoba_forward for e in runs.values()) == 0, opt.report
    assert set(runs) == {UNPROVEN_MODULE}, opt.report  # one graph serves every layer: whose?
    causes = " ".join(runs[UNPROVEN_MODULE].dense_causes)
    assert "one compiled graph of that frame may serve several layers" in causes, causes
    assert "the whole model is compiled with one backend" in causes, causes
    assert not [w for w in caught if "VMoBA was planned" in str(w.message)]
    assert max_err(out, plain["dense"]) < ATOL_F32 * 10


def test_calls_placed_by_a_frame_local_stay_dense_off_the_cpu() -> None:
    """A call placed by its frame's local module (the leaf hooks above) runs VMoBA on CPU only:
    on CUDA the output was measured off the reference (docs/compatibility.md), so on any other
    device, or one the graph does not show, the decision is dense with the reason, while the
    same decision on CPU is kept."""
    from types import SimpleNamespace

    from vmoba_compile.passes import Skip
    from vmoba_compile.passes.rewrite import _local_placement

    choice = object()  # a VMoBA decision the rule must keep or replace
    ctx = SimpleNamespace(regional=SimpleNamespace(sole_module_why=lambda module, ctx: None))
    module = "blocks.0.attn1"
    assert _local_placement(module, ctx, choice, torch.device("cpu")) == (module, choice)
    for device in (torch.device("cuda"), torch.device("meta"), None):
        placed, decided = _local_placement(module, ctx, choice, device)
        assert placed == module and isinstance(decided, Skip), device
        assert decided.reason is SkipReason.LOCAL_PLACEMENT_CUDA, device
        assert module in decided.message and "offload_type='block_level'" in decided.message


@compat_row(
    tool="first-block cache",
    packages=("diffusers",),
    result="VMoBA in every block it computes, output equal (the later blocks, run through its "
    'hook\'s closure, placed by identity); the blocks it reuses counted "no graph"',
)
def test_first_block_cache_runs_vmoba_in_every_block(plain: dict) -> None:
    """First-block cache: the first block is hooked as a block; the later blocks run through
    the hook's closure (``L['self'].forward.func.__closure__[0].cell_contents.original_forward
    .__self__.attn1``) while their parameters come in as ``L['self']._modules['attn1']``: the
    two names reach the same module object, so every block's self-attention runs VMoBA where
    the cache computes it. Threshold 0 computes every block on the first call (the output is
    the plain optimized model's); the second call, on the same input, reuses the later blocks'
    residual: counted as planned calls no graph ran, never as VMoBA or dense runs."""
    opt, out = _with_tool(plain, _first_block_cache)
    runs = opt.report.executions
    assert runs["blocks.0.attn1"].vmoba_forward == 2, opt.report
    for module in SELF_ATTENTION:
        e = runs[module]
        assert e.vmoba_forward >= 1 and e.dense_forward == 0, opt.report
        assert e.vmoba_forward + e.no_graph == 2, opt.report
    assert "?" not in runs and UNPROVEN_MODULE not in runs, opt.report
    assert max_err(out, plain["out"]) < ATOL_F32 * 10


def _closure_forward(block: torch.nn.Module) -> None:
    inner = block.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        return inner(*args, **kwargs)

    block.forward = forward


def _partial_forward(block: torch.nn.Module) -> None:
    block.forward = functools.partial(type(block).forward, block)


class _Runner:
    """Another object whose bound method runs the block."""

    def __init__(self, block: torch.nn.Module) -> None:
        self.block = block

    def run(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.block).forward(self.block, *args, **kwargs)


def _bound_method_of_another_object(block: torch.nn.Module) -> None:
    block.forward = _Runner(block).run


def _diffusers_model_hook(block: torch.nn.Module) -> None:
    from diffusers.hooks import HookRegistry, ModelHook

    class Passthrough(ModelHook):
        def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            return self.fn_ref.original_forward(*args, **kwargs)

    HookRegistry.check_if_exists_or_initialize(block).register_hook(Passthrough(), "pass")


@pytest.mark.parametrize(
    "wrap",
    [_closure_forward, _partial_forward, _bound_method_of_another_object, _diffusers_model_hook],
    ids=["closure", "partial", "bound_method", "diffusers_model_hook"],
)
def test_block_forward_wrapped_by_a_hook_runs_vmoba(plain: dict, wrap: Callable) -> None:
    """A hook that replaces each block's ``forward`` (a closure over the old one, a
    ``functools.partial`` of the class's, a bound method of another object, a diffusers
    ``ModelHook``) makes Dynamo reach the block's modules by a name under which none of their
    parameters come in: the name is walked in the traced frame to the very module object the
    parameters' names reach, so every block's self-attention runs VMoBA, output equal."""
    opt, out = _with_tool(plain, lambda model: [wrap(b) for b in model.blocks])
    _assert_vmoba(opt, 2)
    assert max_err(out, plain["out"]) < ATOL_F32 * 10


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


# ------------------------------------------------------------------ tools that change the model


def _fresh(plain: dict) -> tuple[torch.nn.Module, tuple, dict]:
    """The tiny Wan model with the plain model's weights, and its inputs; Dynamo reset."""
    torch._dynamo.reset()
    model, args, kwargs = tm.build("wan")
    model.load_state_dict(plain["weights"])
    return model.eval(), args, kwargs


def _assert_vmoba(opt: Any, calls: int) -> None:
    """Every video self-attention layer ran VMoBA at each of ``calls`` forwards, never dense,
    and no attention call went unplaced."""
    runs = opt.report.executions
    for module in SELF_ATTENTION:
        counts = (runs[module].vmoba_forward, runs[module].dense_forward, runs[module].no_graph)
        assert counts == (calls, 0, 0), opt.report
    assert "?" not in runs and UNPROVEN_MODULE not in runs, opt.report


@pytest.mark.parametrize(
    "config_name",
    [
        pytest.param(
            "Int8WeightOnlyConfig",
            id="int8_weight_only",
            marks=compat_row(
                tool="torchao int8 weight-only (`quantize_(model, Int8WeightOnlyConfig())`)",
                packages=("torchao",),
                result="VMoBA; output equals the quantized model optimized with the true "
                "`layout=`, and the quantized model run with the reference attention",
            ),
        ),
        pytest.param(
            "Int8DynamicActivationInt8WeightConfig",
            id="int8_dynamic_activation",
            marks=compat_row(
                tool="torchao int8 dynamic activation, int8 weight "
                "(`Int8DynamicActivationInt8WeightConfig()`)",
                packages=("torchao",),
                result="VMoBA; output equals the quantized model optimized with the true "
                "`layout=` (its run-time int8 rounding of activations makes the reference "
                "attention no oracle)",
            ),
        ),
        pytest.param(
            "Float8WeightOnlyConfig",
            id="float8_weight_only",
            marks=compat_row(
                tool="torchao float8 weight-only (`Float8WeightOnlyConfig()`, runs on CPU)",
                packages=("torchao",),
                result="VMoBA; output equals the quantized model optimized with the true "
                "`layout=`, and the quantized model run with the reference attention",
            ),
        ),
    ],
)
def test_torchao_quantized_linears_run_vmoba(plain: dict, config_name: str) -> None:
    """torchao's ``quantize_`` swaps the linears' weights for quantized tensor subclasses (the
    attention's q, k, v come out of them): every video self-attention layer runs VMoBA, and the
    output is that of the same quantized model optimized with its true grid as ``layout=``
    (quantization changes the numbers, so the unquantized model is no oracle). With weights
    only quantized the model is continuous in the attention output, so it also equals the
    quantized model run with the float64 reference attention; dynamic activation quantization
    rounds each linear's input to int8 at run time, where a 1e-7 difference can cross a
    rounding step (~1e-2 after the next linear), so there the reference is no oracle."""
    quantization = pytest.importorskip("torchao.quantization")
    model, args, kwargs = _fresh(plain)
    twin = copy.deepcopy(model)
    for m in (model, twin):
        quantization.quantize_(m, getattr(quantization, config_name)())
    weight = model.blocks[0].attn1.to_q.weight
    assert type(weight).__module__.startswith("torchao"), type(weight)
    with torch.no_grad():
        dense = first(model(*args, **kwargs))
        reference = reference_forward(model, args, kwargs, CONFIG)
        with optimize(twin, CONFIG, layout=VideoLayout(*GRIDS[0]), lowering="aot_eager") as truth:
            want = first(truth(*args, **kwargs))
        _assert_vmoba(truth, 1)
    assert max_err(dense, plain["dense"]) > 1e-4, "quantize_ changed nothing"
    assert max_err(want, dense) > 1e-3, "the test cannot tell VMoBA from dense"
    opt = optimize(model, CONFIG, lowering="aot_eager")
    out = _run_twice(opt, model, args, kwargs)
    _assert_vmoba(opt, 2)
    assert max_err(out, want) < ATOL_F32, (config_name, max_err(out, want))
    if "WeightOnly" in config_name:
        assert max_err(out, reference) < ATOL_F32 * 10, (config_name, max_err(out, reference))


@compat_row(
    tool="SeaCache (`apply_sea_cache`, its built-in Wan adapter)",
    packages=("diffusers",),
    result="VMoBA in the blocks it runs from its first block's hook (placed by identity); that "
    "first block dense, with the reason: its hook is `torch.compiler.disable`d; output equals "
    "the model optimized with that layer dense",
)
def test_sea_cache_runs_vmoba_after_its_disabled_leader_hook(plain: dict) -> None:
    """SeaCache's hook on the first block (which decides whether the block stack runs) is
    ``torch.compiler.disable``d: that block runs eagerly, dense, with that cause; the later
    blocks it runs through its hooks are compiled and reached through the hook's closure, tied
    by identity to their modules: VMoBA. Threshold 0 never reuses a residual: every step
    computes, exactly the model optimized with the first layer kept dense."""
    hooks = pytest.importorskip("diffusers.hooks")
    if not hasattr(hooks, "apply_sea_cache"):  # not in every diffusers the dev extra allows
        pytest.skip(f"SeaCache is not in diffusers {importlib.metadata.version('diffusers')}")

    model, args, kwargs = _fresh(plain)
    truth = optimize(model, CONFIG, lowering="aot_eager")
    truth.vmoba.dense_layers = {0}
    with torch.no_grad():
        want = first(truth(*args, **kwargs))
    truth.restore()
    assert max_err(want, plain["dense"]) > 1e-4, "the test cannot tell VMoBA from dense"

    model, args, kwargs = _fresh(plain)
    hooks.apply_sea_cache(model, hooks.SeaCacheConfig(threshold=0.0))
    opt = optimize(model, CONFIG, lowering="aot_eager")
    with torch.no_grad():
        for step, sigma in enumerate((1.0, 0.5)):  # SeaCache needs the scheduler's position
            with model.cache_context("cond", step_index=step, sigma=sigma, num_inference_steps=2):
                out = first(opt(*args, **kwargs))
            assert max_err(out, want) < ATOL_F32 * 10, step
    runs = opt.report.executions
    first_block = runs["blocks.0.attn1"]
    causes = " ".join(first_block.dense_causes)
    assert first_block.dense_forward == 2 and first_block.vmoba_forward == 0, opt.report
    assert "sea_cache_leader_block" in causes and "torch.compiler.disable" in causes, causes
    later = runs["blocks.1.attn1"]
    assert (later.vmoba_forward, later.dense_forward, later.no_graph) == (2, 0, 0), opt.report
    assert "?" not in runs and UNPROVEN_MODULE not in runs, opt.report


@compat_row(
    tool="save / load (`torch.save(optimized.state_dict())`, loaded into a fresh model that is "
    "then optimized; `optimized.save_pretrained`)",
    packages=("torch", "diffusers"),
    result="VMoBA, output equal; `optimized.state_dict()` has the model's own keys (no "
    "`_orig_mod.` prefix), so checkpoints load either way",
)
def test_saved_weights_load_into_a_fresh_model_that_runs_vmoba(plain: dict, tmp_path) -> None:
    """The weights saved from an optimized model load into a fresh model (whose own weights
    differ), which optimized gives the same output and runs VMoBA; so do the weights
    ``save_pretrained`` writes (it reaches the model's)."""
    model, args, kwargs = _fresh(plain)
    opt = optimize(model, CONFIG, lowering="aot_eager")
    out = _run_twice(opt, model, args, kwargs)
    torch.save(opt.state_dict(), tmp_path / "weights.pt")
    opt.save_pretrained(tmp_path / "pretrained")
    saved = torch.load(tmp_path / "weights.pt")
    assert list(saved) == list(plain["weights"])

    fresh, _, _ = tm.build("wan")
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(0.5)  # a fresh model's weights are not the saved ones
    fresh.load_state_dict(saved)
    torch._dynamo.reset()
    loaded = optimize(fresh, CONFIG, lowering="aot_eager")
    assert max_err(_run_twice(loaded, fresh, args, kwargs), out) < ATOL_F32
    _assert_vmoba(loaded, 2)

    from diffusers import WanTransformer3DModel

    again = WanTransformer3DModel.from_pretrained(tmp_path / "pretrained").eval()
    torch._dynamo.reset()
    reloaded = optimize(again, CONFIG, lowering="aot_eager")
    assert max_err(_run_twice(reloaded, again, args, kwargs), out) < ATOL_F32
    _assert_vmoba(reloaded, 2)
    assert max_err(out, plain["dense"]) > 1e-4, "the test cannot tell VMoBA from dense"


def test_optimized_state_dict_keys_are_the_models(plain: dict) -> None:
    """``optimized.state_dict()`` has the model's keys, in order, so a checkpoint of either
    loads into the other (strict); the wrapper's ``_orig_mod.`` keys load too; and inside a
    parent module the keys are the parent's prefix plus the model's."""
    model, _, _ = _fresh(plain)
    opt = optimize(model, CONFIG, lowering="aot_eager")
    assert list(opt.state_dict()) == list(plain["weights"])
    other, _, _ = _fresh(plain)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    opt.load_state_dict(other.state_dict())  # the plain model's keys, strict
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True)
    )
    prefixed = {"_orig_mod." + k: v for k, v in plain["weights"].items()}
    opt.load_state_dict(prefixed)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in plain["weights"].items())
    fresh, _, _ = _fresh(plain)
    fresh.load_state_dict(opt.state_dict())  # and back into a plain model
    parent = torch.nn.ModuleDict({"transformer": opt})
    assert list(parent.state_dict()) == ["transformer." + k for k in plain["weights"]]
    parent.load_state_dict(parent.state_dict())


def _bf16(args: tuple) -> tuple:
    return tuple(a.bfloat16() if a.is_floating_point() else a for a in args)


@compat_row(
    tool="bf16 cast (`model.to(torch.bfloat16)` before `optimize`, or `optimized.to(...)` after "
    "a float32 run)",
    packages=("torch",),
    result="VMoBA; output within 3x the dense model's own bf16 rounding of the float32 VMoBA "
    "output",
)
def test_bf16_cast_before_or_after_optimize_runs_vmoba(plain: dict) -> None:
    """A bf16 model runs VMoBA (a cast after a float32 run compiles the bf16 graphs anew); its
    output is as close to the float32 VMoBA output as the dense model's bf16 output is to its
    float32 one (bf16 keeps 8 bits: both errors come from rounding the same weights and
    activations; 3x leaves room for a selected block that flips), a bound that still tells
    VMoBA from dense."""
    model, args, kwargs = _fresh(plain)
    rounding = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        bound = 3 * max_err(first(rounding(*_bf16(args), **kwargs)), plain["dense"])
    assert bound < max_err(plain["out"], plain["dense"]), "the bound cannot tell VMoBA from dense"

    after = optimize(model, CONFIG, lowering="aot_eager")
    assert max_err(_run_twice(after, model, args, kwargs), plain["out"]) < ATOL_F32 * 10
    after.to(torch.bfloat16)
    out_after = _run_twice(after, model, _bf16(args), kwargs)
    _assert_vmoba(after, 4)

    model, args, kwargs = _fresh(plain)
    before = optimize(model.to(torch.bfloat16), CONFIG, lowering="aot_eager")
    out_before = _run_twice(before, model, _bf16(args), kwargs)
    _assert_vmoba(before, 2)
    for out in (out_after, out_before):
        assert out.dtype == torch.bfloat16
        assert max_err(out, plain["out"]) < bound, (max_err(out, plain["out"]), bound)


@compat_row(
    tool="batch of 2 (two different samples in one call)",
    packages=("torch",),
    result="VMoBA; each sample's output equals its single-sample run",
)
def test_batch_of_two_equals_the_single_sample_runs(plain: dict) -> None:
    """VMoBA's block selection is per sample: batched with another, a sample's output is its
    output alone."""
    model, args, kwargs = _fresh(plain)
    other, _ = tm._wan_inputs(
        model, tm.expected_grid("wan", model), torch.Generator().manual_seed(7)
    )
    batch = tuple(torch.cat([a, b]) for a, b in zip(args, other, strict=True))
    opt = optimize(model, CONFIG, lowering="aot_eager")
    with torch.no_grad():
        alone = [first(opt(*a, **kwargs)) for a in (args, other)]
        both = first(opt(*batch, **kwargs))
    assert max_err(alone[0], alone[1]) > 1e-2, "the two samples must differ"
    assert max_err(alone[0], plain["out"]) < ATOL_F32 * 10
    for i in range(2):
        assert max_err(both[i : i + 1], alone[i]) < ATOL_F32, (
            i,
            max_err(both[i : i + 1], alone[i]),
        )
    _assert_vmoba(opt, 3)


GRIDS = ((3, 4, 6), (2, 6, 4), (4, 2, 4))  # every axis changes; the last is not in tiny_models


@compat_row(
    tool="changing resolution (3 frame / height / width grids in a row on one optimized model)",
    packages=("torch",),
    result="VMoBA at each grid (one compile each); each output equals "
    "`optimize(..., layout=<its true grid>)`",
)
def test_changing_resolutions_run_vmoba_at_each_grid(plain: dict) -> None:
    """One optimized model called at three grids re-derives the grid each time: each output
    equals the model optimized with that grid given as ``layout=`` (the truth, not the
    adapter's reading), each run is VMoBA by the account, and each grid compiled its own
    graphs."""
    model, _, _ = _fresh(plain)
    twin = copy.deepcopy(model)
    opt = optimize(model, CONFIG, lowering="aot_eager")
    for i, grid in enumerate(GRIDS):
        args, kwargs = tm._wan_inputs(model, grid, torch.Generator().manual_seed(i))
        with torch.no_grad():
            got = first(opt(*args, **kwargs))
            dense = first(twin(*args, **kwargs))
            with optimize(twin, CONFIG, layout=VideoLayout(*grid), lowering="aot_eager") as truth:
                want = first(truth(*args, **kwargs))
            _assert_vmoba(truth, 1)
        assert max_err(got, want) < ATOL_F32, (grid, max_err(got, want))
        assert max_err(got, dense) > 1e-3, (grid, "the test cannot tell VMoBA from dense")
        _assert_vmoba(opt, i + 1)
    grids = {where.split(";")[0] for where, _ in opt.report.graphs}
    assert grids == {f"grid {t}x{h}x{w}" for t, h, w in GRIDS}, opt.report


@compat_row(
    tool="`fuse_qkv_projections()` before `optimize`",
    packages=("diffusers",),
    result="VMoBA, output equal (inductor: `tests/test_api.py::test_inductor_fused_qkv_equals_"
    "unfused`)",
)
def test_fused_qkv_projections_run_vmoba(plain: dict) -> None:
    """Wan's processor splits one ``to_qkv`` output into q, k, v (v a view at an offset):
    every video self-attention layer runs VMoBA and the output is the unfused model's."""

    def fuse(model: torch.nn.Module) -> None:
        model.fuse_qkv_projections()
        assert all(b.attn1.fused_projections for b in model.blocks)

    opt, out = _with_tool(plain, fuse)
    _assert_vmoba(opt, 2)
    assert max_err(out, plain["out"]) < ATOL_F32, max_err(out, plain["out"])


def _merged(model: torch.nn.Module, adapter: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """The optimized output of a plain model holding ``model``'s weights with ``adapter``
    merged into them (no LoRA layers left)."""
    merged = copy.deepcopy(model)
    merged.set_adapters([adapter])
    merged.fuse_lora()
    merged.unload_lora()
    plain_model, _, _ = tm.build("wan")
    plain_model.load_state_dict(merged.state_dict())  # strict: no LoRA weight is left
    torch._dynamo.reset()
    with optimize(plain_model, CONFIG, lowering="aot_eager") as opt, torch.no_grad():
        out = first(opt(*args, **kwargs))
    _assert_vmoba(opt, 1)
    return out


@compat_row(
    tool="LoRA adapters after `optimize`: switch (`set_adapters`), `fuse_lora`, `unfuse_lora`",
    packages=("peft", "diffusers"),
    result="VMoBA at every call; each output equals the model with that adapter's weights merged",
)
def test_lora_switch_fuse_and_unfuse_run_vmoba(plain: dict) -> None:
    """Switching the active adapter, fusing it into the weights and unfusing it again on an
    optimized model: every call runs VMoBA (each change compiles anew) and gives the output of
    a plain model whose weights have that adapter merged."""
    LoraConfig = pytest.importorskip("peft").LoraConfig  # noqa: N806 (a class)

    model, args, kwargs = _fresh(plain)
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
        model.add_adapter(lora, adapter_name=name)
    want = {name: _merged(model, name, args, kwargs) for name in ("a", "b")}
    assert max_err(want["a"], want["b"]) > 1e-2 and max_err(want["a"], plain["out"]) > 1e-2

    torch._dynamo.reset()
    model.set_adapters(["a"])
    opt = optimize(model, CONFIG, lowering="aot_eager")
    steps = [
        ("a", lambda: None),
        ("b", lambda: model.set_adapters(["b"])),
        ("b", model.fuse_lora),
        ("b", model.unfuse_lora),
        ("a", lambda: model.set_adapters(["a"])),
    ]
    for i, (adapter, change) in enumerate(steps):
        change()
        with torch.no_grad():
            out = first(opt(*args, **kwargs))
        assert max_err(out, want[adapter]) < ATOL_F32, (i, adapter, max_err(out, want[adapter]))
        _assert_vmoba(opt, i + 1)


def _attend_after_a_break(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    torch._dynamo.graph_break()  # the call is compiled in this function's frame: no module
    return F.scaled_dot_product_attention(q, k, v)


class _HelperAttention(torch.nn.Module):
    """Self-attention whose SDPA runs in a module-free helper frame (after a graph break)."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        return x + _attend_after_a_break(q, k, v).transpose(1, 2).reshape(b, s, c)


def test_a_call_in_a_frame_without_modules_stays_unproven_and_is_warned_as_such() -> None:
    """No module around the call and none among its frame's locals: nothing ties the call to
    a module, so it is dense under the unproven module, and the planned module no VMoBA graph
    ran is warned about as most likely that call (not as skipped or run eagerly)."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(_HelperAttention(), _HelperAttention())
    layout = VideoLayout(frames=2, height=4, width=4)
    x = torch.randn(1, layout.seq_len, 32)
    opt = optimize(model, CONFIG, layout=layout, lowering="aot_eager")
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = opt(x)
    runs = opt.report.executions
    assert runs[UNPROVEN_MODULE].dense_forward == 2 and opt.report.vmoba_runs == 0, opt.report
    assert UNPROVEN.split(":")[0] in " ".join(runs[UNPROVEN_MODULE].dense_causes)
    planned = [str(w.message) for w in caught if "VMoBA was planned" in str(w.message)]
    assert planned and all(UNPROVEN_RAN in m for m in planned), planned
    assert torch.allclose(out, model(x), atol=1e-6)
