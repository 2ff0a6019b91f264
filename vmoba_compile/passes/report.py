"""The rewrite report: the pass's decision on every attention call, one list per compiled graph."""

from __future__ import annotations

import dataclasses

__all__ = ["AttentionCall", "RewriteReport"]


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """The pass's decision on one attention call of one compiled graph.

    Attributes:
        module: path of the module that made the call (as in ``named_modules()``), or ``"?"``.
        shape: ``[B, H, S_q, D]`` of the query and ``S_kv``, as text.
        rewritten: True if the call runs VMoBA.
        reason: why it was rewritten (the layout) or why it was left dense.
        layer_index: the call's VMoBA layer index (None when left dense).
        partition: ``"1d"``, ``"2d"`` or ``"3d"`` (None when left dense).
        kernel: the kernel of a rewritten call: ``"flash"`` (FlashAttention-4), ``"triton"``
            (FlexAttention's Triton template) or ``"sdpa"`` (every chunk kept: dense SDPA);
            None when left dense. Why is in ``reason``.
    """

    module: str
    shape: str
    rewritten: bool
    reason: str
    layer_index: int | None = None
    partition: str | None = None
    kernel: str | None = None


@dataclasses.dataclass
class RewriteReport:
    """Every attention call the pass saw, one list per compiled graph.

    ``str(report)`` is a readable table. After :func:`vmoba_compile.optimize` the report of the
    optimized model grows with each compile (a new resolution compiles anew).
    """

    model: str
    family: str | None
    graphs: list[tuple[str, list[AttentionCall]]] = dataclasses.field(default_factory=list)
    compiled: str = "whole model"
    # With only the blocks compiled: attention modules outside them (run as written, not traced).
    outside: list[str] = dataclasses.field(default_factory=list)
    # Which path found the layout: "adapter 'wan'", "subclass of 'wan' (...)", "structural
    # (...)" or "user layout" (adapters.registry.layout_source); empty: the family alone.
    found_by: str = ""
    # Under diffusers' context parallelism and/or FSDP2: the setup (see vmoba_compile.parallel).
    parallel: str | None = None

    @property
    def calls(self) -> list[AttentionCall]:
        """All calls of all graphs, in compile order."""
        return [c for _, calls in self.graphs for c in calls]

    @property
    def rewritten(self) -> list[AttentionCall]:
        return [c for c in self.calls if c.rewritten]

    @property
    def skipped(self) -> list[AttentionCall]:
        return [c for c in self.calls if not c.rewritten]

    def add(self, where: str, calls: list[AttentionCall]) -> None:
        self.graphs.append((where, list(calls)))

    def __str__(self) -> str:
        family = self.found_by or (f"adapter '{self.family}'" if self.family else "explicit layout")
        lines = [f"VMoBA rewrite report for {self.model} ({family}; compiled: {self.compiled})"]
        if self.compiled != "whole model":
            lines.append(
                "  only the blocks are compiled: attention calls outside them run as written "
                "(dense) and are not listed; attention modules outside the blocks: "
                + (", ".join(self.outside) or "none")
            )
        if self.parallel:
            lines.append(f"  parallel: {self.parallel}")
        if not self.graphs:
            lines.append("  no graph compiled yet: run the model once")
        if len(self.graphs) > 1:
            calls = self.calls
            lines.append(
                f"all {len(self.graphs)} graphs: {len(self.rewritten)} of {len(calls)} attention "
                f"calls rewritten"
            )
        for n, (where, calls) in enumerate(self.graphs, 1):
            done = sum(c.rewritten for c in calls)
            lines.append(f"graph {n} ({where}): {done} of {len(calls)} attention calls rewritten")
            width = max([len(c.module) for c in calls] + [6])
            lines.append(
                f"  {'layer':>5}  {'part':4}  {'kernel':6}  {'module':{width}}  "
                f"{'q shape, kv len':24}  decision"
            )
            for c in calls:
                layer = "-" if c.layer_index is None else str(c.layer_index)
                part, kernel = c.partition or "-", c.kernel or "-"
                what = ("VMoBA: " if c.rewritten else "dense: ") + c.reason
                lines.append(
                    f"  {layer:>5}  {part:4}  {kernel:6}  {c.module:{width}}  {c.shape:24}  {what}"
                )
        return "\n".join(lines)
