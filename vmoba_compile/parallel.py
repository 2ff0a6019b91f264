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

from .kernels import KernelChoice, kernel_text
from .passes.report import Skip, SkipReason
from .passes.rewrite import (
    _PATH_ITEM,
    CURRENT_CONTEXT,
    AttentionCall,
    BoundVMoBA,
    CallContext,
    _Rewrite,
    _rewrite_reason,
    _shape_text,
    decide,
    decide_kernel,
)

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

    def compile_variant(
        self, owner: Any, key: tuple, fn: Callable[..., Any], on_graph: Any, on_run: Any = None
    ) -> Callable[..., Any]:
        """One compiled block variant of an optimized model (``owner``, a ``VMoBAModule``)
        under this setup. Under the Ulysses exchange the dense variant goes through the VMoBA
        backend too (it rewrites nothing, but puts the exchange around each attention call)."""
        regional = owner._vmoba_regional
        paths = {id(m): p for p, m in zip(regional.paths, regional.modules, strict=True)}
        backend = None
        if key != ("dense",):
            backend = owner._backend(on_graph, on_run)
            owner._vmoba_backends.append(backend)
        elif self.exchanged and self.refusal is None:
            backend = owner._backend(lambda where, calls: None)
        return self.wrap_variant(owner._compile(fn, backend), paths, backend)

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
        running block's live parameters (see :class:`_LiveNames`)."""
        stack = node.meta.get("nn_module_stack") or {}
        sources = [v[0] for v in stack.values() if isinstance(v, tuple) and isinstance(v[0], str)]
        params = _param_sources(gm, example_inputs, ctx.param_names)
        names: Any = ctx.param_names
        live = names if isinstance(names, _LiveNames) else None
        found = "?"
        for src in sources:
            path = _resolved_path(src, live.block, live.path) if live is not None else None
            if path is None:
                path = _module_path(src, params)
            if path is not None:
                found = path
                if path in ctx.layer_of:
                    return path
        return found

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
                f"({_shape_text(values['query'], values['key'])}); under Ulysses context "
                f"parallelism a video self-attention call must get its all-to-all, so it is not "
                f"left to chance. Please report this with the model class and torch version."
            )
        exchange = self.degree > 1 and self.refusal is None and module in self.exchanged
        q, k = values["query"], values["key"]
        local = _shape_text(q, k)
        rank_values = values  # device and dtype as they run (the exchanged ones are meta)
        if exchange:
            values = self._exchanged_values(values, module)
            shape = f"{_shape_text(values['query'], values['key'])} (rank in: {local})"
        else:
            shape = local
        decided = self._decide(values, rank_values, module, ctx, next_layer, exchange)
        inner = None
        if isinstance(decided, Skip):
            call = AttentionCall.dense(module, shape, decided)
        else:
            choice, kernel = decided
            name, why = kernel_text(kernel)
            partition = ctx.config.partition_for(choice.layer_index).value
            reason = _rewrite_reason(choice, ctx.config)
            if exchange:
                reason += f", on H/{self.degree} heads per rank after the Ulysses all-to-all"
            reason += f"; kernel {name}: {why}"
            call = AttentionCall(module, shape, True, reason, choice.layer_index, partition, name)
            inner = BoundVMoBA(choice, ctx.config, bound["scale"], kernel)
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
    ) -> tuple[_Rewrite, KernelChoice | None] | Skip:
        """:func:`~vmoba_compile.passes.rewrite.decide` on the call as attention sees it
        (``values``), then this setup's own refusals, then the kernel (on the tensors as they
        run: ``rank_values``, over the sequence the attention sees): the rewrite and its kernel,
        or why the call stays dense."""
        choice = decide(values, module, ctx, next_layer)
        if isinstance(choice, Skip):
            return choice
        if self.refusal is not None:
            return Skip(self.refusal.reason, f"context parallel: {self.refusal.message}")
        if self.degree > 1 and not exchange:
            return SkipReason.CP_NOT_EXCHANGED.skip(module=module)
        if exchange and ctx.grid is not None and ctx.grid.video_tokens % self.degree:
            return SkipReason.CP_VIDEO_TOKENS.skip(tokens=ctx.grid.video_tokens, degree=self.degree)
        seq_len = values["query"].shape[2]  # S after the exchange, S / P on the rank before it
        kernel = decide_kernel(rank_values, choice, ctx.config, seq_len=seq_len)
        return kernel if isinstance(kernel, Skip) else (choice, kernel)  # Skip: flash cannot run

    def _exchanged_values(self, values: dict[str, Any], module: str) -> dict[str, Any]:
        """The call's tensors as the attention sees them after the exchange (meta tensors of
        ``[B, H/P, S, D]``), for :func:`~vmoba_compile.passes.rewrite.decide`."""
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
        inner: BoundVMoBA | None,
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


def _source_name(node: fx.Node) -> str | None:
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    return name if isinstance(name, str) else None


def _param_sources(
    gm: fx.GraphModule, example_inputs: Any, names: Mapping[int, str]
) -> list[tuple[str, str]]:
    """``(Dynamo source, model path)`` of every graph input that is a parameter or buffer of
    the running block."""
    out = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, example in zip(placeholders, example_inputs, strict=False):
        full = names.get(id(example))
        src = _source_name(node)
        if full is not None and src is not None:
            out.append((src, full))
    return out


def _resolved_path(source: str, block: torch.nn.Module, path: str) -> str | None:
    """The model path of the module Dynamo names ``source`` in a frame of the block call
    (``L['self']`` is the running block), found by identity: Dynamo may name a module through
    any alias, e.g. diffusers' hook closure (``L['self'].forward.func.__closure__[0].
    cell_contents.forward.__self__.attn1``). Source names are Python expressions over the
    frame's locals (Dynamo's guards evaluate them); one that is not evaluable here gives None."""
    try:
        obj = eval(source, {"__builtins__": {}}, {"L": {"self": block}})  # noqa: S307
    except Exception:  # another frame's locals, or a source form that is not an expression
        return None
    if not isinstance(obj, torch.nn.Module):
        return None
    for name, m in block.named_modules(prefix=path, remove_duplicate=False):
        if m is obj:
            return name
    return None


def _dotted(source: str) -> str:
    """A Dynamo source as a dotted chain: ``L['self']._modules['attn1']`` and
    ``L['self'].attn1`` both become ``L.self.attn1``."""
    return _PATH_ITEM.sub(lambda m: "." + m.group(1), source)


def _module_path(module_source: str, params: list[tuple[str, str]]) -> str | None:
    """The model path of the module Dynamo names ``module_source``, from a parameter under it:
    ``<module_source>._modules['to_q']._parameters['weight']`` that is the running block's
    ``blocks.0.attn1.to_q.weight`` places the module at ``blocks.0.attn1``."""
    mod = _dotted(module_source) + "."
    for src, full in params:
        dotted = _dotted(src)
        if not dotted.startswith(mod):
            continue
        rest = dotted[len(mod) :]
        if rest and full.endswith("." + rest):
            return full[: -len(rest) - 1]
    return None


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
