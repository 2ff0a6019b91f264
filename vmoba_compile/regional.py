"""Regional compilation: compile the repeated blocks, one compiled function per partition.

Compiling the whole model hands Dynamo and inductor a graph of every block: at 30 Wan-1.3B
blocks and 55,296 tokens the cold compile took 155 s (forward) and 329 s (training) on the H100
(benchmarks/README.md). A model's blocks are copies of one class, so one compiled block could
serve them all, as diffusers' ``compile_repeated_blocks`` does; but then every layer would get the
partition of the first one. Here each block call goes to a compiled function chosen by what the
block must run: the partition of each of its VMoBA layers (or dense) and the video grid. Each
such *variant* is its own function object with its own code object, so Dynamo keeps its cache
(and its recompile limit) apart from the others, and blocks of one variant share its graph.
The recurrent 1D-2D-3D schedule then compiles three blocks, whatever the depth.

Everything outside the blocks (embeddings, RoPE, the output head) runs uncompiled, as with
diffusers' regional compilation.

This is what ``optimize`` does by default where every VMoBA self-attention module lies in a
module list. Each block gets one :class:`BlockCall` hook, shared by every optimized model of the
same model (``optimize`` called twice, e.g. with two configurations): a block call goes to the
optimized model whose forward is running.

Activation checkpointing (diffusers' ``torch.utils.checkpoint``, non-reentrant, around each
block) recomputes a block in the backward, outside the optimized model's forward. The block
call then finds its variant from the forward call that took the same input tensor.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .accounting import CONTROLS, Account, forward_codes, in_backward
from .numbering import LayerNumbering
from .passes import AttentionCall, SkipReason
from .passes.rewrite import CURRENT_CONTEXT, CallContext

__all__ = ["BlockCall", "RegionalBlocks", "find_blocks"]

logger = logging.getLogger(__name__)


def _candidates(layer_of: Mapping[str, int]) -> list[str]:
    """The numbered modules in their first order (a learning numbering's candidates)."""
    if isinstance(layer_of, LayerNumbering):
        return list(layer_of.candidates)
    return [p for p, _ in sorted(layer_of.items(), key=lambda kv: kv[1])]


def _part(path: str, ctx: CallContext) -> str:
    """What module ``path`` runs in this call: its partition, ``"dense"``, or ``"cross"``
    where the layer numbering took it out."""
    layer = ctx.layer_of.get(path)
    if layer is None:
        return "cross"
    return "dense" if layer in ctx.dense_layers else ctx.config.partition_for(layer).value


def find_blocks(model: torch.nn.Module, layer_of: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """The repeated block of each VMoBA layer: the outermost entry of a ``ModuleList`` (or
    ``Sequential``) above its self-attention module.

    Returns:
        Block path -> the layer indices inside it, in model order.

    Raises:
        ValueError: a self-attention module sits in no module list.
    """
    modules = dict(model.named_modules())
    blocks: dict[str, list[int]] = {}
    for path, layer in sorted(layer_of.items(), key=lambda kv: kv[1]):
        parts = path.split(".")
        block = None
        for i in range(1, len(parts) + 1):
            parent = modules.get(".".join(parts[: i - 1])) if i > 1 else model
            if isinstance(parent, (torch.nn.ModuleList, torch.nn.Sequential)):
                block = ".".join(parts[:i])
                break
        if block is None:
            raise ValueError(
                f"regional=True compiles the repeated blocks, but the self-attention module "
                f"'{path}' of {type(model).__name__} is in no ModuleList. Use optimize(model) "
                f"without regional=True (whole-model compile)."
            )
        blocks.setdefault(block, []).append(layer)
    return {b: tuple(layers) for b, layers in blocks.items()}


def _block_call(self, *args, **kwargs):
    return self._call_impl(*args, **kwargs)


def _fresh_function(name: str) -> Callable[..., Any]:
    """``_block_call`` under a new code object: Dynamo caches compiled frames per code object,
    so each variant gets its own cache entries and recompile limit."""
    code = _block_call.__code__.replace(co_name=name)
    return types.FunctionType(code, _block_call.__globals__, name)


class BlockCall:
    """A block's ``_compiled_call_impl`` (the hook ``nn.Module.__call__`` runs, as after
    ``module.compile()``): hands the call to the optimized model running it.

    One per block, shared by every optimized model of the same model (``optimize`` may be
    called on a model more than once, e.g. with two configurations): a call inside an optimized
    model's forward goes to that model's :class:`RegionalBlocks`; a recomputation under
    activation checkpointing goes to the one whose forward took the input; any other call runs
    the block as written.
    """

    def __init__(self, block: torch.nn.Module) -> None:
        self.block = block
        self.owners: weakref.WeakSet[RegionalBlocks] = weakref.WeakSet()

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        # A copied block does not belong to the optimized models of the original: the copy
        # runs as written (``_compiled_call_impl`` None) until optimize installs its own hook.
        return None

    @classmethod
    def install(cls, block: torch.nn.Module, owner: RegionalBlocks) -> None:
        impl = getattr(block, "_compiled_call_impl", None)
        if not isinstance(impl, cls):
            impl = cls(block)
            block._compiled_call_impl = impl
        impl.owners.add(owner)

    @classmethod
    def uninstall(cls, block: torch.nn.Module, owner: RegionalBlocks) -> None:
        """Drop ``owner`` from the block's hook; the last owner out removes the hook, so the
        block runs as before ``optimize`` (``nn.Module``'s class default, no compiled call)."""
        impl = block.__dict__.get("_compiled_call_impl")
        if not isinstance(impl, cls):
            return  # someone else's hook (or none): not ours to remove
        impl.owners.discard(owner)
        if not impl.owners:
            del block._compiled_call_impl

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ctx = CURRENT_CONTEXT.get()
        owner = ctx.regional if ctx is not None else None
        if owner is not None and owner in self.owners:
            return owner.call(owner.index_of(self.block), args, kwargs)
        if in_backward():
            taken = self._recalled(args, kwargs)
            if taken is not None:
                owner, key, saved = taken
                token = CURRENT_CONTEXT.set(saved)
                try:
                    return owner.run(key, owner.index_of(self.block), args, kwargs)
                finally:
                    CURRENT_CONTEXT.reset(token)
        # The user's model called directly (not through the optimized model): run it as written.
        return self.block._call_impl(*args, **kwargs)

    def _recalled(self, args: tuple, kwargs: dict) -> tuple[RegionalBlocks, tuple, Any] | None:
        """What a recomputation in the backward runs: the variant of the forward that took the
        same input tensor; else the one variant that every forward still alive ran; else
        (no such forward) None. Several candidates raise."""
        exact, alive, path = [], [], ""
        for owner in list(self.owners):
            index = owner.index_of(self.block)
            path = owner.paths[index]
            hit, live = owner.recall(index, args, kwargs)
            exact += [(owner, *hit)] if hit is not None else []
            alive += [(owner, *e) for e in live]
        found = exact or alive
        if len(found) > 1:
            raise _ambiguous(path, len(found), bool(exact))
        return found[0] if found else None


def _ambiguous(path: str, n: int, same_input: bool = False) -> RuntimeError:
    how = (
        f"{n} optimized models of this model ran it on that same input"
        if same_input
        else f"it was recomputed on an input its forward did not take, and forward calls still "
        f"alive ran it as {n} different variants (grids, dense settings or optimized models)"
    )
    return RuntimeError(
        f"block '{path}' was recomputed in the backward (activation checkpointing), but {how}, "
        f"so the variant to recompute is ambiguous. Use non-reentrant checkpointing around each "
        f"block (diffusers' default, torch.utils.checkpoint(..., use_reentrant=False)), give "
        f"each optimized model its own input tensors, or run backward before the next forward "
        f"of another grid or dense setting."
    )


class RegionalBlocks:
    """The blocks of one optimized model and their compiled variants.

    Args:
        model: the model (its blocks get a :class:`BlockCall` as ``_compiled_call_impl``).
        blocks: :func:`find_blocks`'s map.
        compile_variant: ``(key, fn, on_graph) -> compiled fn``: compiles ``fn(block, *args,
            **kwargs)`` for one variant; ``key`` is :meth:`key`'s; ``on_graph`` is the VMoBA
            backend's report callback.
        report_add: the optimized model's ``report.add``.
        account: the optimized model's :class:`~vmoba_compile.accounting.Account`.
        layer_of: module path -> layer index of the video self-attention modules.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        blocks: dict[str, tuple[int, ...]],
        compile_variant: Callable[..., Callable[..., Any]],
        report_add: Callable[[str, list[AttentionCall]], None],
        account: Account,
        layer_of: Mapping[str, int],
    ) -> None:
        self.paths = list(blocks)
        self.layers = [blocks[p] for p in self.paths]
        self.modules = [model.get_submodule(p) for p in self.paths]
        self._index = {id(m): i for i, m in enumerate(self.modules)}
        self._path_index = {p: i for i, p in enumerate(self.paths)}
        self._compile_variant = compile_variant
        self._report_add = report_add
        self._account = account
        # ``blocks`` holds the numbering's first indices: the candidates' places in model order.
        path_of = dict(enumerate(_candidates(layer_of)))
        # Per block: (path, module) of each of its video self-attention candidates; their layer
        # indices are looked up when the block is called (a learning numbering may change them).
        self._attention = [
            [(path_of[layer], model.get_submodule(path_of[layer])) for layer in layers]
            for layers in self.layers
        ]
        self._reported: set[tuple[tuple, int]] = set()  # (variant, block) in the report
        self._running: list[int] = []  # the blocks whose call is running, innermost last
        self._codes: dict[tuple, Any] = {}  # variant key -> the code object Dynamo compiles
        self.variants: dict[tuple, Callable[..., Any]] = {}
        # (block index, id of its first tensor input) -> (weakref to it, variant key, context):
        # what a checkpointed block's recomputation in the backward must run.
        self._taken: dict[tuple[int, int], tuple[weakref.ref, tuple, CallContext]] = {}
        for m in self.modules:
            BlockCall.install(m, self)

    def uninstall(self) -> None:
        """Leave the blocks: their hooks drop this model (removed when no other optimized model
        of the same model uses them) and the compiled variants are released."""
        for m in self.modules:
            BlockCall.uninstall(m, self)
        self.variants.clear()
        self._taken.clear()

    @property
    def remembered(self) -> int:
        """How many block calls are remembered for a recomputation in the backward: one per
        block call of a forward whose input tensor is still alive (0 once the forwards' tensors
        are released, e.g. after their backward)."""
        return len(self._taken)

    def index_of(self, block: torch.nn.Module) -> int:
        return self._index[id(block)]

    def key(self, index: int, ctx: CallContext) -> tuple:
        """What block ``index`` runs in this call: ``("dense",)``, or its layers' partitions
        (``"cross"`` for a module the numbering took out), the grid, the text flag and the
        block's class (blocks of two classes, as HunyuanVideo's double- and single-stream
        blocks, never share a variant)."""
        parts = tuple(_part(path, ctx) for path, _ in self._attention[index])
        if all(p == "dense" for p in parts):
            return ("dense",)
        cls = type(self.modules[index])
        return (
            parts,
            ctx.describe(),
            ctx.data_dependent_text,
            f"{cls.__module__}.{cls.__qualname__}",
        )

    def variant(self, key: tuple, index: int) -> Callable[..., Any]:
        """The compiled function of ``key`` (made on first use; ``index``: the block whose call
        makes it, which Dynamo traces)."""
        fn = self.variants.get(key)
        if fn is None:
            name = "vmoba_block_" + ("_".join(key[0]) if key != ("dense",) else "dense")

            def on_graph(where: str, calls: list[AttentionCall]) -> None:
                ctx = CURRENT_CONTEXT.get()
                traced = self._running[-1] if self._running else index
                # The blocks of the traced block's key as it stands after the trace (a
                # learning numbering may have marked cross-attention modules in it).
                now = self.key(traced, ctx) if ctx is not None else key
                shared = [i for i in range(len(self.paths)) if self._final(i, now, ctx)]
                shared = sorted({traced, *shared})
                self._reported.update((key, i) for i in shared)
                n = len(shared)
                self._report_add(
                    f"{where}; block {self.paths[traced]}'s graph, run by {n} block"
                    + ("s" if n > 1 else ""),
                    self._expand(shared, calls, ctx),
                )

            def on_run(calls: list[AttentionCall], out: Any) -> None:
                # The graph's calls carry the paths of the block Dynamo traced; count them for
                # the block running it.
                running = self._running[-1] if self._running else index
                self._learn(key, running, calls)
                self._account.graph_ran(calls, out, lambda m: self._moved(m, running))

            logger.info(
                "compiling block variant %d, %s, on block %s (blocks of the same variant reuse it)",
                len(self.variants) + 1,
                "dense" if key == ("dense",) else f"partitions {'+'.join(key[0])}, {key[1]}",
                self.paths[index],
            )
            fresh = _fresh_function(name)
            self._codes[key] = fresh.__code__
            fn = self._compile_variant(key, fresh, on_graph, on_run)
            self.variants[key] = fn
        return fn

    def sole_module_why(self, module: str, ctx: CallContext) -> str | None:
        """None where the block being traced holds ``module`` and no other module of the layer
        numbering (``ctx.layer_of``); else why not."""
        if not self._running:
            return "no block call is running"
        index = self._running[-1]
        numbered = [p for p, _ in self._attention[index] if p in ctx.layer_of]
        if module not in numbered:
            return f"it is not in the block being compiled ({self.paths[index]})"
        if len(numbered) > 1:
            return f"its block {self.paths[index]} has {len(numbered)} numbered modules"
        return None

    def _final(self, i: int, key: tuple, ctx: CallContext | None) -> bool:
        """Block ``i`` runs ``key`` in this call, and its layer indices are final."""
        if ctx is None or self.key(i, ctx) != key:
            return False
        final = getattr(ctx.layer_of, "final", None)
        return final is None or all(final(p) for p, _ in self._attention[i])

    def _learn(self, key: tuple, dst: int, calls: list[AttentionCall]) -> None:
        """Block ``dst`` ran a graph of variant ``key``: that graph's calls are block ``dst``'s
        calls, so what they show about the layer numbering holds for block ``dst``'s modules
        (:mod:`vmoba_compile.numbering`), and the variant serves the key the block has now (the
        same partitions, its cross-attention modules marked). A block whose run the report
        does not list yet gets its lines."""
        ctx = CURRENT_CONTEXT.get()
        numbering = ctx.layer_of if ctx is not None else None
        if ctx is None or not isinstance(numbering, LayerNumbering):
            return
        moved = [dataclasses.replace(c, module=self._moved(c.module, dst)) for c in calls]
        if ctx.parallel is not None:  # its graphs decide without learning: their indices hold
            for c in moved:
                if c.skip is not SkipReason.CROSS_ATTENTION and c.module in numbering:
                    numbering.hold(c.module)
        for c in moved:
            numbering.note(c.module, c.skip is SkipReason.CROSS_ATTENTION)
        now = self.key(dst, ctx)
        if now != key and now not in self.variants:
            self.variants[now], self._codes[now] = self.variants[key], self._codes[key]
        if (key, dst) not in self._reported:
            self._reported.add((key, dst))
            src = next((p for c in calls for p in [self._block_path(c.module)] if p), "?")
            where = f"{ctx.describe()}; block {self.paths[dst]} ran block {src}'s graph"
            self._report_add(where, self._expand([dst], calls, ctx))

    def _expand(
        self, shared: list[int], calls: list[AttentionCall], ctx: CallContext | None
    ) -> list[AttentionCall]:
        """The decisions of one block's graph, repeated for every block of ``shared`` (module
        path and layer index of each)."""
        layer_of = ctx.layer_of if ctx is not None else {}
        out = []
        for i in shared:
            for c in calls:
                module = self._moved(c.module, i)
                layer = layer_of.get(module, c.layer_index) if c.rewritten else None
                out.append(dataclasses.replace(c, module=module, layer_index=layer))
        return out

    def _block_path(self, module: str) -> str | None:
        """The block ``module`` lies in (or is), or None."""
        parts = module.split(".")
        return next(
            (".".join(parts[:i]) for i in range(1, len(parts) + 1)
             if ".".join(parts[:i]) in self._path_index),
            None,
        )  # fmt: skip

    def _moved(self, module: str, dst: int) -> str:
        """``module``'s path inside the block it lies in (the block whose call Dynamo traced:
        the variant's first block, or another one where a guard recompiled it) as the same
        module's path inside block ``dst``; a path outside every block unchanged, as is the
        block itself where it is the attention module."""
        block = self._block_path(module)
        return module if block is None else self.paths[dst] + module[len(block) :]

    def call(self, index: int, args: tuple, kwargs: dict) -> Any:
        """Block ``index`` called inside this model's forward: its variant, remembered for a
        recomputation in the backward."""
        ctx = CURRENT_CONTEXT.get()
        assert ctx is not None, "BlockCall hands a block to its owner only inside its forward"
        key = self.key(index, ctx)
        # Also without gradients: reentrant checkpointing runs the forward under no_grad.
        self._remember(index, args, kwargs, key, ctx)
        ran, ctx.ran = ctx.ran, set()
        try:
            out = self.run(key, index, args, kwargs)
            self._settle(index, key, ctx)
        finally:
            ran |= ctx.ran
            ctx.ran = ran
        return out

    def run(self, key: tuple, index: int, args: tuple, kwargs: dict) -> Any:
        """Block ``index`` runs variant ``key`` (in the forward, or recomputed in the
        backward)."""
        fn = self.variant(key, index)
        self._running.append(index)
        try:
            return fn(self.modules[index], *args, **kwargs)
        finally:
            self._running.pop()

    def _settle(self, index: int, key: tuple, ctx: CallContext) -> None:
        """After a call of block ``index``: its video self-attention modules that no compiled
        graph ran (``ctx.ran``) ran dense, or not at all; count them, with the cause."""
        numbered = [(p, m) for p, m in self._attention[index] if p in ctx.layer_of]
        if key == ("dense",):
            self._account.ran_dense([p for p, _ in numbered], CONTROLS, planned=False)
            return
        dense = ctx.dense_layers
        missing = [(p, m) for p, m in numbered if ctx.layer_of[p] not in dense and p not in ctx.ran]
        if not missing:
            return
        block = self.modules[index]
        codes = [self._codes[key], *forward_codes([block, *(m for _, m in missing)])]
        where = [(self.paths[index], block), *missing]
        self._account.no_graph([p for p, _ in missing], codes, where)

    @staticmethod
    def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                return a
        return None

    def _remember(self, index: int, args: tuple, kwargs: dict, key: tuple, ctx) -> None:
        x = self._first_tensor(args, kwargs)
        if x is None:
            return
        slot = (index, id(x))
        taken = self._taken

        def forget(_ref: weakref.ref, slot=slot) -> None:
            entry = taken.get(slot)
            if entry is not None and entry[0] is _ref:
                del taken[slot]

        taken[slot] = (weakref.ref(x, forget), key, ctx)

    def recall(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple | None, list[tuple]]:
        """For a recomputation of block ``index``: the ``(key, context)`` of the forward that
        took the same input tensor (or None), and those of the distinct variants that forwards
        still alive ran for the block."""
        x = self._first_tensor(args, kwargs)
        entry = self._taken.get((index, id(x))) if x is not None else None
        if entry is not None and entry[0]() is x:
            return (entry[1], entry[2]), []
        entries = list(self._taken.items())  # a weakref callback may delete entries meanwhile
        alive = {e[1]: e for (i, _), e in entries if i == index and e[0]() is not None}
        return None, [(e[1], e[2]) for e in alive.values()]
