"""Teacher-forced edit metrics (MALMEN's definitions), for N facts edited at once.

ES: token accuracy of the target (and its end-of-turn token) on the edit prompt;
GS: the same on the first rephrase; LS: agreement of the edited model's argmax with the
unedited model's on the facts' unrelated (locality) prompts, at their answer tokens.
All are means over facts of per-fact token means.
"""

from __future__ import annotations

import time

import torch

from .chat import encode_pair
from .lm import by_length, forward, padded


def fact_row(tokenizer, fact, kind: str, system=None) -> dict | None:
    """The encoded row of one fact for `kind` = "edit" (prompt -> target), "rephrase" (first
    rephrase -> target) or "loc" (first locality prompt -> its answer); None if it has none."""
    if kind == "edit":
        return encode_pair(tokenizer, fact["prompt"], fact["target"], system)
    if kind == "rephrase":
        return (encode_pair(tokenizer, fact["rephrases"][0], fact["target"], system)
                if fact["rephrases"] else None)
    if kind == "loc":
        return (encode_pair(tokenizer, fact["loc_prompts"][0], fact["loc_answers"][0], system)
                if fact["loc_prompts"] else None)
    raise ValueError(f"unknown row kind {kind!r}; choose 'edit', 'rephrase' or 'loc'")


def conversations(tokenizer, facts, kind: str, system=None) -> list[dict]:
    """Encoded rows of `kind` for the facts that have one."""
    rows = (fact_row(tokenizer, f, kind, system) for f in facts)
    return [r for r in rows if r is not None]


def fact_rows(tokenizer, facts, system=None) -> dict[str, list[dict]]:
    return {k: conversations(tokenizer, facts, k, system) for k in ("edit", "rephrase", "loc")}


@torch.no_grad()
def predictions(model, tokenizer, rows, first=None, batch_size: int = 32):
    """Per-row (argmax ids, label ids) at the label positions, in the rows' order (batched by
    length; a None row gives None). Rows may carry cached hidden states entering
    blocks[first]."""
    out = [None] * len(rows)
    for idx, batch in by_length(model, tokenizer, rows, batch_size, "predictions", False):
        logits, labels, row = forward(model, batch, first)
        pred = logits.argmax(-1)
        for b, j in enumerate(idx):
            out[j] = (pred[row == b], labels[row == b])
    return out


def accuracy(preds) -> float:
    return sum((p == y).float().mean().item() for p, y in preds) / max(len(preds), 1)


def agreement(after, before) -> float:
    return sum((a[0] == b[0]).float().mean().item() for a, b in zip(after, before)) / max(
        len(after), 1)


def edit_metrics(editor, rows: dict[str, list[dict]], batch_size: int = 32, extra=None,
                 before=None) -> dict:
    """Edit all facts of `rows` (from `fact_rows`, optionally with cached hidden states) at
    once with `editor`; measure ES, GS, LS (and `extra()`'s metrics, called while the edit is
    applied); restore the weights. `before`: the unedited model's predictions on rows["loc"],
    when the caller already has them."""
    model, tok, first = editor.model, editor.tokenizer, editor.first
    if before is None:
        before = predictions(model, tok, rows["loc"], first, batch_size)
    start = time.perf_counter()
    edit = sorted(rows["edit"], key=lambda r: len(r["input_ids"]))  # less padding per chunk
    editor.apply(editor.compute_shifts(padded(model, tok, edit)))
    seconds = time.perf_counter() - start
    try:
        out = {
            "ES": accuracy(predictions(model, tok, rows["edit"], first, batch_size)),
            "GS": accuracy(predictions(model, tok, rows["rephrase"], first, batch_size)),
            "LS": agreement(predictions(model, tok, rows["loc"], first, batch_size), before),
            "n_facts": len(rows["edit"]),
            "edit_seconds": seconds,
        }
        if extra is not None:
            out.update(extra())
        return out
    finally:
        editor.restore()
