"""The learned parts of the editor: pure tensor math on keys, value gradients and shifts.
Never imports `editor`."""

from .net import SHIFT_RULES, EditorNet, HyperNetwork, RunningNorm
from .solve import (Factor, LeastSquares, diagnostics, factorize, least_squares, solve,
                    solve_backward)

__all__ = ["SHIFT_RULES", "EditorNet", "Factor", "HyperNetwork", "LeastSquares", "RunningNorm",
           "diagnostics",
           "factorize", "least_squares", "solve", "solve_backward"]
