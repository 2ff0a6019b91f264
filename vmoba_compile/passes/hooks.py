"""The pass's two hooks for code that places and decides attention calls on its behalf.

The pass hands each SDPA call to ``CallContext.parallel.rewrite_call`` when a parallel setup is
set (:mod:`vmoba_compile.parallel`: diffusers' Ulysses context parallelism, FSDP2). That code
places the call by the block that is running (:func:`place_in_block`) and decides it on the
tensors as attention sees them after its exchange (:func:`decide_call`), with its own refusals
between the pass's rule and the kernel choice. Both give the same answers as the pass's own path
(:func:`~vmoba_compile.passes.rewrite.rewrite_graph`): the same eligibility rule, kernel choice,
report line and replacement op.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx

from ..kernels import KernelChoice, kernel_text
from .report import AttentionCall, Skip
from .rewrite import (
    _PATH_ITEM,
    BoundVMoBA,
    CallContext,
    _Rewrite,
    _rewrite_reason,
    _shape_text,
    _source_name,
    access,
    decide,
    decide_kernel,
)

__all__ = ["CallDecision", "call_shape", "decide_call", "place_in_block"]


def call_shape(q: Any, k: Any) -> str:
    """The report's shape text of a call: ``"[B, H, S, D] kv S_kv"`` (``"?"`` without tensors)."""
    return _shape_text(q, k)


@dataclasses.dataclass(frozen=True)
class CallDecision:
    """A call the pass rewrites: its layer and kernel (what :func:`decide_call` returns).

    Attributes:
        layer_index: the VMoBA layer of the call.
        partition: the layer's partition (``"1d"``, ``"2d"``, ``"3d"``).
        kernel: the kernel decided for it (None: every chunk is kept, the op runs dense SDPA).
    """

    rewrite: _Rewrite
    config: Any
    kernel: KernelChoice | None

    @property
    def layer_index(self) -> int:
        return self.rewrite.layer_index

    @property
    def partition(self) -> str:
        return str(self.config.partition_for(self.rewrite.layer_index).value)

    def report(self, module: str, shape: str, note: str = "") -> AttentionCall:
        """The report's line of the call; ``note`` follows the layout in the reason (e.g. the
        heads per rank after an exchange)."""
        name, why = kernel_text(self.kernel)
        reason = f"{_rewrite_reason(self.rewrite, self.config)}{note}; kernel {name}: {why}"
        return AttentionCall(module, shape, True, reason, self.layer_index, self.partition, name)

    def target(self, scale: float | None) -> Callable[..., Any]:
        """The op that replaces the call: ``target(query, key, value, attn_mask)``."""
        return BoundVMoBA(self.rewrite, self.config, scale, self.kernel)


def decide_call(
    values: dict[str, Any],
    module: str,
    ctx: CallContext,
    next_layer: Callable[[], int],
    *,
    kernel_values: dict[str, Any] | None = None,
    seq_len: int | None = None,
    refuse: Callable[[], Skip | None] | None = None,
) -> CallDecision | Skip:
    """The pass's decision on one SDPA call: the rewrite, or why it stays dense.

    Args:
        values: the bound SDPA arguments (``query``, ``key``, ``value``, ``attn_mask``, ...) as
            the attention sees them (example tensors; meta tensors do).
        module: the model path of the call's module.
        ctx: the call context.
        next_layer: the next layer index, for calls of modules the numbering does not know.
        kernel_values: the tensors on the device and in the dtype they run, where ``values``
            are not (default: ``values``).
        seq_len: the tokens the attention sees, where they differ from ``kernel_values``'.
        refuse: asked after the pass's rule accepts the call and before the kernel is chosen:
            a :class:`Skip` keeps the call dense for the caller's own reason.

    Returns:
        A :class:`CallDecision`, or the :class:`Skip` of the first rule that refused it.
    """
    choice = decide(values, module, ctx, next_layer)
    if isinstance(choice, Skip):
        return choice
    refused = refuse() if refuse is not None else None
    if refused is not None:
        return refused
    kernel = decide_kernel(kernel_values or values, choice, ctx.config, seq_len=seq_len)
    if isinstance(kernel, Skip):  # kernel='flash' and FA4 cannot run this call
        return kernel
    return CallDecision(choice, ctx.config, kernel)


def place_in_block(
    node: fx.Node,
    gm: fx.GraphModule,
    example_inputs: Any,
    param_names: Mapping[int, str],
    known: Iterable[str],
    block: torch.nn.Module | None = None,
    path: str = "",
) -> str:
    """The model path of ``node``'s innermost module, placed through the running block.

    Each module of the call's ``nn_module_stack`` is found, innermost last, by identity in
    ``block`` (the block being called, at model path ``path``; Dynamo's ``L['self']``) where
    given, else by a parameter under it (a graph input that ``param_names`` names). The first
    from the inside that is in ``known`` wins, else the innermost found, else ``"?"``.

    Args:
        node: the attention call.
        gm: Dynamo's graph module.
        example_inputs: the graph's inputs as the backend got them.
        param_names: ``id(parameter or buffer) -> model path`` (the running block's live ones).
        known: the video self-attention modules (``CallContext.layer_of``).
        block: the running block, or None to place by parameters only.
        path: the block's model path.
    """
    known = set(known)
    stack = node.meta.get("nn_module_stack") or {}
    sources = [v[0] for v in stack.values() if isinstance(v, tuple) and isinstance(v[0], str)]
    params = _param_sources(gm, example_inputs, param_names)
    found = "?"
    for src in sources:
        where = _resolved_path(src, block, path) if block is not None else None
        if where is None:
            where = _module_path(src, params)
        if where is not None:
            found = where
            if where in known:
                return where
    return found


def _param_sources(
    gm: fx.GraphModule, example_inputs: Any, names: Mapping[int, str]
) -> list[tuple[str, str]]:
    """``(Dynamo source, model path)`` of every graph input that ``names`` names."""
    out = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, example in zip(placeholders, example_inputs, strict=False):
        full = names.get(id(example))
        src = _source_name(node)
        if full is not None and src is not None:
            out.append((src, full))
    return out


# One access of a source chain: ``.name``, ``['key']`` / ``["key"]``, ``[0]``.
_SELF = re.compile(r"L\[(['\"])self\1\]")
_ACCESS = re.compile(r"\.([A-Za-z_]\w*)|\[(['\"])([^'\"\\]*)\2\]|\[(-?\d+)\]")


def _frame_object(source: str, frame_self: Any) -> Any | None:
    """The object Dynamo's source name ``source`` reaches from ``L['self']`` (``frame_self``),
    walked access by access (attributes, string keys, int indices), or None when the name is
    not such a chain from ``L['self']`` or an access fails.

    Dynamo writes a source as a Python expression over the frame's locals (its guards evaluate
    them): a chain of accesses, or, where an access is not one (``getattr(...)``,
    ``___odict_getitem(...)``, slices), a call. Walking the chain gives what evaluating it
    with no builtins and only ``L['self']`` bound gives (calls fail there too).
    """
    m = _SELF.match(source)
    if m is None:
        return None
    obj, pos = frame_self, m.end()
    while pos < len(source):
        step = _ACCESS.match(source, pos)
        if step is None:
            return None
        attr, _, key, index = step.groups()
        try:
            obj = access(obj, attr, key, index)
        except Exception:  # an access that fails (another frame's locals): no object
            return None
        pos = step.end()
    return obj


def _resolved_path(source: str, block: torch.nn.Module, path: str) -> str | None:
    """The model path of the module Dynamo names ``source`` in a frame of the block call
    (``L['self']`` is the running block), found by identity: Dynamo may name a module through
    any alias, e.g. diffusers' hook closure (``L['self'].forward.func.__closure__[0].
    cell_contents.forward.__self__.attn1``)."""
    obj = _frame_object(source, block)
    if not isinstance(obj, torch.nn.Module):
        return None
    for name, m in block.named_modules(prefix=path, remove_duplicate=False):
        if m is obj:
            return str(name)
    return None


def _dotted(source: str) -> str:
    """A Dynamo source as a dotted chain: ``L['self']._modules['attn1']`` and
    ``L['self'].attn1`` both become ``L.self.attn1``."""
    return _PATH_ITEM.sub(lambda m: "." + m.group(1), source)


def _module_path(module_source: str, params: list[tuple[str, str]]) -> str | None:
    """The model path of the module Dynamo names ``module_source``, from a parameter under it:
    ``<module_source>._modules['to_q']._parameters['weight']`` that is the running block's
    ``blocks.0.attn1.to_q.weight`` places the module at ``blocks.0.attn1``."""
    mod = _dotted(module_source) + "."
    for src, full in params:
        dotted = _dotted(src)
        if not dotted.startswith(mod):
            continue
        rest = dotted[len(mod) :]
        if rest and full.endswith("." + rest):
            return full[: -len(rest) - 1]
    return None
