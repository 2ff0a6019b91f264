"""vmoba_compile: VMoBA sparse attention for video diffusion transformers, as a compiler pass."""

from .api import VMoBAControls, VMoBAModule, explain, optimize
from .attention import vmoba_attention
from .config import Granularity, Kernel, Partition, Scope, Selection, VMoBAConfig
from .layout import TextPosition, VideoLayout
from .passes import AttentionCall, RewriteReport, SkipReason
from .reference import reference_mask, vmoba_reference

__version__ = "0.1.0"

__all__ = [
    "AttentionCall",
    "RewriteReport",
    "SkipReason",
    "VMoBAControls",
    "VMoBAModule",
    "explain",
    "optimize",
    "Granularity",
    "Kernel",
    "Partition",
    "Scope",
    "Selection",
    "TextPosition",
    "VMoBAConfig",
    "VideoLayout",
    "reference_mask",
    "vmoba_attention",
    "vmoba_reference",
]
