"""One normalisation of user text, used by the API, the data loaders and the chat encoder.

- `clean(text)`: Unicode NFC, surrounding whitespace removed (inner whitespace and newlines
  kept: responses are multi-line). What the model is shown.
- `key(text)`: `clean`, lower-cased, inner whitespace collapsed. What two facts are
  compared by: "Who  wrote Dune?" and "who wrote dune?" are the same prompt.
- `visible(text)`: whether anything is left once whitespace and invisible characters
  (format and control characters such as U+200B) are removed.
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


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation for exact match: lower case, no punctuation, no articles,
    single spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, target: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(target)
