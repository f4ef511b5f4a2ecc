"""The learned parts of the editor: pure tensor math on keys, value gradients and shifts.
Never imports `chatedit`."""

from . import solve
from .net import HyperNetwork, RunningNorm, ShapeNet

__all__ = ["HyperNetwork", "RunningNorm", "ShapeNet", "solve"]
