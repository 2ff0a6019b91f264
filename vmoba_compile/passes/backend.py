"""The ``torch.compile`` backend: rewrite the graph (:mod:`.rewrite`), then lower it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch.fx as fx

from .report import AttentionCall
from .rewrite import CURRENT_CONTEXT, rewrite_graph

__all__ = ["LOWERINGS", "VMoBABackend"]

LOWERINGS = ("inductor", "aot_eager")

logger = logging.getLogger(__name__)


class VMoBABackend:
    """A ``torch.compile`` backend: rewrite with :func:`rewrite_graph`, then inductor.

    Args:
        on_graph: called with ``(where, calls)`` after each graph is decided (the report).
        config_patches: inductor options for this compile only (``compile_fx(config_patches=)``).
        lowering: ``"inductor"`` (fused kernels) or ``"aot_eager"`` (AOTAutograd traces the
            rewritten graph, forward and backward, and runs it op by op: for debugging, and for
            fast CPU tests of the rewrite).
        apply: False decides only and runs the graph unchanged (``explain``).
        on_run: called with ``(calls, output)`` after each run of a compiled graph holding
            attention calls (the account of what ran, :mod:`vmoba_compile.accounting`).
    """

    def __init__(
        self,
        on_graph: Callable[[str, list[AttentionCall]], None],
        config_patches: dict[str, Any] | None = None,
        *,
        lowering: str = "inductor",
        apply: bool = True,
        on_run: Callable[[list[AttentionCall], Any], None] | None = None,
    ) -> None:
        if lowering not in LOWERINGS:
            raise ValueError(f"lowering must be one of {LOWERINGS}; got {lowering!r}.")
        self.on_graph = on_graph
        self.config_patches = dict(config_patches or {})
        self.lowering = lowering
        self.apply = apply
        self.on_run = on_run
        self.graph_runs = 0

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        ctx = CURRENT_CONTEXT.get()
        if ctx is None:
            raise RuntimeError(
                "the VMoBA backend compiled a graph outside a forward call of a model returned by "
                "vmoba_compile.optimize; use optimize(model) rather than "
                "torch.compile(backend=VMoBABackend(...))."
            )
        calls = rewrite_graph(gm, ctx, example_inputs, apply=self.apply)
        ctx.calls.extend(calls)
        self.on_graph(ctx.describe(), calls)
        done = sum(c.rewritten for c in calls)
        if self.apply:
            logger.info(
                "lowering a graph (%s) with %s: %d of %d attention calls rewritten to VMoBA",
                ctx.describe(),
                self.lowering,
                done,
                len(calls),
            )
        t0 = time.perf_counter()
        compiled: Callable[..., Any]
        if not self.apply:
            compiled = gm.forward
        elif self.lowering == "aot_eager":
            from torch._dynamo.backends.registry import lookup_backend

            compiled = lookup_backend("aot_eager")(gm, list(example_inputs))
        else:
            from torch._inductor.compile_fx import compile_fx

            patches = dict(self.config_patches)
            # compile_fx's declared result covers its AOT modes (paths, weights); a
            # torch.compile backend gets the callable.
            compiled = cast(
                "Callable[..., Any]",
                compile_fx(gm, list(example_inputs), config_patches=patches),
            )
        if self.apply:
            logger.info("lowered in %.1f s (%s)", time.perf_counter() - t0, self.lowering)

        on_run = self.on_run if calls else None

        def run(*args: Any) -> Any:
            # Counts graph runs, so the wrapper can tell when Dynamo ran the model without any
            # of our graphs (its recompile limit reached, or the frame skipped), and each
            # attention call's execution.
            self.graph_runs += 1
            out = compiled(*args)
            if on_run is not None:
                on_run(calls, out)
            return out

        return run
