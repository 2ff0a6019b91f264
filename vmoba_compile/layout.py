"""The video token grid of an attention call, and the 1D/2D/3D chunk permutation.

Shape legend: B batch, H heads, S tokens in the call, D head dim. The video grid is
``frames x height x width`` in tokens (after patchify), flattened frame-major, then height, then
width, as every diffusers video model does. ``N = frames*height*width`` video tokens and ``L`` text
tokens make ``S = N + L``.

The permuted ("padded") sequence used by the kernel holds every chunk contiguously, each chunk
padded to a whole number of blocks, then the text tokens, padded to whole blocks too::

    [chunk 0 | pad][chunk 1 | pad] ... [chunk C-1 | pad][text | pad]

so that a block never spans two chunks and every block of real tokens is a *full* block for the
kernel. Padding slots are never attended. The per-token index tensors of a plan are built once per
device (:meth:`ChunkPlan.index`) and reach compiled graphs through an opaque op
(:func:`vmoba_compile.masks.plan_index`), never as constants traced into the graph.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from enum import Enum
from typing import TYPE_CHECKING, NamedTuple

import torch

from .config import Partition, VMoBAConfig

__all__ = [
    "ChunkPlan",
    "LayerPlan",
    "PlanIndex",
    "TextPosition",
    "VideoLayout",
    "make_plan",
    "plan_from_key",
    "resolve_chunk",
]


class TextPosition(str, Enum):
    """Where text tokens sit in a self-attention sequence."""

    PREFIX = "prefix"  # [text, video]: CogVideoX, EasyAnimate
    SUFFIX = "suffix"  # [video, text]: HunyuanVideo, Mochi


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"VideoLayout.{name} must be an int >= {minimum}; got {value!r}.")
    return value


@dataclasses.dataclass(frozen=True)
class VideoLayout:
    """The token grid of one attention call.

    Attributes:
        frames: latent frames in tokens (after temporal patchify).
        height: latent height in tokens (after spatial patchify).
        width: latent width in tokens.
        text_tokens: text (or other non-video, e.g. CLS) tokens in the same sequence.
        text_position: ``"prefix"`` (text first) or ``"suffix"`` (text last).
    """

    frames: int
    height: int
    width: int
    text_tokens: int = 0
    text_position: TextPosition = TextPosition.SUFFIX

    if TYPE_CHECKING:
        # The constructor also takes the position's string (``"prefix"``); __post_init__
        # stores the enum.
        def __init__(
            self,
            frames: int,
            height: int,
            width: int,
            text_tokens: int = 0,
            text_position: TextPosition | str = ...,
        ) -> None: ...

    def __post_init__(self) -> None:
        _positive_int("frames", self.frames)
        _positive_int("height", self.height)
        _positive_int("width", self.width)
        _positive_int("text_tokens", self.text_tokens, minimum=0)
        pos = self.text_position
        if not isinstance(pos, TextPosition):
            try:
                pos = TextPosition(str(pos).lower() if isinstance(pos, str) else pos)
            except ValueError:
                raise ValueError(
                    f"VideoLayout.text_position must be 'prefix' or 'suffix'; got {pos!r}."
                ) from None
            object.__setattr__(self, "text_position", pos)

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        return self.video_tokens + self.text_tokens

    @property
    def video_start(self) -> int:
        """Index of the first video token in the call's sequence."""
        return self.text_tokens if self.text_position is TextPosition.PREFIX else 0

    @property
    def text_start(self) -> int:
        return 0 if self.text_position is TextPosition.PREFIX else self.video_tokens

    def check_seq_len(self, seq_len: int) -> None:
        """Raise a ValueError that explains a mismatch between the layout and ``S``."""
        if seq_len == self.seq_len:
            return
        hint = ""
        extra = seq_len - self.video_tokens
        if extra > 0:
            hint = (
                f"; if the model puts {extra} text tokens in the sequence, pass "
                f"VideoLayout(frames={self.frames}, height={self.height}, width={self.width}, "
                f"text_tokens={extra}, text_position='suffix' or 'prefix')"
            )
        raise ValueError(
            f"{self} has {self.seq_len} tokens ({self.video_tokens} video + {self.text_tokens} "
            f"text) but this attention call has S={seq_len}{hint}."
        )

    def __str__(self) -> str:
        text = (
            f", text_tokens={self.text_tokens}, text_position='{self.text_position.value}'"
            if self.text_tokens
            else ""
        )
        return f"VideoLayout(frames={self.frames}, height={self.height}, width={self.width}{text})"


def _axis_sizes(n: int, c: int) -> list[int]:
    """Sizes of the chunks along one axis of length n cut every c (the last may be smaller)."""
    return [c] * (n // c) + ([n % c] if n % c else [])


# Selection columns per int32 word of the table ``mask_mod`` reads (bit 31 left clear): one word
# load per query row and an AND per key, instead of a gather per score element.
SELECTION_WORD_BITS = 31


def _word_and_mask(col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection-table column of each key slot -> the word that holds it and its bit as an int32
    mask (``1 << bit``): ``mask_mod`` tests a key with one AND (a shift and an AND cost 3% more
    of a TOKEN forward on the H100, docs/design.md)."""
    bit = (col % SELECTION_WORD_BITS).to(torch.int32)
    return col // SELECTION_WORD_BITS, torch.ones_like(bit) << bit


class PlanIndex(NamedTuple):
    """The device index tensors of one :class:`ChunkPlan`, built once per attention call."""

    token: torch.Tensor  # [S_pad] int64: token of each padded slot (0 for padding)
    real: torch.Tensor  # [S_pad] bool: slot holds a real token
    slots: torch.Tensor  # [S] int64: padded slot of each token, in call order
    block_chunk: torch.Tensor  # [NB] int64: chunk of each block (text: num_chunks)
    block_count: torch.Tensor  # [NB] int64: real tokens in each block
    sizes: torch.Tensor  # [C] int64: real tokens in each chunk
    onehot: torch.Tensor  # [NB_video, C] float32: 1 where a video block lies in a chunk
    # Selection-table columns (ChunkPlan.columns = W): a block's chunk, W for text, W + 1 for
    # padding; each key slot's column as the word of the mask_mod table that holds it and its
    # bit in that word as a mask (SELECTION_WORD_BITS columns a word). BLOCK granularity: every
    # partition of a layout shares the width W (one kernel for every layer).
    block_col: torch.Tensor  # [NB] int64
    kv_word: torch.Tensor  # [S_pad] int64
    kv_mask: torch.Tensor  # [S_pad] int32
    # The same with the plan's own C chunk columns only (text C, padding C + 1; block columns are
    # block_chunk): TOKEN granularity tests mask_mod on nearly every score, so it reads no more
    # words than the plan needs.
    own_word: torch.Tensor  # [S_pad] int64
    own_mask: torch.Tensor  # [S_pad] int32


class LayerPlan(NamedTuple):
    """What the traced part of one layer's op needs to know about its :class:`ChunkPlan`:
    Python constants only, so that Dynamo takes them as one constant
    (:func:`~vmoba_compile.attention.layer_plan`).

    ``permute``, ``unpermute``, ``plan_blocks``, ``build_block_mask``, ``plan_index`` and the
    (query, chunk) pairs read only these attributes, which a ``ChunkPlan`` has under the same
    names.
    """

    key: str
    block_size: int
    num_chunks: int
    num_blocks: int
    num_video_blocks: int
    num_text_blocks: int
    num_pad_blocks: int
    video_padded: int
    is_identity: bool
    columns: int


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """Static (host-side) description of one partition of one layout into chunks and blocks.

    Everything here is Python ints: it is a pure function of the layout, the chunk shape and the
    block size, computed once and cached. Its device tensors come from :meth:`index` (built from
    :meth:`token_slots`, :meth:`slot_tokens` and :meth:`block_tables`).
    """

    layout: VideoLayout
    chunk: tuple[int, int, int]  # (ct, cy, cx), clamped to the grid
    block_size: int
    chunk_sizes: tuple[int, ...]  # real tokens per chunk
    chunk_offsets: tuple[int, ...]  # first padded slot of each chunk
    block_chunk: tuple[int, ...]  # per block: chunk id; text num_chunks; pad blocks num_chunks + 1
    block_count: tuple[int, ...]  # per block: real tokens in it
    num_video_blocks: int
    num_text_blocks: int
    # All-padding blocks after the text, and never-selected chunk columns of the selection
    # table, so that every partition of a layout hands the kernel inputs of the same shapes (one
    # kernel for all layers); nothing attends the blocks and they attend nothing.
    num_pad_blocks: int = 0
    num_pad_columns: int = 0

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_sizes)

    @property
    def columns(self) -> int:
        """Chunk columns of the selection table that ``mask_mod`` reads: the chunks, then the
        never-selected padding columns."""
        return self.num_chunks + self.num_pad_columns

    @property
    def num_blocks(self) -> int:
        return self.num_video_blocks + self.num_text_blocks + self.num_pad_blocks

    @property
    def video_padded(self) -> int:
        return self.num_video_blocks * self.block_size

    @property
    def padded_len(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def is_identity(self) -> bool:
        """True when the padded chunk order is the call order itself (whole-frame chunks, no
        padding slot, text after the video or none): permuting is then a no-op."""
        lay = self.layout
        return (
            self.padded_len == lay.seq_len
            and self.chunk[1:] == (lay.height, lay.width)
            and (lay.text_tokens == 0 or lay.text_position is TextPosition.SUFFIX)
        )

    @property
    def chunk_grid(self) -> tuple[int, int, int]:
        lay, (ct, cy, cx) = self.layout, self.chunk
        return (-(-lay.frames // ct), -(-lay.height // cy), -(-lay.width // cx))

    # ---- per-token index tensors (pure arithmetic on arange; trace into the graph) ----

    def _video_token_slots(self, device: torch.device) -> torch.Tensor:
        lay, (ct, cy, cx) = self.layout, self.chunk
        _, ny, nx = self.chunk_grid
        n = torch.arange(lay.video_tokens, device=device)
        t = n // (lay.height * lay.width)
        y = (n // lay.width) % lay.height
        x = n % lay.width
        it, iy, ix = t // ct, y // cy, x // cx
        sy = torch.clamp(lay.height - iy * cy, max=cy)  # this chunk's height (ragged edge)
        sx = torch.clamp(lay.width - ix * cx, max=cx)
        local = ((t - it * ct) * sy + (y - iy * cy)) * sx + (x - ix * cx)
        cid = (it * ny + iy) * nx + ix
        offsets = torch.tensor(self.chunk_offsets, device=device, dtype=torch.long)
        return offsets[cid] + local

    def token_slots(self, device: torch.device) -> torch.Tensor:
        """``[S]`` int64: the padded slot of each token of the call, in the call's order."""
        video = self._video_token_slots(device)
        lay = self.layout
        if not lay.text_tokens:
            return video
        text = self.video_padded + torch.arange(lay.text_tokens, device=device)
        if lay.text_position is TextPosition.PREFIX:
            return torch.cat([text, video])
        return torch.cat([video, text])

    def slot_tokens(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse map, computed analytically (no scatter).

        Returns:
            ``(token, real)``: ``[S_pad]`` int64 token index of each padded slot (0 where the slot
            is padding) and ``[S_pad]`` bool, True where the slot holds a real token.
        """
        lay, (ct, cy, cx), bs = self.layout, self.chunk, self.block_size
        _, ny, nx = self.chunk_grid
        s = torch.arange(self.padded_len, device=device)
        blk = s // bs
        block_chunk = torch.tensor(self.block_chunk, device=device, dtype=torch.long)
        c = block_chunk[blk]
        is_text = c >= self.num_chunks
        cv = torch.clamp(c, max=self.num_chunks - 1)
        offsets = torch.tensor(self.chunk_offsets, device=device, dtype=torch.long)
        sizes = torch.tensor(self.chunk_sizes, device=device, dtype=torch.long)
        local = s - offsets[cv]
        it, iy, ix = cv // (ny * nx), (cv // nx) % ny, cv % nx
        sy = torch.clamp(lay.height - iy * cy, max=cy)
        sx = torch.clamp(lay.width - ix * cx, max=cx)
        t = it * ct + local // (sy * sx)
        y = iy * cy + (local // sx) % sy
        x = ix * cx + local % sx
        video_tok = (t * lay.height + y) * lay.width + x + lay.video_start
        text_local = s - self.video_padded
        text_tok = text_local + lay.text_start
        real = torch.where(is_text, text_local < lay.text_tokens, local < sizes[cv])
        token = torch.where(is_text, text_tok, video_tok)
        return torch.where(real, token, torch.zeros_like(token)), real

    def index(self, device: torch.device) -> PlanIndex:
        """All index tensors of the plan on ``device`` (each computed once)."""
        token, real = self.slot_tokens(device)
        c, bs = self.num_chunks, self.block_size
        block_chunk, block_count = self.block_tables(device)
        sizes = torch.tensor(self.chunk_sizes, device=device, dtype=torch.long)
        chunks = torch.arange(c, device=device)
        onehot = (block_chunk[: self.num_video_blocks, None] == chunks).float()
        block_col = block_chunk + self.num_pad_columns * (block_chunk >= c)
        kv_col = torch.where(real, block_col.repeat_interleave(bs), self.columns + 1)
        own_col = torch.where(real, block_chunk.repeat_interleave(bs), c + 1)
        slots = self.token_slots(device)
        return PlanIndex(
            token, real, slots, block_chunk, block_count, sizes, onehot, block_col,
            *_word_and_mask(kv_col), *_word_and_mask(own_col),
        )  # fmt: skip

    @property
    def key(self) -> str:
        """A string that names this plan and rebuilds it (:func:`plan_from_key`)."""
        lay = self.layout
        return ",".join(
            str(v)
            for v in (lay.frames, lay.height, lay.width, lay.text_tokens, lay.text_position.value)
            + self.chunk
            + (self.block_size, self.num_pad_blocks, self.num_pad_columns)
        )

    def block_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``[num_blocks]`` int64 chunk id of each block (text: num_chunks) and real-token count."""
        return (
            torch.tensor(self.block_chunk, device=device, dtype=torch.long),
            torch.tensor(self.block_count, device=device, dtype=torch.long),
        )


def chunk_dims(
    partition: Partition, chunk: Sequence[int], layout: VideoLayout
) -> tuple[int, int, int]:
    """A partition's chunk shape as a 3D ``(ct, cy, cx)`` clamped to the grid."""
    lay = layout
    if partition is Partition.D1:
        dims = (chunk[0], lay.height, lay.width)
    elif partition is Partition.D2:
        dims = (lay.frames, chunk[0], chunk[1])
    else:
        dims = (chunk[0], chunk[1], chunk[2])
    return (min(dims[0], lay.frames), min(dims[1], lay.height), min(dims[2], lay.width))


@functools.lru_cache(maxsize=256)
def make_plan(
    layout: VideoLayout,
    chunk: tuple[int, int, int],
    block_size: int,
    pad_blocks: int = 0,
    pad_columns: int = 0,
) -> ChunkPlan:
    """Cut ``layout`` into chunks of ``chunk = (ct, cy, cx)`` tokens (ragged edges allowed),
    then append ``pad_blocks`` all-padding blocks and ``pad_columns`` never-selected columns."""
    ct, cy, cx = chunk
    ts, ys, xs = (
        _axis_sizes(layout.frames, ct),
        _axis_sizes(layout.height, cy),
        _axis_sizes(layout.width, cx),
    )
    sizes = [a * b * c for a in ts for b in ys for c in xs]
    offsets, block_chunk, block_count = [], [], []
    pos = 0
    for cid, size in enumerate(sizes):
        offsets.append(pos)
        nblk = -(-size // block_size)
        for j in range(nblk):
            block_chunk.append(cid)
            block_count.append(min(block_size, size - j * block_size))
        pos += nblk * block_size
    n_text_blocks = -(-layout.text_tokens // block_size)
    for j in range(n_text_blocks):
        block_chunk.append(len(sizes))
        block_count.append(min(block_size, layout.text_tokens - j * block_size))
    block_chunk += [len(sizes) + 1] * pad_blocks
    block_count += [0] * pad_blocks
    return ChunkPlan(
        layout=layout,
        chunk=(ct, cy, cx),
        block_size=block_size,
        chunk_sizes=tuple(sizes),
        chunk_offsets=tuple(offsets),
        block_chunk=tuple(block_chunk),
        block_count=tuple(block_count),
        num_video_blocks=pos // block_size,
        num_text_blocks=n_text_blocks,
        num_pad_blocks=pad_blocks,
        num_pad_columns=pad_columns,
    )


def plan_from_key(key: str) -> ChunkPlan:
    """The plan whose :attr:`ChunkPlan.key` is ``key``."""
    f, h, w, text, pos, ct, cy, cx, bs, pad, pad_cols = key.split(",")
    layout = VideoLayout(int(f), int(h), int(w), int(text), TextPosition(pos))
    return make_plan(layout, (int(ct), int(cy), int(cx)), int(bs), int(pad), int(pad_cols))


def _padded_tokens(
    n: tuple[int, int, int], c: tuple[int, int, int], bs: int
) -> tuple[int, int, int]:
    """(padded video tokens, chunk count, chunks ending in a part-filled block) of grid ``n`` cut
    into chunks ``c``, closed form."""
    per_axis = []
    for length, size in zip(n, c, strict=True):
        full, rem = divmod(length, size)
        per_axis.append([(size, full)] + ([(rem, 1)] if rem else []))
    padded, count, ragged = 0, 0, 0
    for st, nt in per_axis[0]:
        for sy, ny in per_axis[1]:
            for sx, nx in per_axis[2]:
                k = nt * ny * nx
                padded += k * (-(-(st * sy * sx) // bs) * bs)
                count += k
                ragged += k * bool((st * sy * sx) % bs)
    return padded, count, ragged


@functools.lru_cache(maxsize=256)
def _auto_chunk(
    partition: Partition, frames: int, height: int, width: int, block_size: int, target_blocks: int
) -> tuple[int, ...]:
    """Pick a chunk shape: about ``target_blocks`` blocks a chunk, little padding, square tiles.

    The score is ``|log2(mean chunk / target)| + 4 * padding fraction + 2 * partial fraction +
    0.25 * aspect``: the padding fraction is the share of padded slots; the partial fraction the
    share of blocks that end a chunk part-filled, which the kernel must run through ``mask_mod``
    (about twice a full block's time) whenever the chunk is selected; the aspect term
    is ``|log2(cy / cx)|`` (plus ``|log2(ct^2 / (cy * cx))|`` for cubes). Without the partial term
    the 2D tiles of the 24x36x64 grid were 5x5 (600 tokens: 104 chunks, each ending in a partial
    block, 7% padding) instead of the exact 4x4 (384 tokens, 3 full blocks).
    """
    n = (frames, height, width)
    target = target_blocks * block_size
    video = frames * height * width
    lim = 32

    def score(c3: tuple[int, int, int], aspect: float) -> float:
        padded, count, ragged = _padded_tokens(n, c3, block_size)
        mean = video / count
        partial = ragged * block_size / padded
        return (
            abs(math.log2(mean / target))
            + 4.0 * (padded - video) / padded
            + 2.0 * partial
            + 0.25 * aspect
        )

    cands: list[tuple[tuple[int, ...], tuple[int, int, int], float]]
    if partition is Partition.D1:
        cands = [((ct,), (ct, height, width), 0.0) for ct in range(1, frames + 1)]
    elif partition is Partition.D2:
        cands = [
            ((cy, cx), (frames, cy, cx), abs(math.log2(cy / cx)))
            for cy in range(1, min(height, lim) + 1)
            for cx in range(1, min(width, lim) + 1)
        ]
    else:
        cands = [
            (
                (ct, cy, cx),
                (ct, cy, cx),
                abs(math.log2(cy / cx)) + abs(math.log2(ct * ct / (cy * cx))),
            )
            for ct in range(1, min(frames, 8) + 1)
            for cy in range(1, min(height, lim) + 1)
            for cx in range(1, min(width, lim) + 1)
        ]
    # min() keeps the first of equal scores: the smallest chunk, deterministic.
    return min(cands, key=lambda c: score(c[1], c[2]))[0]


def resolve_chunk(
    config: VMoBAConfig, partition: Partition, layout: VideoLayout
) -> tuple[int, int, int]:
    """The 3D chunk shape ``(ct, cy, cx)`` of ``partition`` on ``layout`` under ``config``."""
    explicit: tuple[int, ...] | None = {
        Partition.D1: config.chunk_1d,
        Partition.D2: config.chunk_2d,
        Partition.D3: config.chunk_3d,
    }[partition]
    if explicit is None:
        explicit = _auto_chunk(
            partition,
            layout.frames,
            layout.height,
            layout.width,
            config.block_size,
            config.target_chunk_blocks,
        )
    return chunk_dims(partition, explicit, layout)
