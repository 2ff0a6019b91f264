"""TOKEN granularity with the query rows sorted per head (``token_order="sorted"``) against the
float64 reference: forward through ``vmoba_attention`` (eager CPU flex, which applies
``mask_mod`` only), and forward and gradients through the same steps with a float64 stand-in
for the compiled kernel that reads the block tables as the GPU kernels do (full blocks skip
``mask_mod``, unlisted blocks are skipped): FlexAttention has no backward on CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import ATOL_F32, max_err
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import configs, layouts
from torch.nn.attention.flex_attention import create_mask

from vmoba_compile import VMoBAConfig, vmoba_attention, vmoba_reference
from vmoba_compile.attention import permute, plan_blocks, plan_for, unpermute
from vmoba_compile.masks import make_mask_mod, mask_pieces, plan_index
from vmoba_compile.token_rows import sort_rows, sorted_queries, token_order, unsort_rows


@st.composite
def token_cases(draw):
    """A ragged layout with text on either side, a sparse TOKEN config, GQA, B = 2, an optional
    text key mask and scale, and seeded q, k, v."""
    layout = draw(layouts(max_side=7, max_text=12))
    config = draw(configs(layout, granularity="token", block_size=16))
    layer = draw(st.integers(0, 2))
    hkv = draw(st.sampled_from([1, 2, 4]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    s = layout.seq_len
    q = torch.randn(2, 4, s, 8, generator=g)
    k, v = (torch.randn(2, hkv, s, 8, generator=g) for _ in range(2))
    tkm = None
    if layout.text_tokens and draw(st.booleans()):
        tkm = torch.rand(2, layout.text_tokens, generator=g) < 0.6
    scale = draw(st.sampled_from([None, 0.3]))
    kw = dict(layout=layout, config=config, layer_index=layer, scale=scale, text_key_mask=tkm)
    return (q, k, v), kw


def _listed(num: torch.Tensor, ind: torch.Tensor) -> torch.Tensor:
    """``[B, H, NB, NB]`` bool: the blocks one side's (counts, indices) tables list."""
    live = (torch.arange(ind.shape[-1]) < num[..., None]).to(torch.int32)
    return torch.zeros_like(live).scatter_add_(-1, ind.long(), live) > 0


def _kernel_mask(pieces, b: int, h: int) -> torch.Tensor:
    """``[B, H, S_pad, S_pad]`` what a compiled kernel computes with these pieces: full blocks
    whole, listed partial blocks through ``mask_mod``, nothing else. The query side's tables
    (the backward's) must list the same blocks."""
    s, bs = pieces.seq_len, pieces.block_size
    t = pieces.tables
    partial = _listed(t["kv_num_blocks"], t["kv_indices"])
    full = _listed(t["full_kv_num_blocks"], t["full_kv_indices"])
    assert torch.equal(_listed(t["q_num_blocks"], t["q_indices"]).transpose(-1, -2), partial)
    assert torch.equal(_listed(t["full_q_num_blocks"], t["full_q_indices"]).mT, full)
    assert not (partial & full).any()
    scores = create_mask(make_mask_mod(pieces), b, h, s, s, device="cpu")
    partial, full = (m.repeat_interleave(bs, -2).repeat_interleave(bs, -1) for m in (partial, full))
    return full | (partial & scores)


def _float64_kernel(q, k, v, pieces, scale):
    mask = _kernel_mask(pieces, q.shape[0], q.shape[1])
    # Rows with no key at all are padding rows (their output is dropped, their gradient zero):
    # let them attend everything instead of dividing by zero.
    mask = mask | ~mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.to(q.dtype)


def _sorted_steps(q, k, v, layout, config, layer_index, text_key_mask, q_tables=True):
    """vmoba_attention's TOKEN steps up to the kernel, with the sorted rows:
    ``(plan, idx, permuted q/k/v, rows, mask pieces)``."""
    plan = plan_for(layout, config, layer_index)
    idx = plan_index(plan, q.device)
    qp, kp, vp = (permute(x, plan, idx) for x in (q, k, v))
    sel = plan_blocks(qp, kp, plan, config, idx=idx, q_tables=False).sel
    rows = sort_rows(sel, idx.real, idx.onehot.sum(0), plan.block_size)
    pieces = mask_pieces(plan, idx, rows.sel, token_level=True, text_key_mask=text_key_mask,
                         q_tables=q_tables, q_real=rows.q_real)  # fmt: skip
    return plan, idx, (qp, kp, vp), rows, pieces


def _sorted_attention(q, k, v, *, layout, config, layer_index, scale, text_key_mask, seen=None):
    """vmoba_attention's TOKEN steps with the sorted rows, the kernel replaced by the float64
    stand-in; ``seen`` (a list) receives the rows' order."""
    plan, idx, (qp, kp, vp), rows, pieces = _sorted_steps(
        q, k, v, layout, config, layer_index, text_key_mask
    )
    out = _float64_kernel(sorted_queries(qp, rows), kp, vp, pieces, scale)
    if seen is not None:
        seen.append(rows.order)
    return unpermute(unsort_rows(out, rows), plan, idx)


@settings(max_examples=20, deadline=None)
@given(case=token_cases())
def test_sorted_rows_equal_the_reference_forward_and_backward(case) -> None:
    (q, k, v), kw = case
    plan = plan_for(kw["layout"], kw["config"], kw["layer_index"])
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    ref = vmoba_reference(*ref_in, **kw)
    # the op itself, forward (eager CPU flex reads mask_mod only), both orders
    for order in ("sorted", "natural"):
        cfg = dataclasses.replace(kw["config"], token_order=order)
        out = vmoba_attention(q, k, v, **{**kw, "config": cfg})
        assert max_err(out, ref) < ATOL_F32, (order, max_err(out, ref))
    if kw["config"].keeps_all_chunks(plan.num_chunks):
        return  # the op runs dense SDPA: no rows to sort
    from vmoba_compile.diagnostics import token_block_density

    d = token_block_density(q, k, layout=kw["layout"], config=kw["config"],
                            layer_index=kw["layer_index"])  # fmt: skip
    assert d["block_sorted"] <= d["block_natural"], d  # ragged grids too
    assert_matches_reference(_sorted_attention, (q, k, v), kw, ref, ref_in)


def assert_matches_reference(fn, qkv, kw, ref, ref_in) -> None:
    """``fn(q, k, v, **kw)`` equals the float64 reference ``ref`` (of leaves ``ref_in``) within
    ATOL_F32, forward and the gradients of q, k and v."""
    leaves = [x.clone().requires_grad_() for x in qkv]
    out = fn(*leaves, **kw)
    assert max_err(out, ref) < ATOL_F32, max_err(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        assert max_err(got, want) < ATOL_F32, (name, max_err(got, want))


def _smooth_case(layout, heads: int = 2, dim: int = 8, seed: int = 0):
    """q = k: a few sinusoids along the token order plus a little noise (nearby tokens select
    alike), and random v."""
    g = torch.Generator().manual_seed(seed)
    n = layout.video_tokens
    base = torch.sin(torch.linspace(0, 6.28, n)[:, None] * torch.arange(1, dim + 1))
    q = base.expand(1, heads, n, dim) + 0.1 * torch.randn(1, heads, n, dim, generator=g)
    return q, torch.randn(1, heads, n, dim, generator=g)


def test_gradients_through_the_lexicographic_order() -> None:
    """Where the lexicographic order wins (1D, a few chunks), the rows reach the kernel out of
    chunk order, and the output and gradients still equal the reference."""
    from vmoba_compile import VideoLayout

    layout = VideoLayout(4, 8, 16)
    q, v = _smooth_case(layout)
    cfg = VMoBAConfig(granularity="token", block_size=16, chunk_1d=(1,), threshold=0.3)
    kw = dict(layout=layout, config=cfg, layer_index=0, scale=None, text_key_mask=None)
    leaves = [x.clone().requires_grad_() for x in (q, q, v)]
    seen: list[torch.Tensor] = []
    out = _sorted_attention(*leaves, **kw, seen=seen)
    natural = torch.arange(seen[0].shape[-1])
    assert not torch.equal(seen[0], natural.expand_as(seen[0])), "the order stayed natural"
    ref_in = [x.detach().double().requires_grad_() for x in (q, q, v)]
    ref = vmoba_reference(*ref_in, **kw)
    g = torch.randn_like(out)
    assert max_err(out, ref) < ATOL_F32
    grads = torch.autograd.grad(out, leaves, g)
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        assert max_err(got, want) < ATOL_F32, (name, max_err(got, want))


def test_token_order_puts_real_rows_first_in_lexicographic_order() -> None:
    g = torch.Generator().manual_seed(0)
    sel = torch.rand(2, 3, 40, 70, generator=g) < 0.3  # 70 columns: two sort keys
    sel[..., 5, :] = sel[..., 9, :]  # equal rows keep their order
    real = torch.arange(40) % 7 != 3
    order = token_order(sel, real)
    assert torch.equal(order.sort(-1).values, torch.arange(40).expand(2, 3, -1))
    assert bool(real[order][..., : int(real.sum())].all())
    for bi in range(2):
        for hi in range(3):
            rows = [tuple(sel[bi, hi, i].tolist()) for i in order[bi, hi].tolist() if real[i]]
            assert rows == sorted(rows), "lexicographic, column 0 most significant"
            pos = order[bi, hi].tolist()
            assert pos.index(5) < pos.index(9)


def test_sorted_rows_make_blocks_uniform_on_a_smooth_field() -> None:
    """The point of the sort: never more blocks than the chunk order, and on a 1D layer with
    locality fewer blocks and more of them full (the numbers at Wan's grid: docs/design.md)."""
    from vmoba_compile import VideoLayout
    from vmoba_compile.diagnostics import token_block_density

    layout = VideoLayout(4, 8, 16)
    q, _ = _smooth_case(layout)
    cfg = VMoBAConfig(granularity="token", block_size=16, chunk_1d=(1,), chunk_2d=(4, 4),
                      chunk_3d=(2, 4, 4), threshold=0.3)  # fmt: skip
    got = [token_block_density(q, q, layout=layout, config=cfg, layer_index=i) for i in range(3)]
    for d in got:
        assert d["token"] <= d["block_sorted"] <= d["block_natural"], d
    one_d = got[0]  # there the lexicographic order wins
    assert one_d["block_sorted"] < one_d["block_natural"], one_d
    assert one_d["full_sorted"] > one_d["full_natural"], one_d


def test_token_order_value_is_checked() -> None:
    assert VMoBAConfig().token_order.value == "sorted"  # never slower on an H100 (README table)
    assert VMoBAConfig(token_order="SORTED").token_order.value == "sorted"
    with pytest.raises(ValueError, match=r"token_order must be one of 'sorted', 'natural'"):
        VMoBAConfig(token_order="random")


@pytest.mark.compiled
def test_the_fa4_op_takes_the_sorted_rows_on_cpu_flex() -> None:
    """Kernel.FLASH's op gets the same sorted rows and mask pieces (its plumbing run with
    FlexAttention's CPU kernel inside, as in tests/test_kernels.py): text prefix, masked text
    keys, GQA, B = 2, ragged chunks."""
    from vmoba_compile import VideoLayout
    from vmoba_compile.kernels import flash_block_sparse

    layout = VideoLayout(5, 6, 7, text_tokens=10, text_position="prefix")
    cfg = VMoBAConfig(chunk_1d=(1,), chunk_2d=(3, 4), block_size=16, granularity="token",
                      threshold=0.3)  # fmt: skip
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, layout.seq_len, 8, generator=g)
    k, v = (torch.randn(2, 2, layout.seq_len, 8, generator=g) for _ in range(2))
    tkm = torch.arange(10).expand(2, 10) < torch.tensor([[7], [10]])
    for layer in (0, 1):
        plan, idx, (qp, kp, vp), rows, pieces = _sorted_steps(
            q, k, v, layout, cfg, layer, tkm, q_tables=False
        )
        out = flash_block_sparse(sorted_queries(qp, rows), kp, vp, pieces, None, backend="DEFAULT")
        out = unpermute(unsort_rows(out, rows), plan, idx)
        kw = dict(layout=layout, config=cfg, layer_index=layer, text_key_mask=tkm)
        assert max_err(out, vmoba_reference(q, k, v, **kw)) < ATOL_F32, layer


@pytest.mark.compiled
def test_the_row_sort_and_its_gradient_trace_into_one_graph() -> None:
    """sort_rows, the gathers and their backward under torch.compile (AOTAutograd, fullgraph):
    the same values and gradients as eager."""
    from vmoba_compile import VideoLayout

    layout = VideoLayout(4, 8, 16)
    cfg = VMoBAConfig(granularity="token", block_size=16, chunk_1d=(1,), threshold=0.3)
    plan = plan_for(layout, cfg, 0)
    idx = plan_index(plan, torch.device("cpu"))
    q, _ = _smooth_case(layout)
    qp = permute(q, plan, idx)
    weight = torch.randn_like(qp)

    def through_rows(x):
        sel = plan_blocks(x, x, plan, cfg, idx=idx, q_tables=False).sel
        rows = sort_rows(sel, idx.real, idx.onehot.sum(0), plan.block_size)
        return unsort_rows(sorted_queries(x, rows) * weight, rows)

    x = qp.detach().requires_grad_()
    eager = through_rows(x)
    (want,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(through_rows, backend="aot_eager", fullgraph=True)(x)
    (got,) = torch.autograd.grad(compiled.square().sum(), x)
    assert torch.equal(compiled, eager) and torch.equal(got, want)
