import os

# Tests never reach a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402

from editor.models import load_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    return load_model("tiny-gpt2")


@pytest.fixture(scope="session", params=["tiny-llama", "tiny-gpt2"])
def tiny(request):
    """Both tiny architectures: (name, model, tokenizer)."""
    return (request.param, *load_model(request.param))


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m-instruct")
