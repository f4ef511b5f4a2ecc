"""The hydra entry points, run as a user runs them."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]

# the per-fact locality of each test set: same-subject prompts (KnowEdit), neighbourhood
# prompts (CounterFact)
PANEL = {"zsre": ("LS_subject",), "counterfact": ("LS_neighbour", "NS")}


def run(*args, cwd, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / args[0]), *args[1:]], cwd=cwd,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_edit_script_on_tiny_gpt2_with_user_facts(tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": "Who wrote Hamlet?", "target": "Marlowe", '
                     '"rephrases": ["Hamlet was written by?"]}\n')
    stdout = run("edit.py", "model=tiny-gpt2", f"facts={facts}", "max_new_tokens=4",
                 "editor_checkpoint=null", "show_format=true", f"save_edits={tmp_path / 'edits'}",
                 f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert "mlp.c_proj" in stdout and "'Who wrote Hamlet?' -> 'Marlowe'" in stdout
    rows = json.loads((tmp_path / "run" / "answers.json").read_text())
    assert [r["prompt"] for r in rows][:2] == ["Who wrote Hamlet?", "Hamlet was written by?"]
    assert all({"before", "after"} <= set(r) for r in rows)
    assert (tmp_path / "edits" / "edits.safetensors").exists()
    assert (tmp_path / "run" / ".hydra" / "config.yaml").exists()


def test_edit_script_adds_a_batch_to_an_earlier_sessions_edits(tmp_path):
    from chatedit import checkpoint

    for i, fact in enumerate(('{"prompt": "Who wrote Hamlet?", "target": "Marlowe"}',
                              '{"prompt": "Who painted the Mona Lisa?", "target": "Titian"}')):
        (tmp_path / f"facts{i}.jsonl").write_text(fact + "\n")
    common = ["model=tiny-gpt2", "max_new_tokens=2", "editor_checkpoint=null"]
    run("edit.py", *common, f"facts={tmp_path / 'facts0.jsonl'}",
        f"save_edits={tmp_path / 'edits0'}", f"hydra.run.dir={tmp_path / 'run0'}", cwd=tmp_path)
    stdout = run("edit.py", *common, f"facts={tmp_path / 'facts1.jsonl'}",
                 f"load_edits={tmp_path / 'edits0'}", f"save_edits={tmp_path / 'edits1'}",
                 f"hydra.run.dir={tmp_path / 'run1'}", cwd=tmp_path)
    assert "applied 1 saved batch(es)" in stdout
    _, meta = checkpoint.load(tmp_path / "edits1" / "edits.safetensors")
    assert [[f["prompt"] for f in b["facts"]] for b in meta["batches"]] == [
        ["Who wrote Hamlet?"], ["Who painted the Mona Lisa?"]]


def test_edit_script_trains_and_caches_a_quick_editor(tmp_path):
    quick = ["locality=nq", "train.steps=2", "train.n_edits=4", "train.val_every=2",
             "train.train_facts=16",
             "data.val_size=4", "train.test_facts=4", "editor.rank=8"]
    quick = "quick_train=[" + ",".join(f"'{o}'" for o in quick) + "]"
    args = ["edit.py", "model=tiny-llama", "n_facts=2", "max_new_tokens=4", quick]
    env = {"CHATEDIT_CACHE": str(tmp_path / "cache")}
    first = run(*args, f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path, env=env)
    assert "meta-training one" in first and "2 facts edited" in first
    second = run(*args, f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path, env=env)
    assert "meta-training one" not in second  # cached
    rows = json.loads((tmp_path / "b" / "answers.json").read_text())
    unrelated = OmegaConf.load(ROOT / "chatedit" / "conf" / "edit.yaml").unrelated
    assert len(rows) == 2 + 2 + len(unrelated) and rows[0]["target"] == "Wang Chonghua"
    assert [r["prompt"] for r in rows if r["kind"] == "unrelated"] == list(unrelated)


def test_quick_editor_cache_is_named_by_the_resolved_recipe():
    from chatedit.training.quick import quick_recipe

    folder = lambda *o: quick_recipe("tiny-llama", "zsre", ["train.steps=2", *o])[1]  # noqa: E731
    assert folder() == folder("editor.prior=true")  # the default, spelled out
    assert folder() != folder("editor.prior=false")


def test_bench_script_on_tiny_llama(tmp_path):
    stdout = run("bench.py", "model=tiny-llama", "ns=[1,8]", "train_steps=2", "train.n_edits=4",
                 "locality=nq", "editor.rank=8", f"hydra.run.dir={tmp_path / 'run'}",
                 cwd=tmp_path, env={"CHATEDIT_CACHE": str(tmp_path / "cache")})
    result = json.loads((tmp_path / "run" / "bench.json").read_text())
    edits = result["edits"]
    assert [r["n_facts"] for r in edits] == [1, 8] and edits[1]["tokens"] > edits[0]["tokens"]
    for r in edits:
        parts = sum(r[k] for k in ("capture", "hypernetwork", "solve", "apply"))
        assert abs(parts - r["edit"]) < 1e-9 and r["floor"] > 0
        assert abs(r["ratio"] - r["edit"] / r["floor"]) < 1e-9
    assert {(r["hidden_cache"], r["logits_at_labels_only"]) for r in result["training"]} == {
        (True, True), (True, False), (False, True), (False, False)}
    assert "| n_facts |" in stdout and result["hardware"]


def test_bench_script_diagnoses_a_trained_editor(tmp_path, tiny_llama_checkpoint):
    run("bench.py", "model=tiny-llama", "ns=[]", "train_steps=0", "data.val_size=8",
        f"editor_checkpoint={tiny_llama_checkpoint}", "diagnose_ns=[2,8]", "scale_ns=[8]",
        "levers.step_scale=[1.0,2.0]", "lifelong.batches=3",
        "lifelong.size=4", f"hydra.run.dir={tmp_path}",
        cwd=tmp_path, env={"CHATEDIT_CACHE": str(tmp_path / "cache")})
    result = json.loads((tmp_path / "bench.json").read_text())
    solve = result["solve"]
    assert [r["n_facts"] for r in solve] == [2, 8]  # the two modules share one solve
    assert all(len(r["module"].split(",")) == 2 for r in solve)
    assert all(r["key_rows"] > 0 and 0 <= r["residual"] <= 1 for r in solve)
    levers = result["levers"]
    assert [r["changed"] for r in levers] == [None, "step_scale"]
    assert levers[0]["step_scale"] == 1.0 and levers[1]["step_scale"] == 2.0
    assert all(0 <= r["ES"] <= 1 and r["n_facts"] == 8 for r in levers)
    lifelong = result["lifelong"]  # 3 batches in turn equal one joint edit of the 12 facts
    assert len(lifelong["batch_seconds"]) == 3 and lifelong["vs_joint"] < 1e-4
    assert all(0 < s < b for s, b in zip(lifelong["solve_seconds"], lifelong["batch_seconds"]))
    assert 0 < lifelong["rows"][0] < lifelong["rows"][1] < lifelong["rows"][2]
    assert (tmp_path / "lifelong.png").stat().st_size > 0


def test_evaluate_script_on_tiny_llama(tmp_path, tiny_llama_checkpoint):
    editors = tmp_path / "editors"  # where `make editors` puts them
    (editors / "malmen-chat").mkdir(parents=True)
    shutil.copy(tiny_llama_checkpoint, editors / "malmen-chat" / "checkpoint.safetensors")
    small = ["eval.kl_conversations=4", "eval.refusal_tokens=4", "eval.answer_tokens=4",
             "eval.ifeval.limit=4", "eval.advbench.limit=4", "eval.xstest.limit=4",
             "eval.max_new_tokens=8", "eval.gen_limit=4"]
    args = ["evaluate.py", "model=tiny-llama", "eval.ns=[1,8]", "eval.behaviour_ns=[8]",
            "methods.ft.steps=3", "methods.ft.lr=1e-2", "eval.max_n.malmen-chat=1",
            "~methods.memit", "~methods.alphaedit", f"editors_dir={editors}", *small,
            f"hydra.run.dir={tmp_path / 'eval'}"]
    env = {"CHATEDIT_CACHE": str(tmp_path / "cache")}
    stdout = run(*args, cwd=tmp_path, env=env)
    assert "skipping methods without a checkpoint: malmen-nq, mend" in stdout
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    records = result["records"]
    value = {(r["method"], r["dataset"], r["n"], r["metric"]): r["value"] for r in records}
    assert {r["method"] for r in records} == {"unedited", "ft", "malmen-chat"}
    for method, ns in (("unedited", (1, 8)), ("ft", (1, 8)), ("malmen-chat", (1,))):
        for dataset in ("zsre", "counterfact"):
            for n in ns:
                for metric in ("ES", "GS", "ES_gen", "GS_gen", "LS_NQ", "chat_8", "chat_32",
                               *PANEL[dataset]):
                    assert 0 <= value[(method, dataset, n, metric)] <= 1
        # behaviour metrics only where asked: N = 8 on the first dataset
        assert ((method, "zsre", 8, "ifeval_prompt_strict") in value) == (8 in ns)
        assert (method, "zsre", 1, "ifeval_prompt_strict") not in value
        assert (method, "counterfact", 8, "advbench_refusal") not in value
    assert ("malmen-chat", "zsre", 8, "ES") not in value  # eval.max_n caps its N
    shares = [v for k, v in value.items() if k[:3] == ("ft", "zsre", 8)
              and k[3].startswith("tokens_p<")]  # LS by the unedited model's confidence
    assert len(shares) == 4 and sum(shares) == pytest.approx(1.0)
    # the unedited model agrees with itself and does not drift
    for metric in ("LS_subject", "LS_NQ", "chat_8", "chat_32"):
        assert value[("unedited", "zsre", 8, metric)] == 1.0
    assert value[("unedited", "counterfact", 8, "LS_neighbour")] == 1.0
    assert value[("unedited", "zsre", 8, "kl_instruction")] == 0.0
    assert value[("ft", "zsre", 8, "kl_instruction")] > 0.0
    assert value[("ft", "zsre", 8, "ES")] > value[("unedited", "zsre", 8, "ES")]
    for name in ("results.md", "results.png"):
        assert (tmp_path / "eval" / name).exists()
    changes = (tmp_path / "eval" / "results.md").read_text().split("Change against")[1]
    assert "| ft | zsre | 8 |" in changes and "| unedited |" not in changes
    assert result["config"]["eval"]["ns"] == [1, 8]

    # stopped before the unedited model's CounterFact N = 1, run again in its folder with
    # FT's settings changed and malmen-chat's cap raised: what is missing, FT, and the N the
    # cap adds are measured; the rest is kept as it was
    path = tmp_path / "eval" / "results.json"
    result["records"] = [r for r in records if (r["method"], r["dataset"], r["n"]) !=
                         ("unedited", "counterfact", 1)]
    path.write_text(json.dumps(result))
    stdout = run(*args, "methods.ft.steps=2", "eval.max_n.malmen-chat=8", cwd=tmp_path, env=env)
    assert "dropping the records of methods whose settings changed or that are gone: ft" \
        in stdout
    assert "resuming: 5 method x dataset x N already measured" in stdout
    measured = [line.split(":")[0] for line in stdout.splitlines() if " N=" in line]
    assert sorted(measured) == [
        "ft counterfact N=1", "ft counterfact N=8", "ft zsre N=1", "ft zsre N=8",
        "malmen-chat counterfact N=8", "malmen-chat zsre N=8", "unedited counterfact N=1"]
    kept = json.loads(path.read_text())
    again = {(r["method"], r["dataset"], r["n"], r["metric"]): r["value"]
             for r in kept["records"]}
    assert kept["config"]["methods"]["ft"]["steps"] == 2
    assert ("malmen-chat", "zsre", 8, "ifeval_prompt_strict") in again
    assert again.keys() > value.keys()
    assert all(again[k] == value[k] for k in value  # kept, or the same slice measured again
               if k[0] != "ft" and not (k[:3] == ("unedited", "counterfact", 1)
                                        and k[3].endswith("seconds")))
    # with other overrides it refuses, naming what differs, before any work
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *args[1:],
                          "eval.ns=[1,3]"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=600)
    assert out.returncode != 0 and "config differs in: eval" in out.stderr, out.stderr[-2000:]


def test_evaluate_script_sequential_protocol_on_tiny_llama(tmp_path, tiny_llama_checkpoint):
    """eval.sequential: T batches edited in turn, metrics after each, a retention plot; every
    method of the lifelong comparison (MALMEN joint and stacked, AlphaEdit, MEMIT, FT)."""
    editors = tmp_path / "editors"
    (editors / "malmen-chat").mkdir(parents=True)
    shutil.copy(tiny_llama_checkpoint, editors / "malmen-chat" / "checkpoint.safetensors")
    ckpt = editors / "malmen-chat" / "checkpoint.safetensors"
    overrides = [
        "model=tiny-llama", "eval.sequential={batches:3,size:4,every:2}",
        "eval.datasets=[zsre]", "eval.behaviour_ns=[]", "~methods.malmen-nq", "~methods.mend",
        f"+methods.malmen-stacked={{rule:malmen,checkpoint:{ckpt},joint:false}}",
        "methods.ft.steps=2", "methods.memit.v_steps=3", "methods.alphaedit.v_steps=3",
        "+methods.memit.cov_conversations=8", "+methods.alphaedit.cov_conversations=8",
        f"editors_dir={editors}"]
    env = {"CHATEDIT_CACHE": str(tmp_path / "cache")}
    run("evaluate.py", *overrides, f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path, env=env)
    records = json.loads((tmp_path / "eval" / "results.json").read_text())["records"]
    methods = {"malmen-chat", "malmen-stacked", "ft", "memit", "alphaedit"}
    assert {r["method"] for r in records} == methods  # the unedited model has no batches
    for method in methods:
        first = sorted((r["batch"], r["n"], r["value"]) for r in records
                       if r["method"] == method and r["metric"] == "ES_first")
        assert [(b, n) for b, n, _ in first] == [(2, 8), (3, 12)]  # every 2nd and the last
        seconds = [r["batch"] for r in records
                   if r["method"] == method and r["metric"] == "edit_seconds"]
        assert sorted(seconds) == [1, 2, 3]
        assert all(0 <= v <= 1 for *_, v in first)
        ls = [r["value"] for r in records
              if r["method"] == method and r["metric"] == "LS_subject"]
        assert len(ls) == 2 and all(0 <= v <= 1 for v in ls)
    assert (tmp_path / "eval" / "retention.png").exists()
    table = (tmp_path / "eval" / "results.md").read_text().splitlines()
    assert "| ES_first |" in table[0] and table[0].endswith("| edit_seconds |")
    rows = [line.split(" | ") for line in table if line.startswith("| ft | zsre |")]
    assert [r[2] for r in rows] == ["4", "8", "12"]  # a row per batch, with its edit time
    assert all(float(r[-1].rstrip(" |")) > 0 for r in rows)

    # the same run in two parts (methods apart, as run in parallel) merges back into it,
    # and evaluate.py resumes from the merged file without measuring anything again
    whole = json.loads((tmp_path / "eval" / "results.json").read_text())
    parts = {"a": ["unedited", "malmen-chat", "malmen-stacked"], "b": ["ft", "memit", "alphaedit"]}
    for part, names in parts.items():
        (tmp_path / part).mkdir()
        (tmp_path / part / "results.json").write_text(json.dumps({
            "config": {**whole["config"], "methods": {m: whole["config"]["methods"][m]
                                                      for m in names}},
            "records": [r for r in records if r["method"] in names]}))
    out = tmp_path / "merged" / "results"
    run("collect.py", str(tmp_path / "a"), str(tmp_path / "b"), f"--out={out}", cwd=tmp_path)
    merged = json.loads(out.with_suffix(".json").read_text())
    assert merged["config"]["methods"].keys() == whole["config"]["methods"].keys()
    assert sorted(map(json.dumps, merged["records"])) == sorted(map(json.dumps, records))
    assert out.with_name("results-retention.png").exists()
    assert sorted(out.with_suffix(".md").read_text().splitlines()) == sorted(table)
    stdout = run("evaluate.py", *overrides, f"hydra.run.dir={out.parent}", cwd=tmp_path,
                 env=env)
    assert "resuming" in stdout and "reference" not in stdout and "batch 1/3" not in stdout


def test_merge_refuses_parts_of_different_evaluations():
    from chatedit.evaluation.suite import merge

    part = {"model": {"name": "m"}, "eval": {"max_n": {}}, "methods": {"ft": {"lr": 0.01}}}
    rec = {"method": "ft", "dataset": "zsre", "n": 4, "metric": "ES", "value": 0.5}
    other_model = {**part, "model": {"name": "other"}, "methods": {"memit": {}}}
    with pytest.raises(ValueError, match="config differs in: model"):
        merge({"a": {"config": part, "records": [rec]}, "b": {"config": other_model,
                                                            "records": []}})
    other_lr = {**part, "methods": {"ft": {"lr": 0.1}}}
    with pytest.raises(ValueError, match="method 'ft' has other settings in b"):
        merge({"a": {"config": part, "records": [rec]}, "b": {"config": other_lr,
                                                            "records": []}})


def test_a_cap_on_n_means_the_same_when_resuming(tmp_path):
    """`eval.max_n` read one way by the run and by its resume: null is no cap, 0 allows no N,
    and a stopped run's records above a method's new cap are not kept."""
    from chatedit.evaluation.suite import finished, within_cap

    caps = {"ft": 0, "memit": 128, "mend": None}
    assert [within_cap(caps, m, 128) for m in ("ft", "memit", "mend", "other")] == \
        [False, True, True, True]
    assert not within_cap(caps, "memit", 129)
    config = {"model": "m", "methods": {"ft": {}, "memit": {}}, "eval": {"max_n": caps}}
    records = [{"method": m, "dataset": "zsre", "n": n, "metric": "ES", "value": 1.0}
               for m in ("ft", "memit") for n in (16, 1000)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"config": {**config, "eval": {"max_n": {}}},
                                "records": records}))
    assert [(r["method"], r["n"]) for r in finished(path, config)] == [("memit", 16)]
