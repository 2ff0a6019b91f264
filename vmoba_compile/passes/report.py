"""The rewrite report: the pass's decision on every attention call, one list per compiled graph."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

__all__ = ["AttentionCall", "Executions", "RewriteReport", "Skip", "SkipReason"]


class SkipReason(enum.Enum):
    """Why the pass left an attention call dense: one member per rule, its value the message
    template (``str(reason)`` gives it). :meth:`format` fills in the call's details; the report's
    :attr:`AttentionCall.reason` is that message, :attr:`AttentionCall.skip` the member, for code
    that tells the cases apart. The placeholders of each template are its documented details."""

    # the call itself (decide)
    NO_SHAPES = "no shape information for q/k/v in the graph"
    NOT_4D = "q/k/v are not [B, H, S, D] (q has {dims} dims)"
    CROSS_ATTENTION = "cross-attention ({queries} queries, {keys} keys)"
    CAUSAL = "causal attention"
    CAUSAL_AT_RUN_TIME = "is_causal decided at run time"
    DROPOUT_AT_RUN_TIME = "dropout_p decided at run time"
    DROPOUT = "attention dropout (dropout_p={p})"
    HEADS_MISMATCH = "{query_heads} query heads vs {key_heads} key heads without enable_gqa"
    SCALE_AT_RUN_TIME = "scale decided at run time"
    NOT_SELF_ATTENTION = "not a video self-attention module of {family}"
    MODULE_UNPROVEN = (
        "its module could not be identified: the graph holding it has none of the module's "
        "parameters under the name Dynamo reached it by, nor does that name reach, in the "
        "traced frame, a module object its parameters prove (hooks on every leaf module: "
        "diffusers' leaf-level group offloading, accelerate's cpu_offload). Use block-level "
        "hooks (enable_group_offload(offload_type='block_level')) or none{reached}"
    )
    # the layout of the call's length
    LAYOUT_MISMATCH = "{tokens} tokens do not match the layout's {expected} ({layout})"
    GRID_UNKNOWN = "video grid unknown for this call: {detail}"
    TOKEN_ORDER_UNPROVEN = (
        "the token order of {module}'s calls is not the grid's frame-major order: {detail}. Pass "
        "optimize(model, layout=...) only if every self-attention call sees one order"
    )
    TOO_SHORT_FOR_GRID = "{tokens} tokens cannot hold the {video_tokens}-token video grid"
    EXTRA_TOKENS_UNPROVEN = (
        "{tokens} tokens are the {video_tokens}-token video grid plus {extra} tokens the adapter "
        "does not account for (it expects {expected}), so where they sit is not proven. Pass "
        "optimize(model, layout=VideoLayout(..., text_tokens={extra}, text_position=...)) if "
        "you know it"
    )
    LENGTH_AT_RUN_TIME = "sequence length {length} is decided at run time"
    RUN_TIME_TEXT_NOT_SUFFIX = "run-time text length is supported for suffix text only"
    LENGTH_UNBOUNDED = (
        "sequence length {length} is decided at run time and has no known upper bound"
    )
    BOUND_TOO_SHORT_FOR_GRID = (
        "at most {upper} tokens cannot hold the {video_tokens}-token video grid"
    )
    # the attention mask
    MASK_AT_RUN_TIME_LENGTH = "attention mask on a call of run-time length"
    MASK_NO_SHAPES = "attention mask without shape information"
    MASK_NOT_BOOL = "{dtype} attention mask (only boolean text key padding is honoured)"
    MASK_UNDECLARED = "boolean attention mask the adapter does not declare as text key padding"
    MASK_NOT_KEY_PADDING = "boolean mask of shape {shape} is not a [B, 1, 1, S] key padding"
    MASK_WITHOUT_TEXT = "key-padding mask on a call without text tokens"
    # the layer, the graph, the kernel
    DENSE_LAYER = "layer {layer} kept dense by the runtime controls (dense_layers)"
    LAYER_UNNUMBERED = (
        "{module} is not among the attention modules numbered when the model was optimized "
        "(class name containing 'Attention'), so under block-by-block compilation its layer, "
        "and with it the partition, is unknown. Use optimize(..., regional=False), which "
        "numbers such calls in graph order, or name the module's class ...Attention"
    )
    LAYER_TAKEN_OUT = (
        "{module} made a cross-attention call first, so the layer numbering took it out "
        "(layer indices count video self-attention modules only) and this self-attention call "
        "of it has no layer. Give self- and cross-attention separate modules"
    )
    UNRECOGNIZED_ARGUMENTS = "unrecognized arguments ({error})"
    LOCAL_MODULE_SHARED = (
        "its frame has no module around the call (hooks on every leaf module: diffusers' "
        "leaf-level group offloading, accelerate's cpu_offload, run each layer's processor in "
        "a frame of its own) and its one video self-attention module among the frame's locals "
        "is {module}, but {why}, so one compiled graph of that frame may serve several layers "
        "with different partitions. Compile block by block (optimize's default where the blocks "
        "are in a ModuleList), one video self-attention module per block"
    )
    LOCAL_PLACEMENT_CUDA = (
        "its frame has no module around the call (hooks on every leaf module: diffusers' "
        "leaf-level group offloading, accelerate's cpu_offload) and it is placed by the frame's "
        "local module {module}, a placement proven on CPU only: on CUDA the optimized model's "
        "output was measured off the VMoBA reference (docs/compatibility.md), so off the CPU "
        "the call stays dense. Block-level group offloading (offload_type='block_level') runs "
        "VMoBA on CUDA"
    )
    SHARED_FRAME = (
        "compiled in a frame of {frame} alone (a graph break in a parent module); Dynamo reuses "
        "that graph for sibling blocks, so one layer's partition cannot be fixed. Remove the "
        "graph break (fullgraph=True shows it)"
    )
    FLASH_CANNOT_RUN = "{why}; use VMoBAConfig(kernel='auto') to run Triton there"
    # attention ops other than SDPA: listed (and counted dense) so that no call goes unseen
    FLEX_ATTENTION = (
        "attention through FlexAttention (flex_attention, as diffusers' 'flex' attention "
        "backend calls it): the pass rewrites scaled_dot_product_attention only, and a "
        "FlexAttention call's score_mod and block_mask are not proven to be plain attention. "
        "Fix: use the default attention backend (model.set_attention_backend('native'), or "
        "leave the attention_backend('flex') context){also}"
    )
    MULTIHEAD_ATTENTION = (
        "nn.MultiheadAttention runs one fused op ({op}) with its projections inside, which the "
        "pass does not rewrite. Fix: write the attention as its in-projection, "
        "F.scaled_dot_product_attention on [B, H, S, D] and its out-projection (in a module "
        "whose class name contains 'Attention'){also}"
    )
    # context parallelism (vmoba_compile.parallel): a refused setup's calls carry its member,
    # their message prefixed with "context parallel: "
    CP_RING = (
        "ring attention (ring_degree={ring_degree}) merges per-rank partial results through "
        "their log-sum-exp and would need a mask per key slice, which VMoBA does not provide. "
        "Fix: ContextParallelConfig(ulysses_degree=P) with ring_degree=1"
    )
    CP_ULYSSES_ANYTHING = (
        "ulysses_anything splits heads and tokens unevenly across ranks. Fix: "
        "ContextParallelConfig(ulysses_degree=P, ulysses_anything=False) with heads and video "
        "tokens divisible by P"
    )
    CP_JOINT_TEXT = (
        "{family} joins text and video tokens in one self-attention sequence; splitting that "
        "sequence across ranks interleaves text into the video slices and breaks the video "
        "layout VMoBA partitions. Fix: run it without context parallelism (FSDP2 alone is "
        "supported)"
    )
    CP_UNSUPPORTED_MODEL = (
        "{model} is not validated under context parallelism (supported: {supported}). Fix: run "
        "it without context parallelism"
    )
    CP_HEADS = (
        "{heads} attention heads are not divisible by ulysses_degree={degree}. Fix: choose a "
        "ulysses_degree that divides the head count"
    )
    CP_BACKEND = (
        "the attention backend is {backends}; the pass rewrites torch's "
        "scaled_dot_product_attention, which diffusers calls with the 'native' backend. Fix: "
        "model.set_attention_backend('native') before enable_parallelism"
    )
    CP_NOT_ENABLED = (
        "no video self-attention processor of the model has diffusers' parallel config "
        "(enable_parallelism did not reach them); call model.enable_parallelism(...) before "
        "optimize"
    )
    CP_NOT_EXCHANGED = (
        "module {module} is not a video self-attention module whose Ulysses exchange the pass "
        "runs, so under context parallelism it is never rewritten"
    )
    CP_VIDEO_TOKENS = (
        "{tokens} video tokens are not divisible by the Ulysses degree {degree}; choose a "
        "resolution whose token count is"
    )

    def __str__(self) -> str:
        return str(self.value)

    def format(self, **details: Any) -> str:
        """The message of one call: the template with its details filled in.

        Raises:
            KeyError: a detail of the template is missing.
        """
        return str(self.value).format(**details)

    def skip(self, **details: Any) -> Skip:
        """This reason with its message for one call (what the pass's steps return)."""
        return Skip(self, self.format(**details))


@dataclasses.dataclass(frozen=True)
class Skip:
    """A call left dense: the rule (:class:`SkipReason`) and the formatted message."""

    reason: SkipReason
    message: str

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """The pass's decision on one attention call of one compiled graph.

    Attributes:
        module: path of the module that made the call (as in ``named_modules()``), or ``"?"``.
        shape: ``[B, H, S_q, D]`` of the query and ``S_kv``, as text.
        rewritten: True if the call runs VMoBA.
        reason: why it was rewritten (the layout) or why it was left dense (the message of
            ``skip``).
        layer_index: the call's VMoBA layer index (None when left dense).
        partition: ``"1d"``, ``"2d"`` or ``"3d"`` (None when left dense).
        kernel: the kernel of a rewritten call: ``"flash"`` (FlashAttention-4), ``"triton"``
            (FlexAttention's Triton template) or ``"sdpa"`` (every chunk kept: dense SDPA);
            None when left dense. Why is in ``reason``.
        skip: the rule that left the call dense (None for a rewritten call).
        planned: a video self-attention call (its module and length are the layout's, as for
            a rewritten one) that runs dense because it is an attention op the pass does not
            rewrite (FlexAttention, ``nn.MultiheadAttention``): each run counts as a planned
            call that ran dense, so ``strict=True`` raises.
    """

    module: str
    shape: str
    rewritten: bool
    reason: str
    layer_index: int | None = None
    partition: str | None = None
    kernel: str | None = None
    skip: SkipReason | None = None
    planned: bool = False

    def __post_init__(self) -> None:
        # Code reads `skip` to tell dense calls apart: a dense call without one is a pass bug.
        if self.rewritten == (self.skip is not None):
            raise ValueError(
                f"an AttentionCall has a skip reason exactly when it is dense; got "
                f"rewritten={self.rewritten}, skip={self.skip}"
            )
        if self.planned and self.rewritten:
            raise ValueError("a rewritten AttentionCall is not a planned call run dense")

    @classmethod
    def dense(cls, module: str, shape: str, skip: Skip, planned: bool = False) -> AttentionCall:
        """A call left dense for ``skip`` (``planned``: see the class)."""
        return cls(module, shape, False, skip.message, skip=skip.reason, planned=planned)


@dataclasses.dataclass
class Executions:
    """What one module's attention calls ran, counted as they ran (not as planned).

    Attributes:
        vmoba_forward: forward runs of a VMoBA graph call (a rewritten call).
        vmoba_backward: backward runs of the compiled graph holding a rewritten call.
        dense_forward: forward runs of the call as dense attention, for any cause.
        dense_causes: cause -> count, summing to ``dense_forward``: the decision of the graph
            that ran it (its :class:`SkipReason` message), the runtime controls, or why no
            VMoBA graph ran it (Dynamo's recompile limit, a ``torch.compiler.disable``d hook, a
            graph break).
        no_graph: calls of the module's block (or model) in which it was planned to run VMoBA
            but no compiled graph ran it, for no cause that proves it ran dense: the model
            skipped it (a cache hook reusing an earlier output) or Dynamo ran it eagerly for a
            cause not detected (the warning says which was looked for).
    """

    vmoba_forward: int = 0
    vmoba_backward: int = 0
    dense_forward: int = 0
    dense_causes: dict[str, int] = dataclasses.field(default_factory=dict)
    no_graph: int = 0

    def add_dense(self, cause: str) -> None:
        self.dense_forward += 1
        self.dense_causes[cause] = self.dense_causes.get(cause, 0) + 1


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
    # module path -> what its attention calls ran (the account; the graphs are the plan).
    executions: dict[str, Executions] = dataclasses.field(default_factory=dict)

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

    def ran(self, module: str) -> Executions:
        """The execution counts of ``module`` (created at zero)."""
        found = self.executions.get(module)
        if found is None:
            found = self.executions[module] = Executions()
        return found

    @property
    def vmoba_runs(self) -> int:
        """Forward runs of VMoBA attention calls, all modules."""
        return sum(e.vmoba_forward for e in self.executions.values())

    @property
    def dense_runs(self) -> int:
        """Forward runs of dense attention calls, all modules (any cause)."""
        return sum(e.dense_forward for e in self.executions.values())

    def _execution_lines(self) -> list[str]:
        if not self.executions:
            return ["executions: none yet (the counts grow as the model runs)"]
        lines = [
            f"executions (what ran): {self.vmoba_runs} VMoBA forward, "
            f"{sum(e.vmoba_backward for e in self.executions.values())} VMoBA backward, "
            f"{self.dense_runs} dense forward"
        ]
        width = max(len(m) for m in self.executions)
        lines.append(
            f"  {'module':{width}}  {'vmoba fwd':>9}  {'vmoba bwd':>9}  {'dense fwd':>9}  "
            f"{'no graph':>8}"
        )
        for module, e in self.executions.items():
            lines.append(
                f"  {module:{width}}  {e.vmoba_forward:>9}  {e.vmoba_backward:>9}  "
                f"{e.dense_forward:>9}  {e.no_graph:>8}"
            )
            for cause, n in e.dense_causes.items():
                lines.append(f"  {'':{width}}    dense x{n}: {cause}")
        return lines

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
        empty = sum(not calls for _, calls in self.graphs)
        if empty:
            lines.append(f"{empty} graphs hold no attention call (graph breaks): not listed")
        for n, (where, calls) in enumerate(self.graphs, 1):
            if not calls:
                continue
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
        lines += self._execution_lines()
        return "\n".join(lines)
