"""Meta-training at scale on tiny models: chunking changes nothing, n_edits is checked and
drawn, training edits are augmented without conflicts, answer-token metrics."""
import pytest
import torch
from omegaconf import OmegaConf

from editor.training.augment import new_targets, relation
from editor.chat import IGNORE, encode_facts, encode_pair
from editor.data import load_facts
from editor.editors import HyperEditor, build_hypernet
from editor.lm import capture
from editor.chat import fact_rows
from editor.evaluation.metrics import edit_metrics, strict
from editor.lm import predictions
from editor.models import edit_modules, load_model
from editor.training.config import TrainConfig
from editor.training.meta import MetaTrainer, prepare_data, sizes

LOC = OmegaConf.create({"nq_coef": 1.0, "instruction_coef": 1.0, "harmful_coef": 0.0,
                        "subject_coef": 0.0,
                        "n_instruction": 3, "n_harmful": 0, "pool_size": 6,
                        "response_tokens": 6, "subject_tokens": 4, "max_prompt_chars": 400})
EDITOR = OmegaConf.create({"rule": "malmen", "rank": 8, "n_blocks": 2, "init_step_size": 3.0,
                           "init_log_lam": 0.0, "prior": True, "init_log_mu": 0.0,
                           "reg_rows": 16, "couple": False})


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


def editor_for(tiny, rule="malmen", hyper_chunk=1024, eot_rows=True, seed=0, couple=False):
    model, tok, modules, _ = tiny
    torch.manual_seed(seed)
    cfg = OmegaConf.merge(EDITOR, {"rule": rule, "prior": rule == "malmen", "couple": couple})
    return HyperEditor(model, tok, modules, build_hypernet(modules, cfg),
                       hyper_chunk=hyper_chunk, eot_rows=eot_rows)


def perturbed(hypernet):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in hypernet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("rule", ["malmen", "mend", "coupled"])
@pytest.mark.parametrize("cache", [True, False])
def test_chunked_meta_training_step_equals_unchunked(tiny, rule, cache):
    """Meta-loss forward/backward in chunks of 3 rows and the hypernetwork in chunks of 5 key
    rows give the losses and the hypernetwork gradients of one unchunked step (MALMEN per
    module and coupled, MEND)."""
    facts = tiny[3]
    out = []
    couple = rule == "coupled"
    for lm_chunk, hyper_chunk in ((1000, None), (3, 5)):
        ed = editor_for(tiny, "malmen" if couple else rule, hyper_chunk, couple=couple)
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


def test_loss_facts_scores_a_seeded_subset_and_all_of_them_equals_unset(tiny):
    """`train.loss_facts`: the meta-loss reads the rephrase and NQ rows of a seeded subset of
    the step's facts (the shift still comes from all); a subset as large as the step is the
    plain step, to the last bit."""
    facts = tiny[3]
    out = {}
    for k in (None, 12, 4):
        ed = editor_for(tiny)
        perturbed(ed.hypernet)
        data = prepare_data(ed, facts[:16], facts[16:20], LOC, True, 8)
        trainer = MetaTrainer(ed, data, train_cfg(n_edits=12, loss_facts=k), LOC)
        seen = {}
        backward = trainer.meta_backward

        def spy(parts, backward=backward, seen=seen):
            seen.update({p: len(rows) for p, (rows, _, _) in parts.items()})
            return backward(parts)

        trainer.meta_backward = spy
        record = trainer.step()
        out[k] = (record, seen, {n: p.grad.clone() for n, p in ed.hypernet.named_parameters()
                                 if p.grad is not None})
    assert out[None][1]["rephrase_loss"] == out[None][1]["loc_nq"] == 12
    assert out[4][1]["rephrase_loss"] == out[4][1]["loc_nq"] == 4
    assert out[4][1]["loc_instruction"] == out[None][1]["loc_instruction"]  # pools: as before
    assert out[12][0] == out[None][0]
    assert all(torch.equal(out[12][2][n], g) for n, g in out[None][2].items())
    assert out[4][0]["key_rows"] == out[None][0]["key_rows"]  # the shift: all 12 facts
    assert out[4][0]["rephrase_loss"] != out[None][0]["rephrase_loss"]
    assert any(g.abs().sum() > 0 for g in out[4][2].values())
    subsets = [trainer.loss_subset(s, 12) for s in range(5)]
    assert all(len(set(s)) == 4 and s == sorted(s) for s in subsets)
    assert subsets == [trainer.loss_subset(s, 12) for s in range(5)] and len(
        set(map(tuple, subsets))) > 1


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
        prompts = [tok.decode(data.edit[i][0]["input_ids"]) for i in trainer.fact_indices(step)]
        assert len(set(prompts)) == 6


def test_new_targets_come_from_the_same_relation_and_swap_edits_the_rephrase(tiny):
    model, tok, modules, _ = tiny
    facts = list(load_facts("counterfact", "train"))[:300]
    alts = new_targets(facts, 2, seed=1)
    assert alts == new_targets(facts, 2, seed=1)
    used = 0
    for f, a in zip(facts, alts):
        assert len(a) <= 2 and f["target"] not in a and f["ground_truth"] not in a
        for t in a:
            assert any(g["target"] == t and relation(g) == relation(f) for g in facts)
        used += bool(a)
    assert used > 150
    assert relation({"prompt": "Paris, in", "subject": "Paris"}) is None  # names no relation
    located = [f for f in facts if relation(f) == "{} is located in"][:10]
    assert len(located) == 10
    ed = editor_for(tiny)
    data = prepare_data(ed, located, located[:2], None, True, 8,
                        augment={"new_targets": 2, "swap": 0.5})
    assert all(len(e) == len(r) == 3 for e, r in zip(data.edit, data.rephrase))
    assert all("captured" in r for rs in data.rephrase for r in rs)  # may be the edit prompt
    trainer = MetaTrainer(ed, data, train_cfg(n_edits=10, augment={"swap": 0.5}), LOC)
    kinds = set()
    for step in range(8):
        idx = trainer.fact_indices(step)
        for i, (edit, gen) in zip(idx, trainer.variants(step, idx)):
            t = next(t for t, row in enumerate(data.edit[i] + data.rephrase[i])
                     if row is edit) % len(data.edit[i])
            swapped = edit is data.rephrase[i][t]
            assert gen is (data.edit[i][t] if swapped else data.rephrase[i][t])  # same target
            kinds.add((t > 0, swapped))
    assert kinds == {(False, False), (False, True), (True, False), (True, True)}


def test_end_of_turn_rows_can_be_left_out_of_the_keys(tiny):
    model, tok, modules, facts = tiny
    batch = encode_facts(tok, facts[:4])
    with_eot, _ = capture(model, modules, batch)
    without, _ = capture(model, modules, batch, eot_rows=False)
    labels = (batch["labels"][:, 1:] != IGNORE).sum().item()
    for name in modules:
        assert with_eot[name][0].shape[0] == labels
        assert without[name][0].shape[0] == labels - 4
    ed = editor_for(tiny, eot_rows=False)
    assert ed.capture(batch)[next(iter(modules))][0].shape[0] == labels - 4


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
    metrics = edit_metrics(editor_for(tiny), fact_rows(tok, facts[:5]))
    assert {"ES", "ES_strict", "GS", "GS_strict", "LS"} <= set(metrics)
    assert metrics["ES_strict"] <= metrics["ES"]


def test_locality_by_the_unedited_models_confidence(tiny):
    from editor.evaluation.metrics import agreement_by_confidence

    t = torch.tensor
    before = [(t([1, 2, 3]), t([0, 0, 0]), t([0.1, 0.6, 0.9])), (t([4]), t([0]), t([1.0]))]
    after = [(t([1, 5, 3]), t([0, 0, 0])), (t([7]), t([0]))]
    out = agreement_by_confidence(after, before)
    assert out["tokens_p<0.25"] == 0.25 and out["LS_p<0.25"] == 1.0
    assert out["tokens_p<0.5"] == 0.0 and "LS_p<0.5" not in out
    assert out["LS_p<0.75"] == 0.0 and out["tokens_p<1"] == 0.5 and out["LS_p<1"] == 0.5
    # on a real edit: the unedited argmax is unchanged by asking for its confidence, and
    # the bins cover every locality token
    model, tok, modules, facts = tiny
    ed = editor_for(tiny)
    perturbed(ed.hypernet)
    rows = fact_rows(tok, facts[:6])
    loc = [r for r in rows["loc"] if r is not None]
    before = ed.lm.predictions(loc, confidence=True)
    assert all(torch.equal(b[0], p[0]) for b, p in zip(before, ed.lm.predictions(loc)))
    out = edit_metrics(ed, rows, before=before)
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
    from editor.evaluation.diagnose import lever_sweep

    model, tok, modules, facts = tiny
    ed = editor_for(tiny)
    perturbed(ed.hypernet)
    before = {n: m.weight.detach().clone() for n, m in modules.items()}
    rows = fact_rows(tok, facts[:6])
    seen = []
    out = lever_sweep(ed, rows, [4], {"step_scale": [1.0, 2.0], "eot_rows": [False],
                                      "reg_rows": [None]}, lambda recs: seen.append(len(recs)))
    assert seen == [1, 2, 3, 4]  # called after each record, with every record so far
    # as trained, then each changed lever (step_scale 1.0 is the editor's own: not repeated)
    assert [r["changed"] for r in out] == [None, "step_scale", "eot_rows", "reg_rows"]
    assert out[1]["step_scale"] == 2.0 and out[1]["eot_rows"] and out[1]["reg_rows"] == 16
    assert not out[2]["eot_rows"] and out[2]["step_scale"] == 1.0
    assert out[3]["reg_rows"] is None
    assert (ed.step_scale, ed.eot_rows, ed.hypernet.reg_rows) == (1.0, True, 16)
    assert all("tokens_p<1" in r for r in out)  # LS by the unedited model's confidence too
    for n, m in modules.items():
        assert torch.equal(m.weight, before[n])
    # a doubled step size doubles the shift (S is linear in D)
    batch = encode_facts(tok, facts[:4])
    one = ed.compute_shifts(batch)
    ed.step_scale = 2.0
    two = ed.compute_shifts(batch)
    for n in one:
        torch.testing.assert_close(two[n], 2 * one[n])
    with pytest.raises(ValueError, match="unknown test-time lever"):
        lever_sweep(ed, rows, [4], {"rank": [4]})
    with pytest.raises(ValueError, match="reg_rows must be"):
        ed.hypernet.reg_rows = 0
