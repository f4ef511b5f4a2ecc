"""The sequential (lifelong) protocol: T batches of N facts edited one after another on the
same model (`eval.sequential: {batches: T, size: N}`), as users fix facts week after week.

After each batch t, over the t N facts edited so far: ES, ES_strict, GS, GS_strict, the
panel's per-fact locality (against the unedited model) and ES_first, the ES of the first
batch's facts (retention); after the last batch, the behaviour metrics when
`eval.behaviour_ns` is not empty. Records
are the suite's (method x dataset x N x metric, N = facts edited so far) with `batch`.
MALMEN re-solves jointly with the earlier batches by default (`joint: false` stacks),
AlphaEdit keeps the earlier batches' keys, MEMIT and FT edit the edited model.
"""

from __future__ import annotations

import time

from ..chat import sliced
from ..files import pyplot, save_figure
from ..lm import accuracy
from ..text import key
from .metrics import measure, teacher_forced


def distinct(facts: list[dict]) -> list[dict]:
    """The facts whose prompt no earlier fact has (two targets for one prompt are refused)."""
    seen, out = set(), []
    for f in facts:
        if key(f["prompt"]) not in seen:
            seen.add(key(f["prompt"]))
            out.append(f)
    return out


def sequential(editor, ref, facts: list[dict], batches: int, size: int, batch_size: int,
               behaviour=None, every: int = 1) -> list[dict]:
    """Per batch: {batch, n, edit_seconds} and, after every `every`-th batch and the last,
    ES..., ES_first (the last one also with `behaviour()`'s metrics); `ref`: the suite's
    `Reference` of `facts`. Every batch is rolled back at the end."""
    lm = editor.method.lm
    out = []
    try:
        for t in range(batches):
            start = time.perf_counter()
            editor.edit(facts[t * size:(t + 1) * size], check=False)
            seconds = time.perf_counter() - start
            n = (t + 1) * size
            if (t + 1) % every and t < batches - 1:
                out.append({"batch": t + 1, "n": n, "edit_seconds": seconds})
                print(f"batch {t + 1}/{batches}: edit_seconds {seconds:.3f}")
                continue
            preds, nll = measure(lm, sliced(ref.rows, n), batch_size)
            record = {"batch": t + 1, "n": n, "edit_seconds": seconds,
                      **teacher_forced(preds, nll, sliced(ref.before, n)),
                      "ES_first": accuracy(preds["edit"][:size])}
            if behaviour is not None and t == batches - 1:
                record.update(behaviour())
            out.append(record)
            print(f"batch {t + 1}/{batches}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in record.items() if isinstance(v, float)))
    finally:
        if editor.history:
            editor.rollback(all=True)
    return out


def plot_retention(records: list[dict], path) -> None:
    """ES of the first batch's facts against the number of batches, one line per method."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for method in dict.fromkeys(r["method"] for r in records):
        pts = sorted((r["batch"], r["value"]) for r in records
                     if r["method"] == method and r["metric"] == "ES_first")
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xlabel("batches edited")
    ax.set_ylabel("ES of the first batch")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
