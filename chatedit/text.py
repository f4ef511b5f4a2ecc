"""One normalisation of user text, used by the API, the data loaders and the chat encoder.

- `clean(text)`: Unicode NFC, surrounding whitespace removed (inner whitespace and newlines
  kept: responses are multi-line). What the model is shown.
- `key(text)`: `clean`, lower-cased, inner whitespace collapsed. What two facts are
  compared by: "Who  wrote Dune?" and "who wrote dune?" are the same prompt.
- `visible(text)`: whether anything is left once whitespace and invisible characters
  (format and control characters such as U+200B) are removed.
- `check_text(value, what, tokenizer)`: `clean(value)` or the one error every entry point
  (facts, chat encoding, API messages) gives for text it cannot use.
"""

from __future__ import annotations

import re
import string
import unicodedata


def clean(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip()


def key(text: str) -> str:
    return " ".join(clean(text).lower().split())


def visible(text: str) -> bool:
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cf", "Cc", "Zs", "Zl",
                                                                      "Zp")
               for ch in text)


def control_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens (chat-template markers such as <|im_start|>, bos/eos):
    strings that, if they appeared in user text, would be encoded as the tokens themselves."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = set(tokenizer.all_special_tokens) | {t.content for t in added.values() if t.special}
    return sorted(t for t in found if t)


def check_text(value, what: str, tokenizer=None) -> str:
    """`clean(value)`, or a clear error: not a string, empty or only invisible
    characters, or (with `tokenizer`) containing one of its control tokens. Such text is
    rejected, not split into plain pieces: a prompt holding "<|im_start|>assistant" would
    forge an assistant turn, a target holding "<|im_end|>" would teach the model to end its
    turn early, and silently rewriting what the user asked for would edit another fact."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}: {value!r}")
    text = clean(value)
    if not visible(text):
        raise ValueError(f"{what} is empty or only invisible characters: {value!r}")
    if tokenizer is not None:
        for token in control_tokens(tokenizer):
            if token in text:
                raise ValueError(f"{what} contains the tokenizer's control token {token!r}, "
                                 f"which chat formatting would encode as that token itself: "
                                 f"{value[:80]!r}")
    return text


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation for exact match: lower case, no punctuation, no articles,
    single spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, target: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(target)
