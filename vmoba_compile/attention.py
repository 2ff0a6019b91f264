"""``vmoba_attention``: permute -> select -> BlockMask -> flex_attention -> unpermute (TOKEN
granularity: the query rows sorted per head around the kernel, :mod:`vmoba_compile.token_rows`).

The only caller of ``flex_attention`` in the package. Shape legend: B batch, H query heads, Hkv
key/value heads (GQA when ``Hkv < H``), S tokens in the call, D head dim.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from . import _compat
from .config import Granularity, Kernel, Partition, TokenOrder, VMoBAConfig
from .kernels import KernelChoice, choose_kernel, flash_block_sparse, kernel_input
from .layout import ChunkPlan, LayerPlan, PlanIndex, VideoLayout, make_plan, resolve_chunk
from .masks import build_block_mask, mask_pieces, plan_index, text_key_ok
from .selection import chunk_keys, gates, select
from .token_pairs import chunk_block_ranges, pair_attention
from .token_rows import SortedRows, sort_rows, sorted_queries, unsort_rows

__all__ = [
    "BlockPlan",
    "kernel_for",
    "layer_plan",
    "permute",
    "kernel_mask",
    "plan_blocks",
    "plan_for",
    "text_key_mask_from_padding",
    "unpermute",
    "vmoba_attention",
]


def plan_for(layout: VideoLayout, config: VMoBAConfig, layer_index: int) -> ChunkPlan:
    """The chunk plan that layer ``layer_index`` uses on ``layout``.

    Every partition of ``config.schedule`` gets the same block count and selection-table width
    on one layout (the plans with fewer blocks end in all-padding blocks, those with fewer chunks
    in never-selected columns), so that every layer hands the attention kernel inputs of the same
    shapes: one kernel to compile for the model.
    """
    return _schedule_plans(layout, config)[config.partition_for(layer_index)]


@functools.lru_cache(maxsize=256)
def _schedule_plans(layout: VideoLayout, config: VMoBAConfig) -> dict:
    bs = config.block_size
    chunks = {p: resolve_chunk(config, p, layout) for p in dict.fromkeys(config.schedule)}
    plans = {p: make_plan(layout, chunk, bs) for p, chunk in chunks.items()}
    blocks = max(plan.num_blocks for plan in plans.values())
    columns = max(plan.num_chunks for plan in plans.values())
    return {
        p: make_plan(layout, chunks[p], bs, blocks - plan.num_blocks, columns - plan.num_chunks)
        for p, plan in plans.items()
    }


def layer_plan(layout: VideoLayout, config: VMoBAConfig, layer_index: int) -> LayerPlan:
    """:func:`plan_for` of one layer, as one constant for Dynamo.

    Dynamo traces through ``functools.lru_cache`` wrappers, so a model compiled around
    :func:`vmoba_attention` would re-run the chunk-shape search and the plan construction
    bytecode by bytecode for every layer: 20 s of tracing per call at 55K tokens on this
    machine's CPU, against 0.2 s to run them. :func:`_layer_plan_constant` is marked as a
    constant result: Dynamo runs it natively and keeps its value. Its arguments are plain
    constants: torch 2.11's Dynamo cannot hand it frozen dataclasses, and a layer index that
    Dynamo made dynamic (a function compiled for several layers) is a symbol, not a constant.
    The layer's partition is a constant in both cases (picking it from the schedule pins the
    index), and it is all the plan depends on.
    """
    partition = config.partition_for(layer_index).value
    pos = layout.text_position.value
    layout_key = (layout.frames, layout.height, layout.width, layout.text_tokens, pos)
    schedule = tuple(p.value for p in config.schedule)
    plan_key = (schedule, config.chunk_1d, config.chunk_2d, config.chunk_3d, config.block_size,
                config.target_chunk_blocks)  # fmt: skip
    return LayerPlan(*_layer_plan_constant(layout_key, plan_key, partition))


@torch.compiler.assume_constant_result
def _layer_plan_constant(layout_key: tuple, plan_key: tuple, partition: str) -> tuple:
    return tuple(_layer_plan(layout_key, plan_key, partition))


@functools.lru_cache(maxsize=1024)
def _layer_plan(layout_key: tuple, plan_key: tuple, partition: str) -> LayerPlan:
    layout = VideoLayout(*layout_key)
    schedule, chunk_1d, chunk_2d, chunk_3d, block_size, target_chunk_blocks = plan_key
    config = VMoBAConfig(
        schedule=schedule, chunk_1d=chunk_1d, chunk_2d=chunk_2d, chunk_3d=chunk_3d,
        block_size=block_size, target_chunk_blocks=target_chunk_blocks,
    )  # fmt: skip
    p = _schedule_plans(layout, config)[Partition(partition)]
    return LayerPlan(
        p.key, p.block_size, p.num_chunks, p.num_blocks, p.num_video_blocks, p.num_text_blocks,
        p.num_pad_blocks, p.video_padded, p.is_identity, p.columns,
    )  # fmt: skip


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: VideoLayout,
    config: VMoBAConfig,
    text_key_mask: torch.Tensor | None,
) -> None:
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a VideoLayout; got {type(layout).__name__}.")
    if not isinstance(config, VMoBAConfig):
        raise TypeError(f"config must be a VMoBAConfig; got {type(config).__name__}.")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be [B, H, S, D] (4 dims); got shape {tuple(t.shape)}. "
                f"Models that hold [B, S, H, D] should pass x.transpose(1, 2)."
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor; got {t.dtype}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}.")
    bq, h, s, d = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != bq:
        raise ValueError(
            f"k and v must be [B, Hkv, S, *] with q's B={bq}; got k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}."
        )
    if k.shape[-1] != d:
        raise ValueError(f"k must have q's head dim {d}; got {k.shape[-1]}.")
    if k.shape[2] != s:
        raise ValueError(
            f"VMoBA is self-attention: q and k must have the same length; got S_q={s}, "
            f"S_kv={k.shape[2]}. Leave cross-attention dense."
        )
    if h % k.shape[1]:
        raise ValueError(
            f"query heads ({h}) must be a multiple of key/value heads ({k.shape[1]}) for GQA."
        )
    layout.check_seq_len(s)
    if text_key_mask is not None:
        want = (bq, layout.text_tokens)
        if text_key_mask.dtype != torch.bool or tuple(text_key_mask.shape) != want:
            raise ValueError(
                f"text_key_mask must be a bool tensor of shape [B, L] = {want} (True = attend); "
                f"got {text_key_mask.dtype} {tuple(text_key_mask.shape)}."
            )


def text_key_mask_from_padding(mask: torch.Tensor, layout: VideoLayout, batch: int) -> torch.Tensor:
    """A ``[B or 1, 1, 1, S]`` bool key-padding mask whose video part is all True
    (HunyuanVideo) -> the ``[B, L]`` ``text_key_mask`` of its text part."""
    lo, n = layout.text_start, layout.text_tokens
    return mask.reshape(mask.shape[0], layout.seq_len)[:, lo : lo + n].expand(batch, n)


def _dense(q, k, v, layout, scale, text_key_mask):
    mask = None
    if text_key_mask is not None:
        b, s = q.shape[0], q.shape[2]
        ones = torch.ones(b, layout.video_tokens, dtype=torch.bool, device=q.device)
        parts = [text_key_mask, ones] if layout.video_start else [ones, text_key_mask]
        mask = torch.cat(parts, dim=1).reshape(b, 1, 1, s)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def _run_flex(q, k, v, block_mask, scale, kernel_options=None):
    # The layout the flex kernel of this device reads correctly (a fused projection's views are
    # not, on CPU); a no-op for the tensors the permutation wrote.
    q, k, v = (kernel_input(x, Kernel.TRITON) for x in (q, k, v))
    kw = dict(block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if kernel_options is not None:
        kw["kernel_options"] = kernel_options
    if torch.compiler.is_dynamo_compiling():
        return flex_attention(q, k, v, **kw)  # Dynamo puts the flex op in its graph
    if _compat.is_compiling():  # AOTAutograd / make_fx outside Dynamo: no nested compile
        return _compat.flex_attention_in_trace(q, k, v, block_mask, scale, kernel_options)
    if q.device.type == "cuda":
        return _compat.compiled_flex_attention()(q, k, v, **kw)
    return flex_attention(q, k, v, **kw)


def _gather_slots(x: torch.Tensor, token: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    g = torch.index_select(x, 2, token)
    return torch.where(real[:, None], g, torch.zeros((), dtype=x.dtype, device=x.device))


def _save_indices(ctx, inputs, output):
    """``setup_context`` of both directions: the backward needs only the index tensors."""
    ctx.save_for_backward(*inputs[1:])


class _Permute(torch.autograd.Function):
    """Call order -> padded chunk order. The two orders are one bijection between tokens and
    real slots, so the backward of each direction is the other direction's gather: no
    ``index_add`` (an atomic scatter, or for bf16 under inductor a sort-based aten fallback)."""

    @staticmethod
    def forward(x, token, real, slots):
        return _gather_slots(x, token, real)

    setup_context = staticmethod(_save_indices)

    @staticmethod
    def backward(ctx, grad):
        token, real, slots = ctx.saved_tensors
        return _Unpermute.apply(grad, token, real, slots), None, None, None


class _Unpermute(torch.autograd.Function):
    """Padded chunk order -> call order; padding slots get no gradient (see :class:`_Permute`)."""

    @staticmethod
    def forward(x, token, real, slots):
        return torch.index_select(x, 2, slots)

    setup_context = staticmethod(_save_indices)

    @staticmethod
    def backward(ctx, grad):
        token, real, slots = ctx.saved_tensors
        return _Permute.apply(grad, token, real, slots), None, None, None


def permute(
    x: torch.Tensor, plan: ChunkPlan | LayerPlan, idx: PlanIndex | None = None
) -> torch.Tensor:
    """``[B, H, S, D]`` in call order -> ``[B, H, S_pad, D]`` in padded chunk order (zero pads).

    ``idx`` (``plan_index(plan, device)``) lets one call share the index tensors. The
    gradient is :func:`unpermute` of the incoming gradient (a gather, not a scatter).
    """
    if plan.is_identity:
        return x
    idx = idx if idx is not None else plan_index(plan, x.device)
    return _Permute.apply(x, idx.token, idx.real, idx.slots)


def unpermute(
    x: torch.Tensor, plan: ChunkPlan | LayerPlan, idx: PlanIndex | None = None
) -> torch.Tensor:
    """Inverse of :func:`permute`: ``[B, H, S_pad, D]`` -> ``[B, H, S, D]`` in call order; its
    gradient is :func:`permute` of the incoming gradient (zero on padding slots)."""
    if plan.is_identity:
        return x
    idx = idx if idx is not None else plan_index(plan, x.device)
    return _Unpermute.apply(x, idx.token, idx.real, idx.slots)


@dataclasses.dataclass
class BlockPlan:
    """What one call selected (for tests, benchmarks and the demo's pictures).

    Attributes:
        plan: the chunk plan of the call's partition.
        sel: ``[B, H, U, C]`` bool selection per query unit (block or padded token slot).
        unit_real: ``[U]`` bool, units holding real tokens.
        is_self: ``[U, C]`` bool, each unit's own chunk.
        block_mask: the FlexAttention mask over the padded sequence.
    """

    plan: ChunkPlan | LayerPlan
    sel: torch.Tensor
    unit_real: torch.Tensor
    is_self: torch.Tensor
    block_mask: BlockMask


def plan_blocks(
    qp: torch.Tensor,
    kp: torch.Tensor,
    plan: ChunkPlan | LayerPlan,
    config: VMoBAConfig,
    text_key_mask: torch.Tensor | None = None,
    idx: PlanIndex | None = None,
    q_tables: bool = True,
) -> BlockPlan:
    """Chunk keys, gates, selection and BlockMask from permuted ``qp`` / ``kp``.

    ``q_tables``: see :func:`~vmoba_compile.masks.build_block_mask`.
    """
    idx = idx if idx is not None else plan_index(plan, qp.device)
    sel, unit_real, is_self = _select(qp, kp, plan, config, idx)
    token_level = config.granularity is Granularity.TOKEN
    bm = build_block_mask(
        plan, idx, sel, token_level=token_level, text_key_mask=text_key_mask, q_tables=q_tables
    )
    return BlockPlan(plan, sel, unit_real, is_self, bm)


def _select(qp, kp, plan, config, idx):
    """``(sel, unit_real, is_self)`` of permuted ``qp`` / ``kp`` (see :class:`BlockPlan`)."""
    device, bs = qp.device, plan.block_size
    nvb, nv, onehot = plan.num_video_blocks, plan.video_padded, idx.onehot
    kbar = chunk_keys(kp, onehot, idx.sizes, bs)
    if config.granularity is Granularity.BLOCK:
        b, h, _, d = qp.shape
        qsum = qp[:, :, :nv].float().reshape(b, h, nvb, bs, d).sum(3)
        q_units = qsum / idx.block_count[:nvb].to(torch.float32)[:, None]
        is_self = onehot.bool()
        unit_real = torch.ones(nvb, dtype=torch.bool, device=device)
    else:
        q_units = qp[:, :, :nv]
        is_self = onehot.bool().repeat_interleave(bs, dim=0)
        unit_real = idx.real[:nv]
    return select(gates(q_units, kbar), is_self, unit_real, config), unit_real, is_self


def kernel_for(
    q: torch.Tensor,
    v: torch.Tensor,
    config: VMoBAConfig,
    layer_index: int,
    backward: bool,
    seq_len: int | None = None,
) -> KernelChoice:
    """The kernel of a VMoBA call on these inputs: the pass decides it once where it rewrites
    the call and hands it to :func:`vmoba_attention` (``kernel=``); a direct call of the op
    decides it here.

    ``seq_len``: the tokens the attention will see, where they differ from ``q``'s (under
    Ulysses context parallelism the rank holds ``S / P`` of them and attends over ``S``).
    """
    if seq_len is None and isinstance(q.shape[2], int):
        seq_len = q.shape[2]
    return choose_kernel(
        config,
        config.partition_for(layer_index),
        device=q.device,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        head_dim_v=v.shape[-1],
        backward=backward,
        seq_len=seq_len,
    )


def vmoba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: VideoLayout,
    config: VMoBAConfig,
    layer_index: int,
    scale: float | None = None,
    text_key_mask: torch.Tensor | None = None,
    kernel: KernelChoice | None = None,
) -> torch.Tensor:
    """VMoBA self-attention over a video (plus text) sequence.

    Args:
        q: ``[B, H, S, D]`` queries.
        k: ``[B, Hkv, S, D]`` keys (``H % Hkv == 0``; GQA shares one KV head among ``H/Hkv``).
        v: ``[B, Hkv, S, Dv]`` values.
        layout: the token grid; ``layout.seq_len`` must equal ``S``.
        config: VMoBA configuration.
        layer_index: index of this layer among the rewritten layers; picks the partition
            ``config.schedule[layer_index % len(config.schedule)]``.
        scale: softmax scale, default ``1 / sqrt(D)``.
        text_key_mask: optional ``[B, L]`` bool, False for text keys that no query may attend
            (text padding, HunyuanVideo style).
        kernel: the kernel decided for this call (:func:`kernel_for`); the pass passes the one
            its report names. None: decided here.

    Returns:
        ``[B, H, S, Dv]`` in the input dtype.
    """
    _check_inputs(q, k, v, layout, config, text_key_mask)
    plan = layer_plan(layout, config, layer_index)
    if config.keeps_all_chunks(plan.num_chunks):
        # Every chunk is kept: exactly dense attention, where cuDNN/flash beat flex.
        return _dense(q, k, v, layout, scale, text_key_mask)

    # The same test as FlexAttention's own for whether a backward will run.
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    choice = kernel if kernel is not None else kernel_for(q, v, config, layer_index, backward)
    if not choice.possible:
        raise RuntimeError(f"VMoBA layer {layer_index}: {choice.reason}. Use kernel='auto'.")
    idx = plan_index(plan, q.device)
    qp, kp, vp = (permute(x, plan, idx) for x in (q, k, v))
    rows, sel = _kernel_selection(qp, kp, plan, config, idx, _pairs(config, choice))
    if rows is not None:
        qp = sorted_queries(qp, rows)
    out = _block_sparse(qp, kp, vp, plan, idx, sel, choice, config, scale, text_key_mask,
                        backward, None if rows is None else rows.q_real)  # fmt: skip
    if rows is not None:
        out = unsort_rows(out, rows)
    return unpermute(out, plan, idx)


def kernel_mask(
    qp: torch.Tensor,
    kp: torch.Tensor,
    plan: ChunkPlan | LayerPlan,
    config: VMoBAConfig,
    idx: PlanIndex,
    text_key_mask: torch.Tensor | None = None,
    q_tables: bool = True,
) -> tuple[SortedRows | None, BlockMask]:
    """The query rows' order (None: the padded chunk order) and the FlexAttention mask the op
    hands the kernel for permuted ``qp`` / ``kp`` (with ``token_order="sorted"`` the mask is
    over the sorted rows; :func:`plan_blocks`'s mask is always in chunk order). A
    ``token_order="pairs"`` call on FA4 reads no such mask (:mod:`vmoba_compile.token_pairs`);
    on a FlexAttention kernel it reads the sorted rows' one, returned here."""
    rows, sel = _kernel_selection(qp, kp, plan, config, idx, pairs=False)
    q_real = None if rows is None else rows.q_real
    bm = build_block_mask(plan, idx, sel, **_mask_kwargs(config, text_key_mask, q_tables, q_real))
    return rows, bm


def _pairs(config: VMoBAConfig, choice: KernelChoice) -> bool:
    """Whether the call runs as (query, chunk) pairs (TOKEN granularity, ``token_order=
    "pairs"``, on FA4)."""
    return (
        config.granularity is Granularity.TOKEN
        and config.token_order is TokenOrder.PAIRS
        and choice.kernel is Kernel.FLASH
    )


def _kernel_selection(
    qp: torch.Tensor, kp: torch.Tensor, plan: ChunkPlan | LayerPlan, config: VMoBAConfig,
    idx: PlanIndex, pairs: bool,
) -> tuple[SortedRows | None, torch.Tensor]:  # fmt: skip
    """The selection in the rows the kernel reads: with TOKEN granularity and
    ``token_order="sorted"`` (or ``"pairs"`` on a FlexAttention kernel, ``pairs`` False) the
    query rows' sorted order and the selection on them, else None and the selection in the
    padded chunk order."""
    sel = _select(qp, kp, plan, config, idx)[0]
    order = config.token_order
    if config.granularity is Granularity.TOKEN and (
        order is TokenOrder.SORTED or (order is TokenOrder.PAIRS and not pairs)
    ):
        rows = sort_rows(sel, idx.real, idx.onehot.sum(0), plan.block_size)
        return rows, rows.sel
    return None, sel


def _mask_kwargs(config: VMoBAConfig, text_key_mask, q_tables: bool, q_real) -> dict:
    """The mask builders' keyword arguments (:func:`~vmoba_compile.masks.mask_pieces`)."""
    token_level = config.granularity is Granularity.TOKEN
    return dict(token_level=token_level, text_key_mask=text_key_mask, q_tables=q_tables,
                q_real=q_real)  # fmt: skip


def _block_sparse(qp, kp, vp, plan, idx, sel, choice, config, scale, text_key_mask, backward,
                  q_real):  # fmt: skip
    """The block-sparse attention of permuted ``qp`` / ``kp`` / ``vp`` under selection ``sel``
    on the chosen kernel; ``q_real``: see :func:`~vmoba_compile.masks.mask_pieces`."""
    if _pairs(config, choice):
        return _pair_attention(qp, kp, vp, plan, idx, sel, text_key_mask, scale)
    kw = _mask_kwargs(config, text_key_mask, backward, q_real)
    if choice.kernel is Kernel.FLASH:
        pieces = mask_pieces(plan, idx, sel, **kw)
        return flash_block_sparse(qp, kp, vp, pieces, scale, slot_real=idx.real)
    bm = build_block_mask(plan, idx, sel, **kw)
    return _run_flex(qp, kp, vp, bm, scale, config.flex_kernel_options(qp.device.type, backward))


def _pair_attention(qp, kp, vp, plan, idx, sel, text_key_mask, scale, backend="FLASH"):
    """TOKEN granularity as (query, chunk) pairs (:func:`~vmoba_compile.token_pairs.
    pair_attention`) of permuted ``qp`` / ``kp`` / ``vp``."""
    b = qp.shape[0]
    key_valid = idx.real.expand(b, -1)
    if text_key_mask is not None:
        key_valid = key_valid & text_key_ok(plan, text_key_mask, b, qp.device)
    qp, kp, vp = (kernel_input(x, Kernel.FLASH) for x in (qp, kp, vp))
    return pair_attention(
        qp, kp, vp, sel, real=idx.real, chunk_blocks=chunk_block_ranges(idx.onehot),
        key_valid=key_valid, num_video_blocks=plan.num_video_blocks,
        num_text_blocks=plan.num_text_blocks, block_size=plan.block_size, scale=scale,
        backend=backend,
    )  # fmt: skip
