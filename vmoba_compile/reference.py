"""Slow, obviously correct VMoBA: the algorithm written out in the call's own token order.

It shares no selection or mask code with the fast path (only the config, the layout and the chunk
shape resolution): chunks and query blocks come from token coordinates, selection sorts the pairs
literally, the mask is a dense ``[B, H, S, S]`` boolean, attention is SDPA in float64.
Use it in tests and benchmarks on small shapes only.

Ties (exactly equal gates) follow the rule of :mod:`vmoba_compile.selection`: among equal values
the lower index comes first. TOPK ranks a unit's chunks by ``(-gate, chunk)``, the self chunk
first; THRESHOLD walks the non-self pairs of its scope by ``(-normalized gate, flat index)``, the
flat index being the chunk in query scope and ``(unit position, chunk)`` row-major in head scope,
with the units in chunk order (by chunk, then by ``(t, y, x)`` inside the chunk; a query block by
its place in its chunk), not in the call's order. Both are Python sorts on explicit keys, so no
tie order of ``torch.topk`` or ``torch.sort`` is involved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import Granularity, Scope, Selection, VMoBAConfig
from .layout import VideoLayout, resolve_chunk

__all__ = ["reference_mask", "reference_selection", "vmoba_reference"]


def _video_token_units(layout: VideoLayout, chunk: tuple[int, int, int], block_size: int):
    """Per video token (call order): chunk id and query-block id (blocks never span chunks).

    Returns:
        ``(chunk_of, block_of, n_chunks, block_chunk, token_order, block_order)``: ``chunk_of``
        and ``block_of`` per token; the chunk of each block; the tokens and the blocks in chunk
        order (the unit order of head-scope ties).
    """
    ct, cy, cx = chunk
    ny, nx = -(-layout.height // cy), -(-layout.width // cx)
    chunk_of, order_key = [], []
    for t in range(layout.frames):
        for y in range(layout.height):
            for x in range(layout.width):
                cid = ((t // ct) * ny + y // cy) * nx + x // cx
                chunk_of.append(cid)
                # position inside the chunk, in (t, y, x) order
                order_key.append((cid, t, y, x))
    n_chunks = max(chunk_of) + 1
    rank = sorted(range(len(order_key)), key=lambda i: order_key[i])
    pos_in_chunk = [0] * len(order_key)
    count = [0] * n_chunks
    for i in rank:
        pos_in_chunk[i] = count[chunk_of[i]]
        count[chunk_of[i]] += 1
    block_ids: dict[tuple[int, int], int] = {}
    block_of = []
    for i in range(len(order_key)):
        key = (chunk_of[i], pos_in_chunk[i] // block_size)
        block_of.append(block_ids.setdefault(key, len(block_ids)))
    return (
        torch.tensor(chunk_of),
        torch.tensor(block_of),
        n_chunks,
        [key[0] for key in sorted(block_ids, key=lambda b: block_ids[b])],
        rank,
        [block_ids[key] for key in sorted(block_ids)],
    )


def _walk(gn: torch.Tensor, is_self: torch.Tensor, tau: float) -> torch.Tensor:
    """THRESHOLD over one scope (flattened pairs, in tie order): normalized gates to the kept
    pairs, literally."""
    keep = is_self.clone()
    gsum = gn.sum()
    if gsum <= 0:  # every gate equal: nothing to rank by; keep everything
        return torch.ones_like(keep)
    total = float(gsum)
    need = max(0.0, tau - float(gn[is_self].sum()) / total)
    values = gn.tolist()
    others = sorted((~is_self).nonzero().flatten().tolist(), key=lambda j: (-values[j], j))
    acc = 0.0
    for j in others:
        keep[j] = True
        acc += values[j] / total
        if acc >= need:
            break
    return keep


def _topk_row(row: list[float], own: int, k: int) -> list[int]:
    """The ``k`` chunks of one unit: its own first, then by gate descending, lower chunk first."""
    others = sorted((c for c in range(len(row)) if c != own), key=lambda c: (-row[c], c))
    return ([own] + others)[:k]


def reference_selection(
    q: torch.Tensor, k: torch.Tensor, *, layout: VideoLayout, config: VMoBAConfig, layer_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Selection per query unit in the call's order.

    Returns:
        ``(sel, unit_of_token, chunk_of_token)``: ``sel[B, H, U, C]`` bool, and for each video token
        (in call order) its query unit and its chunk.
    """
    q, k = q.detach().cpu(), k.detach().cpu()  # the reference runs on the CPU, in float64
    partition = config.partition_for(layer_index)
    chunk = resolve_chunk(config, partition, layout)
    chunk_of, block_of, n_chunks, block_chunk, token_order, block_order = _video_token_units(
        layout, chunk, config.block_size
    )
    vs, n = layout.video_start, layout.video_tokens
    qv = q[:, :, vs : vs + n].double()
    kv = k[:, :, vs : vs + n].double()
    b, h = q.shape[:2]
    kv = kv.repeat_interleave(h // k.shape[1], dim=1)
    kbar = torch.stack([kv[:, :, chunk_of == c].mean(2) for c in range(n_chunks)], dim=2)
    if config.granularity is Granularity.TOKEN:
        q_units, unit_chunk, unit_of, unit_order = qv, chunk_of, torch.arange(n), token_order
    else:
        nblk = len(block_chunk)
        q_units = torch.stack([qv[:, :, block_of == j].mean(2) for j in range(nblk)], dim=2)
        unit_chunk, unit_of, unit_order = torch.tensor(block_chunk), block_of, block_order
    g = q_units @ kbar.transpose(-1, -2)  # [B, H, U, C]
    u = g.shape[2]
    is_self = torch.zeros(u, n_chunks, dtype=torch.bool)
    is_self[torch.arange(u), unit_chunk] = True
    sel = torch.zeros(b, h, u, n_chunks, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            gg = g[bi, hi]
            if config.selection is Selection.TOPK:
                rows = [[False] * n_chunks for _ in range(u)]
                for ui, (row, own) in enumerate(zip(gg.tolist(), unit_chunk.tolist(), strict=True)):
                    for c in _topk_row(row, own, config.topk):
                        rows[ui][c] = True
                sel[bi, hi] = torch.tensor(rows)
            elif config.threshold >= 1.0:
                sel[bi, hi] = True
            elif config.scope is Scope.HEAD:
                span = gg.max() - gg.min()
                gn = (gg - gg.min()) / (span if span > 1e-6 else 1.0)
                # the flat index of a pair is (unit position in chunk order, chunk), row-major
                order = torch.tensor(unit_order)
                kept = _walk(gn[order].flatten(), is_self[order].flatten(), config.threshold)
                sel[bi, hi, order] = kept.view(u, -1)
            else:
                for ui in range(u):
                    row = gg[ui]
                    span = row.max() - row.min()
                    gn = (row - row.min()) / (span if span > 1e-6 else 1.0)
                    sel[bi, hi, ui] = _walk(gn, is_self[ui], config.threshold)
    return sel, unit_of, chunk_of


def reference_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    layout: VideoLayout,
    config: VMoBAConfig,
    layer_index: int,
    text_key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``[B, H, S, S]`` boolean mask (True = attend) that VMoBA's selection defines."""
    layout.check_seq_len(q.shape[2])
    sel, unit_of, chunk_of = reference_selection(
        q, k, layout=layout, config=config, layer_index=layer_index
    )
    b, h, s = q.shape[0], q.shape[1], q.shape[2]
    vs, n = layout.video_start, layout.video_tokens
    mask = torch.ones(b, h, s, s, dtype=torch.bool)
    # video queries x video keys: the selected chunks only
    mask[:, :, vs : vs + n, vs : vs + n] = sel[:, :, unit_of][:, :, :, chunk_of]
    if text_key_mask is not None:
        ts = layout.text_start
        mask[:, :, :, ts : ts + layout.text_tokens] &= text_key_mask.cpu()[:, None, None, :]
    return mask.to(q.device)


def vmoba_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: VideoLayout,
    config: VMoBAConfig,
    layer_index: int,
    scale: float | None = None,
    text_key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """VMoBA by dense masked SDPA in float64 (returned in the input dtype). Same arguments as
    :func:`~vmoba_compile.vmoba_attention`."""
    mask = reference_mask(
        q.detach().cpu(),
        k.detach().cpu(),
        layout=layout,
        config=config,
        layer_index=layer_index,
        text_key_mask=text_key_mask,
    ).to(q.device)
    out = F.scaled_dot_product_attention(
        q.double(),
        k.double(),
        v.double(),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.to(q.dtype)
