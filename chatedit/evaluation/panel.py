"""The locality panel: what an edit of N facts must leave alone, measured the same way in
train-time validation (`MetaTrainer.validate`), `scripts/evaluate.py` and the frontier tool.

Per fact (`panel_rows`: rows aligned with the facts, so the first n facts are a batch):
- LS_subject: argmax agreement with the unedited model at the answer tokens of a question
  about the fact's subject in another relation: KnowEdit's Relation_Specificity prompt at
  its dataset answer (zsRE test), else another training fact's relation template asked
  about this subject, at the unedited model's own greedy answer (zsRE validation:
  `prompts.subject_rows`, templates from zsRE's training split);
- LS_neighbour, NS (CounterFact): argmax agreement on the neighbourhood prompts (other
  subjects, the fact's relation) at their true answer; NS, MEMIT's neighbourhood score: the
  share of those prompts on which the true answer is more likely than the new target (mean
  token negative log-likelihood).
Per model (`Probes`: fixed sets of the split, the same at every N):
- LS_NQ: argmax agreement on held-out NQ questions (`data.nq_probes`) at their answers;
- chat_8, chat_32: the share of the everyday chat prompts (`prompts.load_everyday`) whose
  greedy answer keeps its first 8 tokens / all of its first 32 tokens (an answer that ends
  sooner counts its end-of-sequence token and stops there).
"""

from __future__ import annotations

import functools

from ..chat import encode_pair, fact_row
from ..data import load_facts, nq_probes
from ..lm import ChatLM
from ..prompts import load_everyday, relation_templates, subject_rows

LOCALITY = ("subject", "neighbour", "neighbour_new")  # per-fact rows besides edit, rephrase
ANSWER_TOKENS = 16  # the unedited model's answer to a built same-subject question
CHAT_TOKENS = 32    # greedy tokens of an everyday answer


@functools.cache
def _templates() -> tuple[str, ...]:
    return tuple(relation_templates(load_facts("zsre", "train")))


def panel_rows(model, tokenizer, facts, system=None) -> dict[str, list]:
    """{kind: one entry per fact}: "edit" and "rephrase" (`chat.fact_row`), "subject" (a row
    or None), "neighbour" (each neighbourhood prompt at the true answer: a list of rows, or
    None) and "neighbour_new" (the same prompts at the new target)."""
    facts = list(facts)
    rows = {k: [fact_row(tokenizer, f, k, system) for f in facts] for k in ("edit", "rephrase")}

    def kind(f):
        return f.get("loc_kind", "")

    rows["subject"] = [encode_pair(tokenizer, f["loc_prompts"][0], f["loc_answers"][0], system)
                       if kind(f) == "subject" and f["loc_prompts"] else None for f in facts]
    ask = [i for i, f in enumerate(facts) if kind(f) in ("nq", "") and f.get("subject")]
    if ask:
        built = subject_rows(model, tokenizer, [facts[i] for i in ask], ANSWER_TOKENS, system,
                             templates=list(_templates()))
        for i, row in zip(ask, built):
            rows["subject"][i] = row
    for name, answer in (("neighbour", None), ("neighbour_new", "target")):
        rows[name] = [[encode_pair(tokenizer, p, f[answer] if answer else a, system)
                       for p, a in zip(f["loc_prompts"], f["loc_answers"])]
                      if kind(f) == "neighbour" and f["loc_prompts"] else None for f in facts]
    return rows


def nested(fn, entries: list) -> list:
    """`fn` (rows with Nones -> one result each) over per-fact entries (a row, a list of
    rows, or None), re-nested in the entries' shape, so `chat.sliced` slices it alike."""
    flat = [x for e in entries for x in (e if isinstance(e, list) else [e])]
    done = iter(fn(flat))
    return [[next(done) for _ in e] if isinstance(e, list) else next(done) for e in entries]


def agreement(after, before) -> float:
    """Mean over rows of the share of answer positions whose argmax is unchanged."""
    return sum((a[0] == b[0]).float().mean().item() for a, b in zip(after, before)) / max(
        len(after), 1)


def neighbourhood_score(nll_true: list[float], nll_new: list[float]) -> float:
    """MEMIT's NS: the share of neighbourhood prompts whose true answer is more likely than
    the new target (lower mean token NLL)."""
    return sum(t < n for t, n in zip(nll_true, nll_new, strict=True)) / max(len(nll_true), 1)


def unchanged(after: list[list[int]], before: list[list[int]], tokens: int) -> float:
    """The share of answers (token ids) equal to their unedited answer in the first `tokens`."""
    return sum(a[:tokens] == b[:tokens] for a, b in zip(after, before, strict=True)) / max(
        len(before), 1)


class Probes:
    """The model-level probes of a split (`Probes(...)` on the unedited model records its
    answers; calling it measures the model as it is now against them): LS_NQ on the
    held-out NQ questions, chat_8 / chat_32 on the everyday prompts."""

    def __init__(self, model, tokenizer, split: str, system=None, batch_size: int = 32,
                 limit: int | None = None):
        self.lm, self.batch_size = ChatLM(model, tokenizer, system), batch_size
        self.nq = [self.lm.encode(q, a) for q, a in nq_probes(split)[:limit]]
        self.prompts = list(load_everyday(split)["prompt"])[:limit]
        self.before = self.answers()

    def answers(self):
        return (self.lm.predictions(self.nq, self.batch_size),
                self.lm.generate(self.prompts, CHAT_TOKENS, self.batch_size, token_ids=True))

    def __call__(self) -> dict:
        nq, chat = self.answers()
        return {"LS_NQ": agreement(nq, self.before[0]),
                "chat_8": unchanged(chat, self.before[1], 8),
                "chat_32": unchanged(chat, self.before[1], CHAT_TOKENS)}
