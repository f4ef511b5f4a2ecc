"""Locality conversations for meta-training, one loss coefficient per source (conf/locality):

- nq: the facts' unrelated questions (zsRE's NQ questions) with their dataset answers;
- instruction: self-instruct prompts answered by the base model's own greedy responses;
- harmful: hh-rlhf harmful requests answered by the base model's own greedy responses
  (these two: `chatedit.prompts.SOURCES` and `base_responses`);
- subject (here): per fact, another fact's question asked about this fact's subject (the
  same subject in another relation), answered by the base model's own greedy response.
The responses are generated once per base model and cached on disk (JSON, atomic write).
The locality loss is KL(p_before || p_after) over the assistant tokens (training.meta).
A new source is a prompt loader in `chatedit.prompts.SOURCES` plus its coefficient in
conf/locality/*.yaml and `POOLS` in training/meta.py.
"""

from __future__ import annotations

import random

from ..chat import encode_pair
from ..files import digest
from ..prompts import responses


def subject_prompts(facts, seed: int = 0) -> list[str | None]:
    """Per fact, a question about its subject in another relation: another fact's question
    with that fact's subject replaced by this one's (None when the fact has no subject or
    no other question template applies)."""
    def template(f):
        subject = f["subject"]
        return f["prompt"].replace(subject, "{}") if subject and subject in f["prompt"] else None

    templates = sorted({t for t in map(template, facts) if t})
    rng = random.Random(seed)
    out = []
    for f in facts:
        others = [t for t in rng.sample(templates, min(4, len(templates))) if t != template(f)]
        out.append(others[0].replace("{}", f["subject"]) if f["subject"] and others else None)
    return out


def subject_rows(model, tokenizer, facts, max_new_tokens: int, system=None,
                 seed: int = 0) -> list[dict | None]:
    """Per fact, its `subject_prompts` question answered by `model` greedily (cached), as
    an encoded row; None where the fact has no such question or the answer is empty."""
    prompts = subject_prompts(facts, seed)
    asked = [p for p in prompts if p]
    name = f"subject-{digest([asked, max_new_tokens, system or 'default'])}"
    pairs = responses(model, tokenizer, asked, max_new_tokens, system, name)
    answer = {p["prompt"]: p["response"] for p in pairs}
    return [encode_pair(tokenizer, p, answer[p], system) if p in answer else None
            for p in prompts]
