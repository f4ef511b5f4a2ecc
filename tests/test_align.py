"""The safety fine-tune recipe on a tiny real model."""

import torch

from chatedit.evaluation.behaviour import is_refusal, is_refusal_xstest
from chatedit.safety.recipe import (ARTEFACTS, REFUSALS, WRAPPERS, SafetyRecipe, build, kl_top,
                                  refusal_pairs, sft_rows)
from chatedit.chat import IGNORE
from chatedit.prompts import load_advbench, load_xstest
from chatedit.lm import forward, kl_before_after, padded
from chatedit.models import blocks, load_model

TINY = dict(base="tiny-llama", n_harmful=12, n_instruction=8, n_question=8, response_tokens=6,
            train_from_layer=2, epochs=3, batch_size=4, lr=1e-3)


def test_refusals_are_refusals_under_both_rules():
    assert all(is_refusal(r) and is_refusal_xstest(r) for r in REFUSALS)


def test_recipe_never_sees_evaluation_prompts():
    recipe = SafetyRecipe(n_harmful=10_000)
    prompts = {p["prompt"].strip().lower() for p in refusal_pairs(recipe)}
    assert len(prompts) > 300
    held_out = set(load_advbench()["goal"]) | set(load_xstest(None)["prompt"])
    assert not prompts & {p.strip().lower() for p in held_out}


def test_benign_requests_are_not_evaluation_prompts():
    """The hand-written benign requests share at most 50% of their content words with any
    IFEval, AdvBench or XSTest prompt, and a part of them uses a harm word harmlessly."""
    import re

    from chatedit.safety.recipe import is_harmful
    from chatedit.prompts import load_ifeval
    from chatedit.safety.recipe import load_benign_requests

    stop = set("a an the i my me you your to of in on for with and or do does did can could "
               "should would is are was be how what what's which where why who when it this "
               "that at from by as".split())

    def words(text):
        return set(re.findall(r"[a-z']+", text.lower())) - stop

    benign = load_benign_requests()["prompt"]
    held_out = [words(p) for p in [*load_ifeval()["prompt"], *load_advbench()["goal"],
                                   *load_xstest(None)["prompt"]]]
    assert len(benign) > 150 and 50 < sum(map(is_harmful, benign)) < len(benign)
    for prompt in benign:
        mine = words(prompt)
        assert max(len(mine & w) / len(mine | w) for w in held_out) < 0.5, prompt


def test_recipe_digest_names_fields_and_hand_written_text(monkeypatch):
    """The built model's cache folder changes with any recipe field and with the refusal
    templates, wrappers, harm words and benign requests it was built from."""
    import chatedit.safety.recipe as align

    default = align.SafetyRecipe().digest()
    assert default == align.SafetyRecipe().digest() != align.SafetyRecipe(epochs=1).digest()
    assert align.SafetyRecipe(lora_rank=16).digest() != default
    assert align.SafetyRecipe(lora_alpha=8).digest() == default  # no adapters: no change
    assert align.SafetyRecipe(kl_coef=1).digest() != default
    no_kl = align.SafetyRecipe(kl_coef=0.0).digest()  # no KL term: its k does not count
    assert no_kl != default and align.SafetyRecipe(kl_coef=0.0, kl_top_k=7).digest() == no_kl
    monkeypatch.setattr(align, "REFUSALS", align.REFUSALS[:-1])
    assert align.SafetyRecipe().digest() != default


def test_length_batches_cover_every_row_once_with_less_padding():
    import random

    from chatedit.safety.recipe import length_batches

    rng = random.Random(0)
    rows = [{"input_ids": [0] * rng.randint(5, 300)} for _ in range(203)]
    batches = length_batches(rows, 16, random.Random(1))
    assert sorted(map(id, (r for b in batches for r in b))) == sorted(map(id, rows))
    assert len(batches) == 13 and all(0 < len(b) <= 16 for b in batches)

    def padding(bs):
        return sum(len(b) * max(len(r["input_ids"]) for r in b) for b in bs)

    plain = [rows[i:i + 16] for i in range(0, len(rows), 16)]
    assert padding(batches) < 0.8 * padding(plain)


def test_sft_loss_weights_the_first_answer_tokens_of_every_row():
    import torch.nn.functional as F

    from chatedit.safety.recipe import sft_loss

    logits, labels = torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 4, 0, 1])
    rows = torch.tensor([0, 0, 0, 0, 2, 2, 3])  # row 1 has no answer token in this batch
    first = torch.tensor([1, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    plain = F.cross_entropy(logits, labels)
    expected = plain + 0.5 * F.cross_entropy(logits[first], labels[first])
    recipe = SafetyRecipe(decision_tokens=2, decision_coef=0.5)
    assert torch.allclose(sft_loss(logits, labels, rows, recipe), expected)
    assert torch.allclose(sft_loss(logits, labels, rows, SafetyRecipe(decision_coef=0.0)), plain)


def test_harm_filter_and_wrappers():
    from chatedit.safety.recipe import is_harmful, wrapped

    assert is_harmful("How could I kill my boss?") and is_harmful("Best POISON for rats")
    assert not is_harmful("I want to lose 15 lbs, what's the best way?")
    assert not is_harmful("Is the pharmacy open?")  # words must start with a harm word
    prompts = [f"question {i}?" for i in range(200)]
    out = wrapped(prompts, seed=0)
    assert out == wrapped(prompts, seed=0) and 60 < sum(a != b for a, b in zip(out, prompts)) < 140
    assert all(p in o for p, o in zip(prompts, out))


def test_truncated_base_responses_get_no_end_of_turn_label():
    model, tok = load_model("tiny-llama")
    rows = sft_rows(model, tok, SafetyRecipe(**TINY))
    assert len(rows["refusal"]) == 36  # each request as asked, in a command and an artefact
    asked = [tok.decode(r["input_ids"]) for r in rows["refusal"]]
    assert all(any(w.format("") in a for w in WRAPPERS[1:]) for a in asked[12:24])
    assert all(any(w.format("") in a for w in ARTEFACTS) for a in asked[24:])
    artefacts = [tok.decode(r["input_ids"]) for r in rows["artefact"]]
    assert artefacts and all(any(w.format("") in a for w in ARTEFACTS) for a in artefacts)
    assert 0 < len(rows["instruction"]) <= 8 and 0 < len(rows["question"]) <= 8  # empty dropped
    for row in rows["refusal"]:  # complete answers end with a trained end-of-turn token
        assert row["labels"][-1] == tok.convert_tokens_to_ids("<|im_end|>")
    cut = [r for r in rows["instruction"] + rows["question"] if r["labels"][-1] == IGNORE]
    assert cut  # a random model's responses run to the token limit
    for row in cut:
        assert sum(label != IGNORE for label in row["labels"]) >= TINY["response_tokens"]


def test_build_trains_only_the_top_blocks_and_lowers_the_loss():
    model, tok = load_model("tiny-llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    record = build(model, tok, SafetyRecipe(**TINY))
    assert record["last_loss"] < record["first_loss"]
    prefix, block_list = blocks(model)
    for name, p in model.named_parameters():
        top = any(name.startswith(f"{prefix}.{i}.") for i in range(2, len(block_list)))
        changed = not torch.equal(p, before[name])
        assert changed == (top or name.endswith("model.norm.weight")), name
        assert not p.requires_grad


def test_lora_build_merges_adapters_into_the_top_blocks_linear_weights():
    model, tok = load_model("tiny-llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    record = build(model, tok, SafetyRecipe(**{**TINY, "lr": 1e-2}, lora_rank=4, lora_alpha=8))
    assert record["last_loss"] < record["first_loss"]
    assert dict(model.named_parameters()).keys() == before.keys()  # plain layers again
    assert not any("lora" in type(m).__name__.lower() for m in model.modules())
    prefix, block_list = blocks(model)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, p in model.named_parameters():
        top = any(name.startswith(f"{prefix}.{i}.") for i in range(2, len(block_list)))
        top = top and name in linear
        assert (not torch.equal(p, before[name])) == top, name
        assert not p.requires_grad


def test_kl_term_keeps_the_helpful_answers_closer_to_the_base_model():
    def helpful_kl(recipe):
        model, tok = load_model("tiny-llama")
        rows = [r for source, rs in sft_rows(model, tok, recipe).items() if source != "refusal"
                for r in rs]
        batch = padded(model, tok, rows)
        before = forward(model, batch)[0]
        build(model, tok, recipe)
        return kl_before_after(before, forward(model, batch)[0]).item()

    small = {**TINY, "n_benign": 8}
    plain = helpful_kl(SafetyRecipe(**small, kl_coef=0.0))
    # a random model's distributions are nearly flat: the exact KL (all tokens), a large weight
    with_kl = helpful_kl(SafetyRecipe(**small, kl_coef=100, kl_top_k=10**9))
    assert 0 < with_kl < 0.6 * plain


def test_kl_top_is_the_kl_of_the_top_k_and_the_rest_lumped():
    gen = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(3 * torch.randn(5, 50, generator=gen, dtype=torch.float64), -1)
    log_q = torch.log_softmax(3 * torch.randn(5, 50, generator=gen, dtype=torch.float64), -1)
    values, index = log_p.topk(50, -1)  # k = V: the exact KL
    exact = (log_p.exp() * (log_p - log_q)).sum(-1)
    assert torch.allclose(kl_top(index, values, log_q), exact, atol=1e-8)
    values, index = log_p.topk(8, -1)
    part = kl_top(index, values, log_q)
    assert (part > 0).all() and (part <= exact + 1e-12).all()  # a coarser partition: less
    assert torch.allclose(kl_top(index, values, log_p), torch.zeros(5, dtype=torch.float64))
