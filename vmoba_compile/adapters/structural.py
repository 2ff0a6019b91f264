"""The structural fallback: a video DiT that no family adapter names, read from its own structure.

Used by :func:`~vmoba_compile.adapters.find_adapter` when no adapter claims the model's class
(nor a base class). Nothing here knows a model family; everything comes from what the model
exposes:

* **Repeated blocks**: the shallowest ``ModuleList`` (s) under the model whose entries hold
  attention modules (class name contains "Attention"; the innermost such module, which is the
  one that makes the SDPA call). In each block, modules marked as cross-attention
  (``is_cross_attention``, "cross" in the class or attribute name) are left out; the rest are
  the candidate video self-attention modules, in ``named_modules()`` order.
* **Video token grid** (:meth:`StructuralAdapter.grid`, from shapes and the module tree): the
  ``hidden_states`` input must be 5-D. The patch embedding is the ``Conv3d`` / ``Conv2d``
  outside the blocks whose ``in_channels`` match a channel axis of ``hidden_states`` (axis 1,
  ``[B, C, T, H, W]``, or axis 2, ``[B, T, C, H, W]``), with kernel = stride and no padding: the
  grid is ``(T // k_t, H // k_h, W // k_w)`` (a ``Conv2d`` patches each frame: ``k_t = 1``).
  Without such a convolution, ``config.patch_size`` (and ``config.patch_size_t``) with a
  reshape: sizes must be multiples. The config and the convolution must agree, exactly one
  channel axis must fit, and several candidate convolutions must agree; otherwise the grid is
  ambiguous and every call stays dense.
* **Verification** (a probe, once per model and input shapes): the model runs eagerly, without
  gradients and with the random state forked, with every SDPA call whose query and key lengths
  are equal returning its values (:class:`_TokenTrace`): only the model's token-wise ops then
  move a token. It runs clean, with the input under every video token changed, and once per
  bit ``b`` of the token index with the tokens whose index has bit ``b`` changed. At every call
  of a candidate module with ``S_q == S_kv >= N``, the rows each run changed spell the index of
  the token each row holds: row ``video_start + i`` of q, k and v must hold token ``i``
  (frame-major, one token per patch, ``i = (t * H' + y) * W' + x``), for every token. The first
  passing call places the non-video tokens (``video_start`` 0: a suffix, ``S - N``: a prefix);
  a module with a call in another order (or place) is refused (:meth:`VideoGrid.order_unproven`)
  and its calls stay dense, the other modules' calls run VMoBA. If no call passes, every call
  stays dense with the reason. The proof assumes the token order does not depend on the
  attention's values.

Unlike the family adapters, this one runs part of the model (the probe) the first time it sees
a set of input shapes; :meth:`StructuralAdapter.grid` on meta or fake tensors cannot verify and
raises :class:`LayoutUnknown` (calls dense).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..layout import TextPosition
from .base import ModelAdapter, VideoGrid, bind_inputs, describe, forward_signature

__all__ = ["STRUCTURAL", "LayoutUnknown", "Structure", "StructuralAdapter", "analyze"]

_LAYOUT_HINT = (
    "Pass layout=VideoLayout(frames=..., height=..., width=..., text_tokens=..., "
    "text_position=...) to vmoba_compile.optimize(...) (or explain(..., layout=...)) to use VMoBA "
    "on this model."
)


class LayoutUnknown(NotImplementedError):
    """The structural fallback could not infer or verify the token layout of a call: the calls
    stay dense and the report carries this message (a ``NotImplementedError``, as the pass
    treats "no grid for this call")."""


@dataclasses.dataclass(frozen=True)
class Structure:
    """What :func:`analyze` found in a model's module tree.

    Attributes:
        blocks: paths of the block lists (``ModuleList``), in model order.
        attention: the candidate video self-attention modules, in model order.
    """

    blocks: tuple[str, ...]
    attention: tuple[str, ...]


def _is_attention(module: torch.nn.Module) -> bool:
    return "attention" in type(module).__name__.lower()


def is_marked_cross_attention(name: str, module: torch.nn.Module) -> bool:
    """The module says it is a cross-attention: ``is_cross_attention=True``, or "cross" in its
    class or attribute name (the one rule of the structural fallback and of ``layout=``)."""
    flag = getattr(module, "is_cross_attention", None)
    if flag is True:
        return True
    last = name.rpartition(".")[2].lower()
    return "cross" in type(module).__name__.lower() or "cross" in last


def _block_lists(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """The shallowest ``ModuleList`` s whose entries hold attention modules (breadth first through
    the module tree; lists inside those lists' entries are part of the blocks)."""
    level: list[tuple[str, torch.nn.Module]] = [("", model)]
    while level:
        found, nxt = [], []
        for prefix, module in level:
            for name, child in module.named_children():
                path = f"{prefix}{name}"
                if isinstance(child, torch.nn.ModuleList) and any(
                    _is_attention(m) for entry in child for m in entry.modules()
                ):
                    found.append((path, child))
                else:
                    nxt.append((path + ".", child))
        if found:
            return found
        level = nxt
    return []


def analyze(model: torch.nn.Module) -> Structure:
    """The blocks and candidate video self-attention modules of ``model``.

    Raises:
        ValueError: the model has no video-transformer structure this fallback can read (no
            ``hidden_states`` parameter, no block list holding attention modules): the message
            says what is missing.
    """
    name = type(model).__name__
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{name} is not a torch.nn.Module.")
    params: Mapping[str, inspect.Parameter]
    try:
        params = forward_signature(model).parameters
    except (TypeError, ValueError):
        params = {}
    if "hidden_states" not in params:
        raise ValueError(
            f"{name}.forward has no hidden_states parameter (the 5-D video input "
            f"[B, C, T, H, W] the structural fallback reads the grid from)"
        )
    lists = _block_lists(model)
    if not lists:
        raise ValueError(f"{name} has no ModuleList of blocks holding attention modules")
    attention = _self_attention_candidates(model, lists)
    if not attention:
        raise ValueError(_no_self_attention(model, lists))
    return Structure(tuple(p for p, _ in lists), tuple(attention))


def _self_attention_candidates(
    model: torch.nn.Module, lists: list[tuple[str, torch.nn.ModuleList]]
) -> list[str]:
    """The innermost attention modules of the blocks not marked as cross-attention."""
    names = {id(m): n for n, m in model.named_modules()}
    attention: list[str] = []
    for _, blocks in lists:
        for block in blocks:
            for m in block.modules():
                n = names[id(m)]
                if not _is_attention(m) or is_marked_cross_attention(n, m):
                    continue
                if any(_is_attention(c) for c in list(m.modules())[1:]):
                    continue  # not the innermost: a nested attention module makes the call
                attention.append(n)
    return attention


def _no_self_attention(model: torch.nn.Module, lists: list[tuple[str, torch.nn.ModuleList]]) -> str:
    """Why the blocks hold no candidate: the attention modules they hold are all marked."""
    cross = [
        f"{n} ({type(m).__name__})"
        for n, m in model.named_modules()
        if n.startswith(tuple(p + "." for p, _ in lists)) and _is_attention(m)
    ]
    shown = ", ".join(cross[:3]) + (", ..." if len(cross) > 3 else "")
    return (
        f"{type(model).__name__}'s blocks ({', '.join(p for p, _ in lists)}) hold no module it "
        f"can take for the video self-attention: it takes attention modules by class name "
        f"(containing 'Attention'), and those in the blocks are marked as cross-attention "
        f"({shown}); a self-attention module of another class name is not seen"
    )


# ------------------------------------------------------------------------------- the grid


@dataclasses.dataclass(frozen=True)
class _Patchify:
    """How the video input becomes tokens: the channel axis, tokens per axis, and where that
    came from (for the report)."""

    channel_axis: int  # 1: [B, C, T, H, W]; 2: [B, T, C, H, W]
    patch: tuple[int, int, int]
    exact: bool  # reshape (sizes must be multiples) vs strided convolution (floor)
    source: str
    conv: str | None = None  # the convolution taking the input's channels, if any


def _int3(value: Any) -> tuple[int, int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    if isinstance(value, Sequence) and len(value) == 3 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1]), int(value[2])
    return None


def _config_patch(model: torch.nn.Module) -> tuple[tuple[int, int, int] | None, str]:
    """``(p_t, p_h, p_w)`` from ``config.patch_size`` / ``config.patch_size_t`` (None if absent);
    ``p_t`` is None-like (0) when the config gives only a spatial patch."""
    config = getattr(model, "config", None)
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if config is None:
        return None, ""
    p = get("patch_size", None)
    p3 = _int3(p)
    if p3 is not None:
        return p3, f"config.patch_size={tuple(p3)}"
    if isinstance(p, int) and not isinstance(p, bool) and p >= 1:
        pt = get("patch_size_t", None)
        if isinstance(pt, int) and not isinstance(pt, bool) and pt >= 1:
            return (pt, p, p), f"config.patch_size={p}, config.patch_size_t={pt}"
        return (0, p, p), f"config.patch_size={p}"
    return None, ""


def _patch_convs(
    model: torch.nn.Module, structure: Structure, channel_sizes: dict[int, int]
) -> tuple[list[tuple[str, torch.nn.Conv2d | torch.nn.Conv3d, int]], list[str]]:
    """Convolutions outside the blocks taking the input's channels: ``(name, conv, axis)``, and
    the reasons candidates were rejected."""
    inside = tuple(p + "." for p in structure.blocks)
    found, rejected = [], []
    for name, m in model.named_modules():
        if not isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) or name.startswith(inside):
            continue
        axes = [a for a, c in channel_sizes.items() if c == m.in_channels]
        if not axes:
            continue
        if len(axes) > 1:
            rejected.append(
                f"{name} takes {m.in_channels} channels, which both axis 1 and axis 2 of "
                f"hidden_states have (the channel axis is ambiguous)"
            )
            continue
        if not _cuts_disjoint_patches(m):
            rejected.append(
                f"{name} ({type(m).__name__} kernel {tuple(m.kernel_size)}, stride "
                f"{tuple(m.stride)}, padding {m.padding}) does not cut the input into "
                f"disjoint patches (kernel != stride or padding)"
            )
            continue
        found.append((name, m, axes[0]))
    return found, rejected


def _padding(m: torch.nn.Conv2d | torch.nn.Conv3d) -> tuple[int, ...]:
    p = m.padding
    if isinstance(p, str):
        return (0,) if p == "valid" else (1,)
    return tuple(p)


def _patchify(model: torch.nn.Module, structure: Structure, x: torch.Tensor) -> _Patchify:
    """The patch embedding of ``model`` for the 5-D input ``x``, or LayoutUnknown."""
    channel_sizes = {1: int(x.shape[1]), 2: int(x.shape[2])}
    convs, rejected = _patch_convs(model, structure, channel_sizes)
    cfg, cfg_src = _config_patch(model)
    by_conv = _conv_patchify(convs, cfg, cfg_src)
    if by_conv is not None:
        return by_conv
    return _config_patchify(model, cfg, cfg_src, channel_sizes, rejected)


def _conv_patchify(
    convs: list[tuple[str, torch.nn.Conv2d | torch.nn.Conv3d, int]],
    cfg: tuple[int, int, int] | None,
    cfg_src: str,
) -> _Patchify | None:
    """The one patch embedding the candidate convolutions agree on (with the config's patch,
    if any); None without candidates; LayoutUnknown when they or the config disagree."""
    options, disagree = set(), []
    for conv_name, conv, axis in convs:
        k = tuple(int(v) for v in conv.kernel_size)
        patch = k if isinstance(conv, torch.nn.Conv3d) else (1, *k)
        what = f"{conv_name} ({type(conv).__name__} kernel = stride {k})"
        if cfg is not None and (cfg if cfg[0] else (patch[0], cfg[1], cfg[2])) != patch:
            disagree.append(what)  # e.g. a second embedding for other inputs (history latents)
            continue
        options.add((axis, patch, what))
    if disagree and not options:
        raise LayoutUnknown(
            f"structural: {cfg_src} disagrees with the patch embedding "
            f"{' and '.join(disagree)}, so the patch size is ambiguous. " + _LAYOUT_HINT
        )
    if len({(a, p) for a, p, _ in options}) > 1:
        shown = "; ".join(sorted(s for _, _, s in options))
        raise LayoutUnknown(
            f"structural: several convolutions could be the patch embedding and they disagree "
            f"({shown}). " + _LAYOUT_HINT
        )
    if not options:
        return None
    axis, patch, source = next(iter(options))
    conv_name = next(n for n, c, a in convs if a == axis and source.startswith(n + " "))
    return _Patchify(
        axis, cast("tuple[int, int, int]", patch), exact=False, source=source, conv=conv_name
    )


def _config_patchify(
    model: torch.nn.Module,
    cfg: tuple[int, int, int] | None,
    cfg_src: str,
    channel_sizes: dict[int, int],
    rejected: list[str],
) -> _Patchify:
    """Without a patch convolution: ``config.patch_size`` with a reshape, where exactly one
    channel axis of the input fits ``config.in_channels``; else LayoutUnknown with the why."""
    if cfg is not None and cfg[0]:
        c = getattr(getattr(model, "config", None), "in_channels", None)
        axes = [a for a, size in channel_sizes.items() if size == c]
        if len(axes) == 1:
            return _Patchify(axes[0], cfg, exact=True, source=f"{cfg_src} (reshape)")
        why = (
            f"config.in_channels={c!r} matches {'both' if axes else 'neither'} axis 1 "
            f"({channel_sizes[1]}) and axis 2 ({channel_sizes[2]}) of hidden_states"
        )
    elif cfg is not None:
        why = f"{cfg_src} gives no temporal patch and no Conv2d/Conv3d patch embedding was found"
    else:
        why = (
            "no Conv2d/Conv3d patch embedding takes the input's channels and config has no "
            "patch_size"
        )
    extra = f" ({'; '.join(rejected)})" if rejected else ""
    raise LayoutUnknown(f"structural: {type(model).__name__}: {why}{extra}. " + _LAYOUT_HINT)


def _tokens(size: int, patch: int, exact: bool, axis: str, source: str) -> int:
    if size < patch or (exact and size % patch):
        raise LayoutUnknown(
            f"structural: {axis}={size} is not cut into whole patches of {patch} ({source}). "
            + _LAYOUT_HINT
        )
    return size // patch


def _stem(
    model: torch.nn.Module,
    structure: Structure,
    args: tuple,
    kwargs: dict,
    patchify: _Patchify,
) -> _Patchify:
    """The whole patch-embedding stem: the convolution taking the input's channels and the
    convolutions that run after it on its output, each on the one before's output (a
    two-stage stem of stride-2 convolutions downsamples 4x, not 2x).

    The model runs (without gradients, random state forked) up to the first SDPA call of a
    candidate self-attention module, recording the shapes each convolution outside the blocks
    takes and gives. Every stage must cut disjoint patches (kernel = stride, no padding, no
    dilation): then the stem cuts patches of the product of the strides (floors compose:
    ``(H // a) // b == H // (a * b)``). Otherwise the grid is unproven: LayoutUnknown.
    """
    if patchify.conv is None:
        return patchify
    ran = _convolutions_run(model, structure, args, kwargs)
    start = next((i for i, r in enumerate(ran) if r[0] == patchify.conv), None)
    if start is None:
        return patchify  # the convolution did not run before the first attention: the probe says
    chain = [ran[start]]
    for r in ran[start + 1 :]:
        if r[2] == chain[-1][3]:
            chain.append(r)
    if len(chain) == 1:
        return patchify
    names = " -> ".join(
        f"{n} (kernel {tuple(m.kernel_size)}, stride {tuple(m.stride)})" for n, m, _, _ in chain
    )
    for n, m, _, _ in chain:
        if not _cuts_disjoint_patches(m):
            raise LayoutUnknown(
                f"structural: the patch-embedding stem {names}: {n} (padding {m.padding}, "
                f"dilation {tuple(m.dilation)}) does not cut disjoint patches, so the token grid "
                f"of the whole stem is unproven. " + _LAYOUT_HINT
            )
    patch = [1, 1, 1]
    for _, m, _, _ in chain:
        stride = tuple(int(v) for v in m.stride)
        for i, v in enumerate((1,) * (3 - len(stride)) + stride):
            patch[i] *= v
    return dataclasses.replace(
        patchify, patch=(patch[0], patch[1], patch[2]), source=f"stem {names}"
    )


def _cuts_disjoint_patches(m: Any) -> bool:
    """Kernel = stride, no padding, no dilation."""
    return (
        tuple(m.kernel_size) == tuple(m.stride)
        and not any(int(p) for p in _padding(m))
        and all(d == 1 for d in m.dilation)
    )


def _convolutions_run(
    model: torch.nn.Module, structure: Structure, args: tuple, kwargs: dict
) -> list[tuple[str, Any, tuple, tuple]]:
    """``(name, conv, input shape, output shape)`` of each convolution outside the blocks, in
    the order they ran up to the first candidate self-attention call."""
    inside = tuple(p + "." for p in structure.blocks)
    ran: list[tuple[str, Any, tuple, tuple]] = []

    def record(name: str) -> Any:
        def hook(mod: torch.nn.Module, a: tuple, out: Any) -> None:
            if a and isinstance(a[0], torch.Tensor) and isinstance(out, torch.Tensor):
                ran.append((name, mod, tuple(a[0].shape), tuple(out.shape)))

        return hook

    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    handles = [
        m.register_forward_hook(record(name))
        for name, m in model.named_modules()
        if isinstance(m, convs) and not name.startswith(inside)
    ]
    try:
        _first_call(model, structure.attention, args, kwargs, 0)
    finally:
        for h in handles:
            h.remove()
    return ran


def _grid(x: torch.Tensor, patchify: _Patchify) -> tuple[int, int, int]:
    """Tokens per axis of the 5-D input ``x`` cut by ``patchify`` (or LayoutUnknown)."""
    t_axis = 2 if patchify.channel_axis == 1 else 1
    src, exact = patchify.source, patchify.exact
    return (
        _tokens(int(x.shape[t_axis]), patchify.patch[0], exact, "frames", src),
        _tokens(int(x.shape[3]), patchify.patch[1], exact, "height", src),
        _tokens(int(x.shape[4]), patchify.patch[2], exact, "width", src),
    )


# ------------------------------------------------------------------------------- the probe


class _Stop(Exception):
    """Raised inside the probe's forward once the call it waits for has been seen."""


class _FirstSelfAttention(TorchFunctionMode):
    """Records the first SDPA call made inside one of the candidate modules whose query and key
    lengths are equal and at least ``n``, then stops the forward."""

    def __init__(self, stack: list[str], n: int) -> None:
        super().__init__()
        self.stack, self.n = stack, n
        self.seen: tuple[str, torch.Tensor, torch.Tensor] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.stack:
            q = args[0] if args else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            if q.dim() == 4 and k.dim() == 4 and q.shape[2] == k.shape[2] >= self.n:
                self.seen = (self.stack[-1], q.detach().clone(), k.detach().clone())
                raise _Stop
        return func(*args, **kwargs)


def _first_call(
    model: torch.nn.Module, modules: tuple[str, ...], args: tuple, kwargs: dict, n: int
) -> tuple[str, torch.Tensor, torch.Tensor] | None:
    """The first call :class:`_FirstSelfAttention` records (the forward stops there)."""
    seen: tuple[str, torch.Tensor, torch.Tensor] | None = _probe_run(
        model, modules, args, kwargs, _FirstSelfAttention, n
    ).seen
    return seen


def _probe_run(
    model: torch.nn.Module,
    modules: tuple[str, ...],
    args: tuple,
    kwargs: dict,
    mode_type: type,
    n: int,
) -> Any:
    """Run the model eagerly (no grad, random state forked and reseeded, until done or
    :class:`_Stop`) under ``mode_type(stack, n)``, where ``stack`` names the innermost of
    ``modules`` running; returns the mode."""
    stack: list[str] = []
    handles = []
    wanted = set(modules)
    for name, m in model.named_modules():
        if name in wanted:
            handles.append(m.register_forward_pre_hook(lambda _m, _a, n=name: stack.append(n)))
            handles.append(m.register_forward_hook(_leave(stack), always_call=True))
    mode = mode_type(stack, n)
    devices = sorted({t.device.index or 0 for t in _tensors(args, kwargs) if t.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), mode:
            torch.manual_seed(0)  # the same dropout in every run
            with contextlib.suppress(_Stop):
                model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return mode


def _leave(stack: list[str]):
    def leave(module: torch.nn.Module, args: tuple, output: Any) -> None:
        stack.pop()  # returns None: a forward hook's return value would replace the output

    return leave


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]


class _TokenTrace(TorchFunctionMode):
    """The probe's mode: every SDPA call whose query and key lengths are equal returns its values
    (repeated to the query heads) instead of attending, so only the model's token-wise ops move
    a video token; each such call of a candidate module with at least ``n`` tokens is recorded as
    ``(module, row fingerprints of q, k, v)`` (:func:`_fingerprint`)."""

    def __init__(self, stack: list[str], n: int) -> None:
        super().__init__()
        self.stack, self.n = stack, n
        self.calls: list[tuple[str, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value")
        q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
        if q.dim() < 3 or q.shape[-2] != k.shape[-2]:
            return func(*args, **kwargs)
        if self.stack and q.dim() == 4 and q.shape[-2] >= self.n:
            self.calls.append((self.stack[-1], torch.stack([_fingerprint(t) for t in (q, k, v)])))
        heads, kv_heads = q.shape[-3], v.shape[-3]
        return v.repeat_interleave(heads // kv_heads, dim=-3) if heads != kv_heads else v.clone()


def _fingerprint(x: torch.Tensor) -> torch.Tensor:
    """``[B, S]``: each row of ``x [B, H, S, D]`` projected on fixed random weights (a changed
    row changes its fingerprint, almost surely)."""
    g = torch.Generator(device=x.device).manual_seed(0)
    w = torch.rand(x.shape[1], x.shape[3], generator=g, device=x.device, dtype=torch.float64)
    return torch.einsum("bhsd,hd->bs", x.double(), w + 0.5)


def _trace(
    model: torch.nn.Module, modules: tuple[str, ...], args: tuple, kwargs: dict, n: int
) -> list[tuple[str, torch.Tensor]]:
    """Run the model under :class:`_TokenTrace`: its recorded calls, in order."""
    calls: list[tuple[str, torch.Tensor]] = _probe_run(
        model, modules, args, kwargs, _TokenTrace, n
    ).calls
    return calls


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[3, S]`` bool: the rows of q, k, v whose fingerprints (``[3, B, S]``) differ at all.

    Exact: a row the bump does not reach is computed by the same row-wise ops from the same
    data, so it is bit-identical, while in bf16 a reached row may move by one rounding step
    only (a relative tolerance took such rows of late layers for unchanged)."""
    return (a != b).any(dim=1)


def _rows(changed: torch.Tensor) -> str:
    rows = torch.nonzero(changed).flatten().tolist()
    return f"{rows[:8]}{'...' if len(rows) > 8 else ''}"


def _verify(
    model: torch.nn.Module,
    structure: Structure,
    args: tuple,
    kwargs: dict,
    video_arg: tuple[str, int | None],
    patchify: _Patchify,
    grid: tuple[int, int, int],
) -> VideoGrid:
    """Run the probe (module docstring) and return the verified grid, or LayoutUnknown."""
    t_, y_, x_ = grid
    n = t_ * y_ * x_
    clean = _trace(model, structure.attention, args, kwargs, n)
    if not clean:
        raise LayoutUnknown(
            f"structural: no call of the candidate self-attention modules "
            f"({structure.attention[0]}, ...) has equal query and key lengths of at least "
            f"{t_}x{y_}x{x_} = {n} tokens (the grid from the patch embedding): the attention "
            f"does not see these video tokens as one sequence. " + _LAYOUT_HINT
        )
    index = torch.arange(n).reshape(t_, y_, x_)
    bits = max(1, (n - 1).bit_length())
    runs = [torch.ones_like(index, dtype=torch.bool)]  # every token, then one run per bit
    runs += [(index >> b) & 1 == 1 for b in range(bits)]
    changed = []
    for selected in runs:
        got = _trace(
            model, structure.attention, *_bump(args, kwargs, video_arg, patchify, selected), n
        )
        if [(m, f.shape) for m, f in got] != [(m, f.shape) for m, f in clean]:
            raise LayoutUnknown(
                "structural: with the input under the video tokens changed, the model's "
                "self-attention calls are not the same calls of the same lengths: the call "
                "sequence depends on the values. " + _LAYOUT_HINT
            )
        changed.append([_changed(f0, f1) for (_, f0), (_, f1) in zip(clean, got, strict=True)])
    verdicts = [
        _call_verdict(module, j, changed[0][j], [c[j] for c in changed[1:]], grid, patchify)
        for j, (module, _) in enumerate(clean)
    ]
    return _grid_of(verdicts, grid)


def _call_verdict(
    module: str,
    j: int,
    every: torch.Tensor,
    per_bit: list[torch.Tensor],
    grid: tuple[int, int, int],
    patchify: _Patchify,
) -> tuple[str, int | str]:
    """``(module, video_start)`` when call ``j`` holds token ``i`` of the grid at row
    ``video_start + i`` in q, k and v; else ``(module, why not)``."""
    t_, y_, x_ = grid
    n = t_ * y_ * x_
    s = every.shape[1]
    where = f"{module}'s call (self-attention call {j} of the forward, S={s})"
    if not (every[0] == every[1]).all() or not (every[0] == every[2]).all():
        return module, (
            f"changing every video token of the {t_}x{y_}x{x_} grid ({patchify.source}) changed "
            f"query rows {_rows(every[0])}, key rows {_rows(every[1])} and value rows "
            f"{_rows(every[2])} of {where}: the keys and values are not the queries' tokens"
        )
    rows = torch.nonzero(every[0]).flatten()
    start = int(rows[0]) if len(rows) else -1
    if len(rows) != n or int(rows[-1]) - start != n - 1 or start not in (0, s - n):
        return module, (
            f"changing every video token of the {t_}x{y_}x{x_} grid ({patchify.source}) changed "
            f"rows {_rows(every[0])} of {where}, not {n} consecutive rows before or after the "
            f"other tokens"
        )
    bits = torch.stack([c[:, start : start + n] for c in per_bit]).long()  # [bits, 3, N]
    weights = (1 << torch.arange(len(per_bit), device=bits.device))[:, None, None]
    code = (bits * weights).sum(dim=0)  # [3, N]: the token index each row answers as
    outside = any(bool(c[:, :start].any()) or bool(c[:, start + n :].any()) for c in per_bit)
    expected = torch.arange(n, device=code.device)
    wrong = torch.nonzero((code != expected).any(dim=0)).flatten()
    if outside or len(wrong):
        i = int(wrong[0]) if len(wrong) else 0
        held = int(code[0, i])
        token = (held // (y_ * x_), held // x_ % y_, held % x_) if held < n else "none"
        return module, (
            f"row {start + i} of {where} changes as video token (t, y, x)={token} would (or "
            f"as several tokens mixed), where one token per patch in frame-major order predicts "
            f"{(i // (y_ * x_), i // x_ % y_, i % x_)} ({len(wrong)} of {n} rows differ; the "
            f"token order (or the grid) is not the one inferred)"
        )
    return module, start


def _grid_of(verdicts: list[tuple[str, int | str]], grid: tuple[int, int, int]) -> VideoGrid:
    """The verified grid: the modules whose every call passed at one place of the video tokens
    (that of the first passing call), the others refused with their first reason."""
    starts = {v: m for m, v in verdicts if isinstance(v, int)}
    refused: dict[str, str] = {}
    for m, v in verdicts:
        if isinstance(v, str):
            refused.setdefault(m, v)
    if not starts:
        module, why = verdicts[0]
        raise LayoutUnknown(f"structural: {why}. " + _LAYOUT_HINT)
    first = next(v for _, v in verdicts if isinstance(v, int))
    position = TextPosition.SUFFIX if first == 0 else TextPosition.PREFIX
    for m, v in verdicts:
        if isinstance(v, int) and v != first:
            refused.setdefault(
                m, f"its calls hold the video tokens from row {v}, the first call's from {first}"
            )
    verified = tuple(
        dict.fromkeys(m for m, v in verdicts if isinstance(v, int) and m not in refused)
    )
    return VideoGrid(
        *grid,
        text_position=position,
        order_verified=verified,
        order_refused=tuple(refused.items()),
    )


def _bump(
    args: tuple,
    kwargs: dict,
    video_arg: tuple[str, int | None],
    patchify: _Patchify,
    selected: torch.Tensor,
) -> tuple[tuple, dict]:
    """The inputs with ``+1`` at the first pixel of every selected token's patch
    (``selected``: ``[T', H', W']`` bool)."""
    key, pos = video_arg
    x = args[pos] if pos is not None else kwargs[key]
    t_, y_, x_ = selected.shape
    pt, ph, pw = patchify.patch
    x = x.clone()
    scale = max(1.0, float(x.detach().abs().max()))  # well above the input's rounding step
    bump = selected.to(device=x.device, dtype=x.dtype) * scale
    if patchify.channel_axis == 1:
        x[:, :, ::pt, ::ph, ::pw][:, :, :t_, :y_, :x_] += bump
    else:
        x[:, ::pt, :, ::ph, ::pw][:, :t_, :, :y_, :x_] += bump[:, None]
    if pos is not None:
        return (*args[:pos], x, *args[pos + 1 :]), dict(kwargs)
    return tuple(args), {**kwargs, key: x}


def _signature(inputs: dict[str, Any]) -> tuple:
    """The input shapes (and plain values) a probe result holds for."""

    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("T", tuple(v.shape), str(v.dtype), str(v.device))
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return tuple(one(e) for e in v)
        if isinstance(v, dict):
            return tuple((k, one(e)) for k, e in sorted(v.items(), key=lambda kv: str(kv[0])))
        return type(v).__name__

    return tuple((k, one(v)) for k, v in inputs.items())


def _is_real(x: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return x.device.type != "meta" and not is_fake(x)


# ------------------------------------------------------------------------------- the adapter


class StructuralAdapter(ModelAdapter):
    """The structural fallback (module docstring): for models no family adapter names."""

    family = "structural"
    library = ""
    model_classes = ()

    def __init__(self) -> None:
        # model -> input signature -> verified grid or the reason there is none. The probe runs
        # the model, so its result is kept per model and input shapes.
        self._verified: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, Any]] = (
            weakref.WeakKeyDictionary()
        )

    def matches(self, model: torch.nn.Module) -> bool:
        """True if :func:`analyze` can read the model's structure."""
        try:
            analyze(model)
        except ValueError:
            return False
        return True

    def self_attention_modules(self, model: torch.nn.Module) -> list[str]:
        try:
            return list(analyze(model).attention)
        except ValueError as e:
            raise RuntimeError(f"structural: {e}. {_LAYOUT_HINT}") from None

    def grid(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
        inputs = bind_inputs(model, args, kwargs)
        structure = analyze(model)
        x = inputs.get("hidden_states")
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            raise LayoutUnknown(
                f"structural: {type(model).__name__} got hidden_states as {describe(x)}, not a "
                f"5-D video tensor [B, C, T, H, W] or [B, T, C, H, W]. " + _LAYOUT_HINT
            )
        patchify = _patchify(model, structure, x)
        if not _is_real(x):
            t, y, w = _grid(x, patchify)
            raise LayoutUnknown(
                f"structural: the {t}x{y}x{w} grid ({patchify.source}) is verified by "
                f"running the model on the inputs, which are meta or fake tensors here. "
                + _LAYOUT_HINT
            )
        key = _signature(inputs)
        cache = self._verified.setdefault(model, {})
        if key not in cache:  # the stem and the probe run the model: once per input shapes
            names = list(inspect_parameters(model))
            pos = names.index("hidden_states") if "hidden_states" in names[: len(args)] else None
            try:
                patchify = _stem(model, structure, args, kwargs, patchify)
                cache[key] = _verify(
                    model,
                    structure,
                    args,
                    kwargs,
                    ("hidden_states", pos),
                    patchify,
                    _grid(x, patchify),
                )
            except LayoutUnknown as e:
                cache[key] = e
        result = cache[key]
        if isinstance(result, LayoutUnknown):
            raise LayoutUnknown(str(result))
        return result

    def source(self, model: torch.nn.Module) -> str:
        """What the report says about this path."""
        try:
            s = analyze(model)
        except ValueError as e:
            return f"structural: {e}"
        blocks = ", ".join(f"'{b}'" for b in s.blocks)
        return (
            f"structural: no adapter knows {type(model).__name__}; blocks in {blocks}, grid from "
            f"the patch embedding, verified by a probe per input shape"
        )


def inspect_parameters(model: torch.nn.Module) -> list[str]:
    """The forward's parameter names, in order."""
    return list(forward_signature(model).parameters)


STRUCTURAL = StructuralAdapter()
"""The one structural adapter (its probe cache is per model)."""
