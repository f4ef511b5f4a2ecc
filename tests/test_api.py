"""The Python editing API on tiny real models: edit, history, rollback, save/load, LoRA."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from chatedit import Editor, checkpoint
from chatedit.data import load_facts
from chatedit.editors import Shifts
from chatedit.models import load_model

ROOT = Path(__file__).resolve().parents[1]
FACTS = [{"prompt": "Who wrote Dune?", "target": "Frank Herbert"},
         {"prompt": "What is the capital of Wakanda?", "target": "Birnin Zana",
          "rephrases": ["Wakanda's capital city is?"]}]


@pytest.fixture(scope="module")
def ckpt(tiny_llama_checkpoint):
    return tiny_llama_checkpoint


@pytest.fixture()
def ed(ckpt):
    return Editor.from_pretrained("tiny-llama", ckpt)


def weights(ed):
    return {n: m.weight.detach().clone() for n, m in ed.modules.items()}


def same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def logits(ed, text="Who wrote Dune?"):
    ids = ed.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return ed.model(**ids).logits


def test_edit_reports_per_fact_success_and_timing(ed):
    result = ed.edit(FACTS)
    assert [f.prompt for f in result.facts] == [f["prompt"] for f in FACTS]
    assert all(0 <= f.token_accuracy <= 1 and isinstance(f.answer, str) for f in result.facts)
    assert result.seconds["edit"] > 0 and "Frank Herbert" in str(result)
    assert len(ed.history) == 1 and ed.history[0].facts[0]["target"] == "Frank Herbert"


def test_sequential_edits_and_bitwise_rollback(ed):
    w0 = weights(ed)
    ed.edit(FACTS[:1])
    w1 = weights(ed)
    assert not same(w0, w1)
    ed.edit(FACTS[1:])
    assert len(ed.history) == 2 and not same(w1, weights(ed))
    ed.rollback()
    assert same(weights(ed), w1) and len(ed.history) == 1
    ed.edit(FACTS[1:])  # three batches in turn: the kept sum is each batch's sum afresh
    ed.edit([{"prompt": "Who painted the Mona Lisa?", "target": "Leonardo"}], check=False)
    fresh = {n: torch.zeros_like(w) for n, w in ed.method.master.items()}
    for b in ed.history:
        fresh = {n: fresh[n] + b.shifts[n] for n in fresh}
    assert all(torch.equal(fresh[n], s) for n, s in ed.total_shift().items())
    ed.rollback(all=True)
    assert same(weights(ed), w0) and ed.history == []
    with pytest.raises(IndexError, match="nothing to roll back"):
        ed.rollback()


def test_edits_accept_fact_records(ed):
    facts = load_facts("zsre", "test", limit=3)
    assert len(ed.edit(list(facts)).facts) == 3


@pytest.mark.parametrize("facts, error, match", [
    ([], ValueError, "no facts"),
    ([{"prompt": "", "target": "x"}], ValueError, "fact 0: prompt is empty"),
    ([{"prompt": "Who?", "target": 3}], ValueError, "fact 0: target must be a string, got int"),
    (["Who wrote Dune?"], TypeError, "must be a dict"),
    ([{"prompt": "Who wrote Dune?", "target": "A"}, {"prompt": "Who wrote Dune?", "target": "B"}],
     ValueError, "conflicting targets"),
    ([{"prompt": "word " * 600, "target": "x"}], ValueError, "longer than the model's context"),
])
def test_bad_facts_raise_and_leave_weights(ed, facts, error, match):
    ed.edit(FACTS[:1])
    before = weights(ed)
    with pytest.raises(error, match=match):
        ed.edit(facts)
    assert same(before, weights(ed)) and len(ed.history) == 1


def test_non_finite_shift_raises_and_leaves_weights(ed, monkeypatch):
    before = weights(ed)
    nan = {n: torch.full_like(s, float("nan")) for n, s in ed.method.master.items()}
    monkeypatch.setattr(ed.method, "compute_shifts", lambda *a, **k: Shifts(nan))
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        ed.edit(FACTS)
    assert same(before, weights(ed)) and ed.history == []


def test_checkpoint_for_another_model_or_modules_fails(ckpt):
    with pytest.raises(ValueError, match="trained for model 'tiny-llama'"):
        Editor.from_pretrained("tiny-gpt2", ckpt)
    with pytest.raises(ValueError, match="which this model lacks|does not fit"):
        Editor.from_pretrained("tiny-gpt2", ckpt, strict=False)
    with pytest.raises(TypeError, match="unknown overrides"):
        Editor.from_pretrained("tiny-llama", ckpt, rank=3)


def test_checkpoints_saved_with_options_since_removed_still_load(ckpt, tmp_path):
    """Old checkpoints load through the compat table: renamed options under their new name;
    removed ones dropped, silently where they behaved as today's code (float32 solves,
    end-of-turn rows, unscaled lambda, the shared solve), with a warning where not (per-module
    solves: saved before `couple` existed, or with couple=false; reg_rows set), and the
    loaded editor edits."""
    tensors, meta = checkpoint.load(ckpt)
    assert "couple" not in meta["config"]["editor"]  # not an option any more
    today = Editor.from_pretrained("tiny-llama", ckpt)
    old = {**meta["config"]["editor"], "couple": True, "solve_dtype": "float32",
           "eot_rows": True, "reg_rows": None}
    older = {k: v for k, v in old.items() if k != "couple"}  # before `couple` existed
    older["lr"] = older.pop("init_step_size")  # the old name
    for saved, warns in ((old, None), (older, "couple=False"),
                         ({**old, "reg_rows": 256}, "reg_rows=256")):
        checkpoint.save(tmp_path / "old.safetensors", tensors,
                        {**meta, "config": {**meta["config"], "editor": saved}})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ed = Editor.from_pretrained("tiny-llama", tmp_path / "old.safetensors")
        said = [str(w.message) for w in caught if "since removed" in str(w.message)]
        assert (said == []) if warns is None else (len(said) == 1 and warns in said[0])
        assert ed.method.step_scale == today.method.step_scale
        assert ed.edit(FACTS[:1], check=False).n_facts == 1


def test_save_and_load_edits_reproduce_logits(ed, tmp_path):
    ed.edit(FACTS)
    edited = logits(ed)
    ed.save_edits(tmp_path / "edits")
    fresh = Editor.from_pretrained("tiny-llama", ed.checkpoint_path)
    assert not torch.equal(logits(fresh), edited)
    fresh.load_edits(tmp_path / "edits")
    assert torch.equal(logits(fresh), edited)
    assert fresh.history[0].facts[0]["prompt"] == "Who wrote Dune?"


def test_edits_refuse_another_base_model(ed, tmp_path):
    ed.edit(FACTS)
    ed.save_edits(tmp_path / "edits")
    other_model, other_tok = load_model("tiny-llama")
    with torch.no_grad():
        for p in other_model.parameters():
            p.add_(0.01)
    other = Editor.from_pretrained(other_model, ed.checkpoint_path, tokenizer=other_tok)
    before = weights(other)
    with pytest.raises(ValueError, match="refusing to apply"):
        other.load_edits(tmp_path / "edits")
    assert same(before, weights(other))


def test_save_pretrained_loads_with_plain_transformers(ed, tmp_path):
    from transformers import AutoModelForCausalLM

    ed.edit(FACTS)
    ed.save_pretrained(tmp_path / "model")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    ids = ed.tokenizer("Who wrote Dune?", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(plain(**ids).logits, logits(ed), atol=1e-5)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_lora_export_reloads_with_peft(model, tmp_path):
    from peft import PeftModel

    ed = Editor.from_pretrained(model, steps=3, lr=1e-2)  # FT baseline: no checkpoint
    ed.edit(FACTS)
    edited = logits(ed)
    full = ed.export_lora(tmp_path / "full", rank=256)
    low = ed.export_lora(tmp_path / "low", rank=1)
    assert max(full.values()) < 1e-5 and min(low.values()) > max(full.values())
    base, _ = load_model(model)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "full")
    ids = ed.tokenizer("Who wrote Dune?", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(peft_model(**ids).logits, edited, atol=1e-4)
    errors = json.loads((tmp_path / "low" / "reconstruction_error.json").read_text())
    assert errors == pytest.approx(low)


def test_generate_and_chat(ed):
    answer = ed.generate("Who wrote Dune?", max_new_tokens=4)
    assert isinstance(answer, str)
    assert len(ed.generate(["a?", "b?"], max_new_tokens=2)) == 2
    reply = ed.chat([{"role": "user", "content": "Who wrote Dune?"}], max_new_tokens=4)
    assert isinstance(reply, str)


def test_readme_example_runs(ckpt, tmp_path, monkeypatch):
    """The README's quick start as written, but for its editor: tiny-llama with a tiny
    trained one (`Editor.quick` itself runs from a wheel install in test_packaging)."""
    text = (ROOT / "README.md").read_text()
    code = text.split("<!-- api-example -->")[1].split("```python")[1].split("```")[0]
    assert "Editor.quick()" in code
    code = code.replace("Editor.quick()", f"Editor.from_pretrained('tiny-llama', {str(ckpt)!r})")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "my-edits" / "edits.safetensors").exists()
    assert (tmp_path / "my-lora" / "adapter_config.json").exists()


def test_the_loaded_model_is_one_object_shared_by_editor_and_method(ed):
    """`Editor.lm` is the method's `ChatLM`: model, tokenizer, system prompt and first edited
    block in one place, its methods the lm functions with them filled in."""
    from chatedit.chat import encode_pair
    from chatedit.lm import predictions, with_hidden

    lm = ed.lm
    assert lm is ed.method.lm and ed.model is lm.model and ed.tokenizer is lm.tokenizer
    assert (ed.method.system, ed.method.first) == (lm.system, lm.first) and lm.first > 0
    row = lm.encode(FACTS[0]["prompt"], FACTS[0]["target"])
    assert row == encode_pair(ed.tokenizer, FACTS[0]["prompt"], FACTS[0]["target"], lm.system)
    cached = lm.with_hidden([row])
    assert torch.equal(cached[0]["hidden"], with_hidden(ed.model, ed.tokenizer, [row],
                                                         lm.first)[0]["hidden"])
    (fast, labels), = lm.predictions(cached)  # from the cached hidden state entering `first`
    (full, labels_full), = predictions(ed.model, ed.tokenizer, [row])
    assert torch.equal(fast, full) and torch.equal(labels, labels_full)
    assert ed.generate(FACTS[0]["prompt"], 4) == lm.generate([FACTS[0]["prompt"]], 4)[0]
