"""Edit metrics (MALMEN's and MEND's definitions), for N facts edited at once.

Teacher-forced, over the answer tokens only (the end-of-turn token that follows a chat
answer is trained on but not counted: every edit would "predict" it for free):
- ES: token accuracy of the target on the edit prompt; ES_strict: the share of facts whose
  answer tokens are all right (MEND's definition);
- GS, GS_strict: the same on the first rephrase;
- the locality panel (`panel.py`): LS_subject, LS_neighbour and NS per fact, LS_NQ and the
  everyday-chat shares per model (`Probes`); LS_subject also by how sure the unedited model
  was of its argmax (`agreement_by_confidence`, a diagnostic).
Means over facts of per-fact values. By generation (`generation_metrics`): ES_gen / GS_gen,
the share of greedy answers to the prompt / rephrase that equal the target after
normalisation (`text.exact_match`).
"""

from __future__ import annotations

import time

import torch

from ..chat import generate, present
from ..lm import accuracy, padded
from ..text import exact_match
from .panel import agreement, neighbourhood_score

def strict(preds) -> float:
    """Share of rows whose tokens are all right."""
    return sum(bool((p == y).all()) for p, y in preds) / max(len(preds), 1)


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
    """Token-level LS_subject split by how sure the unedited model was of its own argmax there
    (`before` from `predictions(..., confidence=True)`): for each bin [lo, hi) of that
    probability, the share of the locality tokens in it (`tokens_p<hi`) and their
    agreement (`LS_subject_p<hi`; none for an empty bin). Which predictions an edit flips."""
    same = torch.cat([a[0] == b[0] for a, b in zip(after, before)])
    top = torch.cat([b[2] for b in before])
    out = {}
    for lo, hi in zip(bins, bins[1:]):
        inside = (top >= lo) & ((top < hi) if hi < bins[-1] else (top <= hi))
        out[f"tokens_p<{hi:g}"] = inside.float().mean().item() if len(top) else 0.0
        if inside.any():
            out[f"LS_subject_p<{hi:g}"] = same[inside].float().mean().item()
    return out


TOKEN_KINDS = ("edit", "rephrase", "subject", "neighbour")  # argmax predictions
NLL_KINDS = ("neighbour", "neighbour_new")                  # NS


def measure(lm, rows: dict[str, list], batch_size: int = 32, confidence: bool = False):
    """(predictions, NLLs) of the model as it is now on sliced panel rows (`panel_rows`):
    {kind: `predictions`} for `TOKEN_KINDS` and {kind: `answer_nll`} for `NLL_KINDS`, the
    kinds present; `confidence`: the subject rows' with the argmax's probability."""
    preds = {k: lm.predictions(rows[k], batch_size, confidence and k == "subject")
             for k in TOKEN_KINDS if rows.get(k)}
    nll = {k: lm.answer_nll(rows[k], batch_size) for k in NLL_KINDS if rows.get(k)}
    return preds, nll


def teacher_forced(preds: dict, nll: dict, before: dict) -> dict:
    """ES, ES_strict, GS, GS_strict; LS_subject and LS_neighbour against the unedited
    model's predictions `before` (with their confidence: LS_subject by confidence too), NS
    from the NLLs, where their rows are present (`measure`)."""
    rephrase = preds.get("rephrase", [])
    out = {"ES": accuracy(preds["edit"]), "ES_strict": strict(preds["edit"]),
           "GS": accuracy(rephrase), "GS_strict": strict(rephrase)}
    for kind in ("subject", "neighbour"):
        if kind in preds:
            out[f"LS_{kind}"] = agreement(preds[kind], before[kind])
    if before.get("subject") and len(before["subject"][0]) == 3:
        out.update(agreement_by_confidence(preds["subject"], before["subject"]))
    if len(nll) == 2:
        out["NS"] = neighbourhood_score(nll["neighbour"], nll["neighbour_new"])
    return out


def edit_metrics(editor, rows: dict[str, list], batch_size: int = 32, extra=None,
                 before=None, probes=None) -> dict:
    """Edit the facts of sliced panel rows (`chat.sliced` of `panel_rows`, optionally with
    cached hidden states) at once with `editor`; measure the teacher-forced metrics, the
    model-level `probes()` (`panel.Probes`) and `extra()`'s, while the edit is applied;
    restore the weights. `before`: the unedited model's predictions on the locality rows
    (`measure`'s first part), when the caller already has them."""
    lm = editor.lm
    rows = {k: present(r) for k, r in rows.items()}
    if before is None:
        before = measure(lm, {k: rows.get(k) for k in ("subject", "neighbour")}, batch_size,
                         confidence=True)[0]
    start = time.perf_counter()
    edit = sorted(rows["edit"], key=lambda r: len(r["input_ids"]))  # less padding per chunk
    editor.apply(editor.compute_shifts(padded(lm.model, lm.tokenizer, edit)).shifts)
    seconds = time.perf_counter() - start
    try:
        out = teacher_forced(*measure(lm, rows, batch_size), before)
        out.update({"n_facts": len(rows["edit"]), "edit_seconds": seconds})
        if probes is not None:
            out.update(probes())
        if extra is not None:
            out.update(extra())
        return out
    finally:
        editor.restore()
