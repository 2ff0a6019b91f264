"""Exactly tied gates: the op and the reference follow one rule, the lower index first.

Ties come from all-zero query rows (zero-padded tokens, a freshly initialised layer), from
identical keys (every chunk mean equal) and from duplicated chunk contents. The dyadic inputs
below keep every chunk mean, block mean and gate exact in float32, so a tie in the float64
reference is a tie in the op as well and the two selections must be equal bit for bit.
"""

import math

import pytest
import torch
from conftest import ATOL_F32, max_err
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import configs, layouts

from vmoba_compile import VideoLayout, VMoBAConfig, vmoba_attention, vmoba_reference
from vmoba_compile.attention import permute, plan_blocks, plan_for
from vmoba_compile.config import Scope, Selection
from vmoba_compile.reference import reference_selection
from vmoba_compile.selection import select

# Thresholds far from any fraction with a small denominator: with dyadic gates the accumulated
# share can equal a simple fraction such as 0.25 exactly, and then float32 (op) and float64
# (reference) rounding may land on either side of the cut, which says nothing about ties.
THRESHOLDS = [(math.sqrt(5) - 1) / 2, 1 / math.pi, math.sqrt(2) - 1, 1 / math.e]
ATOL_F64 = 1e-10  # float64 in both: only the summation order differs

MODES = [
    ("topk", None, "block"),
    ("topk", None, "token"),
    ("threshold", "query", "block"),
    ("threshold", "query", "token"),
    ("threshold", "head", "block"),
    ("threshold", "head", "token"),
]


def _op_selection_per_token(q, k, layout, config, layer):
    """The op's selection as ``[B, H, N, C]``: the row of each video token's query unit, in the
    call's token order."""
    plan = plan_for(layout, config, layer)
    bp = plan_blocks(permute(q, plan), permute(k, plan), plan, config)
    vs, n = layout.video_start, layout.video_tokens
    slots = plan.token_slots(q.device)[vs : vs + n]
    units = slots if config.granularity.value == "token" else slots // config.block_size
    return bp.sel[:, :, units]


def _ref_selection_per_token(q, k, layout, config, layer):
    sel, unit_of, _ = reference_selection(q, k, layout=layout, config=config, layer_index=layer)
    return sel[:, :, unit_of]


def _chunk_of_tokens(layout, config, layer):
    """Chunk of each video token (call order) under ``layer``'s partition."""
    plan = plan_for(layout, config, layer)
    vs, n = layout.video_start, layout.video_tokens
    block_chunk, _ = plan.block_tables(torch.device("cpu"))
    return block_chunk[plan.token_slots(torch.device("cpu"))[vs : vs + n] // plan.block_size]


def _dyadic(gen, shape):
    """Entries in {-1, -0.5, 0, 0.5, 1}: products and sums of a few stay exact in float32."""
    return (torch.randint(-2, 3, shape, generator=gen) / 2).float()


@st.composite
def tied_inputs(draw, layout, config, layer, b=2, h=2, d=8):
    """``(q, k, v)`` whose gates tie exactly, often.

    Keys: all identical, or constant per chunk from a pool of two or three vectors (chunks that
    draw the same vector have identical means), or random normal. Queries: per token (TOKEN) or
    per chunk (BLOCK, so that block means stay exact) from a pool of dyadic vectors against the
    first two, random normal against random keys; then some query units are zeroed (tokens for
    TOKEN, whole chunks for BLOCK). Random queries never meet exact keys: their gates to equal
    chunk means could come out of the matmul unequal by a rounding, not tied. A zero row's gates
    are exactly 0 whatever the keys.
    """
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    s, n, vs = layout.seq_len, layout.video_tokens, layout.video_start
    chunk_of = _chunk_of_tokens(layout, config, layer)
    n_chunks = int(chunk_of.max()) + 1
    per_token = config.granularity.value == "token"
    # chunk_pool most often: partly tied rows, the only ones where a THRESHOLD cut can fall
    # inside a group of equal gates (all-equal rows keep everything)
    k_mode = draw(
        st.sampled_from(["chunk_pool", "identical", "chunk_pool", "random", "chunk_pool"])
    )

    k = torch.randn(b, h, s, d, generator=gen)
    if k_mode == "identical":
        k[:, :, vs : vs + n] = _dyadic(gen, (b, h, 1, d))
    elif k_mode == "chunk_pool":
        pool = _dyadic(gen, (b, h, draw(st.integers(2, 3)), d))
        pick = torch.randint(0, pool.shape[2], (n_chunks,), generator=gen)
        k[:, :, vs : vs + n] = pool[:, :, pick[chunk_of]]

    q = torch.randn(b, h, s, d, generator=gen)
    if k_mode != "random":
        pool = _dyadic(gen, (b, h, draw(st.integers(1, 3)), d))
        groups = n if per_token else n_chunks
        pick = torch.randint(0, pool.shape[2], (groups,), generator=gen)
        q[:, :, vs : vs + n] = pool[:, :, pick if per_token else pick[chunk_of]]
    zero_share = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    if per_token:
        zero = torch.rand(n, generator=gen) < zero_share
    else:
        zero = (torch.rand(n_chunks, generator=gen) < zero_share)[chunk_of]
    q[:, :, vs : vs + n][:, :, zero] = 0.0

    v = torch.randn(b, h, s, d, generator=gen)
    return q, k, v


@pytest.mark.parametrize(("selection", "scope", "granularity"), MODES)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_tied_gates_select_as_the_reference_does(data, selection, scope, granularity):
    """With exact ties the op selects exactly what the reference selects, and its output (float32
    and float64 inputs) equals the reference's."""
    layout = data.draw(layouts(max_side=5, max_text=6))
    fixed = dict(selection=selection, granularity=granularity, block_size=16)
    if scope is not None:
        fixed["scope"] = scope
    if selection == "threshold":
        fixed["threshold"] = data.draw(st.sampled_from(THRESHOLDS))
    config = data.draw(configs(layout, **fixed))
    layer = data.draw(st.integers(0, 2))
    # Below three chunks there is at most one candidate besides the self chunk: nothing to tie.
    assume(plan_for(layout, config, layer).num_chunks >= 3)
    q, k, v = data.draw(tied_inputs(layout, config, layer))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)

    mine = _op_selection_per_token(q, k, layout, config, layer)
    ref = _ref_selection_per_token(q, k, layout, config, layer)
    assert torch.equal(mine, ref), f"{(mine != ref).sum().item()} (token, chunk) pairs differ"

    kw = dict(layout=layout, config=config, layer_index=layer)
    out, want = vmoba_attention(q, k, v, **kw), vmoba_reference(q, k, v, **kw)
    tol = ATOL_F32 if dtype is torch.float32 else ATOL_F64
    assert max_err(out, want) < tol, max_err(out, want)


@pytest.mark.parametrize("granularity", ["token", "block"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_zero_query_rows_keep_the_lowest_chunks_in_topk(granularity, layer):
    """The reported case: a 4x8x8 grid whose first query rows are all zero, top-k. Their gates
    all tie at 0, so they keep their own chunk and the lowest-numbered others, in the op and in
    the reference alike. With torch.topk's tie order in the reference, 32 (TOKEN) and 512
    (BLOCK) (token, chunk) pairs of each layer differed, output error 0.18-0.41."""
    layout = VideoLayout(4, 8, 8)
    config = VMoBAConfig(
        block_size=16, chunk_1d=(1,), chunk_2d=(4, 4), chunk_3d=(2, 4, 4), selection="topk",
        topk=2, granularity=granularity,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, layout.seq_len, 16, generator=gen) for _ in range(3))
    # BLOCK: the first frame, whole query blocks in every partition (a block holds 16 tokens of
    # one frame of a chunk)
    zero_rows = 4 if granularity == "token" else 64
    q[:, :, :zero_rows] = 0.0

    mine = _op_selection_per_token(q, k, layout, config, layer)
    ref = _ref_selection_per_token(q, k, layout, config, layer)
    assert torch.equal(mine, ref), f"{(mine != ref).sum().item()} (token, chunk) pairs differ"
    own = _chunk_of_tokens(layout, config, layer)[:zero_rows]
    for token, c in enumerate(own.tolist()):
        lowest_other = 0 if c != 0 else 1
        want = torch.zeros(mine.shape[-1], dtype=torch.bool)
        want[[c, lowest_other]] = True
        assert bool((ref[:, :, token] == want).all()), (token, ref[:, :, token])

    kw = dict(layout=layout, config=config, layer_index=layer)
    out, want_out = vmoba_attention(q, k, v, **kw), vmoba_reference(q, k, v, **kw)
    assert max_err(out, want_out) < ATOL_F32


def _select_both_ways(monkeypatch, g, is_self, config):
    """``select`` with the eager sort-based ranking and with the compiled comparison-based one."""
    from vmoba_compile import selection

    unit_real = torch.ones(g.shape[2], dtype=torch.bool)
    out = []
    for pairwise in (False, True):
        monkeypatch.setattr(selection, "_pairwise", lambda n, p=pairwise: p)
        out.append(select(g, is_self, unit_real, config))
    return out


def test_threshold_cut_inside_a_tie_keeps_the_lower_chunks(monkeypatch):
    """Query scope: three tied non-self chunks with share 1/3 each, need 0.5: the walk keeps
    two of them, the two with the lower chunk indices (not all three)."""
    g = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]).reshape(1, 1, 1, 5)
    is_self = torch.tensor([[True, False, False, False, False]])
    config = VMoBAConfig(selection=Selection.THRESHOLD, threshold=0.5, scope=Scope.QUERY)
    want = torch.tensor([True, True, True, False, False]).reshape(1, 1, 1, 5)
    for sel in _select_both_ways(monkeypatch, g, is_self, config):
        assert torch.equal(sel, want), sel


def test_head_scope_ties_follow_unit_then_chunk_order(monkeypatch):
    """Head scope: four tied non-self pairs with share 1/4 each, need 0.6: the first three in
    (unit, chunk) row-major order are kept, the last one, unit 1's chunk 2, is not."""
    g = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]).reshape(1, 1, 2, 3)
    is_self = torch.tensor([[True, False, False], [False, True, False]])
    config = VMoBAConfig(selection=Selection.THRESHOLD, threshold=0.6, scope=Scope.HEAD)
    want = torch.tensor([[True, True, True], [True, True, False]]).reshape(1, 1, 2, 3)
    for sel in _select_both_ways(monkeypatch, g, is_self, config):
        assert torch.equal(sel, want), sel
