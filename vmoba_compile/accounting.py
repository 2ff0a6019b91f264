"""The account of what ran: each attention call's VMoBA and dense executions, counted as they run.

The report's graphs are the plan (what the pass decided when it compiled); this module keeps the
account (:class:`~vmoba_compile.passes.report.Executions` per module). Every run of a compiled
VMoBA graph counts its calls (:meth:`Account.graph_ran`), every backward of that graph its
rewritten calls' backward; after each block call (regional compilation) or forward call (whole
model) the video self-attention modules that should have run in a VMoBA graph but ran in none
are counted dense, with the cause found (:func:`why_no_graph`), warned once per cause, and
raised at once under ``strict=True``; so are video self-attention calls a graph ran dense
because the pass cannot rewrite their op (``AttentionCall.planned``: FlexAttention,
``nn.MultiheadAttention``). Nothing here changes what runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .passes import AttentionCall, RewriteReport
from .passes.rewrite import CURRENT_CONTEXT, UNPROVEN_MODULE

__all__ = ["CONTROLS", "UNPROVEN_RAN", "Account", "forward_codes", "in_backward", "why_no_graph"]

CONTROLS = "kept dense by the runtime controls (a dense warm-up step or dense_layers)"

#: Why planned calls ran in no VMoBA graph, where a compiled graph of the same block call ran
#: attention calls whose module the pass could not prove (``MODULE_UNPROVEN``).
UNPROVEN_RAN = (
    "no VMoBA graph ran it as its module, while a compiled graph of this call ran attention "
    f"call(s) whose module was unproven, counted dense under '{UNPROVEN_MODULE}' with "
    "MODULE_UNPROVEN (its reason names how Dynamo reached them): most likely these calls, run "
    "dense there; they are not known to be skipped or run eagerly"
)


def in_backward() -> bool:
    """True inside an autograd backward: a block run now is a recomputation (activation
    checkpointing), whose forward was already counted."""
    return torch._C._current_graph_task_id() != -1


def _cache_entries(code: Any) -> int:
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:  # pragma: no cover - a torch without the debug hook
        return 0
    return len(_debug_get_cache_entry_list(code))


def _disabled(fn: Any) -> bool:
    fn = getattr(fn, "func", fn)  # functools.partial (diffusers' hooks wrap new_forward in one)
    return bool(getattr(fn, "_torchdynamo_disable", False))


def _disabled_hooks(module: torch.nn.Module) -> list[str]:
    """Names of what around ``module``'s forward Dynamo may not trace: a forward wrapped by
    ``torch.compiler.disable``, or diffusers hooks (``module._diffusers_hook``) whose
    ``new_forward`` is (MagCache's, FirstBlockCache's)."""
    found = []
    if _disabled(getattr(module, "forward", None)):
        found.append("its forward")
    registry = getattr(module, "_diffusers_hook", None)
    for name, hook in (getattr(registry, "hooks", None) or {}).items():
        if _disabled(getattr(hook, "new_forward", None)):
            found.append(f"diffusers hook '{name}' ({type(hook).__name__})")
    return found


def forward_codes(modules: Iterable[torch.nn.Module]) -> list[Any]:
    """The code objects Dynamo compiles for these modules' calls: each class's ``forward`` and,
    for diffusers attention, its processor's ``__call__``."""
    codes = []
    for m in modules:
        for fn in (type(m).forward, type(getattr(m, "processor", None)).__call__):
            code = getattr(fn, "__code__", None)
            if code is not None and code not in codes:
                codes.append(code)
    return codes


def why_no_graph(
    codes: Iterable[Any],
    modules: Iterable[tuple[str, torch.nn.Module]],
    limit: int | None = None,
) -> tuple[str, bool]:
    """Why an attention call that should have run in a VMoBA graph ran in none, and whether
    that cause makes it run dense (proven) or may also mean it did not run at all.

    Args:
        codes: the code objects Dynamo compiles for the call (the block variant's function, the
            block's and the model's ``forward``).
        modules: ``(path, module)`` around the call, outermost first (the block, its attention
            module).
        limit: the recompile limit the graphs were compiled with (None: Dynamo's).

    Returns:
        ``(cause, proven)``: with ``proven`` the call ran eagerly, so dense (Dynamo's recompile
        limit reached for one of ``codes``, or a forward wrapped by ``torch.compiler.disable``);
        without, no cause was found: the model may have skipped the call (a cache hook that
        reuses an earlier step's output) or Dynamo ran it eagerly for a reason not detected.
    """
    if limit is None:
        limit = torch._dynamo.config.recompile_limit
    for code in codes:
        n = _cache_entries(code)
        if n >= limit:
            return (
                f"Dynamo's recompile limit was reached: {n} compiled versions of "
                f"{code.co_name} (recompile limit {limit}), so Dynamo ran it eagerly. Each "
                f"resolution, dense_layers set and changed Python constant the graph reads (a "
                f"LoRA scale) compiles anew; raise optimize(..., recompile_limit=) or call "
                f"torch._dynamo.reset()"
            ), True
    for path, module in modules:
        hooks = _disabled_hooks(module)
        if hooks:
            return (
                f"{', '.join(hooks)} of {path or 'the model'} is wrapped by "
                f"torch.compiler.disable, so Dynamo runs it eagerly and its attention dense; "
                f"VMoBA cannot run under that tool"
            ), True
    return (
        "no VMoBA graph ran it although its module was called: either the model skipped it (a "
        "cache hook reusing an earlier step's output) or Dynamo ran it eagerly for a cause not "
        "detected (TORCH_LOGS=graph_breaks,recompiles shows where)"
    ), False


class Account:
    """Counts one optimized model's attention executions into its report.

    Args:
        report: the optimized model's report (its ``executions`` grow).
        model_name: for messages.
        strict: raise the first time a planned VMoBA call runs dense.
        limit: the recompile limit the model's graphs are compiled with (None: Dynamo's).
    """

    def __init__(
        self, report: RewriteReport, model_name: str, strict: bool, limit: int | None = None
    ) -> None:
        self.report = report
        self.model_name = model_name
        self.strict = strict
        self.limit = limit
        self._warned: set[str] = set()

    def graph_ran(
        self,
        calls: Sequence[AttentionCall],
        out: Any,
        translate: Callable[[str], str] | None = None,
    ) -> None:
        """One run of a compiled graph whose decisions are ``calls`` (``translate``: the
        compiling block's module paths to the running block's)."""
        if in_backward():  # a checkpointed block recomputed: counted by its forward
            return
        ctx = CURRENT_CONTEXT.get()
        modules = [translate(c.module) if translate else c.module for c in calls]
        if ctx is not None:
            ctx.ran.update(modules)
        rewritten: list[str] = []
        planned: dict[str, list[str]] = {}  # cause -> modules
        for c, module in zip(calls, modules, strict=True):
            counts = self.report.ran(module)
            if c.rewritten:
                counts.vmoba_forward += 1
                rewritten.append(module)
            else:
                counts.add_dense(f"decided in the graph: {c.reason}")
                if c.planned:  # video self-attention through an op the pass cannot rewrite
                    planned.setdefault(c.reason, []).append(module)
        if rewritten:
            self._on_backward(out, rewritten)
        for cause, dense in planned.items():
            self._planned_dense(dense, cause)

    def _on_backward(self, out: Any, modules: list[str]) -> None:
        """Count a backward of the graph whose output is ``out`` for its rewritten calls: a
        hook on the output's autograd node (the compiled graph's backward)."""
        outs = out if isinstance(out, (list, tuple)) else (out,)
        node = next(
            (t.grad_fn for t in outs if isinstance(t, torch.Tensor) and t.grad_fn is not None),
            None,
        )
        if node is None:
            return
        report = self.report

        def count(*_: Any) -> None:
            for module in modules:
                report.ran(module).vmoba_backward += 1

        node.register_hook(count)

    def no_graph(
        self,
        modules: list[str],
        codes: Iterable[Any],
        where: Iterable[tuple[str, torch.nn.Module]],
    ) -> None:
        """``modules`` were planned to run VMoBA in this call but no compiled graph ran them:
        counted dense where the cause proves it (:func:`why_no_graph`), else counted as not run
        in a graph (``no_graph``: planned calls no VMoBA graph ran as their module, not runs);
        warned once per cause either way. Where a graph of this call (the block call, under
        regional compilation) ran calls counted under the unproven module, the warning says
        so (:data:`UNPROVEN_RAN`) instead of blaming a skip or an eager run: those calls have
        no proven module, so they cannot be counted as these modules' runs."""
        cause, proven = why_no_graph(codes, where, self.limit)
        if proven:
            self.ran_dense(modules, cause, planned=True)
            return
        ctx = CURRENT_CONTEXT.get()
        if ctx is not None and UNPROVEN_MODULE in ctx.ran:
            cause = UNPROVEN_RAN
        for module in modules:
            self.report.ran(module).no_graph += 1
        self._warn(
            f"{self.model_name}: VMoBA was planned for {self._listed(modules)} but {cause}. "
            f"model.report counts every execution.",
            cause,
        )

    @staticmethod
    def _listed(modules: list[str]) -> str:
        shown = ", ".join(modules[:3]) + (", ..." if len(modules) > 3 else "")
        return f"{len(modules)} attention call(s) ({shown})"

    def _warn(self, msg: str, cause: str) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            warnings.warn(msg, RuntimeWarning, stacklevel=5)

    def ran_dense(self, modules: Iterable[str], cause: str, planned: bool) -> None:
        """``modules``' attention ran dense for ``cause``. ``planned``: they were meant to run
        VMoBA (``strict=True`` raises; a warning, once per cause, says so)."""
        modules = list(modules)
        if not modules:
            return
        for module in modules:
            self.report.ran(module).add_dense(cause)
        if planned:
            self._planned_dense(modules, cause)

    def _planned_dense(self, modules: list[str], cause: str) -> None:
        """``modules`` were meant to run VMoBA and ran dense (already counted): raise under
        ``strict=True``, else warn once per cause."""
        msg = (
            f"{self.model_name}: VMoBA was planned for {self._listed(modules)} but they ran "
            f"dense: {cause}. model.report counts every execution."
        )
        if self.strict:
            raise RuntimeError("strict=True: " + msg)
        self._warn(msg, cause)
