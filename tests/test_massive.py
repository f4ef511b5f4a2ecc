"""Meta-training at scale on tiny models: chunking changes nothing, n_edits is checked and
drawn, answer-token metrics, memory checked before a large buffer is built."""
import pytest
import torch
from omegaconf import OmegaConf

from chatedit.chat import IGNORE, encode_facts, encode_pair
from chatedit.data import load_facts
from chatedit.editors import HyperMethod, MalmenConfig, build_hypernet, hypernet_bytes
from chatedit.lm import capture
from chatedit.chat import sliced
from chatedit.evaluation.panel import panel_rows
from chatedit.evaluation.metrics import edit_metrics, strict
from chatedit.lm import predictions
from chatedit.models import edit_modules, load_model
from chatedit.training.config import TrainConfig
from chatedit.training.meta import MetaTrainer, prepare_data, sizes

LOC = OmegaConf.create({"nq_coef": 1.0, "instruction_coef": 1.0, "harmful_coef": 0.0,
                        "subject_coef": 0.0,
                        "n_instruction": 3, "n_harmful": 0, "pool_size": 6,
                        "response_tokens": 6, "subject_tokens": 4, "max_prompt_chars": 400})
EDITOR = OmegaConf.create({"rule": "malmen", "rank": 8, "n_blocks": 2, "init_step_size": 3.0,
                           "init_log_lam": 0.0, "prior": True, "init_log_mu": 0.0})


def train_cfg(**kw):
    base = OmegaConf.structured(TrainConfig)
    return OmegaConf.merge(base, OmegaConf.create(kw))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import os

    os.environ["CHATEDIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    model, tok = load_model("tiny-llama")
    modules = edit_modules(model, "mlp.down_proj", [2, 3])
    facts = list(load_facts("zsre", "train"))[:24]
    return model, tok, modules, facts


def editor_for(tiny, rule="malmen", hyper_chunk=1024, seed=0, layers=(2, 3)):
    model, tok, modules, _ = tiny
    modules = {n: m for n, m in modules.items() if int(n.split(".")[2]) in layers}
    torch.manual_seed(seed)
    cfg = OmegaConf.merge(EDITOR, {"rule": rule, "prior": rule == "malmen"})
    return HyperMethod(model, tok, modules, build_hypernet(modules, cfg), hyper_chunk=hyper_chunk)


def perturbed(hypernet):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in hypernet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("rule", ["malmen", "malmen-one-module", "mend"])
@pytest.mark.parametrize("cache", [True, False])
def test_chunked_meta_training_step_equals_unchunked(tiny, rule, cache):
    """Meta-loss forward/backward in chunks of 3 rows and the hypernetwork in chunks of 5 key
    rows give the losses and the hypernetwork gradients of one unchunked step (MALMEN with
    two modules in one solve and with one, MEND)."""
    facts = tiny[3]
    out = []
    layers = (2,) if rule == "malmen-one-module" else (2, 3)
    for lm_chunk, hyper_chunk in ((1000, None), (3, 5)):
        ed = editor_for(tiny, rule.split("-")[0], hyper_chunk, layers=layers)
        perturbed(ed.hypernet)
        data = prepare_data(ed, facts[:16], facts[16:20], LOC, cache, 8)
        trainer = MetaTrainer(ed, data, train_cfg(n_edits=12, lm_chunk=lm_chunk,
                                                  max_grad_norm=1e9), LOC)
        record = trainer.step()
        out.append((record, {n: p.grad.clone() for n, p in ed.hypernet.named_parameters()
                             if p.grad is not None}))
    (one, g_one), (chunked, g_chunked) = out
    for key in ("rephrase_loss", "loc_nq", "loc_instruction", "total"):
        assert chunked[key] == pytest.approx(one[key], rel=1e-3, abs=1e-9), key
    assert g_one.keys() == g_chunked.keys() and len(g_one) > 4
    for name in g_one:
        assert torch.allclose(g_chunked[name], g_one[name], rtol=1e-3, atol=1e-6), name
    assert any(g.abs().sum() > 0 for g in g_one.values())


def test_n_edits_beyond_the_pool_is_an_error_and_lists_are_drawn(tiny):
    facts = tiny[3]
    ed = editor_for(tiny)
    data = prepare_data(ed, facts[:16], facts[16:20], None, True, 8)
    with pytest.raises(ValueError, match=r"n_edits=17 is more facts than the training pool "
                                         r"holds \(16"):
        MetaTrainer(ed, data, train_cfg(n_edits=[4, 17]), LOC)
    with pytest.raises(ValueError, match="positive number or a list"):
        sizes([4, 0])
    trainer = MetaTrainer(ed, data, train_cfg(n_edits=[2, 5, 16]), LOC)
    drawn = [trainer.n_edits(s) for s in range(30)]
    assert set(drawn) == {2, 5, 16} and drawn == [trainer.n_edits(s) for s in range(30)]
    for step in range(30):
        idx = trainer.fact_indices(step)
        assert len(idx) == drawn[step] and len(set(idx)) == len(idx)


def test_facts_sharing_a_prompt_never_meet_in_one_step(tiny):
    _, tok, _, facts = tiny
    twins = [{**f, "target": f["target"] + " Jr"} for f in facts[:6]]  # same prompts
    ed = editor_for(tiny)
    data = prepare_data(ed, facts[:6] + twins, facts[16:18], None, False, 8)
    with pytest.raises(ValueError, match=r"\(6 facts with distinct prompts\)"):
        MetaTrainer(ed, data, train_cfg(n_edits=7), LOC)
    trainer = MetaTrainer(ed, data, train_cfg(n_edits=6), LOC)
    for step in range(10):
        prompts = [tok.decode(data.edit[i]["input_ids"]) for i in trainer.fact_indices(step)]
        assert len(set(prompts)) == 6


def test_end_of_turn_rows_are_in_the_keys(tiny):
    """Every position that predicts a label, the end-of-turn token included, is a key row."""
    model, tok, modules, facts = tiny
    batch = encode_facts(tok, facts[:4])
    with_eot, _ = capture(model, modules, batch)
    labels = (batch["labels"][:, 1:] != IGNORE).sum().item()
    for name in modules:
        assert with_eot[name][0].shape[0] == labels
    ed = editor_for(tiny)
    assert ed.capture(batch)[next(iter(modules))][0].shape[0] == labels


def test_edit_metrics_count_answer_tokens_only(tiny):
    model, tok, modules, facts = tiny
    rows = [encode_pair(tok, f["prompt"], f["target"]) for f in facts[:5]]
    preds = predictions(model, tok, rows)
    for row, (_, labels) in zip(rows, preds):
        n_labels = sum(y != IGNORE for y in row["labels"])
        assert row["eot"] and len(labels) == n_labels - 1  # the end-of-turn token is not counted
        assert tok.decode(labels).strip() == row_target(tok, row)
    assert strict([(torch.tensor([1, 2]), torch.tensor([1, 2])),
                   (torch.tensor([1, 3]), torch.tensor([1, 2]))]) == 0.5
    metrics = edit_metrics(editor_for(tiny), sliced(panel_rows(model, tok, facts[:5]), 5))
    assert {"ES", "ES_strict", "GS", "GS_strict", "LS_subject"} <= set(metrics)
    assert metrics["ES_strict"] <= metrics["ES"]


def test_locality_by_the_unedited_models_confidence(tiny):
    from chatedit.evaluation.metrics import agreement_by_confidence

    t = torch.tensor
    before = [(t([1, 2, 3]), t([0, 0, 0]), t([0.1, 0.6, 0.9])), (t([4]), t([0]), t([1.0]))]
    after = [(t([1, 5, 3]), t([0, 0, 0])), (t([7]), t([0]))]
    out = agreement_by_confidence(after, before)
    assert out["tokens_p<0.25"] == 0.25 and out["LS_subject_p<0.25"] == 1.0
    assert out["tokens_p<0.5"] == 0.0 and "LS_subject_p<0.5" not in out
    assert out["LS_subject_p<0.75"] == 0.0 and out["tokens_p<1"] == 0.5
    assert out["LS_subject_p<1"] == 0.5
    # on a real edit: the unedited argmax is unchanged by asking for its confidence, and
    # the bins cover every locality token
    model, tok, modules, facts = tiny
    ed = editor_for(tiny)
    perturbed(ed.hypernet)
    rows = sliced(panel_rows(model, tok, facts[:6]), 6)
    before = ed.lm.predictions(rows["subject"], confidence=True)
    assert all(torch.equal(b[0], p[0])
               for b, p in zip(before, ed.lm.predictions(rows["subject"])))
    out = edit_metrics(ed, rows, before={"subject": before})
    shares = [out[k] for k in out if k.startswith("tokens_p<")]
    assert len(shares) == 4 and abs(sum(shares) - 1) < 1e-6


def row_target(tok, row):
    return tok.decode([t for t, y in zip(row["input_ids"], row["labels"]) if y != IGNORE][:-1]
                      ).strip()


def test_mixed_data_pools_both_training_files():
    sizes_ = {"zsre": 384, "counterfact": 640}
    val = load_facts("mixed", "validation", val_size=sizes_)
    train = load_facts("mixed", "train", val_size=sizes_)
    test = load_facts("mixed", "test")
    assert len(val) == 1024 and len(test) == 1500
    assert sum(i.startswith("zsre") for i in val["id"]) == 384
    assert not set(val["prompt"]) & set(train["prompt"])
    n_zsre = sum(i.startswith("zsre") for i in train["id"])
    assert n_zsre == len(load_facts("zsre", "train", val_size=384)) and len(train) - n_zsre > 1000
    assert sum(i.startswith("zsre") for i in val["id"][:128]) not in (0, 128)  # shuffled


def test_lever_sweep_changes_one_lever_at_a_time_and_restores_the_editor(tiny):
    from chatedit.evaluation.diagnose import lever_sweep

    model, tok, modules, facts = tiny
    ed = editor_for(tiny)
    perturbed(ed.hypernet)
    before = {n: m.weight.detach().clone() for n, m in modules.items()}
    rows = panel_rows(model, tok, facts[:6])
    seen = []
    out = lever_sweep(ed, rows, [4], {"step_scale": [1.0, 2.0, 3.0]},
                      lambda recs: seen.append(len(recs)))
    assert seen == [1, 2, 3]  # called after each record, with every record so far
    # as trained, then each changed value (step_scale 1.0 is the editor's own: not repeated)
    assert [(r["changed"], r["step_scale"]) for r in out] == [
        (None, 1.0), ("step_scale", 2.0), ("step_scale", 3.0)]
    assert ed.step_scale == 1.0
    assert all("tokens_p<1" in r for r in out)  # LS_subject by the unedited model's confidence
    for n, m in modules.items():
        assert torch.equal(m.weight, before[n])
    # a doubled step size doubles the shift (S is linear in D)
    batch = encode_facts(tok, facts[:4])
    one = ed.compute_shifts(batch).shifts
    ed.step_scale = 2.0
    two = ed.compute_shifts(batch).shifts
    for n in one:
        torch.testing.assert_close(two[n], 2 * one[n])
    with pytest.raises(ValueError, match="unknown test-time lever 'eot_rows'"):
        lever_sweep(ed, rows, [4], {"eot_rows": [False]})


def test_a_hypernetwork_too_large_is_refused_before_it_is_built(tiny):
    """The hypernetwork's bytes (parameters, normalisers, key priors) are counted from the
    shapes before anything is allocated: Llama-3-8B's six down_proj (d_k 14,336) need 4.6
    GiB of key priors alone, and a budget below the need is refused naming the option."""
    model, tok, modules, _ = tiny
    config = MalmenConfig()
    llama = {f"model.layers.{i}.mlp.down_proj": (14_336, 4_096) for i in range(26, 32)}
    without = hypernet_bytes(llama, MalmenConfig(prior=False))
    assert hypernet_bytes(llama, config) - without == 6 * 14_336 ** 2 * 4
    net = build_hypernet(modules, config)
    counted = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
    assert hypernet_bytes({n: net.shapes[n] for n in modules}, config) == counted
    with pytest.raises(MemoryError, match=r"needs 0\.0 GiB .* editor\.prior=false"):
        build_hypernet(modules, config, budget=counted - 1)
