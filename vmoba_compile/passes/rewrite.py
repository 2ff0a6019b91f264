"""The FX rewrite: find the SDPA calls in Dynamo's graph and rewrite video self-attention to VMoBA.

How one compile goes (the backend, :class:`~vmoba_compile.passes.backend.VMoBABackend`):

1. Dynamo traces the model and hands the backend an FX graph; the optimized model's wrapper has
   set the call context (:class:`CallContext`: the video grid of this forward call, the layer
   numbering of the model's self-attention modules, the layers kept dense).
2. :func:`rewrite_graph` walks the graph and every nested graph and finds each
   ``scaled_dot_product_attention`` call (``torch._C._nn`` builtin or ``aten`` op), its arguments
   bound by name. Attention ops it does not rewrite (FlexAttention, ``nn.MultiheadAttention``)
   are listed dense with their reason (:func:`other_attention_call`), so the report misses none.
3. Each call gets a decision (:func:`decide`): video self-attention whose length matches the
   layout is rewritten; anything else is left dense with its
   :class:`~vmoba_compile.passes.report.SkipReason` and message.
4. A rewritten call becomes :func:`vmoba_sdpa` with its layer index, layout and partition fixed.
5. The graph goes to inductor's ``compile_fx`` with this compile's options, which traces
   :func:`vmoba_sdpa` into selection ops and a FlexAttention template, fused into Triton kernels.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import _compat
from ..attention import kernel_for, plan_for, text_key_mask_from_padding, vmoba_attention
from ..config import VMoBAConfig
from ..kernels import KernelChoice, kernel_text
from ..layout import TextPosition, VideoLayout
from ..numbering import LayerNumbering
from .report import AttentionCall, Skip, SkipReason

__all__ = [
    "CallContext",
    "bind_sdpa",
    "decide",
    "other_attention_call",
    "rewrite_graph",
    "vmoba_sdpa",
]

SDPA_TARGETS = frozenset(
    {
        F.scaled_dot_product_attention,
        torch._C._nn.scaled_dot_product_attention,
        torch.ops.aten.scaled_dot_product_attention,
        torch.ops.aten.scaled_dot_product_attention.default,
    }
)


def _sdpa_signature(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):  # pragma: no cover - signature only
    raise NotImplementedError


_SDPA_SIGNATURE = inspect.signature(_sdpa_signature)


@dataclasses.dataclass
class CallContext:
    """What the backend needs to know about the forward call being compiled.

    Attributes:
        config: the VMoBA configuration.
        family: the adapter's family, or None with an explicit layout.
        layer_of: module path -> VMoBA layer index (model order); a
            :class:`~vmoba_compile.numbering.LayerNumbering` learns from the graphs' calls.
        grid: the adapter's video grid of this call (None with an explicit layout or when the
            adapter could not tell, see ``grid_error``).
        layout: the explicit layout (``optimize(layout=...)``), or None.
        grid_error: why the grid is unknown for this call (every call then stays dense).
        dense_layers: layer indices kept dense by the runtime controls.
        data_dependent_text: the adapter's flag (text count known at run time only).
        param_names: ``id(parameter or buffer) -> name`` in the model (see :class:`Placement`).
        module_names: ``id(module) -> path`` in the model (see :class:`Placement`).
        regional: the optimized model's :class:`~vmoba_compile.regional.RegionalBlocks` when
            its blocks are compiled one variant at a time (a block's frame is then expected).
        calls: decisions of the graphs compiled during this forward call.
        parallel: the :class:`~vmoba_compile.parallel.ParallelPlan` under context parallelism
            or FSDP2 (None in one process): it places and decides the calls.
        ran: module paths whose calls a compiled VMoBA graph ran in this forward call (the
            account, :mod:`vmoba_compile.accounting`).
    """

    config: VMoBAConfig
    family: str | None
    layer_of: Mapping[str, int]
    grid: Any = None
    layout: VideoLayout | None = None
    grid_error: str | None = None
    dense_layers: frozenset[int] = frozenset()
    data_dependent_text: bool = False
    param_names: dict[int, str] = dataclasses.field(default_factory=dict)
    module_names: dict[int, str] = dataclasses.field(default_factory=dict)
    regional: Any = None
    calls: list[AttentionCall] = dataclasses.field(default_factory=list)
    parallel: Any = None
    ran: set[str] = dataclasses.field(default_factory=set)

    def describe(self) -> str:
        if self.layout is not None:
            return f"layout {self.layout}"
        if self.grid is not None:
            return f"grid {self.grid.frames}x{self.grid.height}x{self.grid.width}"
        return f"grid unknown: {self.grid_error}"


CURRENT_CONTEXT: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "vmoba_compile_call_context", default=None
)


# ---------------------------------------------------------------------------------------------
# the replacement op


def vmoba_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    *,
    layout: VideoLayout,
    config: VMoBAConfig,
    layer_index: int,
    scale: float | None,
    key_padding: bool,
    dynamic_text: bool = False,
    kernel: KernelChoice | None = None,
) -> torch.Tensor:
    """What a rewritten SDPA call runs: ``vmoba_attention`` with the call's fixed layout.

    ``key_padding``: ``attn_mask`` is a ``[B or 1, 1, 1, S]`` bool key-padding mask whose video
    part is all True (HunyuanVideo); its text part becomes ``text_key_mask``.
    ``dynamic_text``: the call holds ``S - N <= layout.text_tokens`` suffix text tokens, a number
    known only at run time (Mochi); ``layout`` has the upper bound.
    ``kernel``: the kernel the rewrite decided (and its report names).
    """
    if dynamic_text:
        return _vmoba_sdpa_dynamic_text(
            query, key, value, layout, config, layer_index, scale, kernel
        )
    text_key_mask = None
    if key_padding and attn_mask is not None:
        text_key_mask = text_key_mask_from_padding(attn_mask, layout, query.shape[0])
    return vmoba_attention(
        query,
        key,
        value,
        layout=layout,
        config=config,
        layer_index=layer_index,
        scale=scale,
        text_key_mask=text_key_mask,
        kernel=kernel,
    )


def _vmoba_sdpa_dynamic_text(q, k, v, layout, config, layer_index, scale, kernel):
    """Pad the suffix text to its upper bound, mask the padded keys, drop the padded rows."""
    s, n, most = q.shape[2], layout.video_tokens, layout.text_tokens
    pad = layout.seq_len - s
    qp, kp, vp = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    real_text = torch.arange(most, device=q.device) < (s - n)
    text_key_mask = real_text.expand(q.shape[0], most)
    out = vmoba_attention(
        qp,
        kp,
        vp,
        layout=layout,
        config=config,
        layer_index=layer_index,
        scale=scale,
        text_key_mask=text_key_mask,
        kernel=kernel,
    )
    return out[:, :, :s]


# ---------------------------------------------------------------------------------------------
# finding calls


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def other_attention_call(
    node: fx.Node, ctx: CallContext, placement: Placement
) -> AttentionCall | None:
    """The report line of an attention op the pass does not rewrite, or None for any other node.

    A FlexAttention call (the flex higher-order op; diffusers' 'flex' backend makes one per
    attention) and an ``nn.MultiheadAttention`` call (one ``F.multi_head_attention_forward``
    node) stay dense with their :class:`SkipReason`. The call is ``planned`` when it would be a
    rewritten SDPA call's module and length (video self-attention of the layout), so the
    account counts it as planned VMoBA run dense and ``strict=True`` raises; otherwise the
    message adds why it would stay dense as SDPA too. FlexAttention calls made by this
    package's own op (a model calling :func:`~vmoba_compile.vmoba_attention`) are VMoBA
    already and get no line.
    """
    if node.op != "call_function":
        return None
    details: dict[str, Any] = {}
    if node.target in _compat.flex_attention_targets():
        if _called_from_package(node):
            return None
        reason, dims = SkipReason.FLEX_ATTENTION, _flex_dims(node)
    elif node.target in _compat.mha_targets():
        reason, dims = SkipReason.MULTIHEAD_ATTENTION, _mha_dims(node)
        details["op"] = getattr(node.target, "__name__", None) or str(node.target)
    else:
        return None
    module = placement.place(node, ctx.layer_of)
    why: Skip | None
    if dims is None:
        shape, why = "?", SkipReason.NO_SHAPES.skip()
    else:
        b, h, sq, d, sk = dims
        reached = placement.reached(node) if module == UNPROVEN_MODULE else ""
        shape, why = f"[{b}, {h}, {sq}, {d}] kv {sk}", _not_planned(sq, sk, module, ctx, reached)
    also = "" if why is None else f"; as scaled_dot_product_attention it would be dense too: {why}"
    return AttentionCall.dense(module, shape, reason.skip(also=also, **details), why is None)


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _called_from_package(node: fx.Node) -> bool:
    """The innermost frame outside torch in the node's recorded stack (Dynamo's
    ``stack_trace``: who called ``flex_attention``) is in this package (its own op)."""
    trace = node.meta.get("stack_trace") or ""
    files = [f for f in re.findall(r'File "([^"]+)"', trace) if not f.startswith(_TORCH_DIR)]
    return bool(files) and files[-1].startswith(_PACKAGE_DIR)


def _flex_dims(node: fx.Node) -> tuple[Any, Any, Any, Any, Any] | None:
    """``(B, H, S_q, D, S_kv)`` of a FlexAttention call (``q [B, H, S_q, D]``, ``k [B, Hkv,
    S_kv, D]``, the op's first arguments)."""
    q, k = (_value(a) for a in (*node.args, None, None)[:2])
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)):
        return None
    if q.dim() != 4 or k.dim() != 4:
        return None
    return q.shape[0], q.shape[1], q.shape[2], q.shape[3], k.shape[2]


def _mha_dims(node: fx.Node) -> tuple[Any, Any, Any, Any, Any] | None:
    """``(B, H, S_q, D, S_kv)`` of an ``nn.MultiheadAttention`` call: query and key ``[S, B, E]``
    (or unbatched ``[S, E]``) in ``F.multi_head_attention_forward``, ``[B, S, E]`` in the native
    fused op; the head count is the call's fifth argument (``num_heads``)."""
    args = list(node.args)
    if len(args) < 5:
        return None
    q, k, heads = _value(args[0]), _value(args[1]), _value(args[4])
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)) or not isinstance(
        heads, int
    ):
        return None
    if q.dim() != k.dim() or q.dim() not in (2, 3):
        return None
    if q.dim() == 2:  # unbatched
        b, sq, sk = 1, q.shape[0], k.shape[0]
    elif node.target is F.multi_head_attention_forward:  # sequence first
        b, sq, sk = q.shape[1], q.shape[0], k.shape[0]
    else:  # the native op: batch first
        b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    return b, heads, sq, q.shape[-1] // heads, sk


def _not_planned(sq: Any, sk: Any, module: str, ctx: CallContext, reached: str = "") -> Skip | None:
    """None when a call of this module and these lengths is video self-attention the pass
    would rewrite were it SDPA (the module and layout rules of :func:`decide`), else the rule
    it breaks."""
    if not _same(sq, sk):
        return SkipReason.CROSS_ATTENTION.skip(queries=sq, keys=sk)
    skip = _check_module(module, ctx, reached)
    if skip is not None:
        return skip
    layout = _static_layout(sq, ctx) if isinstance(sq, int) else _dynamic_layout(sq, ctx)
    if isinstance(layout, Skip):
        return layout
    layer = ctx.layer_of.get(module)
    if layer is not None and layer in ctx.dense_layers:
        return SkipReason.DENSE_LAYER.skip(layer=layer)
    return None


def bind_sdpa(args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """An SDPA call's arguments by name, defaults filled in: the one binder of the package
    (graph nodes here, eager calls in :mod:`vmoba_compile.diagnostics`)."""
    bound = _SDPA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _bind(node: fx.Node) -> dict[str, Any]:
    return bind_sdpa(node.args, dict(node.kwargs))


def _value(arg: Any) -> Any:
    """The example value of a graph argument (a fake tensor), or the argument itself."""
    if isinstance(arg, fx.Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg


_PATH_ITEM = re.compile(
    r"(?:\.__dict__\[['\"]_modules['\"]\]|\._modules|\._parameters|\._buffers)?"
    r"\[['\"]?([^'\"\]]+)['\"]?\]"
)


def normalize_module_path(source: str) -> str:
    """Dynamo's module source (``L['self'].__dict__['_modules']['blocks'].0.attn1``) as a
    ``named_modules()`` path (``blocks.0.attn1``)."""
    s = source
    for prefix in ("L['self']", 'L["self"]', "self"):
        if s.startswith(prefix):
            s = s[len(prefix) :]
            break
    s = _PATH_ITEM.sub(lambda m: "." + m.group(1), s)
    return s.lstrip(".")


def owner_path(node: fx.Node, known: Iterable[str], prefix: str = "") -> str:
    """The module path of the innermost module around ``node`` that is in ``known`` (else the
    innermost module's path, else ``"?"``), read from Dynamo's source names. ``prefix``: see
    :attr:`Placement.frame_prefix`. :class:`Placement` places by identity first; this is its
    fallback."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [normalize_module_path(v[0]) for v in stack.values() if isinstance(v, tuple)]
    paths = [(prefix + p).rstrip(".") for p in ([""] if prefix else []) + paths]
    known = set(known)
    for p in reversed(paths):
        if p in known:
            return p
    return paths[-1] if paths else "?"


#: The module of a call that no parameter input of its graph proves (see :class:`Placement`).
UNPROVEN_MODULE = "<unproven>"

_SOURCE_BASE = re.compile(r"^(?:[LG]\[['\"]([^'\"\]]+)['\"]\]|([A-Za-z_]\w*))")
_SOURCE_ITEM = re.compile(r"\.([A-Za-z_]\w*|\d+)|\[['\"]([^'\"\]]+)['\"]\]|\[(\d+)\]")
_CONTAINERS = frozenset({"__dict__", "_modules", "_parameters", "_buffers"})


def source_chain(source: str) -> tuple[str, ...] | None:
    """Dynamo's source name as a chain of names: ``L['self'].fn_ref.__self__._modules['attn1']``
    -> ``("self", "fn_ref", "__self__", "attn1")`` (module containers dropped), or None when
    it is not a plain chain of attribute and item accesses."""
    m = _SOURCE_BASE.match(source)
    if m is None:
        return None
    chain = [m.group(1) or m.group(2)]
    rest = source[m.end() :]
    pos = 0
    for item in _SOURCE_ITEM.finditer(rest):
        if item.start() != pos:
            return None
        pos = item.end()
        name = next(g for g in item.groups() if g is not None)
        if name not in _CONTAINERS:
            chain.append(name)
    return tuple(chain) if pos == len(rest) else None


def access(obj: Any, attr: str | None, key: str | None, index: str | None) -> Any:
    """One access of a Dynamo source name: ``obj.attr``, ``obj[key]`` or ``obj[int(index)]``,
    whichever is given; raises what the access raises."""
    if attr is not None:
        return getattr(obj, attr)
    if key is not None:
        return obj[key]
    if index is None:
        raise ValueError("a source access names no attribute, key or index")
    return obj[int(index)]


def walk_source(
    source: str, f_locals: Mapping[str, Any]
) -> list[tuple[tuple[str, ...], Any]] | None:
    """The objects Dynamo's source name ``source`` reaches in a frame whose locals are
    ``f_locals``, walked access by access (attributes, string keys, int indices): for each
    prefix of its :func:`source_chain` (module containers dropped), that prefix and the object
    it reaches; the last is what the whole name reaches. None when the name is not a chain of
    accesses from a local (``L['self']``), or an access fails (the name is another frame's).

    Dynamo writes a source as a Python expression over the frame's locals (its guards evaluate
    it); walking the chain gives what evaluating it gives, without evaluating any code.
    """
    m = _SOURCE_BASE.match(source)
    if m is None or m.group(1) is None or not source.startswith("L["):
        return None
    name = m.group(1)
    if name not in f_locals:
        return None
    obj = f_locals[name]
    chain: tuple[str, ...] = (name,)
    out: list[tuple[tuple[str, ...], Any]] = [(chain, obj)]
    rest, pos = source[m.end() :], 0
    for item in _SOURCE_ITEM.finditer(rest):
        if item.start() != pos:
            return None
        pos = item.end()
        attr, key, index = item.groups()
        try:
            obj = access(obj, attr, key, index)
        except Exception:  # an access that fails here: not this frame's name
            return None
        step: str = attr if attr is not None else key if key is not None else index
        if step not in _CONTAINERS:
            chain = (*chain, step)
            out.append((chain, obj))
    if pos != len(rest) or out[-1][1] is not obj:  # not a chain, or it ends in a container
        return None
    return out


def _source_name(node: fx.Node) -> str | None:
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    return name if isinstance(name, str) else None


class Placement:
    """Which module of the model an attention call belongs to, by identity.

    Dynamo names a module by how the traced frame reached it (``L['self'].blocks[0].attn1``, or
    through a hook's wrapper ``L['self'].fn_ref.original_forward.__self__.attn1``, or a local of
    an attention processor ``L['attn']``): names, not modules. The graph's parameter inputs tie
    those names to objects: a parameter reached as ``<chain>.to_q.weight`` that is the model's
    ``blocks.0.attn1.to_q.weight`` (the same tensor, by ``id``) proves that ``<chain>`` is the
    module ``blocks.0.attn1``. Dynamo gives a tensor one name, the first it reached it by, so
    a module reached again by another name (diffusers' ``HookRegistry`` wraps a block's
    ``forward`` in ``functools.partial(rewritten_forward, block)``, a closure over the hook's
    ``fn_ref``: first-block cache's later blocks call ``L['self'].forward.func.__closure__[0].
    cell_contents.original_forward.__self__.attn1`` while their parameters come in as
    ``L['self']._modules['attn1']...``) is tied by identity: both names are walked in the
    traced frame's locals (:func:`walk_source`, no code evaluated; each parameter input's name
    must reach that very tensor), and a name reaching the same module object as a proven name
    is that module. A call is placed in the innermost module of its
    ``nn_module_stack`` so proven; with no stack (the frame is an attention processor's or a
    hook's function), in the one video self-attention module among the frame's own locals (or
    its one module); a call in the model's own forward keeps the name ``"?"`` (no module), and a
    frame that ties no local to a module, or several, proves nothing. A call whose module the
    graph's parameters do not prove is placed by its name (:func:`owner_path`) only where that
    name is a known module or the graph proves no name at all (it holds no parameters); else it
    is :data:`UNPROVEN_MODULE` and stays dense (``MODULE_UNPROVEN``).
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        param_names: dict[int, str],
        frame: Mapping[str, Any] | None = None,
        module_names: Mapping[int, str] | None = None,
    ) -> None:
        self.paths: dict[tuple[str, ...], str | None] = {}  # chain -> path (None: ambiguous)
        self.module_names = module_names or {}
        self.by_local: set[str] = set()  # nodes placed by a module among the frame's locals
        # id(module object) -> path (None: ambiguous), the objects the proven names reach in
        # the traced frame (``frame``: its locals); the objects are kept alive with the ids.
        self.objects: dict[int, tuple[Any, str | None]] = {}
        self.frame = frame
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        walks: list[tuple[str, Any, int, list[str]]] = []
        for node, example in zip(placeholders, example_inputs, strict=False):
            full = param_names.get(id(example))
            name = _source_name(node)
            chain = source_chain(name) if full is not None and name is not None else None
            if chain is None or full is None or name is None:
                continue
            parts = full.split(".")
            common = 0
            while (
                common < min(len(chain) - 1, len(parts))
                and chain[-1 - common] == parts[-1 - common]
            ):
                common += 1
            for j in range(1, common + 1):  # every module on the shared tail, and its head
                self._prove(chain[:-j], ".".join(parts[:-j]))
            walks.append((name, example, common, parts))
        if frame is not None:
            self._tie_objects(walks, frame)

    def _tie_objects(self, walks: list[tuple[str, Any, int, list[str]]], frame: Any) -> None:
        """The module objects the proven names reach in the frame, by identity: a parameter
        input's name walked in the frame's locals must reach that very tensor (one that
        reaches another object means the locals are not this graph's frame: no object is
        tied); the modules on its shared tail are then the model's modules of those paths."""
        tied: list[tuple[Any, str]] = []
        for name, example, common, parts in walks:
            steps = walk_source(name, frame)
            if steps is None:
                continue  # not a chain of accesses (or not from a local here): ties nothing
            if steps[-1][1] is not example:
                self.frame = None  # not this graph's frame: prove nothing by it
                return
            for j in range(1, common + 1):
                tied.append((steps[-1 - j][1], ".".join(parts[:-j])))
        for obj, path in tied:
            if isinstance(obj, torch.nn.Module):
                seen = self.objects.get(id(obj), (obj, path))[1]
                self.objects[id(obj)] = (obj, path if seen == path else None)

    @property
    def frame_prefix(self) -> str:
        """Path (with a trailing dot) of the module whose ``forward`` Dynamo traced, relative to
        the optimized model: ``""`` for the model itself, ``"blocks.3."`` when a graph break in
        the parent made Dynamo compile a block's frame on its own (``L['self']`` proven by the
        parameters it holds)."""
        path = self.paths.get(("self",))
        return path + "." if path else ""

    def _prove(self, chain: tuple[str, ...], path: str) -> None:
        if self.paths.get(chain, path) != path:
            self.paths[chain] = None  # two objects under one name: prove nothing
        else:
            self.paths[chain] = path

    def module_of(self, source: str) -> str | None:
        """The model path of the module Dynamo names ``source``: proven by the parameter
        inputs under that name, else by identity, the object the name reaches in the traced
        frame being one the proven names reach (diffusers' hook closure
        ``L['self'].forward.func.__closure__[0].cell_contents.original_forward.__self__.attn1``
        is the ``L['self']._modules['attn1']`` the parameters come in by)."""
        chain = source_chain(source)
        path = self.paths.get(chain) if chain is not None else None
        if path is not None or self.frame is None or not self.objects:
            return path
        steps = walk_source(source, self.frame)
        if steps is None:
            return None
        return self.objects.get(id(steps[-1][1]), (None, None))[1]

    def _place_without_stack(self, node: fx.Node, known: set[str], prefix: str) -> str:
        """A call with no module around it: in the model's own forward (``"?"``), the frame's
        one proven head module, else the frame's local module (recorded in ``by_local``)."""
        heads = {p for c, p in self.paths.items() if len(c) == 1 and p is not None}
        if heads == {""}:  # the model's own forward: no module around the call
            return owner_path(node, known, prefix)
        mine = heads & known
        if len(mine) == 1 or len(heads) == 1:
            return (mine or heads).pop()
        local = self._local_module(known) if not heads else None
        if local is not None:
            self.by_local.add(node.name)
            return local
        return UNPROVEN_MODULE  # a frame of its own (hooks between leaves): whose, unknown

    def _local_module(self, known: set[str]) -> str | None:
        """The module of the model among the traced frame's locals, by identity (an attention
        processor's ``attn``): the one of ``known`` (the video self-attention modules), else
        the only one; or None."""
        if self.frame is None:
            return None
        found = {self.module_names.get(id(v)) for v in self.frame.values()} - {None}
        mine = found & known
        if len(mine) == 1 or len(found) == 1:
            return (mine or found).pop()
        return None

    def reached(self, node: fx.Node) -> str:
        """The names Dynamo reached ``node``'s modules by (innermost last), for the message of
        a call left unproven: ``"; Dynamo reached it as L['self'] > L['self'].fn.__self__.attn1"``,
        or, with no module around the call, that it ran in a frame of its own."""
        stack = node.meta.get("nn_module_stack") or {}
        names = [v[0] for v in stack.values() if isinstance(v, tuple) and isinstance(v[0], str)]
        if not names:
            return "; no module around it in its frame (a frame of its own, as a hook's)"
        why = "" if self.frame is not None else " (the traced frame's objects could not be checked)"
        return f"; Dynamo reached it as {' > '.join(names)}{why}"

    def place(self, node: fx.Node, known: Iterable[str]) -> str:
        """The module path of ``node``'s call (see the class)."""
        known, prefix = set(known), self.frame_prefix
        stack = node.meta.get("nn_module_stack") or {}
        found = [self.module_of(v[0]) for v in stack.values() if isinstance(v, tuple)]
        proven = [p for p in found if p is not None]
        for p in reversed(proven):
            if p in known:
                return p
        if not stack:
            return self._place_without_stack(node, known, prefix)
        if proven:
            return proven[-1]
        named = owner_path(node, known, prefix)
        # The graph ties names to modules, but not this call's: its name is not evidence.
        return named if named in known or not self.paths else UNPROVEN_MODULE


# ---------------------------------------------------------------------------------------------
# deciding


@dataclasses.dataclass(frozen=True)
class _Rewrite:
    layout: VideoLayout
    layer_index: int
    key_padding: bool
    dynamic_text: bool = False


def _shape_text(q: Any, k: Any) -> str:
    if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor):
        return f"{list(q.shape)} kv {k.shape[-2]}"
    return "?"


def decide(
    args: dict[str, Any],
    module: str,
    ctx: CallContext,
    next_layer: Callable[[], int],
    reached: str = "",
) -> _Rewrite | Skip:
    """Rewrite this SDPA call (and how), or why it stays dense.

    The steps run in this order, each returning the :class:`Skip` of the first rule the call
    breaks: the shapes, the call's semantics, the module, the layout of its length, the mask,
    the layer.

    Args:
        args: the call's bound arguments, tensors as example (fake) values.
        module: the calling module's path.
        ctx: the call context.
        next_layer: numbers a call whose module has no layer index (explicit layouts on models
            without an adapter), in graph order.
        reached: for a call of :data:`UNPROVEN_MODULE`, how Dynamo reached it
            (:meth:`Placement.reached`), for its message.
    """
    q, k, v = args["query"], args["key"], args["value"]
    skip = _check_shapes(q, k, v) or _check_semantics(args) or _check_module(module, ctx, reached)
    if skip is not None:
        return skip
    sq = q.shape[2]
    dynamic = not isinstance(sq, int)
    layout = _dynamic_layout(sq, ctx) if dynamic else _static_layout(sq, ctx)
    if isinstance(layout, Skip):
        return layout
    skip = _check_mask(args["attn_mask"], q.shape[0], sq, layout, dynamic, ctx)
    if skip is not None:
        return skip
    layer = _resolve_layer(module, ctx, next_layer)
    if isinstance(layer, Skip):
        return layer
    key_padding = args["attn_mask"] is not None  # a mask that passed the checks pads the keys
    return _Rewrite(layout, layer, key_padding, dynamic_text=dynamic)


def _check_shapes(q: Any, k: Any, v: Any) -> Skip | None:
    """q/k/v are ``[B, H, S, D]`` tensors of one length (self-attention)."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return SkipReason.NO_SHAPES.skip()
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return SkipReason.NOT_4D.skip(dims=q.dim())
    sq, sk = q.shape[2], k.shape[2]
    if not _same(sq, sk):
        return SkipReason.CROSS_ATTENTION.skip(queries=sq, keys=sk)
    return None


def _check_semantics(args: dict[str, Any]) -> Skip | None:
    """What VMoBA does not compute: causal attention, dropout, heads that do not pair up, and
    arguments known only at run time."""
    causal = args["is_causal"]
    if causal is not False:
        return (SkipReason.CAUSAL if causal is True else SkipReason.CAUSAL_AT_RUN_TIME).skip()
    p = args["dropout_p"]
    if not isinstance(p, (int, float)):
        return SkipReason.DROPOUT_AT_RUN_TIME.skip()
    if p > 0:
        return SkipReason.DROPOUT.skip(p=p)
    hq, hk = args["query"].shape[1], args["key"].shape[1]
    if hq != hk and not (args["enable_gqa"] is True and hq % hk == 0):
        return SkipReason.HEADS_MISMATCH.skip(query_heads=hq, key_heads=hk)
    if not isinstance(args["scale"], (int, float, type(None))):
        return SkipReason.SCALE_AT_RUN_TIME.skip()
    return None


def _check_module(module: str, ctx: CallContext, reached: str = "") -> Skip | None:
    """With an adapter, only its video self-attention modules are rewritten; a call whose
    module is not proven (:data:`UNPROVEN_MODULE`) is not rewritten, with or without one."""
    if module == UNPROVEN_MODULE:
        return SkipReason.MODULE_UNPROVEN.skip(reached=reached)
    if ctx.family is not None and module not in ctx.layer_of:
        return SkipReason.NOT_SELF_ATTENTION.skip(family=ctx.family)
    why = ctx.grid.order_unproven(module) if ctx.layout is None and ctx.grid is not None else None
    if why is not None:
        return SkipReason.TOKEN_ORDER_UNPROVEN.skip(module=module, detail=why)
    return None


def _check_mask(
    mask: Any, batch: int, sq: Any, layout: VideoLayout, dynamic: bool, ctx: CallContext
) -> Skip | None:
    """No mask, or a boolean ``[B or 1, 1, 1, S]`` text key padding the adapter declares."""
    if mask is None:
        return None
    if dynamic:
        return SkipReason.MASK_AT_RUN_TIME_LENGTH.skip()
    if not isinstance(mask, torch.Tensor):
        return SkipReason.MASK_NO_SHAPES.skip()
    if mask.dtype != torch.bool:
        return SkipReason.MASK_NOT_BOOL.skip(dtype=mask.dtype)
    if not (ctx.grid is not None and ctx.grid.text_key_padding):
        return SkipReason.MASK_UNDECLARED.skip()
    if mask.dim() != 4 or tuple(mask.shape[1:]) != (1, 1, sq) or mask.shape[0] not in (1, batch):
        return SkipReason.MASK_NOT_KEY_PADDING.skip(shape=list(mask.shape))
    if layout.text_tokens == 0:
        return SkipReason.MASK_WITHOUT_TEXT.skip()
    return None


# The devices on which a call placed by its frame's local module was measured to give the
# reference's output (tests/test_compat.py on CPU). tests/test_api_gpu.py
# ::test_offloaded_placement_matches_reference_in_float32 measures CUDA with "cuda" added here:
# on an H100 it was 8.8e-3 / 2.3e-2 from the reference in float32 (docs/design.md), so not yet.
LOCAL_PLACEMENT_PROVEN_ON = frozenset({"cpu"})


def _local_placement(
    module: str, ctx: CallContext, choice: Any, device: torch.device | None
) -> tuple[str, Any]:
    """The module and decision of a call placed by its frame's local module
    (:meth:`Placement.place`). Dynamo may reuse the frame's graph for any call whose guards
    pass (it does not guard on which module the local is), but each block variant compiles
    with its own backend (Dynamo keeps a graph for the backend that compiled it) and gives its
    blocks the same partitions: block by block, the graph runs in the traced block's place in
    other blocks of its variant, and holds the right partition wherever it runs if that block
    holds ``module`` and no other numbered self-attention module. With the whole model
    compiled, the graph may run for any layer: its module is unproven, and it stays dense.
    Off the CPU the placement stays dense (:attr:`SkipReason.LOCAL_PLACEMENT_CUDA`): there the
    output was measured off the reference, for a cause not yet isolated."""
    if ctx.regional is None:
        why = SkipReason.LOCAL_MODULE_SHARED.skip(
            module=module, why="the whole model is compiled with one backend"
        )
        return UNPROVEN_MODULE, choice if isinstance(choice, Skip) else why
    if isinstance(choice, Skip):
        return module, choice
    if device is None or device.type not in LOCAL_PLACEMENT_PROVEN_ON:
        return module, SkipReason.LOCAL_PLACEMENT_CUDA.skip(module=module)
    reason = ctx.regional.sole_module_why(module, ctx)
    if reason is None:
        return module, choice
    return module, SkipReason.LOCAL_MODULE_SHARED.skip(module=module, why=reason)


def _learn_cross_calls(gm: fx.GraphModule, placement: Placement, ctx: CallContext) -> None:
    """A learning numbering first learns every cross-attention call of the graph, so that no
    call of the graph is decided by an index its own cross-attention calls move (a
    cross-attention module numbered before a self-attention module it runs after)."""
    if not isinstance(ctx.layer_of, LayerNumbering) or ctx.parallel is not None:
        return
    for sub in gm.modules():
        if not isinstance(sub, fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            if not is_sdpa(node):
                continue
            try:
                bound = _bind(node)
            except TypeError:
                continue
            qkv = (_value(bound[name]) for name in ("query", "key", "value"))
            skip = _check_shapes(*qkv)  # the rule decide() applies
            if skip is not None and skip.reason is SkipReason.CROSS_ATTENTION:
                ctx.layer_of.learn_cross(placement.place(node, ctx.layer_of))


def _note_numbering(module: str, choice: Any, ctx: CallContext) -> None:
    """What a learning layer numbering (:mod:`vmoba_compile.numbering`) takes from one decided
    call: a candidate's cross-attention call takes it out; any other decision of a numbered
    module fixes its index (the graph holds it)."""
    numbering = ctx.layer_of
    if not isinstance(numbering, LayerNumbering):
        return
    numbering.note(module, isinstance(choice, Skip) and choice.reason is SkipReason.CROSS_ATTENTION)


def _resolve_layer(module: str, ctx: CallContext, next_layer: Callable[[], int]) -> int | Skip:
    """The call's VMoBA layer index, unless the runtime controls keep that layer dense."""
    layer = ctx.layer_of.get(module)
    if layer is None and module in getattr(ctx.layer_of, "cross", ()):
        return SkipReason.LAYER_TAKEN_OUT.skip(module=module)
    if layer is None:
        if ctx.regional is not None:  # a block's graph: its graph order is not the model's
            return SkipReason.LAYER_UNNUMBERED.skip(module=module)
        layer = next_layer()
    if layer in ctx.dense_layers:
        return SkipReason.DENSE_LAYER.skip(layer=layer)
    return layer


def _static_layout(sq: int, ctx: CallContext) -> VideoLayout | Skip:
    """The layout of a call of ``sq`` tokens, or why there is none."""
    if ctx.layout is not None:
        if ctx.layout.seq_len != sq:
            return SkipReason.LAYOUT_MISMATCH.skip(
                tokens=sq, expected=ctx.layout.seq_len, layout=ctx.layout
            )
        return ctx.layout
    if ctx.grid is None:
        return SkipReason.GRID_UNKNOWN.skip(detail=ctx.grid_error)
    grid = ctx.grid
    layout = grid.layout_for(sq)
    if layout is None:
        return SkipReason.TOO_SHORT_FOR_GRID.skip(tokens=sq, video_tokens=grid.video_tokens)
    if grid.extra_tokens is not None and layout.text_tokens != grid.extra_tokens:
        return SkipReason.EXTRA_TOKENS_UNPROVEN.skip(
            tokens=sq,
            video_tokens=grid.video_tokens,
            extra=layout.text_tokens,
            expected=grid.extra_tokens,
        )
    return layout


def _dynamic_layout(sq: Any, ctx: CallContext) -> VideoLayout | Skip:
    """A call whose length is decided at run time (``S = N + text``, the text count
    data-dependent): the layout at the text's upper bound, when the adapter declares such text
    and it is a suffix with a known bound."""
    grid = ctx.grid
    if grid is None or not ctx.data_dependent_text:
        return SkipReason.LENGTH_AT_RUN_TIME.skip(length=sq)
    if grid.text_position is not TextPosition.SUFFIX:
        return SkipReason.RUN_TIME_TEXT_NOT_SUFFIX.skip()
    try:
        upper = int(sq.node.shape_env.bound_sympy(sq.node.expr).upper)
    except (AttributeError, TypeError, ValueError, OverflowError):
        return SkipReason.LENGTH_UNBOUNDED.skip(length=sq)
    layout = grid.layout_for(upper)
    if layout is None:
        return SkipReason.BOUND_TOO_SHORT_FOR_GRID.skip(upper=upper, video_tokens=grid.video_tokens)
    return layout


def _same(a: Any, b: Any) -> bool:
    """``a == b`` for ints and symbolic sizes (without a guard on data-dependent ones)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def rewrite_graph(
    gm: fx.GraphModule,
    ctx: CallContext,
    example_inputs: Sequence[Any] = (),
    *,
    apply: bool = True,
) -> list[AttentionCall]:
    """Decide every SDPA call of ``gm`` and its nested graphs; rewrite the eligible ones.

    Args:
        gm: Dynamo's graph module (modified in place when ``apply``).
        ctx: the call context.
        example_inputs: the graph's inputs as the backend got them (to place the frame).
        apply: False only decides (``explain``).

    Returns:
        One :class:`AttentionCall` per attention call (SDPA, and the FlexAttention and
        ``nn.MultiheadAttention`` calls listed dense), in graph order.
    """
    calls: list[AttentionCall] = []
    counter = iter(range(1 << 30))
    placement = Placement(
        gm, example_inputs, ctx.param_names, _compat.traced_frame_locals(), ctx.module_names
    )
    prefix = placement.frame_prefix
    _learn_cross_calls(gm, placement, ctx)
    for sub in gm.modules():
        if not isinstance(sub, fx.GraphModule):
            continue
        changed = False
        for node in list(sub.graph.nodes):
            if not is_sdpa(node):
                other = other_attention_call(node, ctx, placement)
                if other is not None:
                    calls.append(other)
                continue
            try:
                bound = _bind(node)
            except TypeError as e:
                skip = SkipReason.UNRECOGNIZED_ARGUMENTS.skip(error=e)
                calls.append(AttentionCall.dense("?", "?", skip))
                continue
            values = {name: _value(a) for name, a in bound.items()}
            if ctx.parallel is not None:  # placed by the running block (vmoba_compile.parallel)
                call = ctx.parallel.rewrite_call(
                    gm, sub, node, bound, values, ctx, example_inputs, lambda: next(counter), apply
                )
                calls.append(call)
                changed = changed or apply
                continue
            module = placement.place(node, ctx.layer_of)
            shape = _shape_text(values["query"], values["key"])
            reached = placement.reached(node) if module == UNPROVEN_MODULE else ""
            choice = decide(values, module, ctx, lambda: next(counter), reached)
            if node.name in placement.by_local:
                device = getattr(values["query"], "device", None)
                module, choice = _local_placement(module, ctx, choice, device)
            _note_numbering(module, choice, ctx)
            if prefix and ctx.regional is None and not isinstance(choice, Skip):
                choice = SkipReason.SHARED_FRAME.skip(frame=prefix.rstrip("."))
            if isinstance(choice, Skip):
                calls.append(AttentionCall.dense(module, shape, choice))
                continue
            partition = ctx.config.partition_for(choice.layer_index).value
            kernel = decide_kernel(values, choice, ctx.config)
            if isinstance(kernel, Skip):  # kernel='flash' and FA4 cannot run this call
                calls.append(AttentionCall.dense(module, shape, kernel))
                continue
            name, why = kernel_text(kernel)
            reason = f"{_rewrite_reason(choice, ctx.config)}; kernel {name}: {why}"
            calls.append(
                AttentionCall(module, shape, True, reason, choice.layer_index, partition, name)
            )
            if apply:
                _replace(sub, node, bound, BoundVMoBA(choice, ctx.config, bound["scale"], kernel))
                changed = True
        if changed:
            sub.graph.lint()
            sub.recompile()
    return calls


def decide_kernel(
    values: dict[str, Any], choice: _Rewrite, config: VMoBAConfig, seq_len: int | None = None
) -> KernelChoice | None | Skip:
    """The kernel of a rewritten call, decided once here: the report names it and the op runs
    it (:class:`BoundVMoBA` carries it). None when every chunk is kept (the op runs dense
    SDPA); the :class:`Skip` when ``kernel='flash'`` cannot run (the call then stays dense).

    ``values``: the call's tensors on the device and in the dtype they run; ``seq_len``: the
    tokens the attention sees when they differ from ``values``' (after Ulysses' exchange).
    """
    plan = plan_for(choice.layout, config, choice.layer_index)
    if config.keeps_all_chunks(plan.num_chunks):
        return None
    q, k, v = values["query"], values["key"], values["value"]
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    kc = kernel_for(q, v, config, choice.layer_index, backward, seq_len=seq_len)
    if not kc.possible:
        return SkipReason.FLASH_CANNOT_RUN.skip(why=kc.reason)
    return kc


def _rewrite_reason(choice: _Rewrite, config: VMoBAConfig) -> str:
    lay = choice.layout
    plan = plan_for(lay, config, choice.layer_index)
    text = f" + {lay.text_tokens} {lay.text_position.value} tokens" if lay.text_tokens else ""
    if choice.dynamic_text:
        text = f" + up to {lay.text_tokens} {lay.text_position.value} tokens (count at run time)"
    what = f"video {lay.frames}x{lay.height}x{lay.width}{text}, {plan.num_chunks} chunks"
    if config.keeps_all_chunks(plan.num_chunks):
        what += " (all kept: dense SDPA)"
    return what


class BoundVMoBA:
    """``vmoba_sdpa`` with one call's static arguments bound: the target of a rewritten node.

    The layout and config live in the target, not in the node's arguments: FX writes arguments
    into the graph's Python source with ``repr``, which is not valid code for these objects (a
    nested graph, e.g. under activation checkpointing, is run from that source).
    """

    def __init__(
        self,
        choice: _Rewrite,
        config: VMoBAConfig,
        scale: float | None,
        kernel: KernelChoice | None = None,
    ) -> None:
        self.choice, self.config, self.scale, self.kernel = choice, config, scale, kernel
        self.__name__ = self.__qualname__ = f"vmoba_sdpa_layer{choice.layer_index}"
        self.__module__ = __name__

    def __call__(self, query, key, value, attn_mask):
        c = self.choice
        return vmoba_sdpa(
            query,
            key,
            value,
            attn_mask,
            layout=c.layout,
            config=self.config,
            layer_index=c.layer_index,
            scale=self.scale,
            key_padding=c.key_padding,
            dynamic_text=c.dynamic_text,
            kernel=self.kernel,
        )

    def __repr__(self) -> str:
        return f"<{self.__name__}>"


def _replace(gm: fx.GraphModule, node: fx.Node, bound: dict, target: BoundVMoBA) -> None:
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(
            target,
            args=(bound["query"], bound["key"], bound["value"], bound["attn_mask"]),
        )
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
