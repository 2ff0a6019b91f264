"""Adapters against tiny random-weight models of every family.

Ground truth comes from the models themselves, not from the adapters: SDPA is recorded with a
spy (and each call is attributed to the innermost module running it), and the token grid is
checked with a bump probe: change the input under one video token, run again, and see which
query row of the first video self-attention call changes. It must be exactly the row the
adapter's grid predicts.
"""

from __future__ import annotations

import functools
import inspect
import subprocess
import sys
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tiny_models as tm  # noqa: E402
from sdpa_spy import Call, record_sdpa  # noqa: E402

from vmoba_compile import explain  # noqa: E402
from vmoba_compile.adapters import ADAPTERS, ModelAdapter, VideoGrid, find_adapter  # noqa: E402
from vmoba_compile.layout import TextPosition, VideoLayout  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")  # Mochi's RoPE

# A bump of +5 on one input element moves its own query row by O(1); rows of other tokens are
# computed by the same row-wise kernels from unchanged data, so they must not move at all.
ROW_CHANGED_ATOL = 1e-6

RESIZABLE = [f for f in tm.FAMILIES if f not in tm.FIXED_RESOLUTION]


@functools.cache
def built(family: str) -> tuple[torch.nn.Module, tuple, dict]:
    return tm.build(family)


@functools.cache
def inputs(family: str, variant: int) -> tuple[tuple, dict]:
    model, args, kwargs = built(family)
    return (args, kwargs) if variant == 0 else tm.build_inputs(family, model, variant)


@functools.cache
def recorded(family: str, variant: int) -> list[Call]:
    model = built(family)[0]
    return record_sdpa(model, *inputs(family, variant))


def video_self_attention_truth(calls: list[Call], video_tokens: int) -> list[str]:
    """Modules making square calls long enough to hold the video, in first-call order."""
    seen: dict[str, None] = {}
    for c in calls:
        if c.query_len == c.key_len >= video_tokens:
            seen.setdefault(c.module, None)
    return list(seen)


def assert_bump_probe(
    family: str,
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    grid: VideoGrid,
    true_grid: tuple[int, int, int],
    calls: list[Call],
) -> None:
    """Each probed token moves exactly the query row that ``grid`` predicts."""
    listed = set(find_adapter(model).self_attention_modules(model))
    first = next(i for i, c in enumerate(calls) if c.module in listed)
    ref = calls[first]
    layout = grid.layout_for(ref.query_len)
    assert layout is not None, f"{family}: {grid} does not fit S={ref.query_len} of {ref.module}"
    t_, y_, x_ = true_grid
    for t, y, x in [(0, 0, 1), (0, 1, 0), (1, 0, 0), (t_ - 1, y_ - 1, x_ - 1)]:
        bumped = record_sdpa(model, *tm.perturb(family, args, kwargs, (t, y, x), true_grid))
        got = bumped[first]
        assert got.module == ref.module and got.query.shape == ref.query.shape
        delta = (got.query[0] - ref.query[0]).abs().amax(dim=(0, 2))  # [S] of sample 0
        changed = torch.nonzero(delta > ROW_CHANGED_ATOL).flatten().tolist()
        predicted = layout.video_start + (t * grid.height + y) * grid.width + x
        assert changed == [predicted], (
            f"{family}: bumping video token (t, y, x)={(t, y, x)} of the true grid {true_grid} "
            f"changed query rows {changed} of {ref.module} (S={ref.query_len}); {grid} "
            f"predicts row {predicted}"
        )


# ------------------------------------------------------------------------------ the adapters


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_find_adapter(family: str) -> None:
    model = built(family)[0]
    adapter = find_adapter(model)
    assert adapter.family == tm.ADAPTER_FAMILY[family]
    assert type(model).__name__ in adapter.model_classes


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_grid_is_the_true_token_grid(family: str) -> None:
    model, args, kwargs = built(family)
    grid = find_adapter(model).grid(model, args, kwargs)
    true_grid = tm.expected_grid(family, model, 0)
    assert (grid.frames, grid.height, grid.width) == true_grid
    spec = tm.spec(family)
    if spec.text_position is not None:
        assert grid.text_position is TextPosition(spec.text_position)
    assert_bump_probe(family, model, args, kwargs, grid, true_grid, recorded(family, 0))


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_a_declared_extra_token_count_is_what_every_self_attention_holds(family: str) -> None:
    # An adapter that claims the count of non-video tokens must be right on every call it
    # lists: the pass trusts it to refuse calls whose extra tokens it cannot place.
    model, args, kwargs = built(family)
    adapter = find_adapter(model)
    grid = adapter.grid(model, args, kwargs)
    if grid.extra_tokens is None:
        pytest.skip(f"{family}: the adapter reads the count off each call")
    listed = set(adapter.self_attention_modules(model))
    held = {c.query_len - grid.video_tokens for c in recorded(family, 0) if c.module in listed}
    assert held == {grid.extra_tokens}, (family, grid, held)


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_self_attention_modules_are_exactly_the_video_self_attentions(family: str) -> None:
    model, args, kwargs = built(family)
    adapter = find_adapter(model)
    grid = adapter.grid(model, args, kwargs)
    calls = recorded(family, 0)
    listed = adapter.self_attention_modules(model)
    truth = video_self_attention_truth(calls, grid.video_tokens)

    assert len(listed) == len(set(listed)), f"{family}: duplicates in {listed}"
    assert set(listed) == set(truth), f"{family}: listed {listed}, SDPA shows {truth}"
    names = dict(model.named_modules())
    assert all(n in names for n in listed)
    # Backbone layer order; VACE's control blocks run first but follow the backbone.
    backbone = [n for n in truth if not n.startswith("vace_blocks.")]
    assert listed == backbone + [n for n in truth if n.startswith("vace_blocks.")]

    spec = tm.spec(family)
    for c in calls:
        if c.module not in listed:
            continue
        assert c.query_len == c.key_len, f"{family}: {c.module} is not self-attention"
        layout = grid.layout_for(c.query_len)
        assert layout is not None and layout.text_tokens in spec.text_tokens, (
            f"{family}: {c.module} has S={c.query_len}; {grid} leaves {layout} but the model "
            f"holds {spec.text_tokens} non-video tokens"
        )


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_text_key_padding_flag_matches_the_masks_the_model_passes(family: str) -> None:
    model, args, kwargs = built(family)
    adapter = find_adapter(model)
    grid = adapter.grid(model, args, kwargs)
    listed = set(adapter.self_attention_modules(model))
    calls = [c for c in recorded(family, 0) if c.module in listed]
    assert calls
    for c in calls:
        if not grid.text_key_padding:
            assert c.attn_mask is None, f"{family}: {c.module} passes a mask"
            continue
        mask, s = c.attn_mask, c.query_len
        assert mask is not None and mask.dtype == torch.bool
        assert mask.shape == (c.query.shape[0], 1, 1, s)
        layout = grid.layout_for(s)
        assert layout is not None
        video = mask[..., layout.video_start : layout.video_start + grid.video_tokens]
        assert video.all(), f"{family}: the key-padding mask hides video keys"
    if grid.text_key_padding:  # the tiny inputs pad sample 1's text: the mask must show it
        assert any((~c.attn_mask).any() for c in calls)


@pytest.mark.parametrize("family", RESIZABLE)
def test_resolution_change_gives_the_new_grid(family: str) -> None:
    model, args, kwargs = built(family)
    adapter = find_adapter(model)
    grid0 = adapter.grid(model, args, kwargs)
    args1, kwargs1 = inputs(family, 1)
    grid1 = adapter.grid(model, args1, kwargs1)
    true_grid = tm.expected_grid(family, model, 1)
    assert (grid1.frames, grid1.height, grid1.width) == true_grid
    assert grid1 != grid0
    assert_bump_probe(family, model, args1, kwargs1, grid1, true_grid, recorded(family, 1))
    assert adapter.grid(model, args, kwargs) == grid0  # stateless


@pytest.mark.parametrize("family", sorted(tm.FIXED_RESOLUTION))
def test_fixed_resolution_family_at_another_size(family: str) -> None:
    with pytest.raises(ValueError, match="fixed position table"):
        tm.build_inputs(family, built(family)[0], 1)
    model, args, kwargs = tm.build(family, image_size=(40, 24), num_frames=6)
    grid = find_adapter(model).grid(model, args, kwargs)
    true_grid = tm.expected_grid(family, model)
    assert true_grid == (3, 5, 3)
    assert (grid.frames, grid.height, grid.width) == true_grid
    assert_bump_probe(
        family, model, args, kwargs, grid, true_grid, record_sdpa(model, args, kwargs)
    )


def test_skyreels_block_causal_mask_is_not_key_padding() -> None:
    """With num_frame_per_block > 1 every attn1 gets a block-causal mask the pass must not drop."""
    model, args, kwargs = tm.build("skyreels_v2", num_frame_per_block=2)
    adapter = find_adapter(model)
    grid = adapter.grid(model, args, kwargs)
    assert (grid.frames, grid.height, grid.width) == tm.expected_grid("skyreels_v2", model)
    assert not grid.text_key_padding
    listed = set(adapter.self_attention_modules(model))
    masks = [c.attn_mask for c in record_sdpa(model, args, kwargs) if c.module in listed]
    n = grid.video_tokens
    assert len(masks) == len(listed)
    assert all(m is not None and m.dtype == torch.bool and m.shape == (1, 1, n, n) for m in masks)


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_grid_reads_shapes_only(family: str) -> None:
    """Meta tensors have no values: the grid must come from shapes and config alone."""
    model, args, kwargs = built(family)

    def meta(v: object) -> object:
        return torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v

    adapter = find_adapter(model)
    meta_args = tuple(meta(a) for a in args)
    meta_kwargs = {k: meta(v) for k, v in kwargs.items()}
    assert adapter.grid(model, meta_args, meta_kwargs) == adapter.grid(model, args, kwargs)


# ---------------------------------------------------------------------------- bad inputs


_DROP = object()  # marks an input to remove in _kw


def _kw(family: str, **changes: Any) -> tuple[tuple, dict]:
    """The family's default inputs as keywords, with ``changes`` applied."""
    model, args, kwargs = built(family)
    names = list(inspect.signature(model.forward).parameters)
    merged = {**dict(zip(names, args, strict=False)), **kwargs}
    for k, v in changes.items():
        if v is _DROP:
            merged.pop(k)
        else:
            merged[k] = v
    return (), merged


def _bad_cases() -> list:
    cases = [
        (
            "wan",
            lambda: _kw("wan", hidden_states=torch.randn(1, 4, 8, 12)),
            ValueError,
            r"expects hidden_states as a 5-D tensor \[B, C, F, H, W\].*got a float32 tensor of "
            r"shape \(1, 4, 8, 12\)",
        ),
        (
            "wan",
            lambda: _kw("wan", hidden_states=[torch.randn(1, 4, 3, 8, 12)]),
            ValueError,
            r"hidden_states as a 5-D tensor .* got a list",
        ),
        (
            "wan",
            lambda: ((), {}),
            ValueError,
            r"WanTransformer3DModel\.forward\(hidden_states.*cannot take these inputs",
        ),
        (
            "wan",
            lambda: _kw("wan", hidden_states=_DROP, hiden_states=torch.randn(1, 4, 3, 8, 12)),
            ValueError,
            r"cannot take these inputs .*hiden_states",
        ),
        (
            "wan",
            lambda: _kw("wan", hidden_states=torch.randn(1, 4, 3, 1, 12)),
            ValueError,
            r"at least 2 input elements along height per token \(config\.patch_size\[1\]\); "
            r"got height=1",
        ),
        (
            "wan_vace",
            lambda: _kw("wan_vace", control_hidden_states=torch.randn(1, 48, 3, 8, 10)),
            ValueError,
            r"control_hidden_states must have the height and width of hidden_states.*"
            r"\(3, 8, 10\) for hidden_states \(3, 8, 12\)",
        ),
        (
            "cogvideox15",
            lambda: _kw("cogvideox15", hidden_states=torch.randn(1, 3, 4, 8, 12)),
            ValueError,
            r"patches of 2 \(config\.patch_size_t\) with a reshape, so frames must be a multiple "
            r"of 2; got frames=3",
        ),
        (
            "cosmos",
            lambda: _kw("cosmos", hidden_states=torch.randn(1, 4, 3, 8, 11)),
            ValueError,
            r"width must be a multiple of 2; got width=11",
        ),
        (
            "hunyuan_video",
            lambda: _kw("hunyuan_video", encoder_attention_mask=torch.ones(2, 10)),
            ValueError,
            r"encoder_attention_mask of shape \[B, L\] = \(2, 12\).*got a float32 tensor of "
            r"shape \(2, 10\)",
        ),
        (
            "ltx_video",
            lambda: _kw("ltx_video", num_frames=None),
            ValueError,
            r"token grid comes from its num_frames, height and width.*got num_frames=None",
        ),
        (
            "ltx_video",
            lambda: _kw("ltx_video", num_frames=2),
            ValueError,
            r"2 x 4 x 6 = 48 tokens but hidden_states holds S=72",
        ),
        (
            "ltx_video",
            lambda: _kw("ltx_video", video_coords=torch.zeros(2, 3, 72)),
            NotImplementedError,
            r"NYI: .*video_coords",
        ),
        (
            "videomae",
            lambda: _kw("videomae", bool_masked_pos=torch.zeros(1, 40, dtype=torch.bool)),
            NotImplementedError,
            r"NYI: .*bool_masked_pos",
        ),
        (
            "vivit",
            lambda: _kw("vivit", pixel_values=torch.randn(4, 3, 32, 40)),
            ValueError,
            r"pixel_values as a 5-D tensor \[B, F, C, H, W\]",
        ),
    ]
    return [pytest.param(*c, id=f"{c[0]}-{i}") for i, c in enumerate(cases)]


@pytest.mark.parametrize(("family", "make_inputs", "error", "match"), _bad_cases())
def test_bad_inputs_raise_clear_errors(
    family: str, make_inputs: Any, error: type[Exception], match: str
) -> None:
    model = built(family)[0]
    args, kwargs = make_inputs()
    with pytest.raises(error, match=match) as info:
        find_adapter(model).grid(model, args, kwargs)
    if error is ValueError:  # every message says how to fix it
        assert any(w in str(info.value) for w in ("Pass", "Pad", "Use", "Encode")), info.value


# ------------------------------------------------------------------------------- lookup


def test_unknown_model_raises_with_the_way_out() -> None:
    with pytest.raises(ValueError) as info:
        find_adapter(torch.nn.Linear(2, 2))
    msg = str(info.value)
    assert msg.startswith("no VMoBA adapter knows Linear; known families: wan, cogvideox, ")
    assert "(classes WanTransformer3DModel, SkyReelsV2Transformer3DModel" in msg
    assert (
        "Pass layout=VideoLayout(frames=..., height=..., width=..., text_tokens=..., "
        "text_position=...) to vmoba_compile.optimize(...) to use VMoBA on any model." in msg
    )


def test_same_class_name_outside_the_library_does_not_match() -> None:
    class WanTransformer3DModel(torch.nn.Module):  # a user's own model of the same name
        pass

    with pytest.raises(ValueError, match="no VMoBA adapter knows WanTransformer3DModel"):
        find_adapter(WanTransformer3DModel())


def test_subclass_of_a_known_model_matches() -> None:
    from diffusers import WanTransformer3DModel

    class MyWan(WanTransformer3DModel):
        pass

    model = MyWan(**tm.spec("wan").config)
    assert find_adapter(model).family == "wan"
    assert find_adapter(model).self_attention_modules(model) == ["blocks.0.attn1", "blocks.1.attn1"]


def test_pipeline_gets_a_hint() -> None:
    class Pipeline:  # diffusers pipelines are not nn.Modules; they hold .transformer
        transformer = built("wan")[0]

    with pytest.raises(ValueError, match=r"pass its \.transformer \(WanTransformer3DModel\)"):
        find_adapter(Pipeline())


def test_registry_covers_every_family() -> None:
    families = [a.family for a in ADAPTERS]
    assert len(families) == len(set(families))
    assert set(families) == set(tm.ADAPTER_FAMILY.values())
    assert all(isinstance(a, ModelAdapter) and a.model_classes and a.library for a in ADAPTERS)
    from vmoba_compile.adapters import base

    # One direction: the registry imports the adapters, base (the contract) imports none of them.
    assert not hasattr(base, "find_adapter") and not hasattr(base, "ADAPTERS")


def test_import_does_not_import_model_libraries() -> None:
    code = (
        "import sys, vmoba_compile.adapters; "
        "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ VideoGrid


def test_video_grid_layout_for() -> None:
    grid = VideoGrid(2, 4, 6, text_position="prefix")
    assert grid.text_position is TextPosition.PREFIX
    assert grid.video_tokens == 48
    assert grid.layout_for(48) == VideoLayout(2, 4, 6, 0, TextPosition.PREFIX)
    assert grid.layout_for(57) == VideoLayout(2, 4, 6, 9, TextPosition.PREFIX)
    assert grid.layout_for(47) is None
    assert VideoGrid(1, 1, 1).layout_for(3) == VideoLayout(1, 1, 1, 2, TextPosition.SUFFIX)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(frames=0, height=4, width=4), r"VideoGrid\.frames must be an int >= 1.*got 0"),
        (dict(frames=2, height=4.0, width=4), r"VideoGrid\.height must be an int >= 1.*got 4\.0"),
        (dict(frames=2, height=4, width=4, text_position="middle"), r"'prefix' or 'suffix'"),
        (dict(frames=2, height=4, width=4, text_key_padding=1), r"must be a bool; got 1"),
    ],
)
def test_video_grid_validates(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VideoGrid(**kwargs)


def test_hunyuan_image_on_an_image_stays_dense_with_the_reason() -> None:
    """HunyuanImage's own 4-D image input is not a video: every call dense, the report says so
    (its 5-D video input is a family above, with the key padding it pads True over the video)."""
    model = tm.build("hunyuan_image", patch_size=(2, 2), rope_axes_dim=(8, 8))[0]
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, 12)
    kwargs = dict(
        hidden_states=torch.randn(1, 4, 8, 12, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 12, 16, generator=g),
        encoder_attention_mask=mask,
    )
    report = explain(model, (), kwargs)
    assert report.calls and not report.rewritten, report
    video = [c for c in report.calls if "refiner" not in c.module]
    assert video and all("an image (4-D), not a video" in c.reason for c in video), report
