"""The adapter contract: what a model family tells the pass, and the helpers adapters share.

An adapter describes one family of video transformers. Given the model and the inputs of one
forward call it says where the video tokens sit in every video self-attention of that call
(:class:`VideoGrid`), and it names the modules whose SDPA calls are those self-attentions. It
never rewrites, patches or runs the model.

``grid`` reads shapes and ``model.config`` only, never tensor values: it is cheap, makes
no host sync, and works on meta or fake tensors.

Shape legend: B batch, C channels, F frames, H height, W width of the model *input*; the token
grid is ``frames x height x width`` in tokens after patchify, flattened frame-major.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..layout import TextPosition, VideoLayout

__all__ = [
    "ModelAdapter",
    "VideoGrid",
    "as_tuple3",
    "bind_inputs",
    "children",
    "config_value",
    "describe",
    "forward_signature",
    "module_names",
    "require_tensor",
    "tokens_along",
]


def _grid_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"VideoGrid.{name} must be an int >= 1 (tokens); got {value!r}.")
    return value


@dataclasses.dataclass(frozen=True)
class VideoGrid:
    """Video token grid of a model call, as every video self-attention of that call sees it.

    The grid says nothing about how many non-video tokens a call carries: that is ``S - N`` of
    each call (``N = frames * height * width``), which the pass reads off the call itself, so one
    grid serves calls whose text length differs (Mochi drops padded text per sample).

    Attributes:
        frames: tokens along time (after temporal patchify).
        height: tokens along height (after spatial patchify).
        width: tokens along width.
        text_position: where non-video tokens (text, CLS) sit in a joint self-attention
            sequence. Ignored when a call holds video tokens only.
        text_key_padding: True when the model passes a boolean key-padding ``attn_mask``
            (``[B, 1, 1, S]``, True = attend) whose video part is always True and whose False
            entries are only padded text keys (HunyuanVideo). The pass then honours it as a text
            key mask.
        extra_tokens: the number of non-video tokens every video self-attention call of this
            forward holds, when the adapter knows it (0: the family's self-attention sees video
            tokens only). A call holding another number stays dense: where such tokens sit
            (before or after the video) is not proven, and a wrong guess would attend the wrong
            chunks. None: any number, at ``text_position``.
        order_verified: the modules whose every self-attention call a probe traced in this
            grid's token order (the structural fallback); a call of another module stays dense.
            None: the adapter's family fixes the order for all of its modules.
        order_refused: ``(module, why)`` for the modules the probe found in another order.
    """

    frames: int
    height: int
    width: int
    text_position: TextPosition = TextPosition.SUFFIX
    text_key_padding: bool = False
    extra_tokens: int | None = None
    order_verified: tuple[str, ...] | None = None
    order_refused: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _grid_int("frames", self.frames)
        _grid_int("height", self.height)
        _grid_int("width", self.width)
        pos = self.text_position
        if not isinstance(pos, TextPosition):
            try:
                pos = TextPosition(pos.lower() if isinstance(pos, str) else pos)
            except ValueError:
                raise ValueError(
                    f"VideoGrid.text_position must be 'prefix' or 'suffix'; got {pos!r}."
                ) from None
            object.__setattr__(self, "text_position", pos)
        if not isinstance(self.text_key_padding, bool):
            raise ValueError(
                f"VideoGrid.text_key_padding must be a bool; got {self.text_key_padding!r}."
            )
        extra = self.extra_tokens
        bad = not isinstance(extra, int) or isinstance(extra, bool) or extra < 0
        if extra is not None and bad:
            raise ValueError(f"VideoGrid.extra_tokens must be None or an int >= 0; got {extra!r}.")

    def order_unproven(self, module: str) -> str | None:
        """None when the token order of ``module``'s calls is this grid's; else why not."""
        if self.order_verified is None or module in self.order_verified:
            return None
        why = dict(self.order_refused).get(module)
        return why or "no call of it held the video tokens when the probe ran the model"

    @property
    def video_tokens(self) -> int:
        """``N = frames * height * width``."""
        return self.frames * self.height * self.width

    def layout_for(self, seq_len: int) -> VideoLayout | None:
        """The layout of a self-attention call of ``seq_len`` tokens.

        Args:
            seq_len: ``S`` of the call (query and key length).

        Returns:
            ``VideoLayout`` with ``text_tokens = seq_len - video_tokens`` at ``text_position``,
            or None if ``seq_len < video_tokens`` (the call cannot hold this grid).
        """
        extra = seq_len - self.video_tokens
        if extra < 0:
            return None
        return VideoLayout(
            frames=self.frames,
            height=self.height,
            width=self.width,
            text_tokens=extra,
            text_position=self.text_position,
        )

    def __str__(self) -> str:
        extra = ", text_key_padding=True" if self.text_key_padding else ""
        if self.extra_tokens is not None:
            extra += f", extra_tokens={self.extra_tokens}"
        return (
            f"VideoGrid(frames={self.frames}, height={self.height}, width={self.width}, "
            f"text_position='{self.text_position.value}'{extra})"
        )


class ModelAdapter(abc.ABC):
    """Knowledge of one model family. Subclasses are stateless singletons.

    Attributes:
        family: short name, e.g. ``"wan"``.
        model_classes: names of the classes the adapter handles (subclasses included).
        library: top-level package the classes live in (``"diffusers"``, ``"transformers"``).
        data_dependent_text: True when the model picks its text tokens by value inside the
            attention (``torch.nonzero`` on a mask, as Mochi does), so the text length of a call
            is only known at run time. The pass then traces such ops (Dynamo's
            ``capture_dynamic_output_shape_ops``, set for its own compiles only) and pads the
            text to its upper bound, masking the padded keys.
    """

    family: str = ""
    model_classes: tuple[str, ...] = ()
    library: str = ""
    data_dependent_text: bool = False

    def matches(self, model: torch.nn.Module) -> bool:
        """True if ``model`` is (a subclass of) one of :attr:`model_classes` of :attr:`library`.

        Compares class names and module paths along the MRO, so it imports nothing: a model of
        a library that was never imported cannot match, and subclasses match.
        """
        for cls in type(model).__mro__:
            if (
                cls.__name__ in self.model_classes
                and cls.__module__.partition(".")[0] == self.library
            ):
                return True
        return False

    @abc.abstractmethod
    def grid(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
        """The token grid of the forward call ``model(*args, **kwargs)``.

        Args:
            model: a model this adapter matches.
            args: positional arguments of the forward call.
            kwargs: keyword arguments of the forward call.

        Raises:
            ValueError: the inputs do not fit the model (what was expected, what came, how to
                fix it).
            NotImplementedError: a valid input path whose tokens are not a box grid ("NYI: ...").
        """
        raise NotImplementedError

    @abc.abstractmethod
    def self_attention_modules(self, model: torch.nn.Module) -> list[str]:
        """Names (as in ``model.named_modules()``) of the video self-attention modules.

        Each name is the innermost module whose forward makes the SDPA call (the attention
        module, e.g. ``blocks.0.attn1``). Order is the backbone's layer order; auxiliary
        branches (VACE) follow the backbone, so layer ``i`` of the backbone is index ``i``.

        Raises:
            RuntimeError: the model's structure is not the one this adapter was written for
                (an unsupported library version).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} family={self.family!r}>"


# ---------------------------------------------------------------------------------- helpers


def forward_signature(model: torch.nn.Module) -> inspect.Signature:
    """The signature of what ``model(...)`` calls: ``model.forward`` as bound on the instance.

    ``inspect.signature(model.forward)`` follows a partial's ``__wrapped__`` before it binds the
    partial's arguments. That is right for a forward replaced by
    ``update_wrapper(partial(hook, model), original_bound_forward)`` (diffusers and accelerate
    hooks), wrong for ``update_wrapper(partial(wrapper, model), wrapper)`` (cache-dit):
    ``__wrapped__`` is then the unbound ``wrapper(self, *args, **kwargs)``, whose ``self`` the
    partial already binds, so the call's first input would bind to ``self``. Here such a partial
    is read as the call it makes (its function's signature with the partial's arguments bound),
    and ``__wrapped__`` is followed only from a partial that passes everything through to
    another callable. A forward that still takes only ``(*args, **kwargs)`` is taken to hand its
    inputs on unchanged to the class's ``forward`` (what cache-dit's wrapper calls), whose
    signature, bound to ``model``, is returned.
    """
    sig = _call_signature(model.forward)
    if sig is None or _passes_through(sig):
        return inspect.signature(type(model).forward.__get__(model, type(model)))
    return sig


def _call_signature(fn: Any, depth: int = 0) -> inspect.Signature | None:
    try:
        if not isinstance(fn, functools.partial):
            return inspect.signature(fn)  # a bound method: inspect drops the bound self
        wrapped = getattr(fn, "__wrapped__", None)
        own = inspect.signature(functools.partial(fn.func, *fn.args, **fn.keywords))
    except (TypeError, ValueError):
        return None
    if wrapped is not None and wrapped is not fn.func and _passes_through(own) and depth < 8:
        return _call_signature(wrapped, depth + 1)
    return own


def _passes_through(sig: inspect.Signature) -> bool:
    kinds = {p.kind for p in sig.parameters.values()}
    return kinds <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}


def bind_inputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Bind ``args``/``kwargs`` to the signature of ``model``'s forward
    (:func:`forward_signature`), defaults applied.

    Raises:
        ValueError: the call does not fit the signature.
    """
    sig = forward_signature(model)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise ValueError(
            f"{type(model).__name__}.forward{sig} cannot take these inputs ({e}); got "
            f"{len(args)} positional argument(s) and keywords {sorted(kwargs)}. Pass the example "
            f"inputs exactly as you call the model: model(*args, **kwargs)."
        ) from None
    bound.apply_defaults()
    return dict(bound.arguments)


def describe(value: object) -> str:
    """Short description of an input for error messages (shape and dtype for tensors)."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return f"a {type(value).__name__}"


def require_tensor(
    model: torch.nn.Module, inputs: dict[str, Any], name: str, ndim: int, layout: str
) -> torch.Tensor:
    """``inputs[name]`` as a tensor of ``ndim`` dims, or a ValueError that says what came.

    Args:
        model: the model (for the message).
        inputs: bound forward arguments.
        name: argument name.
        ndim: expected number of dims.
        layout: human description of the expected dims, e.g. ``"[B, C, F, H, W]"``.
    """
    value = inputs.get(name)
    if not isinstance(value, torch.Tensor) or value.dim() != ndim:
        raise ValueError(
            f"{type(model).__name__} expects {name} as a {ndim}-D tensor {layout}; got "
            f"{describe(value)}. Pass the same {name} the model's pipeline passes."
        )
    return value


def tokens_along(
    model: torch.nn.Module,
    axis: str,
    size: int,
    patch: int,
    *,
    source: str,
    exact: bool,
) -> int:
    """Tokens along one axis of ``size`` input elements cut by ``patch``.

    Args:
        model: the model (for the message).
        axis: ``"frames"``, ``"height"`` or ``"width"``.
        size: input elements along the axis.
        patch: input elements per token (the config's patch size).
        source: where ``patch`` comes from, e.g. ``"config.patch_size[1]"``.
        exact: True when the model reshapes (so ``size`` must be a multiple of ``patch``),
            False when it uses a strided convolution (which drops a remainder).
    """
    size, patch = int(size), int(patch)
    if exact and size % patch:
        raise ValueError(
            f"{type(model).__name__} cuts the input {axis} into patches of {patch} ({source}) "
            f"with a reshape, so {axis} must be a multiple of {patch}; got {axis}={size}. "
            f"Pad or crop the latents to a multiple of {patch} (the model's pipeline does)."
        )
    if size < patch:
        raise ValueError(
            f"{type(model).__name__} needs at least {patch} input elements along {axis} per "
            f"token ({source}); got {axis}={size}, which gives no token. Use larger inputs."
        )
    return size // patch


def config_value(model: torch.nn.Module, key: str) -> Any:
    """``model.config.<key>``, or a RuntimeError naming the unsupported library version."""
    config = getattr(model, "config", None)
    try:
        return config[key] if isinstance(config, dict) else getattr(config, key)
    except (AttributeError, KeyError):
        raise RuntimeError(
            f"{type(model).__name__}.config has no {key!r}; this version of "
            f"{type(model).__module__.partition('.')[0]} is not one the VMoBA adapter was "
            f"written for. Pass layout=VideoLayout(...) to vmoba_compile.optimize(...) instead."
        ) from None


def as_tuple3(model: torch.nn.Module, key: str) -> tuple[int, int, int]:
    """A 3-entry patch size from ``model.config.<key>``."""
    value = config_value(model, key)
    if not isinstance(value, Sequence) or len(value) != 3:
        raise RuntimeError(
            f"{type(model).__name__}.config.{key} should be 3 ints (t, h, w); got {value!r}."
        )
    return int(value[0]), int(value[1]), int(value[2])


def module_names(model: torch.nn.Module, modules: Iterable[torch.nn.Module]) -> list[str]:
    """The ``named_modules()`` names of ``modules``, in the given order."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for m in modules:
        if id(m) not in names:  # pragma: no cover - modules come from model's own attributes
            raise RuntimeError(f"{type(m).__name__} is not a submodule of {type(model).__name__}.")
        out.append(names[id(m)])
    return out


def children(
    model: torch.nn.Module, container: str, member: str, *, root: torch.nn.Module | None = None
) -> list[torch.nn.Module]:
    """``[block.<member> for block in root.<container>]``, checked against the expected structure.

    Args:
        model: the model (for messages).
        container: attribute of ``root`` holding the blocks (a ``ModuleList``), dotted paths OK.
        member: attribute of each block holding the attention module, dotted paths OK.
        root: where ``container`` lives; ``model`` by default.

    Raises:
        RuntimeError: the structure differs (an unsupported library version), or a module found
            is marked as cross-attention.
    """
    obj: Any = model if root is None else root
    try:
        for part in container.split("."):
            obj = getattr(obj, part)
        blocks = list(obj)
        found = []
        for block in blocks:
            m: Any = block
            for part in member.split("."):
                m = getattr(m, part)
            found.append(m)
    except (AttributeError, TypeError):
        raise RuntimeError(
            f"expected {type(model).__name__} to hold its attention at "
            f"{container}[i].{member}; this version of "
            f"{type(model).__module__.partition('.')[0]} has another structure. Pass "
            f"layout=VideoLayout(...) to vmoba_compile.optimize(...) instead."
        ) from None
    for m in found:
        if not isinstance(m, torch.nn.Module) or getattr(m, "is_cross_attention", False):
            raise RuntimeError(
                f"{type(model).__name__}: {container}[i].{member} is {type(m).__name__}"
                f"{' (cross-attention)' if isinstance(m, torch.nn.Module) else ''}, not the "
                f"video self-attention module the VMoBA adapter expects."
            )
    return found
