"""``optimize(model)``, ``explain(model, ...)`` and the optimized model (``restore()``): the
user-facing side of the pass (the module ``vmoba_compile.api``; ``vmoba_compile.optimize`` is the
function). The run-time controls live in :mod:`vmoba_compile.controls`, the compile options in
:mod:`vmoba_compile.options`; both are importable from here as before."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from typing_extensions import Never

import torch

from .accounting import CONTROLS, Account, forward_codes
from .adapters.base import ModelAdapter
from .adapters.base import describe as describe_value
from .adapters.registry import find_adapter, layout_source
from .adapters.structural import is_marked_cross_attention
from .config import Kernel, VMoBAConfig
from .controls import VMoBAControls
from .kernels import choice as kernel_choice
from .layout import VideoLayout
from .numbering import LayerNumbering
from .options import (
    RECOMPILE_LIMIT,
    CompileOptions,
    memory_inductor_defaults,
    safe_inductor_defaults,
)
from .parallel import ParallelPlan, detect_parallel
from .passes import RewriteReport, VMoBABackend
from .passes.report import SkipReason
from .passes.rewrite import CURRENT_CONTEXT, CallContext
from .regional import BlockCall, RegionalBlocks, find_blocks

__all__ = [
    "VMoBAControls",
    "VMoBAModule",
    "explain",
    "memory_inductor_defaults",
    "optimize",
    "safe_inductor_defaults",
]

logger = logging.getLogger(__name__)


def _compiled_blocks(model: torch.nn.Module, cls: type | None = None) -> list[str]:
    """Submodules compiled on their own (``module.compile()``), or with ``cls`` those whose
    compiled call is a ``cls``."""
    found = [(n, getattr(m, "_compiled_call_impl", None)) for n, m in model.named_modules()]
    return [n for n, c in found if c is not None and (cls is None or isinstance(c, cls))]


def _refuse_regional(model: torch.nn.Module, regional: bool = False) -> None:
    """Refuse a model whose submodules are compiled on their own by someone else; with
    ``regional=False`` (a whole-model compile) also one that an earlier regional ``optimize``
    hooked."""
    ours = _compiled_blocks(model, BlockCall)
    if ours and not regional:
        raise RuntimeError(
            f"{type(model).__name__} was already optimized with regional compilation (its "
            f"blocks {ours[0]}, ... are hooked), and this optimize compiles the whole model "
            f"(regional=False). Optimize it without regional=False (the blocks' hooks are "
            f"shared), or reload the model for a whole-model compile."
        )
    done = [n for n in _compiled_blocks(model) if n not in ours]
    if done:
        shown = ", ".join(done[:3]) + (", ..." if len(done) > 3 else "")
        raise RuntimeError(
            f"{len(done)} submodules of {type(model).__name__} are compiled on their own "
            f"({shown}), e.g. by diffusers' compile_repeated_blocks. That shares one graph among "
            f"all blocks, so every layer would get one VMoBA partition. vmoba_compile compiles "
            f"the blocks itself, one graph per partition: use optimize(model) on a model without "
            f"that compilation (reload it, or do not call compile_repeated_blocks)."
        )


_WRAPPED = "_orig_mod."


def _state_dict_without_wrapper(
    module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """State-dict post-hook: ``<prefix>_orig_mod.<key>`` becomes ``<prefix><key>`` (order kept)."""
    inner = prefix + _WRAPPED
    items = [
        (prefix + k[len(inner) :] if k.startswith(inner) else k, v) for k, v in state_dict.items()
    ]
    state_dict.clear()
    state_dict.update(items)


def _state_dict_into_wrapper(
    module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:
    """Load pre-hook: the wrapped model's keys (``<prefix><key>``) load into ``_orig_mod``."""
    inner = prefix + _WRAPPED
    for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + k[len(prefix) :]] = state_dict.pop(k)


class VMoBAModule(torch.nn.Module):
    """A model compiled through the VMoBA backend (what :func:`optimize` returns).

    Its parameters are the wrapped model's, and so are its ``state_dict`` keys (no
    ``_orig_mod.`` prefix, unlike ``torch.compile``'s wrapper): a checkpoint saved from either
    loads into the other; ``load_state_dict`` also takes keys with the prefix. Unknown attributes
    are looked up on the wrapped model, so pipelines can use it in place of the model.

    :meth:`restore` undoes :func:`optimize` and returns the model; used as a context manager
    (``with optimize(model) as opt:``) it restores on exit.

    Attributes:
        vmoba: the run-time :class:`VMoBAControls`.
        report: the :class:`RewriteReport` of every graph compiled so far.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: VMoBAConfig,
        layout: VideoLayout | None,
        adapter: ModelAdapter | None,
        strict: bool,
        compile_options: CompileOptions,
        layer_of: Mapping[str, int] | None = None,
        blocks: dict[str, tuple[int, ...]] | None = None,
        parallel: ParallelPlan | None = None,
    ) -> None:
        super().__init__()
        self._orig_mod = model
        self._vmoba_config = config
        self._vmoba_layout = layout
        self._vmoba_adapter = adapter
        self._vmoba_strict = strict
        self._vmoba_compile = compile_options
        self._vmoba_layer_of = _layer_numbering(model, adapter) if layer_of is None else layer_of
        self._vmoba_modules = tuple(model.modules())
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
        self._vmoba_param_names = {id(t): n for n, t in named}
        self._vmoba_module_names = {id(m): n for n, m in model.named_modules()}
        self._vmoba_compiled: dict[Any, tuple[Any, VMoBABackend | None]] = {}
        self._vmoba_restored = False
        self.vmoba = VMoBAControls()
        self.report = RewriteReport(
            type(model).__name__,
            adapter.family if adapter else None,
            found_by=layout_source(model, adapter, layout is not None),
        )
        self._vmoba_regional: RegionalBlocks | None = None
        self._vmoba_backends: list[VMoBABackend] = []
        self._vmoba_parallel = parallel  # None: one process (vmoba_compile.parallel)
        self.report.parallel = parallel.describe() if parallel is not None else None
        self._vmoba_numbering_warned: set[str] = set()
        self._vmoba_numbering_checked = 0  # graphs of the report the numbering check has seen
        self.register_state_dict_post_hook(_state_dict_without_wrapper)
        self.register_load_state_dict_pre_hook(_state_dict_into_wrapper)
        self._vmoba_account = Account(
            self.report, type(model).__name__, strict, self._vmoba_compile.recompile_limit
        )
        if blocks:  # optimize's choice (_regional_blocks); None: the whole model
            self._vmoba_regional = RegionalBlocks(
                model,
                blocks,
                self._compile_block_variant,
                self.report.add,
                self._vmoba_account,
                self._vmoba_layer_of,
            )
            self.report.compiled = f"{len(blocks)} repeated blocks (regional)"
            self.report.outside = _attention_modules(model, exclude=tuple(blocks))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["_orig_mod"], name)

    def restore(self) -> torch.nn.Module:
        """Undo :func:`optimize`: remove what it installed on the model and return the model.

        With regional compilation the blocks' ``_compiled_call_impl`` hooks are shared by every
        optimized model of the same model; this one leaves them, and the last one to leave
        removes them, so the blocks run as before ``optimize`` (another optimized model of the
        model keeps working until it is restored too). The compiled graphs are released. The
        optimized model cannot be called afterwards; calling ``restore`` again does nothing.

        Returns:
            The original model (the one passed to :func:`optimize`).
        """
        if self._vmoba_regional is not None:
            self._vmoba_regional.uninstall()
        self._vmoba_compiled.clear()
        self._vmoba_backends.clear()
        self._vmoba_restored = True
        return self._orig_mod

    def __enter__(self) -> VMoBAModule:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    @property
    def config_vmoba(self) -> VMoBAConfig:
        """The VMoBA configuration (``.config`` stays the wrapped model's own config)."""
        return self._vmoba_config

    @property
    def regional_blocks(self) -> RegionalBlocks | None:
        """The repeated blocks compiled one by one, or None where the whole model is compiled.

        Its ``paths`` name the blocks and ``variants`` holds one compiled function per variant
        compiled so far (keyed as :meth:`~vmoba_compile.regional.RegionalBlocks.key` says: the
        partitions of the block's layers, the grid, the block class; ``("dense",)`` for a dense
        block). Read it to see what compiled; do not change it.
        """
        return self._vmoba_regional

    @property
    def parallel_plan(self) -> ParallelPlan | None:
        """The multi-GPU setup ``optimize`` found (diffusers' Ulysses context parallelism and/or
        FSDP2; :mod:`vmoba_compile.parallel`), or None in one process. Its ``exchanged`` names
        the modules whose Ulysses exchange the pass does itself. Read it; do not change it."""
        return self._vmoba_parallel

    @property
    def inductor_options(self) -> dict[str, Any]:
        """The inductor options this model's compiles hand inductor (a copy):
        :func:`safe_inductor_defaults`, :func:`memory_inductor_defaults`, then ``mode=``'s
        options, then ``options=``. Unused under ``lowering="aot_eager"``."""
        return dict(self._vmoba_compile.inductor_options)

    def _compile(self, fn: Any, backend: VMoBABackend | None) -> Any:
        return self._vmoba_compile.compile(fn, backend)

    def _backend(self, on_graph: Any, on_run: Any = None) -> VMoBABackend:
        return self._vmoba_compile.backend(on_graph, on_run)

    def _variant(self, key: Any) -> tuple[Any, VMoBABackend | None]:
        """The compiled model for ``"dense"`` (warm-up) or a set of dense layers, and its VMoBA
        backend (None for the dense one); compiled on first use."""
        if key not in self._vmoba_compiled:
            logger.info(
                "compiling the whole %s (%s) on its first call",
                type(self._orig_mod).__name__,
                "dense warm-up" if key == "dense" else f"dense layers {sorted(key) or 'none'}",
            )
            backend = (
                None
                if key == "dense"
                else self._backend(self.report.add, self._vmoba_account.graph_ran)
            )
            self._vmoba_compiled[key] = self._compile(self._orig_mod, backend), backend
        return self._vmoba_compiled[key]

    def _compile_block_variant(self, key: tuple, fn: Any, on_graph: Any, on_run: Any) -> Any:
        """One compiled block variant of regional compilation (see :mod:`.regional`); under a
        parallel setup run in its block scope (:meth:`~vmoba_compile.parallel.ParallelPlan.
        wrap_variant`), the dense variant through the VMoBA backend where the pass does the
        Ulysses exchange (it rewrites nothing, but puts the exchange around each call)."""
        parallel = self._vmoba_parallel
        backend = None
        if key != ("dense",):
            backend = self._backend(on_graph, on_run)
            self._vmoba_backends.append(backend)
        elif parallel is not None and parallel.exchanges:
            backend = self._backend(lambda where, calls: None)
        compiled = self._compile(fn, backend)
        if parallel is None:
            return compiled
        regional = self._vmoba_regional
        assert regional is not None  # a parallel setup compiles block by block
        paths = {id(m): p for p, m in zip(regional.paths, regional.modules, strict=True)}
        return parallel.wrap_variant(compiled, paths, backend)

    def __deepcopy__(self, memo: dict[int, Any]) -> VMoBAModule:
        """A copy of the model, optimized as this one (same config, layout, options and runtime
        controls); it compiles its own graphs and keeps its own report. The blocks' hooks are
        not copied with the model (:meth:`BlockCall.__deepcopy__`): the copy installs its own."""
        if self._vmoba_parallel is not None:
            raise TypeError(
                "copy.deepcopy of a model optimized under context parallelism or FSDP2 is not "
                "supported (process groups and sharded parameters do not copy); optimize the "
                "copied model instead."
            )
        if self._vmoba_restored:
            raise RuntimeError("this optimized model was restored; deepcopy the model instead.")
        model = copy.deepcopy(self._orig_mod, memo)
        regional = self._vmoba_regional
        blocks = dict(zip(regional.paths, regional.layers, strict=True)) if regional else None
        twin = VMoBAModule(
            model,
            self._vmoba_config,
            self._vmoba_layout,
            self._vmoba_adapter,
            self._vmoba_strict,
            self._vmoba_compile,
            _numbering_copy(self._vmoba_layer_of),
            blocks,
        )
        twin.vmoba = copy.copy(self.vmoba)
        memo[id(self)] = twin
        return twin

    # An outer torch.compile(optimized) must not trace into the wrapper: it would inline the
    # inner compiled functions and run the model's attention through its own backend, dense.
    # Disabled here, the wrapper runs its own compiled graphs inside the outer graph's break.
    @torch._dynamo.disable
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._vmoba_restored:
            raise RuntimeError(
                f"this optimized {type(self._orig_mod).__name__} was restored (restore() or the "
                f"end of its with-block) and no longer runs VMoBA; call the model itself, or "
                f"optimize(model) again."
            )
        _refuse_wrapper_patches(self)
        impls = (getattr(m, "_compiled_call_impl", None) for m in self._vmoba_modules)
        if any(c is not None and not isinstance(c, BlockCall) for c in impls):
            _refuse_regional(self._orig_mod, regional=True)  # compile_repeated_blocks ran after
        if self._vmoba_regional is not None:
            return self._forward_regional(args, kwargs)
        controls = self.vmoba
        if controls.dense_now:
            out = self._variant("dense")[0](*args, **kwargs)
            controls._called()
            self._vmoba_account.ran_dense(self._vmoba_layer_of, CONTROLS, planned=False)
            return out
        ctx = _context(self, args, kwargs, controls.dense_layers)
        fn, backend = self._variant(controls.dense_layers)
        assert backend is not None  # only the "dense" variant has none
        runs = backend.graph_runs
        with _call_scope(ctx):
            out = fn(*args, **kwargs)
        controls._called()
        self._settle(ctx, backend.graph_runs > runs)
        self._check_numbering()
        self._check_strict(ctx)
        return out

    def _forward_regional(self, args: tuple, kwargs: dict) -> Any:
        """The model runs as written; each block call runs its compiled variant."""
        controls, regional = self.vmoba, self._vmoba_regional
        layers = frozenset(self._vmoba_layer_of.values())  # every layer sits in a block
        dense = layers if controls.dense_now else controls.dense_layers
        ctx = _context(self, args, kwargs, dense)
        ctx.regional = regional
        ctx.parallel = self._vmoba_parallel
        with _call_scope(ctx):  # each block call settles its own account (RegionalBlocks)
            out = self._orig_mod(*args, **kwargs)
        controls._called()
        self._check_numbering()
        self._check_strict(ctx)
        return out

    def _settle(self, ctx: CallContext, graphs_ran: bool) -> None:
        """After a whole-model forward: the calls planned as VMoBA for this grid and these
        dense layers that no compiled graph ran are counted (:mod:`.accounting`). Where no
        graph ran at all (none compiled), every video self-attention module not kept dense
        counts as planned."""
        where = ctx.describe()
        planned = {
            c.module
            for w, calls in self.report.graphs
            if w == where
            for c in calls
            if c.rewritten and c.layer_index not in ctx.dense_layers
        }
        if not graphs_ran and not planned:
            planned = {m for m, i in self._vmoba_layer_of.items() if i not in ctx.dense_layers}
        missing = sorted(planned - ctx.ran)
        if not missing:
            return
        modules = dict(self._orig_mod.named_modules())
        found = [(m, modules[m]) for m in missing if m in modules]
        codes = [type(self._orig_mod).forward.__code__, *forward_codes(m for _, m in found)]
        self._vmoba_account.no_graph(missing, codes, [("", self._orig_mod), *found])

    def _check_numbering(self) -> None:
        """Warn (once per module) where the layer numbering counted a module whose every call
        is a cross-attention: the layers after it take the partitions one step on."""
        if len(self.report.graphs) == self._vmoba_numbering_checked:
            return  # no graph compiled since the last check
        self._vmoba_numbering_checked = len(self.report.graphs)
        calls: dict[str, list[Any]] = {}
        for _, graph_calls in self.report.graphs:
            for c in graph_calls:
                calls.setdefault(c.module, []).append(c)
        for module, found in calls.items():
            if module not in self._vmoba_layer_of or module in self._vmoba_numbering_warned:
                continue
            cross = SkipReason.CROSS_ATTENTION
            if all(c.skip is cross for c in found):
                self._vmoba_numbering_warned.add(module)
                warnings.warn(
                    f"{type(self._orig_mod).__name__}: {module} is numbered as video "
                    f"self-attention layer {self._vmoba_layer_of[module]}, but its calls are "
                    f"cross-attention, so the layers after it take the schedule's partitions "
                    f"one step on. Mark it (is_cross_attention = True, or 'cross' in its class "
                    f"or attribute name) and optimize again.",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def _check_strict(self, ctx: CallContext) -> None:
        if self._vmoba_strict and ctx.calls and not any(c.rewritten for c in ctx.calls):
            raise RuntimeError(
                f"strict=True and no attention call was rewritten:\n{self.report}\n"
                f"Pass layout= if the adapter's grid is wrong, or strict=False to run dense."
            )


def _refuse_wrapper_patches(owner: VMoBAModule) -> None:
    """Raise when a tool patched the optimized wrapper instead of the model (cache-dit's
    ``enable_cache`` through a ``BlockAdapter`` or a pipeline holding the optimized model): it
    replaces the wrapper's ``forward`` and swaps its ``blocks`` for cached ones while the call
    runs, but the wrapped model runs its own blocks, so the tool would silently do nothing."""
    shadowed = sorted(set(owner._modules) - {"_orig_mod"})
    if "forward" not in owner.__dict__ and not shadowed:
        return
    name = type(owner._orig_mod).__name__
    what = [*(["forward"] if "forward" in owner.__dict__ else []), *shadowed]
    raise RuntimeError(
        f"the optimized {name} had {', '.join(what)} replaced on the optimized wrapper itself "
        f"(cache-dit's enable_cache on the optimized model or a pipeline holding it does this); "
        f"the wrapped {name} runs its own forward and blocks, so that patch would silently not "
        f"apply. Patch the model, not the wrapper: cache_dit.enable_cache(model) (or the "
        f"pipeline while pipe.transformer is still the model), before or after "
        f"opt = optimize(model)."
    )


def _regional_blocks(
    model: torch.nn.Module, layer_of: Mapping[str, int], regional: bool | None
) -> dict[str, tuple[int, ...]] | None:
    """The blocks to compile one by one, or None to compile the whole model.

    ``regional=None`` (the default) compiles the blocks when every VMoBA self-attention module
    sits in a module list, and the whole model otherwise (no such module, or one outside any
    list); ``True`` requires the blocks (:func:`~vmoba_compile.regional.find_blocks` raises with
    the fix); ``False`` compiles the whole model.
    """
    if regional is False or (regional is None and not layer_of):
        return None
    try:
        return find_blocks(model, layer_of)
    except ValueError:
        if regional:
            raise
        return None


def _attention_modules(
    model: torch.nn.Module, exclude: tuple[str, ...] = (), self_only: bool = False
) -> list[str]:
    """The outermost modules whose class name contains "Attention", in ``named_modules()``
    order, leaving out those inside the modules ``exclude`` names; with ``self_only`` also those
    marked as cross-attention (:func:`~vmoba_compile.adapters.structural.
    is_marked_cross_attention`) and what they hold."""
    names: list[str] = []
    cross: list[str] = []
    for name, m in model.named_modules():
        inside = any(name == p or name.startswith(p + ".") for p in (*exclude, *names, *cross))
        if "attention" not in type(m).__name__.lower() or inside:
            continue
        marked = self_only and is_marked_cross_attention(name, m)
        (cross if marked else names).append(name)
    return names


def _layer_numbering(model: torch.nn.Module, adapter: ModelAdapter | None) -> LayerNumbering:
    """Module path -> layer index: the adapter's self-attention modules, in model order.

    Without an adapter (explicit layout), the outermost modules whose class name contains
    "Attention", except those marked as cross-attention, are numbered in ``named_modules()``
    order; calls in other modules are numbered in graph order (whole-model compile) or stay
    dense (``LAYER_UNNUMBERED``, block by block). Such a numbering (and the structural
    adapter's) takes a module out once a compiled graph shows its call to be cross-attention
    (:mod:`vmoba_compile.numbering`); a numbered module whose calls all turn out to be
    cross-attention and could not be taken out is warned about at run time
    (:meth:`VMoBAModule._check_numbering`).
    """
    if adapter is not None:
        names = adapter.self_attention_modules(model)
    else:
        names = _attention_modules(model, self_only=True)
    # Candidates by class name (no family adapter) learn which of them are cross-attention.
    return LayerNumbering(names, learns=adapter is None or adapter.family == "structural")


def _context(
    owner: VMoBAModule, args: tuple, kwargs: dict, dense_layers: frozenset[int]
) -> CallContext:
    adapter = owner._vmoba_adapter
    ctx = CallContext(
        config=owner._vmoba_config,
        family=adapter.family if adapter is not None else None,
        layer_of=owner._vmoba_layer_of,
        layout=owner._vmoba_layout,
        dense_layers=dense_layers,
        param_names=owner._vmoba_param_names,
        module_names=owner._vmoba_module_names,
        data_dependent_text=bool(adapter is not None and adapter.data_dependent_text),
    )
    if owner._vmoba_layout is None and adapter is not None:
        try:
            ctx.grid = adapter.grid(owner._orig_mod, args, kwargs)
        except NotImplementedError as e:
            ctx.grid_error = str(e)
    return ctx


@contextlib.contextmanager
def _call_scope(ctx: CallContext) -> Iterator[None]:
    """The call context for the backend; for adapters whose text count is data-dependent, Dynamo
    traces ``nonzero``-like ops for this call's compiles (restored on exit) instead of running
    the whole attention eagerly."""
    token = CURRENT_CONTEXT.set(ctx)
    try:
        if ctx.data_dependent_text:
            with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
                yield
        else:
            yield
    finally:
        CURRENT_CONTEXT.reset(token)


def _resolve(model: Any, config: Any, layout: Any) -> tuple[VMoBAConfig, ModelAdapter | None]:
    if isinstance(model, VMoBAModule):
        raise TypeError("the model is already optimized; pass the original model.")
    if not isinstance(model, torch.nn.Module):
        inner = getattr(model, "transformer", None)
        hint = " This looks like a pipeline: pass pipe.transformer." if inner is not None else ""
        raise TypeError(f"optimize expects a torch.nn.Module; got {type(model).__name__}.{hint}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError(
            "the model is already wrapped by torch.compile; pass the uncompiled model "
            "(model._orig_mod): vmoba_compile compiles it with its own backend."
        )
    config = VMoBAConfig() if config is None else config
    if not isinstance(config, VMoBAConfig):
        raise TypeError(f"config must be a VMoBAConfig or None; got {type(config).__name__}.")
    if layout is not None and not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a VideoLayout or None; got {type(layout).__name__}.")
    missing = kernel_choice.flash_unavailable() if config.kernel is Kernel.FLASH else None
    if missing is not None:
        raise RuntimeError(f"VMoBAConfig(kernel='flash'): {missing}; or use kernel='auto'.")
    adapter = None
    try:
        adapter = find_adapter(model)
    except ValueError:
        if layout is None:
            raise
    return config, adapter


def optimize(
    model: torch.nn.Module,
    config: VMoBAConfig | None = None,
    *,
    layout: VideoLayout | None = None,
    strict: bool = False,
    fullgraph: bool = False,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    lowering: Literal["inductor", "aot_eager"] = "inductor",
    regional: bool | None = None,
    recompile_limit: int = RECOMPILE_LIMIT,
    **unsupported: Never,
) -> VMoBAModule:
    """Compile ``model`` with its video self-attention rewritten to VMoBA.

    Args:
        model: a video transformer (diffusers / transformers families with an adapter and
            their subclasses, a model the structural fallback can read, or any model with
            ``layout=``). Its code is not changed; its modules are shared.
        config: VMoBA settings (default ``VMoBAConfig()``).
        layout: the token layout of every video self-attention call, for models without an
            adapter or to override it. Calls whose length differs stay dense.
        strict: raise (with the report) when a compiled forward call rewrote nothing.
        fullgraph: as in ``torch.compile``: raise on a graph break instead of splitting the
            graph. Shapes are always static (``dynamic=False``: VMoBA fixes each call's block
            partition at compile time, so each resolution compiles once).
        mode: as in ``torch.compile`` (``"max-autotune"``, ...): its inductor options, applied
            to this compile only.
        options: inductor options for this compile only. They start from
            :func:`safe_inductor_defaults` (mix-order reductions off: they give wrong
            ``scale_shift_table`` gradients) and :func:`memory_inductor_defaults` (kernels kept
            in program order: training memory) and override them; the global inductor config
            is never written.
        lowering: ``"inductor"`` (fused kernels) or ``"aot_eager"`` (skips inductor: for
            debugging and fast CPU checks of the rewrite; slow kernels).
        regional: by default (None) the repeated blocks are compiled instead of the whole
            model when every VMoBA self-attention module lies in a module list (every supported
            family): one compiled block per partition of the schedule (and per grid), shared by
            the blocks of that partition; the rest of the model runs uncompiled, and the report
            lists only the blocks' attention calls. Cold compile then no longer grows with the
            depth (:mod:`vmoba_compile.regional`). The blocks' ``_compiled_call_impl`` is set,
            as ``module.compile()`` does (called directly, the model runs as written), until
            :meth:`VMoBAModule.restore` removes it. ``True`` requires the blocks; ``False``
            compiles the whole model (every attention call in the report, slower cold compile).
        recompile_limit: compiled versions each compiled region (a block variant, or the
            model) may hold, as ``torch.compile``'s own (scoped to this model; default
            :data:`RECOMPILE_LIMIT`, 64): one per resolution, dense-layer set and value of a
            Python constant the graph reads, such as each strength of a LoRA sweep. Past it
            Dynamo runs the region eagerly: dense, as ``report.executions`` counts and warns.
            Ignored (Dynamo's ``recompile_limit`` holds) on torch without the argument.
        **unsupported: none: any other keyword (``dynamic=``, ``backend=``) raises, saying
            what is accepted.

    Returns:
        A :class:`VMoBAModule`; call it like the model. ``.report`` lists every attention call
        and ``.vmoba`` holds the run-time controls (dense warm-up steps, dense layers).

    Raises:
        ValueError: no adapter knows the model, the structural fallback cannot read it, and no
            layout was given (the message lists the known families and what the fallback
            missed).
        TypeError: an unknown keyword, or ``options`` not a dict.
        RuntimeError: submodules are already compiled on their own (diffusers' regional
            compilation), or ``regional=False`` on a model that an earlier ``optimize``
            compiled block by block.
    """
    config, adapter = _resolve(model, config, layout)
    checked = CompileOptions.check(
        fullgraph=fullgraph,
        mode=mode,
        options=options,
        lowering=lowering,
        regional=regional,
        recompile_limit=recompile_limit,
        **unsupported,
    )
    layer_of = _layer_numbering(model, adapter)
    blocks = _regional_blocks(model, layer_of, checked.regional)
    _refuse_regional(model, regional=bool(blocks))
    parallel = detect_parallel(model, adapter.family if adapter else None, layer_of, blocks)
    return VMoBAModule(model, config, layout, adapter, strict, checked, layer_of, blocks, parallel)


def explain(
    model: torch.nn.Module,
    args: tuple | list = (),
    kwargs: dict[str, Any] | None = None,
    *,
    config: VMoBAConfig | None = None,
    layout: VideoLayout | None = None,
) -> RewriteReport:
    """What :func:`optimize` would do on ``model(*args, **kwargs)``, without compiling kernels.

    Traces the model once (Dynamo, no inductor) and runs the graphs unchanged under
    ``torch.no_grad()``. The model's inputs go in as one tuple and one dict, so no name of the
    model's own forward (a ``layout`` or ``config`` parameter) can collide with explain's::

        explain(model, kwargs=inputs)                          # optimize(model)
        explain(model, (x, t), {"context": c}, layout=layout)  # optimize(model, layout=layout)

    Args:
        model: a plain model, or a model returned by :func:`optimize` (its config and layout
            are used; ``config=``/``layout=`` must then be None).
        args: the forward's positional inputs.
        kwargs: the forward's keyword inputs.
        config: as :func:`optimize`'s (default ``VMoBAConfig()``).
        layout: as :func:`optimize`'s.

    Returns:
        The :class:`RewriteReport` of the call.

    Raises:
        TypeError: ``args`` is not a tuple or list, ``kwargs`` not a dict, or ``config=`` /
            ``layout=`` given with an optimized model.
    """
    if not isinstance(args, (tuple, list)):
        raise TypeError(
            f"explain takes the model's positional inputs as one tuple, "
            f"explain(model, args=(x, ...), kwargs={{...}}); got args={describe_value(args)}."
        )
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(
            f"explain takes the model's keyword inputs as one dict, "
            f"explain(model, kwargs={{'hidden_states': x, ...}}); got {type(kwargs).__name__}."
        )
    args, kwargs = tuple(args), dict(kwargs or {})
    if isinstance(model, VMoBAModule):
        if config is not None or layout is not None:
            raise TypeError(
                "explain on an optimized model uses its own config and layout; pass config= / "
                "layout= with the original model instead."
            )
        owner = model
    else:
        config, adapter = _resolve(model, config, layout)
        # No blocks: tracing must not hook the model's blocks (and compiles nothing to refuse).
        owner = VMoBAModule(model, config, layout, adapter, False, CompileOptions.check())
    report = RewriteReport(owner.report.model, owner.report.family, found_by=owner.report.found_by)
    fn = torch.compile(
        owner._orig_mod, backend=VMoBABackend(report.add, apply=False), dynamic=False
    )
    ctx = _context(owner, args, kwargs, owner.vmoba.dense_layers)
    ctx.layer_of = _numbering_copy(owner._vmoba_layer_of)  # explain's trace learns on its own
    with _call_scope(ctx), torch.no_grad():
        fn(*args, **kwargs)
    return report


def _numbering_copy(layer_of: Mapping[str, int]) -> Mapping[str, int]:
    return layer_of.copy() if isinstance(layer_of, LayerNumbering) else dict(layer_of)
