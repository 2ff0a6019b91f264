"""Selection -> FlexAttention ``BlockMask``: the only builder of masks in the package.

The kernel sees the padded chunk order of :class:`~vmoba_compile.layout.ChunkPlan`. A query block
attends the KV blocks of every chunk it selected plus every text block; a text query block attends
everything. Selected blocks are *full* blocks (the kernel skips ``mask_mod`` on them) unless they
hold padding (a chunk's or the text's last block) or masked text keys, or, in TOKEN granularity,
unless only some query tokens of the block chose the chunk. ``mask_mod`` encodes the same
selection exactly, because eager and CPU flex apply only ``mask_mod`` and ignore the block tables.

Every tensor that ``mask_mod`` reads is built from comparisons, gathers and concatenation, never
from a scatter: compiled CPU flex (torch 2.13) read scatter-built buffers wrongly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
from torch.nn.attention.flex_attention import BlockMask

from ._compat import is_compiling
from .layout import SELECTION_WORD_BITS as _BITS
from .layout import ChunkPlan, LayerPlan, PlanIndex, plan_from_key

__all__ = [
    "TABLE_NAMES",
    "MaskPieces",
    "block_mask_from_pieces",
    "build_block_mask",
    "dense_to_indices",
    "make_mask_mod",
    "mask_pieces",
    "materialize_for_mask_mod",
    "materialize_pieces",
    "plan_index",
    "text_key_ok",
]


def dense_to_indices(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., NQ, NK]`` bool block map -> (``[..., NQ]`` counts, ``[..., NQ, NK]`` indices).

    The index list keeps its full width NK (``to_dense()`` and the backward's transpose index out
    of range on a narrower one): the selected blocks first, in
    increasing order, then the last block repeated (the kernels read only the first ``count``).
    """
    # No sort: the j-th selected block is the first whose running count reaches j + 1, a binary
    # search in the row's cumulative sum. Inductor turned the argsort this replaces into a Triton
    # bitonic network that took 62 s to compile at 55K tokens (benchmarks/README.md); a scan and
    # a search compile in well under a second. Contiguous in and out: the flex kernels read index
    # tables as row-major (a transposed q-side table gave wrong gradients on the H100).
    dense = dense.contiguous()
    nk = dense.shape[-1]
    running = torch.cumsum(dense, dim=-1, dtype=torch.int32)
    want = torch.arange(1, nk + 1, dtype=torch.int32, device=dense.device).expand_as(running)
    idx = torch.searchsorted(running, want.contiguous(), out_int32=True)
    return running[..., -1].contiguous(), idx.clamp_(max=nk - 1)


def text_key_ok(
    plan: ChunkPlan | LayerPlan, text_key_mask: torch.Tensor, batch: int, device: torch.device
) -> torch.Tensor:
    """``[B, S_pad]`` bool per key slot: False for masked text keys (``text_key_mask``,
    ``[B, L]``) and the padding after the text; True on every video slot."""
    bs, nb = plan.block_size, plan.num_blocks
    pad = nb * bs - plan.video_padded - text_key_mask.shape[1]
    return torch.cat(
        [
            torch.ones(batch, plan.video_padded, dtype=torch.bool, device=device),
            text_key_mask.to(device=device, dtype=torch.bool).expand(batch, -1),
            torch.zeros(batch, pad, dtype=torch.bool, device=device),
        ],
        dim=1,
    )


def build_block_mask(
    plan: ChunkPlan | LayerPlan,
    idx: PlanIndex,
    sel: torch.Tensor,
    *,
    token_level: bool,
    text_key_mask: torch.Tensor | None = None,
    q_tables: bool = True,
    q_real: torch.Tensor | None = None,
) -> BlockMask:
    """Turn a chunk selection into a BlockMask over the padded sequence.

    :func:`mask_pieces` with the same arguments, made plain buffers under compilation
    (:func:`materialize_pieces`) and put together (:func:`block_mask_from_pieces`).
    """
    pieces = mask_pieces(
        plan, idx, sel, token_level=token_level, text_key_mask=text_key_mask, q_tables=q_tables,
        q_real=q_real,
    )  # fmt: skip
    return block_mask_from_pieces(materialize_pieces(pieces))


def mask_pieces(
    plan: ChunkPlan | LayerPlan,
    idx: PlanIndex,
    sel: torch.Tensor,
    *,
    token_level: bool,
    text_key_mask: torch.Tensor | None = None,
    q_tables: bool = True,
    q_real: torch.Tensor | None = None,
) -> MaskPieces:
    """The block tables and ``mask_mod`` tensors of a chunk selection over the padded sequence
    (a kernel that takes them through an opaque op of its own, :mod:`vmoba_compile.kernels`,
    uses them as they are).

    Args:
        plan: the partition in use.
        idx: :func:`plan_index` ``(plan, device)``.
        sel: ``[B, H, U, C]`` bool selection; ``U`` is the number of video query blocks (BLOCK
            granularity) or of video query slots ``NB_video * block_size`` (TOKEN granularity).
        token_level: whether ``sel`` is per token (padding slots' selections are ignored).
        text_key_mask: optional ``[B, L]`` bool, False for text keys nobody may attend
            (key padding); ``L`` = text tokens of the layout.
        q_tables: build the query-side tables too. Only the backward kernel reads them; an
            inference call skips their two sorts (the mask then has ``q_indices=None``, which
            FlexAttention accepts without gradients and refuses, loudly, with them).
        q_real: ``[S_pad]`` or ``[B, H, S_pad]`` bool, the query rows holding real tokens
            where the query rows are not in the keys' order (TOKEN granularity's sorted rows,
            :mod:`vmoba_compile.token_rows`); None: ``idx.real``, the keys' own.

    Returns:
        The :class:`MaskPieces` of a ``[B, H, S_pad, S_pad]`` mask.
    """
    device = sel.device
    b, h, u, c = sel.shape
    bs, nb = plan.block_size, plan.num_blocks
    real = idx.real
    if token_level:
        # TOKEN granularity evaluates mask_mod on nearly every score, and each extra word costs
        # a select per score: its table holds only this plan's own chunks (W = C), so a 1D layer
        # reads one word where the schedule's widest partition needs five (docs/design.md).
        # Its layers then differ in mask_mod: one flex kernel per word count.
        w, block_col, kv_word, kv_mask = c, idx.block_chunk, idx.own_word, idx.own_mask
    else:
        # BLOCK granularity evaluates it only on boundary blocks: every layer shares the width
        # W = plan.columns, so every layer's kernel is the same.
        w, block_col, kv_word, kv_mask = plan.columns, idx.block_col, idx.kv_word, idx.kv_mask

    # The selection extended to every padded query row and to whole words of the W columns
    # plus two, built in one place: text query rows select every chunk; columns C..W-1 (BLOCK
    # granularity: the layout's other partitions have more chunks) are never selected;
    # column W (text keys) is selected by every row but those of the plan's all-padding blocks,
    # which select nothing; column W+1 (padding keys) and the rest of the last word never are.
    per = bs if token_level else 1
    rows_pad = plan.num_pad_blocks * per
    rows_text = nb * per - u - rows_pad
    live = sel.new_ones(b, h, u + rows_text, 1)
    if rows_text:
        sel = torch.cat([sel, sel.new_ones(b, h, rows_text, c)], dim=2)
    if rows_pad:
        sel = torch.cat([sel, sel.new_zeros(b, h, rows_pad, c)], dim=2)
        live = torch.cat([live, sel.new_zeros(b, h, rows_pad, 1)], dim=2)
    lead = sel.shape[:-1]
    words = -(-(w + 2) // _BITS)
    tail = words * _BITS - w - 1  # column W+1 and the rest of the last word
    sel_ext = torch.cat([sel, sel.new_zeros(*lead, w - c), live, sel.new_zeros(*lead, tail)], -1)

    # Block-level map over KV blocks: which chunks each query block touches, and whether every
    # real query token of the block selected it (then the block can be full).
    if token_level:
        per_tok = sel_ext.reshape(b, h, nb, bs, words * _BITS)
        q_real = real if q_real is None else q_real
        slot_real = q_real.reshape(*q_real.shape[:-1], nb, bs, 1)
        any_c = (per_tok & slot_real).any(dim=3)
        all_c = (per_tok | ~slot_real).all(dim=3)
    else:
        any_c = all_c = sel_ext
    touched = torch.index_select(any_c, -1, block_col)  # [B, H, NB, NB]
    uniform = torch.index_select(all_c, -1, block_col)
    kv_full = idx.block_count == bs  # no padding slot in the block
    if text_key_mask is not None:
        kv_full = kv_full & (block_col < c)  # masked text keys need mask_mod
    full = touched & uniform & kv_full
    partial = touched & ~full
    # Both directions (the query side only for a backward) of both kinds of blocks, each a plain
    # buffer under compilation (materialize_pieces): on the H100 (torch 2.11) inductor fused their
    # computation (sort, index_select, ...) into the flex template, and that kernel faulted.
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    sides = (("kv", False), ("q", True)) if q_tables else (("kv", False),)
    for name, dense in (("", partial), ("full_", full)):
        for side, transpose in sides:
            names += [f"{name}{side}_num_blocks", f"{name}{side}_indices"]
            tensors += dense_to_indices(dense.transpose(-1, -2) if transpose else dense)

    # key_ok: per key slot, False for masked text keys and the padding after the text (only with
    # a text key mask; video padding slots stay True, their column is never selected).
    key_ok = None if text_key_mask is None else text_key_ok(plan, text_key_mask, b, device)
    # The selection as bits, one contiguous [B, H, R] int32 table per word (mask_mod indexes with
    # tensors only: a constant word index among them makes Dynamo's indexing data-dependent).
    # Indexing the bool table by (query, column) instead was one gather per score element: with
    # every block partial (TOKEN granularity at 55K tokens) the kernel ran 3.1x slower than dense
    # flex (benchmarks/README.md).
    shifts = torch.arange(_BITS, dtype=torch.int32, device=device)
    word_tables = []
    for i in range(words):
        part = sel_ext[..., i * _BITS : (i + 1) * _BITS].to(torch.int32)
        word_tables.append((part << shifts).sum(-1, dtype=torch.int32))
    tables = dict(zip(names, tensors, strict=True))
    pieces = MaskPieces(tables, word_tables, kv_word, kv_mask, key_ok, bs, nb * bs, token_level)
    return pieces


# The block tables in the order MaskPieces.tensors() lists them: the forward's four, then the
# query side's four (built for a backward only).
TABLE_NAMES = (
    "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
    "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
)  # fmt: skip


class MaskPieces(NamedTuple):
    """Everything a VMoBA ``BlockMask`` is made of: its block tables and what ``mask_mod`` reads.

    Attributes:
        tables: ``kv_num_blocks``, ``kv_indices``, ``full_kv_num_blocks``, ``full_kv_indices``
            and, for a backward, the four ``q_`` tables, by FlexAttention's argument names.
        word_tables: the selection as bits, one ``[B, H, R]`` int32 table per 31-column word.
        kv_word: ``[S_pad]`` which word holds each key slot's column.
        kv_mask: ``[S_pad]`` int32, that column's bit.
        key_ok: ``[B, S_pad]`` bool, False for masked text keys and the padding after the text
            (video padding slots are True: the selection bits exclude them); or None.
        block_size: query and key block size.
        seq_len: the padded sequence length ``S_pad``.
        token_level: whether the word tables have a row per query token (else per query block).
    """

    tables: dict[str, torch.Tensor]
    word_tables: list[torch.Tensor]
    kv_word: torch.Tensor
    kv_mask: torch.Tensor
    key_ok: torch.Tensor | None
    block_size: int
    seq_len: int
    token_level: bool

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the mask, in a fixed order (:meth:`with_tensors` and
        :meth:`from_tensors` read it back)."""
        key_ok = [] if self.key_ok is None else [self.key_ok]
        tables = [self.tables[n] for n in TABLE_NAMES if n in self.tables]
        return [*tables, *self.word_tables, self.kv_word, self.kv_mask, *key_ok]

    @classmethod
    def from_tensors(
        cls,
        tensors: list[torch.Tensor],
        n_words: int,
        has_key_ok: bool,
        block_size: int,
        seq_len: int,
        token_level: bool,
    ) -> MaskPieces:
        """The pieces back from :meth:`tensors`' flat list and the counts and flags that list
        leaves out (what an op that takes only tensors and constants rebuilds the mask from).

        Raises:
            ValueError: the list does not hold 4 or 8 block tables besides the other tensors.
        """
        n_tables = len(tensors) - n_words - 2 - int(has_key_ok)
        if n_tables not in (4, 8):
            raise ValueError(f"a VMoBA mask has 4 or 8 block tables; got {n_tables}")
        key_ok = tensors[-1] if has_key_ok else None
        words = list(tensors[n_tables : n_tables + n_words])
        kv_word, kv_mask = tensors[n_tables + n_words : n_tables + n_words + 2]
        tables = dict(zip(TABLE_NAMES[:n_tables], tensors[:n_tables], strict=True))
        return cls(tables, words, kv_word, kv_mask, key_ok, block_size, seq_len, token_level)

    def with_tensors(self, xs: list[torch.Tensor]) -> MaskPieces:
        """These pieces with their tensors replaced by ``xs`` (in :meth:`tensors`' order)."""
        nt, nw = len(self.tables), len(self.word_tables)
        tables = dict(zip(TABLE_NAMES[:nt], xs[:nt], strict=True))
        kv_word, kv_mask = xs[nt + nw : nt + nw + 2]
        key_ok = None if self.key_ok is None else xs[nt + nw + 2]
        return MaskPieces(
            tables, list(xs[nt : nt + nw]), kv_word, kv_mask, key_ok, self.block_size,
            self.seq_len, self.token_level,
        )  # fmt: skip


def materialize_pieces(pieces: MaskPieces) -> MaskPieces:
    """The pieces as plain, separately computed buffers under compilation (one opaque op for
    all of them; see :func:`materialize_for_mask_mod`)."""
    return pieces.with_tensors(materialize_for_mask_mod(*pieces.tensors()))


def make_mask_mod(pieces: MaskPieces) -> Callable:
    """The ``mask_mod`` that encodes the pieces' selection exactly (eager and CPU flex apply
    only ``mask_mod``; compiled kernels skip it on full blocks).

    It carries ``vmoba_buffers = (mask_mod_of, buffers)``: the same function with the tensors
    it reads as trailing arguments (flex's ``mask_mod_other_buffers``), for
    :func:`vmoba_compile._compat.flex_attention_in_trace`, which hands them to the flex op
    itself where a caller is traced outside Dynamo."""
    bs, token_level, words = pieces.block_size, pieces.token_level, len(pieces.word_tables)
    has_key_ok = pieces.key_ok is not None
    buffers = (*pieces.word_tables, pieces.kv_word, pieces.kv_mask)
    buffers += () if pieces.key_ok is None else (pieces.key_ok,)

    def mask_mod_of(bi, hi, q_idx, kv_idx, *bufs):
        word_tables, kv_word, kv_mask = bufs[:words], bufs[words], bufs[words + 1]
        unit = q_idx if token_level else q_idx // bs
        word = word_tables[-1][bi, hi, unit]
        if words > 1:  # pick the key's word: a few selects instead of a gather
            kw = kv_word[kv_idx]
            for i in range(words - 2, -1, -1):
                word = torch.where(kw == i, word_tables[i][bi, hi, unit], word)
        ok = (word & kv_mask[kv_idx]) != 0
        if has_key_ok:
            ok = ok & bufs[words + 2][bi, kv_idx]
        return ok

    def mask_mod(bi, hi, q_idx, kv_idx):
        return mask_mod_of(bi, hi, q_idx, kv_idx, *buffers)

    mask_mod.vmoba_buffers = (mask_mod_of, buffers)  # type: ignore[attr-defined]
    return mask_mod


def block_mask_from_pieces(pieces: MaskPieces) -> BlockMask:
    """The ``BlockMask`` of the pieces (query-side tables None unless built)."""
    tables = dict.fromkeys(("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"))
    tables.update(pieces.tables)
    s, bs = pieces.seq_len, pieces.block_size
    return BlockMask(
        seq_lengths=(s, s),
        BLOCK_SIZE=(bs, bs),
        mask_mod=make_mask_mod(pieces),
        **cast("dict[str, Any]", tables),  # the kv tables are always built
    )


# ---------------------------------------------------------------------------------------------
# opaque ops that keep the plan's index tables and the mask's buffers plain under inductor


@functools.lru_cache(maxsize=64)
def _cached_index(key: str, device: torch.device) -> PlanIndex:
    return plan_from_key(key).index(device)


@torch.library.custom_op("vmoba_compile::plan_index", mutates_args=())
def _plan_index_op(key: str, device: torch.device) -> list[torch.Tensor]:
    # Clones: inductor may reuse an op's output buffer in place once it is dead.
    return [t.clone() for t in _cached_index(key, device)]


@_plan_index_op.register_fake
def _(key: str, device: torch.device) -> list[torch.Tensor]:
    plan = plan_from_key(key)
    long, nb = torch.long, plan.num_blocks
    shapes = (
        (plan.padded_len, long),
        (plan.padded_len, torch.bool),
        (plan.layout.seq_len, long),
        (nb, long),
        (nb, long),
        (plan.num_chunks, long),
        ((plan.num_video_blocks, plan.num_chunks), torch.float32),
        (nb, long),
        (plan.padded_len, long),
        (plan.padded_len, torch.int32),
        (plan.padded_len, long),
        (plan.padded_len, torch.int32),
    )
    return [torch.empty(n, dtype=dt, device=device) for n, dt in shapes]


def plan_index(plan: ChunkPlan | LayerPlan, device: torch.device) -> PlanIndex:
    """``plan.index(device)``, built once per (plan, device) and kept outside compiled graphs.

    Under compilation the tables come from an opaque op, so inductor reads them as plain device
    buffers. Built in-graph (``torch.tensor`` constants, AOT ``lift_fresh``), the H100 runs of
    torch 2.11 faulted in kernels that read them (docs/design.md).
    """
    device = torch.device(device)
    if not is_compiling():
        return _cached_index(plan.key, device)
    return PlanIndex(*_plan_index_op(plan.key, device))


@torch.library.custom_op("vmoba_compile::materialize", mutates_args=())
def _materialize(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x.clone() for x in xs]


@_materialize.register_fake
def _(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.empty_like(x) for x in xs]


def materialize_for_mask_mod(*xs: torch.Tensor) -> list[torch.Tensor]:
    """Make tensors the flex template reads (``mask_mod`` captures, block tables) plain,
    separately computed buffers under inductor.

    - CPU: inductor's flex lowering (torch 2.11-2.13, ``flex_cpu.lower_cpu``) does not realize
      the buffers a ``mask_mod`` reads, and fails with ``NoValidChoicesError`` (or reads wrong
      values) when one is still an unfused computation.
    - GPU (H100, torch 2.11): with the block tables computed in the same graph, inductor fused
      their computation into the flex template
      (``triton_tem_fused_..._flex_attention_..._index_select_..._sort_...``) and the kernel
      faulted (illegal address); compiled alone, one stage per process, the same tables were
      right.
    An opaque custom op forces plain buffers on both. It takes every table of one mask in one
    call: each call of a Python custom op costs host time at run time (dispatch through Python),
    and the op is on every layer's critical path. Outside compilation it is a no-op.
    """
    if not is_compiling():
        return list(xs)
    return _materialize(list(xs))
