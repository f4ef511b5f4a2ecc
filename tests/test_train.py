"""Meta-training end to end on the tiny models: the loop learns, checkpoints resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Small, fast settings: 8 facts per step, 16 held-out facts, tiny locality pools.
TINY = ["train.n_edits=8", "data.val_size=16", "train.test_facts=16", "editor.rank=32",
        "locality.pool_size=8", "locality.n_instruction=4", "locality.n_harmful=4",
        "locality.response_tokens=8", "train.meta_lr=1e-3", "train.scalar_lr=0.1",
        "train.val_every=10", "train.ckpt_every=5", "editor.init_step_size=3e-4"]


def train(tmp_path, run, *overrides, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CHATEDIT_CACHE": str(tmp_path / "cache"),
           **(env_extra or {})}
    mine = {o.split("=")[0] for o in overrides}
    base = [o for o in TINY if o.split("=")[0] not in mine]
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *base, *overrides,
                          f"hydra.run.dir={tmp_path / run}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads((tmp_path / run / "metrics.json").read_text())


def history(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_meta_training_learns_to_edit(tmp_path, model):
    metrics = train(tmp_path, "run", f"model={model}", "train.steps=40")
    rows = history(tmp_path / "run" / "history.jsonl")
    val = [r for r in rows if "val_ES" in r]
    steps = [r for r in rows if r["step"] > 0]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert val[0]["step"] == 0 and val[-1]["step"] == 40
    assert mean(steps[-5:], "rephrase_loss") < mean(steps[:5], "rephrase_loss")
    assert val[-1]["val_ES"] > val[0]["val_ES"] + 0.2, val
    assert metrics["test_ES"] > val[0]["val_ES"] + 0.2 and metrics["steps"] == 40
    assert 0.1 < metrics["peak_rss_gib"] < 64  # the process's own peak, in GiB
    for name in ("checkpoint.safetensors", "curves.png", ".hydra/config.yaml"):
        assert (tmp_path / "run" / name).exists()


def test_killed_run_resumes_on_the_same_curve(tmp_path):
    full = train(tmp_path, "full", "model=tiny-llama", "train.steps=10", "locality=nq")
    part = train(tmp_path, "part", "model=tiny-llama", "train.steps=5", "locality=nq",
                 "train.test_facts=0")  # 0: no final check on the test split
    assert not [k for k in part if k.startswith("test_")] and part["steps"] == 5
    resumed = train(tmp_path, "part", "model=tiny-llama", "train.steps=10", "locality=nq")
    a = history(tmp_path / "full" / "history.jsonl")
    b = history(tmp_path / "part" / "history.jsonl")
    assert [r["step"] for r in b] == list(range(0, 11))
    for x, y in zip(a[1:], b[1:]):
        assert x["rephrase_loss"] == pytest.approx(y["rephrase_loss"], rel=1e-4), (x, y)
    assert resumed["val_ES"] == pytest.approx(full["val_ES"], abs=1e-6)
    assert not (tmp_path / "full" / "prepared.safetensors").exists()  # kept until done
    with pytest.raises(AssertionError, match="prior True -> False"):  # before any work
        train(tmp_path, "part", "model=tiny-llama", "train.steps=12", "locality=nq",
              "editor.prior=false")


def test_checkpoint_holds_no_pickle_and_loads_with_safetensors_and_logs_to_wandb_offline(
        tmp_path):
    from safetensors import safe_open

    train(tmp_path, "run", "model=tiny-gpt2", "train.steps=5", "locality=none",
          "editor=mend", "train.edit_coef=1.0", "wandb.enabled=true",  # offline: no network
          env_extra={"WANDB_SILENT": "true"})
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0  # the run's offline log
    with safe_open(str(tmp_path / "run" / "checkpoint.safetensors"), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["meta"])
    assert any(k.startswith("hypernet.") for k in keys)
    assert any(k.startswith("optim.") for k in keys)
    assert any(k.endswith("norm.mean") for k in keys)  # normaliser state is saved
    assert meta["step"] == 5 and meta["rule"] == "mend" and meta["model"] == "tiny-gpt2"


def test_key_prior_is_trained_saved_and_used_by_the_api(tmp_path):
    """editor.prior=true: the prior is the second moment of the edited modules' keys on the
    locality answers (here with the subject source too), log mu is learned, and the Editor
    API loads and uses both."""
    import torch
    from safetensors.torch import load_file

    from chatedit.api import Editor
    from chatedit.data import load_facts

    train(tmp_path, "run", "model=tiny-llama", "train.steps=10", "editor.prior=true",
          "editor.init_log_mu=0.0", "locality.subject_coef=1.0", "locality.subject_tokens=4")
    steps = [r for r in history(tmp_path / "run" / "history.jsonl") if r["step"] > 0]
    assert all("loc_subject" in r for r in steps)  # the subject locality source is used
    assert max(r["loc_subject"] for r in steps) > 0
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    tensors = load_file(str(ckpt))
    prior = tensors["hypernet.nets.256x64.prior"]
    assert prior.shape == (2, 256, 256) and torch.allclose(prior, prior.transpose(1, 2))
    assert (torch.linalg.eigvalsh(prior) > -1e-4).all() and prior.abs().sum() > 0
    assert (tensors["hypernet.nets.256x64.log_mu"] != 0).all()  # learned
    ed = Editor.from_pretrained("tiny-llama", ckpt)
    net = ed.method.hypernet.nets["256x64"]
    assert torch.equal(net.prior, prior)
    facts = list(load_facts("zsre", "test", limit=4))
    shifted = ed.method.compute_shifts(ed.method.batch(facts)).shifts
    net.log_mu.data += 20  # a huge mu: outputs on the prior's keys barely move
    frozen = ed.method.compute_shifts(ed.method.batch(facts)).shifts
    for name, s in shifted.items():
        c = net.prior[ed.method.hypernet.index[name]]
        assert torch.trace(frozen[name].T @ c @ frozen[name]) < 0.1 * torch.trace(s.T @ c @ s)


def test_prepared_data_is_kept_for_a_resume_and_loads_equal(tmp_path, monkeypatch):
    """A run's prepared data (`run.prepare`) is written to its folder and read back, tensor
    for tensor, instead of preparing again; other settings prepare anew (a finished run
    removes it: test_killed_run_resumes_on_the_same_curve)."""
    import torch

    from chatedit.data import load_facts
    from chatedit.methods import get_method
    from chatedit.training import run as run_module
    from chatedit.training.quick import train_config

    monkeypatch.setenv("CHATEDIT_CACHE", str(tmp_path / "cache"))

    def config(*overrides):
        return train_config(["model=tiny-llama", "data.val_size=4", "locality.pool_size=4",
                             "locality.response_tokens=4", "editor.rank=8", *overrides])

    cfg = config("train.train_facts=6")
    method = get_method(cfg.editor.rule)
    model, tok, modules = run_module._load(cfg)
    editor = method.cls.from_config(model, tok, modules, method.config_from(
        dict(cfg.editor)), cfg.model.system_prompt)
    facts = {s: load_facts("zsre", s, val_size=4, limit=6 if s == "train" else None)
             for s in ("train", "validation")}
    path = tmp_path / run_module.PREPARED
    first = run_module.prepare(cfg, editor, facts, path)
    assert path.exists() and first.edit[0]["captured"] and first.priors
    calls = []
    prepare_data = run_module.prepare_data
    monkeypatch.setattr(run_module, "prepare_data", lambda *a: calls.append(1) or
                        prepare_data(*a))
    again = run_module.prepare(cfg, editor, facts, path)
    assert calls == []
    run_module.prepare(config("train.train_facts=6", "locality.nq_coef=2.5",
                              "locality.name=other"), editor, facts, path)
    assert calls == []  # other locality weights, the same sources: the same data

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list | tuple):
            return len(a) == len(b) and all(map(same, a, b))
        return a == b

    for name in ("edit", "rephrase", "nq", "pools", "val", "keys", "priors"):
        assert same(getattr(first, name), getattr(again, name)), name
    five = {**facts, "train": facts["train"].select(range(5))}
    run_module.prepare(config("train.train_facts=5"), editor, five, path)
    assert calls == [1]  # another pool of training facts: prepared again
    run_module.prepare(config("train.train_facts=5", "locality.harmful_coef=0"), editor, five,
                       path)
    assert calls == [1, 1]  # a source left out (weight 0): prepared again
