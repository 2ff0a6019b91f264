"""The kernel choice (FlashAttention-4 or Triton), its report field, and the FA4 path's plumbing.

FA4 cannot run on CPU: these tests check the choice logic, the fallback when FA4 is missing,
the import isolation and the custom op's mask plumbing (run with FlexAttention's own CPU kernel
inside the op); the FA4 numerics are GPU tests (tests/test_attention_gpu.py).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ATOL_F32, max_err

from vmoba_compile import SkipReason, VideoLayout, VMoBAConfig, optimize, vmoba_attention
from vmoba_compile import kernels as K
from vmoba_compile._compat import autograd_inside_op
from vmoba_compile.attention import permute, plan_blocks, plan_for, unpermute
from vmoba_compile.config import Kernel, Partition
from vmoba_compile.kernels import choice, flash
from vmoba_compile.masks import TABLE_NAMES, MaskPieces, block_mask_from_pieces, mask_pieces
from vmoba_compile.reference import vmoba_reference

H100 = (9, 0)


def choose(config=None, partition="1d", *, device="cuda", dtype=torch.bfloat16, d=128, dv=None,
           backward=False, seq_len=None, capability=H100):  # fmt: skip
    return K.choose_kernel(
        config or VMoBAConfig(),
        Partition(partition),
        device=torch.device(device),
        dtype=dtype,
        head_dim=d,
        head_dim_v=d if dv is None else dv,
        backward=backward,
        seq_len=seq_len,
        capability=capability,
    )


@pytest.fixture
def fa4_installed(monkeypatch):
    """As if flash_attn.cute and the CuTe DSL were installed (the choice reads only this)."""
    monkeypatch.setattr(choice, "flash_unavailable", lambda: None)


def test_auto_uses_fa4_where_it_can_run(fa4_installed) -> None:
    got = choose()
    assert got.kernel is Kernel.FLASH and got.possible, got
    for backward in (False, True):
        assert choose(VMoBAConfig(kernel="flash"), backward=backward).kernel is Kernel.FLASH
    assert choose(dtype=torch.float16, d=64, capability=(10, 0)).kernel is Kernel.FLASH
    # training calls from FLASH_TRAINING_MIN_TOKENS tokens, forward calls from
    # FLASH_INFERENCE_MIN_TOKENS (or of unknown length)
    for backward, least in (
        (True, K.FLASH_TRAINING_MIN_TOKENS),
        (False, K.FLASH_INFERENCE_MIN_TOKENS),
    ):
        for seq_len in (None, least, 55296):
            got = choose(backward=backward, seq_len=seq_len)
            assert got.kernel is Kernel.FLASH, (backward, seq_len, got)
        assert choose(backward=backward, seq_len=least - 1).kernel is Kernel.TRITON


@pytest.mark.parametrize(
    "kwargs, why",
    [
        (dict(device="cpu", capability=None), "runs on CUDA GPUs; this call is on cpu"),
        (dict(capability=(8, 0)), "this one is 8.0"),
        (dict(capability=(12, 0)), "this one is 12.0"),
        (dict(dtype=torch.float32), "bf16 or fp16; this call is float32"),
        (dict(d=12), "head dim is 12"),
        (dict(d=256, capability=(10, 0)), "takes head dims 8-128"),
        (dict(dv=264), "value head dim is 264"),
        (dict(d=16, backward=True), "need head dims of at least 32; this call's is 16"),
        (dict(config=VMoBAConfig(block_size=64)), "block_size=128; this config has 64"),
        (dict(backward=True, seq_len=8192), "training call of 8192 tokens: below 16384 Triton"),
        (dict(seq_len=16384), "inference call of 16384 tokens: below 32768 Triton is faster"),
        (dict(config=VMoBAConfig(granularity="token"), seq_len=16384), "inference call of 16384"),
        (dict(config=VMoBAConfig(granularity="token"), backward=True), "TOKEN granularity back"),
        (dict(config=VMoBAConfig(granularity="token"), partition="2d"), "2d forward: Triton"),
        (dict(config=VMoBAConfig(kernel="triton")), "kernel='triton'"),
    ],
)
def test_auto_falls_back_to_triton_with_the_reason(fa4_installed, kwargs, why) -> None:
    got = choose(**kwargs)
    assert got.kernel is Kernel.TRITON and got.possible and why in got.reason, got


def test_flash_forward_takes_head_dim_16_and_its_backward_refuses_it(fa4_installed) -> None:
    assert choose(VMoBAConfig(kernel="flash"), d=16).kernel is Kernel.FLASH
    got = choose(VMoBAConfig(kernel="flash"), d=16, backward=True)
    assert got.kernel is Kernel.TRITON and not got.possible and "at head dim 16" in got.reason
    assert choose(VMoBAConfig(kernel="flash"), d=32, backward=True).kernel is Kernel.FLASH
    assert choose(VMoBAConfig(kernel="flash"), d=16, backward=True, capability=(10, 0)).possible


def test_token_granularity_1d_forward_runs_fa4(fa4_installed) -> None:
    got = choose(VMoBAConfig(granularity="token"), "1d")
    assert got.kernel is Kernel.FLASH, got


def test_forced_flash_that_cannot_run_says_why(fa4_installed) -> None:
    got = choose(VMoBAConfig(kernel="flash"), dtype=torch.float32)
    assert (
        not got.possible and "kernel='flash' cannot run" in got.reason and "float32" in got.reason
    )


def test_without_fa4_every_choice_is_triton_with_the_install_hint() -> None:
    missing = K.flash_unavailable()
    if missing is None:
        pytest.skip("FlashAttention-4 is installed here")
    assert "vmoba_compile[flash]" in missing
    got = choose()
    assert got.kernel is Kernel.TRITON and got.possible and got.reason == missing
    forced = choose(VMoBAConfig(kernel="flash"))
    assert not forced.possible and missing in forced.reason


def test_a_cpu_call_is_told_the_device_not_the_install_hint(monkeypatch) -> None:
    # FA4 could not run a CPU call even if installed: the install hint would send the user to
    # install something that changes nothing.
    monkeypatch.setattr(choice, "flash_unavailable", lambda: "FA4 is not installed: pip install x")
    for config in (VMoBAConfig(), VMoBAConfig(kernel="flash")):
        got = choose(config, device="cpu", capability=None)
        assert got.kernel is Kernel.TRITON, got
        assert "runs on CUDA GPUs; this call is on cpu" in got.reason, got
        assert "not installed" not in got.reason, got
    assert "not installed" in choose().reason  # on CUDA the missing install is the obstacle


def test_import_does_not_import_flash_attn_or_the_cute_dsl() -> None:
    code = (
        "import sys, vmoba_compile as vc; vc.kernels.flash_unavailable(); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('flash_attn', 'cutlass')]; "
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_bad_kernel_value_is_refused() -> None:
    with pytest.raises(ValueError, match="VMoBAConfig.kernel must be one of 'auto', 'flash'"):
        VMoBAConfig(kernel="cudnn")


def test_optimize_with_kernel_flash_and_no_fa4_raises_with_the_fix() -> None:
    if K.flash_unavailable() is None:
        pytest.skip("FlashAttention-4 is installed here")
    with pytest.raises(RuntimeError, match=r"kernel='flash'.*vmoba_compile\[flash\]"):
        optimize(torch.nn.Linear(2, 2), VMoBAConfig(kernel="flash"), layout=VideoLayout(1, 2, 2))


LAYOUT = VideoLayout(4, 4, 4, text_tokens=5, text_position="suffix")
CONFIG = VMoBAConfig(block_size=16, chunk_1d=(1,), chunk_2d=(2, 2), chunk_3d=(1, 2, 2), topk=2,
                     selection="topk")  # fmt: skip


class OneAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 24)])

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.blocks[0](x).reshape(b, s, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, 8)


def test_report_names_each_calls_kernel_and_why() -> None:
    opt = optimize(OneAttention(), CONFIG, layout=LAYOUT, lowering="aot_eager", regional=False)
    with torch.no_grad():
        opt(torch.randn(1, LAYOUT.seq_len, 8))
    (call,) = opt.report.calls
    assert call.rewritten and call.kernel == "triton", call
    assert "runs on CUDA GPUs; this call is on cpu" in call.reason, call.reason
    assert "not installed" not in call.reason, call.reason
    assert " triton " in str(opt.report)
    keep = optimize(OneAttention(), VMoBAConfig(threshold=1.0, block_size=16), layout=LAYOUT,
                    lowering="aot_eager", regional=False)  # fmt: skip
    with torch.no_grad():
        keep(torch.randn(1, LAYOUT.seq_len, 8))
    assert keep.report.calls[0].kernel == "sdpa"


def test_forced_flash_call_that_cannot_run_is_left_dense_in_the_report(monkeypatch) -> None:
    # FA4 installed, but this is a CPU call
    monkeypatch.setattr(choice, "flash_unavailable", lambda: None)
    config = dataclasses.replace(CONFIG, kernel="flash")
    model = OneAttention()
    opt = optimize(model, config, layout=LAYOUT, lowering="aot_eager", regional=False)
    x = torch.randn(1, LAYOUT.seq_len, 8)
    with torch.no_grad():
        out = opt(x)
        dense = model(x)
    (call,) = opt.report.calls
    assert not call.rewritten and call.skip is SkipReason.FLASH_CANNOT_RUN, call
    # what stands in the way, and the fix
    assert "on cpu" in call.reason and "VMoBAConfig(kernel='auto')" in call.reason, call
    assert max_err(out, dense) < ATOL_F32  # left dense means dense
    with pytest.raises(RuntimeError, match="kernel='flash' cannot run.*on cpu"):
        q = torch.randn(1, 2, LAYOUT.seq_len, 4)
        vmoba_attention(q, q, q, layout=LAYOUT, config=opt.config_vmoba, layer_index=0)


def _masked_inputs(layer: int, backward: bool):
    g = torch.Generator().manual_seed(layer)
    q = torch.randn(2, 4, LAYOUT.seq_len, 8, generator=g)
    k, v = (torch.randn(2, 2, LAYOUT.seq_len, 8, generator=g) for _ in range(2))
    plan = plan_for(LAYOUT, CONFIG, layer)
    idx = plan.index(q.device)
    qp, kp, vp = (permute(x, plan, idx) for x in (q, k, v))
    sel = plan_blocks(qp, kp, plan, CONFIG, idx=idx).sel
    tkm = torch.tensor([[True, True, False, True, False], [True] * 5])
    pieces = mask_pieces(plan, idx, sel, token_level=False, text_key_mask=tkm,
                         q_tables=backward)  # fmt: skip
    return (q, k, v), (qp, kp, vp), plan, idx, pieces, tkm


@pytest.mark.parametrize("backward", [False, True])
def test_mask_pieces_round_trip_through_the_ops_flat_list(backward) -> None:
    _, _, _, _, pieces, _ = _masked_inputs(1, backward)
    flat = pieces.tensors()
    back = MaskPieces.from_tensors(
        flat, len(pieces.word_tables), True, pieces.block_size, pieces.seq_len, False
    )
    assert back.tables == pieces.tables and len(back.tables) == (8 if backward else 4)
    assert all(a is b for a, b in zip(back.tensors(), flat, strict=True))
    assert torch.equal(block_mask_from_pieces(back).to_dense(),
                       block_mask_from_pieces(pieces).to_dense())  # fmt: skip


@pytest.mark.compiled
def test_the_fa4_ops_plumbing_equals_the_in_graph_mask_on_cpu_flex() -> None:
    """The op rebuilds the mask from its flat tensor list and runs FlexAttention in a compiled
    graph of its own; with FlexAttention's CPU kernel inside it must equal the same mask run as
    the op runs it (key padding, GQA, B = 2, every partition)."""
    for layer in range(3):
        (q, k, v), (qp, kp, vp), plan, idx, pieces, tkm = _masked_inputs(layer, False)
        out = unpermute(K.flash_block_sparse(qp, kp, vp, pieces, None, backend="DEFAULT"), plan,
                        idx)  # fmt: skip
        ref = vmoba_attention(q, k, v, layout=LAYOUT, config=CONFIG, layer_index=layer,
                              text_key_mask=tkm)  # fmt: skip
        assert max_err(out, ref) < ATOL_F32, (layer, max_err(out, ref))
        assert max_err(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True)) > 1e-2


def test_fake_kernels_give_the_real_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, (qp, kp, vp), _, _, pieces, _ = _masked_inputs(0, True)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        q, k = mode.from_tensor(qp), mode.from_tensor(kp)
        v = mode.from_tensor(torch.empty(*vp.shape[:-1], 16))
        flat = [mode.from_tensor(t) for t in pieces.tensors()]
        static = (len(pieces.word_tables), True, 16, False, None, "FLASH")
        out = torch.ops.vmoba_compile.flash_block_sparse(q, k, v, flat, *static)
        dq, dk, dv = torch.ops.vmoba_compile.flash_block_sparse_backward(q, k, v, out, flat,
                                                                         *static)  # fmt: skip
    assert tuple(out.shape) == (*qp.shape[:-1], 16) and out.dtype == qp.dtype
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


@torch.library.custom_op("vmoba_compile_test::sin_backward", mutates_args=())
def _sin_backward(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    leaf = x.detach().requires_grad_()
    with autograd_inside_op(), torch.enable_grad():
        return torch.autograd.grad(leaf.sin(), leaf, g)[0]


@torch.library.custom_op("vmoba_compile_test::sin", mutates_args=())
def _sin(x: torch.Tensor) -> torch.Tensor:
    return x.sin()


_sin.register_autograd(
    lambda ctx, g: _sin_backward(ctx.saved_tensors[0], g),
    setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]),
)


def test_an_ops_kernel_can_differentiate_a_recomputation() -> None:
    """What the FA4 op's backward does (recompute, then autograd.grad inside the op's kernel):
    torch.library runs kernels below autograd, so without autograd_inside_op the recomputed
    output has no grad_fn (seen on the H200 first)."""
    x = torch.randn(5, requires_grad=True)
    _sin(x).sum().backward()
    assert torch.allclose(x.grad, x.detach().cos())


def _training_inputs(layer: int, text_key_mask: bool):
    (q, k, v), _, plan, idx, _, tkm = _masked_inputs(layer, True)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    return (q, k, v), plan, idx, (tkm if text_key_mask else None)


@pytest.mark.parametrize("text_key_mask", [True, False], ids=["key-mask", "no-key-mask"])
def test_the_training_ops_block_tables_and_key_validity_are_the_whole_mask(
    text_key_mask, monkeypatch
) -> None:
    """The BLOCK-granularity training op gives FA4 only the block tables and a [B, S_pad]
    key-validity table (no selection bits): with a plain-torch stand-in for FA4 behind the same
    op, its output and dq/dk/dv equal the float64 reference (every partition, GQA, B = 2,
    text suffix, padding, masked text keys), and the backward runs no forward."""
    calls = {"forward": 0}
    forward = flash._reference_forward

    def counting(*args):
        calls["forward"] += 1
        return forward(*args)

    monkeypatch.setattr(flash, "_reference_forward", counting)
    for layer in range(3):
        (q, k, v), plan, idx, tkm = _training_inputs(layer, text_key_mask)
        qp, kp, vp = (permute(x, plan, idx) for x in (q, k, v))
        sel = plan_blocks(qp, kp, plan, CONFIG, idx=idx).sel
        pieces = mask_pieces(plan, idx, sel, token_level=False, text_key_mask=tkm)
        out = K.flash_block_sparse(qp, kp, vp, pieces, None, slot_real=idx.real,
                                   backend="DEFAULT")  # fmt: skip
        out = unpermute(out, plan, idx)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
        assert calls["forward"] == layer + 1, calls  # one forward per call, none in backward

        ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
        ref = vmoba_reference(*ref_in, layout=LAYOUT, config=CONFIG, layer_index=layer,
                              text_key_mask=tkm)  # fmt: skip
        ref_grads = torch.autograd.grad(ref, ref_in, g.double())
        assert max_err(out, ref) < ATOL_F32, (layer, max_err(out, ref))
        for name, got, want in zip("qkv", grads, ref_grads, strict=True):
            assert max_err(got, want) < ATOL_F32, (layer, name, max_err(got, want))
        assert max_err(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True)) > 1e-2


def test_the_training_op_needs_slot_real() -> None:
    (q, k, v), plan, idx, _ = _training_inputs(0, False)
    qp, kp, vp = (permute(x, plan, idx) for x in (q, k, v))
    pieces = mask_pieces(plan, idx, plan_blocks(qp, kp, plan, CONFIG, idx=idx).sel,
                         token_level=False)  # fmt: skip
    with pytest.raises(ValueError, match="needs slot_real"):
        K.flash_block_sparse(qp, kp, vp, pieces, None, backend="DEFAULT")


def test_the_training_ops_fake_kernels_give_the_real_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, (qp, kp, vp), _, _, pieces, _ = _masked_inputs(0, True)
    tables = [pieces.tables[n] for n in TABLE_NAMES]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        q, k = mode.from_tensor(qp), mode.from_tensor(kp)
        v = mode.from_tensor(torch.empty(*vp.shape[:-1], 16))
        flat = [mode.from_tensor(t) for t in tables]
        key_valid = mode.from_tensor(pieces.key_ok)
        out, lse = torch.ops.vmoba_compile.flash_block_train(q, k, v, flat, key_valid, 16, None,
                                                             "FLASH")  # fmt: skip
        dq, dk, dv = torch.ops.vmoba_compile.flash_block_train_backward(
            q, k, v, out, lse, out, flat, key_valid, 16, None, "FLASH"
        )
    assert tuple(out.shape) == (*qp.shape[:-1], 16) and out.dtype == qp.dtype
    assert tuple(lse.shape) == tuple(qp.shape[:-1]) and lse.dtype == torch.float32
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


@pytest.mark.compiled
def test_the_training_ops_trace_into_a_compiled_graph() -> None:
    """Under torch.compile (AOTAutograd; the model path) the training op and its backward are
    opaque nodes with fake kernels: the compiled gradients equal the eager ones."""
    (q, k, v), plan, idx, tkm = _training_inputs(1, True)

    def attend(q, k, v):
        qp, kp, vp = (permute(x, plan, idx) for x in (q, k, v))
        sel = plan_blocks(qp, kp, plan, CONFIG, idx=idx).sel
        pieces = mask_pieces(plan, idx, sel, token_level=False, text_key_mask=tkm)
        out = K.flash_block_sparse(qp, kp, vp, pieces, None, slot_real=idx.real,
                                   backend="DEFAULT")  # fmt: skip
        return unpermute(out, plan, idx)

    eager = torch.autograd.grad(attend(q, k, v).square().sum(), (q, k, v))
    compiled_fn = torch.compile(attend, backend="aot_eager", fullgraph=True)
    compiled = torch.autograd.grad(compiled_fn(q, k, v).square().sum(), (q, k, v))
    for got, want in zip(compiled, eager, strict=True):
        assert max_err(got, want) < ATOL_F32
