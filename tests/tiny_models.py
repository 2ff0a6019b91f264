"""Tiny random-weight video transformers of every supported family, with example inputs.

``build(family, **overrides)`` returns ``(model, args, kwargs)``: the model in eval mode
(float32, CPU, seeded) and inputs for one forward call, ``model(*args, **kwargs)``. ``overrides``
are config keyword arguments merged over the family's tiny config. ``build_inputs(family, model,
resolution_variant)`` makes inputs at another token grid for the same model (variant 0 is the
default grid), so tests can check that the grid is re-derived when the resolution changes.

The token grids here are the ground truth the adapter tests compare against: they are written by
hand, deliberately non-square (height != width) and at least 2 x 4 x 4 tokens, so that 1D, 2D and
3D partitions are all non-trivial and an adapter that swaps axes fails. ``perturb`` changes the
model input under exactly one video token, for the bump probe.

diffusers and transformers are imported inside the builders only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "ADAPTER_FAMILY",
    "FAMILIES",
    "FIXED_RESOLUTION",
    "TinyFamily",
    "build",
    "build_inputs",
    "expected_grid",
    "perturb",
    "spec",
]

Grid = tuple[int, int, int]
Inputs = tuple[tuple, dict]


@dataclasses.dataclass(frozen=True)
class TinyFamily:
    """How to build one tiny model and its inputs.

    Attributes:
        name: name of the tiny model (a key of :data:`FAMILIES`).
        adapter_family: the ``ModelAdapter.family`` that must handle it.
        make: builds the model from config keyword arguments.
        config: the tiny config.
        grids: the token grid ``(frames, height, width)`` of each resolution variant; empty for
            fixed-resolution models, whose grid follows their config.
        patch: input elements per token along frames, height, width.
        layout: ``"BCFHW"``, ``"BFCHW"`` or ``"packed"`` (``[B, S, C]`` frame-major tokens).
        make_inputs: ``(model, grid, generator) -> (args, kwargs)``.
        text_position: ``"prefix"`` / ``"suffix"`` when the self-attention sequence holds
            non-video tokens, else None.
        text_tokens: the non-video token counts the self-attention calls may hold (one per
            sample for Mochi, which drops padded text).
    """

    name: str
    adapter_family: str
    make: Callable[..., torch.nn.Module]
    config: dict[str, Any]
    grids: tuple[Grid, ...]
    patch: Grid
    layout: str
    make_inputs: Callable[[torch.nn.Module, Grid, torch.Generator], Inputs]
    text_position: str | None = None
    text_tokens: tuple[int, ...] = (0,)


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _latent(g: torch.Generator, b: int, c: int, grid: Grid, patch: Grid) -> torch.Tensor:
    """``[B, C, F, H, W]`` latents that patchify to ``grid``."""
    return _randn(g, b, c, grid[0] * patch[0], grid[1] * patch[1], grid[2] * patch[2])


# ------------------------------------------------------------------------------ diffusers


def _diffusers(name: str) -> Callable[..., torch.nn.Module]:
    def make(**config: Any) -> torch.nn.Module:
        import diffusers

        return getattr(diffusers, name)(**config)

    return make


_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=256,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)


def _wan_inputs(model: torch.nn.Module, grid: Grid, g: torch.Generator) -> Inputs:
    cfg = model.config
    x = _latent(g, 1, cfg.in_channels, grid, (1, 2, 2))
    args = (x, torch.tensor([500]), _randn(g, 1, 12, cfg.text_dim))
    kwargs: dict[str, Any] = {}
    if cfg.image_dim is not None:  # I2V: the processor splits off exactly 512 text tokens
        args = (x, torch.tensor([500]), _randn(g, 1, 512, cfg.text_dim))
        kwargs["encoder_hidden_states_image"] = _randn(g, 1, 5, cfg.image_dim)
    if "vace_in_channels" in cfg:
        kwargs["control_hidden_states"] = _latent(g, 1, cfg.vace_in_channels, grid, (1, 2, 2))
    return args, kwargs


def _cogvideox_inputs(model: torch.nn.Module, grid: Grid, g: torch.Generator) -> Inputs:
    cfg = model.config
    p_t = cfg.patch_size_t or 1
    t, y, x = grid
    kwargs: dict[str, Any] = dict(
        hidden_states=_randn(g, 1, t * p_t, cfg.in_channels, y * 2, x * 2),  # [B, F, C, H, W]
        encoder_hidden_states=_randn(g, 1, cfg.max_text_seq_length, cfg.text_embed_dim),
        timestep=torch.tensor([500]),
    )
    if cfg.use_rotary_positional_embeddings:  # 1.5: the pipeline computes RoPE for the grid
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        kwargs["image_rotary_emb"] = get_3d_rotary_pos_embed(
            embed_dim=cfg.attention_head_dim,
            crops_coords=None,
            grid_size=(y, x),
            temporal_size=t,
            grid_type="slice",
            max_size=(y, x),
        )
    return (), kwargs


def _hunyuan_inputs(model: torch.nn.Module, grid: Grid, g: torch.Generator) -> Inputs:
    mask = torch.ones(2, 12)
    mask[1, 8:] = 0  # sample 1: 8 valid text tokens, 4 right-padded
    return (), dict(
        hidden_states=_latent(g, 2, 4, grid, (1, 2, 2)),
        timestep=torch.tensor([500, 500]),
        encoder_hidden_states=_randn(g, 2, 12, 16),
        encoder_attention_mask=mask,
        pooled_projections=_randn(g, 2, 8),
        guidance=torch.tensor([3000.0, 3000.0]),
    )


def _hunyuan_image_inputs(model: torch.nn.Module, grid: Grid, g: torch.Generator) -> Inputs:
    mask = torch.ones(2, 12)
    mask[1, 8:] = 0  # sample 1: 8 valid text tokens, 4 padded
    return (), dict(
        hidden_states=_latent(g, 2, 4, grid, (1, 2, 2)),
        timestep=torch.tensor([500.0, 500.0]),
        encoder_hidden_states=_randn(g, 2, 12, 16),
        encoder_attention_mask=mask,
    )


def _ltx_inputs(model: torch.nn.Module, grid: Grid, g: torch.Generator) -> Inputs:
    t, y, x = grid
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False
    return (), dict(
        hidden_states=_randn(g, 2, t * y * x, 4),  # packed frame-major, as LTXPipeline packs
        encoder_hidden_states=_randn(g, 2, 16, 16),
        timestep=torch.tensor([500, 500]),
        encoder_attention_mask=mask,
        num_frames=t,
        height=y,
        width=x,
    )


def _mochi_inputs(model: torch.nn.Module, grid: Grid, g: torch.Generator) -> Inputs:
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False  # sample 1: 10 valid text tokens
    return (), dict(
        hidden_states=_latent(g, 2, 4, grid, (1, 2, 2)),
        encoder_hidden_states=_randn(g, 2, 16, 16),
        timestep=torch.tensor([500, 500]),
        encoder_attention_mask=mask,
    )


def _allegro_inputs(model: torch.nn.Module, grid: Grid, g: torch.Generator) -> Inputs:
    return (), dict(
        hidden_states=_latent(g, 2, 4, grid, (1, 2, 2)),
        encoder_hidden_states=_randn(g, 2, 16, 8),
        timestep=torch.tensor([500, 500]),
    )


def _cosmos_inputs(model: torch.nn.Module, grid: Grid, g: torch.Generator) -> Inputs:
    return (), dict(
        hidden_states=_latent(g, 1, 4, grid, (1, 2, 2)),
        timestep=torch.tensor([500]),
        encoder_hidden_states=_randn(g, 1, 12, 16),
        attention_mask=torch.ones(1, 12),
        fps=30,
    )


def _easyanimate_inputs(model: torch.nn.Module, grid: Grid, g: torch.Generator) -> Inputs:
    kwargs: dict[str, Any] = dict(
        hidden_states=_latent(g, 2, 4, grid, (1, 2, 2)),
        timestep=torch.tensor([500, 500]),
        encoder_hidden_states=_randn(g, 2, 16, 16),
    )
    if model.config.text_embed_dim_t5 is not None:
        kwargs["encoder_hidden_states_t5"] = _randn(g, 2, 6, model.config.text_embed_dim_t5)
    return (), kwargs


# --------------------------------------------------------------------------- transformers


def _videomae(**config: Any) -> torch.nn.Module:
    from transformers import VideoMAEConfig, VideoMAEModel

    return VideoMAEModel(VideoMAEConfig(attn_implementation="sdpa", **config))


def _videomae_classification(**config: Any) -> torch.nn.Module:
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    return VideoMAEForVideoClassification(
        VideoMAEConfig(num_labels=3, attn_implementation="sdpa", **config)
    )


def _vivit(**config: Any) -> torch.nn.Module:
    from transformers import VivitConfig, VivitModel

    return VivitModel(VivitConfig(attn_implementation="sdpa", **config))


def _vivit_classification(**config: Any) -> torch.nn.Module:
    from transformers import VivitConfig, VivitForVideoClassification

    return VivitForVideoClassification(
        VivitConfig(num_labels=3, attn_implementation="sdpa", **config)
    )


def _pixel_inputs(model: torch.nn.Module, grid: Grid, g: torch.Generator) -> Inputs:
    cfg = model.config
    h, w = cfg.image_size if isinstance(cfg.image_size, (list, tuple)) else (cfg.image_size,) * 2
    pixels = _randn(g, 1, cfg.num_frames, cfg.num_channels, h, w)  # [B, F, C, H, W]
    return (pixels,), {}


_VIDEOMAE = dict(
    image_size=(32, 40),
    patch_size=8,
    num_channels=3,
    num_frames=4,
    tubelet_size=2,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
)
_VIVIT = dict(
    image_size=(32, 40),
    num_frames=4,
    tubelet_size=[2, 8, 8],
    num_channels=3,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
)

# Second grids change every axis (and swap the height/width aspect) so a stale grid cannot pass.
_G0, _G1 = (3, 4, 6), (2, 6, 4)

_HUNYUAN = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=10,
    num_layers=1,
    num_single_layers=1,
    num_refiner_layers=1,
    patch_size=2,
    patch_size_t=1,
    guidance_embeds=True,
    text_embed_dim=16,
    pooled_projection_dim=8,
    rope_axes_dim=(2, 4, 4),
)

_HUNYUAN_IMAGE = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=1,
    num_single_layers=1,
    num_refiner_layers=1,
    patch_size=(1, 2, 2),
    text_embed_dim=16,
    rope_axes_dim=(4, 6, 6),
)

_EASYANIMATE = dict(
    attention_head_dim=16,
    num_attention_heads=2,
    in_channels=4,
    mmdit_layers=1,
    num_layers=2,
    out_channels=4,
    patch_size=2,
    sample_height=60,
    sample_width=90,
    text_embed_dim=16,
    time_embed_dim=8,
    time_position_encoding_type="3d_rope",
    timestep_activation_fn="silu",
)

_VIDEOMAE_SPEC = TinyFamily(
    name="videomae",
    adapter_family="videomae",
    make=_videomae,
    config=_VIDEOMAE,
    grids=(),
    patch=(2, 8, 8),
    layout="BFCHW",
    make_inputs=_pixel_inputs,
)
_VIVIT_SPEC = TinyFamily(
    name="vivit",
    adapter_family="vivit",
    make=_vivit,
    config=_VIVIT,
    grids=(),
    patch=(2, 8, 8),
    layout="BFCHW",
    make_inputs=_pixel_inputs,
    text_position="prefix",
    text_tokens=(1,),
)

_SPECS: tuple[TinyFamily, ...] = (
    TinyFamily(
        name="wan",
        adapter_family="wan",
        make=_diffusers("WanTransformer3DModel"),
        config=_WAN,
        grids=(_G0, _G1),
        patch=(1, 2, 2),
        layout="BCFHW",
        make_inputs=_wan_inputs,
    ),
    TinyFamily(
        name="wan_i2v",
        adapter_family="wan",
        make=_diffusers("WanTransformer3DModel"),
        config={**_WAN, "num_layers": 1, "image_dim": 16, "added_kv_proj_dim": 24},
        grids=(_G0, _G1),
        patch=(1, 2, 2),
        layout="BCFHW",
        make_inputs=_wan_inputs,
    ),
    TinyFamily(
        name="skyreels_v2",
        adapter_family="wan",
        make=_diffusers("SkyReelsV2Transformer3DModel"),
        config=_WAN,
        grids=((4, 4, 6), _G1),
        patch=(1, 2, 2),
        layout="BCFHW",
        make_inputs=_wan_inputs,
    ),
    TinyFamily(
        name="wan_vace",
        adapter_family="wan",
        make=_diffusers("WanVACETransformer3DModel"),
        config={
            **_WAN,
            "in_channels": 16,
            "out_channels": 16,
            "text_dim": 32,
            "num_layers": 4,
            "vace_layers": [0, 2],
            "vace_in_channels": 48,
        },
        grids=(_G0, _G1),
        patch=(1, 2, 2),
        layout="BCFHW",
        make_inputs=_wan_inputs,
    ),
    TinyFamily(
        name="cogvideox",
        adapter_family="cogvideox",
        make=_diffusers("CogVideoXTransformer3DModel"),
        config=dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            time_embed_dim=2,
            text_embed_dim=8,
            num_layers=2,
            sample_width=8,
            sample_height=8,
            sample_frames=8,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=8,
        ),
        grids=((2, 4, 6), (3, 6, 4)),
        patch=(1, 2, 2),
        layout="BFCHW",
        make_inputs=_cogvideox_inputs,
        text_position="prefix",
        text_tokens=(8,),
    ),
    TinyFamily(
        name="cogvideox15",
        adapter_family="cogvideox",
        make=_diffusers("CogVideoXTransformer3DModel"),
        config=dict(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            time_embed_dim=2,
            text_embed_dim=8,
            num_layers=1,
            sample_width=12,
            sample_height=8,
            sample_frames=8,
            patch_size=2,
            patch_size_t=2,
            temporal_compression_ratio=4,
            max_text_seq_length=10,
            use_rotary_positional_embeddings=True,
        ),
        grids=((2, 4, 6), (3, 6, 4)),
        patch=(2, 2, 2),
        layout="BFCHW",
        make_inputs=_cogvideox_inputs,
        text_position="prefix",
        text_tokens=(10,),
    ),
    TinyFamily(
        name="hunyuan_video",
        adapter_family="hunyuan_video",
        make=_diffusers("HunyuanVideoTransformer3DModel"),
        config=_HUNYUAN,
        grids=(_G0, _G1),
        patch=(1, 2, 2),
        layout="BCFHW",
        make_inputs=_hunyuan_inputs,
        text_position="suffix",
        text_tokens=(12,),
    ),
    TinyFamily(
        name="hunyuan_video_token_replace",
        adapter_family="hunyuan_video",
        make=_diffusers("HunyuanVideoTransformer3DModel"),
        config=dict(_HUNYUAN, image_condition_type="token_replace"),  # I2V: other block classes
        grids=(_G0, _G1),
        patch=(1, 2, 2),
        layout="BCFHW",
        make_inputs=_hunyuan_inputs,
        text_position="suffix",
        text_tokens=(12,),
    ),
    TinyFamily(
        name="ltx_video",
        adapter_family="ltx_video",
        make=_diffusers("LTXVideoTransformer3DModel"),
        config=dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=2,
            qk_norm="rms_norm_across_heads",
            caption_channels=16,
        ),
        grids=(_G0, _G1),
        patch=(1, 1, 1),
        layout="packed",
        make_inputs=_ltx_inputs,
    ),
    TinyFamily(
        name="mochi",
        adapter_family="mochi",
        make=_diffusers("MochiTransformer3DModel"),
        config=dict(
            patch_size=2,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=2,
            pooled_projection_dim=16,
            in_channels=4,
            out_channels=None,
            qk_norm="rms_norm",
            text_embed_dim=16,
            time_embed_dim=4,
            activation_fn="swiglu",
            max_sequence_length=16,
        ),
        grids=(_G0, _G1),
        patch=(1, 2, 2),
        layout="BCFHW",
        make_inputs=_mochi_inputs,
        text_position="suffix",
        text_tokens=(16, 10),
    ),
    TinyFamily(
        name="allegro",
        adapter_family="allegro",
        make=_diffusers("AllegroTransformer3DModel"),
        config=dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            cross_attention_dim=16,
            sample_width=8,
            sample_height=8,
            sample_frames=8,
            caption_channels=8,
        ),
        grids=(_G0, _G1),
        patch=(1, 2, 2),
        layout="BCFHW",
        make_inputs=_allegro_inputs,
    ),
    TinyFamily(
        name="cosmos",
        adapter_family="cosmos",
        make=_diffusers("CosmosTransformer3DModel"),
        config=dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=12,
            num_layers=2,
            mlp_ratio=2,
            text_embed_dim=16,
            adaln_lora_dim=4,
            max_size=(4, 32, 32),
            patch_size=(1, 2, 2),
            rope_scale=(2.0, 1.0, 1.0),
            concat_padding_mask=False,  # True (the checkpoints' default) needs torchvision
            extra_pos_embed_type="learnable",
        ),
        grids=(_G0, _G1),
        patch=(1, 2, 2),
        layout="BCFHW",
        make_inputs=_cosmos_inputs,
    ),
    TinyFamily(
        name="easyanimate",
        adapter_family="easyanimate",
        make=_diffusers("EasyAnimateTransformer3DModel"),
        config=_EASYANIMATE,
        grids=((2, 4, 6), (3, 6, 4)),
        patch=(1, 2, 2),
        layout="BCFHW",
        make_inputs=_easyanimate_inputs,
        text_position="prefix",
        text_tokens=(16,),
    ),
    TinyFamily(
        name="easyanimate_t5",
        adapter_family="easyanimate",
        make=_diffusers("EasyAnimateTransformer3DModel"),
        config=dict(_EASYANIMATE, mmdit_layers=2, text_embed_dim_t5=8),
        grids=((2, 4, 6), (3, 6, 4)),
        patch=(1, 2, 2),
        layout="BCFHW",
        make_inputs=_easyanimate_inputs,
        text_position="prefix",
        text_tokens=(22,),
    ),
    _VIDEOMAE_SPEC,
    dataclasses.replace(
        _VIDEOMAE_SPEC, name="videomae_classification", make=_videomae_classification
    ),
    _VIVIT_SPEC,
    dataclasses.replace(_VIVIT_SPEC, name="vivit_classification", make=_vivit_classification),
    # Appended: test_api.sparse_config rotates its configs by a family's index.
    TinyFamily(
        name="hunyuan_image",
        adapter_family="hunyuan_image",
        make=_diffusers("HunyuanImageTransformer2DModel"),
        config=_HUNYUAN_IMAGE,
        grids=(_G0, _G1),
        patch=(1, 2, 2),
        layout="BCFHW",
        make_inputs=_hunyuan_image_inputs,
        text_position="suffix",
        text_tokens=(12,),
    ),
)

_BY_NAME = {s.name: s for s in _SPECS}

FAMILIES: list[str] = [s.name for s in _SPECS]
"""Names of the tiny models (several per adapter family: variants such as I2V, VACE, 1.5)."""

ADAPTER_FAMILY: dict[str, str] = {s.name: s.adapter_family for s in _SPECS}
"""Tiny model name -> the ``ModelAdapter.family`` that must handle it."""

FIXED_RESOLUTION: frozenset[str] = frozenset(s.name for s in _SPECS if not s.grids)
"""Models whose position table fixes the input size: build another model to change the grid."""


def spec(family: str) -> TinyFamily:
    """The :class:`TinyFamily` of ``family``."""
    try:
        return _BY_NAME[family]
    except KeyError:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}.") from None


def expected_grid(family: str, model: torch.nn.Module, resolution_variant: int = 0) -> Grid:
    """The true token grid of ``build_inputs(family, model, resolution_variant)``."""
    s = spec(family)
    if s.grids:
        if not 0 <= resolution_variant < len(s.grids):
            raise ValueError(
                f"{family} has resolution variants 0..{len(s.grids) - 1}; got {resolution_variant}."
            )
        return s.grids[resolution_variant]
    if resolution_variant != 0:
        raise ValueError(
            f"{family} has a fixed position table, so it runs only at its config size; build "
            f"another model with build({family!r}, image_size=..., num_frames=...) instead."
        )
    cfg = model.config
    h, w = cfg.image_size if isinstance(cfg.image_size, (list, tuple)) else (cfg.image_size,) * 2
    return cfg.num_frames // s.patch[0], h // s.patch[1], w // s.patch[2]


def build_inputs(family: str, model: torch.nn.Module, resolution_variant: int) -> Inputs:
    """Example forward inputs for ``model`` at token grid number ``resolution_variant``.

    Args:
        family: a name in :data:`FAMILIES`.
        model: a model from ``build(family)``.
        resolution_variant: 0 for the default grid, 1 for a second grid (not for
            :data:`FIXED_RESOLUTION` families).

    Returns:
        ``(args, kwargs)`` for ``model(*args, **kwargs)``; the same every call (seeded).
    """
    s = spec(family)
    grid = expected_grid(family, model, resolution_variant)
    g = torch.Generator().manual_seed(1234 + resolution_variant)
    return s.make_inputs(model, grid, g)


def build(family: str, **overrides: Any) -> tuple[torch.nn.Module, tuple, dict]:
    """A tiny random-weight model of ``family`` in eval mode and its default inputs.

    Args:
        family: a name in :data:`FAMILIES`.
        **overrides: config keyword arguments merged over the tiny config.

    Returns:
        ``(model, args, kwargs)``.
    """
    s = spec(family)
    torch.manual_seed(0)
    model = s.make(**{**s.config, **overrides}).eval()
    args, kwargs = build_inputs(family, model, 0)
    return model, args, kwargs


def perturb(
    family: str, args: tuple, kwargs: dict, token: Grid, grid: Grid, delta: float = 5.0
) -> Inputs:
    """Inputs with the model input under video token ``token = (t, y, x)`` changed.

    The video input is the forward's first parameter in every family: ``args[0]`` when given
    positionally, else ``hidden_states`` / ``pixel_values``.

    Args:
        family: a name in :data:`FAMILIES`.
        args: positional inputs.
        kwargs: keyword inputs.
        token: the token to change.
        grid: the true grid of these inputs (used by packed inputs only).
        delta: added to every channel of the first input element of the token.
    """
    s = spec(family)
    t, y, x = token
    pt, ph, pw = s.patch
    if s.layout == "BCFHW":
        index: tuple = (slice(None), slice(None), t * pt, y * ph, x * pw)
    elif s.layout == "BFCHW":
        index = (slice(None), t * pt, slice(None), y * ph, x * pw)
    else:  # packed frame-major tokens
        index = (slice(None), (t * grid[1] + y) * grid[2] + x)
    if args:
        video = args[0].clone()
        video[index] += delta
        return (video, *args[1:]), dict(kwargs)
    key = "pixel_values" if "pixel_values" in kwargs else "hidden_states"
    video = kwargs[key].clone()
    video[index] += delta
    return (), {**kwargs, key: video}
