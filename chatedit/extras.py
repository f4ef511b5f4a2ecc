"""Optional packages: which setup.cfg extra brings each, and a clear error where one is
needed but absent (the core install is what `make demo` needs; `make install` has all)."""

from __future__ import annotations

import importlib.util

EXTRAS = {"lm_eval": "eval", "wandb": "wandb", "peft": "lora"}


def require(module: str, purpose: str) -> None:
    """ImportError naming `purpose` and the extra to install, unless `module` is importable."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{purpose} needs the {module} package: pip install "
                          f"'chatedit[{EXTRAS[module]}]' (or `make install`, which has every "
                          "extra)")
