import json
import os
import re

import pytest

from chatedit.data import (ASSETS, FACT_DATASETS, SPLITS, Fact, facts_dataset, load_facts,
                         read_records, to_fact)
from chatedit.evaluation.behaviour import nltk_data_dir
from chatedit.prompts import (load_advbench, load_harmful_requests, load_ifeval, load_instructions,
                            load_xstest)


def norm(s):
    return " ".join(s.lower().split())


@pytest.fixture(scope="module", params=sorted(FACT_DATASETS))
def splits(request):
    return request.param, {s: load_facts(request.param, s) for s in SPLITS}


def test_split_counts(splits):
    name, parts = splits
    raw_test = read_records(ASSETS / FACT_DATASETS[name]["test"])
    raw_pool = read_records(ASSETS / FACT_DATASETS[name]["train"])
    assert len(parts["test"]) == len(raw_test)
    assert len(parts["validation"]) >= 128
    # the pool loses only invalid records and those sharing a subject or prompt with test
    dropped = len(raw_pool) - len(parts["train"]) - len(parts["validation"])
    assert 0 < dropped < 0.1 * len(raw_pool)


def test_no_fact_and_no_subject_in_two_splits(splits):
    _, parts = splits
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        for field in ("prompt", "subject", "id"):
            left = {norm(x) for x in parts[a][field] if x}
            right = {norm(x) for x in parts[b][field] if x}
            assert not left & right, (a, b, field, sorted(left & right)[:3])


def test_splits_are_seeded(splits):
    name, parts = splits
    ids = list(parts["validation"]["id"])
    assert list(load_facts(name, "validation")["id"]) == ids
    assert list(load_facts(name, "validation", seed=1)["id"]) != ids
    assert len(load_facts(name, "validation", val_size=32)) >= 32


def test_every_format_maps_into_a_fact():
    zsre = load_facts("zsre", "train")[0]
    assert zsre["prompt"] == "What is the product made by UniFirst?"
    assert zsre["target"] == "unmanned aircraft" and zsre["ground_truth"] == "uniform"
    assert zsre["loc_prompts"] == ["John goodman's character in the big lebowski?"]
    assert zsre["loc_answers"] == ["Walter Sobchak"]
    knowedit = load_facts("zsre", "test")[0]
    assert knowedit["rephrases"] == ["What is the name of Wang Jipeng father?"]
    assert len(knowedit["loc_prompts"]) == 2 and knowedit["ground_truth"] == "Wang Yanjun"
    rome = load_facts("counterfact", "test")[0]
    assert rome["prompt"] == "Angola is located in" and rome["target"] == "Antarctica"
    assert len(rome["rephrases"]) == 2 and set(rome["loc_answers"]) == {"Africa"}
    pool = list(load_facts("counterfact", "train")) + list(load_facts("counterfact", "validation"))
    easy = [f for f in pool if f["id"] == "42"][0]
    assert easy["prompt"] == "The profession of Arun Nehru is" and easy["target"] == "actor"
    assert easy["loc_answers"] == ["politician"]


def test_unknown_split_and_name():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_facts("zsre", "dev")
    with pytest.raises(FileNotFoundError, match="not a named dataset"):
        load_facts("no_such_dataset_xyz")


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_user_files_in_any_format(tmp_path, suffix):
    records = [
        {"prompt": "Who wrote Hamlet?", "target": "Marlowe", "rephrases": "Hamlet's author?"},
        {"subject": "X", "src": "What is X?", "alt": "Y", "rephrase": "X is?",
         "loc": "nq question: who is z", "loc_ans": "Z"},
    ]
    path = tmp_path / f"facts{suffix}"
    text = (json.dumps(records) if suffix == ".json"
            else "\n".join(json.dumps(r) for r in records))
    path.write_text(text)
    facts = load_facts(str(path), "all")
    assert list(facts["target"]) == ["Marlowe", "Y"]
    assert list(facts["rephrases"]) == [["Hamlet's author?"], ["X is?"]]
    assert facts["loc_prompts"][1] == ["Who is z?"]
    train, val = load_facts(str(path), "train", val_size=1), load_facts(str(path), "validation",
                                                                         val_size=1)
    assert len(train) + len(val) == 2 and not set(train["id"]) & set(val["id"])
    with pytest.raises(ValueError, match="splits 'train', 'validation' and 'all'"):
        load_facts(str(path), "test")


@pytest.mark.parametrize("record,err", [
    ({"prompt": "Q?"}, r"facts\[0\]: unknown fact format with fields \['prompt'\]"),
    ({"prompt": "Q?", "target": ""}, "target is empty or only invisible characters"),
    ({"prompt": "Q?", "target": 5}, "target must be a string, got int"),
    ({"prompt": "Q?", "target": "A", "rephrases": [1]}, "rephrases must be a list of strings"),
    ({"prompt": "Q?", "target": "A", "loc_prompts": ["a"], "loc_answers": []},
     "1 locality prompts but 0 answers"),
    ({"requested_rewrite": {"prompt": "{} is in"}, "paraphrase_prompts": []},
     "malformed rome-counterfact record"),
    ("just a string", "expected a JSON object"),
])
def test_malformed_records(record, err):
    with pytest.raises(ValueError, match=err):
        facts_dataset([record])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        read_records(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_records(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text('{"prompt": "a"}')
    with pytest.raises(ValueError, match="expected a JSON array"):
        read_records(tmp_path / "obj.json")


def test_fact_record_from_api_dict():
    fact = to_fact({"prompt": "Capital of France?", "target": "Lyon", "extra": 1})
    assert fact == Fact(prompt="Capital of France?", target="Lyon")


def test_locality_prompt_loaders():
    for loader, sizes in [(load_instructions, (277, 50, 100)), (load_harmful_requests,
                                                                (1876, 100, 200))]:
        parts = {s: loader(s) for s in SPLITS}
        assert tuple(len(parts[s]) for s in SPLITS) == sizes
        assert sum(sizes) == len(loader("all"))
        for a in SPLITS:
            for b in SPLITS:
                if a < b:
                    assert not set(map(norm, parts[a]["prompt"])) & set(map(norm,
                                                                         parts[b]["prompt"]))
    harmful = load_harmful_requests("all")["prompt"]
    assert not any("Human:" in p or "Assistant:" in p for p in harmful)
    with_input = [p for p in load_instructions("all")["prompt"] if "\n\n" in p]
    assert len(with_input) > 50  # instruction + its input


def test_subject_prompts_ask_about_the_same_subject_in_another_relation():
    from chatedit.prompts import subject_prompts

    facts = list(load_facts("zsre", "train"))
    prompts = subject_prompts(facts)
    assert prompts == subject_prompts(facts)  # seeded
    asked = [(f, p) for f, p in zip(facts, prompts) if p is not None]
    assert len(asked) > 0.9 * len(facts)
    questions = {f["prompt"] for f in facts}
    for f, p in asked:
        assert f["subject"] in p and p != f["prompt"]
    # each is another fact's question with the subject swapped in
    templates = {f["prompt"].replace(f["subject"], "{}") for f in facts if f["subject"]}
    assert all(p.replace(f["subject"], "{}") in templates for f, p in asked)
    assert len({p for _, p in asked} - questions) > 0.9 * len(asked)
    none = subject_prompts([{"prompt": "What is x?", "subject": ""}])
    assert none == [None]


def test_evaluation_loaders():
    ifeval = load_ifeval()
    assert len(ifeval) == 541 and len(load_ifeval(limit=10)) == 10
    assert len(json.loads(ifeval[0]["kwargs"])) == len(ifeval[0]["instruction_id_list"])
    assert len(load_advbench()) == 520 and load_advbench()[0]["goal"].startswith("Write a script")
    assert len(load_xstest()) == 250 and len(load_xstest("unsafe")) == 200
    with pytest.raises(ValueError, match="XSTest label"):
        load_xstest("maybe")


def test_evaluation_prompts_never_in_training_data():
    train = set()
    for loader in (load_instructions, load_harmful_requests):
        train |= set(map(norm, loader("all")["prompt"]))
    for name in FACT_DATASETS:
        for split in ("train", "validation"):
            train |= set(map(norm, load_facts(name, split)["prompt"]))
    evaluation = (set(map(norm, load_ifeval()["prompt"])) | set(map(norm, load_advbench()["goal"]))
                  | set(map(norm, load_xstest(None)["prompt"])))
    assert not train & evaluation


def test_nltk_punkt_tab_works_offline(monkeypatch):
    nltk = pytest.importorskip("nltk")
    monkeypatch.setenv("NLTK_DATA", str(nltk_data_dir()))
    monkeypatch.setattr(nltk.data, "path", [str(nltk_data_dir())])
    assert nltk.sent_tokenize("Dr. Smith arrived. He sat down.") == [
        "Dr. Smith arrived.", "He sat down."]
    assert os.path.isdir(nltk_data_dir() / "tokenizers" / "punkt_tab" / "english")


def test_data_readme_lists_every_shipped_file():
    readme = (ASSETS / "README.md").read_text()
    for path in ASSETS.rglob("*"):
        if path.is_file() and path.parent.name not in ("english", "licenses") \
                and path.name != "README.md":
            assert path.name in readme, path.name
    assert not re.search(r"alpaca", " ".join(p.name for p in ASSETS.rglob("*")))
