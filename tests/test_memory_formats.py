"""vmoba_attention on q, k, v in every memory format a model hands over (CPU, inference).

Fused QKV projections (diffusers' ``fuse_qkv_projections()``), ``[B, S, H, D]`` views,
strided head dims, channels-last-like permutations and broadcast batches must give the result of
the same values made contiguous, and the reference's. Compiled on CPU, FlexAttention's C++
template drops a view's storage offset and misreads permuted views built in the graph
(:func:`vmoba_compile.kernels.kernel_input`), so the compiled cases build the formats inside
the compiled function, on a plan that hands q, k, v to the kernel without a gather.
"""

import pytest
import torch
from conftest import ATOL_F32, max_err
from hypothesis import given, note, settings
from hypothesis import strategies as st
from strategies import MEMORY_FORMATS, kernel_cases, memory_formats

from vmoba_compile import VideoLayout, VMoBAConfig, vmoba_attention, vmoba_reference
from vmoba_compile import attention as attention_module
from vmoba_compile.attention import plan_for


def _qkv(layout, b=2, h=2, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = layout.seq_len
    return tuple(torch.randn(b, n, s, d, generator=g) for n in (h, hkv, hkv))


def _formatted(name, q, k, v):
    """The format's tensors and their contiguous copies (the same values)."""
    fq, fk, fv = MEMORY_FORMATS[name](q, k, v)
    return (fq, fk, fv), tuple(x.contiguous() for x in (fq, fk, fv))


class _FlexSpy:
    """Records the layout of every q, k, v that reaches ``flex_attention`` (eager calls)."""

    def __init__(self):
        self.seen = []

    def __call__(self, q, k, v, **kwargs):
        self.seen.append([(x.is_contiguous(), x.storage_offset(), x.data_ptr()) for x in (q, k, v)])
        return self.flex(q, k, v, **kwargs)

    flex = staticmethod(attention_module.flex_attention)


@settings(max_examples=30)
@given(case=kernel_cases(), fmt=memory_formats(), gqa=st.booleans(), seed=st.integers(0, 99))
def test_eager_every_memory_format_equals_contiguous_and_reference(case, fmt, gqa, seed):
    layout, config, layer = case
    plan = plan_for(layout, config, layer)
    assert not config.keeps_all_chunks(plan.num_chunks), "the case must run the sparse kernel"
    note(f"{layout} {config} identity plan: {plan.is_identity}")
    (q, k, v), contiguous = _formatted(fmt, *_qkv(layout, hkv=1 if gqa else 2, seed=seed))
    kw = dict(layout=layout, config=config, layer_index=layer)
    spy = _FlexSpy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_module, "flex_attention", spy)
        out = vmoba_attention(q, k, v, **kw)
    ref = vmoba_reference(*contiguous, **kw)
    out_c = vmoba_attention(*contiguous, **kw)
    assert max_err(out, out_c) < ATOL_F32, (fmt, max_err(out, out_c), layout, config)
    assert max_err(out, ref) < ATOL_F32, (fmt, max_err(out, ref), layout, config)
    # The kernel got dense, offset-0 inputs, and where the input already was one, that input
    # itself (no copy).
    assert len(spy.seen) == 1
    assert all(c and off == 0 for c, off, _ in spy.seen[0]), (fmt, spy.seen)
    if plan.is_identity:
        kept = [x.data_ptr() for x in (q, k, v) if x.is_contiguous() and x.storage_offset() == 0]
        assert set(kept) <= {ptr for *_, ptr in spy.seen[0]}, (fmt, "a right input was copied")


@settings(max_examples=4)
@given(case=kernel_cases(), fmt=memory_formats(), seed=st.integers(0, 99))
def test_aot_eager_formats_built_in_the_graph_equal_reference(case, fmt, seed):
    """The formats built inside a traced function (AOTAutograd, run op by op)."""
    layout, config, layer = case
    kw = dict(layout=layout, config=config, layer_index=layer)
    q, k, v = _qkv(layout, seed=seed)
    _, contiguous = _formatted(fmt, q, k, v)

    def run(q, k, v):
        return vmoba_attention(*MEMORY_FORMATS[fmt](q, k, v), **kw)

    torch._dynamo.reset()
    out = torch.compile(run, backend="aot_eager", fullgraph=True)(q, k, v)
    ref = vmoba_reference(*contiguous, **kw)
    assert max_err(out, ref) < ATOL_F32, (fmt, max_err(out, ref), layout, config)


@pytest.mark.slow  # ~35 s cold on two cores
@pytest.mark.compiled
def test_inductor_formats_built_in_the_graph_equal_reference():
    """Inductor's CPU flex template on the formats it misreads, each built inside one compiled
    graph, on an identity plan (the inputs reach the kernel as they are). Without
    :func:`~vmoba_compile.kernels.kernel_input` a fused projection's v read q's columns (error
    1.8), a ``[B, S, D, H]`` permutation was misread (2.0) and a transposed view of a computed
    buffer failed to lower. Four formats, not all: each is one more C++ flex kernel to compile
    (~8 s on two cores); the eager and aot_eager tests above cover every format."""
    layout = VideoLayout(4, 4, 4)
    config = VMoBAConfig(schedule=("1d",), chunk_1d=(1,), block_size=16, selection="topk", topk=1)
    assert plan_for(layout, config, 0).is_identity
    kw = dict(layout=layout, config=config, layer_index=0)
    names = ["fused_v", "flat_offsets", "channels_last", "bshd"]
    q, k, v = _qkv(layout)

    def run(q, k, v):
        return [vmoba_attention(*MEMORY_FORMATS[n](q, k, v), **kw) for n in names]

    torch._dynamo.reset()
    outs = torch.compile(run, fullgraph=True)(q, k, v)
    errors = {}
    for name, out in zip(names, outs, strict=True):
        errors[name] = max_err(out, vmoba_reference(*_formatted(name, q, k, v)[1], **kw))
    assert max(errors.values()) < ATOL_F32, errors
