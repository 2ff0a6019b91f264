"""Permutation invariants (chunk order, padding, inverse) on random and ragged grids."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import configs, layouts

from vmoba_compile import Partition, VideoLayout, VMoBAConfig
from vmoba_compile.attention import permute, plan_for, unpermute
from vmoba_compile.layout import make_plan, resolve_chunk


@settings(max_examples=200)
@given(data=st.data())
def test_permutation_round_trip_is_identity(data):
    layout = data.draw(layouts())
    config = data.draw(configs(layout))
    layer = data.draw(st.integers(0, 2))
    plan = plan_for(layout, config, layer)
    x = torch.randn(2, 3, layout.seq_len, 4)
    xp = permute(x, plan)
    assert xp.shape[2] == plan.padded_len and plan.padded_len % config.block_size == 0
    assert torch.equal(unpermute(xp, plan), x)
    _, real = plan.slot_tokens(x.device)
    assert int(real.sum()) == layout.seq_len
    assert torch.all(xp[:, :, ~real] == 0), "padding slots must hold zeros"
    in_order = plan.padded_len == layout.seq_len and torch.equal(
        plan.token_slots(x.device), torch.arange(layout.seq_len)
    )
    assert plan.is_identity == in_order


@pytest.mark.parametrize(
    ("text", "position", "frames_per_chunk", "identity"),
    [(0, "suffix", 1, True), (16, "suffix", 2, True), (16, "prefix", 1, False),
     (8, "suffix", 1, False)],
)  # fmt: skip
def test_whole_frame_chunks_without_padding_skip_the_permutation(
    text, position, frames_per_chunk, identity
):
    layout = VideoLayout(4, 4, 8, text_tokens=text, text_position=position)  # 32 tokens a frame
    config = VMoBAConfig(block_size=16, chunk_1d=(frames_per_chunk,))
    plan = plan_for(layout, config, 0)
    assert plan.is_identity == identity
    x = torch.randn(1, 2, layout.seq_len, 4)
    assert (permute(x, plan) is x) == identity
    assert torch.equal(unpermute(permute(x, plan), plan), x)


@settings(max_examples=200)
@given(data=st.data())
def test_chunks_are_contiguous_boxes_in_tile_order(data):
    layout = data.draw(layouts(max_text=0))
    config = data.draw(configs(layout))
    partition = data.draw(st.sampled_from(list(Partition)))
    ct, cy, cx = resolve_chunk(config, partition, layout)
    plan = make_plan(layout, (ct, cy, cx), config.block_size)
    token, real = plan.slot_tokens(torch.device("cpu"))
    t_, y_, x_ = layout.frames, layout.height, layout.width
    boxes = itertools.product(range(0, t_, ct), range(0, y_, cy), range(0, x_, cx))
    for cid, (t0, y0, x0) in enumerate(boxes):
        start = plan.chunk_offsets[cid]
        got = token[start : start + plan.chunk_sizes[cid]]
        assert bool(real[start : start + plan.chunk_sizes[cid]].all())
        expect = [
            (t * y_ + y) * x_ + x
            for t in range(t0, min(t0 + ct, t_))
            for y in range(y0, min(y0 + cy, y_))
            for x in range(x0, min(x0 + cx, x_))
        ]
        assert got.tolist() == expect, f"chunk {cid} of {layout} with chunk {(ct, cy, cx)}"
        # a block never spans two chunks
        assert start % config.block_size == 0


def test_text_tokens_sit_after_video_in_padded_order():
    layout = VideoLayout(2, 3, 3, text_tokens=5, text_position="prefix")
    plan = make_plan(layout, (1, 3, 3), 16)
    token, real = plan.slot_tokens(torch.device("cpu"))
    text_slots = token[plan.video_padded : plan.video_padded + 5]
    assert text_slots.tolist() == [0, 1, 2, 3, 4]
    assert plan.num_text_blocks == 1 and plan.num_chunks == 2


@pytest.mark.parametrize(
    ("grid", "block"),
    [((21, 30, 52), 128), ((24, 36, 64), 128), ((21, 45, 80), 128), ((4, 32, 32), 128)],
)
def test_automatic_chunks_fit_blocks_at_real_sizes(grid, block):
    layout = VideoLayout(*grid)
    cfg = VMoBAConfig(block_size=block)
    for part in Partition:
        plan = make_plan(layout, resolve_chunk(cfg, part, layout), block)
        waste = plan.video_padded / layout.video_tokens - 1
        assert plan.num_chunks >= 2, (part, plan.chunk)
        assert waste < 0.25, f"{part} chunk {plan.chunk} pads {waste:.1%} of {grid}"


def test_ragged_3d_grid_from_the_issue():
    layout = VideoLayout(21, 30, 52)
    plan = make_plan(layout, (4, 8, 8), 128)
    assert plan.num_chunks == 6 * 4 * 7
    assert sum(plan.chunk_sizes) == layout.video_tokens


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_layer_plan_carries_the_plan_of_its_layer(data):
    # layer_plan rebuilds the config from the fields plans depend on: a field missed there would
    # give some layer another plan than plan_for's.
    layout = data.draw(layouts())
    config = data.draw(configs(layout))
    layer = data.draw(st.integers(0, 5))
    from vmoba_compile.attention import layer_plan

    want = plan_for(layout, config, layer)
    got = layer_plan(layout, config, layer)
    # the table width: the largest chunk count among the schedule's partitions
    widest = max(plan_for(layout, config, i).num_chunks for i in range(len(config.schedule)))
    for field in got._fields:
        expected = widest if field == "columns" else getattr(want, field)
        assert getattr(got, field) == expected, field


def test_layer_plan_is_one_constant_under_dynamo():
    from vmoba_compile import attention

    layout = VideoLayout(6, 10, 12, text_tokens=7, text_position="prefix")
    config = VMoBAConfig(block_size=16, chunk_2d=(5, 4))

    def f(x):
        plan = attention.layer_plan(layout, config, 1)
        return x * plan.num_blocks + plan.columns + plan.is_identity

    attention._layer_plan.cache_clear()
    out = torch.compile(f, backend="eager", fullgraph=True)(torch.ones(2))
    # Run natively (its cache counted the call), not traced by Dynamo (which ignores the cache
    # wrapper and would run the plan construction bytecode by bytecode).
    assert attention._layer_plan.cache_info().misses == 1
    plan = attention.layer_plan(layout, config, 1)
    want = float(plan.num_blocks + plan.columns + plan.is_identity)
    assert torch.equal(out, torch.full((2,), want))
    with pytest.raises(ValueError, match="layer_index"):
        attention.layer_plan(layout, config, -1)


def test_layer_plan_under_dynamo_when_the_layer_index_turns_dynamic():
    # A function compiled once and called for several layers: from the second layer on, Dynamo
    # makes the index a symbol (the two compiled GPU tests run at 89f9264 failed this way).
    from vmoba_compile.attention import layer_plan

    layout = VideoLayout(6, 10, 12, text_tokens=7, text_position="prefix")
    config = VMoBAConfig(block_size=16, chunk_2d=(5, 4))

    def f(x, layer):
        plan = layer_plan(layout, config, layer)
        return x * plan.num_chunks + plan.num_video_blocks * 1000

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    for layer in range(4):
        plan = plan_for(layout, config, layer)
        want = float(plan.num_chunks + plan.num_video_blocks * 1000)
        assert compiled(torch.ones(1), layer).item() == want, layer


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_permutation_gradients_equal_the_scatter_they_replace(data):
    # permute / unpermute backpropagate by gathering in the other direction; the reference is
    # autograd through plain index_select (whose backward is index_add), padding included.
    layout = data.draw(layouts())
    config = data.draw(configs(layout))
    plan = plan_for(layout, config, data.draw(st.integers(0, 2)))
    token, real = plan.slot_tokens("cpu")
    slots = plan.token_slots("cpu")
    x = torch.randn(2, 3, layout.seq_len, 4, dtype=torch.float64, requires_grad=True)
    xp = torch.randn(2, 3, plan.padded_len, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, plan.padded_len, 4, dtype=torch.float64)
    u = torch.randn(2, 3, layout.seq_len, 4, dtype=torch.float64)

    (got,) = torch.autograd.grad((permute(x, plan) * w).sum(), x)
    ref = torch.where(real[:, None], torch.index_select(x, 2, token), 0.0)
    (want,) = torch.autograd.grad((ref * w).sum(), x)
    assert torch.allclose(got, want)
    (got,) = torch.autograd.grad((unpermute(xp, plan) * u).sum(), xp)
    (want,) = torch.autograd.grad((torch.index_select(xp, 2, slots) * u).sum(), xp)
    assert torch.allclose(got, want)
    # second order: each backward is itself differentiable (the other direction's Function)
    small = x[:1, :1, :, :2].detach().requires_grad_()
    # fast_mode: random projections of the Jacobians instead of all of them (this test was the
    # CPU suite's slowest: 46 s for 60 examples); a wrong second derivative still shows
    assert torch.autograd.gradgradcheck(
        lambda t: unpermute(permute(t, plan) * 2.0, plan), small, fast_mode=True
    )
