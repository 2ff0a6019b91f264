"""All adapters, in lookup order, and :func:`find_adapter`."""

from __future__ import annotations

import torch

from .base import ModelAdapter
from .diffusers_models import DIFFUSERS_ADAPTERS
from .structural import STRUCTURAL, StructuralAdapter, analyze
from .transformers_models import TRANSFORMERS_ADAPTERS

__all__ = ["ADAPTERS", "find_adapter", "layout_source"]

ADAPTERS: tuple[ModelAdapter, ...] = DIFFUSERS_ADAPTERS + TRANSFORMERS_ADAPTERS


def find_adapter(model: torch.nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s family (the first of :data:`ADAPTERS` that matches the class
    or a base class), else the structural fallback
    (:class:`~vmoba_compile.adapters.structural.StructuralAdapter`) when the model's module tree
    reads as a video transformer.

    Args:
        model: the video transformer itself (not a pipeline, not ``torch.compile(model)``).

    Raises:
        ValueError: no adapter knows the model's class and the structural fallback cannot read
            it. The message lists the known families, says what the fallback missed, and how to
            use VMoBA with an explicit layout.
    """
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    try:
        analyze(model)
        return STRUCTURAL
    except ValueError as e:
        structural = f" The structural fallback cannot read it either: {e}."
    families = ", ".join(a.family for a in ADAPTERS)
    classes = ", ".join(c for a in ADAPTERS for c in a.model_classes)
    hint = ""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, torch.nn.Module):
        hint = (
            f" It wraps {type(inner).__name__} (torch.compile's OptimizedModule): pass the model "
            f"itself; vmoba_compile compiles it."
        )
    elif not isinstance(model, torch.nn.Module):
        inner = getattr(model, "transformer", None)
        if isinstance(inner, torch.nn.Module):
            hint = f" This looks like a pipeline: pass its .transformer ({type(inner).__name__})."
    raise ValueError(
        f"no VMoBA adapter knows {type(model).__name__}; known families: {families} "
        f"(classes {classes}).{hint} Pass layout=VideoLayout(frames=..., height=..., width=..., "
        f"text_tokens=..., text_position=...) to vmoba_compile.optimize(...) to use VMoBA on any "
        f"model.{structural}"
    )


def layout_source(model: torch.nn.Module, adapter: ModelAdapter | None, layout_given: bool) -> str:
    """Which path finds the token layout of ``model``'s calls, for the report: ``user layout``,
    ``adapter 'wan'``, ``subclass of 'wan' (...)`` or ``structural (...)``."""
    if layout_given:
        return "user layout" + (f", modules of {_source(model, adapter)}" if adapter else "")
    return _source(model, adapter) if adapter is not None else "no layout"


def _source(model: torch.nn.Module, adapter: ModelAdapter) -> str:
    if isinstance(adapter, StructuralAdapter):
        return adapter.source(model)
    cls = type(model)
    if cls.__name__ in adapter.model_classes:
        return f"adapter '{adapter.family}'"
    base = next(
        (c.__name__ for c in cls.__mro__ if c.__name__ in adapter.model_classes), "a known class"
    )
    return f"subclass of '{adapter.family}' ({cls.__name__} derives from {base})"
