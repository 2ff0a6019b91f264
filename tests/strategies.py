"""Hypothesis strategies shared by the property tests: random, often ragged, grids and configs."""

from __future__ import annotations

from hypothesis import strategies as st

from vmoba_compile import VideoLayout, VMoBAConfig


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
