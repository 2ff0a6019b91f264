"""The pass end to end: ``optimize`` / ``explain`` on tiny models of every family and on toys.

The oracle is the model itself run eagerly with its video self-attention calls computed by
``vmoba_reference`` (float64, dense mask) with the same layer schedule; which calls those are
comes from the adapter, whose module lists and grids test_adapters.py checks against SDPA spies
and bump probes. Most tests lower with ``lowering="aot_eager"`` (AOTAutograd traces the
rewritten graph, forward and backward, then runs it op by op): the rewrite is the same as with
inductor, and CPU inductor compiles take ~50 s each on two cores. One test runs inductor.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import ATOL_F32, max_err

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tiny_models as tm  # noqa: E402
from compat_rows import compat_row  # noqa: E402
from sdpa_spy import KernelSpy, record_sdpa, run_with_sdpa  # noqa: E402

from vmoba_compile import (  # noqa: E402
    SkipReason,
    VideoLayout,
    VMoBAConfig,
    explain,
    optimize,
    reference_mask,
    vmoba_reference,
)
from vmoba_compile.adapters import find_adapter  # noqa: E402
from vmoba_compile.passes import PROGRAM_ORDER_PASS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")  # Mochi's RoPE

_CHUNKS = {"block_size": 16, "chunk_1d": (1,), "chunk_2d": (2, 2), "chunk_3d": (1, 2, 2)}
SPARSE = [
    VMoBAConfig(**_CHUNKS),  # threshold 0.25, global (per-head) selection, block queries
    VMoBAConfig(selection="topk", topk=2, **_CHUNKS),
    VMoBAConfig(granularity="token", scope="head", threshold=0.25, **_CHUNKS),
]
KEEP_ALL = VMoBAConfig(threshold=1.0, **_CHUNKS)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles the same model classes again; Dynamo's per-code recompile limit (8)
    would otherwise make later tests run eagerly."""
    torch._dynamo.reset()
    yield


def sparse_config(family: str) -> VMoBAConfig:
    return SPARSE[tm.FAMILIES.index(family) % len(SPARSE)]


def first(out):
    """The main output tensor of a diffusers / transformers forward."""
    return out if isinstance(out, torch.Tensor) else out[0]


def reference_forward(model, args, kwargs, config, dense_layers=frozenset(), exact=True):
    """``model(*args, **kwargs)`` with each video self-attention done by ``vmoba_reference``
    (float64), or with ``exact=False`` by SDPA in the input dtype under the reference mask."""
    adapter = find_adapter(model)
    grid = adapter.grid(model, args, kwargs)
    layer_of = {n: i for i, n in enumerate(adapter.self_attention_modules(model))}

    def replace(module, a):
        q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
        layer = layer_of.get(module)
        if layer is None or layer in dense_layers or q.shape[2] != k.shape[2]:
            return None
        s = q.shape[2]
        layout = grid.layout_for(s)
        tkm = None
        if mask is not None:  # HunyuanVideo's key padding: [B, 1, 1, S]
            lo = layout.text_start
            tkm = mask.reshape(mask.shape[0], s)[:, lo : lo + layout.text_tokens]
        tkm = None if tkm is None else tkm.cpu()
        kw = dict(layout=layout, config=config, layer_index=layer, text_key_mask=tkm)
        if exact:
            return vmoba_reference(q, k, v, scale=a["scale"], **kw)
        m = reference_mask(q.detach().cpu(), k.detach().cpu(), **kw).to(q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=a["scale"])

    return first(run_with_sdpa(model, args, kwargs, replace)[0])


@functools.cache
def built(family):
    return tm.build(family)


def check_report(family, model, args, kwargs, report, config, opt=None) -> None:
    """Exactly the video self-attention calls are rewritten, with schedule-given partitions.
    With ``opt`` compiled block by block, the report holds the calls inside its blocks."""
    listed = find_adapter(model).self_attention_modules(model)
    spied = record_sdpa(model, args, kwargs)
    regional = opt.regional_blocks if opt is not None else None
    if regional is not None:
        spied = [c for c in spied if any(c.module.startswith(p + ".") for p in regional.paths)]
    calls = report.calls
    assert len(calls) == len(spied), f"{family}: report {len(calls)} calls, model made {len(spied)}"
    assert sorted(c.module for c in calls) == sorted(c.module for c in spied)
    rewritten = report.rewritten
    truth = sorted(c.module for c in spied if c.module in listed)  # Mochi: one call per sample
    assert sorted(c.module for c in rewritten) == truth, f"{family}:\n{report}"
    assert set(truth) == set(listed)
    for c in rewritten:
        assert c.layer_index == listed.index(c.module)
        assert c.partition == config.partition_for(c.layer_index).value
    assert all(c.skip is not None and c.reason for c in report.skipped)


# ------------------------------------------------------------------------- every family


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_family_sparse_equals_reference(family: str) -> None:
    model, args, kwargs = built(family)
    config = sparse_config(family)
    opt = optimize(model, config, lowering="aot_eager", fullgraph=True)
    with torch.no_grad(), KernelSpy() as kernels:
        out = first(opt(*args, **kwargs))
    with torch.no_grad():
        ref = reference_forward(model, args, kwargs, config)
    # the kernel is decided once, by the pass (once per call of each compiled graph, which
    # several blocks may run), and the op runs that decision
    sparse = [c for c in opt.report.rewritten if c.kernel != "sdpa"]
    assert kernels.op_decisions == 0 and 0 < len(kernels.decided) <= len(sparse)
    # The default compiles every family block by block: one graph per variant (partitions of
    # a block's layers), at most one per partition of the schedule for one block class.
    variants = opt.regional_blocks.variants
    graphs = len(opt.report.graphs)
    assert graphs == len(variants) <= len(config.schedule) * 2, opt.report
    check_report(family, model, args, kwargs, opt.report, config, opt)
    assert any("all kept" not in c.reason for c in opt.report.rewritten), "nothing sparse"
    assert max_err(out, ref) < ATOL_F32 * 10, f"{family}: {max_err(out, ref)}"
    dense = first(model(*args, **kwargs))
    assert max_err(out, dense) > 1e-5, f"{family}: the sparse model equals the dense one"

    # New data of the same shape: no recompile.
    grid = tm.expected_grid(family, model, 0)
    args2, kwargs2 = tm.perturb(family, args, kwargs, (0, 0, 0), grid)
    with torch.no_grad():
        out2 = first(opt(*args2, **kwargs2))
    assert len(opt.report.graphs) == graphs, f"{family} recompiled on new data:\n{opt.report}"
    assert max_err(out2, out) > 1e-4

    if family in tm.FIXED_RESOLUTION:
        return
    # A new resolution: one compile, with the new grid.
    args3, kwargs3 = tm.build_inputs(family, model, 1)
    with torch.no_grad():
        out3 = first(opt(*args3, **kwargs3))
        ref3 = reference_forward(model, args3, kwargs3, config)
        opt(*args3, **kwargs3)
    t, h, w = tm.expected_grid(family, model, 1)
    new = opt.report.graphs[graphs:]
    assert len(new) == len(variants) - graphs > 0, opt.report
    assert all(where.startswith(f"grid {t}x{h}x{w};") for where, _ in new), opt.report
    assert max_err(out3, ref3) < ATOL_F32 * 10, f"{family}: {max_err(out3, ref3)}"


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_family_keep_all_equals_dense(family: str) -> None:
    model, args, kwargs = built(family)
    opt = optimize(model, KEEP_ALL, lowering="aot_eager")
    with torch.no_grad():
        out = first(opt(*args, **kwargs))
        dense = first(model(*args, **kwargs))
    listed = find_adapter(model).self_attention_modules(model)
    calls = [c for c in record_sdpa(model, args, kwargs) if c.module in listed]
    assert len(opt.report.rewritten) == len(calls)
    assert max_err(out, dense) < 1e-5


@pytest.mark.compiled
def test_inductor_hunyuan_text_and_key_padding_equals_reference() -> None:
    """Fused inductor kernels, text suffix with a key-padding mask, two partitions."""
    model, args, kwargs = built("hunyuan_video")
    config = SPARSE[0]
    opt = optimize(model, config)
    with torch.no_grad():
        out = first(opt(*args, **kwargs))
        ref = reference_forward(model, args, kwargs, config)
    check_report("hunyuan_video", model, args, kwargs, opt.report, config, opt)
    assert max_err(out, ref) < ATOL_F32 * 10


@pytest.mark.slow  # ~45 s cold on two cores (two models, two block graphs each)
@pytest.mark.compiled
def test_inductor_fused_qkv_equals_unfused() -> None:
    """diffusers' ``fuse_qkv_projections()``: Wan's processor splits one ``to_qkv`` output, so v
    reaches the attention as a view at an offset into it (q and k are made anew by the QK norm).
    Inductor's CPU flex template dropped that offset and read q's columns as values (7.5% of
    the output) wherever the 1D partition is the identity; the grid and chunks here make it so
    (frames of 16 tokens, 16-token blocks, chunks that need no padding in any partition)."""
    from vmoba_compile.attention import plan_for

    model, _, _ = built("wan")
    fused = copy.deepcopy(model)
    fused.fuse_qkv_projections()
    args, kwargs = tm._wan_inputs(model, (4, 4, 4), torch.Generator().manual_seed(0))
    config = VMoBAConfig(block_size=16, chunk_1d=(1,), chunk_2d=(2, 2), chunk_3d=(1, 4, 4))
    assert plan_for(VideoLayout(4, 4, 4), config, 0).is_identity
    unfused_opt, fused_opt = optimize(model, config), optimize(fused, config)
    with torch.no_grad():
        out = first(fused_opt(*args, **kwargs))
        unfused = first(unfused_opt(*args, **kwargs))
        ref = reference_forward(model, args, kwargs, config)
    layers = find_adapter(fused).self_attention_modules(fused)
    assert fused_opt.report.vmoba_runs == len(layers) == 2, fused_opt.report
    assert all(fused_opt.report.executions[m].vmoba_forward == 1 for m in layers)
    assert max_err(out, unfused) < ATOL_F32, max_err(out, unfused)
    assert max_err(out, ref) < ATOL_F32 * 10, max_err(out, ref)
    assert max_err(ref, first(model(*args, **kwargs))) > 1e-3, "the config must be sparse"


# ----------------------------------------------------------------------- toys: skip reasons


class ToyAttention(torch.nn.Module):
    """One attention call of a chosen kind on ``[B, S, C]`` tokens (2 heads)."""

    def __init__(self, kind: str, dim: int = 32) -> None:
        super().__init__()
        self.kind = kind
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        kw = {}
        if self.kind == "cross":
            k, v = (self.qkv(ctx).reshape(b, -1, 3, 2, c // 2).permute(2, 0, 3, 1, 4))[1:]
        elif self.kind == "causal":
            kw["is_causal"] = True
        elif self.kind == "float_mask":
            kw["attn_mask"] = torch.zeros(s, s)
        elif self.kind == "dropout":
            kw["dropout_p"] = 0.1
        elif self.kind == "bool_mask":
            kw["attn_mask"] = torch.ones(b, 1, 1, s, dtype=torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, **kw)
        return x + out.transpose(1, 2).reshape(b, s, c)


class ToyVideo(torch.nn.Module):
    """Toy blocks; optionally a graph break after block ``graph_break_after``, either in the
    forward's own code (Dynamo resumes in the same frame) or inside the loop over blocks
    (Dynamo then compiles each block's frame alone)."""

    def __init__(
        self, kinds: list[str], graph_break_after: int | None = None, in_loop: bool = False
    ) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(ToyAttention(k) for k in kinds)
        self.graph_break_after = graph_break_after
        self.in_loop = in_loop

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        k = len(self.blocks) if self.graph_break_after is None else self.graph_break_after + 1
        for i, block in enumerate(self.blocks[:k]):
            x = block(x, ctx)
            if self.in_loop and i == self.graph_break_after:
                torch._dynamo.graph_break()
        if self.graph_break_after is not None and not self.in_loop:
            torch._dynamo.graph_break()
        for block in self.blocks[k:]:
            x = block(x, ctx)
        return x


TOY_LAYOUT = VideoLayout(frames=2, height=4, width=4, text_tokens=4, text_position="prefix")


def toy_inputs(seed: int = 0, s: int = TOY_LAYOUT.seq_len) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, s, 32, generator=g), torch.randn(1, 5, 32, generator=g)


def test_skip_reasons() -> None:
    kinds = ["self", "cross", "causal", "float_mask", "dropout", "bool_mask"]
    report = explain(ToyVideo(kinds), toy_inputs(), layout=TOY_LAYOUT)
    by_module = {c.module: c for c in report.calls}
    assert len(report.calls) == len(kinds)
    assert by_module["blocks.0"].rewritten and by_module["blocks.0"].layer_index == 0
    assert by_module["blocks.0"].skip is None
    expected = {
        "blocks.1": SkipReason.CROSS_ATTENTION,
        "blocks.2": SkipReason.CAUSAL,
        "blocks.3": SkipReason.MASK_NOT_BOOL,
        "blocks.4": SkipReason.DROPOUT,
        "blocks.5": SkipReason.MASK_UNDECLARED,
    }
    for module, skip in expected.items():
        assert not by_module[module].rewritten and by_module[module].skip is skip, report
    # The messages hold the call's numbers, and the table shows them.
    s = TOY_LAYOUT.seq_len
    assert by_module["blocks.1"].reason == f"cross-attention ({s} queries, 5 keys)"
    assert by_module["blocks.3"].reason.startswith("torch.float32 attention mask")
    assert by_module["blocks.4"].reason == "attention dropout (dropout_p=0.1)"
    text = str(report)
    assert f"dense: cross-attention ({s} queries, 5 keys)" in text and "blocks.0" in text


def test_sequence_not_matching_layout_stays_dense() -> None:
    other = VideoLayout(frames=2, height=4, width=5)
    report = explain(ToyVideo(["self"]), toy_inputs(), layout=other)
    (call,) = report.calls
    assert not call.rewritten and call.skip is SkipReason.LAYOUT_MISMATCH
    # both lengths and the layout, to see which side is wrong
    assert call.reason.startswith(f"{TOY_LAYOUT.seq_len} tokens do not match the layout's "), call
    assert f"{other.seq_len} ({other})" in call.reason, call


def test_layer_schedule_survives_graph_breaks() -> None:
    config = VMoBAConfig(schedule=("1d", "2d", "3d"), **_CHUNKS)
    model = ToyVideo(["self"] * 4, graph_break_after=1)
    x, ctx = toy_inputs()
    report = explain(model, (x, ctx), layout=TOY_LAYOUT, config=config)
    assert len(report.graphs) == 2
    assert [c.layer_index for c in report.calls] == [0, 1, 2, 3]
    assert [c.partition for c in report.calls] == ["1d", "2d", "3d", "1d"]
    opt = optimize(model, config, layout=TOY_LAYOUT, lowering="aot_eager")
    with torch.no_grad():
        out = opt(x, ctx)
        ref = toy_reference(model, x, ctx, config)
    assert max_err(out, ref) < ATOL_F32


def test_graph_break_inside_the_block_loop_stays_dense_with_the_reason() -> None:
    model = ToyVideo(["self"] * 3, graph_break_after=0, in_loop=True)
    report = explain(model, toy_inputs(), layout=TOY_LAYOUT)
    assert report.calls and not report.rewritten, report
    assert all(c.skip is SkipReason.SHARED_FRAME for c in report.calls), report
    assert "frame of blocks.0 alone" in report.calls[0].reason  # where, and the fix
    assert "Remove the graph break" in report.calls[0].reason
    assert report.calls[0].module == "blocks.0"


def toy_reference(model, x, ctx, config, dense_layers=frozenset()):
    layer_of = {f"blocks.{i}": i for i in range(len(model.blocks))}

    def replace(module, a):
        layer = layer_of[module]
        if layer in dense_layers or model.blocks[layer].kind != "self":
            return None
        q, k, v = a["query"], a["key"], a["value"]
        return vmoba_reference(q, k, v, layout=TOY_LAYOUT, config=config, layer_index=layer)

    return run_with_sdpa(model, (x, ctx), {}, replace)[0]


# ---------------------------------------------------------------------- controls and errors


def test_dense_warmup_steps_and_dense_layers() -> None:
    """The whole-model compile's controls (test_regional.py: the blocks')."""
    config = VMoBAConfig(**_CHUNKS)
    model = ToyVideo(["self"] * 3)
    opt = optimize(model, config, layout=TOY_LAYOUT, lowering="aot_eager", regional=False)
    x, ctx = toy_inputs()
    with torch.no_grad():
        dense = model(x, ctx)
        sparse = toy_reference(model, x, ctx, config)
        assert max_err(dense, sparse) > 1e-3

        opt.vmoba.dense_steps = 1
        opt.vmoba.calls_per_step = 2  # conditional + unconditional call per step
        assert max_err(opt(x, ctx), dense) < 1e-6
        assert max_err(opt(x, ctx), dense) < 1e-6
        assert opt.vmoba.step == 1
        assert max_err(opt(x, ctx), sparse) < ATOL_F32
        opt.vmoba.reset()
        assert max_err(opt(x, ctx), dense) < 1e-6
        opt.vmoba.set_step(3)
        assert max_err(opt(x, ctx), sparse) < ATOL_F32
        graphs = len(opt.report.graphs)
        for _ in range(3):
            opt(x, ctx)
        assert len(opt.report.graphs) == graphs  # steps do not recompile

        opt.vmoba.dense_layers = {1}
        got = opt(x, ctx)
        assert max_err(got, toy_reference(model, x, ctx, config, frozenset({1}))) < ATOL_F32
        last = opt.report.graphs[-1][1]
        assert [c.rewritten for c in last] == [True, False, True]
        assert last[1].skip is SkipReason.DENSE_LAYER
        assert last[1].reason == "layer 1 kept dense by the runtime controls (dense_layers)"


def test_pipeline_callback_counts_and_resets() -> None:
    opt = optimize(ToyVideo(["self"]), layout=TOY_LAYOUT)

    class Pipe:
        num_timesteps = 3

    assert opt.vmoba.pipeline_callback(Pipe(), 0, None, {"a": 1}) == {"a": 1}
    assert opt.vmoba.step == 1
    opt.vmoba.pipeline_callback(Pipe(), 2, None, {})
    assert opt.vmoba.step == 0
    with pytest.raises(ValueError, match="dense_steps must be an int >= 0"):
        opt.vmoba.dense_steps = -1


def test_strict_raises_with_the_report_when_nothing_is_rewritten() -> None:
    other = VideoLayout(frames=2, height=4, width=5)
    opt = optimize(ToyVideo(["self"]), layout=other, strict=True, lowering="aot_eager")
    with pytest.raises(RuntimeError, match="(?s)strict=True.*do not match the layout"):
        opt(*toy_inputs())


def test_unknown_model_without_layout_lists_the_families() -> None:
    with pytest.raises(ValueError, match="(?s)known families: wan.*layout=VideoLayout"):
        optimize(ToyVideo(["self"]))


def test_regional_compilation_is_refused() -> None:
    model = ToyVideo(["self", "self"])
    model.blocks[0].compile()
    with pytest.raises(RuntimeError, match="compile_repeated_blocks"):
        optimize(model, layout=TOY_LAYOUT)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"dynamic": True}, ValueError, "dynamic= is not supported"),
        ({"backend": "eager"}, TypeError, "unknown compile options"),
        ({"lowering": "tvm"}, ValueError, "lowering must be one of"),
        ({"options": 3}, TypeError, "options must be a dict"),
        ({"recompile_limit": 0}, ValueError, "recompile_limit must be a positive int"),
    ],
)
def test_bad_compile_options(kwargs, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        optimize(ToyVideo(["self"]), layout=TOY_LAYOUT, **kwargs)


@pytest.mark.parametrize(
    "key, default, explicit",
    [
        # Inductor's mix-order reductions leave a chunked scale_shift_table's gradient unwritten
        # (pytorch#193061; NaN at 55K tokens on the H100): off unless asked for.
        ("triton.mix_order_reduction", False, True),
        # The scheduler pass that keeps fused kernels in program order (training memory with
        # activation checkpointing): on unless turned off.
        ("_post_fusion_custom_pass", PROGRAM_ORDER_PASS, None),
    ],
)
@pytest.mark.parametrize("override", [False, True])
def test_compile_option_defaults_and_overrides(key, default, explicit, override) -> None:
    # optimize's compile gets the default, an explicit option still wins, and the global
    # inductor config is untouched.
    *path, name = key.split(".")
    holder = functools.reduce(getattr, path, torch._inductor.config)
    if not hasattr(holder, name):
        pytest.skip(f"this torch has no inductor option {key}")
    kwargs = {"options": {key: explicit}} if override else {}
    before = getattr(holder, name)
    opt = optimize(ToyVideo(["self"]), layout=TOY_LAYOUT, **kwargs)
    assert opt.inductor_options[key] is (explicit if override else default)
    assert getattr(holder, name) is before  # global untouched


def test_optimized_model_delegates_attributes_and_parameters() -> None:
    model, _, _ = built("wan")
    opt = optimize(model)
    assert opt.config is model.config
    assert dict(opt.named_parameters()).keys() == {
        f"_orig_mod.{n}" for n, _ in model.named_parameters()
    }
    with pytest.raises(TypeError, match="already optimized"):
        optimize(opt)


def test_dynamo_running_eagerly_is_reported_not_silent() -> None:
    """When Dynamo stops compiling (recompile limit), attention would silently run dense: the
    optimized model must warn (and raise under strict=True)."""
    model = ToyVideo(["self"])
    one = dict(layout=TOY_LAYOUT, lowering="aot_eager", regional=False, recompile_limit=1)
    opt = optimize(model, **one)
    strict = optimize(model, strict=True, **one)
    x, ctx = toy_inputs()
    with torch.no_grad():
        opt(x, ctx)  # the one compile this code object may have
        assert opt.report.vmoba_runs == 1 and opt.report.dense_runs == 0
        with pytest.warns(RuntimeWarning, match="ran dense: Dynamo's recompile limit"):
            opt(*toy_inputs(s=TOY_LAYOUT.seq_len + 4))  # a new shape: over the limit
        counts = opt.report.executions["blocks.0"]
        assert (counts.vmoba_forward, counts.dense_forward) == (1, 1)
        assert "recompile limit" in next(iter(counts.dense_causes))
        assert "dense fwd" in str(opt.report)
        with pytest.raises(RuntimeError, match="strict=True: .* ran dense: Dynamo's recompile"):
            strict(x, ctx)


def test_regional_compilation_after_optimize_is_refused_at_the_call() -> None:
    model = ToyVideo(["self", "self"])
    opt = optimize(model, layout=TOY_LAYOUT, lowering="aot_eager")
    model.blocks[1].compile()
    with pytest.raises(RuntimeError, match="compiled on their own"):
        opt(*toy_inputs())


@compat_row(
    tool="activation checkpointing",
    packages=("torch",),
    result="VMoBA, forward and backward (the recomputation is not a second forward)",
)
def test_rewrites_inside_activation_checkpointing() -> None:
    """diffusers' gradient checkpointing puts each block in a nested graph (a checkpoint HOP):
    its calls are rewritten there, and training gradients match the plain model (keep-all
    config: FlexAttention has no CPU backward)."""
    model, args, kwargs = tm.build("wan")
    model.enable_gradient_checkpointing()
    model.train()
    opt = optimize(model, KEEP_ALL, lowering="aot_eager")

    def grads(run):
        model.zero_grad(set_to_none=True)
        first(run()).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got = grads(lambda: opt(*args, **kwargs))
    want = grads(lambda: model(*args, **kwargs))
    assert [c.module for c in opt.report.rewritten] == ["blocks.0.attn1", "blocks.1.attn1"]
    # One forward and one backward each; the recomputation in the backward is not a forward.
    ran = opt.report.executions
    attn1 = ["blocks.0.attn1", "blocks.1.attn1"]
    assert [(ran[m].vmoba_forward, ran[m].vmoba_backward, ran[m].dense_forward) for m in attn1] == [
        (1, 1, 0),
        (1, 1, 0),
    ]
    assert got.keys() == want.keys() and got
    assert max(max_err(got[n], want[n]) for n in got) < 1e-5


def test_explain_on_an_optimized_model_uses_its_config_and_matches_its_report() -> None:
    model, args, kwargs = built("cogvideox")
    opt = optimize(model, SPARSE[1], lowering="aot_eager")
    before = explain(opt, args, kwargs)
    with torch.no_grad():
        opt(*args, **kwargs)
    assert [
        (c.module, c.rewritten, c.layer_index, c.partition, c.reason) for c in before.calls
    ] == [(c.module, c.rewritten, c.layer_index, c.partition, c.reason) for c in opt.report.calls]
    # explain did not add to the optimized model's report: one graph per compiled block variant
    assert len(opt.report.graphs) == len(opt.regional_blocks.variants) == 2


@compat_row(
    tool="outer `torch.compile(optimized)`, `copy.deepcopy(optimized)`",
    packages=("torch",),
    result="VMoBA (the copy is optimized anew)",
)
def test_outer_compile_and_deepcopy_run_vmoba_by_the_account() -> None:
    """torch.compile(optimized) must not trace the wrapper (its own graphs would run dense),
    and a deep copy must run its own VMoBA graphs, not the original's hooks or none."""
    model = ToyVideo(["self"])
    opt = optimize(model, layout=TOY_LAYOUT, lowering="aot_eager", regional=False)
    x, c = toy_inputs()
    with torch.no_grad():
        want = opt(x, c)
        got = torch.compile(opt, backend="aot_eager")(x, c)
        twin = copy.deepcopy(opt)
        copied = twin(x, c)
    assert torch.equal(got, want) and torch.allclose(copied, want)
    assert opt.report.executions["blocks.0"].vmoba_forward == 2
    assert twin._orig_mod is not model and twin.report is not opt.report
    assert twin.report.executions["blocks.0"].vmoba_forward == 1
    assert [c.module for c in twin.report.rewritten] == ["blocks.0"]


def test_layer_numbering_counts_video_self_attention_only() -> None:
    """Layer indices count video self-attention modules only: a module marked as
    cross-attention takes none, and neither does an unmarked one once its call shows
    cross-attention (the schedule runs 1D, 2D, 3D over the three self-attention layers either
    way; tests/test_layer_numbering.py holds the property over block layouts)."""
    kinds = ["self", "cross", "self", "cross", "self"]
    x, ctx = toy_inputs()
    model = ToyVideo(kinds)
    opt = optimize(model, layout=TOY_LAYOUT, lowering="aot_eager")
    with torch.no_grad():
        opt(x, ctx)
    assert sorted((c.module, c.layer_index) for c in opt.report.rewritten) == [
        ("blocks.0", 0),
        ("blocks.2", 1),
        ("blocks.4", 2),
    ]
    opt.restore()

    for i in (1, 3):
        model.blocks[i].is_cross_attention = True
    opt = optimize(model, layout=TOY_LAYOUT, lowering="aot_eager")
    with torch.no_grad():
        opt(x, ctx)
    rewritten = {(c.module, c.layer_index, c.partition) for c in opt.report.rewritten}
    assert sorted(rewritten) == [
        ("blocks.0", 0, "1d"),
        ("blocks.2", 1, "2d"),
        ("blocks.4", 2, "3d"),
    ], opt.report
