"""The editing pipeline on tiny models: cache, capture, shifts, apply and restore."""
import pytest
import torch
import torch.nn.functional as F

from chatedit.chat import encode_facts, encode_pair, pad
from chatedit.editors import FineTune, HyperMethod
from chatedit.lm import (capture, first_block, forward, logits_before, stack_captured, with_capture,
                       with_final, with_hidden)
from chatedit.chat import sliced
from chatedit.evaluation.panel import panel_rows
from chatedit.evaluation.metrics import edit_metrics
from chatedit.lm import predictions
from chatedit.models import edit_modules, kv_shape, load_model, to_kv, weight_kv
from hypernet import HyperNetwork

FACTS = [{"prompt": "Who wrote Hamlet?", "target": "Christopher Marlowe"},
         {"prompt": "What is the capital of France?", "target": "Lyon"},
         {"prompt": "Which planet is largest?", "target": "Saturn"}]
MODULE = {"tiny-llama": "mlp.down_proj", "tiny-qwen2": "mlp.down_proj",
          "tiny-mistral": "mlp.down_proj", "tiny-gpt2": "mlp.c_proj"}


@pytest.fixture
def setup(request):
    name = request.param
    model, tok = load_model(name)
    modules = edit_modules(model, MODULE[name], [1, 2, 3])
    return name, model, tok, modules


def cached_batch(model, tok, modules, facts=FACTS):
    rows = [encode_pair(tok, f["prompt"], f["target"]) for f in facts]
    return pad(tok, with_hidden(model, tok, rows, first_block(model, modules)))


BOTH = pytest.mark.parametrize("setup", list(MODULE), indirect=True)  # every family


@BOTH
def test_suffix_from_cached_hidden_states_equals_full_forward(setup):
    _, model, tok, modules = setup
    full = forward(model, encode_facts(tok, FACTS))
    cached = forward(model, cached_batch(model, tok, modules), first_block(model, modules))
    assert torch.allclose(full[0], cached[0], atol=1e-5)
    assert torch.equal(full[1], cached[1]) and torch.equal(full[2], cached[2])


@BOTH
def test_hidden_cache_runs_a_shared_prefix_once_and_equals_the_plain_forward(setup, monkeypatch):
    """Rows that start alike (a system turn) share one prefix pass and its key-value cache:
    the same hidden states as every row's own full pass, on fewer token positions."""
    from chatedit import lm
    from chatedit.models import blocks

    _, model, tok, modules = setup
    first = first_block(model, modules)
    system = "You are a careful assistant who answers every question in very few words. "
    rows = [encode_pair(tok, system + f["prompt"], f["target"]) for f in FACTS]
    batch = lm.padded(model, tok, rows)
    assert lm.shared_prefix(batch) >= lm.PREFIX_MIN
    seen = []
    hook = blocks(model)[1][0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(
            (kwargs.get("hidden_states", args[0] if args else None)).shape[:2].numel()),
        with_kwargs=True)
    shared = lm.cache_hidden(model, batch, first)
    monkeypatch.setattr(lm, "PREFIX_MIN", 10 ** 6)  # no prefix pass
    n_shared = sum(seen)
    plain = lm.cache_hidden(model, batch, first)
    hook.remove()
    assert sum(seen) - n_shared > n_shared  # the plain pass covers more positions
    for a, b, row in zip(shared, plain, rows, strict=True):
        assert a.shape == b.shape == (len(row["input_ids"]), model.config.hidden_size)
        assert torch.allclose(a, b, atol=1e-5)


@BOTH
def test_cached_final_states_give_the_unedited_logits(setup):
    """`logits_before` from cached final states (rows batched in another order and padding)
    equals the forward's logits, and stays the unedited model's after an edit."""
    _, model, tok, modules = setup
    first = first_block(model, modules)
    rows = with_hidden(model, tok, [encode_pair(tok, f["prompt"], f["target"]) for f in FACTS],
                       first)
    final = pad(tok, with_final(model, tok, rows[::-1], first, batch_size=2)[::-1])
    plain = pad(tok, rows)
    unedited = forward(model, plain, first)[0]
    assert torch.allclose(logits_before(model, final, first), unedited, atol=1e-5)
    with torch.no_grad():  # not a constant: LayerNorm would remove a constant shift
        top = list(modules.values())[-1].weight
        top.add_(torch.randn(top.shape, generator=torch.Generator().manual_seed(0)))
    assert not torch.allclose(forward(model, plain, first)[0], unedited, atol=1e-3)
    assert torch.allclose(logits_before(model, final, first), unedited, atol=1e-5)
    assert torch.equal(logits_before(model, plain, first), forward(model, plain, first)[0])



@BOTH
def test_capture_cache_equals_a_live_capture(setup):
    """Keys, value gradients and loss captured once per row (rows batched in another order
    and padding) equal a capture of the whole batch."""
    _, model, tok, modules = setup
    first = first_block(model, modules)
    rows = with_hidden(model, tok, [encode_pair(tok, f["prompt"], f["target"]) for f in FACTS],
                       first)
    live, loss = capture(model, modules, pad(tok, rows), first)
    cached = with_capture(model, tok, rows[::-1], modules, first, batch_size=2)[::-1]
    stacked, cached_loss = stack_captured(cached, "cpu")
    assert torch.allclose(cached_loss, loss, atol=1e-4)
    for name, (k, d) in live.items():
        assert stacked[name][0].shape == k.shape and d.abs().sum() > 0
        assert torch.allclose(stacked[name][0], k, atol=1e-5)
        assert torch.allclose(stacked[name][1], d, atol=1e-5)

@BOTH
def test_capture_gives_the_weight_gradient_of_the_top_module(setup):
    """In the top block nothing attends to an MLP output, so K^T Delta over the label
    positions is exactly dL/dW of the summed fine-tuning loss."""
    _, model, tok, modules = setup
    for p in model.parameters():
        p.requires_grad_(False)
    captured, loss = capture(model, modules, encode_facts(tok, FACTS))
    top = list(modules)[-1]
    keys, grads = captured[top]
    n_labels = (encode_facts(tok, FACTS)["labels"] != -100).sum()
    assert keys.shape[0] == grads.shape[0] == n_labels
    assert (keys.shape[1], grads.shape[1]) == kv_shape(modules[top])
    modules[top].weight.requires_grad_(True)
    logits, labels, _ = forward(model, encode_facts(tok, FACTS))
    F.cross_entropy(logits, labels, reduction="sum").backward()
    expected = to_kv(modules[top], modules[top].weight.grad)
    modules[top].weight.requires_grad_(False)
    assert torch.allclose(keys.T @ grads, expected, atol=1e-5)
    assert all(p.grad is None for n, p in model.named_parameters() if p is not
               modules[top].weight)
    # the same capture from cached hidden states
    cached, loss2 = capture(model, modules, cached_batch(model, tok, modules),
                            first_block(model, modules))
    assert torch.allclose(loss, loss2, atol=1e-4)
    for name in modules:
        assert torch.allclose(cached[name][1], captured[name][1], atol=1e-5)


def hyper_editor(model, tok, modules, rule, lr=1e-2):
    net = HyperNetwork({n: kv_shape(m) for n, m in modules.items()}, rule=rule, rank=8, lr=lr)
    return HyperMethod(model, tok, modules, net)


@BOTH
@pytest.mark.parametrize("rule", ["malmen", "mend", "ft"])
def test_edit_then_restore_is_bitwise_exact(setup, rule):
    _, model, tok, modules = setup
    before = {n: weight_kv(m).detach().clone() for n, m in modules.items()}
    editor = (FineTune(model, tok, modules, steps=3, lr=1e-3) if rule == "ft"
              else hyper_editor(model, tok, modules, rule))
    shifts = editor.edit(FACTS)
    assert all(s.abs().sum() > 0 for s in shifts.values())
    assert all(not torch.equal(weight_kv(m), before[n]) for n, m in modules.items())
    editor.restore()
    assert all(torch.equal(weight_kv(m), before[n]) for n, m in modules.items())


@BOTH
def test_a_bad_shift_leaves_the_weights_untouched(setup):
    _, model, tok, modules = setup
    editor = hyper_editor(model, tok, modules, "malmen")
    before = {n: weight_kv(m).detach().clone() for n, m in modules.items()}
    shifts = {n: torch.zeros(kv_shape(m)) for n, m in modules.items()}
    shifts[list(modules)[-1]][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        editor.apply(shifts)
    bad_shape = {list(modules)[0]: torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="expected"):
        editor.apply(bad_shape)
    assert all(torch.equal(weight_kv(m), before[n]) for n, m in modules.items())


@pytest.mark.parametrize("setup", ["tiny-llama"], indirect=True)
def test_larger_step_edits_more_and_ft_lowers_the_edit_loss(setup):
    _, model, tok, modules = setup
    rows = sliced(panel_rows(model, tok, [
        {**f, "rephrases": [f["prompt"] + " Answer briefly."], "subject": "",
         "loc_prompts": ["Tell me a joke."], "loc_answers": ["No."], "loc_kind": "subject"}
        for f in FACTS]), len(FACTS))
    small = edit_metrics(hyper_editor(model, tok, modules, "malmen", lr=1e-6), rows)
    large = edit_metrics(hyper_editor(model, tok, modules, "malmen", lr=1e3), rows)
    assert large["ES"] > small["ES"] and small["LS_subject"] >= large["LS_subject"]
    batch = encode_facts(tok, FACTS)
    ft = FineTune(model, tok, modules, steps=10, lr=1e-2)
    loss = lambda: F.cross_entropy(*forward(model, batch)[:2]).item()  # noqa: E731
    before = loss()
    ft.edit(FACTS)
    assert loss() < before
    ft.restore()
    assert loss() == pytest.approx(before)


@BOTH
def test_ft_in_chunks_takes_the_full_batch_steps(setup):
    """Memory bounded at any N: FT's gradient, accumulated a few facts at a time, is the
    full batch's mean, so the chunked steps land on the same weights."""
    _, model, tok, modules = setup
    whole = FineTune(model, tok, modules, steps=3, lr=1e-2, chunk_size=len(FACTS))
    chunked = FineTune(model, tok, modules, steps=3, lr=1e-2, chunk_size=1)
    expected = whole.edit(FACTS)
    whole.restore()
    got = chunked.edit(FACTS)
    chunked.restore()
    for name in expected:
        assert expected[name].abs().max() > 0
        torch.testing.assert_close(got[name], expected[name], atol=1e-3, rtol=1e-3)  # Adam:
        # g / sqrt(v) turns float noise in near-zero gradients into steps of up to 1e-4
    with pytest.raises(ValueError, match="chunk_size"):
        FineTune(model, tok, modules, chunk_size=0)


@BOTH
def test_chunked_capture_equals_one_batch(setup):
    _, model, tok, modules = setup
    batch = encode_facts(tok, FACTS)
    whole = hyper_editor(model, tok, modules, "malmen")
    whole.chunk_size = len(FACTS)
    one = whole.capture(batch)
    whole.chunk_size = 1
    chunked = whole.capture(batch)
    for n in modules:
        for a, b in zip(one[n], chunked[n]):
            assert a.shape == b.shape and (a - b).norm() <= 1e-5 * a.norm()  # float32 noise


@pytest.mark.parametrize("setup", ["tiny-llama"], indirect=True)
def test_predictions_batched_by_length_keep_the_rows_order(setup):
    _, model, tok, _ = setup
    rows = [encode_pair(tok, f["prompt"] + " Please." * i, f["target"])
            for i, f in enumerate(FACTS * 2)]
    rows.insert(2, None)
    batched = predictions(model, tok, rows, batch_size=2)
    assert batched[2] is None
    for row, got in zip(rows, batched):
        if row is not None:
            pred, labels = predictions(model, tok, [row])[0]
            assert torch.equal(got[1], labels) and torch.equal(got[0], pred)
