"""The locality panel (LS_subject, LS_neighbour, NS, LS_NQ, everyday chat), the paired
bootstrap of behaviour changes, and the frontier tool, on the tiny models."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatedit import Editor
from chatedit.chat import sliced
from chatedit.data import load_facts, nq_probes
from chatedit.evaluation.behaviour import paired_change
from chatedit.evaluation.metrics import edit_metrics
from chatedit.evaluation.panel import Probes, neighbourhood_score, panel_rows, unchanged
from chatedit.prompts import load_everyday, load_questions
from chatedit.text import key

ROOT = Path(__file__).resolve().parents[1]


def test_every_format_names_its_locality_and_the_nq_probes_are_held_out():
    assert set(load_facts("zsre", "train")["loc_kind"]) == {"nq", ""}
    assert set(load_facts("zsre", "test")["loc_kind"]) == {"subject"}
    assert set(load_facts("counterfact", "validation")["loc_kind"]) == {"neighbour"}
    assert set(load_facts("counterfact", "test")["loc_kind"]) == {"neighbour"}
    val, test = nq_probes("validation"), nq_probes("test")
    assert len(val) == len(test) == 150 and not {key(q) for q, _ in val} & {key(q) for q, _ in test}
    probes = {key(q) for q, _ in val + test}
    for split in ("train", "validation"):
        seen = {key(p) for f in load_facts("zsre", split, val_size=384) for p in f["loc_prompts"]}
        assert not seen & probes  # no training loss and no validation fact holds a probe
    assert not {key(p) for p in load_questions("train")["prompt"]} & probes
    everyday = {s: list(load_everyday(s)["prompt"]) for s in ("validation", "test")}
    assert len(everyday["test"]) == 140 and len(everyday["validation"]) == 100
    assert not set(everyday["test"]) & set(everyday["validation"])


def test_panel_rows_and_scores(tiny):
    _, model, tok = tiny
    facts = [*list(load_facts("zsre", "validation"))[:3], *list(load_facts("zsre", "test"))[:2],
             *list(load_facts("counterfact", "test"))[:2]]
    rows = panel_rows(model, tok, facts)
    assert all(len(r) == len(facts) for r in rows.values())
    # zsRE validation: a built same-subject question, answered by the model; test: KnowEdit's
    built = rows["subject"][0]
    assert built is not None and facts[0]["subject"] in tok.decode(built["input_ids"])
    assert rows["subject"][3] is not None and rows["subject"][5] is None
    assert len(rows["neighbour"][5]) == len(facts[5]["loc_prompts"]) == 10
    part = sliced(rows, 7)
    assert len(part["neighbour"]) == len(part["neighbour_new"]) == 20
    assert neighbourhood_score([0.1, 2.0, 1.0], [1.0, 1.0, 1.0]) == pytest.approx(1 / 3)
    assert unchanged([[1, 2, 3], [1, 9]], [[1, 2, 4], [1, 2]], 2) == 0.5
    assert unchanged([[1, 2, 3], [1, 9]], [[1, 2, 4], [1, 2]], 1) == 1.0


def test_probes_agree_with_the_unedited_model_and_see_an_edit(tiny_llama_checkpoint):
    ed = Editor.from_pretrained("tiny-llama", tiny_llama_checkpoint)
    probes = Probes(ed.model, ed.tokenizer, "validation", limit=24)
    assert probes() == {"LS_NQ": 1.0, "chat_8": 1.0, "chat_32": 1.0}
    facts = list(load_facts("zsre", "validation"))[:8]
    rows = sliced(panel_rows(ed.model, ed.tokenizer, facts), 8)
    ed.method.step_scale = 50.0  # a large shift must show in the panel
    out = edit_metrics(ed.method, rows, probes=probes)
    assert out["LS_NQ"] < 1.0 and out["chat_32"] < 1.0 and out["LS_subject"] < 1.0
    assert {"ES", "GS", "LS_subject", "chat_8"} <= set(out)
    assert probes() == {"LS_NQ": 1.0, "chat_8": 1.0, "chat_32": 1.0}  # restored


def test_paired_bootstrap_interval():
    before = [True] * 50 + [False] * 50
    after = [True] * 40 + [False] * 60  # 10 prompts lost
    delta, lo, hi = paired_change(before, after)
    assert delta == pytest.approx(-0.10) and lo < -0.10 < hi and hi < 0
    assert paired_change(before, after) == (delta, lo, hi)  # seeded
    same = paired_change(before, before)
    assert same == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="equally long"):
        paired_change(before, after[:-1])


def test_frontier_script_traces_editors_and_resumes(tiny_llama_checkpoint, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CHATEDIT_CACHE": str(tmp_path / "cache")}
    args = [sys.executable, str(ROOT / "scripts" / "frontier.py"), "model=tiny-llama",
            f"checkpoint={tiny_llama_checkpoint}", "ns=[4]", "step_scales=[2.0]",
            "refusal.prompts=4", "refusal.tokens=4", "data.val_size={zsre:4,counterfact:4}",
            "+editors.preserving={out_mu:100.0,out_bins:2}", f"hydra.run.dir={tmp_path / 'out'}"]
    out = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "frontier.json").read_text())
    value = {(r["editor"], r["n"], r["step_scale"], r["metric"]): r["value"]
             for r in result["records"]}
    for editor in ("default", "preserving"):
        for metric in ("ES", "LS_subject", "LS_neighbour", "NS", "LS_NQ", "chat_8", "refusal"):
            assert 0 <= value[editor, 4, 2.0, metric] <= 1
    assert result["unedited"]["chat_8"] == 1.0
    assert (tmp_path / "out" / "frontier.png").exists()
    again = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0 and "N 4" not in again.stdout  # nothing measured again
    assert json.loads((tmp_path / "out" / "frontier.json").read_text())["records"] == \
        result["records"]
