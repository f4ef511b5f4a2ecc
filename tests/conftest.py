import os
import subprocess
import sys
from pathlib import Path

# Tests never reach a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402

from chatedit.models import load_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    return load_model("tiny-gpt2")


# the shipped model families, as seeded random 4-block models (SmolLM2's tokenizer)
FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"]
REAL = ["smollm2-135m-instruct", "smollm2-135m-instruct-safe"]


def pytest_configure(config):
    """`make test-fast` (-m "not slow") must load no real model: in such a run, here and in
    every script a test starts, loading one is an error (`models.load_model`)."""
    if "not slow" in (config.option.markexpr or ""):
        os.environ["CHATEDIT_DENY_MODELS"] = ",".join(REAL)


def pytest_collection_modifyitems(config, items):
    """Every test that takes the real model's fixture is marked `slow` (checked in every run,
    so `make test` proves what `make test-fast` relies on)."""
    unmarked = [item.nodeid for item in items if "smollm2" in getattr(item, "fixturenames", ())
                and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError(f"tests load the real model without the slow mark: {unmarked}")


@pytest.fixture(scope="session", params=["tiny-llama", "tiny-gpt2"])
def tiny(request):
    """A Llama-layout and a GPT-2-layout (Conv1D) model: (name, model, tokenizer)."""
    return (request.param, *load_model(request.param))


@pytest.fixture(scope="session", params=FAMILIES)
def family(request):
    """Every shipped model family: (name, model, tokenizer)."""
    return (request.param, *load_model(request.param))


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_llama_checkpoint(tmp_path_factory):
    """A MALMEN editor for tiny-llama, meta-trained for 4 steps by scripts/train.py."""
    folder = tmp_path_factory.mktemp("tiny-llama-editor")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CHATEDIT_CACHE": str(folder / "cache")}
    args = ["model=tiny-llama", "locality=nq", "train.steps=4", "train.n_edits=8",
            "data.val_size=8", "train.test_facts=8", "editor.rank=16", "train.val_every=4",
            f"hydra.run.dir={folder / 'run'}"]
    script = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
    out = subprocess.run([sys.executable, str(script), *args], cwd=folder, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return folder / "run" / "checkpoint.safetensors"
