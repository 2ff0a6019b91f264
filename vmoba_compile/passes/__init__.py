"""The compiler pass: the FX rewrite, the ``torch.compile`` backend, the report and the inductor
scheduler pass, and the hooks through which a parallel setup places and decides calls (see
README.md beside this file). Re-exported here: what users of the pass read or plug in; the
package's own modules import the rest from the submodules."""

from .backend import LOWERINGS, VMoBABackend
from .hooks import CallDecision, call_shape, decide_call, place_in_block
from .report import AttentionCall, RewriteReport, Skip, SkipReason
from .scheduling import PROGRAM_ORDER_PASS, ProgramOrderPass, keep_program_order

__all__ = [
    "LOWERINGS",
    "PROGRAM_ORDER_PASS",
    "AttentionCall",
    "CallDecision",
    "ProgramOrderPass",
    "RewriteReport",
    "Skip",
    "SkipReason",
    "VMoBABackend",
    "call_shape",
    "decide_call",
    "keep_program_order",
    "place_in_block",
]
