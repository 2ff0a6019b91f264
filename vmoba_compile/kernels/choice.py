"""Which attention kernel runs a VMoBA call: FlexAttention's Triton template or
FlashAttention-4 (:mod:`vmoba_compile.kernels.flash`), and the memory format each reads.

:func:`choose_kernel` is the one policy: the pass decides with it where it rewrites a call (the
report names the decision) and :func:`~vmoba_compile.attention.vmoba_attention` where it is
called directly. Nothing here imports ``flash_attn``: :func:`flash_unavailable` looks the
packages up without importing them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from typing import Any

import torch

from ..config import Kernel, Partition, VMoBAConfig

__all__ = [
    "FLASH_INFERENCE_MIN_TOKENS",
    "FLASH_TRAINING_MIN_TOKENS",
    "KernelChoice",
    "choose_kernel",
    "flash_unavailable",
    "kernel_input",
    "kernel_text",
]

# FA4's block-sparse kernels were validated here with 128 x 128 sparse blocks.
_FLASH_BLOCK_SIZE = 128
# Below this head dim FA4's Hopper backward gave a wrong dq (tests/test_attention_gpu.py, H200).
_FLASH_HOPPER_BWD_MIN_HEAD_DIM = 32
# Calls shorter than these run Triton under kernel="auto" (H200, benchmarks/README.md, "Kernel
# choice by sequence length"): training is faster on FA4 from 16,384 tokens (Triton's at 8,192);
# a forward is faster on Triton at 8,192 and 16,384 tokens and on FA4 at 55,296, FA4's op costing
# about 1 ms more outside its kernel; 32,768 is where FA4's kernel saving passes that, estimated
# from the kernel times (not measured between 16,384 and 55,296).
FLASH_TRAINING_MIN_TOKENS = 16384
FLASH_INFERENCE_MIN_TOKENS = 32768
_FLASH_PIN = "pip install 'vmoba_compile[flash]' (flash-attn-4 4.0.0b36, nvidia-cutlass-dsl 4.8.1)"


@functools.cache
def flash_unavailable() -> str | None:
    """None when FlashAttention-4's CuTe DSL package can be found, else why not.

    Looks the packages up without importing them (``import vmoba_compile`` stays lean).
    """
    try:
        spec = importlib.util.find_spec("flash_attn")
    except (ImportError, ValueError):
        spec = None
    locations = list(getattr(spec, "submodule_search_locations", None) or [])
    import os

    if not any(os.path.isdir(os.path.join(p, "cute")) for p in locations):
        return f"FlashAttention-4 (flash_attn.cute) is not installed: {_FLASH_PIN}"
    try:
        cutlass = importlib.util.find_spec("cutlass")
    except (ImportError, ValueError):
        cutlass = None
    if cutlass is None:
        return f"the CuTe DSL (nvidia-cutlass-dsl, module cutlass) is not installed: {_FLASH_PIN}"
    return None


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """The kernel of one VMoBA call and why.

    Attributes:
        kernel: :attr:`Kernel.FLASH` or :attr:`Kernel.TRITON`.
        reason: why (for the rewrite report); for ``kernel="flash"`` calls FA4 cannot run,
            what stands in the way.
        possible: False when the config demands FA4 (``kernel="flash"``) and it cannot run.
    """

    kernel: Kernel
    reason: str
    possible: bool = True


def kernel_input(x: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """``x`` (q, k or v, ``[B, H, S, D]``) in a memory format that ``kernel`` reads correctly
    on ``x``'s device: ``x`` itself where it already is, else a contiguous copy.

    What each kernel reads (measured on CPU torch 2.13; the GPU paths from torch 2.13's source):

    - FlexAttention's CPU C++ template (inductor's lowering of a CPU flex call) names each input
      by its storage buffer and drops a view's storage offset (``CppTemplateKernel.def_kernel``;
      PyTorch copies only views whose storage q/k/v share, ``_realize_duplicate_buffer_inputs``).
      So a view into a fused projection reads the wrong columns: ``v`` of
      ``qkv.chunk(3, -1)``, with ``q`` and ``k`` made anew by a norm, read ``q``'s values
      (error 1.8, and 7.5% of the output on a fused-QKV Wan). Views that are not contiguous in
      ``[B, H, S, D]`` order are misread or fail to lower inside the graph too (a permuted
      ``[B, S, D, H]`` buffer: error 2.0; a transposed view of a pointwise result:
      ``LoweringException: not enough values to unpack``). It needs a contiguous tensor at
      offset 0. Eager CPU flex (and ``aot_eager``) reads any layout, but a traced call cannot
      know whether inductor will lower it, so the rule holds on CPU throughout. Dynamo cannot
      read a storage offset (``torch.* op returned non-Tensor``), so a CPU call that Dynamo
      traces copies every input; inductor fuses the copy into a pointwise producer such as the
      permutation's gather (``optimize`` traces the op with AOTAutograd, which reads offsets).
    - FlexAttention's Triton template adds each input's offset to its pointer and reads any
      strides (``TritonTemplateKernel.def_kernel``; PyTorch's ``test_strided_inputs``), and
      picks 64-bit indexing from the storage the views span (``can_use_32bit_indexing``); its
      TMA loads need a unit stride in the head dim, which the lowering checks
      (``can_use_tma``). A strided head dim is copied (inner-loop loads of every KV block cost
      more than one copy); the usual ``[B, S, H, D]`` views transposed to ``[B, H, S, D]``
      pass as they are.
    - FlashAttention-4 (:func:`~vmoba_compile.kernels.flash.flash_block_sparse`, an opaque op:
      inductor hands it views with their offsets): contiguous tensors, the layout its GPU tests
      ran with.

    Cost: nothing where ``x`` is already right, which is every call whose partition permutes
    the tokens (the gather writes a fresh contiguous tensor). Otherwise one read and one write of
    ``x``: on the GPU about 0.07 ms for one ``[1, 12, 32760, 128]`` bf16 tensor at 3 TB/s,
    against 2-8 ms of block-sparse flex attention at that length (H100, density 0.125-0.5).
    """
    if x.device.type == "cpu":
        ok = x.is_contiguous() and not torch.compiler.is_dynamo_compiling()
        ok = ok and x.storage_offset() == 0
    elif kernel is Kernel.FLASH:
        ok = x.is_contiguous()
    else:
        ok = x.stride(-1) == 1 or x.shape[-1] == 1
    return x if ok else x.clone(memory_format=torch.contiguous_format)


def _flash_obstacle(
    block_size: int,
    device_type: str,
    dtype: str,
    head_dim: int,
    head_dim_v: int,
    capability: tuple[int, int] | None,
    backward: bool = False,
) -> str | None:
    """What keeps FA4 from running this call at all (None: it can run). The device comes
    first: a call off CUDA could not run FA4 even with it installed, so the install hint would
    mislead."""
    if device_type != "cuda":
        return f"FlashAttention-4 runs on CUDA GPUs; this call is on {device_type}"
    missing = flash_unavailable()
    if missing is not None:
        return missing
    major = capability[0] if capability is not None else 0
    if major not in (9, 10, 11):
        cc = "?" if capability is None else f"{capability[0]}.{capability[1]}"
        return (
            f"FlashAttention-4's block-sparse forward and backward need a Hopper or datacenter "
            f"Blackwell GPU (compute capability 9.x-11.x); this one is {cc}"
        )
    if dtype not in ("bfloat16", "float16"):
        return f"FlashAttention-4 computes in bf16 or fp16; this call is {dtype}"
    widest = 256 if major == 9 else 128
    for name, d in (("head dim", head_dim), ("value head dim", head_dim_v)):
        if not (8 <= d <= widest and d % 8 == 0):
            return (
                f"FlashAttention-4 on compute capability {major}.x takes head dims 8-{widest}, "
                f"multiples of 8; this call's {name} is {d}"
            )
    if backward and major == 9 and min(head_dim, head_dim_v) < _FLASH_HOPPER_BWD_MIN_HEAD_DIM:
        return (
            f"FlashAttention-4's Hopper backward computed a wrong dq at head dim 16 (H200, "
            f"flash-attn-4 4.0.0b36; right at 32-128): training calls need head dims of at "
            f"least {_FLASH_HOPPER_BWD_MIN_HEAD_DIM}; this call's is {min(head_dim, head_dim_v)}"
        )
    if block_size != _FLASH_BLOCK_SIZE:
        return (
            f"the FlashAttention-4 path is validated with block_size={_FLASH_BLOCK_SIZE}; this "
            f"config has {block_size}"
        )
    return None


def choose_kernel(
    config: VMoBAConfig,
    partition: Partition,
    *,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    head_dim_v: int,
    backward: bool,
    seq_len: int | None = None,
    capability: tuple[int, int] | None = None,
) -> KernelChoice:
    """The kernel of one VMoBA call (the pass and the op decide with this one function).

    Args:
        config: the VMoBA config (``config.kernel``: auto, flash or triton).
        partition: the call's partition (TOKEN granularity picks per partition).
        device: the call's device.
        dtype: q/k/v dtype.
        head_dim: D of q and k.
        head_dim_v: D of v.
        backward: whether a backward will run (grad mode on and an input requires grad).
        seq_len: tokens in the call (None: unknown, taken as long).
        capability: the GPU's compute capability (default: read from ``device``).

    Returns:
        The :class:`KernelChoice`. ``kernel="auto"`` uses FA4 where it can run and is the
        faster one as measured on the H200: BLOCK granularity, training calls from
        :data:`FLASH_TRAINING_MIN_TOKENS` tokens and forward calls from
        :data:`FLASH_INFERENCE_MIN_TOKENS`, and TOKEN granularity's 1D forward from
        :data:`FLASH_INFERENCE_MIN_TOKENS` (its 2D/3D masks, partial blocks everywhere, and every
        TOKEN backward run faster in Triton). Shorter calls run Triton.
    """
    kernel, reason, possible = _choose_constant(
        config.kernel.value, _granularity(config), partition.value, config.block_size,
        device.type, device.index, _DTYPE_NAMES.get(dtype, "other"), head_dim, head_dim_v,
        backward, seq_len, capability,
    )  # fmt: skip
    return KernelChoice(_KERNELS[kernel], reason, possible)


_KERNELS = {"flash": Kernel.FLASH, "triton": Kernel.TRITON}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _granularity(config: VMoBAConfig) -> str:
    """``"block"``, ``"token"``, or ``"token-pairs"`` (TOKEN granularity as (query, chunk)
    pairs, :mod:`vmoba_compile.token_pairs`, which exists on FA4 only)."""
    if config.granularity.value == "token" and config.token_order.value == "pairs":
        return "token-pairs"
    return config.granularity.value


@torch.compiler.assume_constant_result
def _choose_constant(*args: Any) -> tuple[str, str, bool]:
    # Dynamo runs this natively and keeps the result (no tracing into importlib or CUDA
    # queries); its arguments are plain constants for that reason.
    return _choose(*args)


def _choose(
    kernel: str,
    granularity: str,
    partition: str,
    block_size: int,
    device_type: str,
    device_index: int | None,
    dtype: str,
    head_dim: int,
    head_dim_v: int,
    backward: bool,
    seq_len: int | None,
    capability: tuple[int, int] | None,
) -> tuple[str, str, bool]:
    if kernel == "triton":
        return "triton", "kernel='triton'", True
    if capability is None and device_type == "cuda" and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(device_index)
    obstacle = _flash_obstacle(
        block_size, device_type, dtype, head_dim, head_dim_v, capability, backward
    )
    if kernel == "flash":
        if obstacle is not None:
            return "triton", f"kernel='flash' cannot run: {obstacle}", False
        return "flash", "kernel='flash'", True
    if obstacle is not None:
        return "triton", obstacle, True
    if granularity == "token-pairs":
        return "flash", "TOKEN granularity as (query, chunk) pairs: FA4 block-sparse", True
    if granularity == "token":
        if backward:
            return "triton", "TOKEN granularity backward: Triton is faster", True
        if partition != "1d":
            return "triton", f"TOKEN granularity, {partition} forward: Triton is faster", True
    least = FLASH_TRAINING_MIN_TOKENS if backward else FLASH_INFERENCE_MIN_TOKENS
    if seq_len is not None and seq_len < least:
        kind = "training" if backward else "inference"
        return "triton", f"{kind} call of {seq_len} tokens: below {least} Triton is faster", True
    if granularity == "token":
        return "flash", "TOKEN granularity, 1d forward: FA4 is faster", True
    return "flash", f"FA4 available ({'training' if backward else 'inference'} call)", True


def kernel_text(kernel: KernelChoice | None) -> tuple[str, str]:
    """The report's kernel name and reason of a call's decision (None: every chunk is kept and
    the op runs dense SDPA)."""
    if kernel is None:
        return "sdpa", "every chunk kept"
    return kernel.kernel.value, kernel.reason
