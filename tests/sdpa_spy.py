"""Run a model eagerly with every SDPA call recorded (and optionally replaced), for tests; and
:class:`KernelSpy`, which records the pass's kernel decisions.

Each call is attributed to the innermost module running it (forward pre/post hooks). The patch
of ``torch.nn.functional.scaled_dot_product_attention`` is test-only and scoped to one run.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any
from unittest import mock

import torch


@dataclasses.dataclass
class Call:
    """One recorded ``scaled_dot_product_attention`` call."""

    module: str  # innermost module running when SDPA was called
    query: torch.Tensor  # [B, H, S_q, D], cloned
    key: torch.Tensor  # [B, Hkv, S_kv, D], cloned
    attn_mask: torch.Tensor | None

    @property
    def query_len(self) -> int:
        return self.query.shape[-2]

    @property
    def key_len(self) -> int:
        return self.key.shape[-2]


def _sdpa_signature(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):  # pragma: no cover - signature only
    pass


SDPA_SIG = inspect.signature(_sdpa_signature)

# (module, bound arguments) -> replacement output, or None to run the real SDPA
Replace = Callable[[str, dict[str, Any]], "torch.Tensor | None"]


def run_with_sdpa(
    model: torch.nn.Module, args: tuple, kwargs: dict, replace: Replace | None = None
) -> tuple[Any, list[Call]]:
    """``model(*args, **kwargs)`` with SDPA recorded; ``replace`` may compute a call itself."""
    stack: list[str] = []

    def enter(name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            stack.append(name)

        return hook

    def leave(module: torch.nn.Module, args: tuple, output: object) -> None:
        stack.pop()  # a forward hook that returns a value would replace the output

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    calls: list[Call] = []
    real = torch.nn.functional.scaled_dot_product_attention

    busy = []  # non-empty while ``replace`` runs: its own SDPA calls go to the real one

    def spy(*a: Any, **kw: Any) -> torch.Tensor:
        if busy:
            return real(*a, **kw)
        bound = SDPA_SIG.bind(*a, **kw)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        calls.append(
            Call(
                module=stack[-1],
                query=arguments["query"].detach().clone(),
                key=arguments["key"].detach().clone(),
                attn_mask=arguments["attn_mask"],
            )
        )
        out = None
        if replace is not None:
            busy.append(1)
            try:
                out = replace(stack[-1], arguments)
            finally:
                busy.pop()
        return real(*a, **kw) if out is None else out

    try:
        with mock.patch("torch.nn.functional.scaled_dot_product_attention", spy):
            out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return out, calls


def record_sdpa(model: torch.nn.Module, args: tuple, kwargs: dict) -> list[Call]:
    """Run ``model(*args, **kwargs)`` without grad and record every SDPA call."""
    with torch.no_grad():
        return run_with_sdpa(model, args, kwargs)[1]


class KernelSpy:
    """Records the sequence length of each kernel decision the pass makes (``decided``) and
    counts the decisions the op makes itself (``op_decisions``: 0 when the pass's decision is
    carried to the op)."""

    def __init__(self) -> None:
        from vmoba_compile import attention
        from vmoba_compile.passes import rewrite

        self.decided: list[int | None] = []
        self.op_decisions = 0
        decide_original, op_original = rewrite.kernel_for, attention.kernel_for

        def decide(*args: Any, **kwargs: Any) -> Any:
            self.decided.append(kwargs.get("seq_len"))
            return decide_original(*args, **kwargs)

        def op(*args: Any, **kwargs: Any) -> Any:
            self.op_decisions += 1
            return op_original(*args, **kwargs)

        self._patches = [
            mock.patch.object(rewrite, "kernel_for", decide),
            mock.patch.object(attention, "kernel_for", op),
        ]

    def __enter__(self) -> KernelSpy:
        for p in self._patches:
            p.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in self._patches:
            p.__exit__(*exc)
