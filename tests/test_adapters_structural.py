"""Models no family adapter names: subclasses, the structural fallback, and the user layout.

The sweep enumerates every video transformer class diffusers exports (``*Transformer3DModel``:
diffusers names video DiTs "3D" for frames x height x width, image ones "2D", audio ones "1D";
``TransformerTemporalModel`` is a UNet's temporal layer on ``[B * F, C, H, W]``, not a video
DiT). Each class has an entry below: a tiny build whose VMoBA run is checked, a tiny build whose
calls must stay dense for a stated reason, a family adapter (tests/test_api.py checks those
end to end; here the structural path must agree with the adapter or stay dense), or a skip
with the reason. A class diffusers adds later has no entry and fails
``test_every_video_transformer_class_has_an_entry``.

Ground truth comes from the models, not from the fallback: which calls are video
self-attention is read from an SDPA spy (query and key lengths equal to the hand-written
``N + text``), the token grid and text position are written by hand from each model's source,
and the oracle runs the model eagerly with those calls done by ``vmoba_reference``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import ATOL_F32, max_err

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tiny_models as tm  # noqa: E402
from sdpa_spy import record_sdpa, run_with_sdpa  # noqa: E402

from vmoba_compile import (  # noqa: E402
    SkipReason,
    VideoLayout,
    VMoBAConfig,
    explain,
    optimize,
    vmoba_reference,
)
from vmoba_compile.adapters import find_adapter  # noqa: E402
from vmoba_compile.adapters.structural import STRUCTURAL, LayoutUnknown  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

_CHUNKS = {"block_size": 16, "chunk_1d": (1,), "chunk_2d": (2, 2), "chunk_3d": (1, 2, 2)}
SPARSE = VMoBAConfig(selection="topk", topk=2, **_CHUNKS)  # keeps 2 of >= 3 chunks: selects
KEEP_ALL = VMoBAConfig(threshold=1.0, **_CHUNKS)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # many tiny models compile the same diffusers code
    yield


def first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


# ------------------------------------------------------------------------ the class table


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_GEN)


_GEN = torch.Generator()

# tiny_models' Wan config without the options the Wan derivatives below do not take.
_WAN_LIKE = {k: v for k, v in tm._WAN.items() if k not in ("qk_norm", "rope_max_seq_len")}
# The tiny HunyuanVideo config's arguments that MotifVideoTransformer3DModel does not take.
_NOT_MOTIF = ("guidance_embeds", "num_refiner_layers", "pooled_projection_dim")


def _wan_like_inputs() -> tuple[tuple, dict]:
    return (), dict(
        hidden_states=_randn(1, 4, 3, 8, 12),  # [B, C, F, H, W]: grid 3 x 4 x 6
        timestep=torch.tensor([500]),
        encoder_hidden_states=_randn(1, 12, 16),
    )


@dataclasses.dataclass(frozen=True)
class Case:
    """A tiny build of one class and what must happen to it.

    Attributes:
        config: tiny config keyword arguments.
        inputs: ``() -> (args, kwargs)``, seeded by the test.
        grid: the true token grid ``(frames, height, width)`` (from the model's source).
        text: non-video tokens in each video self-attention call and where they sit.
        dense: None when VMoBA must run; else the reasons every call stays dense (each call's
            ``skip`` is one of them).
        detail: with ``SkipReason.GRID_UNKNOWN`` among ``dense``, a regex of the fallback's
            explanation some grid-unknown call's message must hold.
    """

    config: dict[str, Any]
    inputs: Callable[[], tuple[tuple, dict]]
    grid: tuple[int, int, int]
    text: tuple[int, str] = (0, "suffix")
    dense: frozenset[SkipReason] | None = None
    detail: str | None = None


CASES: dict[str, Case] = {
    # A Wan derivative (temporal RoPE skip): attn1 video only, attn2 cross.
    "ChronoEditTransformer3DModel": Case(
        dict(_WAN_LIKE, rope_max_seq_len=32, num_layers=1), _wan_like_inputs, (3, 4, 6)
    ),
    # A CogVideoX derivative: [B, F, C, H, W], per-frame Conv2d, joint [text, video] attn1.
    "ConsisIDTransformer3DModel": Case(
        dict(tm.spec("cogvideox").config, num_layers=1),  # the tiny CogVideoX config
        lambda: (
            (),
            dict(
                hidden_states=_randn(1, 3, 4, 8, 12),  # [B, F, C, H, W]
                encoder_hidden_states=_randn(1, 8, 8),
                timestep=torch.tensor([500]),
            ),
        ),
        (3, 4, 6),
        text=(8, "prefix"),
    ),
    # Wan-like with history-latent patch embeddings (patch_short/mid/long, other kernels): the
    # config's patch_size picks patch_embedding among them.
    "HeliosTransformer3DModel": Case(
        dict(_WAN_LIKE, rope_dim=(4, 4, 4), num_layers=1), _wan_like_inputs, (3, 4, 6)
    ),
    # Wan-like, but takes [B, F, C, H, W] and per-frame timesteps [B, F] (it permutes to
    # [B, C, F, H, W] before its Conv3d): the channel axis is found from the convolution.
    "AnyFlowTransformer3DModel": Case(
        dict(_WAN_LIKE, rope_max_seq_len=32, num_layers=1),
        lambda: (
            (),
            dict(
                hidden_states=_randn(1, 3, 4, 8, 12),
                timestep=torch.full((1, 3), 500.0),
                r_timestep=torch.full((1, 3), 400.0),
                encoder_hidden_states=_randn(1, 12, 16),
            ),
        ),
        (3, 4, 6),
    ),
    # HunyuanVideo-like dual- and single-stream blocks, joint [video, text].
    "MotifVideoTransformer3DModel": Case(
        {k: v for k, v in tm._HUNYUAN.items() if k not in _NOT_MOTIF},
        _wan_like_inputs,
        (3, 4, 6),
        text=(12, "suffix"),
    ),
    # Dual-stream blocks, joint [video, text].
    "JoyImageEditTransformer3DModel": Case(
        dict(
            patch_size=[1, 2, 2],
            in_channels=4,
            out_channels=4,
            hidden_size=24,
            num_attention_heads=2,
            text_dim=16,
            num_layers=1,
            rope_dim_list=[4, 4, 4],
        ),
        _wan_like_inputs,
        (3, 4, 6),
        text=(12, "suffix"),
    ),
    # Channels-last input [B, F, H, W, C] through a Linear: neither axis 1 nor 2 is the channel
    # axis, so no grid.
    "Kandinsky5Transformer3DModel": Case(
        dict(
            in_visual_dim=4,
            in_text_dim=16,
            in_text_dim2=8,
            time_dim=16,
            out_visual_dim=4,
            model_dim=32,
            ff_dim=64,
            num_text_blocks=1,
            num_visual_blocks=2,
            axes_dims=(4, 6, 6),
        ),
        lambda: (
            (),
            dict(
                hidden_states=_randn(1, 3, 8, 12, 4),
                encoder_hidden_states=_randn(1, 12, 16),
                timestep=torch.tensor([500.0]),
                pooled_projections=_randn(1, 8),
                visual_rope_pos=(torch.arange(3), torch.arange(4), torch.arange(6)),
                text_rope_pos=torch.arange(12),
            ),
        ),
        (3, 4, 6),
        dense=frozenset({SkipReason.GRID_UNKNOWN, SkipReason.CROSS_ATTENTION}),
        detail=r"matches neither axis 1 \(3\) and axis 2 \(8\)",
    ),
    # Self-attention is linear attention (no SDPA); only the cross-attention calls SDPA.
    "SanaVideoTransformer3DModel": Case(
        dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=12,
            num_layers=2,
            num_cross_attention_heads=2,
            cross_attention_head_dim=12,
            cross_attention_dim=24,
            caption_channels=16,
            sample_size=8,
            rope_max_seq_len=32,
        ),
        lambda: (
            (),
            dict(
                hidden_states=_randn(1, 4, 3, 8, 12),
                encoder_hidden_states=_randn(1, 12, 16),
                timestep=torch.tensor([500]),
            ),
        ),
        (3, 4, 6),
        dense=frozenset({SkipReason.CROSS_ATTENTION}),
    ),
    # Factorised attention: spatial blocks attend within a frame (S = H' W'), temporal blocks
    # along time (S = F): no call sees the video as one sequence.
    "LatteTransformer3DModel": Case(
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            cross_attention_dim=16,
            sample_size=8,
            patch_size=2,
            caption_channels=16,
            video_length=3,
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
        ),
        lambda: (
            (),
            dict(
                hidden_states=_randn(1, 4, 3, 8, 8),
                timestep=torch.tensor([500]),
                encoder_hidden_states=_randn(1, 12, 16),
            ),
        ),
        (3, 4, 4),
        dense=frozenset({SkipReason.GRID_UNKNOWN, SkipReason.CROSS_ATTENTION}),
        detail=r"no call of the candidate self-attention modules",
    ),
    # Joint [video, text] with a boolean text mask the fallback cannot declare as key padding.
    "HunyuanVideo15Transformer3DModel": Case(
        dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=10,
            num_layers=2,
            num_refiner_layers=1,
            patch_size=1,
            patch_size_t=1,
            text_embed_dim=16,
            text_embed_2_dim=8,
            image_embed_dim=8,
            rope_axes_dim=(2, 4, 4),
            task_type="t2v",
        ),
        lambda: (
            (),
            dict(
                hidden_states=_randn(1, 4, 3, 4, 6),
                timestep=torch.tensor([500.0]),
                encoder_hidden_states=_randn(1, 12, 16),
                encoder_attention_mask=torch.ones(1, 12),
                encoder_hidden_states_2=_randn(1, 6, 8),
                encoder_attention_mask_2=torch.ones(1, 6),
                image_embeds=torch.zeros(1, 5, 8),
            ),
        ),
        (3, 4, 6),
        dense=frozenset({SkipReason.MASK_UNDECLARED, SkipReason.NOT_SELF_ATTENTION}),
    ),
}

# Classes a family adapter handles: tiny_models.py builds them, tests/test_api.py runs
# them end to end. Here the structural fallback must agree with the adapter or stay dense.
ADAPTER_CLASSES: dict[str, str] = {
    "WanTransformer3DModel": "wan",
    "SkyReelsV2Transformer3DModel": "skyreels_v2",
    "WanVACETransformer3DModel": "wan_vace",
    "CogVideoXTransformer3DModel": "cogvideox",
    "HunyuanVideoTransformer3DModel": "hunyuan_video",
    "LTXVideoTransformer3DModel": "ltx_video",
    "MochiTransformer3DModel": "mochi",
    "AllegroTransformer3DModel": "allegro",
    "CosmosTransformer3DModel": "cosmos",
    "EasyAnimateTransformer3DModel": "easyanimate",
}

SKIPS: dict[str, str] = {
    "AnyFlowFARTransformer3DModel": (
        "needs chunk_partition and a FlexAttention BlockMask / KV cache (autoregressive chunks): "
        "its attention is not one SDPA call over the video"
    ),
    "WanAnimateTransformer3DModel": (
        "needs pose latents and face pixel values through a motion encoder (pose_hidden_states, "
        "face_pixel_values); not built tiny"
    ),
    "WanAnimate2Transformer3DModel": (
        "hidden_states is a list of tensors with KV caches, not one 5-D video tensor"
    ),
    "HunyuanVideoFramepackTransformer3DModel": (
        "needs frame-pack history latents with index tensors (indices_latents, image_embeds): "
        "extra context tokens ahead of the video; not built tiny"
    ),
    "JoyImageEditPlusTransformer3DModel": (
        "hidden_states is 6-D pre-cut patches [B, N, C, pt, ph, pw] with a shape_list, not a "
        "5-D video"
    ),
    "Kandinsky6Transformer3DModel": (
        "channels-last [B, F, H, W, C] input like Kandinsky5 (built here and left dense), plus "
        "an audio stream; not built tiny"
    ),
    "Kandinsky6SRTransformer3DModel": (
        "channels-last [B, F, H, W, 2C+1] input like Kandinsky5 (built here and left dense) with "
        "NABLA sparse attention of its own; not built tiny"
    ),
    "LTX2VideoTransformer3DModel": "packed [B, S, C] video tokens plus an audio stream, not 5-D",
    "SanaWMLTX2RefinerTransformer3DModel": "packed [B, S, C] video tokens (LTX-2 layout), not 5-D",
    "SanaWMTransformer3DModel": (
        "camera-conditioned world model whose blocks use linear attention with softmax "
        "attention every few layers and a KV-chunked frame mask; not built tiny"
    ),
    "MiniMaxH3Transformer3DModel": (
        "packed video, audio and text tokens with index tensors (video_indices, token_tags), "
        "not a 5-D video"
    ),
}


def video_transformer_classes() -> list[str]:
    return sorted(
        n
        for n in dir(diffusers)
        if n.endswith("Transformer3DModel") and isinstance(getattr(diffusers, n, None), type)
    )


def test_every_video_transformer_class_has_an_entry() -> None:
    names = video_transformer_classes()
    assert "ChronoEditTransformer3DModel" in names and "ConsisIDTransformer3DModel" in names
    entries = CASES.keys() | ADAPTER_CLASSES.keys() | SKIPS.keys()
    missing = sorted(set(names) - entries)
    assert not missing, (
        f"diffusers {diffusers.__version__} exports video transformers this test does not know: "
        f"{missing}. Add a tiny build to CASES (VMoBA or dense with the reason) or a reason to "
        f"SKIPS."
    )
    assert not (entries - set(names)), sorted(entries - set(names))
    assert sum(c.dense is None for c in CASES.values()) >= 5


@functools.cache
def built(name: str) -> tuple[torch.nn.Module, tuple, dict]:
    case = CASES[name]
    torch.manual_seed(0)
    model = getattr(diffusers, name)(**case.config).eval()
    _GEN.manual_seed(1234)
    args, kwargs = case.inputs()
    return model, args, kwargs


def truth(name: str) -> tuple[list[str], VideoLayout]:
    """The modules making video self-attention calls (first-call order) and their layout."""
    model, args, kwargs = built(name)
    case = CASES[name]
    t, h, w = case.grid
    layout = VideoLayout(t, h, w, text_tokens=case.text[0], text_position=case.text[1])
    seen: dict[str, None] = {}
    for c in record_sdpa(model, args, kwargs):
        if c.query_len == c.key_len == layout.seq_len:
            seen.setdefault(c.module, None)
    return list(seen), layout


def reference(name: str, config: VMoBAConfig) -> torch.Tensor:
    model, args, kwargs = built(name)
    modules, layout = truth(name)
    layer_of = {m: i for i, m in enumerate(modules)}

    def replace(module: str, a: dict) -> torch.Tensor | None:
        q, k, v = a["query"], a["key"], a["value"]
        if module not in layer_of or q.shape[2] != k.shape[2] or q.shape[2] != layout.seq_len:
            return None
        return vmoba_reference(
            q, k, v, layout=layout, config=config, layer_index=layer_of[module], scale=a["scale"]
        )

    with torch.no_grad():
        return first(run_with_sdpa(model, args, kwargs, replace)[0])


VMOBA = [n for n, c in CASES.items() if c.dense is None]
DENSE = [n for n, c in CASES.items() if c.dense is not None]


@pytest.mark.parametrize("name", VMOBA)
def test_structural_sparse_equals_reference_and_keep_all_equals_dense(name: str) -> None:
    model, args, kwargs = built(name)
    modules, layout = truth(name)
    assert modules, f"{name}: the spy saw no call of {layout.seq_len} tokens"
    with torch.no_grad():
        dense = first(model(*args, **kwargs))

    opt = optimize(model, SPARSE, lowering="aot_eager")
    with torch.no_grad():
        out = first(opt(*args, **kwargs))
    report = opt.report
    assert report.found_by.startswith("structural: no adapter knows " + name), report
    rewritten = [c.module for c in report.rewritten]
    spied = [c.module for c in record_sdpa(model, args, kwargs) if c.module in modules]
    assert sorted(rewritten) == sorted(spied), f"{name}:\n{report}"  # exactly those calls
    for c in report.rewritten:
        assert c.layer_index == modules.index(c.module)
        assert c.partition == SPARSE.partition_for(c.layer_index).value
        text = f" + {layout.text_tokens} {layout.text_position.value} tokens"
        grid = f"video {layout.frames}x{layout.height}x{layout.width}"
        assert c.reason.startswith(grid + (text if layout.text_tokens else ",")), c.reason
    assert any("all kept" not in c.reason for c in report.rewritten), "nothing sparse"
    ref = reference(name, SPARSE)
    assert max_err(out, ref) < ATOL_F32 * 10, f"{name}: {max_err(out, ref)}"
    assert max_err(out, dense) > 1e-4, f"{name}: the sparse model equals the dense one"

    torch._dynamo.reset()
    keep = optimize(model, KEEP_ALL, lowering="aot_eager")
    with torch.no_grad():
        out_all = first(keep(*args, **kwargs))
    assert len(keep.report.rewritten) == len(spied)
    assert max_err(out_all, dense) < 1e-5


@pytest.mark.parametrize("name", DENSE)
def test_structural_leaves_calls_dense_with_the_reason(name: str) -> None:
    model, args, kwargs = built(name)
    report = explain(model, args, kwargs)
    assert report.calls and not report.rewritten, report
    case = CASES[name]
    assert case.dense and {c.skip for c in report.calls} <= case.dense, f"{name}:\n{report}"
    if case.detail is not None:
        grid_unknown = [c for c in report.calls if c.skip is SkipReason.GRID_UNKNOWN]
        assert any(re.search(case.detail, c.reason) for c in grid_unknown), report


# Tiny adapter-family models the fallback cannot read, and why (the adapters know more).
_UNKNOWN_TO_THE_FALLBACK = {
    # 4 channels and 4 frames: [B, C, T, H, W] or [B, T, C, H, W] cannot be told apart.
    "skyreels_v2": "matches both axis 1 (4) and axis 2 (4)",
    # LTX takes packed tokens; the grid is in num_frames / height / width.
    "ltx_video": "not a 5-D video tensor",
}


@pytest.mark.parametrize("cls_name", sorted(ADAPTER_CLASSES))
def test_structural_agrees_with_the_family_adapter(cls_name: str) -> None:
    """The fallback on the classes whose grid an adapter knows (and the bump probes of
    test_adapters.py check): the same grid and text position, or calls dense for a stated
    reason."""
    family = ADAPTER_CLASSES[cls_name]
    model, args, kwargs = tm.build(family)
    assert type(model).__name__ == cls_name
    adapter = find_adapter(model)
    assert adapter.family == tm.ADAPTER_FAMILY[family]
    if family in _UNKNOWN_TO_THE_FALLBACK:
        with pytest.raises(LayoutUnknown, match=re.escape(_UNKNOWN_TO_THE_FALLBACK[family])):
            STRUCTURAL.grid(model, args, kwargs)
        return
    want, got = adapter.grid(model, args, kwargs), STRUCTURAL.grid(model, args, kwargs)
    assert (got.frames, got.height, got.width) == (want.frames, want.height, want.width)
    assert got.text_position == want.text_position or tm.spec(family).text_position is None
    assert set(adapter.self_attention_modules(model)) <= set(
        STRUCTURAL.self_attention_modules(model)
    )


@pytest.mark.parametrize("name", sorted(SKIPS))
def test_documented_skips(name: str) -> None:
    assert name in video_transformer_classes()
    pytest.skip(SKIPS[name])


# ------------------------------------------------------------------------ a home-made DiT


class ToySelfAttention(torch.nn.Module):
    """Multi-head attention; with ``context`` the keys and values come from it."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.to_out = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, s, d = x.shape
        src = x if context is None else context

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(src)), heads(self.to_v(src))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, s, d))


class ToyBlock(torch.nn.Module):
    def __init__(self, dim: int, attend_text: bool = False) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.attn = ToySelfAttention(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU())
        self.proj = torch.nn.Linear(2 * dim, dim)
        self.attend_text = attend_text

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x), text if self.attend_text else None)
        return x + self.proj(self.mlp(x))


class ToyVideoDiT(torch.nn.Module):
    """A small video DiT written here: Conv3d patchify of ``hidden_states`` [B, C, T, H, W],
    text tokens joined to the video (prefix or suffix), repeated blocks, a linear head.

    Knobs for the cases the fallback must refuse: ``order`` flattens the tokens other than
    frame-major, ``kernel``/``stride``/``padding`` make a patch embedding whose tokens do not
    tile the input, ``config_patch`` a config that disagrees with the convolution, ``mix`` a
    convolution over neighbouring tokens before the first attention, ``attend_text`` makes the
    attention a cross-attention to the text (as long as the video).
    """

    def __init__(
        self,
        text: str = "prefix",
        order: str = "tyx",
        kernel: tuple[int, int, int] = (1, 2, 2),
        stride: tuple[int, int, int] | None = None,
        padding: int = 0,
        config_patch: tuple[int, int, int] | None = None,
        mix: bool = False,
        attend_text: bool = False,
        in_channels: int = 4,
        dim: int = 32,
        layers: int = 2,
    ) -> None:
        super().__init__()
        self.text, self.order, self.mix = text, order, mix
        if config_patch is not None:
            self.config = types.SimpleNamespace(patch_size=config_patch)
        self.patch_embed = torch.nn.Conv3d(
            in_channels, dim, kernel, stride=stride or kernel, padding=padding
        )
        self.mixer = torch.nn.Conv1d(dim, dim, 3, padding=1, groups=dim)
        self.text_proj = torch.nn.Linear(8, dim)
        self.blocks = torch.nn.ModuleList(ToyBlock(dim, attend_text) for _ in range(layers))
        self.head = torch.nn.Linear(dim, 4)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        x = self.patch_embed(hidden_states)  # [B, D, T, H, W]
        if self.order == "tyx":
            x = x.flatten(2).transpose(1, 2)
        else:  # height-major: (y, t, x)
            x = x.permute(0, 3, 2, 4, 1).flatten(1, 3)
        if self.mix:
            x = x + self.mixer(x.transpose(1, 2)).transpose(1, 2)
        text = self.text_proj(encoder_hidden_states)
        n = x.shape[1]
        if self.text == "none" or all(b.attend_text for b in self.blocks):
            seq, text_for_blocks = x, text
        else:
            seq = torch.cat([text, x] if self.text == "prefix" else [x, text], dim=1)
            text_for_blocks = text
        for block in self.blocks:
            seq = block(seq, text_for_blocks)
        video = seq[:, -n:] if self.text == "prefix" else seq[:, :n]
        return self.head(video)


def toy_inputs(channels: int = 4, frames: int = 3, text: int = 5) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, channels, frames, 8, 12, generator=g)  # grid 3 x 4 x 6 = 72 tokens
    return (), dict(hidden_states=x, encoder_hidden_states=torch.randn(1, text, 8, generator=g))


def toy_reference(model: ToyVideoDiT, kwargs: dict, layout: VideoLayout, config) -> torch.Tensor:
    layer_of = {f"blocks.{i}.attn": i for i in range(len(model.blocks))}

    def replace(module: str, a: dict) -> torch.Tensor:
        q, k, v = a["query"], a["key"], a["value"]
        return vmoba_reference(q, k, v, layout=layout, config=config, layer_index=layer_of[module])

    with torch.no_grad():
        return run_with_sdpa(model, (), kwargs, replace)[0]


@pytest.mark.parametrize("text", ["prefix", "suffix"])
def test_toy_dit_through_the_structural_path(text: str) -> None:
    torch.manual_seed(0)
    model = ToyVideoDiT(text=text).eval()
    _, kwargs = toy_inputs()
    layout = VideoLayout(3, 4, 6, text_tokens=5, text_position=text)
    assert find_adapter(model) is STRUCTURAL
    assert STRUCTURAL.self_attention_modules(model) == ["blocks.0.attn", "blocks.1.attn"]
    opt = optimize(model, SPARSE, lowering="aot_eager")
    with torch.no_grad():
        out = opt(**kwargs)
        dense = model(**kwargs)
    assert [c.module for c in opt.report.rewritten] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(c.reason.startswith(f"video 3x4x6 + 5 {text} tokens") for c in opt.report.rewritten)
    assert "structural: no adapter knows ToyVideoDiT" in str(opt.report)
    assert max_err(out, toy_reference(model, kwargs, layout, SPARSE)) < ATOL_F32
    assert max_err(out, dense) > 1e-4
    # The probe ran once for these input shapes; a second call reuses its result.
    calls = []
    hook = model.patch_embed.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        opt(**kwargs)
    hook.remove()
    assert len(calls) == 1  # the forward itself only, no probe run


def _dense_reason(model: torch.nn.Module, kwargs: dict) -> str:
    """Every call of the model stays dense; the one reason of its self-attention calls."""
    report = explain(model, (), kwargs)
    assert report.calls and not report.rewritten, report
    assert {c.skip for c in report.calls} == {SkipReason.GRID_UNKNOWN}, report
    reasons = {c.reason for c in report.calls}
    assert len(reasons) == 1, reasons
    (reason,) = reasons
    assert "Pass layout=VideoLayout(" in reason
    return reason


def test_height_major_token_order_is_not_taken_for_frame_major() -> None:
    """The plausible wrong grid: the token count is exactly 3 x 4 x 6 + 5 text, so a count check
    alone would accept the frame-major grid; VMoBA on it would chunk the wrong tokens."""
    torch.manual_seed(0)
    model = ToyVideoDiT(order="ytx").eval()
    _, kwargs = toy_inputs()
    s = [c.query_len for c in record_sdpa(model, (), kwargs)]
    assert s == [3 * 4 * 6 + 5] * 2  # the count fits the inferred grid
    reason = _dense_reason(model, kwargs)
    # Row 5 + 6 holds token (1, 0, 0) in (y, t, x) order, where frame-major order has (0, 1, 0).
    assert (
        "row 11 of blocks.0.attn's call (self-attention call 0 of the forward, S=77) changes "
        "as video token (t, y, x)=(1, 0, 0)" in reason
    )
    assert "frame-major order predicts (0, 1, 0) (60 of 72 rows differ" in reason
    assert "token order (or the grid) is not the one inferred" in reason
    with torch.no_grad():  # dense, so the model's output is unchanged
        assert max_err(optimize(model, lowering="aot_eager")(**kwargs), model(**kwargs)) < 1e-6


def test_overlapping_patches_are_not_taken_for_a_grid() -> None:
    """Kernel 3, stride 2, padding 1 also gives 4 x 6 tokens per frame (a plausible count)."""
    torch.manual_seed(0)
    model = ToyVideoDiT(kernel=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)).eval()
    _, kwargs = toy_inputs()
    assert record_sdpa(model, (), kwargs)[0].query_len == 3 * 4 * 6 + 5
    reason = _dense_reason(model, kwargs)
    assert "does not cut the input into disjoint patches" in reason


def test_config_patch_disagreeing_with_the_convolution_is_ambiguous() -> None:
    torch.manual_seed(0)
    model = ToyVideoDiT(config_patch=(1, 4, 4)).eval()
    reason = _dense_reason(model, toy_inputs()[1])
    assert "config.patch_size=(1, 4, 4) disagrees with the patch embedding patch_embed" in reason


def test_tokens_mixed_before_attention_are_refused() -> None:
    torch.manual_seed(0)
    model = ToyVideoDiT(mix=True).eval()
    reason = _dense_reason(model, toy_inputs()[1])
    # Row 5 (token 0) also changes with token 1 (the mixer's neighbour): it answers as token 1.
    assert (
        "row 5 of blocks.0.attn's call (self-attention call 0 of the forward, S=77) changes "
        "as video token (t, y, x)=(0, 0, 1)" in reason
    )
    assert "(or as several tokens mixed), where one token per patch in frame-major order" in reason


def test_cross_attention_as_long_as_the_video_is_not_self_attention() -> None:
    """Text of exactly N = 72 tokens: the calls are square and of the grid's length, but the
    keys come from the text: changing a video token moves a query row and no key row."""
    torch.manual_seed(0)
    model = ToyVideoDiT(text="none", attend_text=True).eval()
    _, kwargs = toy_inputs(text=72)
    assert {(c.query_len, c.key_len) for c in record_sdpa(model, (), kwargs)} == {(72, 72)}
    reason = _dense_reason(model, kwargs)
    assert "key rows []" in reason


def test_ambiguous_channel_axis_is_refused() -> None:
    """3 channels and 3 frames: [B, C, T, H, W] and [B, T, C, H, W] both fit the convolution."""
    torch.manual_seed(0)
    model = ToyVideoDiT(in_channels=3).eval()
    reason = _dense_reason(model, toy_inputs(channels=3)[1])
    assert "both axis 1 and axis 2 of hidden_states have (the channel axis is ambiguous)" in reason


def test_structural_grid_on_meta_tensors_cannot_verify() -> None:
    model = ToyVideoDiT().eval()
    _, kwargs = toy_inputs()
    meta = {k: v.to("meta") for k, v in kwargs.items()}
    with pytest.raises(LayoutUnknown, match="3x4x6 grid .* meta or fake tensors"):
        STRUCTURAL.grid(model, (), meta)


def test_model_without_video_structure_still_raises() -> None:
    class NoBlocks(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states

    with pytest.raises(ValueError, match="structural fallback cannot read it either: NoBlocks "):
        optimize(NoBlocks())


# ------------------------------------------------------------- subclasses, user layout, API


def test_report_names_the_path_that_found_the_layout() -> None:
    from diffusers import WanTransformer3DModel

    class MyWan(WanTransformer3DModel):
        pass

    _, args, kwargs = tm.build("wan")
    torch.manual_seed(0)
    sub = MyWan(**tm.spec("wan").config).eval()
    report = explain(sub, args, kwargs)
    assert report.found_by == "subclass of 'wan' (MyWan derives from WanTransformer3DModel)"
    assert "(subclass of 'wan' (MyWan derives from WanTransformer3DModel);" in str(report)
    assert [c.module for c in report.rewritten] == ["blocks.0.attn1", "blocks.1.attn1"]

    # The path is fixed when the optimized model is made (no compile needed to read it).
    assert optimize(tm.build("wan")[0]).report.found_by == "adapter 'wan'"
    opt = optimize(sub, layout=VideoLayout(3, 4, 6))
    assert opt.report.found_by == (
        "user layout, modules of subclass of 'wan' (MyWan derives from WanTransformer3DModel)"
    )
    assert str(opt.report).startswith("VMoBA rewrite report for MyWan (user layout, ")
    toy = optimize(ToyVideoDiT())
    assert toy.report.found_by.startswith("structural: no adapter knows ToyVideoDiT")
    assert optimize(ToyVideoDiT(), layout=VideoLayout(3, 4, 6)).report.found_by.startswith(
        "user layout, modules of structural"
    )


class TakesLayout(ToyVideoDiT):
    """A model whose own forward has parameters named ``layout`` and ``config``."""

    def forward(self, hidden_states, encoder_hidden_states, layout="tyx", config=None):
        assert layout == "tyx" and config == "mine", (layout, config)
        return super().forward(hidden_states, encoder_hidden_states)


def test_explain_keeps_the_model_inputs_apart_from_its_own_options() -> None:
    torch.manual_seed(0)
    model = TakesLayout().eval()
    _, kwargs = toy_inputs()
    kwargs = {**kwargs, "layout": "tyx", "config": "mine"}
    layout = VideoLayout(3, 4, 6, text_tokens=5, text_position="prefix")
    report = explain(model, kwargs=kwargs, layout=layout, config=SPARSE)
    assert report.found_by.startswith("user layout")
    assert [c.partition for c in report.rewritten] == ["1d", "2d"]
    x = kwargs["hidden_states"]
    with pytest.raises(TypeError, match=r"positional inputs as one tuple.*got args=a float32"):
        explain(model, x)
    with pytest.raises(TypeError, match="keyword inputs as one dict"):
        explain(model, (), [x])
    with pytest.raises(TypeError, match="uses its own config and layout"):
        explain(optimize(model, layout=layout), kwargs=kwargs, layout=layout)
    with pytest.raises(TypeError, match="unexpected keyword argument 'vmoba_layout'"):
        explain(model, kwargs=kwargs, vmoba_layout=layout)
    assert list(inspect.signature(explain).parameters) == [
        "model",
        "args",
        "kwargs",
        "config",
        "layout",
    ]
