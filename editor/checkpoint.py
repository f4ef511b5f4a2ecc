"""Safetensors checkpoints, written atomically (temp file + rename); no pickle anywhere.

A checkpoint holds tensors under prefixes ("hypernet.", "optim.") and a JSON metadata
entry ("meta": step, config, optimizer hyper-parameters, history...).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def check_folder(path: str | Path) -> Path:
    """`path` as a folder to write into, or a clear error before anything is written: it (or
    one of its parents) exists and is not a folder."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise NotADirectoryError(f"cannot write into {path}: {p} exists and is not a folder")
    return path


@contextmanager
def atomic_folder(path: str | Path):
    """Write a folder's files into a temporary sibling, then move them in: a new folder
    appears whole (one rename), an existing one gets each file replaced whole, other files
    kept; on any error (Ctrl-C included) nothing is moved and the temporary folder goes."""
    path = check_folder(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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


def save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    path = Path(path)
    check_folder(path.parent).mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write the checkpoint {path}: it is a folder")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        save_file(data, str(tmp), metadata={"meta": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a safetensors file; never unpickles. Errors name the path: missing,
    a folder, not a safetensors file (truncated, random bytes, a pickle), unreadable meta."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; pass the .safetensors file inside it")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("meta", "{}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for broken files
        raise ValueError(f"{path} is not a readable safetensors file "
                         f"({type(err).__name__}: {err})") from None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its metadata is not valid JSON ({err})") from None
    return tensors, meta


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def unprefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """An optimizer's state as flat tensors plus its param groups (JSON-able)."""
    state = opt.state_dict()
    tensors = {f"{i}.{k}": torch.as_tensor(v) for i, s in state["state"].items()
               for k, v in s.items()}
    return tensors, state["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list):
    state = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups})
