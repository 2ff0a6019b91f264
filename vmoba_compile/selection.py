"""Chunk keys, gates and block selection.

Pure tensor functions: static shapes, no host syncs, no scatter. A selection is a boolean tensor
``sel[B, H, U, C]``: query unit ``u`` of head ``h`` attends chunk ``c``. Units are query blocks
(BLOCK granularity) or query tokens (TOKEN granularity) in the padded, permuted order of
:class:`~vmoba_compile.layout.ChunkPlan`: chunk by chunk, and inside a chunk in ``(t, y, x)``
order. ``unit_real[U]`` marks units that hold real tokens and ``is_self[U, C]`` marks each unit's
own chunk. Every unit always keeps its self chunk.

Ties (exactly equal gates, e.g. all-zero query rows or repeated keys) are broken by one
deterministic rule, the same eagerly, compiled and on any device, and the same as
:mod:`vmoba_compile.reference`: among equal values the lower index comes first. TOPK ranks the
chunks of a unit by (gate descending, chunk index ascending), the self chunk first. THRESHOLD
walks the non-self pairs of its scope by (normalized gate descending, flat index ascending),
where the flat index is the chunk index in query scope and ``unit * C + chunk`` in head scope
(units in the order above). Neither relies on the tie order of ``torch.topk`` or an unstable sort,
which no backend guarantees: TOPK uses a stable sort or an explicit comparison count, THRESHOLD
turns its cut into a value and breaks ties at the cut with a count of equal values before each
pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _compat
from .config import Scope, Selection, VMoBAConfig

__all__ = ["chunk_keys", "gates", "select"]


def chunk_keys(
    k_pad: torch.Tensor, block_onehot: torch.Tensor, chunk_sizes: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Mean key of each chunk, in float32.

    Args:
        k_pad: ``[B, Hkv, S_pad, D]`` keys in padded chunk order, zeros in padding slots.
        block_onehot: ``[NB_video, C]`` float32, 1 where video block ``j`` belongs to chunk ``c``.
        chunk_sizes: ``[C]`` real tokens per chunk.
        block_size: tokens per block.

    Returns:
        ``[B, Hkv, C, D]`` float32.
    """
    b, h, _, d = k_pad.shape
    nvb = block_onehot.shape[0]
    block_sum = k_pad[:, :, : nvb * block_size].float().reshape(b, h, nvb, block_size, d).sum(3)
    chunk_sum = torch.einsum("bhnd,nc->bhcd", block_sum, block_onehot)
    return chunk_sum / chunk_sizes.to(torch.float32)[:, None]


def gates(q_units: torch.Tensor, kbar: torch.Tensor) -> torch.Tensor:
    """``g[b, h, u, c] = q_u . kbar_c`` in float32 (no softmax scale: nothing depends on it).

    ``q_units`` is ``[B, H, U, D]``; ``kbar`` is ``[B, Hkv, C, D]`` and is shared by the
    ``H // Hkv`` query heads of each KV head (GQA).
    """
    h, hkv = q_units.shape[1], kbar.shape[1]
    if h != hkv:
        kbar = kbar.repeat_interleave(h // hkv, dim=1)
    return torch.matmul(q_units.float(), kbar.transpose(-1, -2))


# Rows up to this long are ranked by pairwise comparison under compilation instead of sorted:
# inductor turns a sort of at most 512 elements into a Triton bitonic network whose compile is
# slow (a 512-wide table sort: 62 s for one kernel, benchmarks/README.md), while a comparison
# matrix is one plain reduction kernel; longer rows go to aten's sort, which compiles nothing.
_PAIRWISE_MAX = 1024


def _pairwise(n: int) -> bool:
    """Rank rows of ``n`` elements by comparison: only under compilation (eager, the
    ``[..., n, n]`` comparison matrix would be materialized; a TOKEN-granularity call at 55K
    tokens would need gigabytes) and only for rows short enough."""
    return _compat.is_compiling() and n <= _PAIRWISE_MAX


def _descending_rank(x: torch.Tensor, pairwise: bool) -> torch.Tensor:
    """Position of each element of the last dim in a descending sort of its row, equal values
    in index order (``stable=True`` is a documented guarantee of ``torch.sort``; the comparison
    count states the rule itself)."""
    if not pairwise:
        return torch.argsort(torch.argsort(x, dim=-1, descending=True, stable=True), dim=-1)
    n = x.shape[-1]
    other, me = x[..., None, :], x[..., :, None]
    pos = torch.arange(n, device=x.device)
    earlier = pos[None, :] < pos[:, None]  # [me, other]: the other element comes first
    return ((other > me) | ((other == me) & earlier)).sum(-1)


def _topk(g: torch.Tensor, is_self: torch.Tensor, k: int) -> torch.Tensor:
    # Rank with the self chunk forced first, then compare ranks: exactly k per unit even with
    # tied gates (the lower chunk index wins a tie), and no scatter: compiled on CPU torch 2.13,
    # a mask_mod that read a selection built by scatter gave wrong results, one built by a
    # comparison was right.
    g = torch.where(is_self, torch.full_like(g, float("inf")), g)
    return _descending_rank(g, _pairwise(g.shape[-1])) < k


def _cumsum_last(x: torch.Tensor, tile: int = 1024) -> torch.Tensor:
    """cumsum over the last dim as two short scans.

    Inductor's split scan for one long row (32K elements, TOKEN granularity with head scope)
    failed to generate code on the H100 (torch 2.11: ``TypeError: list indices must be integers
    or slices, not NoneType``); tiles of 1024 plus a scan over tile totals avoid it.
    """
    n = x.shape[-1]
    if n <= tile:
        return torch.cumsum(x, dim=-1)
    pad = -n % tile
    xt = F.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, tile)
    inner = torch.cumsum(xt, dim=-1)
    carry = torch.cumsum(inner[..., -1], dim=-1) - inner[..., -1]
    return (inner + carry[..., None]).reshape(*x.shape[:-1], n + pad)[..., :n]


def _threshold(
    g: torch.Tensor, is_self: torch.Tensor, unit_real: torch.Tensor, tau: float, scope: Scope
) -> torch.Tensor:
    b, h, u, c = g.shape
    valid = unit_real[:, None].expand(u, c)
    dims = (-1,) if scope is Scope.QUERY else (-2, -1)
    big = torch.finfo(g.dtype).max
    gmin = torch.where(valid, g, big).amin(dim=dims, keepdim=True)
    gmax = torch.where(valid, g, -big).amax(dim=dims, keepdim=True)
    span = gmax - gmin
    span = torch.where(span <= 1e-6, torch.ones_like(span), span)
    gn = torch.where(valid, (g - gmin) / span, torch.zeros_like(g))
    total = gn.sum(dim=dims, keepdim=True)
    own = torch.where(is_self, gn, torch.zeros_like(gn)).sum(dim=dims, keepdim=True)
    has_mass = total > 0
    safe_total = torch.where(has_mass, total, torch.ones_like(total))
    # All normalized gates zero (every gate equal): nothing to rank by, so keep everything.
    need = torch.clamp(tau - torch.where(has_mass, own / safe_total, torch.zeros_like(own)), min=0)
    # Candidates are the non-self pairs of real units; the rest rank last with value -1.
    cand = valid & ~is_self
    flat = torch.where(cand, gn, torch.full_like(gn, -1.0))
    if scope is Scope.HEAD:
        flat = flat.reshape(b, h, 1, u * c)
    # Walk down the candidates by (value descending, flat index ascending): keep positions up
    # to and including the first whose accumulated share reaches `need`, i.e. every position
    # whose share *before* it is still short; the first is always kept (a quirk of the authors'
    # walk, kept). The selection is a comparison, not a scatter back through the sort order.
    if _pairwise(flat.shape[-1]):
        # The same walk without a sort: the pairs before an element are the larger values and
        # the equal values at lower flat indices. A candidate is kept when their share is still
        # short of `need`, or when no pair comes before it (the first position).
        n = flat.shape[-1]
        other, me = flat[..., None, :], flat[..., :, None]
        pos = torch.arange(n, device=flat.device)
        earlier = pos[None, :] < pos[:, None]  # [me, other]: the other pair has the lower index
        ahead = (other > me) | ((other == me) & earlier)
        share = torch.clamp(flat, min=0) / safe_total
        before = torch.where(ahead, share[..., None, :], torch.zeros_like(share[..., None, :]))
        first = ~ahead.any(-1)
        keep = first | (before.sum(-1) < need)
    else:
        # The sorted values fix how many pairs are kept (ties do not change the values), and so
        # a cut value: every pair above the cut is kept, and of the pairs equal to it the ones
        # with the lowest flat indices, as many as the count leaves room for.
        vals = torch.sort(flat, dim=-1, descending=True).values
        share = torch.clamp(vals, min=0) / safe_total
        before = _cumsum_last(share) - share  # share accumulated before each position
        n_keep = torch.clamp((before < need).sum(dim=-1, keepdim=True), min=1)
        cut = torch.gather(vals, -1, n_keep - 1)
        above, tied = flat > cut, flat == cut
        room = n_keep - above.sum(dim=-1, keepdim=True)
        tied_n = tied.to(torch.int32)
        tied_before = _cumsum_last(tied_n) - tied_n  # equal pairs at lower flat indices
        keep = above | (tied & (tied_before < room))
    if scope is Scope.HEAD:
        keep = keep.reshape(b, h, u, c)
    return (cand & keep) | is_self


def select(
    g: torch.Tensor, is_self: torch.Tensor, unit_real: torch.Tensor, config: VMoBAConfig
) -> torch.Tensor:
    """Select chunks for every query unit.

    Args:
        g: ``[B, H, U, C]`` float32 gates.
        is_self: ``[U, C]`` bool, each unit's own chunk.
        unit_real: ``[U]`` bool, units holding at least one real token (padding units are left
            out of THRESHOLD budgets and select only their self chunk).
        config: selection mode, ``topk``, ``threshold`` and ``scope``.

    Returns:
        ``[B, H, U, C]`` bool selection; the self chunk is always True.
    """
    if config.keeps_all_chunks(g.shape[-1]):
        return torch.ones_like(g, dtype=torch.bool)
    if config.selection is Selection.TOPK:
        sel = _topk(g, is_self, config.topk)
    else:
        sel = _threshold(g, is_self, unit_real, config.threshold, config.scope)
    return sel & unit_real[:, None] | is_self
