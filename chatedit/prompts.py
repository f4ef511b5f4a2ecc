"""Prompt sets other than facts, and the base model's own responses to them.

- Conversation sources (seeded train / validation / test splits): self-instruct
  instructions, hh-rlhf harmful requests and zsRE's unrelated NQ questions (`SOURCES`), used
  by the locality losses (train), the safety test bed (train) and the drift measurement
  (test).
- Benchmark prompts (evaluation only): IFEval, AdvBench, XSTest, and the everyday chat
  prompts of the locality panel (`load_everyday`). Every conversation source drops them
  (`_evaluation_prompts`), which is why they are loaded here, in one place.
- Same-subject questions (`subject_prompts`, `subject_rows`): a fact's subject asked about
  in another relation, from the relation templates of zsRE's training split.
- `base_responses` / `responses`: a model's greedy answers to such prompts, cached on disk
  per model fingerprint (JSON, atomic write); `conversation_rows` encodes them.
"""

from __future__ import annotations

import csv
import functools
import json
import random
from pathlib import Path

import datasets

from .chat import encode_pair, generate
from .data import ASSETS, load_facts, read_records
from .files import cache_dir, digest, write_json
from .text import key


@functools.cache
def _evaluation_prompts() -> frozenset[str]:
    """Normalised IFEval, AdvBench and XSTest prompts: kept out of every training source
    (read once per process)."""
    prompts = [*load_ifeval()["prompt"], *load_advbench()["goal"], *load_xstest(None)["prompt"],
               *load_everyday("all")["prompt"]]
    return frozenset(key(p) for p in prompts)


def prompts_dataset(prompts: list[tuple[str, str]], split: str, sizes: dict, seed: int):
    """Seeded split of (id, prompt) pairs into train/validation/test with fixed sizes for
    validation and test; duplicates and evaluation prompts removed first."""
    seen, unique = set(_evaluation_prompts()), []
    for pid, prompt in prompts:
        if key(prompt) not in seen:
            seen.add(key(prompt))
            unique.append((pid, prompt))
    random.Random(seed).shuffle(unique)
    n_test, n_val = sizes["test"], sizes["validation"]
    parts = {"test": unique[:n_test], "validation": unique[n_test:n_test + n_val],
             "train": unique[n_test + n_val:], "all": unique}
    if split not in parts:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(parts)}")
    rows = sorted(parts[split])
    return datasets.Dataset.from_list([{"id": i, "prompt": p} for i, p in rows])


def load_instructions(split: str = "train", seed: int = 0) -> datasets.Dataset:
    """Instruction prompts (self-instruct seed tasks + user-oriented; instruction plus the
    first instance's input). Locality training uses train; held-out drift uses test."""
    prompts = []
    for file in ("seed_tasks.jsonl", "user_oriented_instructions.jsonl"):
        for r in read_records(ASSETS / "self_instruct" / file):
            inputs = [x.get("input", "") for x in r.get("instances", [])]
            text = r["instruction"].strip()
            if inputs and inputs[0].strip():
                text += "\n\n" + inputs[0].strip()
            prompts.append((r["id"], text))
    return prompts_dataset(prompts, split, {"test": 100, "validation": 50}, seed)


def load_harmful_requests(split: str = "train", seed: int = 0) -> datasets.Dataset:
    """First human turns of hh-rlhf harmless-base (test file). Contains harmful text."""
    prompts = []
    for i, r in enumerate(read_records(ASSETS / "hh_rlhf" / "harmless-base_test.jsonl.gz")):
        turn = r["chosen"].split("\n\nHuman: ", 1)[1].split("\n\nAssistant:", 1)[0].strip()
        if turn:
            prompts.append((f"hh-harmless-test/{i:04d}", turn))
    return prompts_dataset(prompts, split, {"test": 200, "validation": 100}, seed)


def load_ifeval(limit: int | None = None) -> datasets.Dataset:
    """IFEval prompts with their instruction ids and kwargs (evaluation only)."""
    rows = read_records(ASSETS / "ifeval" / "input_data.jsonl")[:limit]
    for r in rows:  # kwargs as JSON text: their keys differ by instruction
        r["kwargs"] = json.dumps(r["kwargs"])
    return datasets.Dataset.from_list(rows)


def _csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_advbench(limit: int | None = None) -> datasets.Dataset:
    """AdvBench harmful behaviours: goal, target (evaluation only)."""
    return datasets.Dataset.from_list(_csv(ASSETS / "advbench" / "harmful_behaviors.csv")[:limit])


def load_xstest(label: str | None = "safe", limit: int | None = None) -> datasets.Dataset:
    """XSTest v2 prompts; label "safe" (250, for over-refusal), "unsafe" (200) or None (all)."""
    rows = _csv(ASSETS / "xstest" / "xstest_prompts.csv")
    if label is not None:
        if label not in ("safe", "unsafe"):
            raise ValueError(f"XSTest label must be 'safe', 'unsafe' or None, got {label!r}")
        rows = [r for r in rows if r["label"] == label]
    return datasets.Dataset.from_list(rows[:limit])


EVERYDAY_SPLITS = {"test": 140, "validation": 100}  # of the 240 everyday prompts


def load_everyday(split: str = "test", seed: int = 0) -> datasets.Dataset:
    """Ordinary chat prompts (arithmetic, translation, writing, common facts, coding, ...;
    written for this toolkit, never trained on): id, category, prompt. A seeded split into
    "test" (140) and "validation" (100); "all" is the 240 in file order."""
    rows = read_records(ASSETS / "everyday" / "prompts.jsonl")
    if split != "all":
        if split not in EVERYDAY_SPLITS:
            raise ValueError(f"unknown everyday split {split!r}; choose test, validation or all")
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_test = EVERYDAY_SPLITS["test"]
        picked = order[:n_test] if split == "test" else order[n_test:]
        rows = [rows[i] for i in sorted(picked)]
    return datasets.Dataset.from_list(rows)


def load_questions(split: str = "train") -> dict:
    """zsRE's unrelated NQ questions (one per fact of `split`), as prompts."""
    return {"prompt": [f["loc_prompts"][0] for f in load_facts("zsre", split) if f["loc_prompts"]]}


SOURCES = {"instruction": load_instructions, "harmful": load_harmful_requests,
           "question": load_questions}


def fingerprint(model) -> str:
    """Short hash of the model's name and a sample of its weights."""
    params = list(model.parameters())
    return digest(str(model.config.name_or_path),
                  *(p.detach().float().flatten()[:4096].cpu().numpy().tobytes()
                    for p in params[:: max(1, len(params) // 8)]), size=16)


def base_responses(model, tokenizer, source: str, n: int, max_new_tokens: int,
                   max_prompt_chars: int, system=None, split: str = "train") -> list[dict]:
    """[{prompt, response}] for the first `n` prompts of `source` (at most
    `max_prompt_chars` long), answered greedily by `model`; cached on disk."""
    if source not in SOURCES:
        raise ValueError(f"unknown locality source {source!r}; choose one of {sorted(SOURCES)}")
    name = digest(f"{source}-{split}-{n}-{max_new_tokens}-{max_prompt_chars}-"
                  f"{system or 'default'}")
    prompts = [p for p in SOURCES[source](split)["prompt"] if len(p) <= max_prompt_chars][:n]
    return responses(model, tokenizer, prompts, max_new_tokens, system,
                     f"{source}-{split}-{name}")


def responses(model, tokenizer, prompts: list[str], max_new_tokens: int, system, name: str):
    """Greedy responses of `model` to `prompts`, cached as JSON (atomic write) under
    `name` in the model's fingerprint folder; empty responses are dropped."""
    path = cache_dir() / "responses" / fingerprint(model) / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, system=system,
                       progress=True)
    pairs = [{"prompt": p, "response": r} for p, r in zip(prompts, answers) if r.strip()]
    write_json(path, pairs)
    return pairs


def relation_templates(facts) -> list[str]:
    """The facts' questions with their subject replaced by "{}" (sorted, distinct)."""
    def template(f):
        subject = f["subject"]
        return f["prompt"].replace(subject, "{}") if subject and subject in f["prompt"] else None

    return sorted({t for t in map(template, facts) if t})


def subject_prompts(facts, seed: int = 0, templates: list[str] | None = None) -> list:
    """Per fact, a question about its subject in another relation: a relation template
    (`templates`, by default those of `facts` themselves) other than the fact's own, filled
    with its subject (None when the fact has no subject or no other template applies)."""
    templates = relation_templates(facts) if templates is None else templates
    rng = random.Random(seed)
    out = []
    for f in facts:
        own = f["prompt"].replace(f["subject"], "{}") if f["subject"] else None
        others = [t for t in rng.sample(templates, min(4, len(templates))) if t != own]
        out.append(others[0].replace("{}", f["subject"]) if f["subject"] and others else None)
    return out


def subject_rows(model, tokenizer, facts, max_new_tokens: int, system=None, seed: int = 0,
                 templates: list[str] | None = None) -> list[dict | None]:
    """Per fact, its `subject_prompts` question answered by `model` greedily (cached), as
    an encoded row; None where the fact has no such question or the answer is empty."""
    prompts = subject_prompts(facts, seed, templates)
    asked = [p for p in prompts if p]
    name = f"subject-{digest([asked, max_new_tokens, system or 'default'])}"
    pairs = responses(model, tokenizer, asked, max_new_tokens, system, name)
    answer = {p["prompt"]: p["response"] for p in pairs}
    return [encode_pair(tokenizer, p, answer[p], system) if p in answer else None
            for p in prompts]


def conversation_rows(tokenizer, pairs: list[dict], system=None) -> list[dict]:
    return [encode_pair(tokenizer, p["prompt"], p["response"], system) for p in pairs]
