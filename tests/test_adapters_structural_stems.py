"""The structural fallback's grid from patch-embedding stems of several convolutions.

A stem of two stride-2 convolutions downsamples 4x: a grid read off the first convolution alone
would be 2x too fine along each axis. The truth here is the stem's own output shape (the tokens
are its output flattened frame-major); the fallback must read that grid, or leave every call
dense saying why the grid is unproven.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ATOL_F32, max_err
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("diffusers")

from test_adapters_structural import SPARSE, ToySelfAttention, ToyVideoDiT, toy_reference  # noqa: E402

from vmoba_compile import VideoLayout, optimize  # noqa: E402
from vmoba_compile.adapters import find_adapter  # noqa: E402
from vmoba_compile.adapters.structural import STRUCTURAL, LayoutUnknown  # noqa: E402

Stage = tuple[
    tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]
]  # kernel, stride, pad


class StemDiT(ToyVideoDiT):
    """:class:`ToyVideoDiT` whose patch embedding is a stem of Conv3d stages with SiLU between."""

    def __init__(self, stages: list[Stage], dim: int = 32) -> None:
        super().__init__(dim=dim)
        layers: list[torch.nn.Module] = []
        channels = [4] + [8] * (len(stages) - 1) + [dim]
        for i, (k, s, p) in enumerate(stages):
            if i:
                layers.append(torch.nn.SiLU())
            layers.append(torch.nn.Conv3d(channels[i], channels[i + 1], k, stride=s, padding=p))
        self.patch_embed = torch.nn.Sequential(*layers)


def _disjoint(stage: Stage) -> bool:
    k, s, p = stage
    return k == s and not any(p)


def _inputs(frames: int, height: int, width: int) -> dict:
    g = torch.Generator().manual_seed(7)
    return dict(
        hidden_states=torch.randn(1, 4, frames, height, width, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 8, generator=g),
    )


axis = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3))
stages = st.lists(
    st.tuples(axis, axis, st.sampled_from([(0, 0, 0), (0, 1, 1)])).map(
        lambda ksp: ksp if ksp[2] == (0, 0, 0) else ksp  # padded stages are never disjoint
    ),
    min_size=1,
    max_size=3,
)
# Half the stems cut disjoint patches at every stage: those must give the true grid.
disjoint_stages = st.lists(axis.map(lambda k: (k, k, (0, 0, 0))), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(stages, disjoint_stages),
    st.sampled_from([2, 3, 5]),  # not 4: the input's 4 channels would make the axis ambiguous
    st.integers(6, 16),
    st.integers(6, 16),
)
def test_the_grid_is_the_whole_stems_or_unproven(stem, frames, height, width) -> None:
    stem = [((kt, kh, kw), (st_[0], st_[1], st_[2]), p) for (kt, kh, kw), st_, p in stem]
    torch.manual_seed(0)
    model = StemDiT(stem).eval()
    kwargs = _inputs(frames, height, width)
    try:
        with torch.no_grad():
            out = model.patch_embed(kwargs["hidden_states"])
    except RuntimeError:  # a kernel larger than what an earlier stage left
        assume(False)
    true = tuple(out.shape[2:])
    assert find_adapter(model) is STRUCTURAL
    if all(_disjoint(s) for s in stem):
        grid = STRUCTURAL.grid(model, (), kwargs)
        assert (grid.frames, grid.height, grid.width) == true, (stem, grid)
        assert grid.text_position.value == "prefix"
    else:
        try:
            grid = STRUCTURAL.grid(model, (), kwargs)
        except LayoutUnknown as e:
            assert "disjoint patches" in str(e), (stem, str(e))
        else:  # never a wrong grid
            assert (grid.frames, grid.height, grid.width) == true, (stem, grid)


def test_two_stage_stem_runs_vmoba_on_the_true_grid() -> None:
    """conv(stride 2) -> conv(stride 2) on 16 x 24 frames: a 4 x 6 grid, not the first
    convolution's 8 x 12."""
    torch.manual_seed(0)
    model = StemDiT([((1, 2, 2), (1, 2, 2), (0, 0, 0))] * 2).eval()
    kwargs = _inputs(3, 16, 24)
    opt = optimize(model, SPARSE, lowering="aot_eager")
    with torch.no_grad():
        out = opt(**kwargs)
        dense = model(**kwargs)
    assert [c.module for c in opt.report.rewritten] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(c.reason.startswith("video 3x4x6 + 5 prefix") for c in opt.report.rewritten)
    layout = VideoLayout(3, 4, 6, text_tokens=5, text_position="prefix")
    assert max_err(out, toy_reference(model, kwargs, layout, SPARSE)) < ATOL_F32
    assert max_err(out, dense) > 1e-4
    ex = opt.report.executions
    assert [ex[m].vmoba_forward for m in ("blocks.0.attn", "blocks.1.attn")] == [1, 1]


def test_stem_with_an_overlapping_second_stage_is_dense_with_the_reason() -> None:
    torch.manual_seed(0)
    model = StemDiT([((1, 2, 2), (1, 2, 2), (0, 0, 0)), ((1, 3, 3), (1, 2, 2), (0, 1, 1))]).eval()
    kwargs = _inputs(3, 16, 24)
    opt = optimize(model, SPARSE, lowering="aot_eager")
    with torch.no_grad():
        out = opt(**kwargs)
        dense = model(**kwargs)
    assert opt.report.calls and not opt.report.rewritten
    reasons = {c.reason for c in opt.report.calls}
    assert all(
        "patch-embedding stem" in r and "does not cut disjoint patches" in r for r in reasons
    )
    assert max_err(out, dense) < 1e-6


class MultiHeadSelfMix(ToySelfAttention):
    """A self-attention module whose class name does not say "Attention"."""


class CrossAttention(ToySelfAttention):
    pass


def test_self_attention_not_named_attention_gets_a_true_reason() -> None:
    """Blocks whose only "Attention"-named modules are cross-attention: the fallback does not
    claim the blocks hold only cross-attention (they hold a self-attention it cannot name)."""
    torch.manual_seed(0)
    model = ToyVideoDiT().eval()
    for block in model.blocks:
        block.attn = MultiHeadSelfMix(32)
        block.cross = CrossAttention(32)
    with pytest.raises(ValueError) as e:
        optimize(model)
    msg = str(e.value)
    assert "hold only cross-attention" not in msg
    assert "takes attention modules by class name" in msg
    assert "blocks.0.cross (CrossAttention)" in msg and "Pass layout=VideoLayout(" in msg


def test_layout_numbers_self_attention_not_marked_cross_attention() -> None:
    """With ``layout=`` the layer numbering leaves out modules marked as cross-attention (here
    the unused ``CrossAttention`` ones, which took layer indices before): the self-attention
    calls, in a module not named "...Attention", are numbered in graph order (layers 0, 1, the
    schedule's 1D and 2D) and equal the reference, instead of every block running layer 0."""
    torch.manual_seed(0)
    model = ToyVideoDiT().eval()
    for block in model.blocks:
        block.attn = MultiHeadSelfMix(32)
        block.cross = CrossAttention(32)
    kwargs = _inputs(2, 8, 8)
    layout = VideoLayout(2, 4, 4, text_tokens=5, text_position="prefix")
    with torch.no_grad():
        dense = model(**kwargs)
        opt = optimize(model, SPARSE, layout=layout, lowering="aot_eager")
        got = opt(**kwargs)
    assert [c.layer_index for c in opt.report.rewritten] == [0, 1], opt.report
    assert [c.partition for c in opt.report.rewritten] == ["1d", "2d"]
    assert max_err(got, toy_reference(model, kwargs, layout, SPARSE)) < ATOL_F32
    assert max_err(got, dense) > 1e-4
