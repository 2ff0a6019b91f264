"""Adapters for diffusers video transformers (written against diffusers 0.42).

Every family here flattens its video tokens frame-major (``t * Y * X + y * X + x``); the tiny-model
tests check that for each one by perturbing one input location and watching which query row of
the first video self-attention changes.

Limitations, per family (the pass leaves a call dense when it cannot honour it; these notes say
when that happens and what an adapter cannot describe):

* **wan** (``WanTransformer3DModel``, ``SkyReelsV2Transformer3DModel``,
  ``WanVACETransformer3DModel``): ``attn1`` is video only; ``attn2`` is cross-attention (to text,
  and in I2V a second call to the image tokens) and is not listed. SkyReels-V2 with
  ``num_frame_per_block > 1`` (``_set_ar_attention``) passes a block-causal boolean mask to every
  ``attn1``: those calls carry a non-padding mask, so the pass leaves them dense. VACE's control
  branch (``vace_blocks.*.attn1``) attends over the same grid (control tokens are zero-padded up
  to the video's token count); it is listed after the backbone blocks.
* **cogvideox**: joint ``[text, video]`` self-attention in ``transformer_blocks.*.attn1`` (there is
  no separate cross-attention). Text length is ``encoder_hidden_states.shape[1]`` (226 in the
  pipelines). CogVideoX 1.5 (``patch_size_t`` set) reshapes, so frames, height and width must be
  multiples of the patch (the pipeline pads frames).
* **hunyuan_video**: joint ``[video, text]`` in ``transformer_blocks.*.attn`` and
  ``single_transformer_blocks.*.attn``, always with a boolean key-padding mask
  (``text_key_padding=True``; the model assumes right-padded text). The token refiner's
  self-attention (``context_embedder.token_refiner``) is text only and not listed. The I2V
  variants (``image_condition_type="token_replace"`` / ``"latent_concat"``) keep the same layout.
  HunyuanVideo 1.5 and FramePack are other classes (extra context tokens) and are not handled.
* **hunyuan_image** (``HunyuanImageTransformer2DModel`` on 5-D input, a 3-entry
  ``patch_size``): joint ``[video, text]`` in ``transformer_blocks.*.attn`` and
  ``single_transformer_blocks.*.attn`` with the boolean key-padding mask the model pads True
  over the video keys (``text_key_padding=True``); the second text encoder's tokens join the
  text. 4-D (image) input is not a video: every call stays dense with that reason. The token
  refiner's self-attention is text only and not listed.
* **ltx_video**: the model takes packed tokens; the grid is the ``num_frames``, ``height``,
  ``width`` arguments (the RoPE grid), which must multiply to ``S``. The conditioning path
  (``video_coords``, used by ``LTXConditionPipeline`` and the long multi-prompt pipeline) prepends
  conditioning tokens and positions tokens by explicit coordinates, not a box grid: NYI.
* **mochi**: joint ``[video, text]`` self-attention, but the processor loops over the batch and
  drops padded text per sample (``torch.nonzero``), so each layer makes ``B`` SDPA calls of batch
  1 and ``S_b = N + valid_text_b``. Those lengths are data-dependent: under ``torch.compile`` each
  distinct valid-text length is a distinct shape. The text pooler's SDPA (``time_embed.pooler``)
  is text only and not listed.
* **allegro**: ``attn1`` is video only, ``attn2`` cross. The per-frame 2-D patch embedding never
  patches time, so frames are not divided by ``config.patch_size_t``. A user ``attention_mask``
  (pixel-space video mask) becomes an additive mask on every ``attn1``: the pass leaves those
  calls dense.
* **cosmos**: ``attn1`` is video only, ``attn2`` cross (two calls with Cosmos 2.5's image
  context). The patch embedding reshapes, so frames, height and width must be multiples of
  ``config.patch_size``. ``CosmosControlNetModel`` is not handled.
* **easyanimate**: joint ``[text, video]`` in ``transformer_blocks.*.attn1`` (MMDiT and plain
  blocks alike); text is ``encoder_hidden_states`` then ``encoder_hidden_states_t5``. The model
  passes no text mask, so padded text is attended by the model itself.

All adapters assume the default ``native`` diffusers attention backend for the families that
call ``dispatch_attention_fn`` (Wan, SkyReels-V2, VACE, HunyuanVideo, LTX, Cosmos): with another
backend (``set_attention_backend``) or context parallelism those models never call torch SDPA.
"""

from __future__ import annotations

from typing import cast

import torch

from ..layout import TextPosition
from .base import (
    ModelAdapter,
    VideoGrid,
    as_tuple3,
    bind_inputs,
    children,
    config_value,
    describe,
    module_names,
    require_tensor,
    tokens_along,
)

__all__ = [
    "DIFFUSERS_ADAPTERS",
    "AllegroAdapter",
    "CogVideoXAdapter",
    "CosmosAdapter",
    "EasyAnimateAdapter",
    "HunyuanImageAdapter",
    "HunyuanVideoAdapter",
    "LTXVideoAdapter",
    "MochiAdapter",
    "WanAdapter",
]

_BCFHW = "[B, C, F, H, W] (batch, channels, frames, height, width)"


def _latent_grid(
    model: torch.nn.Module,
    latents: torch.Tensor,
    patch: tuple[int, int, int],
    sources: tuple[str, str, str],
    *,
    exact: bool,
    frames_axis: int = 2,
) -> tuple[int, int, int]:
    """Tokens ``(frames, height, width)`` of a 5-D latent cut by ``patch``.

    Args:
        model: the model (for messages).
        latents: ``[B, C, F, H, W]`` (``frames_axis=2``) or ``[B, F, C, H, W]`` (``1``).
        patch: input elements per token along frames, height, width.
        sources: where each patch entry comes from, for messages.
        exact: the model reshapes (sizes must be multiples of the patch) rather than convolves.
        frames_axis: index of the frame axis in ``latents``.
    """
    f, h, w = latents.shape[frames_axis], latents.shape[3], latents.shape[4]
    return (
        tokens_along(model, "frames", f, patch[0], source=sources[0], exact=exact),
        tokens_along(model, "height", h, patch[1], source=sources[1], exact=exact),
        tokens_along(model, "width", w, patch[2], source=sources[2], exact=exact),
    )


_PATCH3 = ("config.patch_size[0]", "config.patch_size[1]", "config.patch_size[2]")
_FRAMEWISE = ("frames are not patched", "config.patch_size", "config.patch_size")


def _framewise_grid(model: torch.nn.Module, inputs: dict) -> tuple[int, int, int]:
    """``(F, H // p, W // p)``: models whose patch embedding is a per-frame Conv2d with kernel =
    stride = ``config.patch_size`` (Mochi, Allegro, EasyAnimate)."""
    x = require_tensor(model, inputs, "hidden_states", 5, _BCFHW)
    p = int(config_value(model, "patch_size"))
    return _latent_grid(model, x, (1, p, p), _FRAMEWISE, exact=False)


def _text_with_mask(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """``encoder_hidden_states`` ``[B, L, D]``, checked to come with its ``[B, L]``
    ``encoder_attention_mask`` (the key padding the model builds from it)."""
    text = require_tensor(model, inputs, "encoder_hidden_states", 3, "[B, L, D] (text)")
    mask = require_tensor(model, inputs, "encoder_attention_mask", 2, "[B, L] (1 = valid)")
    if tuple(mask.shape) != tuple(text.shape[:2]):
        raise ValueError(
            f"{type(model).__name__} expects encoder_attention_mask of shape [B, L] = "
            f"{tuple(text.shape[:2])} to match encoder_hidden_states; got "
            f"{describe(mask)}. Pass the prompt attention mask the encoder returned."
        )
    return text


def _transformer_blocks_attn1(model: torch.nn.Module) -> list[str]:
    """``transformer_blocks.N.attn1``: the video self-attention of most diffusers video DiTs."""
    return module_names(model, children(model, "transformer_blocks", "attn1"))


class WanAdapter(ModelAdapter):
    """Wan 2.1 / 2.2 (T2V, I2V, TI2V), SkyReels-V2 and Wan-VACE.

    Grid: ``hidden_states`` ``[B, C, F, H, W]`` through a Conv3d with kernel = stride =
    ``config.patch_size`` ``(p_t, p_h, p_w)``: ``(F // p_t, H // p_h, W // p_w)``. ``attn1`` sees
    video tokens only.
    """

    family = "wan"
    library = "diffusers"
    model_classes = (
        "WanTransformer3DModel",
        "SkyReelsV2Transformer3DModel",
        "WanVACETransformer3DModel",
    )

    def grid(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
        inputs = bind_inputs(model, args, kwargs)
        x = require_tensor(model, inputs, "hidden_states", 5, _BCFHW)
        patch = as_tuple3(model, "patch_size")
        frames, height, width = _latent_grid(model, x, patch, _PATCH3, exact=False)
        if hasattr(model, "vace_blocks"):
            self._check_control(model, inputs, x)
        return VideoGrid(frames, height, width, extra_tokens=0)

    @staticmethod
    def _check_control(model: torch.nn.Module, inputs: dict, x: torch.Tensor) -> None:
        # VACE zero-pads the control tokens up to the video's token count and gives them the
        # video's RoPE, so they lie on the video grid only if they share its height and width.
        control = require_tensor(model, inputs, "control_hidden_states", 5, _BCFHW)
        _, _, f, h, w = x.shape
        _, _, cf, ch, cw = control.shape
        if (ch, cw) != (h, w) or cf > f:
            raise ValueError(
                f"{type(model).__name__} lays control tokens on the video's token grid, so "
                f"control_hidden_states must have the height and width of hidden_states and at "
                f"most its frames; got control (F, H, W) = {(cf, ch, cw)} for hidden_states "
                f"{(f, h, w)}. Encode the control video at the generation size, as "
                f"WanVACEPipeline does."
            )

    def self_attention_modules(self, model: torch.nn.Module) -> list[str]:
        modules = children(model, "blocks", "attn1")
        if hasattr(model, "vace_blocks"):
            modules += children(model, "vace_blocks", "attn1")
        return module_names(model, modules)


class CogVideoXAdapter(ModelAdapter):
    """CogVideoX 1.0 and 1.5 (``CogVideoXTransformer3DModel``): joint ``[text, video]``.

    Grid: ``hidden_states`` is ``[B, F, C, H, W]`` (frames before channels). 1.0 patches each
    frame with a Conv2d: ``(F, H // p, W // p)``; 1.5 (``config.patch_size_t`` set) reshapes:
    ``(F / p_t, H / p, W / p)``, exact.
    """

    family = "cogvideox"
    library = "diffusers"
    model_classes = ("CogVideoXTransformer3DModel",)

    def grid(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
        inputs = bind_inputs(model, args, kwargs)
        x = require_tensor(
            model, inputs, "hidden_states", 5, "[B, F, C, H, W] (frames before channels)"
        )
        text = require_tensor(model, inputs, "encoder_hidden_states", 3, "[B, L, D] (text)")
        p = int(config_value(model, "patch_size"))
        p_t = config_value(model, "patch_size_t")
        if p_t is None:
            patch, exact = (1, p, p), False
            sources = ("frames are not patched", "config.patch_size", "config.patch_size")
        else:
            patch, exact = (int(p_t), p, p), True
            sources = ("config.patch_size_t", "config.patch_size", "config.patch_size")
        grid = _latent_grid(model, x, patch, sources, exact=exact, frames_axis=1)
        return VideoGrid(*grid, text_position=TextPosition.PREFIX, extra_tokens=text.shape[1])

    def self_attention_modules(self, model: torch.nn.Module) -> list[str]:
        return _transformer_blocks_attn1(model)


class HunyuanVideoAdapter(ModelAdapter):
    """HunyuanVideo (``HunyuanVideoTransformer3DModel``): joint ``[video, text]`` + key padding.

    Grid: Conv3d with kernel = stride = ``(patch_size_t, patch_size, patch_size)``. The model
    builds a boolean ``[B, 1, 1, N + L]`` mask that is True on every video key and on the first
    ``encoder_attention_mask[b].sum()`` text keys: ``text_key_padding=True``.
    """

    family = "hunyuan_video"
    library = "diffusers"
    model_classes = ("HunyuanVideoTransformer3DModel",)

    def grid(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
        inputs = bind_inputs(model, args, kwargs)
        x = require_tensor(model, inputs, "hidden_states", 5, _BCFHW)
        _text_with_mask(model, inputs)  # checked: the key padding comes from this mask
        p, p_t = int(config_value(model, "patch_size")), int(config_value(model, "patch_size_t"))
        sources = ("config.patch_size_t", "config.patch_size", "config.patch_size")
        grid = _latent_grid(model, x, (p_t, p, p), sources, exact=False)
        return VideoGrid(*grid, text_position=TextPosition.SUFFIX, text_key_padding=True)

    def self_attention_modules(self, model: torch.nn.Module) -> list[str]:
        modules = children(model, "transformer_blocks", "attn")
        modules += children(model, "single_transformer_blocks", "attn")
        return module_names(model, modules)


class HunyuanImageAdapter(ModelAdapter):
    """HunyuanImage-2.1 on video latents (``HunyuanImageTransformer2DModel``, 5-D input):
    joint ``[video, text]`` with key padding.

    Grid: Conv3d with kernel = stride = ``config.patch_size`` (three entries). The model pads
    ``encoder_attention_mask`` (and the second encoder's, after reordering valid text first)
    with True over the video keys into a boolean ``[B, 1, 1, N + L]`` mask:
    ``text_key_padding=True``, exactly ``L`` text tokens after the video.
    """

    family = "hunyuan_image"
    library = "diffusers"
    model_classes = ("HunyuanImageTransformer2DModel",)

    def grid(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
        inputs = bind_inputs(model, args, kwargs)
        x = inputs.get("hidden_states")
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            raise NotImplementedError(
                f"{type(model).__name__} got hidden_states {describe(x)}: an image (4-D), not a "
                f"video; VMoBA partitions frames, so image calls stay dense. Pass 5-D video "
                f"latents {_BCFHW} with a 3-entry config.patch_size."
            )
        x = require_tensor(model, inputs, "hidden_states", 5, _BCFHW)
        text = _text_with_mask(model, inputs)
        patch = config_value(model, "patch_size")
        if not (isinstance(patch, (tuple, list)) and len(patch) == 3):
            raise NotImplementedError(
                f"{type(model).__name__}: config.patch_size={patch!r} has no temporal entry, "
                f"so 5-D input is not patched as a video; VMoBA needs a 3-entry patch_size."
            )
        grid = _latent_grid(model, x, as_tuple3(model, "patch_size"), _PATCH3, exact=False)
        extra = int(text.shape[1])
        text_2 = inputs.get("encoder_hidden_states_2")
        if isinstance(text_2, torch.Tensor) and getattr(model, "context_embedder_2", None):
            extra += int(text_2.shape[1])
        return VideoGrid(
            *grid, text_position=TextPosition.SUFFIX, text_key_padding=True, extra_tokens=extra
        )

    def self_attention_modules(self, model: torch.nn.Module) -> list[str]:
        modules = children(model, "transformer_blocks", "attn")
        modules += children(model, "single_transformer_blocks", "attn")
        return module_names(model, modules)


class LTXVideoAdapter(ModelAdapter):
    """LTX-Video (``LTXVideoTransformer3DModel``): packed tokens, grid from the call.

    The model does not patchify: ``hidden_states`` is ``[B, S, C]`` tokens packed frame-major by
    the pipeline, and ``num_frames``, ``height``, ``width`` (latent tokens) give the RoPE grid.
    """

    family = "ltx_video"
    library = "diffusers"
    model_classes = ("LTXVideoTransformer3DModel",)

    def grid(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
        inputs = bind_inputs(model, args, kwargs)
        x = require_tensor(model, inputs, "hidden_states", 3, "[B, S, C] (packed latent tokens)")
        if inputs.get("video_coords") is not None:
            raise NotImplementedError(
                f"NYI: {type(model).__name__} called with video_coords (the LTXConditionPipeline "
                f"path) places its tokens by explicit coordinates and prepends conditioning "
                f"tokens, so they are not a frames x height x width box VMoBA can chunk. Run this "
                f"model dense, or call it with num_frames/height/width and no video_coords."
            )
        dims = {name: inputs.get(name) for name in ("num_frames", "height", "width")}
        for name, value in dims.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"{type(model).__name__} takes packed tokens, so the token grid comes from "
                    f"its num_frames, height and width arguments (latent frames/height/width "
                    f"after patchify); got {name}={describe(dims[name])}. Pass them as "
                    f"LTXPipeline does: num_frames=latent_num_frames, height=latent_height, "
                    f"width=latent_width."
                )
        checked = cast("dict[str, int]", dims)  # each an int >= 1 (above)
        grid = VideoGrid(checked["num_frames"], checked["height"], checked["width"], extra_tokens=0)
        seq = int(x.shape[1])
        if grid.video_tokens != seq:
            raise ValueError(
                f"{type(model).__name__} got num_frames x height x width = {dims['num_frames']} "
                f"x {dims['height']} x {dims['width']} = {grid.video_tokens} tokens but "
                f"hidden_states holds S={seq}. Pass the latent token grid the tokens were packed "
                f"from."
            )
        return grid

    def self_attention_modules(self, model: torch.nn.Module) -> list[str]:
        return _transformer_blocks_attn1(model)


class MochiAdapter(ModelAdapter):
    """Mochi 1 (``MochiTransformer3DModel``): joint ``[video, valid text]`` per sample.

    Grid: frames are not patched; each frame goes through a Conv2d with kernel = stride =
    ``config.patch_size``: ``(F, H // p, W // p)``.
    """

    family = "mochi"
    library = "diffusers"
    model_classes = ("MochiTransformer3DModel",)
    data_dependent_text = True  # torch.nonzero(encoder_attention_mask) per sample

    def grid(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
        inputs = bind_inputs(model, args, kwargs)
        grid = _framewise_grid(model, inputs)
        require_tensor(model, inputs, "encoder_hidden_states", 3, "[B, L, D] (text)")
        require_tensor(model, inputs, "encoder_attention_mask", 2, "[B, L] (1 = valid)")
        return VideoGrid(*grid, text_position=TextPosition.SUFFIX)

    def self_attention_modules(self, model: torch.nn.Module) -> list[str]:
        return _transformer_blocks_attn1(model)


class AllegroAdapter(ModelAdapter):
    """Allegro (``AllegroTransformer3DModel``): video-only ``attn1``.

    Grid: each frame goes through a Conv2d with kernel = stride = ``config.patch_size``:
    ``(F, H // p, W // p)`` (time is never patched, whatever ``config.patch_size_t``).
    """

    family = "allegro"
    library = "diffusers"
    model_classes = ("AllegroTransformer3DModel",)

    def grid(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
        grid = _framewise_grid(model, bind_inputs(model, args, kwargs))
        return VideoGrid(*grid, extra_tokens=0)

    def self_attention_modules(self, model: torch.nn.Module) -> list[str]:
        return _transformer_blocks_attn1(model)


class CosmosAdapter(ModelAdapter):
    """Cosmos 1.0 / 2 / 2.5 (``CosmosTransformer3DModel``): video-only ``attn1``.

    Grid: the patch embedding reshapes by ``config.patch_size`` ``(p_t, p_h, p_w)``:
    ``(F / p_t, H / p_h, W / p_w)``, exact.
    """

    family = "cosmos"
    library = "diffusers"
    model_classes = ("CosmosTransformer3DModel",)

    def grid(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
        inputs = bind_inputs(model, args, kwargs)
        x = require_tensor(model, inputs, "hidden_states", 5, _BCFHW)
        patch = as_tuple3(model, "patch_size")
        return VideoGrid(*_latent_grid(model, x, patch, _PATCH3, exact=True), extra_tokens=0)

    def self_attention_modules(self, model: torch.nn.Module) -> list[str]:
        return _transformer_blocks_attn1(model)


class EasyAnimateAdapter(ModelAdapter):
    """EasyAnimate V5.1 (``EasyAnimateTransformer3DModel``): joint ``[text, video]``.

    Grid: frames are not patched; each frame goes through a Conv2d with kernel = stride =
    ``config.patch_size``: ``(F, H // p, W // p)``. Text is ``encoder_hidden_states`` followed by
    ``encoder_hidden_states_t5`` when given.
    """

    family = "easyanimate"
    library = "diffusers"
    model_classes = ("EasyAnimateTransformer3DModel",)

    def grid(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
        inputs = bind_inputs(model, args, kwargs)
        grid = _framewise_grid(model, inputs)
        require_tensor(model, inputs, "encoder_hidden_states", 3, "[B, L, D] (text)")
        return VideoGrid(*grid, text_position=TextPosition.PREFIX)

    def self_attention_modules(self, model: torch.nn.Module) -> list[str]:
        return _transformer_blocks_attn1(model)


DIFFUSERS_ADAPTERS: tuple[ModelAdapter, ...] = (
    WanAdapter(),
    CogVideoXAdapter(),
    HunyuanVideoAdapter(),
    HunyuanImageAdapter(),
    LTXVideoAdapter(),
    MochiAdapter(),
    AllegroAdapter(),
    CosmosAdapter(),
    EasyAnimateAdapter(),
)
