"""Model-family knowledge: the video token grid of a call and the video self-attention modules.

Importing this package imports neither diffusers nor transformers: adapters recognise models by
class name and module path.

Example:
    >>> adapter = find_adapter(model)                      # doctest: +SKIP
    >>> grid = adapter.grid(model, args, kwargs)           # doctest: +SKIP
    >>> names = adapter.self_attention_modules(model)      # doctest: +SKIP
"""

from .base import ModelAdapter, VideoGrid
from .registry import ADAPTERS, find_adapter

__all__ = ["ADAPTERS", "ModelAdapter", "VideoGrid", "find_adapter"]
