"""``SkipReason``: every dense call names its rule, and every rule's message formats with the
call's details (the report's ``reason`` is that message)."""

from __future__ import annotations

import string
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tiny_models as tm  # noqa: E402
from test_adapters_structural import built as built_structural  # noqa: E402
from test_api import _CHUNKS, TOY_LAYOUT, ToyVideo, toy_inputs  # noqa: E402

from vmoba_compile import AttentionCall, SkipReason, VMoBAConfig, explain  # noqa: E402
from vmoba_compile.parallel import ParallelPlan, _refusal  # noqa: E402
from vmoba_compile.passes import Skip  # noqa: E402
from vmoba_compile.passes.rewrite import CallContext, bind_sdpa  # noqa: E402


def _details(reason: SkipReason) -> list[str]:
    """The template's placeholders: the details a producer must pass."""
    return [f for _, f, _, _ in string.Formatter().parse(reason.value) if f is not None]


@pytest.mark.parametrize("reason", list(SkipReason), ids=lambda r: r.name)
def test_every_reason_formats_with_its_details(reason: SkipReason) -> None:
    fields = _details(reason)
    assert all(f.isidentifier() for f in fields), f"{reason.name}: positional or nested {fields}"
    values = {f: f"<{f}>" for f in fields}
    message = reason.format(**values)
    assert all(v in message for v in values.values()), message
    assert "{" not in message and "}" not in message, message
    assert str(reason) == reason.value
    assert reason.skip(**values) == Skip(reason, message)
    if fields:  # a producer that forgets a detail fails loudly, not with a half message
        with pytest.raises(KeyError):
            reason.format(**dict(list(values.items())[1:]))


def test_reasons_are_distinct() -> None:
    # Two members with one template would silently become aliases of one member.
    assert len(SkipReason.__members__) == len(SkipReason)


def test_attention_call_has_a_skip_exactly_when_dense() -> None:
    with pytest.raises(ValueError, match="skip reason exactly when it is dense"):
        AttentionCall("m", "?", False, "dense for no stated rule")
    with pytest.raises(ValueError, match="skip reason exactly when it is dense"):
        AttentionCall("m", "?", True, "video 1x1x1", 0, "1d", "triton", SkipReason.CAUSAL)
    call = AttentionCall.dense("m", "?", SkipReason.DROPOUT.skip(p=0.5))
    assert call.skip is SkipReason.DROPOUT and call.reason == "attention dropout (dropout_p=0.5)"


def _reports():
    kinds = ["self", "cross", "causal", "float_mask", "dropout", "bool_mask"]
    yield "toy", explain(ToyVideo(kinds), toy_inputs(), layout=TOY_LAYOUT)
    model, args, kwargs = tm.build("wan")  # an adapter: self-attention rewritten, cross dense
    yield "wan", explain(model, args, kwargs)
    model, args, kwargs = built_structural("HunyuanVideo15Transformer3DModel")
    yield "structural", explain(model, args, kwargs)


def test_dense_calls_carry_their_reason_and_rewritten_ones_none() -> None:
    seen: set[SkipReason] = set()
    for name, report in _reports():
        assert report.rewritten or name == "structural", f"{name}: nothing rewritten\n{report}"
        assert report.skipped, f"{name}: nothing dense\n{report}"
        for c in report.rewritten:
            assert c.skip is None, c
        for c in report.skipped:
            assert isinstance(c.skip, SkipReason), c
            # the message is the member's: its text up to the first detail
            assert c.reason.startswith(c.skip.value.split("{")[0]), c
            seen.add(c.skip)
    assert SkipReason.CROSS_ATTENTION in seen and SkipReason.MASK_UNDECLARED in seen, seen


# ------------------------------------------------------------------ context parallel refusals


class WanTransformer3DModel(torch.nn.Module):  # a supported class, by name
    def __init__(self, heads: int = 4) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_attention_heads=heads)


_NATIVE = {"blocks.0.attn1": SimpleNamespace(_attention_backend="native")}


@pytest.mark.parametrize(
    "model, cp, family, degree, processors, want, message",
    [
        (WanTransformer3DModel(), {}, "wan", 1, _NATIVE, None, None),
        (WanTransformer3DModel(), {}, "wan", 2, _NATIVE, None, None),
        (
            WanTransformer3DModel(),
            dict(ring_degree=2),
            "wan",
            1,
            _NATIVE,
            SkipReason.CP_RING,
            "ring attention (ring_degree=2)",
        ),
        (
            WanTransformer3DModel(),
            dict(ulysses_anything=True),
            "wan",
            2,
            _NATIVE,
            SkipReason.CP_ULYSSES_ANYTHING,
            "ulysses_anything=False",
        ),
        (
            WanTransformer3DModel(),
            {},
            "hunyuan_video",
            2,
            _NATIVE,
            SkipReason.CP_JOINT_TEXT,
            "HunyuanVideo joins text and video tokens",
        ),
        (
            torch.nn.Linear(1, 1),
            {},
            None,
            2,
            _NATIVE,
            SkipReason.CP_UNSUPPORTED_MODEL,
            "Linear is not validated under context parallelism (supported: WanTransformer3DModel",
        ),
        (
            WanTransformer3DModel(heads=3),
            {},
            "wan",
            2,
            _NATIVE,
            SkipReason.CP_HEADS,
            "3 attention heads are not divisible by ulysses_degree=2",
        ),
        (
            WanTransformer3DModel(),
            {},
            "wan",
            2,
            {"a": SimpleNamespace(_attention_backend="flash")},
            SkipReason.CP_BACKEND,
            "the attention backend is flash;",
        ),
    ],
    ids=["ulysses_1", "ulysses_2", "ring", "anything", "joint_text", "class", "heads", "backend"],
)
def test_cp_refusals_name_their_rule_and_numbers(
    model, cp, family, degree, processors, want, message
) -> None:
    plan = ParallelPlan(degree=degree, ring_degree=cp.get("ring_degree", 1))
    got = _refusal(model, SimpleNamespace(**cp), family, plan, processors)
    if want is None:
        assert got is None
        return
    assert got is not None and got.reason is want, got
    assert message in got.message and "Fix:" in got.message, got.message
    assert str(got) == got.message


def test_calls_under_a_cp_refusal_carry_its_rule() -> None:
    q = torch.empty(1, 2, TOY_LAYOUT.seq_len, 8)
    values = bind_sdpa((q, q, q), {})
    ctx = CallContext(config=VMoBAConfig(**_CHUNKS), family=None, layer_of={}, layout=TOY_LAYOUT)
    ring = SkipReason.CP_RING.skip(ring_degree=2)
    plan = ParallelPlan(degree=2, ring_degree=2, refusal=ring)
    got = plan._decide(values, values, "blocks.0", ctx, lambda: 0, exchange=False)
    assert got == Skip(SkipReason.CP_RING, f"context parallel: {ring.message}")
    # a call decide itself refuses keeps decide's reason
    causal = bind_sdpa((q, q, q), {"is_causal": True})
    got = plan._decide(causal, causal, "blocks.0", ctx, lambda: 0, exchange=False)
    assert isinstance(got, Skip) and got.reason is SkipReason.CAUSAL
    # a supported setup: a module whose exchange the pass does not run stays dense
    plan = ParallelPlan(degree=2)
    got = plan._decide(values, values, "blocks.0", ctx, lambda: 0, exchange=False)
    assert isinstance(got, Skip) and got.reason is SkipReason.CP_NOT_EXCHANGED
    assert "module blocks.0 is not a video self-attention module" in got.message
    # in one process the same call is rewritten
    got = ParallelPlan(degree=1)._decide(values, values, "blocks.0", ctx, lambda: 0, False)
    assert not isinstance(got, Skip), got


@settings(max_examples=60, deadline=None)
@given(
    extra=st.integers(0, 70),
    declared=st.one_of(st.none(), st.integers(0, 70)),
    position=st.sampled_from(["prefix", "suffix"]),
)
def test_extra_tokens_the_adapter_does_not_account_for_stay_dense(extra, declared, position):
    # A Wan subclass that prepends reference tokens: the adapter knows its self-attention holds
    # video only, so 64 more tokens are unplaced and the call must not guess "suffix".
    from vmoba_compile.adapters.base import VideoGrid
    from vmoba_compile.passes.rewrite import CallContext, decide

    grid = VideoGrid(2, 4, 4, text_position=position, extra_tokens=declared)
    s = grid.video_tokens + extra
    q = torch.zeros(1, 2, s, 8)
    ctx = CallContext(config=VMoBAConfig(), family="wan", layer_of={"attn": 0}, grid=grid)
    args = dict(query=q, key=q, value=q, attn_mask=None, dropout_p=0.0, is_causal=False,
                scale=None, enable_gqa=False)  # fmt: skip
    choice = decide(args, "attn", ctx, lambda: 0)
    if declared is not None and extra != declared:
        assert choice.reason is SkipReason.EXTRA_TOKENS_UNPROVEN, choice
        assert f"plus {extra} tokens" in choice.message and f"expects {declared}" in choice.message
    else:
        assert not hasattr(choice, "reason"), choice
        assert choice.layout.text_tokens == extra and choice.layout.text_position.value == position
