"""The attention kernels of a VMoBA call: which one runs (:mod:`.choice`) and the
FlashAttention-4 custom ops (:mod:`.flash`)."""

from .choice import (
    FLASH_INFERENCE_MIN_TOKENS,
    FLASH_TRAINING_MIN_TOKENS,
    KernelChoice,
    choose_kernel,
    flash_unavailable,
    kernel_input,
    kernel_text,
)
from .flash import flash_block_sparse

__all__ = [
    "FLASH_INFERENCE_MIN_TOKENS",
    "FLASH_TRAINING_MIN_TOKENS",
    "KernelChoice",
    "choose_kernel",
    "flash_block_sparse",
    "flash_unavailable",
    "kernel_input",
    "kernel_text",
]
