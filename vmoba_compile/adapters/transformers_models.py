"""Adapters for transformers video encoders (written against transformers 5.x).

Both families patchify ``pixel_values`` ``[B, F, C, H, W]`` with a Conv3d whose kernel equals its
stride and flatten the tokens frame-major. Their SDPA goes through transformers'
``sdpa_attention_forward`` only when ``config._attn_implementation == "sdpa"`` (the default where
torch SDPA is available); with ``"eager"``, ``"flash_attention_2"`` or ``"flex_attention"`` no SDPA
call is made, so nothing is rewritten.

Limitations:

* **videomae** (``VideoMAEModel``, ``VideoMAEForVideoClassification``): no CLS token, so the
  self-attention holds video only. With ``bool_masked_pos`` only the visible tokens are kept and
  the sequence is no longer a box grid: NYI. ``VideoMAEForPreTraining`` (always masked, plus a
  decoder over visible + mask tokens) is not handled. The fixed sinusoidal position table ties
  the model to ``config.image_size`` and ``config.num_frames``.
* **vivit** (``VivitModel``, ``VivitForVideoClassification``): one CLS token before the video
  tokens (``text_position=PREFIX``; the pass infers 1 non-video token from ``S``). A user
  ``attention_mask`` (or, in transformers 4.x, a ``head_mask``) reaches SDPA as a mask, so the pass
  leaves those calls dense. The position table ties the model to its config size
  (``interpolate_pos_encoding`` only works for single-tubelet clips). The transformers 4.x module
  layout (``encoder.layer.*.attention.attention``) is supported from reading its source; only 5.x
  is tested.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..layout import TextPosition
from .base import (
    ModelAdapter,
    VideoGrid,
    bind_inputs,
    children,
    config_value,
    module_names,
    require_tensor,
    tokens_along,
)

__all__ = ["TRANSFORMERS_ADAPTERS", "VideoMAEAdapter", "VivitAdapter"]

_BFCHW = "[B, F, C, H, W] (batch, frames, channels, height, width)"


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The encoder inside a task head (``model.videomae``, ``model.vivit``), or ``model``."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, torch.nn.Module) else model


def _pixel_grid(
    model: torch.nn.Module, pixels: torch.Tensor, patch: tuple[int, int, int], sources: tuple
) -> tuple[int, int, int]:
    _, f, _, h, w = pixels.shape
    return (
        tokens_along(model, "frames", f, patch[0], source=sources[0], exact=False),
        tokens_along(model, "height", h, patch[1], source=sources[1], exact=False),
        tokens_along(model, "width", w, patch[2], source=sources[2], exact=False),
    )


class VideoMAEAdapter(ModelAdapter):
    """VideoMAE: grid ``(F // tubelet_size, H // patch_size, W // patch_size)``, video only."""

    family = "videomae"
    library = "transformers"
    model_classes = ("VideoMAEModel", "VideoMAEForVideoClassification")

    def grid(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
        inputs = bind_inputs(model, args, kwargs)
        pixels = require_tensor(model, inputs, "pixel_values", 5, _BFCHW)
        if inputs.get("bool_masked_pos") is not None:
            raise NotImplementedError(
                f"NYI: {type(model).__name__} called with bool_masked_pos keeps only the visible "
                f"tokens, which are not a frames x height x width box VMoBA can chunk. Run masked "
                f"pre-training dense, or call the model without bool_masked_pos."
            )
        p = config_value(model, "patch_size")
        ph, pw = (int(p[0]), int(p[1])) if isinstance(p, Sequence) else (int(p), int(p))
        t = int(config_value(model, "tubelet_size"))
        sources = ("config.tubelet_size", "config.patch_size", "config.patch_size")
        return VideoGrid(*_pixel_grid(model, pixels, (t, ph, pw), sources))

    def self_attention_modules(self, model: torch.nn.Module) -> list[str]:
        base = _base_model(model)
        return module_names(
            model, children(model, "encoder.layer", "attention.attention", root=base)
        )


class VivitAdapter(ModelAdapter):
    """ViViT: grid ``(F // t, H // h, W // w)`` for ``tubelet_size = (t, h, w)``, CLS first."""

    family = "vivit"
    library = "transformers"
    model_classes = ("VivitModel", "VivitForVideoClassification")

    def grid(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
        inputs = bind_inputs(model, args, kwargs)
        pixels = require_tensor(model, inputs, "pixel_values", 5, _BFCHW)
        tub = config_value(model, "tubelet_size")
        if not isinstance(tub, Sequence) or len(tub) != 3:
            raise RuntimeError(
                f"{type(model).__name__}.config.tubelet_size should be 3 ints (t, h, w); got "
                f"{tub!r}."
            )
        patch = (int(tub[0]), int(tub[1]), int(tub[2]))
        sources = ("config.tubelet_size[0]", "config.tubelet_size[1]", "config.tubelet_size[2]")
        return VideoGrid(
            *_pixel_grid(model, pixels, patch, sources), text_position=TextPosition.PREFIX
        )

    def self_attention_modules(self, model: torch.nn.Module) -> list[str]:
        base = _base_model(model)
        if hasattr(base, "layers"):  # transformers 5.x: VivitAttention makes the SDPA call
            modules = children(model, "layers", "attention", root=base)
        else:  # transformers 4.x: VivitSelfAttention inside encoder.layer[i].attention
            modules = children(model, "encoder.layer", "attention.attention", root=base)
        return module_names(model, modules)


TRANSFORMERS_ADAPTERS: tuple[ModelAdapter, ...] = (VideoMAEAdapter(), VivitAdapter())
