"""All adapters, in lookup order, and :func:`find_adapter`."""

from __future__ import annotations

import torch

from .base import ModelAdapter
from .diffusers_models import DIFFUSERS_ADAPTERS
from .transformers_models import TRANSFORMERS_ADAPTERS

__all__ = ["ADAPTERS", "find_adapter"]

ADAPTERS: tuple[ModelAdapter, ...] = DIFFUSERS_ADAPTERS + TRANSFORMERS_ADAPTERS


def find_adapter(model: torch.nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s family (the first of :data:`ADAPTERS` that matches).

    Args:
        model: the video transformer itself (not a pipeline, not ``torch.compile(model)``).

    Raises:
        ValueError: no adapter knows the model's class. The message lists the known families
            and says how to use VMoBA with an explicit layout.
    """
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
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
        f"model."
    )
