"""Locality conversations for meta-training (DESIGN.md section 4).

- nq: the facts' unrelated questions (zsRE's NQ questions) with their dataset answers;
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


def conversation_rows(tokenizer, pairs: list[dict], system=None) -> list[dict]:
    return [encode_pair(tokenizer, p["prompt"], p["response"], system) for p in pairs]
