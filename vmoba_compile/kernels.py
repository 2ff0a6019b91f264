"""Which attention kernel runs a VMoBA call, and the FlashAttention-4 path.

Two kernels compute VMoBA's block-sparse attention:

- **Triton**: FlexAttention's Triton template, traced into the caller's graph (every device and
  dtype; the mask is built in the same graph).
- **FlashAttention-4** (``flash_attn.cute``, CuTe DSL; Hopper and newer): FlexAttention's
  ``BACKEND="FLASH"``, run behind one opaque custom op per direction
  (``vmoba_compile::flash_block_sparse`` and its backward). Inside the op the block tables and
  everything ``mask_mod`` reads are inputs of a small compiled graph of their own.

Why an opaque op: inductor's FLASH lowering (torch 2.11-2.13) hands the CuTe template only
q, k, v, the log-sum-exp and the four block tables as inputs; the buffers ``mask_mod`` reads are
loaded from inside the template without being declared as its reads, so when the caller's graph
computes them (VMoBA's selection does), the scheduler finds no reader, removes them, and codegen
fails (``AssertionError: bufNN`` from ``cutedsl_kernel.py`` ``_add_kernel_input``). As graph
inputs of the op's own graph they are never removed.

The backward recomputes the forward inside its op (FlexAttention's backward needs the forward's
autograd graph, which does not cross an opaque op): one extra FA4 forward per backward.

Nothing here imports ``flash_attn``; FlexAttention imports it when it lowers a FLASH call.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import types
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import flex_attention

from ._compat import autograd_inside_op
from .config import Kernel, Partition, VMoBAConfig
from .masks import MaskPieces, block_mask_from_pieces

__all__ = [
    "KernelChoice",
    "choose_kernel",
    "flash_block_sparse",
    "flash_unavailable",
]

# FA4's block-sparse kernels were validated here with 128 x 128 sparse blocks.
_FLASH_BLOCK_SIZE = 128
# Below this head dim FA4's Hopper backward gave a wrong dq (tests/test_attention_gpu.py, H200).
_FLASH_HOPPER_BWD_MIN_HEAD_DIM = 32
_TRAINING_ON_TRITON = (
    "training call: Triton (FA4 training is opt-in, kernel='flash', until the model suite's "
    "training step passes through it)"
)
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


def _flash_obstacle(
    block_size: int,
    device_type: str,
    dtype: str,
    head_dim: int,
    head_dim_v: int,
    capability: tuple[int, int] | None,
    backward: bool = False,
) -> str | None:
    """What keeps FA4 from running this call at all (None: it can run)."""
    missing = flash_unavailable()
    if missing is not None:
        return missing
    if device_type != "cuda":
        return f"FlashAttention-4 runs on CUDA GPUs; this call is on {device_type}"
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
        capability: the GPU's compute capability (default: read from ``device``).

    Returns:
        The :class:`KernelChoice`. ``kernel="auto"`` uses FA4 for inference calls where it can
        run and is the faster one as measured: BLOCK granularity, and TOKEN granularity's 1D
        layers (its 2D/3D masks, partial blocks everywhere, run faster in Triton). Training
        calls run Triton unless ``kernel="flash"`` forces FA4.
    """
    kernel, reason, possible = _choose_constant(
        config.kernel.value, config.granularity.value, partition.value, config.block_size,
        device.type, device.index, _DTYPE_NAMES.get(dtype, "other"), head_dim, head_dim_v,
        backward, capability,
    )  # fmt: skip
    return KernelChoice(_KERNELS[kernel], reason, possible)


_KERNELS = {"flash": Kernel.FLASH, "triton": Kernel.TRITON}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


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
    if granularity == "token":
        if backward:
            return "triton", "TOKEN granularity backward: Triton is faster", True
        if partition != "1d":
            return "triton", f"TOKEN granularity, {partition} forward: Triton is faster", True
        return "flash", "TOKEN granularity, 1d forward: FA4 is faster", True
    if backward:
        # The op's FA4 forward and backward match the float64 reference on the H200, but the
        # model suite's checkpointed training step through FA4 has not passed yet
        # (benchmarks/README.md): training stays on Triton unless forced.
        return "triton", _TRAINING_ON_TRITON, True
    return "flash", "FA4 available (inference call)", True


# ---------------------------------------------------------------------------------------------
# the FlashAttention-4 path


def _flex_flash(q, k, v, tensors, n_words, has_key_ok, block_size, token_level, scale, backend):
    """FlexAttention on a mask rebuilt from ``tensors`` (traced whole by the op's own compile,
    so every tensor ``mask_mod`` reads is a graph input). ``backend``: ``"FLASH"``; the CPU
    tests of this plumbing pass ``"DEFAULT"`` (FlexAttention's own choice)."""
    pieces = MaskPieces.from_tensors(
        tensors, n_words, has_key_ok, block_size, q.shape[2], token_level
    )
    return flex_attention(
        q,
        k,
        v,
        block_mask=block_mask_from_pieces(pieces),
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        kernel_options=None if backend == "DEFAULT" else {"BACKEND": backend},
    )


_RUNNERS: dict[tuple, Callable[..., Any]] = {}


def _runner(q, k, v, tensors, *static) -> Callable[..., Any]:
    """:func:`_flex_flash` compiled once per input signature, each its own function (code
    object), so that Dynamo never reaches its recompile limit on one code object and falls
    back to eager flex (which would materialize the whole score matrix)."""
    sig = tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in (q, k, v, *tensors))
    key = (sig, *static)
    fn = _RUNNERS.get(key)
    if fn is None:
        code = _flex_flash.__code__
        fresh = types.FunctionType(
            code.replace(co_name=f"_flex_flash_{len(_RUNNERS)}"), _flex_flash.__globals__
        )
        fn = _RUNNERS[key] = torch.compile(fresh, dynamic=False, fullgraph=True)
    return fn


@torch.library.custom_op("vmoba_compile::flash_block_sparse", mutates_args=())
def _flash_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tensors: list[torch.Tensor],
    n_words: int,
    has_key_ok: bool,
    block_size: int,
    token_level: bool,
    scale: float | None,
    backend: str,
) -> torch.Tensor:
    static = (n_words, has_key_ok, block_size, token_level, scale, backend)
    with torch.no_grad():
        return _runner(q, k, v, tensors, *static)(q, k, v, tensors, *static)


@_flash_forward.register_fake
def _(q, k, v, tensors, n_words, has_key_ok, block_size, token_level, scale, backend):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("vmoba_compile::flash_block_sparse_backward", mutates_args=())
def _flash_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    tensors: list[torch.Tensor],
    n_words: int,
    has_key_ok: bool,
    block_size: int,
    token_level: bool,
    scale: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    static = (n_words, has_key_ok, block_size, token_level, scale, backend)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with autograd_inside_op(), torch.enable_grad():
        out = _runner(*leaves, tensors, *static)(*leaves, tensors, *static)
        dq, dk, dv = torch.autograd.grad(out, leaves, grad_out)
    return dq, dk, dv


@_flash_backward.register_fake
def _(q, k, v, grad_out, tensors, n_words, has_key_ok, block_size, token_level, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, tensors, *static = inputs
    ctx.static = static
    ctx.n_tensors = len(tensors)
    ctx.save_for_backward(q, k, v, *tensors)


def _backward(ctx, grad_out):
    q, k, v, *tensors = ctx.saved_tensors
    dq, dk, dv = _flash_backward(q, k, v, grad_out.contiguous(), tensors, *ctx.static)
    # One gradient per input, the tensor list's as a list (torch.library checks the structure).
    return dq, dk, dv, [None] * ctx.n_tensors, None, None, None, None, None, None


_flash_forward.register_autograd(_backward, setup_context=_setup_context)


def flash_block_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pieces: MaskPieces,
    scale: float | None,
    *,
    backend: str = "FLASH",
) -> torch.Tensor:
    """VMoBA's block-sparse attention on FlashAttention-4, forward and backward.

    Args:
        q: ``[B, H, S_pad, D]`` in padded chunk order.
        k: ``[B, Hkv, S_pad, D]``.
        v: ``[B, Hkv, S_pad, Dv]``.
        pieces: the mask (:func:`~vmoba_compile.masks.build_block_mask` with ``raw=True``);
            with a backward, built with the query-side tables.
        scale: softmax scale (None: ``1 / sqrt(D)``).
        backend: FlexAttention's ``BACKEND`` inside the op; ``"DEFAULT"`` lets FlexAttention
            choose (CPU tests of the op's plumbing; there is no FA4 on CPU).

    Returns:
        ``[B, H, S_pad, Dv]``.
    """
    grads = q.requires_grad or k.requires_grad or v.requires_grad
    if grads and torch.is_grad_enabled() and len(pieces.tables) != 8:
        raise ValueError(
            "flash_block_sparse with gradients needs the query-side block tables: build the "
            "mask with q_tables=True."
        )
    return _flash_forward(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        pieces.tensors(),
        len(pieces.word_tables),
        pieces.key_ok is not None,
        pieces.block_size,
        pieces.token_level,
        None if scale is None else float(scale),
        backend,
    )
