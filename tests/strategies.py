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
