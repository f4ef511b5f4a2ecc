import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from chatedit.models import (REGISTRY, edit_modules, kv_shape, load_model, set_weight_kv,
                           weight_kv)

MODULE = {"tiny-llama": "mlp.down_proj", "tiny-qwen2": "mlp.down_proj",
          "tiny-mistral": "mlp.down_proj", "tiny-gpt2": "mlp.c_proj"}


def test_unknown_name_lists_what_exists():
    with pytest.raises(FileNotFoundError) as err:
        load_model("no-such-model")
    msg = str(err.value)
    assert "no-such-model" in msg and all(name in msg for name in REGISTRY)


def test_missing_folder_and_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_bad_dtype():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model("tiny-llama", dtype="float8")


def test_tiny_models_are_seeded_and_have_real_tokenizers(family):
    name, model, tok = family
    again, _ = load_model(name)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert tok.decode(tok("The Eiffel Tower")["input_ids"], skip_special_tokens=True) == \
        "The Eiffel Tower"
    assert bool(tok.chat_template) == (name != "tiny-gpt2")
    assert type(model).__name__.lower().startswith(name.split("-")[1])


def test_local_folder_round_trip(tiny_llama, tmp_path):
    model, tok = tiny_llama
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model(str(tmp_path))
    ids = torch.tensor([tok("hello world")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits)
    assert tok2.chat_template == tok.chat_template


def test_edit_modules_resolve_every_family(family):
    name, model, _ = family
    mods = edit_modules(model, MODULE[name], [2, -1])
    assert len(mods) == 2 and all(n.endswith(MODULE[name]) for n in mods)
    kind = Conv1D if name == "tiny-gpt2" else nn.Linear
    assert all(isinstance(m, kind) for m in mods.values())
    assert ".2." in list(mods)[0] and ".3." in list(mods)[1]
    assert all(kv_shape(m) == (256, 64) for m in mods.values())  # d_k = MLP width, d_v = hidden


def test_edit_module_errors_name_what_exists(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match=r"'mlp.down' matches nothing.*mlp.down_proj"):
        edit_modules(model, "mlp.down", [0])
    with pytest.raises(ValueError, match=r"layer 7 does not exist: the model has 4 blocks"):
        edit_modules(model, "mlp.down_proj", [7])
    with pytest.raises(ValueError, match=r"is a LlamaMLP, not a linear map"):
        edit_modules(model, "mlp", [0])
    with pytest.raises(ValueError, match="no layers"):
        edit_modules(model, "mlp.down_proj", [])


def test_weight_layout_round_trip(family):
    """weight_kv is the map u -> v as v = u @ W (+ bias), on Linear and Conv1D alike, and
    set_weight_kv writes it back in the module's own layout."""
    name, model, _ = family
    (module,) = edit_modules(model, MODULE[name], [0]).values()
    original = weight_kv(module).detach().clone()
    d_k, d_v = kv_shape(module)
    u = torch.randn(5, d_k)
    bias = module.bias if module.bias is not None else torch.zeros(d_v)
    with torch.no_grad():
        assert torch.allclose(module(u), u @ original + bias, atol=1e-5)
        new = torch.randn(d_k, d_v)
        set_weight_kv(module, new)
        assert torch.equal(weight_kv(module), new)
        assert torch.allclose(module(u), u @ new + bias, atol=1e-5)
        set_weight_kv(module, original)
    assert torch.equal(weight_kv(module), original)
    with pytest.raises(ValueError, match="expected d_k x d_v"):
        set_weight_kv(module, torch.zeros(d_v, d_k))
    with pytest.raises(TypeError, match="not a linear map"):
        weight_kv(nn.LayerNorm(4))


def test_plain_prompts_option_drops_the_chat_template():
    from chatedit.chat import encode_pair

    _, tok = load_model("tiny-llama", chat_template=False)
    row = encode_pair(tok, "Who wrote Hamlet?", "Marlowe")
    assert tok.decode(row["input_ids"]) == "Who wrote Hamlet? Marlowe"
