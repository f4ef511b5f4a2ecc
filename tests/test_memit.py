"""MEMIT and AlphaEdit (chatedit.memit) on the tiny models: the edit raises the targets'
probability, AlphaEdit keeps the outputs on its preserved keys, the covariance cache, bad
facts and the Editor API (history, rollback, save / load of the per-batch statistics)."""

import pytest
import torch
import torch.nn.functional as F

from chatedit import Editor
from chatedit.chat import encode_facts, encode_pair, fact_row
from chatedit.lm import forward, key_moments, padded
from chatedit.memit import locate_edit, null_projector
from chatedit.models import weight_kv

FACTS = [{"prompt": "Where is the Eiffel Tower?", "target": "Rome", "subject": "Eiffel Tower"},
         {"prompt": "Who wrote the novel Dune?", "target": "Tolkien", "subject": "Dune"}]
SMALL = {"cov_conversations": 12, "cov_tokens": 8}  # a small covariance corpus, for speed


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CHATEDIT_CACHE", str(tmp_path_factory.getbasetemp() / "memit-cache"))


def target_nll(model, tok, facts=FACTS) -> float:
    with torch.no_grad():
        logits, labels, _ = forward(model, encode_facts(tok, facts))
        return F.cross_entropy(logits, labels).item()


@pytest.mark.slow
def test_subject_position_is_the_subjects_last_token(smollm2):
    _, tok = smollm2
    row = encode_pair(tok, "Which continent is Angola located in?", "Antarctica",
                      subject="angola")  # found case-insensitively
    assert tok.decode(row["input_ids"][row["subject_last"]]).strip() == "Angola"
    row = encode_pair(tok, "Who made the Nokia 3310?", "Apple", subject="Nokia 3310")
    assert tok.decode(row["input_ids"][:row["subject_last"] + 1]).endswith("Nokia 3310")
    assert encode_pair(tok, "Who made it?", "Apple", subject="Nokia")["subject_last"] == -1


@pytest.mark.slow
def test_default_layers_leave_a_block_above(tiny_llama, smollm2):
    assert locate_edit(smollm2[0]) == ("mlp.down_proj", [4, 5, 6, 7, 8])
    assert locate_edit(tiny_llama[0])[1] == [1, 2]  # 4 blocks: the last one stays above


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_edit_raises_the_target_probability_and_reaches_the_values(tiny, method):
    name, model, tok = tiny
    ed = Editor.from_pretrained(model, tokenizer=tok, method=method, mom2_weight=1.0, **SMALL)
    shifter = ed.method
    batch = padded(model, tok, [fact_row(tok, f, "edit") for f in FACTS])
    pos = batch["subject_last"]
    z = shifter.target_values(batch, pos)
    _, before = shifter.taps(batch, pos)
    nll = target_nll(model, tok)
    ed.edit(FACTS, check=False)
    _, after = shifter.taps(batch, pos)
    assert target_nll(model, tok) < nll - 1e-4, name
    if method == "memit":  # a weak covariance weight: the solve reaches the target values
        assert (z - after).norm() < 0.1 * (z - before).norm()
    ed.rollback()
    assert target_nll(model, tok) == nll


def test_target_values_are_searched_once_per_weights_options_and_row(tiny_llama):
    """MEMIT's z are kept on disk by weights, value options and row: AlphaEdit on the same
    model, or a fact again in a larger batch, reuse them (equal to a fresh search); other
    weights or options search again."""
    import shutil

    from chatedit.files import cache_dir

    def forget():
        shutil.rmtree(cache_dir() / "memit-values", ignore_errors=True)

    model, tok = tiny_llama
    forget()  # (a test before this one may have searched these rows)
    rows = [fact_row(tok, f, "edit") for f in FACTS]
    batch, pos = padded(model, tok, rows), padded(model, tok, rows)["subject_last"]
    one = padded(model, tok, rows[1:])
    searched = []

    def editor(method, **options):
        shifter = Editor.from_pretrained(model, tokenizer=tok, method=method, mom2_weight=1.0,
                                         **SMALL, **options).method
        search = shifter._values
        shifter._values = lambda b, p: searched.append(len(p)) or search(b, p)
        return shifter

    z = editor("memit").target_values(batch, pos)
    assert searched == [2]
    z_one = editor("alphaedit").target_values(one, one["subject_last"])
    assert searched == [2] and torch.equal(z_one[0], z[1])
    assert len(list((cache_dir() / "memit-values").glob("*/*.safetensors"))) == 1
    forget()
    fresh = editor("memit").target_values(one, one["subject_last"])
    # alone, not padded beside another row: the same search, up to float noise
    assert searched == [2, 1] and torch.allclose(fresh[0], z[1], atol=1e-3)
    editor("memit", v_steps=3).target_values(batch, pos)
    assert searched == [2, 1, 2]
    module = next(iter(editor("memit").modules.values()))
    saved = module.weight.detach().clone()
    try:
        with torch.no_grad():
            module.weight.mul_(1.1)
        editor("memit").target_values(batch, pos)
        assert searched == [2, 1, 2, 2]
    finally:
        with torch.no_grad():
            module.weight.copy_(saved)


def test_value_search_runs_the_positions_before_the_subjects_once(tiny, monkeypatch):
    """The positions before every row's subject do not depend on the value delta: their
    keys and values are computed once, the blocks above give the same outputs on the rest,
    and the search finds the values it finds when each step runs every position."""
    from chatedit import lm, memit

    name, model, tok = tiny
    shifter = Editor.from_pretrained(model, tokenizer=tok, method="memit", **SMALL).method
    batch = padded(model, tok, [fact_row(tok, f, "edit") for f in FACTS])
    pos = batch["subject_last"]
    p, first = int(pos.min()), shifter.last + 1
    with torch.no_grad():
        full = {**batch, "hidden": shifter.block_output(batch)}
        torch.testing.assert_close(
            lm.last_hidden(model, full, first, lm.prefix_states(model, full, first, p)),
            lm.last_hidden(model, full, first)[:, p:], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(memit, "PREFIX_MIN", 2)  # (tiny-gpt2's prompts have no system turn)
    run = []  # positions each step runs

    def spy(m, b, first=None, prefix=None):
        if "hidden" in b:
            run.append(b["hidden"].shape[1] - (prefix[0][0].shape[2] if prefix else 0))
        return lm.last_hidden(m, b, first, prefix)

    monkeypatch.setattr(memit, "last_hidden", spy)
    fast = shifter._values(batch, pos)
    assert max(run) == batch["input_ids"].shape[1] - int(pos.min())
    monkeypatch.setattr(memit, "PREFIX_MIN", 10**6)
    slow = shifter._values(batch, pos)
    assert min(run[-3:]) == batch["input_ids"].shape[1]
    # (25 Adam steps scale float noise in coordinates of near-zero gradient up to lr)
    assert (fast - slow).norm() < 1e-2 * slow.norm(), (fast - slow).abs().max()


def test_alphaedit_keeps_the_outputs_on_its_preserved_keys(tiny_llama):
    model, tok = tiny_llama
    ed = Editor.from_pretrained(model, tokenizer=tok, method="alphaedit", l2=1e-4, **SMALL)
    shifter = ed.method
    kept = [encode_pair(tok, p, a) for p, a in [("What is two plus two?", "Four."),
                                                ("Name a colour.", "Blue.")]]
    cov = key_moments(model, tok, kept, ed.modules, every_token=True)
    assert sum(len(r["input_ids"]) for r in kept) < min(c.shape[0] for c in cov.values())
    shifter.projector = {n: null_projector(c, 1e-9) for n, c in cov.items()}  # rank < d_k
    batch = padded(model, tok, kept)
    with torch.no_grad():
        logits_before = forward(model, batch)[0]
    nll = target_nll(model, tok)
    ed.edit(FACTS, check=False)
    with torch.no_grad():
        logits_after = forward(model, batch)[0]
    assert target_nll(model, tok) < nll  # it edits ...
    assert (logits_after - logits_before).abs().max() < 1e-5  # ... and keeps what it preserves
    assert any(b.shifts[n].abs().max() > 1e-4 for b in ed.history for n in ed.modules)
    ed.rollback(all=True)


def test_covariance_is_cached_and_rebuilt_when_the_model_changes(tiny_gpt2, tmp_path,
                                                                 monkeypatch):
    model, tok = tiny_gpt2
    monkeypatch.setenv("CHATEDIT_CACHE", str(tmp_path))
    first = Editor.from_pretrained(model, tokenizer=tok, method="memit", **SMALL).method
    files = sorted((tmp_path / "covariance").iterdir())
    stamp = files[0].stat().st_mtime_ns
    again = Editor.from_pretrained(model, tokenizer=tok, method="memit", **SMALL).method
    assert sorted((tmp_path / "covariance").iterdir()) == files
    assert files[0].stat().st_mtime_ns == stamp
    assert all(torch.equal(first.cov[n], again.cov[n]) for n in first.cov)
    # what computing it cost, measured once and read back with it
    assert first.covariance_seconds > 0 and again.covariance_seconds == first.covariance_seconds
    module = next(iter(first.modules.values()))
    saved = module.weight.detach().clone()
    try:
        with torch.no_grad():
            module.weight.mul_(1.5)  # another model: its keys above this block change
        other = Editor.from_pretrained(model, tokenizer=tok, method="memit", **SMALL).method
        assert len(list((tmp_path / "covariance").iterdir())) == 2
        assert any(not torch.allclose(first.cov[n], other.cov[n]) for n in first.cov)
    finally:
        with torch.no_grad():
            module.weight.copy_(saved)


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "Who wrote Dune?", "target": "Tolkien"}, "has no subject"),
    ({"prompt": "Who wrote Dune?", "target": "Tolkien", "subject": "Emma"}, "does not occur"),
])
def test_bad_facts_are_refused_with_the_weights_bitwise_unchanged(tiny_llama, bad, message):
    model, tok = tiny_llama
    ed = Editor.from_pretrained(model, tokenizer=tok, method="memit", **SMALL)
    before = {n: weight_kv(m).clone() for n, m in ed.modules.items()}
    with pytest.raises(ValueError, match=message):
        ed.edit([FACTS[0], bad])
    with pytest.raises(ValueError, match="prompt"):  # the checks every method shares
        ed.edit([{"prompt": "", "target": "x", "subject": "x"}])
    assert all(torch.equal(before[n], weight_kv(m)) for n, m in ed.modules.items())
    assert not ed.history


def test_sequential_alphaedit_keeps_its_statistics_through_save_and_load(tiny_llama,
                                                                         tmp_path):
    model, tok = tiny_llama
    ed = Editor.from_pretrained(model, tokenizer=tok, method="alphaedit", **SMALL)
    ed.edit(FACTS[:1], check=False)
    ed.edit(FACTS[1:], check=False)
    assert all(set(b.stats) == {f"{n}:ktk" for n in ed.modules} for b in ed.history)
    ed.save_edits(tmp_path / "edits")
    weights = {n: weight_kv(m).clone() for n, m in ed.modules.items()}
    stats = [b.stats for b in ed.history]
    ed.rollback(all=True)
    fresh = Editor.from_pretrained(model, tokenizer=tok, method="alphaedit", **SMALL)
    fresh.load_edits(tmp_path / "edits")
    assert all(torch.equal(weights[n], weight_kv(m)) for n, m in fresh.modules.items())
    assert len(fresh.history) == len(stats)
    for saved, loaded in zip(stats, fresh.history):
        assert all(torch.equal(saved[n], loaded.stats[n]) for n in saved)
    fresh.rollback(all=True)
