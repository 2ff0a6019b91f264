"""TOKEN granularity's query rows sorted per head by selection (``VMoBAConfig.token_order``).

At TOKEN granularity every query token picks its own chunks, and the kernel's block mask is the
union of the choices of the ``block_size`` query rows of a block: in the padded chunk order
neighbouring rows choose differently, so that union is close to every chunk and nearly every
block is partial. Permuting the queries changes no query's output (each row's softmax runs over
its own keys), so each (batch, head) hands its video query rows to the kernel grouped by
selection pattern instead: a block's rows then choose nearly the same chunks, its union
approaches the token density, and whole blocks become full (no ``mask_mod``). Keys and values
keep their order; text query rows (they attend everything) and the rows after the video keep
their slots. The output rows go back by the inverse permutation.

Everything here is static-shaped: the permutation is a sort of a fixed-size key, the gathers
keep every size, so one compiled graph serves every step and no size depends on the data (the
advantage over gathering each chunk's queries into variable-length lists, the MoBA
formulation). The gradient of each gather is the inverse permutation's gather, not a scatter.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["SortedRows", "sort_rows", "sorted_queries", "token_order", "unsort_rows"]

# Selection columns packed into one int64 sort key, the lowest column in the highest bit; bit 62
# of the first key marks padding slots, so that they sort after every real row.
_KEY_BITS = 62


def _keys(sel: torch.Tensor, real: torch.Tensor) -> list[torch.Tensor]:
    """``[B, H, U]`` int64 keys, most significant first: the rows' selection bits, column 0
    highest, ``_KEY_BITS`` columns a key; padding slots get bit 62 of the first key."""
    keys = []
    for lo in range(0, sel.shape[-1], _KEY_BITS):
        bits = sel[..., lo : lo + _KEY_BITS].to(torch.int64)
        shifts = torch.arange(_KEY_BITS - 1, _KEY_BITS - 1 - bits.shape[-1], -1, device=sel.device)
        keys.append((bits << shifts).sum(-1))
    keys[0] = keys[0] + ((~real).to(torch.int64) << _KEY_BITS)
    return keys


def token_order(sel: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Each head's video query slots in lexicographic order of their selection rows.

    Args:
        sel: ``[B, H, U, C]`` bool selection per padded video query slot.
        real: ``[U]`` bool, slots holding real tokens.

    Returns:
        ``[B, H, U]`` int64 permutation: position ``i`` of the sorted rows holds slot
        ``order[..., i]``. Real slots come first (the sorted ``real`` is a prefix), rows with
        equal selections keep their chunk order (stable sorts), and the order is a pure
        function of ``sel`` (ties cannot depend on the sort's implementation).
    """
    keys = _keys(sel, real)
    order = torch.argsort(keys[-1], dim=-1, stable=True)
    for key in reversed(keys[:-1]):  # least significant key first (a radix sort)
        step = torch.argsort(torch.gather(key, -1, order), dim=-1, stable=True)
        order = torch.gather(order, -1, step)
    return order


class SortedRows(NamedTuple):
    """One call's row permutation over the whole padded sequence (``order``, not ``index``:
    a tuple has an ``index`` method).

    Attributes:
        order: ``[B, H, S_pad]`` int64, the padded slot of each sorted row (the video slots
            in the order :func:`sort_rows` picks, every later slot in place).
        inverse: ``[B, H, S_pad]`` int64, the sorted row of each padded slot.
        sel: ``[B, H, U, C]`` the selection in sorted row order.
        q_real: ``[B, H, S_pad]`` bool, sorted rows holding real tokens (a prefix of the video
            rows where the head took the lexicographic order, the keys' own ``real`` where it
            kept the chunk order).
    """

    order: torch.Tensor
    inverse: torch.Tensor
    sel: torch.Tensor
    q_real: torch.Tensor


def _computed_blocks(sel: torch.Tensor, real: torch.Tensor, weight: torch.Tensor, bs: int):
    """``[B, H]`` video key blocks the kernel computes for rows ``sel`` (``[B, H, U, C]``, in
    the order the kernel reads them; ``real``: ``[U]``) given ``weight[c]`` blocks a chunk."""
    b, h, u, c = sel.shape
    union = (sel & real[:, None]).reshape(b, h, u // bs, bs, c).any(3)
    return (union.to(weight.dtype) @ weight).sum(-1)


def sort_rows(
    sel: torch.Tensor, real: torch.Tensor, chunk_blocks: torch.Tensor, block_size: int
) -> SortedRows:
    """The :class:`SortedRows` of selection ``sel`` (``[B, H, U, C]``, ``U`` video slots) over
    a padded sequence whose slots hold real tokens where ``real`` (``[S_pad]``) is True.

    Each head takes the order under which its query blocks' unions cost the fewer key blocks
    (``chunk_blocks``: ``[C]`` blocks of ``block_size`` slots in each chunk):
    :func:`token_order` (padding slots last), or the padded chunk order itself. The
    lexicographic order groups rows well where a row selects a few of a few dozen chunks (1D
    layers); over 100+ chunks (2D, 3D) neighbouring tokens can share more than equal prefixes
    do, and the chunk order stays (docs/design.md, TOKEN granularity).
    """
    b, h, u, _ = sel.shape
    video = real[:u]
    n = video.sum()
    video_real = torch.arange(u, device=sel.device) < n
    weight = chunk_blocks.to(torch.float32)
    lex = token_order(sel, video)
    lex_sel = torch.gather(sel, 2, lex[..., None].expand_as(sel))
    cost_lex = _computed_blocks(lex_sel, video_real, weight, block_size)
    take_lex = cost_lex < _computed_blocks(sel, video, weight, block_size)  # [B, H]
    natural = torch.arange(u, device=sel.device).expand(b, h, -1)
    order = torch.where(take_lex[..., None], lex, natural)
    rest = torch.arange(u, real.shape[0], device=sel.device).expand(b, h, -1)
    index = torch.cat([order, rest], dim=-1)
    inverse = torch.argsort(index, dim=-1)
    sel_sorted = torch.where(take_lex[..., None, None], lex_sel, sel)
    q_real = torch.cat(
        [torch.where(take_lex[..., None], video_real, video), real[u:].expand(b, h, -1)], dim=-1
    )
    return SortedRows(index, inverse, sel_sorted, q_real)


def _take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 2, index[..., None].expand(*index.shape, x.shape[-1]))


class _Rows(torch.autograd.Function):
    """``x[b, h, index[b, h, i]]`` for a permutation ``index``; its gradient is the gather by
    the ``inverse`` permutation (no scatter, see :class:`vmoba_compile.attention._Permute`)."""

    @staticmethod
    def forward(x, index, inverse):
        return _take_rows(x, index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx, grad):
        index, inverse = ctx.saved_tensors
        return _Rows.apply(grad, inverse, index), None, None


def sorted_queries(x: torch.Tensor, rows: SortedRows) -> torch.Tensor:
    """``[B, H, S_pad, D]`` in padded order -> the same rows in sorted order."""
    return _Rows.apply(x, rows.order, rows.inverse)


def unsort_rows(x: torch.Tensor, rows: SortedRows) -> torch.Tensor:
    """Inverse of :func:`sorted_queries`: sorted rows back to their padded slots."""
    return _Rows.apply(x, rows.inverse, rows.order)
