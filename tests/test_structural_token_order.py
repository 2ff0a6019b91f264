"""The structural fallback verifies the token order of every self-attention call, not the first.

A home-made DiT whose blocks may attend their video tokens in another order (each block permutes
the video rows before its attention and restores them after, as a block that attends in
``(h, w, t)`` order does). The probe must find every block whose order is not frame-major, keep
its calls dense with :attr:`SkipReason.TOKEN_ORDER_UNPROVEN`, and rewrite the others; a
permutation anywhere in the grid (two frames, two rows, two columns, two tokens) is seen,
because the probe covers every token, not a sample of them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ATOL_F32, max_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sdpa_spy import run_with_sdpa

from vmoba_compile import SkipReason, VideoLayout, VMoBAConfig, optimize, vmoba_reference
from vmoba_compile.adapters import find_adapter
from vmoba_compile.adapters.structural import STRUCTURAL

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CONFIG = VMoBAConfig(
    selection="topk", topk=2, block_size=16, chunk_1d=(1,), chunk_2d=(2, 2), chunk_3d=(1, 2, 2)
)
TEXT = 3


class Attention(torch.nn.Module):
    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.to_out = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x))
        )
        return self.to_out(out.transpose(1, 2).reshape(b, s, d))


class Block(torch.nn.Module):
    """Attends the rows in ``order`` (indices of the sequence), then puts them back."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.ff = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.norm(x)[:, order])
        x = x + h[:, torch.argsort(order)]
        return x + self.ff(F.gelu(x))


class OrderDiT(torch.nn.Module):
    """Conv3d patchify ``[B, C, T, H, W]``, ``TEXT`` text tokens before the video, ``layers``
    blocks; ``orders[i]`` (a permutation of the video tokens, frame-major indices) is the order
    block ``i`` attends in."""

    def __init__(
        self, grid: tuple[int, int, int], orders: dict[int, torch.Tensor], layers: int = 3
    ) -> None:
        super().__init__()
        self.grid, self.orders = grid, orders
        self.patch_embed = torch.nn.Conv3d(5, 16, (1, 2, 2), stride=(1, 2, 2))
        self.text_proj = torch.nn.Linear(8, 16)
        self.blocks = torch.nn.ModuleList(Block(16) for _ in range(layers))
        self.head = torch.nn.Linear(16, 4)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        x = self.patch_embed(hidden_states).flatten(2).transpose(1, 2)
        n = x.shape[1]
        seq = torch.cat([self.text_proj(encoder_hidden_states), x], dim=1)
        identity = torch.arange(n)
        for i, block in enumerate(self.blocks):
            video = self.orders.get(i, identity)
            seq = block(seq, torch.cat([torch.arange(TEXT), TEXT + video]))
        return self.head(seq[:, TEXT:])


def inputs(grid: tuple[int, int, int], seed: int = 0) -> dict:
    t, y, x = grid
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 5, t, 2 * y, 2 * x, generator=g),
        encoder_hidden_states=torch.randn(1, TEXT, 8, generator=g),
    )


def permutation(kind: str, grid: tuple[int, int, int], a: int, b: int) -> torch.Tensor:
    """An order of the ``t * y * x`` tokens (frame-major indices); the identity where the
    swapped indices coincide (or ``hwt`` on a grid where it changes nothing)."""
    t, y, x = grid
    index = torch.arange(t * y * x).reshape(t, y, x)
    if kind == "swap_frames":
        index[[a % t, b % t]] = index[[b % t, a % t]]
    elif kind == "swap_rows":
        index[:, [a % y, b % y]] = index[:, [b % y, a % y]]
    elif kind == "swap_columns":
        index[:, :, [a % x, b % x]] = index[:, :, [b % x, a % x]]
    elif kind == "swap_two_tokens":
        flat = index.flatten()
        i, j = a % flat.numel(), b % flat.numel()
        flat[[i, j]] = flat[[j, i]]
        return flat
    elif kind == "hwt":
        return index.permute(1, 2, 0).flatten()
    return index.flatten()


KINDS = ["swap_frames", "swap_rows", "swap_columns", "swap_two_tokens", "hwt"]


def _distinct(kind: str, grid: tuple[int, int, int], a: int, b: int) -> bool:
    t, y, x = grid
    size = {"swap_frames": t, "swap_rows": y, "swap_columns": x, "swap_two_tokens": t * y * x}
    if kind == "hwt":
        return sorted(grid) != [1, 1, t * y * x] and not (y == x == 1)
    return a % size[kind] != b % size[kind]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    grid=st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
    kind=st.sampled_from(KINDS),
    layer=st.integers(0, 2),
    a=st.integers(0, 11),
    b=st.integers(0, 11),
)
def test_every_block_whose_order_is_not_frame_major_is_refused(
    grid: tuple[int, int, int], kind: str, layer: int, a: int, b: int
) -> None:
    """Any permutation in any block is found; only that block is refused (the grid the pass
    reads; the end-to-end test below checks that a refused module's calls stay dense)."""
    order = permutation(kind, grid, a, b)
    changed = not torch.equal(order, torch.arange(order.numel()))
    if kind != "hwt":
        assert changed == _distinct(kind, grid, a, b)
    torch.manual_seed(0)
    model = OrderDiT(grid, {layer: order}).eval()
    assert find_adapter(model) is STRUCTURAL
    got = STRUCTURAL.grid(model, (), inputs(grid))
    assert got.text_position.value == "prefix"
    for i in range(3):
        why = got.order_unproven(f"blocks.{i}.attn")
        if i == layer and changed:
            assert why is not None and "frame-major order predicts" in why, (kind, grid, got)
        else:
            assert why is None, (kind, grid, layer, why)


def test_a_block_in_hwt_order_is_dense_and_the_rest_equal_the_reference() -> None:
    """End to end: block 1 attends in (h, w, t) order; the model runs VMoBA in blocks 0 and 2
    (layers 0 and 2 of the schedule), dense in block 1, and equals that reference."""
    grid = (2, 3, 4)
    torch.manual_seed(0)
    model = OrderDiT(grid, {1: permutation("hwt", grid, 0, 0)}).eval()
    kwargs = inputs(grid)
    opt = optimize(model, CONFIG, lowering="aot_eager")
    with torch.no_grad():
        out = opt(**kwargs)
    report = opt.report
    assert [c.module for c in report.rewritten] == ["blocks.0.attn", "blocks.2.attn"], report
    (dense,) = report.skipped
    assert dense.module == "blocks.1.attn" and dense.skip is SkipReason.TOKEN_ORDER_UNPROVEN
    assert "frame-major order predicts" in dense.reason
    layout = VideoLayout(*grid, text_tokens=TEXT, text_position="prefix")

    def replace(module: str, args: dict) -> torch.Tensor | None:
        if module == "blocks.1.attn":
            return None
        layer = int(module.split(".")[1])
        return vmoba_reference(
            args["query"],
            args["key"],
            args["value"],
            layout=layout,
            config=CONFIG,
            layer_index=layer,
        )

    with torch.no_grad():
        reference = run_with_sdpa(model, (), kwargs, replace)[0]
        dense_out = model(**kwargs)
    assert max_err(out, reference) < ATOL_F32
    assert max_err(out, dense_out) > 1e-4  # VMoBA ran: the top-2 selection drops chunks
    counts = report.executions
    assert counts["blocks.0.attn"].vmoba_forward == 1 and counts["blocks.1.attn"].vmoba_forward == 0
    assert counts["blocks.1.attn"].dense_forward == 1


def test_the_probe_covers_every_token_in_few_runs() -> None:
    """The probe runs the model 2 + ceil(log2 N) times (plus the stem's run), whatever the
    grid: the order of all N tokens is checked at every call, not a sample."""
    grid = (3, 4, 5)
    torch.manual_seed(0)
    model = OrderDiT(grid, {}).eval()
    runs = []
    hook = model.patch_embed.register_forward_hook(lambda *_: runs.append(1))
    got = STRUCTURAL.grid(model, (), inputs(grid))
    hook.remove()
    n = 3 * 4 * 5
    assert len(runs) == 1 + 2 + (n - 1).bit_length()
    assert got.order_verified == ("blocks.0.attn", "blocks.1.attn", "blocks.2.attn")
    assert got.order_refused == ()
