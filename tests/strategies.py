"""Hypothesis strategies shared by the property tests: random, often ragged, grids and configs."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from vmoba_compile import VideoLayout, VMoBAConfig
from vmoba_compile.attention import permute, plan_blocks, plan_for


@st.composite
def layouts(draw, max_side: int = 7, max_text: int = 20) -> VideoLayout:
    frames = draw(st.integers(1, max_side))
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(1, max_side))
    text = draw(st.integers(0, max_text))
    pos = draw(st.sampled_from(["prefix", "suffix"]))
    return VideoLayout(frames, height, width, text_tokens=text, text_position=pos)


@st.composite
def configs(draw, layout: VideoLayout, **fixed) -> VMoBAConfig:
    """A config with explicit (usually ragged) chunk shapes for ``layout``."""
    t, y, x = layout.frames, layout.height, layout.width
    kwargs = dict(
        chunk_1d=(draw(st.integers(1, t)),),
        chunk_2d=(draw(st.integers(1, y)), draw(st.integers(1, x))),
        chunk_3d=(draw(st.integers(1, t)), draw(st.integers(1, y)), draw(st.integers(1, x))),
        selection=draw(st.sampled_from(["topk", "threshold"])),
        topk=draw(st.integers(1, 6)),
        threshold=draw(st.sampled_from([0.05, 0.2, 0.5, 0.8])),
        scope=draw(st.sampled_from(["query", "head"])),
        granularity=draw(st.sampled_from(["block", "token"])),
        block_size=draw(st.sampled_from([16, 32])),
    )
    kwargs.update(fixed)
    return VMoBAConfig(**kwargs)


def qk_inputs(layout: VideoLayout, seed: int, b: int = 2, h: int = 2, d: int = 8):
    """Seeded random ``q, k`` of ``[b, h, S, d]`` for ``layout``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, layout.seq_len, d, generator=g)
    k = torch.randn(b, h, layout.seq_len, d, generator=g)
    return q, k


def selection_of(q, k, layout: VideoLayout, config: VMoBAConfig, layer: int):
    """The op's :class:`~vmoba_compile.attention.BlockPlan` of layer ``layer``."""
    plan = plan_for(layout, config, layer)
    return plan_blocks(permute(q, plan), permute(k, plan), plan, config)


# ------------------------------------------------------------------------ memory formats


def _fused(q, k, v):
    """q, k, v as views of one ``[B, S, (H + 2 Hkv) D]`` projection (``to_qkv(x)`` then split,
    unflatten heads, transpose), the layout of diffusers' ``fuse_qkv_projections()``."""
    qkv = torch.cat([x.transpose(1, 2).flatten(2) for x in (q, k, v)], dim=-1)
    parts = qkv.split([x.shape[1] * x.shape[3] for x in (q, k, v)], dim=-1)
    shapes = [(x.shape[1], x.shape[3]) for x in (q, k, v)]
    return tuple(p.unflatten(2, hd).transpose(1, 2) for p, hd in zip(parts, shapes, strict=True))


def _fused_v(q, k, v):
    """Only v stays a view of the fused projection; q and k are made anew (Wan's QK norm and
    RoPE do that): v then is the one input of its storage, at an offset."""
    fq, fk, fv = _fused(q, k, v)
    return fq.contiguous(), fk.contiguous(), fv


def _fused_heads(q, k, v):
    """``[B, S, H, 3D]`` per-head fused projection chunked on the head dim (needs Hkv = H)."""
    if not (q.shape[1] == k.shape[1] and q.shape[3] == v.shape[3]):
        return _fused(q, k, v)
    qkv = torch.cat([x.transpose(1, 2) for x in (q, k, v)], dim=-1)
    return tuple(p.transpose(1, 2) for p in qkv.chunk(3, dim=-1))


def _flat(q, k, v):
    """Contiguous views at storage offsets of one flat buffer (``qkv.unbind(0)`` of a
    ``[3, B, H, S, D]`` projection)."""
    buf = torch.cat([x.flatten() for x in (q, k, v)])
    out, start = [], 0
    for x in (q, k, v):
        out.append(buf.narrow(0, start, x.numel()).view(x.shape))
        start += x.numel()
    return tuple(out)


def _each(fn):
    return lambda q, k, v: tuple(fn(x) for x in (q, k, v))


MEMORY_FORMATS = {
    "contiguous": lambda q, k, v: (q, k, v),
    "fused_qkv": _fused,
    "fused_v": _fused_v,
    "fused_heads": _fused_heads,
    "flat_offsets": _flat,
    # [B, S, H, D] storage handed over as [B, H, S, D] (what every diffusers processor does)
    "bshd": _each(lambda x: x.transpose(1, 2).contiguous().transpose(1, 2)),
    # head dim with stride 2
    "strided_head_dim": _each(lambda x: torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0]),
    # channels-last-like: [B, S, D, H] storage, head dim not innermost
    "channels_last": _each(lambda x: x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)),
    # one sample broadcast over the batch (batch stride 0)
    "broadcast_batch": _each(lambda x: x[:1].expand_as(x)),
}


def memory_formats():
    """Names of :data:`MEMORY_FORMATS`: functions ``(q, k, v) -> (q, k, v)`` that change how
    contiguous ``[B, H, S, D]`` inputs lie in memory (the values too, for ``broadcast_batch``:
    compare against the result's ``.contiguous()`` copies). They work traced as well, where the
    storage they build is a buffer computed in the graph."""
    return st.sampled_from(sorted(MEMORY_FORMATS))


@st.composite
def kernel_cases(draw):
    """``(layout, config, layer)`` where the attention kernel sees sparse VMoBA blocks, half
    the time on an identity plan (whole-frame 1D chunks on block-aligned frames, no text
    before the video): there q, k, v reach the kernel without the permutation's gather."""
    frames = draw(st.integers(2, 4))
    height, width = draw(st.sampled_from([(4, 4), (2, 8), (4, 8)]))
    text = draw(st.sampled_from([0, 16]))
    layout = VideoLayout(frames, height, width, text_tokens=text, text_position="suffix")
    partition = draw(st.sampled_from(["1d", "1d", "2d", "3d"]))
    config = VMoBAConfig(
        schedule=(partition,),
        chunk_1d=(1,),
        chunk_2d=(height // 2, width // 2),
        chunk_3d=(1, height // 2, width // 2),
        selection=draw(st.sampled_from(["topk", "threshold"])),
        topk=1,
        threshold=0.2,
        granularity=draw(st.sampled_from(["block", "token"])),
        block_size=16,
    )
    return layout, config, 0
