"""Static memory allocation (arena packing): offsets for buffers with lifespans, as small as possible.

Public API: the data model (`Buffer`, `Problem`, `Solution`, `Status`, `make_buffer`), `solve` (the
portfolio: greedy best fit plus MiniMalloc-style exact search), `validate` (independent checker), and the
MiniMalloc CSV format (`csv_format`). Knows nothing of torch or of memplan's IR.
"""

from memplan.solvers.packing.portfolio import PortfolioOptions, solve
from memplan.solvers.packing.problem import Buffer, Problem, Solution, Status, height_of, make_buffer
from memplan.solvers.packing.sweep import max_load
from memplan.solvers.packing.validate import Failure, Violation, validate

__all__ = [
    "Buffer",
    "Failure",
    "PortfolioOptions",
    "Problem",
    "Solution",
    "Status",
    "Violation",
    "height_of",
    "make_buffer",
    "max_load",
    "solve",
    "validate",
]
