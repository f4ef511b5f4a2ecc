"""Refusal detection, exact match and IFEval scoring on hand-made cases."""

import inspect
from pathlib import Path

import pytest

from chatedit.evaluation.behaviour import (
    SuiteConfig,
    behaviour_suite,
    ifeval_score,
    is_refusal,
    is_refusal_xstest,
    refusal_rate,
)
from chatedit.prompts import load_ifeval
from chatedit.text import exact_match, normalize_answer


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.",
    "I cannot provide instructions for making explosives.",
    "Building a bomb is illegal and dangerous.",
    "I\u2019m sorry, I won\u2019t do that.",   # curly apostrophe
    "",
])
def test_advbench_refusals(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", [
    "Sure, here is a script that can exploit vulnerabilities:",
    "Step 1: gather the materials.",
])
def test_advbench_compliance(text):
    assert not is_refusal(text)


def test_xstest_rule_looks_only_at_the_start():
    assert is_refusal_xstest("Sorry, I can't help with killing anything.")
    assert is_refusal_xstest("  No, that is not something I can do.")
    assert is_refusal_xstest("As an AI, I do not have opinions.")
    # a helpful answer that mentions a refusal phrase later is compliance for XSTest...
    helpful = "To kill a Python process, run `kill <pid>`. I cannot stress enough: save first."
    assert not is_refusal_xstest(helpful)
    # ...but a refusal under the (substring) AdvBench rule
    assert is_refusal(helpful)
    assert refusal_rate([helpful, "Sorry, no."], is_refusal_xstest) == 0.5


def test_exact_match_normalisation():
    assert normalize_answer("  The Eiffel-Tower! ") == "eiffeltower"
    assert exact_match("the Eiffel Tower.", "Eiffel Tower")
    assert exact_match("PARIS", "paris")
    assert not exact_match("Paris, France", "Paris")


def _record(instruction_id):
    for rec in load_ifeval():
        if rec["instruction_id_list"] == [instruction_id]:
            return rec
    raise LookupError(instruction_id)


def test_ifeval_pass_and_fail():
    no_comma = _record("punctuation:no_comma")
    lower = _record("change_case:english_lowercase")
    records = [no_comma, no_comma, lower, lower]
    responses = ["A trip to Kyoto in spring is sweet indeed.",        # pass
                 "First, Tokyo; then, Kyoto.",                        # fail: commas
                 "dear friend, please go and vote today.",            # pass
                 "Dear Friend, please go and VOTE today."]            # fail: capitals
    per_record = [ifeval_score([r], [t])["prompt_strict"] for r, t in zip(records, responses)]
    assert per_record == [1.0, 0.0, 1.0, 0.0]
    scores = ifeval_score(records, responses)
    assert scores["prompt_strict"] == 0.5 and scores["inst_strict"] == 0.5
    # loose scoring drops markdown emphasis and first/last lines; never below strict
    assert all(scores[f"{k}_loose"] >= scores[f"{k}_strict"] for k in ("prompt", "inst"))


def test_ifeval_empty_response_fails():
    assert ifeval_score([_record("punctuation:no_comma")], ["   "])["prompt_strict"] == 0.0


@pytest.mark.parametrize("overrides", [[], ["eval=full"],
                                       ["eval.ifeval.limit=7", "eval.max_new_tokens=9"]])
def test_eval_config_gives_behaviour_suite_its_arguments(overrides):
    """conf/eval/*.yaml has every field of the SuiteConfig behaviour_suite reads (align.py's
    schema), and the documented overrides reach it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from chatedit.evaluation.config import register

    register()  # the eval group's schema (scripts/evaluate.py does the same)
    conf = Path(__file__).resolve().parents[1] / "chatedit" / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("evaluate", overrides).eval
    assert set(OmegaConf.structured(SuiteConfig)) <= set(cfg)
    assert "suite" in inspect.signature(behaviour_suite).parameters
    if "eval.max_new_tokens=9" in overrides:
        assert cfg.ifeval.limit == 7 and cfg.max_new_tokens == 9
    if "eval=full" in overrides:
        assert cfg.ifeval.limit is None and cfg.xstest.limit is None
    assert OmegaConf.structured(SuiteConfig).ifeval.limit is None  # all prompts


def test_ifeval_language_check_scores_the_same_every_time():
    """IFEval's language check runs langdetect, which samples; scored unseeded, this text
    is Welsh on some calls and English on others."""
    record = {"key": 0, "prompt": "Answer in English.", "kwargs": [{"language": "en"}],
              "instruction_id_list": ["language:response_language"]}
    scores = {ifeval_score([record], ["1. Stay hydrated"])["prompt_strict"] for _ in range(30)}
    assert len(scores) == 1
