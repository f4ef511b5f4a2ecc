"""Hydra multirun sweeps: joblib locally, Slurm settings through submitit's local executor."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny-llama", "train.steps=2", "train.n_edits=4", "data.val_size=4",
        "train.test_facts=4", "editor.rank=8", "locality.pool_size=4", "locality.n_instruction=2",
        "locality.n_harmful=2", "locality.response_tokens=4", "train.val_every=2", "threads=1"]


def script(name, *args, cwd, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CHATEDIT_CACHE": str(cwd / "cache")}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=900)
    if check:
        assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_joblib_sweep_runs_four_jobs_and_collect_tables_them(tmp_path):
    sweep = tmp_path / "sweep"
    script("train.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           "editor=malmen,mend", "locality=chat,nq", *TINY, f"hydra.sweep.dir={sweep}",
           cwd=tmp_path)
    assert len(list(sweep.rglob("metrics.json"))) == 4
    out = script("collect.py", str(sweep), cwd=tmp_path).stdout
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| editor | locality | val_ES")
    assert {tuple(line.split(" | ")[:2]) for line in lines[1:]} == {
        ("| malmen", "chat"), ("| malmen", "nq"), ("| mend", "chat"), ("| mend", "nq")}
    records = json.loads((sweep / "collect.json").read_text())
    assert all(0 <= r["metrics"]["val_ES"] <= 1 for r in records)
    assert (sweep / "collect.png").exists()


def test_slurm_launcher_resolves():
    """In process: the training config composed with the Slurm launcher preset."""
    from hydra import compose, initialize_config_module

    from chatedit.training.config import register

    register()
    with initialize_config_module("chatedit.conf", version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm",
                                           "hydra.launcher.partition=gpu",
                                           "hydra.launcher.timeout_min=600"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.timeout_min == 600 and launcher.gpus_per_node == 1 and launcher.mem_gb == 64


def test_sweep_runs_through_submitit_local_executor(tmp_path):
    sweep = tmp_path / "sweep"
    script("train.py", "-m", "hydra/launcher=slurm_local", "editor=malmen,mend", "locality=nq",
           *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert len(list(sweep.rglob("metrics.json"))) == 2
    assert (sweep / ".submitit").is_dir()


def test_collect_rejects_an_empty_folder(tmp_path):
    out = script("collect.py", str(tmp_path), cwd=tmp_path, check=False)
    assert out.returncode != 0 and "no metrics.json" in out.stderr


def test_collect_names_a_broken_results_file(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text('{"records": [')
    out = script("collect.py", str(tmp_path / "run"), cwd=tmp_path, check=False)
    assert out.returncode != 0 and "results.json is not a JSON results file" in out.stderr
