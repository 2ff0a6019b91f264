"""The compile options of :func:`~vmoba_compile.optimize`, checked once into a frozen
:class:`CompileOptions`, and the inductor options every compile starts from."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch

from .passes import LOWERINGS, PROGRAM_ORDER_PASS, VMoBABackend

__all__ = [
    "RECOMPILE_LIMIT",
    "CompileOptions",
    "memory_inductor_defaults",
    "safe_inductor_defaults",
]

_COMPILE_KEYS = ("fullgraph", "mode", "options", "lowering", "regional", "recompile_limit")

#: Compiled versions each of the model's compiled regions may hold (``torch.compile``'s own
#: ``recompile_limit``, scoped to them): a version per resolution, dense-layer set and value of
#: a Python constant the graph reads; a LoRA strength sweep (``attention_kwargs={"scale": s}``)
#: compiles one per strength, and Dynamo's default of 8 would run the rest eagerly, dense.
RECOMPILE_LIMIT = 64
_COMPILE_HAS_LIMIT = "recompile_limit" in inspect.signature(torch.compile).parameters


def safe_inductor_defaults() -> dict[str, Any]:
    """Inductor options every compile of :func:`optimize` starts from (``options=`` overrides).

    ``triton.mix_order_reduction=False``: inductor's mix-order reductions (torch 2.10 and later,
    on by default) leave the gradient of a chunked modulation table unwritten (pytorch/pytorch
    issue 193061: the ``.chunk(6)`` of Wan's and many DiTs' ``scale_shift_table``), so
    ``scale_shift_table`` and the time embedder get stale memory as gradients. On the H100 at
    55,296 tokens that memory held NaN for the VMoBA model (docs/design.md)
    and finite garbage for the dense one. Off, the gradients match the uncompiled model's.
    """
    triton = getattr(torch._inductor.config, "triton", None)
    if triton is not None and hasattr(triton, "mix_order_reduction"):
        return {"triton.mix_order_reduction": False}
    return {}


def memory_inductor_defaults() -> dict[str, Any]:
    """Inductor options :func:`optimize` adds after :func:`safe_inductor_defaults`: the scheduler
    pass :func:`~vmoba_compile.passes.scheduling.keep_program_order` (as
    :data:`~vmoba_compile.passes.scheduling.PROGRAM_ORDER_PASS`, which inductor's FX graph cache
    accepts), which keeps the kernels in program order after fusion. Without it the VMoBA
    training backward with activation checkpointing kept several layers' recomputed activations
    alive at once (8 layers at 55,296 tokens: 26.9 GiB against dense's 10.1; 30 layers out of
    memory). ``options={"_post_fusion_custom_pass": None}`` turns it off. Empty where inductor
    has no such hook.
    """
    if hasattr(torch._inductor.config, "_post_fusion_custom_pass"):
        return {"_post_fusion_custom_pass": PROGRAM_ORDER_PASS}
    return {}


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """How an optimized model compiles: :func:`~vmoba_compile.optimize`'s compile keywords,
    checked (build it with :meth:`check`).

    Attributes:
        fullgraph: as in ``torch.compile``.
        inductor_options: the inductor options of every compile (:func:`safe_inductor_defaults`,
            :func:`memory_inductor_defaults`, then ``mode=``'s options, then ``options=``).
        lowering: ``"inductor"`` or ``"aot_eager"``.
        regional: None (automatic), True or False (see :func:`~vmoba_compile.optimize`).
        recompile_limit: ``torch.compile``'s ``recompile_limit`` of each compiled region; None
            where ``torch.compile`` has no such argument.
    """

    fullgraph: bool = False
    inductor_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    lowering: str = "inductor"
    regional: bool | None = None
    recompile_limit: int | None = RECOMPILE_LIMIT

    @classmethod
    def check(cls, **options: Any) -> CompileOptions:
        """The options from :func:`~vmoba_compile.optimize`'s keywords (``fullgraph``,
        ``mode``, ``options``, ``lowering``, ``regional``, ``recompile_limit``), validated.

        Raises:
            ValueError: ``dynamic=``, an unknown lowering, a bad ``recompile_limit``.
            TypeError: an unknown keyword, ``options`` not a dict, ``regional`` not a bool.
        """
        unknown = sorted(set(options) - set(_COMPILE_KEYS))
        if "dynamic" in unknown:
            raise ValueError(
                "dynamic= is not supported: VMoBA fixes each call's block partition at compile "
                "time, so optimize compiles with dynamic=False (one compile per resolution)."
            )
        if unknown:
            raise TypeError(
                f"unknown compile options {unknown}; optimize accepts the keywords "
                f"{list(_COMPILE_KEYS)} (fullgraph, mode and options=<inductor options> as in "
                f"torch.compile; it always compiles with its own backend)."
            )
        mode, extra = options.get("mode"), options.get("options") or {}
        if not isinstance(extra, dict):
            raise TypeError(
                f"options must be a dict of inductor options; got {type(extra).__name__}."
            )
        patches: dict[str, Any] = {**safe_inductor_defaults(), **memory_inductor_defaults()}
        if mode is not None:
            patches.update(torch._inductor.list_mode_options(mode))
        patches.update(extra)
        lowering = options.get("lowering", "inductor")
        if lowering not in LOWERINGS:
            raise ValueError(f"lowering must be one of {LOWERINGS}; got {lowering!r}.")
        fullgraph = bool(options.get("fullgraph", False))
        regional = options.get("regional")
        if regional is not None and not isinstance(regional, bool):
            raise TypeError(f"regional must be None (automatic), True or False; got {regional!r}.")
        limit = options.get("recompile_limit", RECOMPILE_LIMIT)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"recompile_limit must be a positive int; got {limit!r}.")
        return cls(
            fullgraph=fullgraph,
            inductor_options=patches,
            lowering=lowering,
            regional=regional,
            recompile_limit=limit if _COMPILE_HAS_LIMIT else None,
        )

    def compile(self, fn: Any, backend: VMoBABackend | None) -> Any:
        """``fn`` compiled with these options: through ``backend``, or without one dense
        (inductor with these options, or ``aot_eager`` under that lowering)."""
        kw: dict[str, Any] = dict(dynamic=False, fullgraph=self.fullgraph)
        if self.recompile_limit is not None:  # where torch.compile takes it (torch 2.13 does)
            kw["recompile_limit"] = self.recompile_limit
        if backend is None and self.lowering == "inductor":
            return torch.compile(fn, options=self.inductor_options or None, **kw)
        return torch.compile(fn, backend=backend or "aot_eager", **kw)

    def backend(self, on_graph: Any, on_run: Any = None) -> VMoBABackend:
        """A VMoBA backend that lowers with these options."""
        return VMoBABackend(on_graph, self.inductor_options, lowering=self.lowering, on_run=on_run)
