"""The compiler pass: the FX rewrite, the ``torch.compile`` backend, the report and the inductor
scheduler pass (see README.md beside this file). Re-exported here: what users of the pass read
or plug in; the package's own modules import the rest from the submodules."""

from .backend import LOWERINGS, VMoBABackend
from .report import AttentionCall, RewriteReport, Skip, SkipReason
from .scheduling import PROGRAM_ORDER_PASS, ProgramOrderPass, keep_program_order

__all__ = [
    "LOWERINGS",
    "PROGRAM_ORDER_PASS",
    "AttentionCall",
    "ProgramOrderPass",
    "RewriteReport",
    "Skip",
    "SkipReason",
    "VMoBABackend",
    "keep_program_order",
]
