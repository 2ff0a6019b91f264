"""What VMoBA selects in each layer of a real forward call: density and block maps.

:func:`selection_maps` runs the model once, eagerly, and records the ``q``/``k`` of every video
self-attention call (a ``TorchFunctionMode`` scoped to that one call; nothing is patched), then
computes each layer's selection exactly as the rewritten model would. :func:`vmoba_eager` runs a
model eagerly with VMoBA attention in place of the calls the pass would rewrite.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .adapters.registry import find_adapter
from .attention import (
    kernel_mask,
    permute,
    plan_blocks,
    plan_for,
    text_key_mask_from_padding,
    vmoba_attention,
)
from .config import Granularity, VMoBAConfig
from .layout import VideoLayout
from .masks import mask_pieces, plan_index
from .passes import Skip
from .passes.rewrite import CallContext, bind_sdpa, decide
from .token_rows import sort_rows

__all__ = [
    "CapturedCall",
    "LayerSelection",
    "attention_recall",
    "block_density",
    "mask_density",
    "capture_attention",
    "selection_maps",
    "token_block_density",
    "vmoba_eager",
]


@dataclasses.dataclass
class LayerSelection:
    """One video self-attention call's selection.

    Attributes:
        module: the attention module's path.
        layer_index: its VMoBA layer index.
        partition: ``"1d"``, ``"2d"`` or ``"3d"``.
        layout: the call's token layout.
        density: share of (query, key) token pairs computed, over real tokens, all heads and
            samples (text rows and columns included, as the kernel computes them).
        token_map: ``[S, S]`` bool of sample 0, head 0, in the call's token order: True where a
            query (row) attends a key (column), at block resolution.
        chunk_order: ``[S]`` int64: the tokens in the order the kernel sees them (chunk by
            chunk, text last), or None (call order).
        chunk_sizes: real tokens of each chunk, in that order (the text follows them).
    """

    module: str
    layer_index: int
    partition: str
    layout: VideoLayout
    density: float
    token_map: torch.Tensor
    chunk_order: torch.Tensor | None = None
    chunk_sizes: tuple[int, ...] = ()


class _SDPAMode(TorchFunctionMode):
    """Hands every SDPA call made inside one of ``wanted``'s modules to ``on_call(module, bound)``
    (``bound``: the call's arguments by name); a non-None result replaces the call's."""

    def __init__(self, stack: list[str], on_call) -> None:
        super().__init__()
        self.stack, self.on_call = stack, on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.stack:
            out = self.on_call(self.stack[-1], bind_sdpa(args, kwargs))
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def _sdpa_calls(model: torch.nn.Module, wanted: dict[str, int], on_call):
    """Within the block, SDPA calls made inside the modules named in ``wanted`` go through
    ``on_call`` (module hooks keep the stack of the modules being run; nothing is patched)."""
    stack: list[str] = []

    def leave(module: torch.nn.Module, args: tuple, output: Any) -> None:
        stack.pop()  # returns None: a forward hook's return value would replace the output

    handles = []
    for name, module in model.named_modules():
        if name in wanted:
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: stack.append(n)))
            handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        with _SDPAMode(stack, on_call):
            yield
    finally:
        for h in handles:
            h.remove()


@dataclasses.dataclass
class CapturedCall:
    """One video self-attention call of an eager forward: its q, k and layout.

    Attributes:
        module: the attention module's path.
        layer_index: its VMoBA layer index (the adapter's order).
        layout: the call's token layout.
        q: ``[B, H, S, D]`` (detached); k: ``[B, Hkv, S, D]``.
        text_key_mask: ``[B, L]`` bool from a declared key-padding mask, or None.
    """

    module: str
    layer_index: int
    layout: VideoLayout
    q: torch.Tensor
    k: torch.Tensor
    text_key_mask: torch.Tensor | None


@torch.no_grad()
def capture_attention(model: torch.nn.Module, *args: Any, **kwargs: Any) -> list[CapturedCall]:
    """Run ``model(*args, **kwargs)`` eagerly and keep each video self-attention call's q, k.

    ``model`` must have an adapter (the grid and the layer numbering come from it). A
    ``TorchFunctionMode`` scoped to this one call sees the SDPA calls; nothing is patched.
    """
    adapter = find_adapter(model)
    grid = adapter.grid(model, args, kwargs)
    wanted = {n: i for i, n in enumerate(adapter.self_attention_modules(model))}
    ctx = _eager_context(adapter, wanted, grid, VMoBAConfig())
    out = []

    def record(module: str, a: dict) -> None:
        choice = _eligible(a, module, ctx)
        if choice is not None:
            q, k = a["query"].detach(), a["key"].detach()
            tkm = _text_key_mask(a, choice)
            out.append(CapturedCall(module, choice.layer_index, choice.layout, q, k, tkm))

    with _sdpa_calls(model, wanted, record):
        model(*args, **kwargs)
    return out


def _eager_context(adapter: Any, wanted: dict[str, int], grid: Any, config: VMoBAConfig):
    """The pass's call context for an eager forward (its grid, the adapter's layer numbering)."""
    return CallContext(config=config, family=adapter.family, layer_of=wanted, grid=grid)


def _eligible(a: dict, module: str, ctx: CallContext) -> Any:
    """The pass's own decision (:func:`~vmoba_compile.passes.rewrite.decide`) on an eager SDPA call:
    how it would be rewritten, or None where the pass leaves it dense."""
    choice = decide(a, module, ctx, lambda: -1)
    return None if isinstance(choice, Skip) else choice


def _text_key_mask(a: dict, choice: Any) -> torch.Tensor | None:
    if not choice.key_padding:
        return None
    return text_key_mask_from_padding(a["attn_mask"], choice.layout, a["query"].shape[0])


@contextlib.contextmanager
def vmoba_eager(model: torch.nn.Module, config: VMoBAConfig):
    """Within the block, ``model``'s forward calls run eagerly with VMoBA attention.

    The video self-attention calls that the pass would rewrite run :func:`vmoba_attention`
    (same layer schedule, layouts from the adapter); every other call stays dense. No compile of
    the model: for comparing many configurations quickly (each ``optimize`` compiles the model
    again) and for debugging. On CUDA only the attention kernel is compiled. Scoped to this
    block and thread: a ``TorchFunctionMode`` and module hooks, nothing is patched. Not for
    training a model with gradient checkpointing on (its backward's recomputation would not see
    the override): that raises at the forward call.

    Example::

        with vmoba_eager(model, VMoBAConfig(threshold=0.4)):
            video = model(latents, timestep=t, encoder_hidden_states=text)
    """
    adapter = find_adapter(model)
    wanted = {n: i for i, n in enumerate(adapter.self_attention_modules(model))}
    contexts: list[CallContext] = []

    def enter(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled() and getattr(module, "is_gradient_checkpointing", False):
            raise RuntimeError(
                f"vmoba_eager cannot run a training forward of {type(module).__name__} with "
                "gradient checkpointing on: the backward recomputes the blocks outside this "
                "block's attention override, so torch.utils.checkpoint would fail with "
                "CheckpointError (different tensors saved). Call "
                "model.disable_gradient_checkpointing() for eager runs, run under "
                "torch.no_grad(), or train through vmoba_compile.optimize(model), which handles "
                "checkpointing."
            )
        contexts[:] = [_eager_context(adapter, wanted, adapter.grid(module, args, kwargs), config)]

    def replace(module: str, a: dict) -> torch.Tensor | None:
        # The calls the pass would rewrite, decided by the pass's own rule.
        choice = _eligible(a, module, contexts[-1]) if contexts else None
        if choice is None:
            return None
        tkm = _text_key_mask(a, choice)
        return vmoba_attention(
            a["query"], a["key"], a["value"], layout=choice.layout, config=config,
            layer_index=choice.layer_index, scale=a["scale"], text_key_mask=tkm,
        )  # fmt: skip

    hook = model.register_forward_pre_hook(enter, with_kwargs=True)
    try:
        with _sdpa_calls(model, wanted, replace):
            yield
    finally:
        hook.remove()


@torch.no_grad()
def selection_maps(
    model: torch.nn.Module, config: VMoBAConfig, *args: Any, **kwargs: Any
) -> list[LayerSelection]:
    """Each video self-attention call's selection in ``model(*args, **kwargs)`` (eager)."""
    return [
        _layer_selection(c.module, c.layer_index, c.q, c.k, c.layout, config, c.text_key_mask)
        for c in capture_attention(model, *args, **kwargs)
    ]


def _block_mask(q, k, layout, config, layer_index, text_key_mask=None, as_kernel=False):
    """``(plan, index tensors, BlockMask)`` of one call as the op builds them (in chunk order,
    or with ``as_kernel`` over the rows the kernel reads), or None when the layer keeps every
    chunk (the op then runs dense SDPA)."""
    plan = plan_for(layout, config, layer_index)
    if config.keeps_all_chunks(plan.num_chunks):
        return None
    idx = plan_index(plan, q.device)
    qp, kp = permute(q, plan, idx), permute(k, plan, idx)
    if as_kernel:
        return plan, idx, kernel_mask(qp, kp, plan, config, idx, text_key_mask)[1]
    return plan, idx, plan_blocks(qp, kp, plan, config, text_key_mask, idx).block_mask


def _layer_selection(module, layer, q, k, layout, config, tkm) -> LayerSelection:
    partition = config.partition_for(layer).value
    plan = plan_for(layout, config, layer)
    order = torch.argsort(plan_index(plan, torch.device("cpu")).slots)  # chunk by chunk
    sizes = tuple(plan.chunk_sizes)
    built = _block_mask(q, k, layout, config, layer, tkm)
    if built is None:
        s = layout.seq_len
        full = torch.ones(s, s, dtype=torch.bool)
        return LayerSelection(module, layer, partition, layout, 1.0, full, order, sizes)
    plan, idx, bm = built
    blocks = bm.to_dense().bool()  # [B, H, NB, NB] in padded chunk order (block level)
    count = idx.block_count.to(torch.float64)
    pairs = count[:, None] * count[None, :]
    density = float(
        (blocks.double() * pairs).sum() / (pairs.sum() * blocks.shape[0] * blocks.shape[1])
    )
    slot_block = idx.slots // plan.block_size
    token_map = blocks[0, 0][slot_block][:, slot_block].cpu()
    return LayerSelection(module, layer, partition, layout, density, token_map, order, sizes)


@torch.no_grad()
def attention_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    layout: VideoLayout,
    config: VMoBAConfig,
    layer_index: int,
    scale: float | None = None,
    rows: int = 1024,
) -> float:
    """Share of the dense softmax mass that VMoBA's selection keeps, averaged over queries.

    For each query (all heads, all samples) the dense attention probabilities are summed over the
    keys the selection lets it attend; 1.0 means nothing of the dense attention is dropped.
    Computed in float32, ``rows`` queries at a time.

    Args:
        q: ``[B, H, S, D]``; k: ``[B, Hkv, S, D]`` (GQA allowed).
        layout, config, layer_index: as for :func:`~vmoba_compile.vmoba_attention`.
        scale: softmax scale (default ``1 / sqrt(D)``).
    """
    b, h, s, d = q.shape
    built = _block_mask(q, k, layout, config, layer_index)
    if built is None:
        return 1.0
    _, idx, bm = built
    mask_mod = bm.mask_mod
    kf = k.float().repeat_interleave(h // k.shape[1], dim=1)
    scale = d**-0.5 if scale is None else scale
    bi = torch.arange(b, device=q.device)[:, None, None, None]
    hi = torch.arange(h, device=q.device)[None, :, None, None]
    kv_slots = idx.slots[None, None, None, :]
    kept = 0.0
    for lo in range(0, s, rows):
        p = torch.softmax(q[:, :, lo : lo + rows].float() @ kf.transpose(-1, -2) * scale, dim=-1)
        q_slots = idx.slots[lo : lo + rows][None, None, :, None]
        m = mask_mod(bi, hi, q_slots, kv_slots)
        kept += float((p * m).sum())
    return kept / (b * h * s)


@torch.no_grad()
def block_density(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    layout: VideoLayout,
    config: VMoBAConfig,
    layer_index: int,
    text_key_mask: torch.Tensor | None = None,
) -> float:
    """Block pairs the attention kernel computes for this call, over the block pairs of dense
    attention on the same sequence (``ceil(S / block_size)`` squared), all heads and samples.

    1.0 when every chunk is kept (the op then runs dense SDPA). Padding can make it exceed the
    share of chunks selected: the kernel runs on the padded sequence, dense on the real one.
    TOKEN granularity: the mask on the rows in the order ``config.token_order`` gives them.
    """
    built = _block_mask(q, k, layout, config, layer_index, text_key_mask, as_kernel=True)
    return 1.0 if built is None else mask_density(built[2], layout.seq_len)


def mask_density(block_mask, seq_len: int) -> float:
    """Computed block pairs of ``block_mask`` over the ``ceil(seq_len / block) ** 2`` pairs of
    dense attention on ``seq_len`` tokens, averaged over its batch and heads."""
    dense = block_mask.to_dense()
    b, h = dense.shape[:2]
    n = -(-seq_len // block_mask.BLOCK_SIZE[0])
    return float(dense.sum()) / (b * h * n * n)


def _video_blocks(tables: dict[str, torch.Tensor], nvb: int) -> tuple[int, int]:
    """(partial, full) blocks that the key-side tables list between video query blocks and
    video key blocks (the first ``nvb`` of each)."""
    counts = []
    for name in ("kv", "full_kv"):
        num, ind = tables[f"{name}_num_blocks"], tables[f"{name}_indices"]
        listed = torch.arange(ind.shape[-1], device=ind.device) < num[..., None]
        counts.append(int((listed & (ind < nvb))[:, :, :nvb].sum()))
    return counts[0], counts[1]


@torch.no_grad()
def token_block_density(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    layout: VideoLayout,
    config: VMoBAConfig,
    layer_index: int,
) -> dict[str, float]:
    """The work of one TOKEN-granularity call, with the query rows in the padded chunk order
    (``natural``) and sorted by selection (``sorted``, :mod:`vmoba_compile.token_rows`).

    A proxy of kernel time that needs no GPU: the block tables are those the op hands the
    kernel. Video query and key blocks only (text rows and columns, the same in both orders,
    left out).

    Returns:
        ``token``: selected (video query, video key) token pairs over all of them; for each order
        ``block_<order>``: video block pairs the kernel computes over all of them (padded
        chunk blocks); ``full_<order>``: the share of those that are full (no ``mask_mod``).
        Averaged over batch and heads.

    Raises:
        ValueError: ``config`` is not TOKEN granularity, or keeps every chunk.
    """
    plan = plan_for(layout, config, layer_index)
    if config.granularity is not Granularity.TOKEN or config.keeps_all_chunks(plan.num_chunks):
        raise ValueError(f"token_block_density needs a sparse TOKEN config; got {config!r}.")
    idx = plan_index(plan, q.device)
    qp, kp = permute(q, plan, idx), permute(k, plan, idx)
    sel = plan_blocks(qp, kp, plan, config, idx=idx, q_tables=False).sel
    nvb, nv = plan.num_video_blocks, plan.video_padded
    real = idx.real[:nv]
    n = int(real.sum())
    b, h = sel.shape[:2]
    pairs = (sel.double() @ idx.sizes.double()) * real
    out = {"token": float(pairs.sum()) / (b * h * n * n)}
    rows = sort_rows(sel, idx.real, idx.onehot.sum(0), plan.block_size)
    for order, s, q_real in (("natural", sel, None), ("sorted", rows.sel, rows.q_real)):
        pieces = mask_pieces(plan, idx, s, token_level=True, q_tables=False, q_real=q_real)
        partial, full = _video_blocks(pieces.tables, nvb)
        out[f"block_{order}"] = (partial + full) / (b * h * nvb * nvb)
        out[f"full_{order}"] = full / max(partial + full, 1)
    return out
