"""Locality conversations for meta-training (DESIGN.md section 4).

- nq: the facts' unrelated questions (zsRE's NQ questions) with their dataset answers;
- subject: per fact, another fact's question asked about this fact's subject (the same
  subject in another relation), answered by the base model's own greedy response;
- instruction: self-instruct prompts answered by the base model's own greedy responses;
- harmful: hh-rlhf harmful requests answered by the base model's own greedy responses;
- question (used by the safety recipe, editor.align): the NQ questions alone, answered
  by the base model.
The responses are generated once per base model and cached on disk (JSON, atomic write).
The locality loss is KL(p_before || p_after) over the assistant tokens.
"""

from __future__ import annotations

import hashlib
import json
import random

from .chat import encode_pair, generate
from .data import load_facts, load_harmful_requests, load_instructions
from .models import cache_dir
from .report import write_atomic


def load_questions(split: str = "train") -> dict:
    """zsRE's unrelated NQ questions (one per fact of `split`), as prompts."""
    return {"prompt": [f["loc_prompts"][0] for f in load_facts("zsre", split) if f["loc_prompts"]]}


SOURCES = {"instruction": load_instructions, "harmful": load_harmful_requests,
           "question": load_questions}


def fingerprint(model) -> str:
    """Short hash of the model's name and a sample of its weights."""
    h = hashlib.sha256(str(model.config.name_or_path).encode())
    params = list(model.parameters())
    for p in params[:: max(1, len(params) // 8)]:
        h.update(p.detach().float().flatten()[:4096].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def base_responses(model, tokenizer, source: str, n: int, max_new_tokens: int,
                   max_prompt_chars: int, system=None, split: str = "train") -> list[dict]:
    """[{prompt, response}] for the first `n` prompts of `source` (at most
    `max_prompt_chars` long), answered greedily by `model`; cached on disk."""
    if source not in SOURCES:
        raise ValueError(f"unknown locality source {source!r}; choose one of {sorted(SOURCES)}")
    key = f"{source}-{split}-{n}-{max_new_tokens}-{max_prompt_chars}-{system or 'default'}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    prompts = [p for p in SOURCES[source](split)["prompt"] if len(p) <= max_prompt_chars][:n]
    return responses(model, tokenizer, prompts, max_new_tokens, system,
                     f"{source}-{split}-{digest}")


def responses(model, tokenizer, prompts: list[str], max_new_tokens: int, system, name: str):
    """Greedy responses of `model` to `prompts`, cached as JSON (atomic write) under
    `name` in the model's fingerprint folder; empty responses are dropped."""
    path = cache_dir() / "responses" / fingerprint(model) / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, system=system,
                       progress=True)
    pairs = [{"prompt": p, "response": r} for p, r in zip(prompts, answers) if r.strip()]
    write_atomic(path, json.dumps(pairs, indent=1))
    return pairs


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
    key = json.dumps([asked, max_new_tokens, system or "default"])
    name = f"subject-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    pairs = responses(model, tokenizer, asked, max_new_tokens, system, name)
    answer = {p["prompt"]: p["response"] for p in pairs}
    return [encode_pair(tokenizer, p, answer[p], system) if p in answer else None
            for p in prompts]


def conversation_rows(tokenizer, pairs: list[dict], system=None) -> list[dict]:
    return [encode_pair(tokenizer, p["prompt"], p["response"], system) for p in pairs]
