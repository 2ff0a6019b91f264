"""Block-mask invariants (``vmoba_compile.masks``) on random, ragged grids: the block tables,
the full blocks and ``mask_mod`` against the selection and the reference mask."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import configs, layouts, qk_inputs, selection_of
from torch.nn.attention.flex_attention import create_mask

from vmoba_compile import reference_mask
from vmoba_compile.attention import permute, plan_blocks, plan_for


@settings(max_examples=200)
@given(data=st.data())
def test_block_mask_agrees_with_selection_and_reference(data):
    """to_dense() equals the selection; full blocks are truly full; the token mask is the spec's.

    Compiled kernels trust the block lists and skip mask_mod on full blocks; eager flex trusts only
    mask_mod. Both must describe the reference mask, so each is checked here without a kernel.
    """
    layout = data.draw(layouts(max_side=6, max_text=12))
    config = data.draw(configs(layout))
    layer = data.draw(st.integers(0, 2))
    q, k = qk_inputs(layout, data.draw(st.integers(0, 2**16)))
    plan = plan_for(layout, config, layer)
    if plan.num_chunks == 1:
        return
    bp = plan_blocks(permute(q, plan), permute(k, plan), plan, config)
    bm, bs = bp.block_mask, config.block_size
    b, h, sp = q.shape[0], q.shape[1], plan.padded_len
    token_mask = create_mask(bm.mask_mod, b, h, sp, sp, device="cpu")
    _, real = plan.slot_tokens(q.device)

    # 1. block lists == selection, expanded to blocks
    block_chunk, _ = plan.block_tables(q.device)
    listed = bm.to_dense().bool()  # [B, H, NB, NB]
    rq = real.reshape(-1, bs)
    per_block = token_mask.reshape(b, h, plan.num_blocks, bs, plan.num_blocks, bs)
    touched = (per_block & rq[None, None, :, :, None, None]).any(-1).any(3)
    assert torch.equal(listed, touched), "block lists disagree with mask_mod"

    # 2. full blocks are all-True on real query rows (kernels skip mask_mod there)
    full = torch.zeros_like(listed)
    nb = plan.num_blocks
    for bi in range(b):
        for hi in range(h):
            for qb in range(nb):
                n = int(bm.full_kv_num_blocks[bi, hi, qb])
                full[bi, hi, qb, bm.full_kv_indices[bi, hi, qb, :n].long()] = True
    ok = (per_block | ~rq[None, None, :, :, None, None]).all(-1).all(3)
    assert bool((ok | ~full).all()), "a full block has masked entries"

    # 3. the token mask, back in call order, is the reference mask
    slots = plan.token_slots(q.device)
    mine = token_mask[:, :, slots][:, :, :, slots]
    ref = reference_mask(q, k, layout=layout, config=config, layer_index=layer)
    assert torch.equal(mine, ref), f"{(mine != ref).sum().item()} entries differ; {config}"
    assert block_chunk.shape[0] == nb


@settings(max_examples=40)
@given(data=st.data())
def test_block_tables_are_row_major_and_q_side_is_the_transpose(data):
    """The kernels read every index table as row-major; the q side (backward) must be torch's
    own transpose of the kv side."""
    from torch.nn.attention.flex_attention import BlockMask

    layout = data.draw(layouts())
    cfg = data.draw(configs(layout))
    layer = data.draw(st.integers(0, 2))
    plan = plan_for(layout, cfg, layer)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q, k = (torch.randn(2, 2, layout.seq_len, 8, generator=g) for _ in range(2))
    bm = plan_blocks(permute(q, plan), permute(k, plan), plan, cfg).block_mask
    ref = BlockMask.from_kv_blocks(
        bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
        BLOCK_SIZE=cfg.block_size, mask_mod=bm.mask_mod, seq_lengths=bm.seq_lengths,
    )  # fmt: skip
    for name in ("q", "full_q"):
        num, ind = getattr(bm, f"{name}_num_blocks"), getattr(bm, f"{name}_indices")
        assert num.is_contiguous() and ind.is_contiguous(), name
        assert torch.equal(num, getattr(ref, f"{name}_num_blocks"))
        ref_ind = getattr(ref, f"{name}_indices")
        width = torch.arange(ind.shape[-1])
        valid = width < num[..., None]  # entries past the count are unused
        assert torch.equal(ind[valid], ref_ind[valid])
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert getattr(bm, name).is_contiguous(), name


@settings(max_examples=100)
@given(
    nq=st.integers(1, 9),
    nk=st.integers(1, 40),
    p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    transpose=st.booleans(),
)
def test_dense_to_indices_lists_the_selected_blocks_in_order(nq, nk, p, seed, transpose):
    """The search-based tables: counts, then the selected block indices in increasing order,
    then padding that stays a valid block index (the kernels prefetch one entry ahead)."""
    from vmoba_compile.masks import dense_to_indices

    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(2, 3, nq, nk, generator=g) < p
    if transpose:  # the q side hands in a transposed view
        dense = dense.transpose(-1, -2)
    num, idx = dense_to_indices(dense)
    assert num.dtype == idx.dtype == torch.int32 and idx.is_contiguous()
    assert idx.shape == dense.shape
    rows = dense.reshape(-1, dense.shape[-1])
    for row, n, ind in zip(rows, num.flatten(), idx.flatten(0, -2), strict=True):
        want = row.nonzero().flatten()
        assert n.item() == want.numel()
        assert torch.equal(ind[: want.numel()].long(), want)
        assert bool((ind[want.numel() :] == dense.shape[-1] - 1).all())


def test_mask_mod_reads_selections_past_the_first_word():
    """mask_mod reads the selection as 31-column words: a plan with 64 chunks (three words)
    must give the reference mask for keys in every word, with text keys after the last chunk."""
    from vmoba_compile import VideoLayout, VMoBAConfig

    layout = VideoLayout(2, 8, 8, text_tokens=5)
    q, k = qk_inputs(layout, 7)
    for granularity in ("block", "token"):
        config = VMoBAConfig(
            block_size=16, chunk_1d=(1,), chunk_2d=(1, 1), chunk_3d=(1, 2, 2), selection="topk",
            topk=5, granularity=granularity,
        )  # fmt: skip
        plan = plan_for(layout, config, 1)
        assert plan.num_chunks == 64 and plan.columns + 2 > 2 * 31
        bm = selection_of(q, k, layout, config, 1).block_mask
        sp = plan.padded_len
        token_mask = create_mask(bm.mask_mod, q.shape[0], q.shape[1], sp, sp, device="cpu")
        slots = plan.token_slots(q.device)
        mine = token_mask[:, :, slots][:, :, :, slots]
        ref = reference_mask(q, k, layout=layout, config=config, layer_index=1)
        assert torch.equal(mine, ref), f"{granularity}: {(mine != ref).sum().item()} differ"
        # every video key (so chunks of all three words) is attended by some query
        assert bool(ref.any(2).flatten(0, 1).any(0).all())
