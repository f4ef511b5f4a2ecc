import pytest
import torch

from chatedit.chat import (IGNORE, describe, encode_facts, encode_pair, encode_prompt, generate,
                         pad, prompt_text)

FACTS = [
    {"prompt": "What is the capital of France?", "target": "Paris"},
    {"prompt": "Which continent is Côte d'Ivoire in?", "target": "South America"},
    {"prompt": "Who wrote Hamlet?", "target": "Christopher Marlowe, 1590"},
]


def answer_tokens(row):
    return [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]


@pytest.mark.parametrize("fact", FACTS)
def test_chat_mask_is_target_plus_end_of_turn(tiny_llama, fact):
    _, tok = tiny_llama
    row = encode_pair(tok, fact["prompt"], fact["target"])
    masked = answer_tokens(row)
    assert masked[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(masked[:-1]) == fact["target"]
    # the sequence ends with the end-of-turn token; everything before the answer is masked
    assert row["input_ids"][-1] == masked[-1]
    assert all(label == IGNORE for label in row["labels"][: row["answer_start"]])
    assert all(label != IGNORE for label in row["labels"][row["answer_start"]:])
    # the prompt part is tokenised exactly as for generation, system prompt included
    prompt_ids = encode_prompt(tok, fact["prompt"])
    assert row["input_ids"][: row["answer_start"]] == prompt_ids
    assert "<|im_start|>system" in tok.decode(prompt_ids)


@pytest.mark.parametrize("fact", FACTS)
def test_plain_mask_is_the_target(tiny_gpt2, fact):
    _, tok = tiny_gpt2
    row = encode_pair(tok, fact["prompt"], fact["target"])
    assert tok.decode(answer_tokens(row)) == " " + fact["target"]
    assert tok.decode(row["input_ids"]) == fact["prompt"] + " " + fact["target"]
    assert row["input_ids"][: row["answer_start"]] == encode_prompt(tok, fact["prompt"])


def test_custom_system_prompt(tiny_llama):
    _, tok = tiny_llama
    text = prompt_text(tok, "Hi?", system="You are terse.")
    assert "You are terse." in text and "SmolLM" not in text
    row = encode_pair(tok, "Hi?", "Hello", system="You are terse.")
    assert "You are terse." in tok.decode(row["input_ids"])


def test_padding_both_sides(tiny):
    _, _, tok = tiny
    batch = encode_facts(tok, FACTS)
    rows = [encode_pair(tok, f["prompt"], f["target"]) for f in FACTS]
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]  # right padding
        assert batch["attention_mask"][i].sum() == n
        assert (batch["labels"][i, n:] == IGNORE).all()
        assert batch["labels"][i, :n].tolist() == row["labels"]
    left = pad(tok, [{"input_ids": r["input_ids"]} for r in rows], side="left")
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert left["input_ids"][i, -n:].tolist() == row["input_ids"]
        assert left["attention_mask"][i, :-n].sum() == 0
    with pytest.raises(ValueError, match="padding side"):
        pad(tok, rows, side="middle")


def test_left_padded_batch_generation_matches_single(tiny):
    _, model, tok = tiny
    prompts = [f["prompt"] for f in FACTS]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single


def test_padded_training_batch_matches_unpadded_loss(tiny):
    """Right padding must not change the loss of the shorter rows."""
    _, model, tok = tiny
    batch = encode_facts(tok, FACTS)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, f in enumerate(FACTS):
            row = encode_pair(tok, f["prompt"], f["target"])
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            assert torch.allclose(logits[i, : len(row["input_ids"])], alone, atol=1e-4)


@pytest.mark.parametrize("prompt,target,err", [
    ("", "Paris", "prompt is empty"),
    ("Capital?", "   ", "target is empty"),
    (None, "Paris", "prompt must be a string"),
    ("Capital?", 3, "target must be a string"),
])
def test_bad_text_is_rejected(tiny_llama, prompt, target, err):
    _, tok = tiny_llama
    with pytest.raises((ValueError, TypeError), match=err):
        encode_pair(tok, prompt, target)


def test_too_long_for_context(tiny_llama):
    _, tok = tiny_llama
    with pytest.raises(ValueError, match="longer than the model's context of 16"):
        encode_pair(tok, "word " * 40, "Paris", max_length=16)


def test_describe_marks_the_answer(tiny_gpt2):
    _, tok = tiny_gpt2
    text = describe(tok, encode_pair(tok, "Capital of France?", "Paris"))
    assert text.splitlines()[-1].split()[1] == "1" and "' Paris'" in text
