"""The FlashAttention-4 path of VMoBA's block-sparse attention.

FlexAttention's Triton template is traced into the caller's graph (every device and dtype; the
mask is built in the same graph). **FlashAttention-4** (``flash_attn.cute``, CuTe DSL; Hopper and
newer; chosen by :func:`~vmoba_compile.kernels.choice.choose_kernel`) runs behind opaque custom
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

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import flex_attention

from .._compat import autograd_inside_op
from ..config import Kernel
from ..masks import TABLE_NAMES, MaskPieces, block_mask_from_pieces
from .choice import kernel_input

__all__ = ["flash_block_sparse"]


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
