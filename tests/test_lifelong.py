"""Lifelong editing with MALMEN's sufficient statistics: batches edited one after another
re-solve jointly with the earlier ones, so T batches give the weights of one joint edit of
all their facts; rollback drops a batch's statistics; save / load carries them."""

import pytest
import torch

import hypernet.solve
from chatedit import Editor
from chatedit.chat import encode_facts
from chatedit.editors import HyperMethod
from chatedit.models import edit_modules, kv_shape, load_model
from hypernet import HyperNetwork

FACTS = [{"prompt": f"What is the code name of project number {i}?", "target": f"Falcon {i}"}
         for i in range(12)]


def malmen_editor(dtype=None, joint=True) -> Editor:
    model, tok = load_model("tiny-llama", dtype=dtype)
    modules = edit_modules(model, "mlp.down_proj", [2, 3])  # one shape: one solve of both
    net = HyperNetwork({n: kv_shape(m) for n, m in modules.items()}, rule="malmen", rank=8,
                       lr=1e-1, prior=True, log_mu=1.0)
    for name in modules:  # a key prior, so the joint solve carries mu C too
        d_k = kv_shape(modules[name])[0]
        net.set_prior(name, torch.eye(d_k) * 0.01)
    return Editor(HyperMethod(model, tok, modules, net, joint=joint), "tiny-llama")


def relative(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in a)


@pytest.mark.parametrize("dtype, tol", [(None, 1e-4), ("bfloat16", 2e-2)])
def test_batches_edited_in_turn_equal_one_joint_edit(dtype, tol, monkeypatch):
    """The statistics are the rows themselves; batches in turn update the solve of the rows
    so far (started once, not solved again per batch)."""
    once = malmen_editor(dtype)
    once.edit(FACTS, check=False)
    turns = malmen_editor(dtype)
    started, start = [], hypernet.solve.start
    monkeypatch.setattr(hypernet.solve, "start", lambda *a, **k: started.append(1) or
                        start(*a, **k))
    for i in range(0, len(FACTS), 4):
        turns.edit(FACTS[i:i + 4], check=False)
    assert len(turns.history) == 3 and len(started) == 1
    assert relative(turns.total_shift(), once.total_shift()) < tol
    stacked = malmen_editor(dtype, joint=False)  # stacked, for comparison
    for i in range(0, len(FACTS), 4):
        stacked.edit(FACTS[i:i + 4], check=False)
    assert relative(stacked.total_shift(), once.total_shift()) > 10 * tol


def test_rollback_drops_a_batch_and_save_load_continues_the_joint_solve(tmp_path):
    ed = malmen_editor()
    ed.edit(FACTS[:4], check=False)
    after_one = {n: m.weight.detach().clone() for n, m in ed.modules.items()}
    ed.edit(FACTS[4:8], check=False)
    ed.rollback()
    assert all(torch.equal(after_one[n], m.weight) for n, m in ed.modules.items())
    ed.save_edits(tmp_path / "edits")
    later = malmen_editor()  # another session: load, add a batch, save again
    later.load_edits(tmp_path / "edits")
    assert all(torch.equal(after_one[n], m.weight) for n, m in later.modules.items())
    later.edit(FACTS[4:], check=False)
    later.save_edits(tmp_path / "edits2")
    once = malmen_editor()
    once.edit(FACTS, check=False)
    assert relative(later.total_shift(), once.total_shift()) < 1e-4
    again = malmen_editor()
    again.load_edits(tmp_path / "edits2")
    assert [len(b.facts) for b in again.history] == [4, 8]
    assert all(set(b.stats) == set(later.history[0].stats) for b in again.history)


@pytest.mark.parametrize("dtype, tol", [(None, 1e-4), ("bfloat16", 2e-2)])
def test_a_coupled_sequence_past_the_keys_width_equals_one_joint_edit(tmp_path, dtype, tol):
    """Past p = 2 x 256 key rows (the two down_projs' keys side by side) the running solve
    keeps (K^T K + R)^-1 instead of the row-space factor; batches in turn, and a batch added
    after `load_edits` (which solves the loaded rows again, in key space), still give one
    joint edit of all the facts."""
    facts = [{"prompt": f"Which city hosts the archive of record {i}?", "target": f"Port {i}"}
             for i in range(150)]
    once = malmen_editor(dtype)
    once.edit(facts, check=False)
    turns = malmen_editor(dtype)
    for i in range(0, 120, 40):
        turns.edit(facts[i:i + 40], check=False)
    ((run,),) = turns._solved[1].values()  # one solve group, one solve
    assert run.rows > 512 and run.inverse is not None
    turns.save_edits(tmp_path / "edits")
    later = malmen_editor(dtype)
    later.load_edits(tmp_path / "edits")
    for ed in (turns, later):  # two batches more: P is updated by Woodbury, then used
        ed.edit(facts[120:135], check=False)
        ed.edit(facts[135:], check=False)
        assert relative(ed.total_shift(), once.total_shift()) < tol


def test_a_batch_without_statistics_is_stacked_with_a_warning():
    ed = malmen_editor(joint=False)
    ed.edit(FACTS[:4], check=False)
    assert ed.history[0].stats == {}
    ed.method.joint = True
    with pytest.warns(UserWarning, match="has no statistics"):
        ed.edit(FACTS[4:8], check=False)
    assert len(ed.history) == 2 and all(torch.isfinite(s).all()
                                        for s in ed.total_shift().values())


def test_batches_of_the_old_per_module_solve_are_stacked_with_a_warning():
    """Statistics of the per-module solves of older edits files (K^T K, K^T D, rows) cannot
    join the solve: the next batch is stacked on them, with a warning."""
    ed = malmen_editor()
    ed.edit(FACTS[:4], check=False)
    ed.history[0].stats = {f"{n}:{part}": torch.zeros(1) for n in ed.modules
                           for part in ("ktk", "ktd", "rows")}
    with pytest.warns(UserWarning, match="has no statistics"):
        ed.edit(FACTS[4:8], check=False)
    assert "model.layers.2.mlp.down_proj:keys" in ed.history[1].stats


def test_the_api_and_the_evaluation_edit_2000_facts_to_the_same_weights():
    """One path: the API's edit and the evaluation's (`edit_metrics`, which sorts the rows by
    length) of the same 2,000 facts, far more key rows than p = 512, give the same weights
    (both through the key-space solve)."""
    from chatedit.chat import sliced
    from chatedit.evaluation.metrics import edit_metrics
    from chatedit.evaluation.panel import panel_rows

    facts = [{"prompt": f"Which river flows past the mill of town {i}?",
              "target": f"River {i % 97} of {i}", "rephrases": [], "loc_prompts": [],
              "loc_answers": []}
             for i in range(2000)]
    api = malmen_editor()
    api.edit(facts, check=False)
    ((run,),) = api._solved[1].values()  # one solve group, one solve
    assert run.rows > 10 * 512 and run.inverse is not None
    applied = {n: m.weight.detach().clone() for n, m in api.modules.items()}
    evaluation = malmen_editor()
    seen = {}
    rows = panel_rows(evaluation.model, evaluation.tokenizer, facts)
    edit_metrics(evaluation.method, sliced(rows, len(facts)),
                 extra=lambda: seen.update({n: m.weight.detach().clone()
                                            for n, m in evaluation.modules.items()}) or {})
    for name, w in applied.items():
        base = evaluation.method.master[name].T
        assert ((seen[name] - w).norm() / (w - base).norm()).item() < 1e-4, name


def test_output_side_preservation_solves_the_penalised_problem_and_stays_joint():
    """With `out_mu` and one bin per output direction, the shift zeroes the gradient of
        ||K S - D||^2 + tr(S^T R S) + mu_o tr(S^T C S G~),   G~ = G / mean eig(G),
    (K = [K_1 K_2], R and C block-diagonal over the two modules of the solve), and batches
    edited in turn still equal one edit of all."""
    g = torch.randn(64, 80, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = g @ g.T / 80

    def preserving(out_bins=64):
        ed = malmen_editor()
        ed.method.out_mu, ed.method.out_bins = 30.0, out_bins
        ed.method.output_moments = {n: g for n in ed.modules}
        return ed

    ed = preserving()
    out = ed.method.compute_shifts(encode_facts(ed.tokenizer, FACTS))
    names = list(ed.modules)
    k = torch.cat([out.stats[f"{n}:keys"] for n in names], 1).double()
    d = out.stats[f"{names[0]}:values"].double()
    weights = ed.method.hypernet.weights(names)
    r = torch.block_diag(*(lam * torch.eye(256, dtype=torch.float64) + mu * c.double()
                           for lam, c, mu in zip(*weights.values())))
    c = torch.block_diag(*(prior.double() for prior in weights["priors"]))
    s = torch.cat([out.shifts[n].double() for n in names]) / ed.method.step_scale
    g_tilde = g / torch.linalg.eigvalsh(g).mean()
    grad = k.T @ (k @ s - d) + r @ s + 30.0 * c @ s @ g_tilde
    assert (grad.norm() / (k.T @ d).norm()).item() < 1e-6
    plain = malmen_editor().method.compute_shifts(encode_facts(ed.tokenizer, FACTS)).shifts
    assert all((plain[n] - out.shifts[n]).norm() > 1e-3 * plain[n].norm() for n in names)
    once, turns = preserving(4), preserving(4)  # fewer bins: the joint solve keeps them
    once.edit(FACTS, check=False)
    for i in range(0, len(FACTS), 4):
        turns.edit(FACTS[i:i + 4], check=False)
    assert relative(turns.total_shift(), once.total_shift()) < 1e-4
