"""Attention ops the pass does not rewrite: FlexAttention (diffusers' 'flex' backend) and
``nn.MultiheadAttention``. Each call is in the report, dense with its reason and fix; the account
counts its runs dense; a video self-attention call among them makes ``strict=True`` raise; the
output is the unoptimized model's."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import tiny_models as tm  # noqa: E402
from compat_rows import compat_row  # noqa: E402
from test_api import _CHUNKS  # noqa: E402

import vmoba_compile as vc  # noqa: E402
from vmoba_compile import SkipReason, VideoLayout, VMoBAConfig, explain, optimize  # noqa: E402
from vmoba_compile.passes import RewriteReport  # noqa: E402

CONFIG = VMoBAConfig(**_CHUNKS)
LAYOUT = VideoLayout(frames=2, height=4, width=4)  # 32 tokens


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _by_module(report: RewriteReport) -> dict[str, list]:
    found: dict[str, list] = {}
    for c in report.calls:
        found.setdefault(c.module, []).append(c)
    return found


def _assert_dense_counted(report: RewriteReport, module: str, reason: SkipReason) -> None:
    """One dense forward of ``module``, caused by its graph's ``reason`` decision, no VMoBA."""
    e = report.executions[module]
    (cause,) = e.dense_causes
    assert (e.vmoba_forward, e.dense_forward, e.no_graph) == (0, 1, 0), (module, e)
    assert cause.startswith("decided in the graph: " + reason.value.split("{")[0]), cause


# ---------------------------------------------------------------------------------------------
# diffusers' flex attention backend


def _wan_flex():
    model, args, kwargs = tm.build("wan")
    model.set_attention_backend("flex")
    with torch.no_grad():
        want = model(*args, **kwargs)[0]
    return model, args, kwargs, want


@compat_row(
    tool="diffusers' `flex` attention backend",
    packages=("diffusers",),
    result="dense, with the reason (`FLEX_ATTENTION`)",
)
def test_flex_backend_calls_are_listed_dense_counted_and_exact() -> None:
    model, args, kwargs, want = _wan_flex()
    opt = optimize(model, CONFIG, lowering="aot_eager")
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="planned for .*attn1.*FlexAttention"):
        out = opt(*args, **kwargs)[0]
    torch.testing.assert_close(out, want)
    calls = _by_module(opt.report)
    blocks = [f"blocks.{i}" for i in range(len(model.blocks))]
    assert sorted(calls) == sorted(f"{b}.{a}" for b in blocks for a in ("attn1", "attn2"))
    for b in blocks:
        (self_call,) = calls[f"{b}.attn1"]
        (cross_call,) = calls[f"{b}.attn2"]
        for c in (self_call, cross_call):
            assert not c.rewritten and c.skip is SkipReason.FLEX_ATTENTION, c
            assert "set_attention_backend('native')" in c.reason, c.reason
            _assert_dense_counted(opt.report, c.module, SkipReason.FLEX_ATTENTION)
        assert self_call.planned and self_call.shape == "[1, 2, 72, 12] kv 72", self_call
        # cross-attention would be dense as SDPA too: not a planned call, and the line says why
        assert not cross_call.planned, cross_call
        assert "cross-attention (72 queries, 12 keys)" in cross_call.reason, cross_call.reason
    assert "dense: attention through FlexAttention" in str(opt.report)


def test_flex_backend_context_manager_in_explain_and_strict() -> None:
    from diffusers.models.attention_dispatch import attention_backend

    model, args, kwargs = tm.build("wan")
    with torch.no_grad():
        want = model(*args, **kwargs)[0]
    with attention_backend("flex"):
        report = explain(model, args, kwargs, config=CONFIG)
    flex = [c for c in report.calls if c.skip is SkipReason.FLEX_ATTENTION]
    assert [c.module for c in flex if c.planned] == ["blocks.0.attn1", "blocks.1.attn1"], report
    assert len(flex) == len(report.calls) == 4, report
    model.set_attention_backend("flex")
    opt = optimize(model, CONFIG, lowering="aot_eager", strict=True)
    raised = r"(?s)strict=True.*blocks.0.attn1.*FlexAttention.*set_attention_backend\('native'\)"
    with torch.no_grad(), pytest.raises(RuntimeError, match=raised):
        opt(*args, **kwargs)
    model.set_attention_backend("native")  # the fix: the model's self-attention now rewrites
    torch._dynamo.reset()
    with torch.no_grad():
        fixed = optimize(model, VMoBAConfig(threshold=1.0, **_CHUNKS), lowering="aot_eager")
        out = fixed(*args, **kwargs)[0]
    torch.testing.assert_close(out, want)
    assert {c.module for c in fixed.report.rewritten} == {"blocks.0.attn1", "blocks.1.attn1"}


def test_own_flex_op_gets_no_flex_line() -> None:
    """A model calling vmoba_attention itself already runs VMoBA: its flex op is not a dense
    FlexAttention call of the model."""

    class OwnAttention(torch.nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return vc.vmoba_attention(q, q, q, layout=LAYOUT, config=CONFIG, layer_index=0)

    q = torch.randn(1, 2, LAYOUT.seq_len, 8)
    report = explain(OwnAttention(), (q,), layout=LAYOUT, config=CONFIG)
    assert report.graphs and not report.calls, report


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention


class MHABlock(torch.nn.Module):
    """A DiT block: self-attention (batch first) and cross-attention (sequence first) through
    ``nn.MultiheadAttention``."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross = torch.nn.MultiheadAttention(dim, heads)
        self.mlp = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        q, c = x.transpose(0, 1), context.transpose(0, 1)
        x = x + self.cross(q, c, c)[0].transpose(0, 1)
        return x + self.mlp(x)


class MHADiT(torch.nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([MHABlock(dim) for _ in range(2)])

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, context)
        return x


def _mha_dit():
    torch.manual_seed(0)
    model = MHADiT().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, LAYOUT.seq_len, 16, generator=g)
    context = torch.randn(2, 8, 16, generator=g)
    with torch.no_grad():
        want = model(x, context)
    return model, (x, context), want


def _assert_mha_lines(report: RewriteReport) -> None:
    calls = _by_module(report)
    assert sorted(calls) == [f"blocks.{i}.{a}" for i in (0, 1) for a in ("attn", "cross")], report
    for i in (0, 1):
        (self_call,) = calls[f"blocks.{i}.attn"]
        (cross_call,) = calls[f"blocks.{i}.cross"]
        for c in (self_call, cross_call):
            assert not c.rewritten and c.skip is SkipReason.MULTIHEAD_ATTENTION, c
            assert "multi_head_attention_forward" in c.reason, c.reason
        assert self_call.planned and self_call.shape == "[2, 2, 32, 8] kv 32", self_call
        assert not cross_call.planned and cross_call.shape == "[2, 2, 32, 8] kv 8", cross_call
        assert "cross-attention (32 queries, 8 keys)" in cross_call.reason, cross_call.reason


@compat_row(
    tool="`nn.MultiheadAttention`",
    packages=("torch",),
    result="dense, with the reason (`MULTIHEAD_ATTENTION`)",
)
@pytest.mark.parametrize("regional", [None, False], ids=["blocks", "whole"])
def test_multihead_attention_is_listed_dense_counted_and_exact(regional: bool | None) -> None:
    model, inputs, want = _mha_dit()
    opt = optimize(model, CONFIG, layout=LAYOUT, lowering="aot_eager", regional=regional)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="planned for .*nn.MultiheadAtt"):
        out = opt(*inputs)
    torch.testing.assert_close(out, want)
    _assert_mha_lines(opt.report)
    for c in opt.report.calls:
        _assert_dense_counted(opt.report, c.module, SkipReason.MULTIHEAD_ATTENTION)
    opt.restore()


def test_multihead_attention_in_explain_and_strict() -> None:
    model, inputs, want = _mha_dit()
    _assert_mha_lines(explain(model, inputs, layout=LAYOUT, config=CONFIG))
    opt = optimize(model, CONFIG, layout=LAYOUT, lowering="aot_eager", strict=True)
    fix = "write the attention as its in-projection, F.scaled_dot_product_attention"
    with pytest.raises(RuntimeError, match=f"(?s)strict=True.*blocks.0.attn\\b.*{fix}"):
        opt(*inputs)
    # another layout: the self-attention is no planned call, strict raises only as before
    # (nothing rewritten, with the report), not for the op
    other = VideoLayout(frames=1, height=4, width=4)
    opt = optimize(model, CONFIG, layout=other, lowering="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs), want)
    assert not any(c.planned for c in opt.report.calls), opt.report
    assert "do not match the layout's 16" in opt.report.calls[0].reason
