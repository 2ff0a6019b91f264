"""Every version gate and private torch access of the package lives here.

A leaf: it imports torch only, nothing of the package.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = [
    "SchedulerPassBase",
    "autograd_inside_op",
    "compiled_flex_attention",
    "flex_attention_in_trace",
    "flex_attention_targets",
    "hash_for_files",
    "is_compiling",
    "mha_targets",
    "traced_frame_locals",
]

try:
    # Inductor hashes a CustomSchedulerPass's uuid() into its FX graph cache key; any other
    # callable as ``_post_fusion_custom_pass`` makes it bypass the cache for the whole compile.
    from torch._inductor.custom_graph_pass import CustomSchedulerPass as SchedulerPassBase
except ImportError:  # a torch without the scheduler-pass protocol: a plain callable base

    class SchedulerPassBase:  # type: ignore[no-redef]
        """Stand-in base of a scheduler pass where inductor has no ``CustomSchedulerPass``
        (its cache then bypasses compiles that use the pass, as for any callable)."""

        def uuid(self) -> object | None:
            return None


@functools.cache
def hash_for_files(paths: tuple[str, ...]) -> bytes:
    """A digest of the files' contents (as inductor's ``get_hash_for_files``): a custom pass's
    ``uuid()``, so a new source gets a new cache key."""
    import hashlib

    hasher = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            hasher.update(f.read())
    return hasher.digest()


def is_compiling() -> bool:
    """True while Dynamo, AOTAutograd or make_fx traces the caller (tensors may be fake)."""
    if torch.compiler.is_compiling():
        return True
    # compile_fx re-traces our rewritten graph: first under fake + functional modes only
    # (AOTAutograd collecting metadata), then under make_fx's proxy mode. Neither is Dynamo.
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if get_proxy_mode() is not None:
        return True
    keys = torch._C._TorchDispatchModeKey
    return any(torch._C._get_dispatch_mode(k) is not None for k in (keys.FAKE, keys.FUNCTIONAL))


def traced_frame_locals() -> dict[str, Any] | None:
    """The locals of the frame whose graph a backend is compiling (what Dynamo's source names
    ``L['self']``, ``L['args']`` name), or None outside a Dynamo compile (a graph handed to the
    pass by hand) or where this torch keeps them elsewhere.

    Dynamo calls the backend from the translator of the frame it traced (its root
    ``InstructionTranslator``, the current one while the graph compiles); ``f_locals`` are the
    frame's locals as its guards read them.
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except (ImportError, AttributeError):  # no translator now, or none of that name
        return None
    f_locals = getattr(tx, "f_locals", None)
    return f_locals if isinstance(f_locals, dict) else None


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once per process, for eager callers on GPU.

    Eager flex on GPU would materialize the full ``S x S`` score matrix; compiling it (as
    attention-gym and PyTorch's docs do) gives the fused kernel. ``dynamic=False`` keeps one
    specialization per shape, so callers with many shapes should compile their whole model.
    """
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_in_trace(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: Any,
    scale: float | None,
    kernel_options: Any = None,
) -> torch.Tensor:
    """``flex_attention(q, k, v, block_mask=..., scale=...)`` for a caller that AOTAutograd or
    make_fx traces outside Dynamo (the rewritten graph inside inductor's ``compile_fx``).

    Why: called there, ``flex_attention`` takes its eager path, which runs the flex
    higher-order op through a ``torch.compile`` of its own: a Dynamo compile nested in the one
    in flight. Up to torch 2.12 the compile-event logger clears its whole event stack when any
    Dynamo compile ends, so after the inner one every later event of the outer compile logs
    ``ChromiumEventLogger: Start event not in stack, ignoring`` (dozens per optimized model on
    the H200, torch 2.11). Under Dynamo, ``flex_attention`` calls the op directly, with the
    tensors ``mask_mod`` reads lifted into ``mask_mod_other_buffers``; this does the same for
    our masks (:func:`~vmoba_compile.masks.make_mask_mod` keeps its tables beside the
    ``mask_mod``), with ``flex_attention``'s defaults (identity ``score_mod``, the kernel
    options completed as ``flex_attention`` does; GQA needs nothing: the op reads the head
    counts from the shapes). Any other mask goes through ``flex_attention``.
    """
    import math

    from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_hop
    from torch.nn.attention.flex_attention import (
        _apply_kernel_options,
        _identity,
        flex_attention,
    )

    lifted = getattr(block_mask.mask_mod, "vmoba_buffers", None)
    if lifted is None:
        kw = dict(block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return flex_attention(q, k, v, **kw, kernel_options=kernel_options)
    mask_mod, buffers = lifted
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    options: Any = _apply_kernel_options(q, k, v, False, kernel_options)
    parts = (*block_mask.as_tuple()[:-1], mask_mod)
    out = flex_attention_hop(q, k, v, _identity, parts, scale, options, (), tuple(buffers))
    return out[0]


@functools.cache
def flex_attention_targets() -> frozenset[Any]:
    """What a FlexAttention call is in the graph Dynamo hands a backend: the flex higher-order
    op (``torch.ops.higher_order.flex_attention``, as torch 2.13 records a model's
    ``flex_attention(q, k, v, ...)``), or the Python function where Dynamo kept it as called."""
    from torch.nn.attention.flex_attention import flex_attention

    found: set[Any] = {flex_attention}
    hop = getattr(torch.ops.higher_order, "flex_attention", None)
    if hop is not None:
        found.add(hop)
    return frozenset(found)


@functools.cache
def mha_targets() -> frozenset[Any]:
    """What an ``nn.MultiheadAttention`` call is in Dynamo's graph: one
    ``F.multi_head_attention_forward`` node (torch 2.13, training or not), or the fused native
    op of its inference fast path (``torch._native_multi_head_attention`` / its aten op)."""
    import torch.nn.functional as F

    found: set[Any] = {F.multi_head_attention_forward}
    native = getattr(torch, "_native_multi_head_attention", None)
    if native is not None:
        found.add(native)
    packet = getattr(torch.ops.aten, "_native_multi_head_attention", None)
    if packet is not None:
        found.update({packet, packet.default})
    return frozenset(found)


def autograd_inside_op():
    """A context in which a custom op's kernel can record autograd again.

    torch.library runs an op's kernel below the Autograd dispatch keys (they are in the
    thread's excluded set), so ``torch.enable_grad()`` alone gives outputs without ``grad_fn``.
    The FlashAttention-4 op's backward differentiates a recomputed forward inside its kernel:
    this keeps only the CUDA autocast key excluded for that block.
    """
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA)
    return torch._C._ForceDispatchKeyGuard(include, exclude)
