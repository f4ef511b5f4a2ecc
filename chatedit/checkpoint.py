"""Safetensors checkpoints, written atomically (temp file + rename); no pickle anywhere.

A checkpoint holds tensors under prefixes ("hypernet.", "optim.") and a JSON metadata
entry ("meta": step, config, optimizer hyper-parameters, history...).
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
from safetensors.torch import save_file

from .files import atomic_file


def save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(data, str(tmp), metadata={"meta": json.dumps(meta)})


def load(path: str | Path, with_tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a safetensors file ({} for tensors without `with_tensors`); never
    unpickles. The file is read once (header and tensors from the same bytes: a file renamed
    over this path meanwhile cannot mix two files). Errors name the path: missing, a folder,
    not a safetensors file (truncated, random bytes, a pickle), unreadable meta."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; pass the .safetensors file inside it")
    try:
        with open(path, "rb") as f:
            data = f.read() if with_tensors else f.read(8)
            size = int.from_bytes(data[:8], "little")
            if len(data) < 8 or size > path.stat().st_size:
                raise ValueError("truncated header")
            if not with_tensors:
                data += f.read(size)
        header = json.loads(data[8:8 + size])
        raw = (header.get("__metadata__") or {}).get("meta", "{}")
        tensors = safetensors.torch.load(data) if with_tensors else {}
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


def pack(obj, tensors: dict[str, torch.Tensor]):
    """`obj` (nested dicts with str keys, lists, tuples, sets, tensors, JSON scalars) as
    JSON, each tensor moved into `tensors` under a name of its own (`unpack` inverts it)."""
    if isinstance(obj, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = obj.clone()  # rows' tensors are often views of one batch's
        return {"__tensor__": name}
    if isinstance(obj, dict):
        return {"__dict__": [[k, pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple | set):
        kind = "__tuple__" if isinstance(obj, tuple) else "__set__"
        return {kind: [pack(v, tensors) for v in (sorted(obj) if kind == "__set__" else obj)]}
    if isinstance(obj, list):
        return [pack(v, tensors) for v in obj]
    return obj


def unpack(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        (kind, value), = obj.items()
        if kind == "__tensor__":
            return tensors[value]
        if kind == "__dict__":
            return {k: unpack(v, tensors) for k, v in value}
        return (tuple if kind == "__tuple__" else set)(unpack(v, tensors) for v in value)
    return obj
