"""Lifelong editing with MALMEN's sufficient statistics: batches edited one after another
re-solve jointly with the earlier ones, so T batches give the weights of one joint edit of
all their facts; rollback drops a batch's statistics; save / load carries them."""

import pytest
import torch

from editor import Editor
from editor.editors import HyperEditor
from editor.models import edit_modules, kv_shape, load_model
from hypernet import HyperNetwork

FACTS = [{"prompt": f"What is the code name of project number {i}?", "target": f"Falcon {i}"}
         for i in range(12)]


def malmen_editor(dtype=None, joint=True, couple=False) -> Editor:
    model, tok = load_model("tiny-llama", dtype=dtype)
    modules = edit_modules(model, "mlp.down_proj", [2, 3])
    net = HyperNetwork({n: kv_shape(m) for n, m in modules.items()}, rule="malmen", rank=8,
                       lr=1e-1, prior=True, log_mu=1.0, couple=couple)
    for name in modules:  # a key prior, so the joint solve carries mu C too
        d_k = kv_shape(modules[name])[0]
        net.set_prior(name, torch.eye(d_k) * 0.01)
    return Editor(HyperEditor(model, tok, modules, net, joint=joint), "tiny-llama")


def relative(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in a)


@pytest.mark.parametrize("couple", [False, True])
@pytest.mark.parametrize("dtype, tol", [(None, 1e-4), ("bfloat16", 2e-2)])
def test_batches_edited_in_turn_equal_one_joint_edit(dtype, tol, couple):
    """Per-module solves and the coupled solve (its statistics are the rows themselves)."""
    once = malmen_editor(dtype, couple=couple)
    once.edit(FACTS, check=False)
    turns = malmen_editor(dtype, couple=couple)
    factorized = []  # coupled: batches in turn update the solve of the rows so far
    start = turns.shifter.hypernet.start_coupled
    turns.shifter.hypernet.start_coupled = lambda *a: factorized.append(1) or start(*a)
    for i in range(0, len(FACTS), 4):
        turns.edit(FACTS[i:i + 4], check=False)
    assert len(turns.history) == 3 and len(factorized) == couple
    assert relative(turns.total_shift(), once.total_shift()) < tol
    stacked = malmen_editor(dtype, joint=False, couple=couple)  # stacked, for comparison
    for i in range(0, len(FACTS), 4):
        stacked.edit(FACTS[i:i + 4], check=False)
    assert relative(stacked.total_shift(), once.total_shift()) > 10 * tol


@pytest.mark.parametrize("couple", [False, True])
def test_rollback_drops_a_batch_and_save_load_continues_the_joint_solve(tmp_path, couple):
    ed = malmen_editor(couple=couple)
    ed.edit(FACTS[:4], check=False)
    after_one = {n: m.weight.detach().clone() for n, m in ed.modules.items()}
    ed.edit(FACTS[4:8], check=False)
    ed.rollback()
    assert all(torch.equal(after_one[n], m.weight) for n, m in ed.modules.items())
    ed.save_edits(tmp_path / "edits")
    later = malmen_editor(couple=couple)  # another session: load, add a batch, save again
    later.load_edits(tmp_path / "edits")
    assert all(torch.equal(after_one[n], m.weight) for n, m in later.modules.items())
    later.edit(FACTS[4:], check=False)
    later.save_edits(tmp_path / "edits2")
    once = malmen_editor(couple=couple)
    once.edit(FACTS, check=False)
    assert relative(later.total_shift(), once.total_shift()) < 1e-4
    again = malmen_editor(couple=couple)
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
    once = malmen_editor(dtype, couple=True)
    once.edit(facts, check=False)
    turns = malmen_editor(dtype, couple=True)
    for i in range(0, 120, 40):
        turns.edit(facts[i:i + 40], check=False)
    (run,) = [run for _, run in turns.shifter._held.values()]
    assert run.rows > 512 and run.inverse is not None
    turns.save_edits(tmp_path / "edits")
    later = malmen_editor(dtype, couple=True)
    later.load_edits(tmp_path / "edits")
    for ed in (turns, later):  # two batches more: P is updated by Woodbury, then used
        ed.edit(facts[120:135], check=False)
        ed.edit(facts[135:], check=False)
        assert relative(ed.total_shift(), once.total_shift()) < tol


def test_a_batch_without_statistics_is_stacked_with_a_warning():
    ed = malmen_editor(joint=False)
    ed.edit(FACTS[:4], check=False)
    assert ed.history[0].stats == {}
    ed.shifter.joint = True
    with pytest.warns(UserWarning, match="has no statistics"):
        ed.edit(FACTS[4:8], check=False)
    assert len(ed.history) == 2 and all(torch.isfinite(s).all()
                                        for s in ed.total_shift().values())


def test_batches_of_the_other_solve_are_stacked_with_a_warning():
    """Statistics of per-module solves cannot join a coupled solve (nor the reverse)."""
    ed = malmen_editor()
    ed.edit(FACTS[:4], check=False)
    ed.shifter.hypernet.couple = True
    with pytest.warns(UserWarning, match="or with couple set otherwise"):
        ed.edit(FACTS[4:8], check=False)
    assert "model.layers.2.mlp.down_proj:keys" in ed.history[1].stats
