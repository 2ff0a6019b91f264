"""Regional compilation (``optimize``'s default where the model has blocks, or ``regional=True``):
one compiled block per partition variant (CPU, aot_eager).

The oracles are the model run with ``vmoba_reference`` in its video self-attention calls (as in
test_api.py) and the whole-model ``optimize``, which computes the same math: regional
compilation changes what is compiled, never the result. Training runs the eager FlexAttention
math (its CPU device check is lifted for the test: flex has no CPU backward kernel, but its
eager reference path differentiates).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from conftest import ATOL_F32, max_err

pytest.importorskip("diffusers")

import tiny_models as tm  # noqa: E402
from sdpa_spy import run_with_sdpa  # noqa: E402
from test_api import (  # noqa: E402
    _CHUNKS,
    TOY_LAYOUT,
    ToyAttention,
    check_report,
    first,
    reference_forward,
    toy_inputs,
    toy_reference,
)

from vmoba_compile import SkipReason, VMoBAConfig, explain, optimize, vmoba_reference  # noqa: E402
from vmoba_compile.adapters import find_adapter  # noqa: E402
from vmoba_compile.regional import find_blocks  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")

CONFIG = VMoBAConfig(**_CHUNKS)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield


def _cpu_flex_backward():
    import torch.nn.attention.flex_attention as fa

    return mock.patch.object(fa, "_validate_device", lambda q, k, v: None)


def grads(model: torch.nn.Module, run) -> dict[str, torch.Tensor]:
    """Parameter gradients of ``mean(run() ** 2)``."""
    model.zero_grad(set_to_none=True)
    first(run()).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(max_err(a[n], b[n]) for n in a)


def test_one_compiled_block_per_partition_matches_reference() -> None:
    model, args, kwargs = tm.build("wan", num_layers=4)
    opt = optimize(model, CONFIG, lowering="aot_eager", regional=True)
    with torch.no_grad():
        got = first(opt(*args, **kwargs))
        again = first(opt(*args, **kwargs))
        want = reference_forward(model, args, kwargs, CONFIG)
        dense = first(model(*args, **kwargs))  # called directly: runs as written
    assert max_err(got, want) < ATOL_F32
    assert torch.equal(again, got)
    assert max_err(dense, want) > 100 * ATOL_F32, "the test cannot tell VMoBA from dense"
    variants = opt.regional_blocks.variants
    assert sorted(k[0] for k in variants) == [("1d",), ("2d",), ("3d",)]  # 4 layers, 3 graphs
    assert len(opt.report.graphs) == 3
    check_report("wan", model, args, kwargs, opt.report, CONFIG)  # every layer, its partition
    # The account: two forward calls ran every layer's VMoBA call twice and each
    # cross-attention call dense twice, as its graph decided.
    layers = find_adapter(model).self_attention_modules(model)
    ran = opt.report.executions
    cross = sorted(set(ran) - set(layers))
    assert cross == [f"blocks.{i}.attn2" for i in range(4)]
    assert [(ran[m].vmoba_forward, ran[m].dense_forward, ran[m].no_graph) for m in layers] == [
        (2, 0, 0)
    ] * 4
    assert all(ran[m].vmoba_forward == 0 and ran[m].dense_forward == 2 for m in cross)
    assert all("cross-attention" in c for m in cross for c in ran[m].dense_causes)


@pytest.mark.parametrize("family", ["hunyuan_video", "cogvideox"])
def test_other_families_match_reference(family: str) -> None:
    """HunyuanVideo: two block classes (double- and single-stream) and text key padding;
    CogVideoX: text before the video."""
    model, args, kwargs = tm.build(family, num_layers=2)
    opt = optimize(model, CONFIG, lowering="aot_eager", regional=True)
    with torch.no_grad():
        got = first(opt(*args, **kwargs))
        want = reference_forward(model, args, kwargs, CONFIG)
        dense = first(model(*args, **kwargs))
    assert max_err(got, want) < 10 * ATOL_F32
    assert max_err(dense, want) > 100 * ATOL_F32, "the test cannot tell VMoBA from dense"
    classes = {k[3] for k in opt.regional_blocks.variants if k != ("dense",)}
    assert len(classes) == (2 if family == "hunyuan_video" else 1)
    # Every video self-attention layer, with its partition; calls outside the blocks, such as
    # HunyuanVideo's token refiner, run uncompiled: the report names their modules.
    outside = ["context_embedder.token_refiner.refiner_blocks.0.attn"]
    assert opt.report.outside == (outside if family == "hunyuan_video" else [])
    assert ("attention modules outside the blocks: " + (", ".join(outside) if family ==
            "hunyuan_video" else "none")) in str(opt.report)  # fmt: skip
    listed = find_adapter(model).self_attention_modules(model)
    got_layers = sorted((c.layer_index, c.module, c.partition) for c in opt.report.rewritten)
    assert got_layers == [(i, m, CONFIG.partition_for(i).value) for i, m in enumerate(listed)]


def test_second_grid_and_dense_controls() -> None:
    model, args, kwargs = tm.build("wan", num_layers=3)
    opt = optimize(model, CONFIG, lowering="aot_eager", regional=True)
    args2, kwargs2 = tm.build_inputs("wan", model, 1)
    with torch.no_grad():
        opt(*args, **kwargs)
        got2 = first(opt(*args2, **kwargs2))
        want2 = reference_forward(model, args2, kwargs2, CONFIG)
        opt.vmoba.dense_layers = {1}
        got_d = first(opt(*args, **kwargs))
        want_d = reference_forward(model, args, kwargs, CONFIG, dense_layers=frozenset({1}))
        opt.vmoba.dense_layers = set()
        opt.vmoba.dense_steps = 1
        opt.vmoba.reset()
        warm = first(opt(*args, **kwargs))  # step 0: dense warm-up
        after = first(opt(*args, **kwargs))
        plain = first(model(*args, **kwargs))
        want = reference_forward(model, args, kwargs, CONFIG)
    assert max_err(got2, want2) < ATOL_F32
    assert max_err(got_d, want_d) < ATOL_F32
    assert max_err(got_d, want) > 100 * ATOL_F32
    assert max_err(warm, plain) < ATOL_F32
    assert max_err(after, want) < ATOL_F32
    grids = {k[1] for k in opt.regional_blocks.variants if k != ("dense",)}
    assert len(grids) == 2 and ("dense",) in opt.regional_blocks.variants
    # The account of the five forward calls: layer 1 dense by dense_layers once, every layer
    # dense in the warm-up step once, VMoBA otherwise.
    layers = find_adapter(model).self_attention_modules(model)
    ran = opt.report.executions
    assert [(ran[m].vmoba_forward, ran[m].dense_forward) for m in layers] == [
        (4, 1),
        (3, 2),
        (4, 1),
    ]
    assert all("runtime controls" in c for m in layers for c in ran[m].dense_causes)


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
@pytest.mark.slow
def test_training_with_checkpointing_gradients_equal_whole_model(family: str) -> None:
    """With diffusers' checkpointing the backward recomputes each block outside the optimized
    model's forward; the recomputation must run the variant its forward ran (run in the eager
    block instead, it raises CheckpointError: the saved tensors differ). Both compiles' gradients
    equal the reference model's (HunyuanVideo: text suffix with key padding, two block classes)."""
    model, args, kwargs = tm.build(family, num_layers={"wan": 3, "hunyuan_video": 2}[family])
    model.train()

    with _cpu_flex_backward():
        whole = optimize(model, CONFIG, lowering="aot_eager", regional=False)
        want = grads(model, lambda: whole(*args, **kwargs))
        plain = grads(model, lambda: model(*args, **kwargs))
        torch._dynamo.reset()
        model.enable_gradient_checkpointing()
        opt = optimize(model, CONFIG, lowering="aot_eager", regional=True)
        out = first(opt(*args, **kwargs))
        recorded = opt.regional_blocks.remembered
        model.zero_grad(set_to_none=True)
        out.square().mean().backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.disable_gradient_checkpointing()  # the reference's SDPA override is not recomputed
        ref = grads(model, lambda: reference_forward(model, args, kwargs, CONFIG))
    assert recorded == 3  # one forward record per block, for a recomputation
    assert opt.regional_blocks.remembered == 0  # released with the forward's tensors
    assert diff(got, want) < 1e-6
    assert diff(want, ref) < 1e-5
    assert diff(plain, want) > 1e-4


class ReentrantToy(torch.nn.Module):
    """Toy blocks, optionally under reentrant checkpointing: the recomputation then gets detached
    copies of the block's inputs, not the tensors its forward took (``reentrant = False``:
    non-reentrant checkpointing, which hands it the same tensors)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(ToyAttention("self") for _ in range(n))
        self.checkpoint = True
        self.reentrant = True

    def forward(self, x, ctx):
        for block in self.blocks:
            if self.checkpoint:
                x = torch.utils.checkpoint.checkpoint(block, x, ctx, use_reentrant=self.reentrant)
            else:
                x = block(x, ctx)
        return x


def test_reentrant_checkpointing_uses_the_one_live_variant_or_refuses_an_ambiguous_one() -> None:
    torch.manual_seed(0)
    model = ReentrantToy(3)
    x, ctx = toy_inputs()
    x.requires_grad_(True)

    with _cpu_flex_backward():
        opt = optimize(model, CONFIG, layout=TOY_LAYOUT, lowering="aot_eager", regional=True)
        got = grads(model, lambda: opt(x, ctx))
        model.checkpoint = False
        want = grads(model, lambda: opt(x, ctx))
        model.checkpoint = True
        plain = grads(model, lambda: model(x, ctx))
        assert diff(got, want) < 1e-6
        assert diff(plain, want) > 1e-4
        first_out = opt(x, ctx)  # layer 1 sparse
        opt.vmoba.dense_layers = {1}
        second = opt(x, ctx)  # layer 1 dense, while the first output is alive
        assert second.requires_grad
        with pytest.raises(RuntimeError, match="variant to recompute is ambiguous"):
            first_out.square().mean().backward()


class TwoPerBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = ToyAttention("self"), ToyAttention("self")

    def forward(self, x, ctx):
        return self.b(self.a(x, ctx), ctx)


class TwoPerBlockVideo(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(TwoPerBlock() for _ in range(n))

    def forward(self, x, ctx):
        for block in self.blocks:
            x = block(x, ctx)
        return x


def test_blocks_with_two_layers_get_the_partition_of_each() -> None:
    """Layers (0, 1), (2, 3), (4, 5) on the 1D-2D-3D schedule: blocks (1d, 2d), (3d, 1d),
    (2d, 3d): three variants, each the whole-model result."""
    torch.manual_seed(0)
    model = TwoPerBlockVideo(3)
    x, ctx = toy_inputs()
    assert find_blocks(model, {f"blocks.{i // 2}.{'ab'[i % 2]}": i for i in range(6)}) == {
        "blocks.0": (0, 1),
        "blocks.1": (2, 3),
        "blocks.2": (4, 5),
    }
    with torch.no_grad():
        want = optimize(model, CONFIG, layout=TOY_LAYOUT, lowering="aot_eager", regional=False)(
            x, ctx
        )
        torch._dynamo.reset()
        opt = optimize(model, CONFIG, layout=TOY_LAYOUT, lowering="aot_eager", regional=True)
        got = opt(x, ctx)
    assert max_err(got, want) < 1e-6
    keys = sorted(k[0] for k in opt.regional_blocks.variants)
    assert keys == [("1d", "2d"), ("2d", "3d"), ("3d", "1d")]
    assert [c.partition for c in opt.report.rewritten] == ["1d", "2d", "3d", "1d", "2d", "3d"]


class Mixer(ToyAttention):
    """A self-attention whose class name lacks "Attention": not numbered at optimize."""


class NumberedAndUnnumbered(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.mixer = ToyAttention("self"), Mixer("self")

    def forward(self, x, ctx):
        return self.mixer(self.attn(x, ctx), ctx)


def test_a_call_of_an_unnumbered_module_stays_dense_block_by_block() -> None:
    """With ``layout=``, block by block: the numbered modules take layers 0, 1, 2 (1D, 2D, 3D)
    and run VMoBA; a call in a module not numbered at optimize has no layer the block graph can
    know (its graph order is the block's, not the model's), so it is dense with
    ``LAYER_UNNUMBERED``. The output is the reference with exactly that split."""
    torch.manual_seed(0)
    model = TwoPerBlockVideo(3)
    for block in model.blocks:
        block.b = Mixer("self")
    x, ctx = toy_inputs()
    opt = optimize(model, CONFIG, layout=TOY_LAYOUT, lowering="aot_eager", regional=True)
    with torch.no_grad():
        got = opt(x, ctx)
    report = opt.report
    assert [c.module for c in report.rewritten] == ["blocks.0.a", "blocks.1.a", "blocks.2.a"]
    assert [c.partition for c in report.rewritten] == ["1d", "2d", "3d"]
    unnumbered = [c for c in report.calls if c.module.endswith(".b")]
    assert len(unnumbered) == 3 and all(
        c.skip is SkipReason.LAYER_UNNUMBERED and c.module in c.reason for c in unnumbered
    ), report

    def replace(module, a):
        if not module.endswith(".a"):
            return None
        layer = int(module.split(".")[1])
        q, k, v = a["query"], a["key"], a["value"]
        return vmoba_reference(q, k, v, layout=TOY_LAYOUT, config=CONFIG, layer_index=layer)

    with torch.no_grad():
        want = run_with_sdpa(model, (x, ctx), {}, replace)[0]
        dense = model(x, ctx)
    assert max_err(got, want) < ATOL_F32
    assert max_err(got, dense) > 1e-4, "the config must be sparse"
    assert all(report.executions[f"blocks.{i}.b"].dense_forward == 1 for i in range(3))


class NoList(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = ToyAttention("self")

    def forward(self, x, ctx):
        return self.attn(x, ctx)


def test_refusals() -> None:
    with pytest.raises(ValueError, match="in no ModuleList"):
        optimize(NoList(), CONFIG, layout=TOY_LAYOUT, regional=True)
    # the default falls back to the whole model
    assert optimize(NoList(), CONFIG, layout=TOY_LAYOUT).regional_blocks is None
    with pytest.raises(TypeError, match=r"regional must be None \(automatic\), True or False"):
        optimize(NoList(), CONFIG, layout=TOY_LAYOUT, regional="yes")
    model = TwoPerBlockVideo(2)
    optimize(model, CONFIG, layout=TOY_LAYOUT)
    with pytest.raises(RuntimeError, match="already optimized with regional compilation"):
        optimize(model, CONFIG, layout=TOY_LAYOUT, regional=False)
    # explain traces the hooked model (it compiles nothing, so nothing to refuse)
    report = explain(model, toy_inputs(), config=CONFIG, layout=TOY_LAYOUT)
    assert [c.layer_index for c in report.rewritten] == [0, 1, 2, 3]


def test_two_optimized_models_of_one_model_keep_their_own_configs() -> None:
    """optimize twice on one model (two configurations): the blocks' hooks are shared, and each
    optimized model runs its own config, also in a checkpointed recomputation; the model
    called directly runs as written."""
    torch.manual_seed(0)
    model = ReentrantToy(3)
    model.checkpoint = False
    x, ctx = toy_inputs()
    other = VMoBAConfig(**{**_CHUNKS, "selection": "topk", "topk": 1})
    with torch.no_grad():
        want = [toy_reference(model, x, ctx, c) for c in (CONFIG, other)]
        plain = model(x, ctx)
        a = optimize(model, CONFIG, layout=TOY_LAYOUT, lowering="aot_eager")
        b = optimize(model, other, layout=TOY_LAYOUT, lowering="aot_eager")
        got = [a(x, ctx), b(x, ctx), a(x, ctx)]
        assert max_err(want[0], want[1]) > 1e-3 and max_err(plain, want[0]) > 1e-3
        assert max_err(got[0], want[0]) < ATOL_F32 and max_err(got[2], want[0]) < ATOL_F32
        assert max_err(got[1], want[1]) < ATOL_F32
        assert max_err(model(x, ctx), plain) < 1e-6

    # Non-reentrant checkpointing: each recomputation finds its own model's variant by its
    # input (two forwards on one input tensor, both alive, would be ambiguous and raise).
    model.checkpoint, model.reentrant = True, False
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    with _cpu_flex_backward():
        g_a = grads(model, lambda: a(xs[0], ctx))
        g_b = grads(model, lambda: b(xs[1], ctx))
        model.checkpoint = False
        assert diff(g_a, grads(model, lambda: a(x, ctx))) < 1e-6
        assert diff(g_b, grads(model, lambda: b(x, ctx))) < 1e-6
        assert diff(g_a, g_b) > 1e-4
        model.checkpoint = True  # both models' forwards on one input, both alive: ambiguous
        out_a, _ = a(xs[0], ctx), b(xs[0], ctx)
        with pytest.raises(RuntimeError, match="2 optimized models of this model ran it on that"):
            out_a.square().mean().backward()


def _our_hooks(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if "_compiled_call_impl" in m.__dict__]


def test_restore_removes_the_hooks_the_last_owner_installed() -> None:
    """restore() gives back the model as it was: with two optimized models sharing the blocks'
    hooks, the first restored leaves them to the other (which still runs its VMoBA), the
    second removes them; the model then runs as a fresh copy, and can be optimized again as a
    whole model (which a hooked model refuses)."""
    import copy

    torch.manual_seed(0)
    model = ReentrantToy(3)
    model.checkpoint = False
    fresh = copy.deepcopy(model)
    x, ctx = toy_inputs()
    other = VMoBAConfig(**{**_CHUNKS, "selection": "topk", "topk": 1})
    with torch.no_grad():
        a = optimize(model, CONFIG, layout=TOY_LAYOUT, lowering="aot_eager")
        b = optimize(model, other, layout=TOY_LAYOUT, lowering="aot_eager")
        hooked = _our_hooks(model)
        assert hooked == ["blocks.0", "blocks.1", "blocks.2"]
        want_b = b(x, ctx)
        a(x, ctx)
        assert a.restore() is model
        assert _our_hooks(model) == hooked  # b still uses them
        assert torch.equal(b(x, ctx), want_b)
        assert max_err(want_b, fresh(x, ctx)) > 1e-3  # b really runs VMoBA, not the model
        with pytest.raises(RuntimeError, match="was restored"):
            a(x, ctx)
        with b as same:  # the context manager restores on exit
            assert same is b
        assert _our_hooks(model) == []
        assert all(m._compiled_call_impl is None for m in model.modules())
        assert torch.equal(model(x, ctx), fresh(x, ctx))
        b.restore()  # again: nothing left to do
        whole = optimize(model, CONFIG, layout=TOY_LAYOUT, lowering="aot_eager", regional=False)
        assert max_err(whole(x, ctx), toy_reference(model, x, ctx, CONFIG)) < ATOL_F32


def test_compiles_are_logged_at_info_and_quiet_by_default(caplog) -> None:
    """What compiles (each block variant: partitions and grid; each lowered graph) goes to the
    ``vmoba_compile`` loggers at INFO; the library adds no handler and sets no level."""
    import logging

    for name in ("vmoba_compile", "vmoba_compile.regional", "vmoba_compile.passes.backend"):
        log = logging.getLogger(name)
        assert log.handlers == [] and log.level == logging.NOTSET, name
    x, ctx = toy_inputs()
    model = ReentrantToy(3)
    model.checkpoint = False
    opt = optimize(model, CONFIG, layout=TOY_LAYOUT, lowering="aot_eager")
    with caplog.at_level(logging.INFO, logger="vmoba_compile"), torch.no_grad():
        opt(x, ctx)
        opt(x, ctx)  # cached: nothing new compiles, nothing new is logged
    ours = [r for r in caplog.records if r.name.startswith("vmoba_compile")]
    assert all(r.levelno == logging.INFO for r in ours)
    variants = [r.getMessage() for r in ours if r.name == "vmoba_compile.regional"]
    parts = [CONFIG.partition_for(i).value for i in range(3)]
    assert len(variants) == len(set(parts)) == len(opt.regional_blocks.variants)
    for msg, part in zip(variants, dict.fromkeys(parts), strict=True):
        assert f"partitions {part}, layout" in msg, msg
    lowered = [r.getMessage() for r in ours if r.name == "vmoba_compile.passes.backend"]
    assert sum("attention calls rewritten" in m for m in lowered) == len(variants)


def test_compiling_starts_no_nested_dynamo_compile() -> None:
    """The rewritten graph's flex call, traced by AOTAutograd outside Dynamo, must not start a
    Dynamo compile of its own (``flex_attention``'s eager path does): torch 2.11 then clears
    the outer compile's event stack and logs dozens of "Start event not in stack" warnings.
    Watched on the compile-event logger: a "dynamo" event starting inside another."""
    from torch._dynamo.utils import ChromiumEventLogger

    nested, seen = [], []
    start = ChromiumEventLogger.log_event_start

    def spy(self, event_name, *args, **kwargs):
        if event_name == "dynamo":
            seen.append(event_name)
            if "dynamo" in self.get_stack():
                nested.append(list(self.get_stack()))
        return start(self, event_name, *args, **kwargs)

    model = ReentrantToy(3)
    model.checkpoint = False
    x, ctx = toy_inputs()
    x.requires_grad_(True)  # the joint (training) trace too
    opt = optimize(model, CONFIG, layout=TOY_LAYOUT, lowering="aot_eager")
    with mock.patch.object(ChromiumEventLogger, "log_event_start", spy), _cpu_flex_backward():
        out = opt(x, ctx)
        out.square().mean().backward()
    assert max_err(out, toy_reference(model, x.detach(), ctx, CONFIG)) < ATOL_F32
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert seen and not nested, nested
