"""Seconds per stage of a computation (`EditMethod.compute_shifts` marks its stages)."""

from __future__ import annotations

import time

import torch


def sync(device) -> callable:
    """What makes a clock reading wait for the device's queued work (None on the CPU)."""
    return torch.cuda.synchronize if str(device).startswith("cuda") else None


class Laps:
    """`lap(stage)` adds the time since the previous lap to `stage` (the stages of an edit:
    capture, hypernetwork, solve, ...)."""

    def __init__(self, sync=None):
        self.seconds: dict[str, float] = {}
        self.sync = sync or (lambda: None)
        self.last = self.now()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = self.now()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.last
        self.last = now
