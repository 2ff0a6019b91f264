"""Which attention kernel runs a VMoBA call, and the FlashAttention-4 path.

Two kernels compute VMoBA's block-sparse attention:

- **Triton**: FlexAttention's Triton template, traced into the caller's graph (every device and
  dtype; the mask is built in the same graph).
- **FlashAttention-4** (``flash_attn.cute``, CuTe DSL; Hopper and newer), behind opaque custom
  ops, so that inductor never lowers FA4 inside the caller's graph:

  - inference (``vmoba_compile::flash_block_sparse``): FlexAttention's ``BACKEND="FLASH"`` in a
    small compiled graph of its own, in which the block tables and everything ``mask_mod`` reads
    are graph inputs (every granularity);
  - training at BLOCK granularity (``vmoba_compile::flash_block_train`` and its backward):
    FA4's own block-sparse forward, which returns the log-sum-exp, and its block-sparse backward,
    which reads that log-sum-exp and the forward's output: no forward runs twice.

Why opaque ops: inductor's FLASH lowering (torch 2.11-2.13) hands the CuTe template only
q, k, v, the log-sum-exp and the four block tables as inputs; the buffers ``mask_mod`` reads are
loaded from inside the template without being declared as its reads, so when the caller's graph
computes them (VMoBA's selection does), the scheduler finds no reader, removes them, and codegen
fails (``AssertionError: bufNN`` from ``cutedsl_kernel.py`` ``_add_kernel_input``).

Why the training path calls FA4 itself: FlexAttention's backward needs the forward's autograd
graph, which does not cross an opaque op, so a FlexAttention backward inside an op must run the
forward again (one extra FA4 forward per layer; the TOKEN-granularity training path, forced with
``kernel="flash"``, still does). At BLOCK granularity the mask needs no selection bits inside a
block: a KV block is selected for a whole query block, and only its key slots differ (padding,
masked text keys). FA4's ``mask_mod`` then reads one ``[B, S_pad]`` key-validity table, on the
partial blocks only.

Nothing here imports ``flash_attn``; FlexAttention imports it when it lowers a FLASH call, and
:func:`_fa4` when the training path first runs.
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
from .masks import TABLE_NAMES, MaskPieces, block_mask_from_pieces

__all__ = [
    "KernelChoice",
    "choose_kernel",
    "flash_block_sparse",
    "flash_unavailable",
    "kernel_input",
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
    - FlashAttention-4 (:func:`flash_block_sparse`, an opaque op: inductor hands it views with
      their offsets): contiguous tensors, the layout its GPU tests ran with.

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
        config.kernel.value, config.granularity.value, partition.value, config.block_size,
        device.type, device.index, _DTYPE_NAMES.get(dtype, "other"), head_dim, head_dim_v,
        backward, seq_len, capability,
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


# ---------------------------------------------------------------------------------------------
# the training path at BLOCK granularity: FA4's block-sparse forward and backward, called directly


@functools.cache
def _fa4() -> types.SimpleNamespace:
    """FA4's forward, backward, block tables and VMoBA's ``mask_mod`` (imported on first use)."""
    import cutlass  # type: ignore[import-not-found]
    import cutlass.cute as cute  # type: ignore[import-not-found]
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # type: ignore[import-not-found]
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd  # type: ignore[import-not-found]

    @cute.jit
    def index_of(value: cute.TensorSSA, dtype: str) -> cute.Numeric:
        # A position arrives as a one-element SSA value; a tensor is indexed with a scalar.
        frag = cute.make_rmem_tensor(1, dtype)
        frag.store(value)
        return frag[0]

    @cute.jit
    def key_valid_mask_mod(b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
        # Evaluated on partial blocks only: the block tables carry the selection.
        key_valid = aux_tensors[0]
        ok = cute.make_rmem_tensor(1, cutlass.Boolean)
        ok[0] = key_valid[index_of(b_idx, cutlass.Int32), index_of(kv_idx, cutlass.Int32)]
        return ok.load()

    return types.SimpleNamespace(
        fwd=_flash_attn_fwd, bwd=_flash_attn_bwd, tables=BlockSparseTensorsTorch,
        mask_mod=key_valid_mask_mod,
    )  # fmt: skip


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, D]`` as FA4's ``[B, S, H, D]`` view (no copy)."""
    return x.transpose(1, 2)


@torch.library.custom_op("vmoba_compile::flash_block_train", mutates_args=())
def _train_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tables: list[torch.Tensor],
    key_valid: torch.Tensor,
    block_size: int,
    scale: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, s, _ = q.shape
    if backend == "DEFAULT":
        return _reference_forward(q, k, v, tables[:4], key_valid, block_size, scale)
    out = q.new_empty(b, h, s, v.shape[-1])
    lse = q.new_empty(b, h, s, dtype=torch.float32)
    fa = _fa4()
    fa.fwd(
        _bhsd(q), _bhsd(k), _bhsd(v),
        softmax_scale=scale,
        return_lse=True,
        mask_mod=fa.mask_mod,
        block_sparse_tensors=fa.tables(*tables[:4], block_size=(block_size, block_size)),
        aux_tensors=[key_valid],
        out=_bhsd(out),
        lse=lse,
    )  # fmt: skip
    return out, lse


@_train_forward.register_fake
def _(q, k, v, tables, key_valid, block_size, scale, backend):
    b, h, s, _ = q.shape
    return q.new_empty(b, h, s, v.shape[-1]), q.new_empty(b, h, s, dtype=torch.float32)


@torch.library.custom_op("vmoba_compile::flash_block_train_backward", mutates_args=())
def _train_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    tables: list[torch.Tensor],
    key_valid: torch.Tensor,
    block_size: int,
    scale: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "DEFAULT":
        return _reference_backward(q, k, v, out, lse, grad_out, tables[4:], key_valid,
                                   block_size, scale)  # fmt: skip
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    fa = _fa4()
    fa.bwd(
        _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), _bhsd(grad_out), lse,
        softmax_scale=scale,
        mask_mod=fa.mask_mod,
        aux_tensors=[key_valid],
        dq=_bhsd(dq), dk=_bhsd(dk), dv=_bhsd(dv),
        block_sparse_tensors=fa.tables(*tables[4:], block_size=(block_size, block_size)),
        deterministic=torch.are_deterministic_algorithms_enabled()
        and not torch.is_deterministic_algorithms_warn_only_enabled(),
    )  # fmt: skip
    return dq, dk, dv


@_train_backward.register_fake
def _(q, k, v, out, lse, grad_out, tables, key_valid, block_size, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _train_setup_context(ctx, inputs, output):
    q, k, v, tables, key_valid, *static = inputs
    ctx.static = static
    ctx.n_tables = len(tables)
    ctx.save_for_backward(q, k, v, output[0], output[1], key_valid, *tables)
    ctx.mark_non_differentiable(output[1])


def _train_backward_rule(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_valid, *tables = ctx.saved_tensors
    dq, dk, dv = _train_backward(q, k, v, out, lse, grad_out.contiguous(), tables, key_valid,
                                 *ctx.static)  # fmt: skip
    return dq, dk, dv, [None] * ctx.n_tables, None, None, None, None


_train_forward.register_autograd(_train_backward_rule, setup_context=_train_setup_context)


# A stand-in for FA4 with the same contract, in plain torch (CPU tests of the ops' plumbing and
# of the claim that the block tables plus the key-validity table are VMoBA's whole mask).


def _reference_mask(
    tables: list[torch.Tensor], key_valid: torch.Tensor, block_size: int, transpose: bool
) -> torch.Tensor:
    """``[B, H, S, S]`` bool from one side's four block tables (counts, indices, full counts,
    full indices; the query side's when ``transpose``)."""
    num, idx, full_num, full_idx = tables
    n = idx.shape[-1]
    blocks = torch.zeros(*num.shape, n, dtype=torch.int32, device=num.device)
    for cnt, ind in ((num, idx), (full_num, full_idx)):
        live = torch.arange(ind.shape[-1], device=ind.device) < cnt[..., None]
        blocks.scatter_add_(-1, ind.long(), live.to(torch.int32))
    allowed = blocks > 0
    if transpose:
        allowed = allowed.transpose(-1, -2)
    allowed = allowed.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)
    return allowed & key_valid[:, None, None, :]


def _reference_scores(q, k, allowed, scale):
    groups = q.shape[1] // k.shape[1]
    kf = k.double().repeat_interleave(groups, 1)
    scores = q.double() @ kf.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    return scores.masked_fill(~allowed, float("-inf")), kf, groups


def _reference_forward(q, k, v, tables, key_valid, block_size, scale):
    allowed = _reference_mask(tables, key_valid, block_size, transpose=False)
    scores, _, groups = _reference_scores(q, k, allowed, scale)
    lse = torch.logsumexp(scores, -1)
    p = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows with no key: 0
    out = p @ v.double().repeat_interleave(groups, 1)
    return out.to(q.dtype), lse.float()


def _reference_backward(q, k, v, out, lse, grad_out, q_tables, key_valid, block_size, scale):
    allowed = _reference_mask(q_tables, key_valid, block_size, transpose=True)
    scores, kf, groups = _reference_scores(q, k, allowed, scale)
    sm = q.shape[-1] ** -0.5 if scale is None else scale
    p = torch.exp(scores - lse.double()[..., None]).nan_to_num(0.0)
    do, vf = grad_out.double(), v.double().repeat_interleave(groups, 1)
    dv = p.transpose(-1, -2) @ do
    dp = do @ vf.transpose(-1, -2)
    ds = p * (dp - (do * out.double()).sum(-1, keepdim=True))
    dq = ds @ kf * sm
    dk = ds.transpose(-1, -2) @ q.double() * sm

    def per_kv_head(x):
        b, _, s, d = x.shape
        return x.reshape(b, k.shape[1], groups, s, d).sum(2)

    return dq.to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype)


def flash_block_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pieces: MaskPieces,
    scale: float | None,
    *,
    slot_real: torch.Tensor | None = None,
    backend: str = "FLASH",
) -> torch.Tensor:
    """VMoBA's block-sparse attention on FlashAttention-4, forward and backward.

    Args:
        q: ``[B, H, S_pad, D]`` in padded chunk order.
        k: ``[B, Hkv, S_pad, D]``.
        v: ``[B, Hkv, S_pad, Dv]``.
        pieces: the mask (:func:`~vmoba_compile.masks.mask_pieces`); with a backward, built
            with the query-side tables.
        scale: softmax scale (None: ``1 / sqrt(D)``).
        slot_real: ``[S_pad]`` bool, True where the padded slot holds a real token
            (``PlanIndex.real``); needed by a BLOCK-granularity call with gradients.
        backend: ``"FLASH"``; ``"DEFAULT"`` runs stand-ins with the same contract (the
            inference op: FlexAttention's own kernel choice; the training op: a float64
            reference in plain torch), for CPU tests of the plumbing (there is no FA4 on CPU).

    Returns:
        ``[B, H, S_pad, Dv]``.
    """
    grads = q.requires_grad or k.requires_grad or v.requires_grad
    training = grads and torch.is_grad_enabled()
    if training and len(pieces.tables) != 8:
        raise ValueError(
            "flash_block_sparse with gradients needs the query-side block tables: build the "
            "mask with q_tables=True."
        )
    q, k, v = (kernel_input(x, Kernel.FLASH) for x in (q, k, v))
    scale = None if scale is None else float(scale)
    if training and not pieces.token_level:
        if slot_real is None:
            raise ValueError(
                "flash_block_sparse with gradients at BLOCK granularity needs slot_real "
                "(PlanIndex.real): FA4's mask_mod reads which key slots hold real tokens."
            )
        # The mask's key_ok covers text keys only (video padding is in its selection bits).
        key_valid = slot_real.to(torch.bool).expand(q.shape[0], -1)
        if pieces.key_ok is not None:
            key_valid = key_valid & pieces.key_ok
        tables = [pieces.tables[n] for n in TABLE_NAMES]
        out, _ = _train_forward(
            q, k, v, tables, key_valid.contiguous(), pieces.block_size, scale, backend
        )
        return out
    return _flash_forward(
        q, k, v, pieces.tensors(), len(pieces.word_tables), pieces.key_ok is not None,
        pieces.block_size, pieces.token_level, scale, backend,
    )  # fmt: skip
