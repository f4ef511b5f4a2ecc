"""The cost of an edit against its floor, and peak memory (scripts/bench.py).

An edit of N facts at once is timed in its own stages (`EditMethod.compute_shifts` marks
them: capture = forward + backward to the edited modules, hypernetwork, solve; then apply)
against the floor: one plain forward + backward over the same N chat-formatted facts
computing the edited weights' gradient (the least work any gradient-based editor does),
measured in the same run, in the same chunks.
"""

from __future__ import annotations

import platform
import threading
import time

import psutil
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..api import Editor
from ..chat import conversations
from ..data import load_facts
from ..files import pyplot, save_figure
from ..lm import forward, padded, row_chunks
from ..timing import Laps, sync
from .sequential import distinct

# "values": MEMIT / AlphaEdit's target-value search
STAGES = ("capture", "hypernetwork", "values", "solve", "fine-tune", "apply")


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or the process RSS sampled
    every 5 ms on the CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            proc = psutil.Process()
            self.base = self.peak = proc.memory_info().rss
            self.running = True

            def sample():
                while self.running:
                    self.peak = max(self.peak, proc.memory_info().rss)
                    time.sleep(0.005)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
        self.mib = (self.peak - self.base) / 2**20


def fact_batch(model, tok, n: int, system) -> dict:
    """N chat-formatted facts (zsRE test, then train; repeated when N exceeds both)."""
    facts = list(load_facts("zsre", "test")) + list(load_facts("zsre", "train"))
    facts = (facts * (n // len(facts) + 1))[:n]
    return padded(model, tok, conversations(tok, facts, "edit", system))


def floor(editor, batch, device) -> float:
    """Forward + backward over the batch (same chunks as the edit), weight gradients of the
    edited modules only."""
    weights = [m.weight for m in editor.modules.values()]
    for w in weights:
        w.requires_grad_(True)
    laps = Laps(sync(device))
    try:
        for chunk in row_chunks(batch, getattr(editor, "chunk_size", len(batch["input_ids"]))):
            logits, labels, _ = forward(editor.model, chunk)
            F.cross_entropy(logits, labels, reduction="sum").backward()
        laps("floor")
        return laps.seconds["floor"]
    finally:
        for w in weights:
            w.requires_grad_(False)
            w.grad = None


def timed_edit(editor, batch, device) -> dict:
    """The edit in the editor's own stages (seconds each), then restored."""
    laps = Laps(sync(device))
    shifts = editor.compute_shifts(batch, lap=laps).shifts
    editor.apply(shifts)
    laps("apply")
    editor.restore()
    return {s: laps.seconds.get(s, 0.0) for s in STAGES}


def bench_edits(editor, ns, device, system, warmup: bool = True) -> list[dict]:
    """Per N: the edit's stages, their total, the floor, their ratio and the peak memory."""
    rows = []
    for n in ns:
        batch = fact_batch(editor.model, editor.tokenizer, n, system)
        if warmup:
            timed_edit(editor, {k: v[:2] for k, v in batch.items()}, device)
        base = floor(editor, batch, device)
        with PeakMemory(device) as mem:
            parts = timed_edit(editor, batch, device)
        total = sum(parts.values())
        rows.append({"n_facts": n, "tokens": int((batch["labels"] != -100).sum()), **parts,
                     "edit": total, "floor": base, "ratio": total / base, "peak_mib": mem.mib})
        print(f"N={n}: edit {total:.2f}s, floor {base:.2f}s, ratio {total / base:.2f}")
    return rows


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def bench_lifelong(editor, batches: int, size: int, png=None) -> dict:
    """`batches` x `size` distinct zsRE facts (test, then train, then their rephrases as
    facts of their own) edited in turn through the `Editor` API: per batch its seconds, its
    solve's seconds and the key rows edited so far (plotted to `png`), then how far the
    total shift is from one edit of all of them (relative Frobenius norm, worst module) and
    that edit's seconds."""
    facts = list(load_facts("zsre", "test")) + list(load_facts("zsre", "train"))
    facts = distinct(facts + [{"prompt": r, "target": f["target"]}
                              for f in facts for r in f["rephrases"]])[:batches * size]
    if len(facts) < batches * size:
        raise ValueError(f"lifelong: {batches} x {size} facts, but only {len(facts)} distinct")
    ed = Editor(editor, "bench")
    out = {"batch_seconds": [], "solve_seconds": [], "rows": []}
    try:
        for t in tqdm(range(batches), desc="lifelong batches"):
            result = ed.edit(facts[t * size:(t + 1) * size], check=False)
            out["batch_seconds"].append(result.seconds["edit"])
            out["solve_seconds"].append(result.seconds.get("solve", 0.0))
            rows = next((int(v.sum()) for k, v in ed.history[-1].stats.items()
                         if k.endswith(":rows")), 0)  # this batch's key rows (MALMEN)
            out["rows"].append(rows + (out["rows"][-1] if t else 0))
        if png:
            plot_lifelong(out, png)
        turns = ed.total_shift()
        start = time.perf_counter()
        with editor.unedited():
            once = editor.compute_shifts(editor.batch(facts)).shifts
        out["joint_seconds"] = time.perf_counter() - start
        out["vs_joint"] = max(((turns[n] - once[n].float().cpu()).norm()
                               / once[n].float().cpu().norm()).item() for n in turns)
        print(f"{batches} x {size} in turn vs one edit of all: {out['vs_joint']:.2e}")
    finally:
        if ed.history:
            ed.rollback(all=True)
    return out


def plot_lifelong(out: dict, png) -> None:
    """Seconds per batch, and its solve's, against the key rows edited so far."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = out["rows"] if any(out["rows"]) else range(1, len(out["batch_seconds"]) + 1)
    ax.plot(x, out["batch_seconds"], ".", ms=3, label="edit (batch)")
    ax.plot(x, out["solve_seconds"], ".", ms=3, label="solve")
    ax.set(xlabel="key rows edited so far" if any(out["rows"]) else "batch",
           ylabel="seconds", title="Editing in turn: seconds per batch")
    ax.legend()
    save_figure(fig, png)
