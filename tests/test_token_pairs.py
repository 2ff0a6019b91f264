"""TOKEN granularity as (query, chunk) pairs (``token_order="pairs"``,
:mod:`vmoba_compile.token_pairs`) against the float64 reference, forward and gradients, with
FA4's block-sparse kernels replaced by their float64 stand-ins (``backend="DEFAULT"``, the
contract :mod:`vmoba_compile.kernels.flash` tests): the gathers, the block tables, the
log-sum-exp merge and the backward from the merged output are what runs on the GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from test_token_sort import assert_matches_reference, token_cases

from vmoba_compile import VideoLayout, VMoBAConfig, vmoba_reference
from vmoba_compile.attention import _pair_attention, _select, permute, plan_for, unpermute
from vmoba_compile.kernels import choose_kernel
from vmoba_compile.masks import plan_index
from vmoba_compile.token_pairs import PairRows, pair_rows


def _pairs(q, k, v, *, layout, config, layer_index, scale, text_key_mask):
    """vmoba_attention's steps with the pairs formulation on the float64 stand-in."""
    plan = plan_for(layout, config, layer_index)
    idx = plan_index(plan, q.device)
    qp, kp, vp = (permute(x, plan, idx) for x in (q, k, v))
    sel = _select(qp.detach(), kp.detach(), plan, config, idx)[0]
    out = _pair_attention(qp, kp, vp, plan, idx, sel, text_key_mask, scale, backend="DEFAULT")
    return unpermute(out, plan, idx)


@settings(max_examples=25, deadline=None)
@given(case=token_cases())
def test_pairs_equal_the_reference_forward_and_gradients(case) -> None:
    """Ragged grids, text before or after the video, masked text keys, GQA, B = 2, a scale,
    top-k and threshold, every partition."""
    (q, k, v), kw = case
    plan = plan_for(kw["layout"], kw["config"], kw["layer_index"])
    if kw["config"].keeps_all_chunks(plan.num_chunks):
        return  # the op runs dense SDPA
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    ref = vmoba_reference(*ref_in, **kw)
    assert_matches_reference(_pairs, (q, k, v), kw, ref, ref_in)


def test_each_pair_row_attends_its_chunk_and_each_query_its_text_once() -> None:
    """The pair rows of a hand-made selection: group 0 holds every query row in place (the text
    keys), then one group of whole blocks per chunk with the rows that chose it, in slot order;
    the forward tables list exactly the group's key blocks, full where every key is valid."""
    bs = 2
    # 2 chunks of 2 blocks each, 1 text block; 6 query rows (4 video slots... 2 text slots)
    sel = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 1], [1, 1], [1, 1]], dtype=torch.bool)
    sel = sel[None, None].clone()  # [1, 1, 6, 2]: rows 4, 5 are text rows (every chunk)
    row_real = torch.tensor([True, True, True, False, True, True])
    chunk_blocks = torch.tensor([[0, 1], [1, 1]])  # chunk 0: block 0, chunk 1: block 1
    key_valid = torch.tensor([[True, True, True, False, True, False]])
    blocks = key_valid.reshape(1, -1, bs)
    rows: PairRows = pair_rows(sel, row_real, chunk_blocks, blocks.any(-1), blocks.all(-1),
                               num_video_blocks=2, num_text_blocks=1, block_size=bs)  # fmt: skip
    # group 0: rows 0..5; chunk 0: rows 0, 1, 4, 5; chunk 1: rows 1, 2, 4, 5 (3 is padding)
    assert rows.slot[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 4, 5, 1, 2, 4, 5]
    assert rows.live[0, 0].tolist() == [True, True, True, False, True, True] + [True] * 8
    partial_num, partial_idx, full_num, full_idx = rows.tables[:4]
    # query blocks 0-2 (group 0) -> text block 2 (one invalid key: partial)
    # blocks 3-4 (chunk 0) -> block 0 (full); blocks 5-6 (chunk 1) -> block 1 (partial)
    assert partial_num[0, 0].tolist() == [1, 1, 1, 0, 0, 1, 1]
    assert full_num[0, 0].tolist() == [0, 0, 0, 1, 1, 0, 0]
    assert partial_idx[0, 0, :3, 0].tolist() == [2, 2, 2]
    assert partial_idx[0, 0, 5:, 0].tolist() == [1, 1] and full_idx[0, 0, 3:5, 0].tolist() == [0, 0]
    q_partial_num, _, q_full_num, _ = rows.tables[4:]  # the backward's: per key block
    assert q_partial_num[0, 0].tolist() == [0, 2, 3] and q_full_num[0, 0].tolist() == [2, 0, 0]


@pytest.mark.compiled
def test_the_pairs_op_traces_into_one_graph_for_every_selection() -> None:
    """The pair count depends on the data; the caller's graph does not: one fullgraph compile
    (AOTAutograd) serves two inputs with different selections, with the eager values and
    gradients."""
    layout = VideoLayout(4, 6, 8, text_tokens=5)
    cfg = VMoBAConfig(granularity="token", token_order="pairs", block_size=16, chunk_1d=(1,),
                      chunk_2d=(3, 4), threshold=0.3)  # fmt: skip
    kw = dict(layout=layout, config=cfg, layer_index=1, scale=None, text_key_mask=None)
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm

    fn = torch.compile(lambda q, k, v: _pairs(q, k, v, **kw), backend=backend, fullgraph=True)
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, 2, layout.seq_len, 8, generator=g) for _ in range(3))
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        eager_in = [x.clone().requires_grad_() for x in (q, k, v)]
        eager = _pairs(*eager_in, **kw)
        assert torch.equal(out, eager)
        got = torch.autograd.grad(out.square().sum(), leaves)
        want = torch.autograd.grad(eager.square().sum(), eager_in)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert len(frames) == 1, "a new selection recompiled"


def test_auto_runs_pairs_on_fa4_and_falls_back_to_sorted_rows_elsewhere(monkeypatch) -> None:
    """kernel='auto' picks FA4 for a pairs call, forward and training, in every partition; off
    FA4 (a CPU call here) the op runs the sorted rows, whose result is the same."""
    import vmoba_compile.kernels.choice as choice

    monkeypatch.setattr(choice, "flash_unavailable", lambda: None)
    cfg = VMoBAConfig(granularity="token", token_order="pairs")
    from vmoba_compile import Partition

    for partition in Partition:
        for backward in (False, True):
            got = choose_kernel(cfg, partition, device=torch.device("cuda"), dtype=torch.bfloat16,
                                head_dim=128, head_dim_v=128, backward=backward,
                                seq_len=55296, capability=(9, 0))  # fmt: skip
            assert got.kernel.value == "flash", (partition, backward, got)
            assert "pairs" in got.reason
    sorted_cfg = dataclasses.replace(cfg, token_order="sorted")
    on_cpu = choose_kernel(cfg, Partition.D2, device=torch.device("cpu"), dtype=torch.float32,
                           head_dim=8, head_dim_v=8, backward=False)  # fmt: skip
    assert on_cpu.kernel.value == "triton"
    from vmoba_compile import vmoba_attention

    layout = VideoLayout(4, 6, 8)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 8, generator=g) for _ in range(3))
    kw = dict(layout=layout, layer_index=1)
    assert torch.equal(vmoba_attention(q, k, v, config=cfg, **kw),
                       vmoba_attention(q, k, v, config=sorted_cfg, **kw))  # fmt: skip
