"""The real embedded chat model (slow: converts the GGUF once, ~30 s, then loads in < 3 s)."""
import time

import pytest

from chatedit.chat import IGNORE, encode_pair, generate
from chatedit.models import edit_modules, kv_shape, load_model, smollm2_folder

pytestmark = pytest.mark.slow


def test_loads_offline_and_answers(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    answer = generate(model, tok, ["What is the capital of France?"], max_new_tokens=16)[0]
    assert "Paris" in answer


def test_second_load_reuses_the_converted_cache(smollm2):
    folder = smollm2_folder()
    stamp = (folder / "model.safetensors").stat().st_mtime
    start = time.perf_counter()
    model, _ = load_model("smollm2-135m-instruct")
    print(f"second load: {time.perf_counter() - start:.2f}s")
    assert (folder / "model.safetensors").stat().st_mtime == stamp
    assert not any(p.name.startswith("smollm2-135m-instruct.tmp") for p in folder.parent.iterdir())
    assert model.dtype.is_floating_point and not hasattr(model.config, "quantization_config")


def test_chat_template_and_mask(smollm2):
    _, tok = smollm2
    row = encode_pair(tok, "Who is the president of France?", "Victor Hugo")
    text = tok.decode(row["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    masked = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
    assert tok.decode(masked) == "Victor Hugo<|im_end|>"


def test_edited_modules(smollm2):
    model, _ = smollm2
    mods = edit_modules(model, "mlp.down_proj", range(24, 30))
    assert list(mods) == [f"model.layers.{i}.mlp.down_proj" for i in range(24, 30)]
    assert {kv_shape(m) for m in mods.values()} == {(1536, 576)}
