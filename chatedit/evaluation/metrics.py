"""Edit metrics (MALMEN's and MEND's definitions), for N facts edited at once.

Teacher-forced, over the answer tokens only (the end-of-turn token that follows a chat
answer is trained on but not counted: every edit would "predict" it for free):
- ES: token accuracy of the target on the edit prompt; ES_strict: the share of facts whose
  answer tokens are all right (MEND's definition);
- GS, GS_strict: the same on the first rephrase;
- LS: agreement of the edited model's argmax with the unedited model's on the facts'
  unrelated (locality) prompts, at their answer tokens (`agreement_by_confidence`: by how
  sure the unedited model was of it, a diagnostic).
Means over facts of per-fact values. By generation (`generation_metrics`): ES_gen / GS_gen,
the share of greedy answers to the prompt / rephrase that equal the target after
normalisation (`text.exact_match`).
"""

from __future__ import annotations

import time

import torch

from ..chat import KINDS, generate, present
from ..lm import accuracy, padded
from ..text import exact_match

def strict(preds) -> float:
    """Share of rows whose tokens are all right."""
    return sum(bool((p == y).all()) for p, y in preds) / max(len(preds), 1)


def agreement(after, before) -> float:
    return sum((a[0] == b[0]).float().mean().item() for a, b in zip(after, before)) / max(
        len(after), 1)


def answer_matches(model, tokenizer, facts, max_new_tokens: int = 16, batch_size: int = 32,
                   system=None) -> list[tuple]:
    """Per fact: (its greedy answer to the prompt is the target, the same for its first
    rephrase or None), normalised exact match."""
    with_rephrase = [f["rephrases"][0] for f in facts if f["rephrases"]]
    answers = generate(model, tokenizer, [f["prompt"] for f in facts] + with_rephrase,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, system=system)
    rephrased = iter(answers[len(facts):])
    return [(exact_match(a, f["target"]),
             exact_match(next(rephrased), f["target"]) if f["rephrases"] else None)
            for a, f in zip(answers, facts)]


def generation_metrics(matches) -> dict:
    es = [m[0] for m in matches]
    gs = [m[1] for m in matches if m[1] is not None]
    return {"ES_gen": sum(es) / max(len(es), 1), "GS_gen": sum(gs) / max(len(gs), 1),
            "n_gen": len(es)}


CONFIDENCE_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


def agreement_by_confidence(after, before, bins=CONFIDENCE_BINS) -> dict:
    """Token-level LS split by how sure the unedited model was of its own argmax there
    (`before` from `predictions(..., confidence=True)`): for each bin [lo, hi) of that
    probability, the share of the locality tokens in it (`tokens_p<hi`) and their
    agreement (`LS_p<hi`; none for an empty bin). Which predictions an edit flips."""
    same = torch.cat([a[0] == b[0] for a, b in zip(after, before)])
    top = torch.cat([b[2] for b in before])
    out = {}
    for lo, hi in zip(bins, bins[1:]):
        inside = (top >= lo) & ((top < hi) if hi < bins[-1] else (top <= hi))
        out[f"tokens_p<{hi:g}"] = inside.float().mean().item() if len(top) else 0.0
        if inside.any():
            out[f"LS_p<{hi:g}"] = same[inside].float().mean().item()
    return out


def teacher_forced(edit, rephrase, loc, loc_before) -> dict:
    """ES, ES_strict, GS, GS_strict, LS from `predictions` of the edited model; with the
    unedited model's confidence in `loc_before`, LS by confidence too."""
    out = {"ES": accuracy(edit), "ES_strict": strict(edit), "GS": accuracy(rephrase),
           "GS_strict": strict(rephrase), "LS": agreement(loc, loc_before)}
    if loc_before and len(loc_before[0]) == 3:
        out.update(agreement_by_confidence(loc, loc_before))
    return out


def edit_metrics(editor, rows: dict[str, list[dict]], batch_size: int = 32, extra=None,
                 before=None) -> dict:
    """Edit all facts of `rows` (from `fact_rows`, optionally with cached hidden states;
    None rows are skipped) at once with `editor`; measure the teacher-forced metrics (and
    `extra()`'s, called while the edit is applied); restore the weights. `before`: the
    unedited model's predictions on the loc rows, when the caller already has them."""
    lm = editor.lm
    rows = {k: present(r) for k, r in rows.items()}
    if before is None:
        before = lm.predictions(rows["loc"], batch_size)
    start = time.perf_counter()
    edit = sorted(rows["edit"], key=lambda r: len(r["input_ids"]))  # less padding per chunk
    editor.apply(editor.compute_shifts(padded(lm.model, lm.tokenizer, edit)).shifts)
    seconds = time.perf_counter() - start
    try:
        out = teacher_forced(*(lm.predictions(rows[k], batch_size) for k in KINDS), before)
        out.update({"n_facts": len(rows["edit"]), "edit_seconds": seconds})
        if extra is not None:
            out.update(extra())
        return out
    finally:
        editor.restore()
