"""Chat formatting: a (prompt, answer) pair becomes one chat conversation.

With a chat template (system prompt included when the template has one):
    <template prefix for the user turn>  answer <end-of-turn>
              labels = -100              labels = token ids
Without one (base models): `prompt + " " + answer`, labels on the answer tokens.

The label mask covers exactly the answer tokens plus the end-of-turn token (trained on, so
the model learns to stop; the edit metrics count the answer tokens only, `answer_mask`). Tokens are
found by character offsets of one joint tokenisation, so the prompt part is tokenised
exactly as it is for generation (`encode_prompt`).
"""

from __future__ import annotations

import torch

from .text import check_text, clean

IGNORE = -100


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _messages(prompt: str, system: str | None, answer: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def prompt_text(tokenizer, prompt: str, system: str | None = None) -> str:
    """The text a model continues to answer `prompt` (chat header included)."""
    prompt = check_text(prompt, "prompt", tokenizer)
    if system:
        system = check_text(system, "system prompt", tokenizer)
    if not has_template(tokenizer):
        return prompt
    return tokenizer.apply_chat_template(
        _messages(prompt, system), add_generation_prompt=True, tokenize=False
    )


def encode_prompt(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of `prompt_text`, for generation."""
    text = prompt_text(tokenizer, prompt, system)
    return tokenizer(text, add_special_tokens=not has_template(tokenizer))["input_ids"]


def _answer_span(tokenizer, prompt: str, answer: str, system: str | None):
    """(full text, start and end of the answer in it, whether an end-of-turn follows)."""
    prefix = prompt_text(tokenizer, prompt, system)
    prompt, system = clean(prompt), system and clean(system)
    if not has_template(tokenizer):
        return f"{prefix} {answer}", len(prefix), len(prefix) + 1 + len(answer), False
    full = tokenizer.apply_chat_template(_messages(prompt, system, answer), tokenize=False)
    if not full.startswith(prefix):
        raise ValueError("the chat template renders the user turn differently with and without "
                         "an assistant answer; cannot locate the answer tokens")
    start = full.find(answer, len(prefix))
    if start < 0:
        raise ValueError(f"the chat template changed the answer {answer!r} (e.g. stripped it); "
                         "pass the answer as the template writes it")
    return full, start, start + len(answer), bool(full[start + len(answer):].strip())


def encode_pair(tokenizer, prompt: str, answer: str, system: str | None = None,
                max_length: int | None = None, subject: str | None = None) -> dict:
    """Tokenise one conversation. Returns input_ids, labels (IGNORE outside the answer and its
    end-of-turn token), `answer_start`, the index of the first answer token, and `eot`,
    whether the last label is an end-of-turn token (not part of the answer). With `subject`,
    also `subject_last`: the index of the subject's last token in the prompt (the first
    occurrence, case-insensitive; -1 when the prompt does not contain it), where
    locate-then-edit methods read and write a fact (chatedit.memit)."""
    answer = check_text(answer, "target", tokenizer)
    text, start, end, has_eot = _answer_span(tokenizer, prompt, answer, system)
    enc = tokenizer(text, add_special_tokens=not has_template(tokenizer),
                    return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    # Special tokens added by the tokenizer (e.g. BOS) carry the empty span (0, 0).
    answer_idx = [i for i, (a, b) in enumerate(offsets) if b > start and a < end and b > a]
    if not answer_idx or offsets[answer_idx[0]][0] < start:
        raise ValueError(f"a token straddles the prompt and the answer {answer!r}; "
                         "cannot separate them")
    last = answer_idx[-1]
    if has_eot:
        last += 1  # the template's end-of-turn token comes right after the answer
        ids = ids[: last + 1]
    elif has_template(tokenizer):
        ids = ids[: last + 1] + [tokenizer.eos_token_id]
        last += 1
    else:
        ids = ids[: last + 1]
    labels = [IGNORE] * answer_idx[0] + ids[answer_idx[0]: last + 1]
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"conversation is {len(ids)} tokens, longer than the model's context of "
                         f"{max_length}: {prompt[:80]!r}")
    row = {"input_ids": ids, "labels": labels, "answer_start": answer_idx[0],
           "eot": has_template(tokenizer)}
    if subject:
        row["subject_last"] = _subject_last(text, offsets[:answer_idx[0]], clean(prompt),
                                            clean(subject), start)
    return row


def _subject_last(text: str, offsets, prompt: str, subject: str, answer_at: int) -> int:
    """Index of the token holding the last character of `subject` inside the user prompt
    (which ends before `answer_at` in `text`), or -1."""
    at = text.rfind(prompt, 0, answer_at)
    where = prompt.lower().find(subject.lower())
    if at < 0 or where < 0:
        return -1
    end = at + where + len(subject)  # one past the subject's last character
    inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > a]
    return inside[-1] if inside else -1


def pad(tokenizer, rows: list[dict], side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch of encoded rows (input_ids, optional labels, cached hidden and final states).
    Right padding for training, left padding for generation. Padding gets attention 0 and
    label IGNORE."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    if not rows:
        raise ValueError("empty batch")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    width = max(len(r["input_ids"]) for r in rows)

    def fill(seq, value):
        extra = [value] * (width - len(seq))
        return extra + list(seq) if side == "left" else list(seq) + extra

    out = {
        "input_ids": [fill(r["input_ids"], pad_id) for r in rows],
        "attention_mask": [fill([1] * len(r["input_ids"]), 0) for r in rows],
    }
    if "labels" in rows[0]:
        out["labels"] = [fill(r["labels"], IGNORE) for r in rows]
    batch = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
    if "subject_last" in rows[0]:  # per row: the subject's last token (-1: none)
        batch["subject_last"] = torch.tensor([r.get("subject_last", -1) for r in rows])
    if "eot" in rows[0]:  # per row: its last label is the end-of-turn token
        batch["eot"] = torch.tensor([bool(r.get("eot")) for r in rows])
    if "hidden" in rows[0]:  # cached hidden states (T_i x d), zero-padded like the ids
        hidden = torch.zeros(len(rows), width, rows[0]["hidden"].shape[-1])
        for i, r in enumerate(rows):
            n = r["hidden"].shape[0]
            (hidden[i, width - n:] if side == "left" else hidden[i, :n]).copy_(r["hidden"])
        batch["hidden"] = hidden
    if "final" in rows[0]:  # cached last hidden states at the label positions, row after row
        batch["final"] = torch.cat([r["final"] for r in rows])
    return batch


def answer_mask(batch) -> torch.Tensor:
    """B x (T-1) mask of the positions that predict an answer token: the label positions
    without each row's end-of-turn label (rows of `eot` batches)."""
    mask = batch["labels"][:, 1:] != IGNORE
    if "eot" in batch:
        mask = mask.clone()
        last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # last label per row
        drop = batch["eot"].to(mask.device) & mask.any(1)
        mask[drop.nonzero().squeeze(1), last[drop]] = False
    return mask


def encode_facts(tokenizer, facts, system: str | None = None) -> dict[str, torch.Tensor]:
    """A right-padded training batch for facts (dicts or records with prompt and target)."""
    rows = [encode_pair(tokenizer, _get(f, "prompt"), _get(f, "target"), system,
                        subject=_get(f, "subject")) for f in facts]
    return pad(tokenizer, rows, "right")


def _get(fact, key):
    return fact.get(key) if isinstance(fact, dict) else getattr(fact, key, None)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 32,
             batch_size: int = 16, system: str | None = None, progress: bool = False,
             token_ids: bool = False) -> list:
    """Greedy answers to `prompts` (in their order), batched by length with left padding;
    special tokens removed. `token_ids`: each answer as its token ids instead, up to and
    including the first end-of-sequence token."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p, system) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    answers = [""] * len(prompts)
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc="generate", disable=not progress):
        chunk = order[i:i + batch_size]
        batch = pad(tokenizer, [{"input_ids": encoded[j]} for j in chunk], "left")
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        if token_ids:
            ends = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
            for j, ids in zip(chunk, new.tolist()):
                cut = next((i for i, t in enumerate(ids) if t in ends), len(ids) - 1)
                answers[j] = ids[:cut + 1]
            continue
        for j, text in zip(chunk, tokenizer.batch_decode(new, skip_special_tokens=True)):
            answers[j] = text.strip()
    return answers


def describe(tokenizer, encoded: dict) -> str:
    """A readable line per token: index, label mask (1 = trained on), id and text."""
    lines = [f"{'i':>4} {'mask':>4} {'id':>6}  token"]
    for i, (tid, label) in enumerate(zip(encoded["input_ids"], encoded["labels"])):
        lines.append(f"{i:>4} {int(label != IGNORE):>4} {tid:>6}  {tokenizer.decode([tid])!r}")
    return "\n".join(lines)


# ------------------------------------------------------------------ rows of facts

KINDS = ("edit", "rephrase", "loc")


def fact_row(tokenizer, fact, kind: str, system=None) -> dict | None:
    """The encoded row of one fact for `kind` = "edit" (prompt -> target), "rephrase" (first
    rephrase -> target) or "loc" (first locality prompt -> its answer); None if it has none."""
    if kind == "edit":
        return encode_pair(tokenizer, fact["prompt"], fact["target"], system,
                           subject=fact.get("subject"))
    if kind == "rephrase":
        return (encode_pair(tokenizer, fact["rephrases"][0], fact["target"], system)
                if fact["rephrases"] else None)
    if kind == "loc":
        return (encode_pair(tokenizer, fact["loc_prompts"][0], fact["loc_answers"][0], system)
                if fact["loc_prompts"] else None)
    raise ValueError(f"unknown row kind {kind!r}; choose one of {KINDS}")


def conversations(tokenizer, facts, kind: str, system=None) -> list[dict]:
    """Encoded rows of `kind` for the facts that have one."""
    return present(fact_row(tokenizer, f, kind, system) for f in facts)


def present(rows) -> list:
    return [r for r in rows if r is not None]


def sliced(rows: dict[str, list], n: int) -> dict[str, list]:
    """The rows of the first n facts of aligned rows (one entry per fact: a row, a list of
    rows, or None), as one list per kind, Nones dropped."""
    return {k: present(x for entry in r[:n]
                       for x in (entry if isinstance(entry, list) else [entry]))
            for k, r in rows.items()}
