"""vmoba_attention against the float64 reference, eager and compiled (CPU, inference)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import ATOL_F32, max_err
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import configs, layouts

from vmoba_compile import VideoLayout, VMoBAConfig, vmoba_attention, vmoba_reference

MODES = list(
    itertools.product(["block", "token"], ["topk", "threshold"], ["query", "head"], [0, 1, 2])
)


def _qkv(layout, b=2, h=4, hkv=None, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = layout.seq_len
    q = torch.randn(b, h, s, d, generator=g).to(dtype)
    k = torch.randn(b, hkv or h, s, d, generator=g).to(dtype)
    v = torch.randn(b, hkv or h, s, d, generator=g).to(dtype)
    return q, k, v


def _ragged_config(**kwargs) -> VMoBAConfig:
    """Chunk shapes that leave ragged edges on the 5x6x7 grid of the tests below."""
    return VMoBAConfig(chunk_1d=(2,), chunk_2d=(3, 4), chunk_3d=(2, 3, 3), block_size=16, **kwargs)


@pytest.mark.parametrize(("gran", "sel", "scope", "layer"), MODES)
@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_matches_reference_every_mode(gran, sel, scope, layer, position):
    # 5x6x7 is ragged for every chunk shape below; S = 222 is not a multiple of the block
    layout = VideoLayout(5, 6, 7, text_tokens=12, text_position=position)
    cfg = _ragged_config(selection=sel, topk=2, threshold=0.3, scope=scope, granularity=gran)
    q, k, v = _qkv(layout, seed=layer)
    out = vmoba_attention(q, k, v, layout=layout, config=cfg, layer_index=layer)
    ref = vmoba_reference(q, k, v, layout=layout, config=cfg, layer_index=layer)
    dense = F.scaled_dot_product_attention(q, k, v)
    assert max_err(out, ref) < ATOL_F32, (max_err(out, ref), cfg)
    assert max_err(out, dense) > 100 * ATOL_F32, "sparse config should differ from dense"


@settings(max_examples=60)
@given(data=st.data())
def test_matches_reference_random(data):
    layout = data.draw(layouts(max_side=6, max_text=12))
    cfg = data.draw(configs(layout))
    layer = data.draw(st.integers(0, 5))
    hkv = data.draw(st.sampled_from([1, 2, 4]))
    q, k, v = _qkv(layout, b=2, h=4, hkv=hkv, d=8, seed=data.draw(st.integers(0, 999)))
    scale = data.draw(st.sampled_from([None, 0.3]))
    out = vmoba_attention(q, k, v, layout=layout, config=cfg, layer_index=layer, scale=scale)
    ref = vmoba_reference(q, k, v, layout=layout, config=cfg, layer_index=layer, scale=scale)
    assert max_err(out, ref) < ATOL_F32, (layout, cfg, layer)


@settings(max_examples=200)
@given(data=st.data())
def test_keep_everything_equals_dense(data):
    layout = data.draw(layouts(max_side=5, max_text=8))
    keep_all = data.draw(
        st.sampled_from([dict(selection="threshold", threshold=1.0), dict(selection="topk")])
    )
    cfg = data.draw(configs(layout, **keep_all))
    if cfg.selection.value == "topk":
        cfg = VMoBAConfig(**{**cfg.__dict__, "topk": layout.video_tokens})
    q, k, v = _qkv(layout, b=1, h=2, d=8, seed=data.draw(st.integers(0, 999)))
    out = vmoba_attention(
        q, k, v, layout=layout, config=cfg, layer_index=data.draw(st.integers(0, 2))
    )
    assert max_err(out, F.scaled_dot_product_attention(q, k, v)) < ATOL_F32


def test_single_chunk_and_block_size_128_equal_dense():
    layout = VideoLayout(3, 8, 8, text_tokens=7)  # S = 199: one 128-block chunk per partition
    q, k, v = _qkv(layout, b=2, h=2)
    out = vmoba_attention(q, k, v, layout=layout, config=VMoBAConfig(), layer_index=1)
    assert max_err(out, F.scaled_dot_product_attention(q, k, v)) < ATOL_F32


def test_block_size_128_sparse_with_odd_length():
    layout = VideoLayout(6, 10, 12, text_tokens=31, text_position="prefix")  # S = 751
    cfg = VMoBAConfig(chunk_1d=(2,), chunk_2d=(5, 6), chunk_3d=(3, 5, 6), topk=2, selection="topk")
    q, k, v = _qkv(layout, b=2, h=2, hkv=1)
    for layer in range(3):
        out = vmoba_attention(q, k, v, layout=layout, config=cfg, layer_index=layer)
        ref = vmoba_reference(q, k, v, layout=layout, config=cfg, layer_index=layer)
        assert max_err(out, ref) < ATOL_F32


def test_text_key_mask_is_honoured():
    layout = VideoLayout(4, 5, 6, text_tokens=20, text_position="suffix")
    cfg = VMoBAConfig(chunk_3d=(2, 3, 3), block_size=16, threshold=0.3, scope="head")
    q, k, v = _qkv(layout, b=2, h=2)
    tkm = torch.ones(2, 20, dtype=torch.bool)
    tkm[0, 13:] = False
    tkm[1, 5:] = False
    out = vmoba_attention(q, k, v, layout=layout, config=cfg, layer_index=2, text_key_mask=tkm)
    ref = vmoba_reference(q, k, v, layout=layout, config=cfg, layer_index=2, text_key_mask=tkm)
    assert max_err(out, ref) < ATOL_F32
    # masked text keys truly have no effect: changing their values changes nothing
    v2 = v.clone()
    v2[0, :, layout.video_tokens + 13 :] += 100.0
    out2 = vmoba_attention(q, k, v2, layout=layout, config=cfg, layer_index=2, text_key_mask=tkm)
    assert max_err(out2[0], out[0]) < ATOL_F32
    # and the all-keep path honours it too
    keep = VMoBAConfig(threshold=1.0, block_size=16)
    dense_ref = vmoba_reference(
        q, k, v, layout=layout, config=keep, layer_index=0, text_key_mask=tkm
    )
    out3 = vmoba_attention(q, k, v, layout=layout, config=keep, layer_index=0, text_key_mask=tkm)
    assert max_err(out3, dense_ref) < ATOL_F32


def test_batch_elements_select_independently():
    layout = VideoLayout(4, 4, 4)
    cfg = VMoBAConfig(chunk_3d=(2, 2, 2), block_size=16, scope="head", threshold=0.3)
    q, k, v = _qkv(layout, b=2, h=2)
    both = vmoba_attention(q, k, v, layout=layout, config=cfg, layer_index=2)
    for i in range(2):
        one = vmoba_attention(
            q[i : i + 1], k[i : i + 1], v[i : i + 1], layout=layout, config=cfg, layer_index=2
        )
        assert max_err(one, both[i : i + 1]) < 1e-6


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        (dict(q=torch.randn(2, 10, 4)), ValueError, r"\[B, H, S, D\]"),
        (dict(k=torch.randn(1, 2, 50, 8), v=torch.randn(1, 2, 50, 8)), ValueError, "same length"),
        (dict(k=torch.randn(1, 3, 64, 8), v=torch.randn(1, 3, 64, 8)), ValueError, "multiple"),
        (dict(v=torch.randn(1, 2, 64, 8).double()), TypeError, "dtype"),
        (dict(layout=VideoLayout(4, 4, 3)), ValueError, "S=64"),
        (dict(layout=(4, 4, 4)), TypeError, "VideoLayout"),
        (dict(text_key_mask=torch.ones(1, 3)), ValueError, "text_key_mask"),
    ],
)
def test_bad_input_gets_a_clear_error(kwargs, exc, pattern):
    args = dict(
        q=torch.randn(1, 4, 64, 8),
        k=torch.randn(1, 2, 64, 8),
        v=torch.randn(1, 2, 64, 8),
        layout=VideoLayout(4, 4, 4),
        config=VMoBAConfig(block_size=16),
        layer_index=0,
    )
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=pattern):
        vmoba_attention(q, k, v, **args)


@pytest.mark.compiled
@pytest.mark.parametrize(
    ("gran", "sel", "scope", "layer", "position", "hkv", "with_mask"),
    [
        ("block", "threshold", "head", 2, "suffix", 2, True),
        ("token", "topk", "query", 1, "prefix", 4, False),
    ],
)
def test_compiled_cpu_matches_reference(gran, sel, scope, layer, position, hkv, with_mask):
    """Compiled CPU flex (C++ template) with the mask built inside the compiled region.

    Guards the workaround in ``masks.materialize_for_mask_mod``: without it inductor's CPU
    lowering fails (NoValidChoicesError) or reads unrealized buffers.
    """
    torch._dynamo.reset()
    layout = VideoLayout(5, 6, 7, text_tokens=10, text_position=position)
    cfg = _ragged_config(selection=sel, topk=3, threshold=0.3, scope=scope, granularity=gran)
    q, k, v = _qkv(layout, b=2, h=4, hkv=hkv)
    tkm = (torch.arange(10) < 6).expand(2, 10).clone() if with_mask else None
    fn = torch.compile(vmoba_attention, fullgraph=True)
    out = fn(q, k, v, layout=layout, config=cfg, layer_index=layer, text_key_mask=tkm)
    ref = vmoba_reference(q, k, v, layout=layout, config=cfg, layer_index=layer, text_key_mask=tkm)
    assert max_err(out, ref) < ATOL_F32
    # new data, same shapes: same compiled graph, still right
    q2, k2, v2 = _qkv(layout, b=2, h=4, hkv=hkv, seed=7)
    out2 = fn(q2, k2, v2, layout=layout, config=cfg, layer_index=layer, text_key_mask=tkm)
    ref2 = vmoba_reference(
        q2, k2, v2, layout=layout, config=cfg, layer_index=layer, text_key_mask=tkm
    )
    assert max_err(out2, ref2) < ATOL_F32


def _kernel_inputs(bm) -> list[tuple[int, ...]]:
    """Shapes of everything the flex kernel reads from a BlockMask: its tables and the tensors
    its mask_mod reads (kept beside it, the flex op's ``mask_mod_other_buffers``)."""
    tables = [t.shape for t in bm.as_tuple()[2:] if isinstance(t, torch.Tensor)]
    _, buffers = bm.mask_mod.vmoba_buffers
    assert buffers and all(isinstance(b, torch.Tensor) for b in buffers)
    return [tuple(s) for s in tables + [b.shape for b in buffers]]


@pytest.mark.parametrize(
    ("grid", "whole_blocks"),
    [((24, 36, 64), True), ((16, 32, 32), True), ((21, 30, 52), False), ((21, 45, 80), False)],
)
def test_every_partition_hands_the_kernel_the_same_shapes(grid, whole_blocks) -> None:
    """On Wan's grids (480p, 576p, 720p) and the quality model's, every layer (1D, 2D, 3D) gives
    the attention kernel inputs of the same shapes: plans share one block count (the smaller
    ones end in all-padding blocks) and the mask_mod table one width, so inductor can compile
    one forward and one backward kernel for the model instead of one per partition. Where the
    automatic chunks fill whole blocks (24x36x64, 16x32x32) no block is partial."""
    from vmoba_compile.attention import permute, plan_blocks, plan_for

    layout, config = VideoLayout(*grid), VMoBAConfig()
    q, k = torch.randn(2, 1, 1, layout.seq_len, 16).unbind(0)
    shapes, partials = [], []
    for layer in range(3):
        plan = plan_for(layout, config, layer)
        qp, kp = permute(q, plan), permute(k, plan)
        bm = plan_blocks(qp, kp, plan, config).block_mask
        shapes.append(_kernel_inputs(bm))
        partials.append(int(bm.kv_num_blocks.sum()))
    assert shapes[0] == shapes[1] == shapes[2], shapes
    if whole_blocks:
        assert partials == [0, 0, 0], "whole-block chunks must not leave partial blocks"


def test_inference_masks_skip_the_query_side_tables(monkeypatch) -> None:
    """Without gradients the mask has no query-side tables (only the backward reads them) and
    the same key-side tables; vmoba_attention asks for them exactly when a backward can follow
    (FlexAttention refuses a mask without them then)."""
    from vmoba_compile import attention
    from vmoba_compile.attention import build_block_mask, permute, plan_blocks, plan_for

    layout = VideoLayout(4, 8, 8, text_tokens=20)
    config = VMoBAConfig(block_size=16, chunk_2d=(4, 4), selection="topk", topk=2)
    q, k, v = torch.randn(3, 2, 2, layout.seq_len, 16).unbind(0)
    plan = plan_for(layout, config, 1)
    qp, kp = permute(q, plan), permute(k, plan)
    full = plan_blocks(qp, kp, plan, config).block_mask
    lean = plan_blocks(qp, kp, plan, config, q_tables=False).block_mask
    assert lean.q_indices is None and lean.full_q_indices is None
    assert full.q_indices is not None
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(lean, name), getattr(full, name)), name

    asked = []

    def spy(*args, **kwargs):
        asked.append(kwargs["q_tables"])  # build_block_mask(plan, idx, sel, ..., q_tables=)
        return build_block_mask(*args, **kwargs)

    monkeypatch.setattr(attention, "build_block_mask", spy)
    kw = dict(layout=layout, config=config, layer_index=1)
    with torch.no_grad():
        out = vmoba_attention(q, k, v, **kw)
    assert max_err(out, vmoba_reference(q, k, v, **kw)) < ATOL_F32
    vmoba_attention(q, k, v, **kw)  # no input needs a gradient
    with pytest.raises(NotImplementedError, match="backward on CPU"):  # CPU flex: no backward
        vmoba_attention(q.requires_grad_(), k, v, **kw)
    assert asked == [False, False, True]


def test_padding_blocks_attend_and_are_attended_by_nothing() -> None:
    """Plans with fewer blocks than the layout's largest end in all-padding blocks: their rows
    and columns of the block mask are empty, and the output still equals the reference."""
    from vmoba_compile.attention import permute, plan_blocks, plan_for

    layout = VideoLayout(3, 6, 10, text_tokens=7)
    config = VMoBAConfig(block_size=16, chunk_1d=(1,), chunk_2d=(3, 5), chunk_3d=(1, 2, 2))
    plans = [plan_for(layout, config, layer) for layer in range(3)]
    assert len({p.num_blocks for p in plans}) == 1
    assert [p.num_pad_blocks > 0 for p in plans] == [True, True, False]
    q, k, v = torch.randn(3, 2, 2, layout.seq_len, 16).unbind(0)
    for layer, plan in enumerate(plans[:2]):
        qp, kp = permute(q, plan), permute(k, plan)
        blocks = plan_blocks(qp, kp, plan, config).block_mask.to_dense().bool()
        pad = slice(plan.num_blocks - plan.num_pad_blocks, plan.num_blocks)
        assert not blocks[..., pad, :].any() and not blocks[..., pad].any()
        assert blocks[..., : pad.start, : pad.start].any(dim=-1).all(), "a real row attends nothing"
        kw = dict(layout=layout, config=config, layer_index=layer)
        with torch.no_grad():
            out = vmoba_attention(q, k, v, **kw)
        assert max_err(out, vmoba_reference(q, k, v, **kw)) < ATOL_F32
