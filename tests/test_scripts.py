"""The hydra entry points, run as a user runs them."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / args[0]), *args[1:]], cwd=cwd,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_edit_script_on_tiny_gpt2_with_user_facts(tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": "Who wrote Hamlet?", "target": "Marlowe", '
                     '"rephrases": ["Hamlet was written by?"]}\n')
    stdout = run("edit.py", "model=tiny-gpt2", f"facts={facts}", "max_new_tokens=4",
                 f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert "mlp.c_proj" in stdout and "('Who wrote Hamlet?' -> 'Marlowe')" in stdout
    rows = json.loads((tmp_path / "run" / "answers.json").read_text())
    assert [r["prompt"] for r in rows][:2] == ["Who wrote Hamlet?", "Hamlet was written by?"]
    assert (tmp_path / "run" / ".hydra" / "config.yaml").exists()


def test_edit_script_on_tiny_llama_with_zsre(tmp_path):
    stdout = run("edit.py", "model=tiny-llama", "n_facts=2", "max_new_tokens=4",
                 f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    rows = json.loads((tmp_path / "run" / "answers.json").read_text())
    assert len(rows) == 2 + 2 + 2 and rows[0]["target"] == "Wang Chonghua"
    assert "<|im_end|>" in stdout
