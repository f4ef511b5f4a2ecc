"""bf16 weights with an fp32 master copy of the edited modules (large-checkpoint setting)."""

import pytest
import torch

from chatedit import Editor
from chatedit.editors import FineTune, HyperMethod
from chatedit.models import edit_modules, kv_shape, load_model, weight_kv
from hypernet import HyperNetwork

FACTS = [{"prompt": "Who wrote Hamlet?", "target": "Christopher Marlowe"},
         {"prompt": "Which planet is largest?", "target": "Saturn"}]


@pytest.mark.parametrize("rule", ["malmen", "mend", "ft"])
def test_bf16_edits_and_restore_are_exact_against_the_fp32_master(rule):
    model, tok = load_model("tiny-llama", dtype="bfloat16")
    modules = edit_modules(model, "mlp.down_proj", [2, 3])
    original = {n: weight_kv(m).clone() for n, m in modules.items()}
    if rule == "ft":
        editor = FineTune(model, tok, modules, steps=2, lr=1e-2)
    else:
        net = HyperNetwork({n: kv_shape(m) for n, m in modules.items()}, rule=rule, rank=8,
                           lr=1e-1)
        editor = HyperMethod(model, tok, modules, net)
    for n, m in modules.items():
        assert m.weight.dtype == torch.bfloat16 and editor.master[n].dtype == torch.float32
        assert torch.equal(editor.master[n], original[n].float())  # bf16 -> fp32 is exact
    shifts = editor.edit(FACTS)
    for n, m in modules.items():
        # the weight is the fp32 sum rounded once to bf16, not an accumulation in bf16
        assert torch.equal(weight_kv(m), (editor.master[n] + shifts[n]).to(torch.bfloat16))
        assert not torch.equal(weight_kv(m), original[n])
    editor.restore()
    assert all(torch.equal(weight_kv(m), original[n]) for n, m in modules.items())


def test_bf16_api_rollback_is_bitwise():
    ed = Editor.from_pretrained("tiny-llama", dtype="bfloat16", steps=2, lr=1e-2)
    before = {n: m.weight.clone() for n, m in ed.modules.items()}
    ed.edit(FACTS[:1])
    mid = {n: m.weight.clone() for n, m in ed.modules.items()}
    ed.edit(FACTS[1:])
    ed.rollback()
    assert all(torch.equal(m.weight, mid[n]) for n, m in ed.modules.items())
    ed.rollback(all=True)
    assert all(torch.equal(m.weight, before[n]) for n, m in ed.modules.items())
    assert next(ed.model.parameters()).dtype == torch.bfloat16
