"""The compiler pass: the FX rewrite, the ``torch.compile`` backend, the report and the inductor
scheduler pass (see README.md beside this file)."""

from .backend import LOWERINGS, VMoBABackend
from .report import AttentionCall, RewriteReport, Skip, SkipReason
from .rewrite import CURRENT_CONTEXT, CallContext, bind_sdpa, decide, rewrite_graph, vmoba_sdpa
from .scheduling import PROGRAM_ORDER_PASS, ProgramOrderPass, keep_program_order

__all__ = [
    "CURRENT_CONTEXT",
    "LOWERINGS",
    "PROGRAM_ORDER_PASS",
    "AttentionCall",
    "CallContext",
    "ProgramOrderPass",
    "RewriteReport",
    "Skip",
    "SkipReason",
    "VMoBABackend",
    "bind_sdpa",
    "decide",
    "keep_program_order",
    "rewrite_graph",
    "vmoba_sdpa",
]
