"""More distinct training edits from the same facts (meta-training only).

- new targets: a fact's prompt (and its rephrase) with the target of another training fact
  of the same relation ("Which team does X play for?" -> another team). A relation is a
  prompt template, the prompt with the subject replaced by {}; only templates of at least
  `MIN_WORDS` words besides the subject count (CounterFact's "{}, in" or "{} plays" name no
  single relation), and the new target differs from the fact's own target and its true
  answer. Targets come from the facts given (the training split) only.
- rephrase as the edit prompt: chosen per step by the trainer (`MetaTrainer`), the original
  prompt then tests generalisation.
"""

from __future__ import annotations

import random

from ..text import key as normalise

MIN_WORDS = 3


def relation(fact) -> str | None:
    """The fact's prompt template with its subject as {}, or None when the subject is not in
    the prompt or the template is too short to name one relation."""
    subject, prompt = fact["subject"], fact["prompt"]
    if not subject or subject not in prompt:
        return None
    template = normalise(prompt.replace(subject, "{}"))
    return template if len(template.replace("{}", " ").split()) >= MIN_WORDS else None


def new_targets(facts, k: int, seed: int = 0) -> list[list[str]]:
    """Per fact, up to `k` distinct targets of other facts of its relation (seeded)."""
    by_relation: dict[str, list[str]] = {}
    for f in facts:
        if (rel := relation(f)) is not None:
            by_relation.setdefault(rel, []).append(f["target"])
    rng = random.Random(seed)
    out = []
    for f in facts:
        own = {normalise(f["target"]), normalise(f.get("ground_truth") or "")}
        pool = sorted({normalise(t): t for t in by_relation.get(relation(f), [])
                       if normalise(t) not in own}.values())
        out.append(rng.sample(pool, min(k, len(pool))) if k > 0 else [])
    return out
