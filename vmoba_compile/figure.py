"""A labelled picture of what VMoBA selects in each layer (the demo's ``vmoba_demo.png``).

:func:`plot_selection` draws one panel per video self-attention layer: the (query, key) token
pairs the layer computes, tokens in the order the kernel sees them (chunk by chunk, text last),
chunk boundaries as thin lines, the partition and density in the panel's title, and the grid and
configuration in the figure's title. It uses matplotlib when installed (``pip install
'vmoba_compile[plots]'``), else Pillow, else it writes the same facts as a text summary.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import VMoBAConfig
    from .diagnostics import LayerSelection

__all__ = ["figure_title", "plot_selection", "selection_summary"]

logger = logging.getLogger(__name__)

# Partition colours (colour-blind safe: orange, blue, green), RGB 0-255.
_COLORS = {"1d": (230, 97, 1), "2d": (33, 102, 172), "3d": (27, 158, 119)}
_MAX_PIXELS = 512  # per panel side: the maps are at block resolution, so sampling loses nothing
_MAX_LINES = 64  # chunk boundaries drawn at most (beyond, the lines would hide the map)


def figure_title(layers: Sequence[LayerSelection], config: VMoBAConfig | None = None) -> str:
    """``"VMoBA selection: grid 4x8x12 + 16 text tokens; block 16, threshold 0.4, ..."``."""
    lay = layers[0].layout
    text = ""
    if lay.text_tokens:
        text = f" + {lay.text_tokens} text tokens ({lay.text_position.value})"
    title = f"VMoBA selection: grid {lay.frames}x{lay.height}x{lay.width}{text}"
    if config is not None:
        rule = (
            f"top-{config.topk}"
            if config.selection.value == "topk"
            else f"threshold {config.threshold}"
        )
        title += (
            f"; block {config.block_size}, {rule}, scope {config.scope.value}, "
            f"chunks 1d {config.chunk_1d} 2d {config.chunk_2d} 3d {config.chunk_3d}"
        )
    return title


def selection_summary(layers: Sequence[LayerSelection], config: VMoBAConfig | None = None) -> str:
    """The figure's facts as text: the title, then per layer its partition, chunks and density."""
    lines = [figure_title(layers, config), "sample 0, head 0; density over all heads"]
    for sel in layers:
        lines.append(
            f"layer {sel.layer_index} {sel.partition} {sel.module}: "
            f"{len(sel.chunk_sizes)} chunks, density {sel.density:.3f}"
        )
    return "\n".join(lines) + "\n"


def _panel(sel: LayerSelection) -> tuple[torch.Tensor, list[float], float]:
    """The panel's map (``[n, n]`` bool, chunk order, at most ``_MAX_PIXELS`` a side), the chunk
    boundaries and the start of the text, both as fractions of the side."""
    s = sel.token_map.shape[0]
    order = sel.chunk_order if sel.chunk_order is not None else torch.arange(s)
    n = min(s, _MAX_PIXELS)
    pick = order[torch.linspace(0, s - 1, n).round().long()]
    image = sel.token_map[pick][:, pick]
    starts = torch.tensor((0, *sel.chunk_sizes)).cumsum(0).tolist()
    bounds = [b / s for b in starts[1:-1]] if len(sel.chunk_sizes) <= _MAX_LINES else []
    return image, bounds, starts[-1] / s


def plot_selection(
    layers: Sequence[LayerSelection],
    path: str | pathlib.Path,
    *,
    config: VMoBAConfig | None = None,
) -> pathlib.Path:
    """Draw ``layers`` (:func:`~vmoba_compile.diagnostics.selection_maps`) into ``path``.

    Args:
        layers: one :class:`~vmoba_compile.diagnostics.LayerSelection` per layer.
        path: the PNG to write.
        config: the configuration the maps were computed with (shown in the title).

    Returns:
        The file written: ``path``, or, with neither matplotlib nor Pillow installed, ``path``
        with the suffix ``.txt`` holding :func:`selection_summary`.

    Raises:
        ValueError: ``layers`` is empty.
    """
    if not layers:
        raise ValueError("no layer to draw: the model made no video self-attention call.")
    path = pathlib.Path(path)
    try:
        _with_matplotlib(layers, path, figure_title(layers, config))
        return path
    except ImportError:
        pass
    try:
        _with_pillow(layers, path, figure_title(layers, config))
        return path
    except ImportError:
        pass
    out = path.with_suffix(".txt")
    logger.info("neither matplotlib nor Pillow is installed: writing %s instead of a PNG", out)
    out.write_text(selection_summary(layers, config))
    return out


def _with_matplotlib(layers: Sequence[LayerSelection], path: pathlib.Path, title: str) -> None:
    # The object API (Figure + Agg canvas), not pyplot: no global backend or figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    n = len(layers)
    fig = Figure(figsize=(3.4 * n + 0.6, 4.5), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, sel in zip(axes, layers, strict=True):
        image, bounds, text_at = _panel(sel)
        color = tuple(c / 255 for c in _COLORS.get(sel.partition, (80, 80, 80)))
        ax.imshow(
            image.float().numpy(),
            cmap=ListedColormap([(1.0, 1.0, 1.0), color]),
            vmin=0,
            vmax=1,
            interpolation="nearest",
            extent=(0, 1, 1, 0),
        )
        for b in bounds:
            ax.axhline(b, color="0.55", lw=0.4)
            ax.axvline(b, color="0.55", lw=0.4)
        if text_at < 1:
            ax.axhline(text_at, color="0.1", lw=0.8, ls="--")
            ax.axvline(text_at, color="0.1", lw=0.8, ls="--")
        ax.set_title(
            f"layer {sel.layer_index}: {sel.partition}, {len(sel.chunk_sizes)} chunks\n"
            f"density {sel.density:.3f}",
            fontsize=9,
        )
        ax.set_xlabel("key tokens (chunk order)", fontsize=8)
        ax.set_ylabel("query tokens (chunk order)", fontsize=8)
        s = sel.token_map.shape[0]
        ax.set_xticks([0, 1], [0, s], fontsize=7)
        ax.set_yticks([0, 1], [0, s], fontsize=7)
    legend = (
        "coloured: (query, key) pairs computed (sample 0, head 0); grey lines: chunk boundaries"
        + ("; dashed: text tokens" if any(_panel_text(s) for s in layers) else "")
    )
    fig.suptitle(_wrap(title, 70 * n) + "\n" + legend, fontsize=8)
    fig.savefig(path, format="png")


def _with_pillow(layers: Sequence[LayerSelection], path: pathlib.Path, title: str) -> None:
    from PIL import Image, ImageDraw

    side, pad, top, bottom = 256, 24, 64, 40
    width = pad + len(layers) * (side + pad)
    canvas = Image.new("RGB", (width, top + side + bottom), "white")
    draw = ImageDraw.Draw(canvas)
    draw.multiline_text((pad, 6), _wrap(title, max(40, width // 7)), fill="black")
    for i, sel in enumerate(layers):
        image, bounds, text_at = _panel(sel)
        color = torch.tensor(_COLORS.get(sel.partition, (80, 80, 80)), dtype=torch.uint8)
        rgb = torch.where(image[..., None], color, torch.tensor(255, dtype=torch.uint8))
        panel = Image.fromarray(rgb.numpy(), "RGB").resize((side, side), Image.Resampling.NEAREST)
        x0 = pad + i * (side + pad)
        canvas.paste(panel, (x0, top))
        for b, shade in [*((b, (150, 150, 150)) for b in bounds), (text_at, (20, 20, 20))]:
            if 0 < b < 1:
                p = round(b * side)
                draw.line([(x0 + p, top), (x0 + p, top + side)], fill=shade)
                draw.line([(x0, top + p), (x0 + side, top + p)], fill=shade)
        draw.rectangle([x0 - 1, top - 1, x0 + side, top + side], outline="black")
        draw.text(
            (x0, top - 14),
            f"layer {sel.layer_index}: {sel.partition}, density {sel.density:.3f}",
            fill="black",
        )
        draw.text((x0, top + side + 4), "key tokens ->  (rows: query tokens)", fill="black")
    canvas.save(path, format="PNG")


def _panel_text(sel: LayerSelection) -> bool:
    return sel.layout.text_tokens > 0


def _wrap(text: str, width: int) -> str:
    """``text`` broken at ``"; "`` into lines of about ``width`` characters."""
    lines, line = [], ""
    for part in text.split("; "):
        if line and len(line) + len(part) + 2 > width:
            lines.append(line + ";")
            line = part
        else:
            line = f"{line}; {part}" if line else part
    return "\n".join([*lines, line])
