"""Files: the one way the toolkit writes them (atomically) and names what it caches.

- `atomic_file(path)`: write into a temporary sibling, then rename: readers see the old
  file or the new one, never half of one; on any error (Ctrl-C included) nothing changes.
- `atomic_folder(path)`: the same for a folder of files.
- `digest(*parts)`: a short content hash naming a cache entry; `tensors_digest(named)`,
  that of named tensors (names, shapes, raw bytes).
- `cache_dir()`: where cached models and responses live ($CHATEDIT_CACHE or
  ~/.cache/chatedit).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """Where converted checkpoints and cached responses live: $CHATEDIT_CACHE or
    ~/.cache/chatedit."""
    return Path(os.environ.get("CHATEDIT_CACHE", Path.home() / ".cache" / "chatedit"))


def digest(*parts, size: int = 8) -> str:
    """The first `size` hex digits of the sha256 of the parts, fed in order (bytes as they
    are, strings UTF-8, anything else as sorted-key JSON): the name of a cache entry that
    changes with its content."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, str):
            part = part.encode()
        elif not isinstance(part, bytes):
            part = json.dumps(part, sort_keys=True).encode()
        h.update(part)
    return h.hexdigest()[:size]


def tensors_digest(named, size: int = 16) -> str:
    """`digest` of (name, tensor) pairs in their order: each name, shape and raw bytes (any
    dtype), e.g. the fingerprint of a model's weights."""
    import torch

    return digest(*(part for name, t in named for part in (
        name, str(tuple(t.shape)),
        t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())), size=size)


def check_folder(path: str | Path) -> Path:
    """`path` as a folder to write into, or a clear error before anything is written: it (or
    one of its parents) exists and is not a folder."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise NotADirectoryError(f"cannot write into {path}: {p} exists and is not a folder")
    return path


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_file(path: str | Path):
    """Yields a temporary path to write `path`'s content into; renamed onto `path` when the
    block ends without error, removed otherwise."""
    path = Path(path)
    check_folder(path.parent).mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write the file {path}: it is a folder")
    tmp = _temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2))


def pyplot():
    """matplotlib's pyplot on its file-only backend, Agg (the `plot` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 100) -> None:
    """A matplotlib figure written atomically as PNG, then closed."""
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


@contextmanager
def atomic_folder(path: str | Path):
    """Write a folder's files into a temporary sibling, then move them in: a new folder
    appears whole (one rename), an existing one gets each file replaced whole, other files
    kept; on any error (Ctrl-C included) nothing is moved and the temporary folder goes."""
    path = check_folder(path)
    tmp = _temporary(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            for f in sorted(tmp.rglob("*")):
                if f.is_file():
                    target = path / f.relative_to(tmp)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(f, target)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
