"""VMoBA under diffusers' Ulysses context parallelism and FSDP2 (several GPUs, one model).

The engines are the ones users already run; this module makes the pass compose with them:

* **Context parallelism:** diffusers' ``model.enable_parallelism(config=ContextParallelConfig(
  ulysses_degree=P))`` splits the sequence over ``P`` ranks (its ``_cp_plan``: at the first block
  and RoPE) and gathers it at the output. Inside attention, Ulysses exchanges ``q, k, v`` from
  ``[B, H, S/P, D]`` (all heads of a sequence slice) to ``[B, H/P, S, D]`` (the whole sequence for
  ``H/P`` heads) and back. VMoBA selects key chunks per head, so on the exchanged tensors it runs
  exactly as on one GPU, each rank on its heads.
* **Sharded data parallel:** ``torch.distributed.fsdp.fully_shard`` (FSDP2), per block then the
  root.

Three things differ from one process, and are handled here:

1. *Which module made a call.* FSDP2 swaps a block's parameters for unsharded ones at each forward
   and diffusers' split hook replaces the first block's ``forward``, so neither the parameter
   identities recorded at ``optimize`` time nor the module paths in Dynamo's graph name the
   module. Under a parallel setup each call is placed by the block that is running (the regional
   :class:`~vmoba_compile.regional.BlockCall` knows it): its live parameters, matched to the
   graph's parameter inputs.
2. *Who does the all-to-all.* diffusers' Ulysses exchange is a ``torch.autograd.Function`` whose
   backward mutates its saved tensors; Dynamo cannot trace it under autograd and runs it eagerly,
   outside any graph, so the pass would see no attention call in training, and rewriting that
   eager frame would pair a sparse forward with a dense gradient. So in the compiled blocks the
   video self-attention modules run with their processor's ``_parallel_config`` set aside (for
   the duration of the block call) and the pass puts the exchange around the attention call
   itself, with ``torch.distributed._functional_collectives.all_to_all_single_autograd``, which
   AOTAutograd traces and differentiates: forward and backward of a rewritten call are both
   VMoBA's. diffusers still splits the sequence and gathers the output.
3. *Eligibility.* Only Ulysses is supported (ring attention merges partial results with their
   log-sum-exp and needs another mask), with heads divisible by ``P``, diffusers' ``native``
   backend and without ``ulysses_anything``; families whose self-attention joins text and video
   (HunyuanVideo, CogVideoX) are refused, since diffusers' split interleaves the text into each
   rank's slice. A refused setup leaves every call dense (under diffusers' own attention) and the
   report says why, with the fix.

Gradients: each rank of a CP group holds a partial gradient of every parameter (its tokens'
share): sum them over the CP group. FSDP2 averages over its group. Ranks of one CP group must
draw the same noise and timesteps (they compute one sample together).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F

from .passes.hooks import CallDecision, call_shape, decide_call, place_in_block
from .passes.report import AttentionCall, Skip, SkipReason
from .passes.rewrite import CURRENT_CONTEXT, CallContext

__all__ = ["ParallelPlan", "UlyssesAttention", "detect_parallel", "ulysses_exchange"]

logger = logging.getLogger(__name__)

# Model classes whose diffusers ``_cp_plan`` splits only video tokens before self-attention
# (validated against one process); everything else under CP is refused.
SUPPORTED_CP_CLASSES = ("WanTransformer3DModel", "LTXVideoTransformer3DModel")
# Families whose self-attention sequence joins text and video: the split interleaves them.
JOINT_TEXT_FAMILIES = {
    "hunyuan_video": "HunyuanVideo",
    "cogvideox": "CogVideoX",
}


# ---------------------------------------------------------------------------------------------
# the exchange


def _wait(x: torch.Tensor) -> torch.Tensor:
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return x.wait() if isinstance(x, AsyncCollectiveTensor) else x


def _all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Equal splits of ``x`` along dim 0 exchanged over ``group`` (autograd-aware, traceable)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    shape = x.shape
    # Flat, as diffusers does: inductor's codegen asks contiguous inputs of the collective.
    out = all_to_all_single_autograd(x.contiguous().flatten(), None, None, group)
    return _wait(out).reshape(shape)


def ulysses_exchange(x: torch.Tensor, degree: int, group: Any, to_heads: bool) -> torch.Tensor:
    """Ulysses all-to-all on ``[B, H, S, D]`` attention inputs.

    Args:
        x: ``[B, H, S/P, D]`` (``to_heads``) or ``[B, H/P, S, D]``.
        degree: ``P``, the size of ``group``.
        group: the Ulysses process group.
        to_heads: True: sequence slice of all heads -> whole sequence of this rank's ``H/P``
            heads (rank ``r`` gets heads ``r*H/P ... (r+1)*H/P - 1``, as diffusers splits them);
            False: the inverse.
    """
    p = degree
    if to_heads:
        b, h, s, d = x.shape
        # [P (head group, sent to that rank), B, H/P, s, D]
        send = x.reshape(b, p, h // p, s, d).transpose(0, 1)
        got = _all_to_all(send, group)  # [P (sequence slice, from that rank), B, H/P, s, D]
        return got.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * s, d)
    b, hl, s, d = x.shape
    send = x.reshape(b, hl, p, s // p, d).permute(2, 0, 1, 3, 4)  # [P (sequence slice), ...]
    got = _all_to_all(send, group)  # [P (head group, from that rank), B, H/P, s/P, D]
    return got.transpose(0, 1).reshape(b, p * hl, s // p, d)


class UlyssesAttention:
    """The target of an attention call of a video self-attention module under Ulysses: the
    exchange to ``[B, H/P, S, D]``, the attention (VMoBA's ``inner`` or dense SDPA), the exchange
    back. Like :class:`~vmoba_compile.passes.rewrite.BoundVMoBA`, its static arguments live in the
    target, not in the graph's arguments."""

    def __init__(
        self,
        inner: Callable[..., torch.Tensor] | None,
        sdpa_kwargs: dict[str, Any],
        degree: int,
        group: Any,
        name: str,
    ) -> None:
        self.inner, self.sdpa_kwargs = inner, sdpa_kwargs
        self.degree, self.group = degree, group
        self.__name__ = self.__qualname__ = name
        self.__module__ = __name__

    def __call__(self, query, key, value, attn_mask):
        p, g = self.degree, self.group
        q, k, v = (ulysses_exchange(x, p, g, to_heads=True) for x in (query, key, value))
        if self.inner is not None:
            out = self.inner(q, k, v, attn_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, **self.sdpa_kwargs)
        return ulysses_exchange(out, p, g, to_heads=False)

    def __repr__(self) -> str:
        return f"<{self.__name__}>"


# ---------------------------------------------------------------------------------------------
# the setup


def _fsdp_modules(model: torch.nn.Module) -> list[str]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]


def _cp_config(model: torch.nn.Module) -> Any:
    parallel = getattr(model, "_parallel_config", None)
    return getattr(parallel, "context_parallel_config", None) if parallel is not None else None


def _backend_name(processor: Any) -> str:
    name = getattr(processor, "_attention_backend", None)
    if name is None:
        try:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry

            name = _AttentionBackendRegistry.get_active_backend()[0]
        except ImportError:  # pragma: no cover - a CP model comes from diffusers
            return "unknown"
    return str(getattr(name, "value", name))


@dataclasses.dataclass
class ParallelPlan:
    """What :func:`detect_parallel` found: a model's parallel setup and how the pass runs under it.

    Attributes:
        degree: the Ulysses degree ``P`` (1 without context parallelism).
        group: the Ulysses process group (None without context parallelism).
        rank: this process's rank in ``group`` (0 without).
        fsdp: the modules FSDP2 shards (``fully_shard``), by path.
        exchanged: the video self-attention modules whose Ulysses exchange the pass does itself:
            path -> attention processor (its ``_parallel_config`` is set aside in a block call).
        refusal: why VMoBA is refused under this setup (every call then stays dense), with the
            fix (``str()`` of it is the message); None when supported.
        ring_degree: diffusers' ring degree (refused above 1).
    """

    degree: int = 1
    group: Any = None
    rank: int = 0
    fsdp: list[str] = dataclasses.field(default_factory=list)
    exchanged: dict[str, Any] = dataclasses.field(default_factory=dict)
    refusal: Skip | None = None
    ring_degree: int = 1

    def describe(self) -> str:
        """One line for the report: the setup and the per-rank shapes."""
        parts = []
        if self.degree > 1 or self.ring_degree > 1:
            parts.append(
                f"diffusers context parallel, Ulysses degree {self.degree}, ring degree "
                f"{self.ring_degree} (this process: rank {self.rank} of the group); per rank "
                f"the blocks see S/{self.degree} tokens and each attention call the whole "
                f"sequence for H/{self.degree} heads"
            )
            if self.exchanged and self.refusal is None:
                parts.append(
                    f"the Ulysses all-to-all of {len(self.exchanged)} video self-attention "
                    f"modules runs inside the compiled blocks (autograd-aware)"
                )
        if self.fsdp:
            parts.append(f"FSDP2 shards {len(self.fsdp)} modules")
        text = "; ".join(parts)
        if self.refusal is not None:
            text += f"; VMoBA REFUSED, every call dense: {self.refusal}"
        return text

    # ----------------------------------------------------------------------------- block calls

    @contextlib.contextmanager
    def block_scope(self, path: str, block: torch.nn.Module) -> Iterator[None]:
        """Around a block call: its exchanged processors run without diffusers' exchange, and
        the calls of the graphs compiled now are placed by the block's live parameters."""
        ctx = CURRENT_CONTEXT.get()
        saved_names: dict[int, str] = {}
        if ctx is not None:
            saved_names = ctx.param_names
            # A mapping that answers for the running block's live parameters (FSDP2 swaps them).
            ctx.param_names = cast("dict[int, str]", _LiveNames(path, block))
        inside = [proc for p, proc in self.exchanged.items() if p.startswith(path + ".")]
        saved = [proc._parallel_config for proc in inside]
        try:
            for proc in inside:
                proc._parallel_config = None
            yield
        finally:
            for proc, cfg in zip(inside, saved, strict=True):
                proc._parallel_config = cfg
            if ctx is not None:
                ctx.param_names = saved_names

    @property
    def exchanges(self) -> bool:
        """Whether the pass does the Ulysses exchange of some attention calls: then a block's
        dense variant goes through the VMoBA backend too (it rewrites nothing, but puts the
        exchange around each attention call)."""
        return bool(self.exchanged) and self.refusal is None

    def wrap_variant(
        self, fn: Callable[..., Any], paths: Mapping[int, str], backend: Any
    ) -> Callable[..., Any]:
        """A compiled block variant ``fn(block, *args, **kwargs)`` run in :meth:`block_scope`.

        Under context parallelism a block call that ran none of the variant's graphs (Dynamo
        ran it eagerly: its recompile limit reached) would run attention on a sequence slice
        without the exchange, a wrong result: it raises instead.
        """

        def run(block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            path = paths[id(block)]
            before = backend.graph_runs if backend is not None else 0
            with self.block_scope(path, block):
                out = fn(block, *args, **kwargs)
            exchanged = any(p.startswith(path + ".") for p in self.exchanged)
            if backend is not None and exchanged and backend.graph_runs == before:
                raise RuntimeError(
                    f"block '{path}' ran without any of its compiled graphs (Dynamo ran it "
                    f"eagerly: most likely torch._dynamo.config.recompile_limit was reached). "
                    f"Under context parallelism its attention would then miss the Ulysses "
                    f"exchange. Raise the limit or call torch._dynamo.reset() before "
                    f"optimizing again."
                )
            return out

        return run

    # ----------------------------------------------------------------------------- the pass

    def place(
        self, node: fx.Node, gm: fx.GraphModule, example_inputs: Any, ctx: CallContext
    ) -> str:
        """The module path of ``node``'s innermost module in the model, found through the
        running block and its live parameters (see :class:`_LiveNames`)."""
        names: Any = ctx.param_names
        live = names if isinstance(names, _LiveNames) else None
        block, path = (live.block, live.path) if live is not None else (None, "")
        return place_in_block(node, gm, example_inputs, names, ctx.layer_of, block, path)

    def rewrite_call(
        self,
        gm: fx.GraphModule,
        sub: fx.GraphModule,
        node: fx.Node,
        bound: dict[str, Any],
        values: dict[str, Any],
        ctx: CallContext,
        example_inputs: Any,
        next_layer: Callable[[], int],
        apply: bool,
    ) -> AttentionCall:
        """Decide (and with ``apply`` rewrite) one attention call under this setup."""
        module = self.place(node, gm, example_inputs, ctx)
        if module == "?" and self.exchanged and self.refusal is None:
            raise RuntimeError(
                f"an attention call in a compiled block could not be placed in the model "
                f"({call_shape(values['query'], values['key'])}); under Ulysses context "
                f"parallelism a video self-attention call must get its all-to-all, so it is not "
                f"left to chance. Please report this with the model class and torch version."
            )
        exchange = self.degree > 1 and self.refusal is None and module in self.exchanged
        q, k = values["query"], values["key"]
        local = call_shape(q, k)
        rank_values = values  # device and dtype as they run (the exchanged ones are meta)
        if exchange:
            values = self._exchanged_values(values, module)
            shape = f"{call_shape(values['query'], values['key'])} (rank in: {local})"
        else:
            shape = local
        decided = self._decide(values, rank_values, module, ctx, next_layer, exchange)
        inner = None
        if isinstance(decided, Skip):
            call = AttentionCall.dense(module, shape, decided)
        else:
            note = f", on H/{self.degree} heads per rank after the Ulysses all-to-all"
            call = decided.report(module, shape, note if exchange else "")
            inner = decided.target(bound["scale"])
        if apply and (exchange or inner is not None):
            self._replace(sub, node, bound, inner, exchange, module)
        return call

    def _decide(
        self,
        values: dict[str, Any],
        rank_values: dict[str, Any],
        module: str,
        ctx: CallContext,
        next_layer: Callable[[], int],
        exchange: bool,
    ) -> CallDecision | Skip:
        """The pass's decision (:func:`~vmoba_compile.passes.hooks.decide_call`) on the call as
        attention sees it (``values``), with this setup's own refusals before the kernel (chosen
        on the tensors as they run: ``rank_values``, over the sequence the attention sees)."""

        def refuse() -> Skip | None:
            if self.refusal is not None:
                return Skip(self.refusal.reason, f"context parallel: {self.refusal.message}")
            if self.degree > 1 and not exchange:
                return SkipReason.CP_NOT_EXCHANGED.skip(module=module)
            if exchange and ctx.grid is not None and ctx.grid.video_tokens % self.degree:
                tokens = ctx.grid.video_tokens
                return SkipReason.CP_VIDEO_TOKENS.skip(tokens=tokens, degree=self.degree)
            return None

        seq_len = values["query"].shape[2]  # S after the exchange, S / P on the rank before it
        return decide_call(
            values, module, ctx, next_layer, kernel_values=rank_values, seq_len=seq_len,
            refuse=refuse,
        )  # fmt: skip

    def _exchanged_values(self, values: dict[str, Any], module: str) -> dict[str, Any]:
        """The call's tensors as the attention sees them after the exchange (meta tensors of
        ``[B, H/P, S, D]``), for :func:`~vmoba_compile.passes.hooks.decide_call`."""
        p = self.degree
        out = dict(values)
        for name in ("query", "key", "value"):
            t = values[name]
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise RuntimeError(
                    f"the attention call of {module} under Ulysses context parallelism has no "
                    f"[B, H, S, D] {name}; got {getattr(t, 'shape', t)}."
                )
            b, h, s, d = t.shape
            if h % p:
                raise RuntimeError(
                    f"the attention call of {module} has {h} {name} heads, not divisible by the "
                    f"Ulysses degree {p}: choose ulysses_degree dividing the head count."
                )
            out[name] = torch.empty((b, h // p, s * p, d), dtype=t.dtype, device="meta")
        if values["attn_mask"] is not None:
            raise RuntimeError(
                f"the self-attention call of {module} has an attention mask under Ulysses "
                f"context parallelism, which the pass does not exchange; "
                f"{type(self).__name__} supports the mask-free video self-attention of "
                f"{', '.join(SUPPORTED_CP_CLASSES)}."
            )
        return out

    def _replace(
        self,
        gm: fx.GraphModule,
        node: fx.Node,
        bound: dict[str, Any],
        inner: Callable[..., Any] | None,
        exchange: bool,
        module: str,
    ) -> None:
        if exchange:
            sdpa = {k: bound[k] for k in ("dropout_p", "is_causal", "scale", "enable_gqa")}
            what = inner.__name__ if inner is not None else "sdpa"
            target: Any = UlyssesAttention(inner, sdpa, self.degree, self.group, f"ulysses_{what}")
        else:
            target = inner
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                target, args=(bound["query"], bound["key"], bound["value"], bound["attn_mask"])
            )
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


class _LiveNames(Mapping[int, str]):
    """``id(parameter or buffer) -> model path`` of one block as it is now (under FSDP2 the
    unsharded parameters of this forward), built on first use (only when a graph compiles)."""

    def __init__(self, path: str, block: torch.nn.Module) -> None:
        self.path, self.block = path, block
        self._names: dict[int, str] | None = None

    def _table(self) -> dict[int, str]:
        if self._names is None:
            b, pre = self.block, self.path + "."
            named = [*b.named_parameters(remove_duplicate=False), *b.named_buffers()]
            self._names = {id(t): pre + n for n, t in named}
        return self._names

    def __getitem__(self, key: int) -> str:
        return self._table()[key]

    def __iter__(self):
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


# ---------------------------------------------------------------------------------------------
# detection


def detect_parallel(
    model: torch.nn.Module,
    family: str | None,
    layer_of: Mapping[str, int],
    blocks: Mapping[str, Any] | None,
) -> ParallelPlan | None:
    """The parallel setup of ``model`` (diffusers' context parallelism, FSDP2), or None when it
    has neither: then ``optimize`` runs exactly its one-process path.

    Args:
        model: the model given to ``optimize``.
        family: the adapter's family (None with an explicit layout).
        layer_of: the VMoBA self-attention modules, path -> layer index.
        blocks: the blocks ``optimize`` compiles one by one (None: the whole model).

    Raises:
        RuntimeError: a parallel setup with the whole model compiled (``regional=False``, or
            self-attention outside any module list): the calls are placed by the running block.
    """
    cp = _cp_config(model)
    fsdp = _fsdp_modules(model)
    if cp is None and not fsdp:
        return None
    if not blocks:
        what = " and ".join(
            w for w, on in (("context parallelism", cp is not None), ("FSDP2", fsdp)) if on
        )
        raise RuntimeError(
            f"{type(model).__name__} runs under {what}, which vmoba_compile supports with its "
            f"repeated blocks compiled one by one (regional compilation, the default where every "
            f"video self-attention module lies in a module list): each attention call is placed "
            f"by the block that runs it. Use optimize(model) without regional=False."
        )
    plan = ParallelPlan(fsdp=fsdp)
    if cp is None:
        return plan
    plan.degree = int(getattr(cp, "ulysses_degree", 1) or 1)
    plan.ring_degree = int(getattr(cp, "ring_degree", 1) or 1)
    mesh = getattr(cp, "_ulysses_mesh", None)
    if mesh is not None:
        plan.group = mesh.get_group()
        plan.rank = int(getattr(cp, "_ulysses_local_rank", 0) or 0)
    modules = dict(model.named_modules())
    processors = {p: getattr(modules[p], "processor", None) for p in layer_of if p in modules}
    plan.refusal = _refusal(model, cp, family, plan, processors)
    if plan.refusal is None:
        plan.exchanged = {
            p: proc
            for p, proc in processors.items()
            if proc is not None and getattr(proc, "_parallel_config", None) is not None
        }
        if not plan.exchanged:
            plan.refusal = SkipReason.CP_NOT_ENABLED.skip()
    if plan.refusal is not None:
        logger.warning("VMoBA under context parallelism refused: %s", plan.refusal)
    return plan


def _refusal(
    model: torch.nn.Module,
    cp: Any,
    family: str | None,
    plan: ParallelPlan,
    processors: Mapping[str, Any],
) -> Skip | None:
    """Why VMoBA cannot run under this context-parallel setup (with the fix), or None."""
    if plan.ring_degree > 1:
        return SkipReason.CP_RING.skip(ring_degree=plan.ring_degree)
    if getattr(cp, "ulysses_anything", False):
        return SkipReason.CP_ULYSSES_ANYTHING.skip()
    if family in JOINT_TEXT_FAMILIES:
        return SkipReason.CP_JOINT_TEXT.skip(family=JOINT_TEXT_FAMILIES[family])
    classes = {c.__name__ for c in type(model).__mro__}
    if not classes & set(SUPPORTED_CP_CLASSES):
        return SkipReason.CP_UNSUPPORTED_MODEL.skip(
            model=type(model).__name__, supported=", ".join(SUPPORTED_CP_CLASSES)
        )
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if isinstance(heads, int) and heads % plan.degree:
        return SkipReason.CP_HEADS.skip(heads=heads, degree=plan.degree)
    backends = sorted({_backend_name(p) for p in processors.values() if p is not None})
    if any(b != "native" for b in backends):
        return SkipReason.CP_BACKEND.skip(backends=", ".join(backends))
    return None
