"""TOKEN granularity as (query, chunk) pairs: MoBA's formulation, on FlashAttention-4.

At TOKEN granularity every query row picks its own chunks. A block mask over query blocks computes
the union of its rows' choices (:mod:`vmoba_compile.token_rows` makes that union small by sorting
the rows, which works for a 1D layer's dozen chunks but not for the hundreds of a 2D or 3D
layer). Here each (query, chosen chunk) pair is a row of its own, so the kernel's work is the
token density itself:

1. per (batch, head) the query rows that chose chunk ``c`` are gathered into a group of whole
   query blocks (the last one padded), one group per chunk; one more group, every query row,
   attends the text keys (each key is attended once per query);
2. every gathered block attends exactly its group's key blocks (contiguous in the padded chunk
   order): FA4's block-sparse forward, which returns each row's log-sum-exp;
3. each query's partial outputs merge by their log-sum-exps (the softmax over the union).

The backward needs no forward again: a pair row's gradient is the attention backward of its keys
under the query's *merged* output and log-sum-exp (the split softmax of ring attention), which is
exactly what FA4's block-sparse backward computes when handed them; the query gradient is the sum
of its pairs'.

The pair count depends on the selection, so everything lives inside one opaque custom op per
direction (``vmoba_compile::token_pairs`` and its backward): the caller's graph sees
``[B, H, S_pad, Dv]`` in, the same out, and never a data-dependent size. Heads run in slices
bounded by :data:`PAIR_ROW_BUDGET`, so that a 3D layer's millions of pair rows never exist at
once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .kernels.flash import _train_backward, _train_forward
from .masks import dense_to_indices

__all__ = ["PAIR_ROW_BUDGET", "PairRows", "pair_attention", "pair_inputs", "pair_rows"]

# Gathered rows x heads of one slice (a 2D layer at 55,296 tokens and density 0.2 has ~2.1 M pair
# rows a head): the slice's gathered queries, outputs and merge buffers take ~1.5 KB a row.
PAIR_ROW_BUDGET = 8 * 2**20


class PairRows(NamedTuple):
    """The gathered rows of one slice of heads.

    Attributes:
        slot: ``[B, H, L]`` int64, the padded query slot each gathered row reads (0 on padding).
        live: ``[B, H, L]`` bool, rows that are a real (query, chunk) pair.
        tables: FA4's eight block tables (forward side, then query side) over ``L / bs`` query
            blocks and the keys' blocks.
    """

    slot: torch.Tensor
    live: torch.Tensor
    tables: list[torch.Tensor]


def pair_rows(
    sel: torch.Tensor,
    row_real: torch.Tensor,
    chunk_blocks: torch.Tensor,
    block_ok: torch.Tensor,
    block_full: torch.Tensor,
    num_video_blocks: int,
    num_text_blocks: int,
    block_size: int,
) -> PairRows:
    """The pairs of selection ``sel`` and their block tables.

    Args:
        sel: ``[B, H, R, C]`` bool, query row ``r`` (the ``R`` video and text slots of the padded
            sequence) attends chunk ``c``; rows that are not real are ignored.
        row_real: ``[R]`` bool, slots holding a real token.
        chunk_blocks: ``[C, 2]`` int64, each chunk's first key block and block count.
        block_ok / block_full: ``[B, NK]`` bool, key blocks with some / only valid keys.
        num_video_blocks / num_text_blocks: the padded sequence's video and text blocks.
        block_size: the kernel's block size (query and key).
    """
    b, h, r, c = sel.shape
    bs, device = block_size, sel.device
    sel = sel & row_real[:, None]
    # Group 0 (with text keys): every query row, in place, attends the text blocks.
    base = r // bs if num_text_blocks else 0
    counts = sel.sum(2)  # [B, H, C]
    blocks = (counts + bs - 1) // bs
    ends = base + torch.cumsum(blocks, -1)  # [B, H, C] block after each chunk's group
    starts = ends - blocks
    length = _bucket(int(ends[..., -1].max())) * bs
    slot = torch.zeros(b, h, length, dtype=torch.int64, device=device)
    live = torch.zeros(b, h, length, dtype=torch.bool, device=device)
    if base:
        slot[..., :r] = torch.arange(r, device=device)
        live[..., :r] = row_real
    # The pairs in (b, h, c, r) order: each chunk's rows in slot order, at its group's rows.
    flat = sel.transpose(2, 3).reshape(-1).nonzero().squeeze(1)
    group, row = flat // r, flat % r  # group = (b * H + bh) * C + c
    first = torch.cumsum(counts.reshape(-1), 0) - counts.reshape(-1)
    rank = torch.arange(flat.numel(), device=device) - first[group]
    at = starts.reshape(-1)[group] * bs + rank
    bh = group // c
    slot.view(b * h, length)[bh, at] = row
    live.view(b * h, length)[bh, at] = True

    # Each gathered block's key blocks: the text blocks (group 0), its chunk's, or none.
    nq = length // bs
    j = torch.arange(nq, device=device).expand(b, h, nq)
    chunk = torch.searchsorted(ends.contiguous(), j.contiguous(), right=True).clamp_(max=c - 1)
    lo = chunk_blocks[chunk, 0]
    n = torch.where(j < ends[..., -1:], chunk_blocks[chunk, 1], 0)
    if base:
        text = j < base
        lo = torch.where(text, num_video_blocks, lo)
        n = torch.where(text, num_text_blocks, n)
    kb = torch.arange(block_ok.shape[-1], device=device)
    attends = (kb >= lo[..., None]) & (kb < (lo + n)[..., None]) & block_ok[:, None, None]
    full = attends & block_full[:, None, None]
    partial = attends & ~full
    tables: list[torch.Tensor] = []
    for dense in (partial, full, partial.transpose(-1, -2), full.transpose(-1, -2)):
        tables.extend(dense_to_indices(dense))
    return PairRows(slot, live, tables)


def _bucket(blocks: int) -> int:
    """``blocks`` rounded up to one of a few sizes per power of two (at most 1/8 more), so that
    a kernel specialised on the query length sees few of them; the extra blocks attend no key
    and cost the kernel nothing."""
    step = max(1, 2 ** (max(blocks, 1).bit_length() - 4))
    return -(-max(blocks, 1) // step) * step


def _take(x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 2, slot[..., None].expand(*slot.shape, x.shape[-1]))


def _slices(sel: torch.Tensor, groups: int) -> list[slice]:
    """Query-head slices of whole KV groups with about :data:`PAIR_ROW_BUDGET` gathered rows
    (``sel``: ``[B, H, R, C]``; a head gathers at most its selections plus ``R`` rows)."""
    b, h, r, _ = sel.shape
    rows = b * (int(sel.sum((2, 3)).max()) + r)
    per = max(1, PAIR_ROW_BUDGET // rows) // groups * groups or groups
    return [slice(i, min(i + per, h)) for i in range(0, h, per)]


class _Static(NamedTuple):
    num_video_blocks: int
    num_text_blocks: int
    block_size: int
    scale: float | None
    backend: str


def _slice_rows(sel, meta, st: _Static, hs: slice) -> PairRows:
    row_real, chunk_blocks, block_ok, block_full = meta
    return pair_rows(sel[:, hs], row_real, chunk_blocks, block_ok, block_full,
                     st.num_video_blocks, st.num_text_blocks, st.block_size)  # fmt: skip


def _forward(q, k, v, sel, meta, key_valid, st: _Static):
    b, h, s_pad, _ = q.shape
    r, groups = sel.shape[2], h // k.shape[1]
    out = q.new_zeros(b, h, s_pad, v.shape[-1])
    lse = q.new_full((b, h, s_pad), float("-inf"), dtype=torch.float32)
    for hs in _slices(sel, groups):
        kv = slice(hs.start // groups, hs.stop // groups)
        rows = _slice_rows(sel, meta, st, hs)
        part, part_lse = _train_forward(
            _take(q[:, hs], rows.slot), k[:, kv], v[:, kv], rows.tables, key_valid,
            st.block_size, st.scale, st.backend,
        )  # fmt: skip
        part_lse = part_lse.masked_fill(~rows.live, float("-inf"))
        top = torch.full((b, hs.stop - hs.start, r), float("-inf"), device=q.device)
        top = top.scatter_reduce(2, rows.slot, part_lse, "amax")
        safe = top.masked_fill(top == float("-inf"), 0.0)
        w = torch.exp(part_lse - torch.gather(safe, 2, rows.slot))  # 0 on padding rows
        denom = torch.zeros_like(top).scatter_add_(2, rows.slot, w)
        acc = q.new_zeros(b, hs.stop - hs.start, r, v.shape[-1], dtype=torch.float32)
        idx = rows.slot[..., None].expand(*rows.slot.shape, v.shape[-1])
        acc.scatter_add_(2, idx, part.float() * w[..., None])
        has = denom > 0
        out[:, hs, :r] = (acc / denom.clamp_min(1e-30)[..., None]).to(out.dtype)
        lse[:, hs, :r] = torch.where(has, safe + denom.clamp_min(1e-30).log(), float("-inf"))
    return out, lse


def _backward(q, k, v, out, lse, grad_out, sel, meta, key_valid, st: _Static):
    groups = q.shape[1] // k.shape[1]
    dq = torch.zeros_like(q, dtype=torch.float32)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    for hs in _slices(sel, groups):
        kv = slice(hs.start // groups, hs.stop // groups)
        rows = _slice_rows(sel, meta, st, hs)
        live = rows.live[..., None]
        part_lse = torch.gather(lse[:, hs], 2, rows.slot).masked_fill(~rows.live, float("inf"))
        dqs, dk[:, kv], dv[:, kv] = _train_backward(
            _take(q[:, hs], rows.slot), k[:, kv], v[:, kv], _take(out[:, hs], rows.slot),
            part_lse.contiguous(), (_take(grad_out[:, hs], rows.slot) * live).contiguous(),
            rows.tables, key_valid, st.block_size, st.scale, st.backend,
        )  # fmt: skip
        idx = rows.slot[..., None].expand(*rows.slot.shape, q.shape[-1])
        dq[:, hs].scatter_add_(2, idx, dqs.float())  # 0 on padding rows: their dO' is 0
    return dq.to(q.dtype), dk, dv


@torch.library.custom_op("vmoba_compile::token_pairs", mutates_args=())
def _pairs_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: torch.Tensor,
    meta: list[torch.Tensor],
    key_valid: torch.Tensor,
    num_video_blocks: int,
    num_text_blocks: int,
    block_size: int,
    scale: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    st = _Static(num_video_blocks, num_text_blocks, block_size, scale, backend)
    return _forward(q, k, v, sel, meta, key_valid, st)


@_pairs_op.register_fake
def _(q, k, v, sel, meta, key_valid, nvb, ntb, block_size, scale, backend):
    b, h, s, _ = q.shape
    return q.new_empty(b, h, s, v.shape[-1]), q.new_empty(b, h, s, dtype=torch.float32)


@torch.library.custom_op("vmoba_compile::token_pairs_backward", mutates_args=())
def _pairs_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    sel: torch.Tensor,
    meta: list[torch.Tensor],
    key_valid: torch.Tensor,
    num_video_blocks: int,
    num_text_blocks: int,
    block_size: int,
    scale: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    st = _Static(num_video_blocks, num_text_blocks, block_size, scale, backend)
    return _backward(q, k, v, out, lse, grad_out, sel, meta, key_valid, st)


@_pairs_backward_op.register_fake
def _(q, k, v, out, lse, grad_out, sel, meta, key_valid, nvb, ntb, block_size, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, sel, meta, key_valid, *static = inputs
    ctx.static, ctx.n_meta = static, len(meta)
    ctx.save_for_backward(q, k, v, output[0], output[1], sel, key_valid, *meta)
    ctx.mark_non_differentiable(output[1])


def _backward_rule(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, sel, key_valid, *meta = ctx.saved_tensors
    dq, dk, dv = _pairs_backward_op(q, k, v, out, lse, grad_out.contiguous(), sel, meta,
                                    key_valid, *ctx.static)  # fmt: skip
    return dq, dk, dv, None, [None] * ctx.n_meta, None, None, None, None, None, None


_pairs_op.register_autograd(_backward_rule, setup_context=_setup_context)


def pair_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: torch.Tensor,
    *,
    real: torch.Tensor,
    chunk_blocks: torch.Tensor,
    key_valid: torch.Tensor,
    num_video_blocks: int,
    num_text_blocks: int,
    block_size: int,
    scale: float | None,
    backend: str = "FLASH",
) -> torch.Tensor:
    """TOKEN-granularity VMoBA attention of permuted ``q`` / ``k`` / ``v`` as (query, chunk)
    pairs, forward and backward.

    Args:
        q: ``[B, H, S_pad, D]`` in padded chunk order; ``k`` / ``v``: ``[B, Hkv, S_pad, D(v)]``.
        sel: ``[B, H, U, C]`` bool per video query slot (``U = num_video_blocks * block_size``);
            text query rows attend every chunk.
        real: ``[S_pad]`` bool, slots holding a real token (``PlanIndex.real``).
        chunk_blocks: ``[C, 2]`` int64, each chunk's first key block and block count.
        key_valid: ``[B, S_pad]`` bool, keys any query may attend (real, not masked text).
        scale: softmax scale (None: ``1 / sqrt(D)``).
        backend: ``"FLASH"`` (FA4) or ``"DEFAULT"``: the float64 stand-in of
            :mod:`vmoba_compile.kernels.flash` (CPU tests of the formulation).

    Returns:
        ``[B, H, S_pad, Dv]``; rows of padding slots are 0.
    """
    sel, meta = pair_inputs(sel, real, chunk_blocks, key_valid, num_video_blocks,
                            num_text_blocks, block_size)  # fmt: skip
    scale = None if scale is None else float(scale)
    out, _ = _pairs_op(q.contiguous(), k.contiguous(), v.contiguous(), sel, meta,
                       key_valid.contiguous(), num_video_blocks, num_text_blocks, block_size,
                       scale, backend)  # fmt: skip
    return out


def pair_inputs(
    sel: torch.Tensor,
    real: torch.Tensor,
    chunk_blocks: torch.Tensor,
    key_valid: torch.Tensor,
    num_video_blocks: int,
    num_text_blocks: int,
    block_size: int,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The selection over every query row (text rows attend every chunk) and the tensors
    :func:`pair_rows` reads after it (``row_real``, ``chunk_blocks``, ``block_ok``,
    ``block_full``), from :func:`pair_attention`'s arguments."""
    b, h, u, c = sel.shape
    r = (num_video_blocks + num_text_blocks) * block_size
    if r > u:
        sel = torch.cat([sel, sel.new_ones(b, h, r - u, c)], dim=2)
    blocks = key_valid.reshape(b, -1, block_size)
    return sel.contiguous(), [real[:r].contiguous(), chunk_blocks, blocks.any(-1), blocks.all(-1)]


def chunk_block_ranges(onehot: torch.Tensor) -> torch.Tensor:
    """``[C, 2]`` int64 first block and block count of each chunk from ``PlanIndex.onehot``
    (``[NB_video, C]``; each chunk's blocks are contiguous in the padded chunk order)."""
    count = onehot.sum(0).to(torch.int64)
    first = torch.cumsum(count, 0) - count
    return torch.stack([first, count], dim=1)
